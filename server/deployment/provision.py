"""Key material for a multi-site deployment on Flower's deployment engine (one SuperLink, one SuperNode per site).

``init_deployment`` creates a certificate authority, the SuperLink's TLS certificate, one SuperNode
authentication key per site and an app-signing key, and lays them out so that each folder can be handed to
whoever runs that part::

    DIR/deployment.json          host, port, sites with key fingerprints, revoked sites (the source of truth)
    DIR/ca/                      ca.crt, ca.key            -- stays with the operator, never copied anywhere
    DIR/superlink/               ca.crt, server.crt, server.key, flwr-connection.toml,
                                 supernodes/<site>.pub     -- the allow-list: one public key per active site
    DIR/app-signing/             app-signing.key, app-signing.pub
    DIR/sites/<site>/            ca.crt, supernode.key, supernode.pub, trusted-entities.yaml, site.toml
    DIR/revoked/<site>/          a revoked site's public material (its private key is deleted)
    DIR/audit.jsonl              the operator's hash-chained log (``common/audit.py``): who added, revoked or
                                 signed what, and when

The formats are the ones Flower 1.42 reads (checked against its source):

- SuperLink TLS: ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key``
  (PEM; EC P-256 key, PKCS#8). Fleet, Control and Runtime APIs share one HTTPS port, ``--port`` (default 8000);
  ``--host`` defaults to 127.0.0.1, so the SuperLink must be started with ``--host 0.0.0.0`` to reach the sites.
  Its own SuperExec then dials the Runtime API at 127.0.0.1 with the CA, so the server certificate always names
  ``localhost``, ``127.0.0.1`` and ``::1`` besides the public host.
- SuperNode authentication: ``flower-supernode --auth-supernode-private-key supernode.key`` loads an unencrypted
  OpenSSH private key on a NIST curve (``load_ssh_private_key``; Flower generates SECP384R1). The SuperLink,
  started with ``--enable-supernode-auth``, keeps its allow-list in its database (``--database``): a site is
  allowed with ``flwr supernode register supernodes/<site>.pub [connection] --name <site>`` (an OpenSSH public
  key line) and removed with ``flwr supernode unregister <node-id>``. There is no allow-list file to reload.
- App signing: ``flower-supernode --trusted-entities trusted-entities.yaml`` reads a YAML mapping of key ids to
  ``ssh-ed25519 ...`` public key lines. A FAB is accepted when one of its ``verifications`` records, keyed by a
  trusted key id, holds an Ed25519 signature over ``signed_at`` (8 bytes, big-endian) + SHA-256(FAB)
  (see :func:`sign_fab`). In Flower 1.42 only Flower Hub fills those records: a FAB sent with ``flwr run .``
  reaches the SuperNodes without them and a SuperNode started with ``--trusted-entities`` refuses it.

Private keys are created with mode 0600 and public files with 0644; every file is written through a temporary
file and ``os.replace``; ``init_deployment`` builds everything in a hidden sibling folder and renames it into
place, so a failure leaves no half-written deployment.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.audit import AuditLog

from common.deployment import (DATA_PATH_PLACEHOLDER, DEPLOYMENT_FILE, SITE_CONFIG, SUPERNODE_RUNTIME_PORT, address,
                               check_site_name)

FORMAT = "facefl-deployment"
FORMAT_VERSION = 1

SUPERLINK_PORT = 8000  # flower-superlink --port default (Fleet, Control and Runtime APIs, HTTPS)
CA_VALIDITY_DAYS = 3650
SERVER_CERT_VALIDITY_DAYS = 825
CLOCK_SKEW = dt.timedelta(minutes=5)
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")

_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

# File names inside the layout.
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CONNECTION_FILE = "flwr-connection.toml"
OPERATOR_AUDIT_FILE = "audit.jsonl"  # DIR/audit.jsonl: the operator's changes to the deployment
SIGNING_KEY, SIGNING_PUB = "app-signing.key", "app-signing.pub"
NODE_KEY, NODE_PUB = "supernode.key", "supernode.pub"
TRUSTED_ENTITIES = "trusted-entities.yaml"


class ProvisionError(ValueError):
    """A deployment cannot be created or changed as asked; the message says what to do instead."""


@dataclass(frozen=True)
class SiteBundle:
    """The files one site receives: copy ``path`` to the site, and nothing else."""

    name: str
    path: Path

    ca_cert = property(lambda self: self.path / CA_CERT, doc="The deployment's CA certificate.")
    private_key = property(lambda self: self.path / NODE_KEY, doc="The site's SuperNode authentication key.")
    public_key = property(lambda self: self.path / NODE_PUB, doc="Its public key (on the SuperLink's allow-list).")
    trusted_entities = property(lambda self: self.path / TRUSTED_ENTITIES, doc="Keys whose signed apps may run.")
    config = property(lambda self: self.path / SITE_CONFIG, doc="The site's settings (site.toml).")


@dataclass(frozen=True)
class Deployment:
    """A deployment folder as recorded in its ``deployment.json``; paths are absolute."""

    root: Path
    host: str
    ports: dict[str, int]
    sites: tuple[str, ...]
    revoked: dict[str, dict] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    signing_key_id: str = ""
    created_at: str = ""

    @property
    def superlink_address(self) -> str:
        """``host:port`` as ``flower-supernode --superlink`` takes it (IPv6 in brackets)."""
        return address(self.host, self.ports["superlink"])

    ca_cert = property(lambda self: self.root / "ca" / CA_CERT, doc="The CA certificate (public).")
    ca_key = property(lambda self: self.root / "ca" / CA_KEY, doc="The CA's private key: keep it offline.")
    superlink_dir = property(lambda self: self.root / "superlink", doc="What the SuperLink's host needs.")
    superlink_ca_cert = property(lambda self: self.superlink_dir / CA_CERT, doc="The CA certificate, SuperLink copy.")
    server_cert = property(lambda self: self.superlink_dir / SERVER_CERT, doc="The SuperLink's TLS certificate.")
    server_key = property(lambda self: self.superlink_dir / SERVER_KEY, doc="The SuperLink's TLS key.")

    @property
    def connection_file(self) -> Path:
        """A ``[superlink.facefl]`` block for ``$FLWR_HOME/config.toml`` (address and root certificates)."""
        return self.superlink_dir / CONNECTION_FILE

    @property
    def allow_list_dir(self) -> Path:
        """One ``<site>.pub`` per active site: what to pass to ``flwr supernode register``."""
        return self.superlink_dir / "supernodes"

    def allow_list(self) -> dict[str, Path]:
        """Active site name -> its public key file in the SuperLink's allow-list folder."""
        return {name: self.allow_list_dir / f"{name}.pub" for name in self.sites}

    signing_private_key = property(lambda self: self.root / "app-signing" / SIGNING_KEY, doc="Signs apps: private.")
    signing_public_key = property(lambda self: self.root / "app-signing" / SIGNING_PUB, doc="Verifies signed apps.")

    @property
    def trusted_entities(self) -> Path:
        """The operator's copy of the trusted-entities file (each site bundle holds the same content)."""
        return self.root / "app-signing" / TRUSTED_ENTITIES

    def site(self, name: str) -> SiteBundle:
        """The bundle of an active site."""
        if name not in self.sites:
            hint = " (it was revoked)" if name in self.revoked else ""
            raise ProvisionError(f"No active site {name!r} in {self.root}{hint}; the sites are: "
                                 f"{', '.join(self.sites) or 'none'}.")
        return SiteBundle(name, self.root / "sites" / name)


