"""``facefl deploy status``: what an operator needs to know about a deployment at a glance, read from files only
(it works whether or not the SuperLink runs, and changes nothing).

For each site: whether it is active or revoked, its node id and status at the SuperLink, its last contact, and its
privacy ledger where the site's state folder can be read. For the deployment: when the CA's and the SuperLink's TLS
certificates expire. The sources:

- ``DIR/deployment.json``: the sites, their key fingerprints, revocations; ``DIR/ca/ca.crt`` (or the SuperLink's
  copy) and ``DIR/superlink/server.crt``: the certificates' expiry. Site keys are OpenSSH keys and do not expire.
- ``STATE/nodes.json`` (``facefl superlink``): site name -> node id. ``STATE/superlink.db``: Flower's own record of
  each node, opened read-only. Flower 1.42 keeps ``online_until`` = the node's last heartbeat + 2 x its heartbeat
  interval (``HEARTBEAT_PATIENCE``), so the last contact is ``online_until - 2 x heartbeat_interval``, unless the
  node signed off (``last_deactivated_at``, when Flower sets ``online_until`` to that moment); a node still marked
  online whose ``online_until`` has passed is offline (Flower decides that lazily, on the next query).
- A run folder (``--run``): the last round in which each site's update was aggregated, from its audit log.
- Site ledgers: read by the caller (``client.privacy`` belongs to the site's layer) and passed in as summaries.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from common.deployment import SITE_CONFIG
from server.deployment.provision import CA_CERT, ProvisionError, SERVER_CERT, _deployment_root, _read_record
from server.deployment.superlink import DATABASE, NODES_FILE

HEARTBEAT_PATIENCE = 2  # flwr.common.constant.HEARTBEAT_PATIENCE in Flower 1.42
EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class CertStatus:
    """One certificate's validity."""

    what: str
    path: Path
    not_after: dt.datetime
    days_left: float

    @property
    def state(self) -> str:
        if self.days_left < 0:
            return "EXPIRED"
        return "expires soon" if self.days_left < EXPIRY_WARNING_DAYS else "valid"


@dataclass
class SiteStatus:
    """One site as the deployment, the SuperLink and (where readable) the site itself record it."""

    name: str
    revoked_at: str = ""  # empty while the site is active
    revoked_by: str = ""
    revoke_reason: str = ""
    fingerprint: str = ""
    added_at: str = ""
    node_id: int | None = None
    node_status: str = "not registered"  # registered | online | offline | unregistered | not registered
    last_contact: dt.datetime | None = None
    last_aggregated_round: int | None = None
    ledger: dict | None = None  # PrivacyLedger.summary() plus "trained_rounds"; None when not readable
    state_dir: Path | None = None

    @property
    def revoked(self) -> bool:
        return bool(self.revoked_at)


@dataclass
class DeploymentStatus:
    root: Path
    superlink_address: str
    certificates: list[CertStatus] = field(default_factory=list)
    sites: dict[str, SiteStatus] = field(default_factory=dict)
    nodes_source: str = ""  # where node status came from ("" when the SuperLink's state folder was not found)
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))