# ----------------------------------------------------------------------------------------------- public API


def init_deployment(out: str | Path, server_host: str, sites: Sequence[str],
                    extra_sans: Sequence[str] = ()) -> Deployment:
    """Create a new deployment folder ``out`` for a SuperLink reachable at ``server_host`` and the given sites.

    Parameters
    ----------
    out : path
        Folder to create. It must not exist (an existing empty folder is accepted).
    server_host : str
        DNS name or IP address the sites dial, without scheme or port. It goes into the server certificate's
        subject alternative names together with ``extra_sans`` and the loopback names.
    sites : sequence of str
        Site names, ``[a-z0-9][a-z0-9-]{0,62}``, at least one, no duplicates.
    extra_sans : sequence of str (default: ())
        Further DNS names or IP addresses of the SuperLink (another interface, a load balancer).
    """
    out = Path(out).expanduser().absolute()
    host, host_san = _parse_host(server_host, "--server-host")
    sans = _unique([host_san, *(_parse_host(s, "--san")[1] for s in extra_sans), *map(_san, LOOPBACK_SANS)])
    names = _check_new_sites(sites, existing=(), revoked=())
    if not names:
        raise ProvisionError("Give at least one site with --sites (e.g. --sites hospital-a,hospital-b).")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(f"{out} already exists; use `facefl deploy add-site NAME --deployment {out}` to "
                             "add a site to it, or choose a new --out.")
    out.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        now = _now()
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, host, now)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = _server_certificate(server_key, sans, ca_key, ca_cert, now)
        signing_key = ed25519.Ed25519PrivateKey.generate()
        signing_id = _signing_key_id(signing_key.public_key())

        for sub in ("ca", "superlink", "superlink/supernodes", "app-signing", "sites"):
            (staging / sub).mkdir(mode=0o700)
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        _write_private(staging / "ca" / CA_KEY, _pkcs8(ca_key))
        _write_public(staging / "ca" / CA_CERT, ca_pem)
        _write_public(staging / "superlink" / CA_CERT, ca_pem)
        _write_public(staging / "superlink" / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
        _write_private(staging / "superlink" / SERVER_KEY, _pkcs8(server_key))
        _write_public(staging / "superlink" / CONNECTION_FILE,
                      _connection_toml(address(host, SUPERLINK_PORT), out / "superlink" / CA_CERT))
        _write_private(staging / "app-signing" / SIGNING_KEY, _openssh_private(signing_key))
        _write_public(staging / "app-signing" / SIGNING_PUB, _openssh_public(signing_key, "facefl-app-signing"))
        trusted = _trusted_entities_yaml(signing_id, signing_key.public_key())
        _write_public(staging / "app-signing" / TRUSTED_ENTITIES, trusted)

        record = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created_at": _iso(now),
            "server_host": host,
            "server_sans": [_san_text(s) for s in sans],
            "ports": {"superlink": SUPERLINK_PORT, "supernode_runtime": SUPERNODE_RUNTIME_PORT},
            "superlink_address": address(host, SUPERLINK_PORT),
            "ca": _cert_record(ca_cert),
            "server_cert": _cert_record(server_cert),
            "app_signing": {"key_id": signing_id, "fingerprint": _ssh_fingerprint(signing_key.public_key())},
            "sites": {},
            "revoked": {},
        }
        for name in names:
            (staging / "sites" / name).mkdir(mode=0o700)
            record["sites"][name], public_line = _build_site(staging / "sites" / name, name, host, ca_pem,
                                                             trusted, now)
            _write_public(staging / "superlink" / "supernodes" / f"{name}.pub", public_line)
        _write_public(staging / DEPLOYMENT_FILE, _json_bytes(record))
        os.rename(staging, out)  # atomic; replaces only an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return load_deployment(out)


def add_site(deployment_dir: str | Path, name: str, *, by: str | None = None) -> Path:
    """Add site ``name`` to an existing deployment: a new key pair, its bundle and its allow-list entry.

    Returns the new bundle folder. Refuses an invalid name, an existing one and a revoked one. ``by`` (default: this
    machine's user@host) is recorded in the operator's audit log.
    """
    root = _deployment_root(deployment_dir)
    with _locked(root):
        record = _read_record(root)
        (name,) = _check_new_sites([name], existing=record["sites"], revoked=record["revoked"])
        ca_pem = (root / "ca" / CA_CERT).read_bytes()
        trusted = (root / "app-signing" / TRUSTED_ENTITIES).read_bytes()
        bundle = root / "sites" / name
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root / "sites"))
        pub = root / "superlink" / "supernodes" / f"{name}.pub"
        moved = False
        try:
            entry, public_line = _build_site(staging, name, record["server_host"], ca_pem, trusted, _now())
            revoked_prints = {r.get("fingerprint") for r in record["revoked"].values()}
            if entry["fingerprint"] in revoked_prints:  # practically impossible, but a revoked key never returns
                raise ProvisionError("The new key matches a revoked key; run add-site again.")
            _write_public(pub, public_line)
            os.rename(staging, bundle)
            moved = True
            record["sites"][name] = entry
            _write_public(root / DEPLOYMENT_FILE, _json_bytes(record))
        except BaseException:
            pub.unlink(missing_ok=True)
            shutil.rmtree(bundle if moved else staging, ignore_errors=True)
            raise
        operator_log(root, by).append("site-added", site=name, fingerprint=entry["fingerprint"])
    return bundle