def deployment_status(deployment_dir: str | Path, *, state: str | Path | None = None, run: str | Path | None = None,
                      ledgers: Mapping[str, dict] | None = None, now: dt.datetime | None = None) -> DeploymentStatus:
    """The status of the deployment in ``deployment_dir``; ``state`` is the SuperLink's state folder (default
    ``DIR/superlink/state``), ``run`` a run folder, ``ledgers`` site name -> ledger summary (see
    :func:`site_state_dirs` for where a site's ledger is)."""
    root = _deployment_root(deployment_dir)
    record = _read_record(root)
    now = now or dt.datetime.now(dt.timezone.utc)
    out = DeploymentStatus(root, record.get("superlink_address", ""), now=now)
    ca = root / "ca" / CA_CERT if (root / "ca" / CA_CERT).is_file() else root / "superlink" / CA_CERT
    for what, path in (("CA", ca), ("SuperLink TLS", root / "superlink" / SERVER_CERT)):
        if path.is_file():
            out.certificates.append(_cert_status(what, path, now))
    for name, entry in record.get("sites", {}).items():
        out.sites[name] = SiteStatus(name, fingerprint=entry.get("fingerprint", ""), added_at=entry.get("added_at", ""))
    for name, entry in record.get("revoked", {}).items():
        out.sites[name] = SiteStatus(name, revoked_at=entry.get("revoked_at", "?"),
                                     revoked_by=entry.get("revoked_by", ""), revoke_reason=entry.get("reason", ""),
                                     fingerprint=entry.get("fingerprint", ""), added_at=entry.get("added_at", ""))

    state_dir = Path(state).expanduser().absolute() if state else root / "superlink" / "state"
    if (state_dir / NODES_FILE).is_file():
        out.nodes_source = str(state_dir / NODES_FILE)
        nodes = _read_json(state_dir / NODES_FILE).get("nodes", {})
        for name, entry in nodes.items():
            site = out.sites.setdefault(name, SiteStatus(name))
            site.node_id = int(entry["node_id"])
            site.node_status = str(entry.get("status", "registered"))
        flower = _flower_nodes(state_dir / DATABASE)
        if flower is not None:
            out.nodes_source = str(state_dir / DATABASE)
            for site in out.sites.values():
                node = flower.get(site.node_id) if site.node_id is not None else None
                if node is not None:
                    site.node_status, site.last_contact = _node_contact(node, now)
    if run:
        for name, round_ in last_aggregated_rounds(run).items():
            out.sites.setdefault(name, SiteStatus(name)).last_aggregated_round = round_
    for name, summary in (ledgers or {}).items():
        site = out.sites.setdefault(name, SiteStatus(name))
        site.ledger = dict(summary)
    return out


def site_state_dirs(deployment_dir: str | Path, given: Mapping[str, str | Path] | None = None) -> dict[str, Path]:
    """Site name -> its state folder: ``given`` ones first, else the ``state-dir`` of the site's bundle
    (``site.toml``, relative to the bundle) where that folder exists on this machine."""
    root = _deployment_root(deployment_dir)
    out = {name: Path(p).expanduser().absolute() for name, p in (given or {}).items()}
    for bundle in sorted((root / "sites").glob("*")) if (root / "sites").is_dir() else ():
        if bundle.name in out or not (bundle / SITE_CONFIG).is_file():
            continue
        try:
            config = tomllib.loads((bundle / SITE_CONFIG).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        folder = (bundle / str(config.get("state-dir") or "state")).expanduser().absolute()
        if folder.is_dir():
            out[bundle.name] = folder
    return out


def last_aggregated_rounds(run: str | Path) -> dict[str, int]:
    """Site name -> the last round whose aggregate included its update, from the run's ``audit.jsonl``."""
    path = Path(run).expanduser().absolute() / "audit.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"No audit.jsonl in {path.parent}; pass --run the folder of a run (its run-dir).")
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if '"round-results"' not in line:
            continue
        data = json.loads(line).get("data", {})
        for name in data.get("aggregated", []):
            out[name] = max(out.get(name, 0), int(data["round"]))
    return out


def format_status(status: DeploymentStatus) -> str:
    """The report ``facefl deploy status`` prints."""
    now = status.now
    lines = [f"Deployment {status.root} (SuperLink {status.superlink_address}), {_iso(now)}"]
    for cert in status.certificates:
        lines.append(f"  {cert.what + ' certificate:':<27}expires {_iso(cert.not_after)} "
                     f"({_days(cert.days_left)}; {cert.state})  {cert.path}")
    lines.append("  site keys:                 OpenSSH keys, no expiry (revoke with `facefl deploy revoke-site`)")
    if not status.nodes_source:
        lines.append("  SuperLink state: not found (pass --state, the folder `facefl superlink` keeps)")
    else:
        lines.append(f"  SuperLink state: {status.nodes_source}")
    lines.append("")
    header = f"  {'site':<14}{'state':<9}{'node':<22}{'status':<16}{'last contact':<36}{'aggregated':<12}privacy ledger"
    lines.append(header)
    for name in sorted(status.sites):
        site = status.sites[name]
        state = "REVOKED" if site.revoked else "active"
        node = str(site.node_id) if site.node_id is not None else "-"
        contact = f"{_iso(site.last_contact)} ({_ago(now - site.last_contact)})" if site.last_contact else "-"
        aggregated = f"round {site.last_aggregated_round}" if site.last_aggregated_round is not None else "-"
        lines.append(f"  {name:<14}{state:<9}{node:<22}{site.node_status:<16}{contact:<36}{aggregated:<12}"
                     f"{_ledger_text(site.ledger)}")
        if site.revoked:
            lines.append(f"  {'':<14}revoked at {site.revoked_at}" +
                         (f" by {site.revoked_by}" if site.revoked_by else "") +
                         (f" ({site.revoke_reason})" if site.revoke_reason else ""))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- helpers


def _cert_status(what: str, path: Path, now: dt.datetime) -> CertStatus:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ProvisionError(f"{path} is not a PEM certificate ({exc}); restore it from the deployment.") from None
    not_after = cert.not_valid_after_utc
    return CertStatus(what, path, not_after, (not_after - now).total_seconds() / 86400)


def _flower_nodes(database: Path) -> dict[int, dict] | None:
    """Node id -> Flower's node row, from the SuperLink's database opened read-only; None without one."""
    if not database.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT node_id, status, last_activated_at, last_deactivated_at, online_until, "
                              "heartbeat_interval FROM node").fetchall()
    except sqlite3.Error as exc:
        raise ProvisionError(f"Cannot read the SuperLink's database {database} ({exc}).") from None
    # Flower stores the unsigned 64-bit node ids as signed integers.
    return {(int(r["node_id"]) + (1 << 64)) % (1 << 64): dict(r) for r in rows if r["node_id"] is not None}