def revoke_site(deployment_dir: str | Path, name: str, *, by: str | None = None, reason: str = "") -> dict:
    """Revoke site ``name``: drop it from the allow-list, record it as revoked (when, by whom, why) and delete its
    private key; returns the revocation record. ``by`` defaults to this machine's user@host.

    The SuperLink stops accepting the site once its node is unregistered there (a running ``facefl superlink``
    does it on SIGHUP: ``flwr supernode unregister <node-id>``, which also disconnects it); the name can never be
    added again. The operator's audit log (``DIR/audit.jsonl``) records the revocation.
    """
    root = _deployment_root(deployment_dir)
    with _locked(root):
        record = _read_record(root)
        if name in record["revoked"]:
            raise ProvisionError(f"Site {name!r} is already revoked (at {record['revoked'][name]['revoked_at']}).")
        if name not in record["sites"]:
            raise ProvisionError(f"No site {name!r} in {root}; the sites are: "
                                 f"{', '.join(record['sites']) or 'none'}.")
        (root / "superlink" / "supernodes" / f"{name}.pub").unlink(missing_ok=True)
        who = operator_name(by)
        entry = record["sites"].pop(name)
        record["revoked"][name] = {**entry, "revoked_at": _iso(_now()), "revoked_by": who, "reason": reason}
        _write_public(root / DEPLOYMENT_FILE, _json_bytes(record))
        bundle = root / "sites" / name
        (bundle / NODE_KEY).unlink(missing_ok=True)
        if bundle.exists():
            target = root / "revoked" / name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{name}.{secrets.token_hex(4)}")
            os.rename(bundle, target)
        operator_log(root, who).append("site-revoked", site=name, fingerprint=entry.get("fingerprint", ""),
                                       reason=reason, revoked_at=record["revoked"][name]["revoked_at"])
    return record["revoked"][name]


def rotate_server_certificate(deployment_dir: str | Path, *, by: str | None = None) -> dict:
    """Give the SuperLink a new TLS key and certificate from the deployment's CA, with the same names; returns the
    new certificate's record (fingerprint, expiry). Needs the CA key (``DIR/ca/ca.key``) on this machine.

    The sites trust the CA, not the certificate, so their bundles do not change. ``facefl superlink`` loads the
    certificate when it starts: restart it on the same state folder (registrations, node ids and past runs are kept
    in its database) and the sites reconnect by themselves. The retired certificate's record stays in
    ``deployment.json``; the operator's audit log records the rotation."""
    root = _deployment_root(deployment_dir)
    with _locked(root):
        record = _read_record(root)
        ca_key_path, ca_cert_path = root / "ca" / CA_KEY, root / "ca" / CA_CERT
        if not ca_key_path.is_file():
            raise ProvisionError(f"No CA key at {ca_key_path}: rotate the SuperLink's certificate on the machine that "
                                 "keeps the deployment's ca/ folder.")
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        sans = [_san(name) for name in record["server_sans"]]
        now = _now()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _server_certificate(key, sans, ca_key, ca_cert, now)
        # Each file is replaced atomically, the key last: a SuperLink started in between fails on a mismatched pair
        # (and says so) rather than serving a key nobody certified.
        _write_public(root / "superlink" / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
        _write_private(root / "superlink" / SERVER_KEY, _pkcs8(key))
        old = record["server_cert"]
        record.setdefault("retired_server_certs", []).append({**old, "retired_at": _iso(now)})
        record["server_cert"] = _cert_record(cert)
        _write_public(root / DEPLOYMENT_FILE, _json_bytes(record))
        operator_log(root, by).append("server-certificate-rotated", old=old, new=record["server_cert"])
    return record["server_cert"]


def rotate_site_key(deployment_dir: str | Path, name: str, *, by: str | None = None) -> dict:
    """Give active site ``name`` a new SuperNode authentication key: a new key pair in its bundle and allow-list
    entry; the old public key's fingerprint is retired (never accepted again). Returns the site's new record.

    A running ``facefl superlink`` applies it on SIGHUP: it unregisters the site's old node (which disconnects it)
    and registers the new key (a new node id; ``nodes.json`` keeps the previous ones). The site then restarts
    ``facefl site`` with its new ``supernode.key``; its state folder (privacy ledger, audit log) carries over."""
    root = _deployment_root(deployment_dir)
    with _locked(root):
        record = _read_record(root)
        if name not in record["sites"]:
            raise ProvisionError(f"No active site {name!r} in {root}; the sites are: "
                                 f"{', '.join(record['sites']) or 'none'}.")
        bundle = root / "sites" / name
        if not bundle.is_dir():
            raise ProvisionError(f"Site {name}'s bundle {bundle} is not on this machine: rotate its key where the "
                                 "deployment's sites/ folder is kept.")
        old = record["sites"][name]
        fingerprint, public_line = _new_node_key(bundle, name)
        _write_public(root / "superlink" / "supernodes" / f"{name}.pub", public_line)
        now = _iso(_now())
        retired = [*old.get("retired_keys", []), {"fingerprint": old["fingerprint"], "retired_at": now}]
        record["sites"][name] = {**old, "fingerprint": fingerprint, "public_key": public_line.decode().strip(),
                                 "key_rotated_at": now, "retired_keys": retired}
        _write_public(root / DEPLOYMENT_FILE, _json_bytes(record))
        operator_log(root, by).append("site-key-rotated", site=name, old_fingerprint=old["fingerprint"],
                                      new_fingerprint=fingerprint)
    return record["sites"][name]


def operator_name(by: str | None = None) -> str:
    """Who is acting: ``by`` when given (an operator's name or e-mail), else this machine's ``user@host``."""
    if by is not None:
        if not by.strip() or "\n" in by:
            raise ProvisionError(f"--by should name the operator on one line (a name or an e-mail), got {by!r}.")
        return by.strip()
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment (a container without /etc/passwd entry)
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def operator_log(root: Path, by: str | None = None) -> AuditLog:
    """The deployment operator's audit log, ``DIR/audit.jsonl``, with the acting operator as its actor."""
    return AuditLog(root / OPERATOR_AUDIT_FILE, actor=f"operator:{operator_name(by)}")


def load_deployment(deployment_dir: str | Path) -> Deployment:
    """Read ``deployment_dir/deployment.json`` and check that the SuperLink's files are there."""
    root = _deployment_root(deployment_dir)
    record = _read_record(root)
    deployment = Deployment(
        root=root,
        host=record["server_host"],
        ports={k: int(v) for k, v in record["ports"].items()},
        sites=tuple(record["sites"]),
        revoked=dict(record["revoked"]),
        fingerprints={name: s["fingerprint"] for name, s in record["sites"].items()},
        signing_key_id=record["app_signing"]["key_id"],
        created_at=record["created_at"],
    )
    # What the SuperLink needs. Site bundles, the CA key and the signing key may have been moved off this
    # machine once handed out, so they are not required here.
    required = [deployment.superlink_ca_cert, deployment.server_cert, deployment.server_key,
                *deployment.allow_list().values()]
    missing = [str(p.relative_to(root)) for p in required if not p.is_file()]
    if missing:
        raise ProvisionError(f"The deployment {root} is incomplete (missing {', '.join(missing)}); restore it "
                             "from a backup or create a new one with `facefl deploy init`.")
    return deployment


def sign_fab(fab: bytes, private_key_path: str | Path, key_id: str, signed_at: int | None = None
             ) -> dict[str, str]:
    """The ``verifications`` record that makes a SuperNode with ``--trusted-entities`` accept ``fab``.

    Same message and encoding as Flower's ``flwr app review``: Ed25519 over ``signed_at`` (8-byte big-endian
    Unix time) followed by SHA-256(fab), base64url without padding. Flower 1.42 passes such records to the
    SuperNodes only for apps fetched from Flower Hub; it is provided to check the keys and for a later transport.
    """
    key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ProvisionError(f"{private_key_path} is not an Ed25519 OpenSSH private key; use the deployment's "
                             "app-signing/app-signing.key.")
    signed_at = int(_now().timestamp()) if signed_at is None else int(signed_at)
    message = signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()
    signature = base64.urlsafe_b64encode(key.sign(message)).rstrip(b"=").decode("ascii")
    return {key_id: json.dumps({"signature": signature, "signed_at": signed_at}), "valid_license": "Valid"}


def sign_app(deployment_dir: str | Path, app_dir: str | Path) -> tuple[Path, str]:
    """Sign the Flower app in ``app_dir`` with the deployment's app-signing key: writes
    ``APP/facefl-app-signature.json`` (see ``common/app_signature.py``) over the files of the bundle ``flwr run APP``
    builds. Returns the signature file and the SHA-256 of the signed bundle as ``flwr run`` will send it. A site
    whose ``site.toml`` says ``trust-signed-apps = true`` runs it without approving its hash; any later change to
    the app's files voids the signature (sign again)."""
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files
    from flwr.cli.utils import collect_files

    from common.app_signature import SIGNATURE_FILE, fab_files, signature_file

    root = _deployment_root(deployment_dir)
    record = _read_record(root)
    key = root / "app-signing" / SIGNING_KEY
    if not key.is_file():
        raise ProvisionError(f"No app-signing key at {key}; sign apps on the machine that keeps the deployment's "
                             "app-signing/ folder.")
    app = Path(app_dir).expanduser().absolute()
    if not (app / "pyproject.toml").is_file():
        raise ProvisionError(f"{app} has no pyproject.toml; pass the Flower app's folder (what `flwr run` is given).")
    files = collect_files(app)
    files.pop(SIGNATURE_FILE, None)
    try:
        unsigned, _ = build_fab_from_files(files)
    except ValueError as exc:
        raise ProvisionError(f"Cannot build {app} into an app bundle: {' '.join(str(exc).split())}") from None
    target = app / SIGNATURE_FILE
    _write_public(target, signature_file(fab_files(unsigned), key, record["app_signing"]["key_id"]))
    sha256 = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    operator_log(root).append("app-signed", app=str(app), sha256=sha256, key_id=record["app_signing"]["key_id"])
    return target, sha256


# --------------------------------------------------------------------------------------------- site bundles


def _build_site(bundle: Path, name: str, host: str, ca_pem: bytes, trusted: bytes, now: dt.datetime
                ) -> tuple[dict, bytes]:
    """Write the bundle of site ``name`` into the existing folder ``bundle``.

    Returns the site's record for ``deployment.json`` and its OpenSSH public key line for the allow-list."""
    _write_public(bundle / CA_CERT, ca_pem)
    fingerprint, public_line = _new_node_key(bundle, name)
    _write_public(bundle / TRUSTED_ENTITIES, trusted)
    _write_public(bundle / SITE_CONFIG, _site_toml(name, host))
    entry = {"fingerprint": fingerprint, "public_key": public_line.decode().strip(), "added_at": _iso(now)}
    return entry, public_line


def _new_node_key(bundle: Path, name: str) -> tuple[str, bytes]:
    """A new SuperNode authentication key pair in ``bundle``; returns its fingerprint and OpenSSH public key line."""
    key = ec.generate_private_key(ec.SECP384R1())
    public_line = _openssh_public(key, f"facefl-site-{name}")
    _write_private(bundle / NODE_KEY, _openssh_private(key))
    _write_public(bundle / NODE_PUB, public_line)
    return _ssh_fingerprint(key.public_key()), public_line


def _site_toml(name: str, host: str) -> bytes:
    q = json.dumps  # a JSON string of ASCII text is a valid TOML basic string
    return (
        f"# facefl site configuration for site {q(name)}. Relative paths are relative to this folder.\n"
        "# Fill in data-path, then copy this whole folder to the site: it holds the site's private key.\n"
        f"site-name = {q(name)}\n"
        "# flower-supernode --superlink\n"
        f"superlink = {q(address(host, SUPERLINK_PORT))}\n"
        "# Identity folders of this site's faces (never leave the site).\n"
        f"data-path = {q(DATA_PATH_PLACEHOLDER)}\n"
        "# Privacy ledger and other local state.\n"
        f"state-dir = {q('state')}\n"
        "# flower-supernode --root-certificates\n"
        f"root-certificates = {q(CA_CERT)}\n"
        "# flower-supernode --auth-supernode-private-key\n"
        f"auth-supernode-private-key = {q(NODE_KEY)}\n"
        "# flower-supernode --trusted-entities\n"
        f"trusted-entities = {q(TRUSTED_ENTITIES)}\n"
        "# Which apps run here. An app approved by this site's operator (`facefl site approve APP`) always runs; with\n"
        "# trust-signed-apps, so does an app signed with the deployment's app-signing key (`facefl deploy sign-app`,\n"
        "# checked against the keys in trusted-entities). With nothing approved and nothing trusted the site runs any\n"
        "# app the server sends (it warns at start-up), unless require-approved-apps is on: then it refuses them all.\n"
        "trust-signed-apps = false\n"
        "require-approved-apps = false\n"
        "# Flower's own check: pass --trusted-entities. Flower 1.42 carries its app signatures only for Flower Hub\n"
        "# apps, so with this on the SuperNode refuses every app sent with `flwr run` to our own SuperLink.\n"
        "require-signed-apps = false\n"
        "# Take part only in rounds run with secure-aggregation=true (SecAgg+): the server then never holds this\n"
        "# site's update on its own. A plain round is refused (the run goes on without this site).\n"
        "require-secure-aggregation = false\n"
    ).encode()


def _connection_toml(address: str, ca_cert: Path) -> bytes:
    return (
        "# Add to $FLWR_HOME/config.toml (default ~/.flwr/config.toml) on the operator's machine, then\n"
        "# `flwr supernode register superlink/supernodes/<site>.pub facefl --name <site>`.\n"
        "[superlink.facefl]\n"
        f"address = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(ca_cert))}\n"
    ).encode()


def _trusted_entities_yaml(key_id: str, public_key: ed25519.Ed25519PublicKey) -> bytes:
    line = _openssh_public_key_line(public_key, "facefl-app-signing")
    return (f"# flower-supernode --trusted-entities: key id -> Ed25519 public key (OpenSSH)\n"
            f"{key_id}: {json.dumps(line)}\n").encode()


def _check_new_sites(names: Sequence[str], existing, revoked) -> list[str]:
    out: list[str] = []
    for raw in names:
        name = check_site_name(raw.strip() if isinstance(raw, str) else raw, ProvisionError)
        if name in revoked:
            raise ProvisionError(f"Site {name!r} was revoked and its name cannot be reused; choose a new name "
                                 f"(e.g. {name[:60]}-2).")
        if name in existing or name in out:
            raise ProvisionError(f"Site {name!r} already exists; choose another name, or revoke it first with "
                                 "`facefl deploy revoke-site` if its key was lost or leaked.")
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------- certificates


def _ca_certificate(key: ec.EllipticCurvePrivateKey, host: str, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "facefl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"facefl deployment CA {_short(host)}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, sans: Sequence[x509.GeneralName],
                        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                        now: dt.datetime) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "facefl"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, "facefl superlink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=SERVER_CERT_VALIDITY_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _cert_record(cert: x509.Certificate) -> dict:
    return {"fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
            "not_after": _iso(cert.not_valid_after_utc)}


def _parse_host(text: str, option: str) -> tuple[str, x509.GeneralName]:
    """``(host as written in addresses, SAN entry)`` for a DNS name or an IP address."""
    raw = text.strip() if isinstance(text, str) else ""
    bare = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        name = bare.lower().rstrip(".")
        if not name or len(name) > 253 or not _DNS_NAME_RE.fullmatch(name):
            raise ProvisionError(f"Invalid {option} {text!r}: give a DNS name or an IP address without scheme "
                                 "or port (e.g. superlink.hospital.org or 10.0.0.5).") from None
        return name, x509.DNSName(name)
    return str(ip), x509.IPAddress(ip)


def _san(text: str) -> x509.GeneralName:
    return _parse_host(text, "SAN")[1]


def _san_text(san: x509.GeneralName) -> str:
    return str(san.value)


# ------------------------------------------------------------------------------------------------------ keys


def _pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _openssh_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def _openssh_public_key_line(public_key, comment: str) -> str:
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{blob.decode('ascii')} {comment}"


def _openssh_public(private_key, comment: str) -> bytes:
    return (_openssh_public_key_line(private_key.public_key(), comment) + "\n").encode()


def _ssh_fingerprint(public_key) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint (what ``ssh-keygen -lf KEY.pub`` prints)."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(blob.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _signing_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"fpk_{uuid.UUID(bytes=hashlib.sha256(raw).digest()[:16])}"


# ------------------------------------------------------------------------------------------------------- I/O


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 from the start (no window where others can read it), then renamed."""
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644, exact=True)


def _write_atomic(path: Path, data: bytes, mode: int, *, exact: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if exact:  # public files: 0644 whatever the umask (an empty file, before any content)
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _deployment_root(deployment_dir: str | Path) -> Path:
    root = Path(deployment_dir).expanduser().absolute()
    if not (root / DEPLOYMENT_FILE).is_file():
        raise FileNotFoundError(f"No {DEPLOYMENT_FILE} in {root}; create a deployment first with "
                                "`facefl deploy init --server-host HOST --sites a,b --out DIR`.")
    return root


def _read_record(root: Path) -> dict:
    try:
        record = json.loads((root / DEPLOYMENT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProvisionError(f"Cannot read {root / DEPLOYMENT_FILE} ({exc}); restore it from a backup.") from exc
    if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
        raise ProvisionError(f"{root / DEPLOYMENT_FILE} is not a facefl deployment (format {FORMAT} "
                             f"version {FORMAT_VERSION}); point --deployment at the folder `deploy init` made.")
    return record


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One writer at a time on a deployment (add-site and revoke-site read, change and rewrite its record)."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _unique(items):
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _short(host: str) -> str:
    return host if len(host) <= 40 else host[:37] + "..."


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