def _node_contact(node: dict, now: dt.datetime) -> tuple[str, dt.datetime | None]:
    """(status, last contact) of a node row: its last heartbeat, or the moment it signed off (a SuperNode that stops
    cleanly is deactivated: Flower then sets ``online_until`` to that moment), or its activation if later."""
    status = str(node.get("status") or "registered")
    until, interval = node.get("online_until"), node.get("heartbeat_interval")
    times = [_parse_time(node.get("last_activated_at"))]
    left = _parse_time(node.get("last_deactivated_at"))
    if until is not None and left is not None and abs(left.timestamp() - float(until)) < 1.0:
        times.append(left)
    elif until is not None and interval is not None:
        times.append(dt.datetime.fromtimestamp(float(until) - HEARTBEAT_PATIENCE * float(interval), dt.timezone.utc))
    if status == "online" and until is not None and float(until) < now.timestamp():
        status = "offline"
    times = [t for t in times if t is not None]
    return status, max(times) if times else None


def _parse_time(text) -> dt.datetime | None:
    try:
        moment = dt.datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None
    return moment.replace(tzinfo=moment.tzinfo or dt.timezone.utc) if moment else None


def _ledger_text(ledger: dict | None) -> str:
    if ledger is None:
        return "-"
    text = (f"epsilon {ledger['epsilon']:.2f} of {ledger['target_epsilon']:g} (delta {ledger['delta']:.1e}), "
            f"{ledger['rounds_trained']} rounds trained")
    if ledger.get("trained_rounds"):
        text += f" ({', '.join(map(str, ledger['trained_rounds']))})"
    if ledger.get("rounds_declined"):
        text += f", {ledger['rounds_declined']} declined"
    return text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"Cannot read {path} ({exc}); restore it from a backup.") from None


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _days(days: float) -> str:
    return f"{days:.0f} days left" if days >= 0 else f"{-days:.0f} days ago"


def _ago(delta: dt.timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"

