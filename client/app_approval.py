"""Which apps a site runs: what a Flower app bundle (FAB) is, the site operator's signed list of approved apps, and
the federation administrator's app signatures; :func:`judge` decides for one FAB.

A FAB is read here as data only (a zip archive and its ``pyproject.toml``): nothing in it is imported or installed.
The site's approvals live in its state folder, signed with the site operator's Ed25519 key::

    STATE/app-approvals.json   approved and revoked apps by SHA-256, with a signature over the whole file
    STATE/app-operator.pub     the operator's public key (OpenSSH), which the checks verify against
    STATE/app-operator.key     the operator's private key (0600), unless ``--operator-key`` keeps it elsewhere

An approvals file edited by hand (or by anything without the operator's key) fails its signature check, and the site
then refuses every app until the operator restores it. A site may also trust apps signed with the federation's
app-signing key (``facefl deploy sign-app``; the format is in ``common/app_signature.py``). Used by
``client/app_gate.py`` (the check before any app code runs) and by the ``facefl site approve|approvals|revoke|show``
commands. Imports only ``common`` plumbing (``app_signature``, ``atomic``, ``deployment``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.app_signature import verify_app_signature
from common.atomic import atomic_write_bytes
from common.deployment import DeploymentRunError

APPROVALS_FILE = "app-approvals.json"
OPERATOR_KEY = "app-operator.key"
OPERATOR_PUB = "app-operator.pub"
FORMAT = "facefl-app-approvals"
_APPROVALS_DOMAIN = b"facefl-app-approvals-v1\0"


class AppApprovalError(DeploymentRunError):
    """An app or an approvals file cannot be read or trusted; the message says what to do."""


@dataclass(frozen=True)
class FabInfo:
    """What an app bundle says it is, read without running any of it."""

    sha256: str
    name: str
    version: str
    publisher: str
    files: tuple[tuple[str, int], ...]  # (path, size in bytes), in the bundle's order

    @property
    def fab_id(self) -> str:
        return f"{self.publisher}/{self.name}"

    def describe(self) -> str:
        """Several lines for an operator: name, version, publisher, SHA-256 and the files."""
        lines = [f"app:       {self.name} {self.version} (publisher {self.publisher})",
                 f"sha256:    {self.sha256}",
                 f"files:     {len(self.files)}, {sum(size for _, size in self.files):,} bytes"]
        lines += [f"  {size:>10,}  {path}" for path, size in self.files]
        return "\n".join(lines)


def fab_info(content: bytes, source: str = "the app bundle") -> FabInfo:
    """Read a FAB's metadata and file list (as data; nothing is extracted or imported)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            infos = archive.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise AppApprovalError(f"{source} holds the same file twice; it is not a bundle Flower builds.")
            config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, OSError) as exc:
        raise AppApprovalError(f"{source} is not a Flower app bundle (a FAB: a zip with pyproject.toml) ({exc}); "
                               "build it with `flwr build` or pass the app's folder.") from None
    project = config.get("project", {})
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    return FabInfo(sha256=hashlib.sha256(content).hexdigest(), name=str(project.get("name", "?")),
                   version=str(project.get("version", "?")), publisher=str(app.get("publisher", "?")),
                   files=tuple((i.filename, i.file_size) for i in infos))


def read_app(path: str | Path) -> tuple[bytes, FabInfo]:
    """A FAB file, or an app folder built into the FAB exactly as ``flwr run FOLDER`` builds it (Flower's own
    ``build_fab_from_disk``, which is deterministic: fixed dates, sorted files)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise AppApprovalError(f"{path} does not exist; pass a .fab file or the app's folder (with pyproject.toml).")
    if path.is_dir():
        if not (path / "pyproject.toml").is_file():
            raise AppApprovalError(f"{path} has no pyproject.toml; pass the Flower app's folder or a .fab file.")
        from flwr.cli.build import build_fab_from_disk

        try:
            content = build_fab_from_disk(path)
        except ValueError as exc:
            raise AppApprovalError(f"Cannot build {path} into an app bundle: {' '.join(str(exc).split())}") from None
    else:
        content = path.read_bytes()
    return content, fab_info(content, str(path))


# --------------------------------------------------------------------------------------- the site's approvals


@dataclass(frozen=True)
class Approvals:
    """A site's approvals file, checked against the operator's public key."""

    site: str
    apps: dict[str, dict]  # sha256 -> what was approved (name, version, publisher, files, approved_at)
    revoked: dict[str, dict]  # sha256 -> the approval it withdrew, with revoked_at


def approvals_configured(state: str | Path) -> bool:
    """True once the site's operator approved (or revoked) an app: its approvals file or key exists."""
    state = Path(state)
    return (state / APPROVALS_FILE).exists() or (state / OPERATOR_PUB).exists()


def load_approvals(state: str | Path, site: str) -> Approvals:
    """The site's approvals, after checking their signature; ``AppApprovalError`` when they cannot be trusted."""
    state = Path(state)
    path, pub = state / APPROVALS_FILE, state / OPERATOR_PUB
    if not pub.is_file():
        raise AppApprovalError(f"{pub} is missing, so {path} cannot be checked; every app is refused until the "
                               "operator restores it from a backup (or removes both files and approves again).")
    if not path.is_file():
        raise AppApprovalError(f"{path} is missing (the operator key {pub} exists); every app is refused until the "
                               "operator restores it from a backup or approves the apps again.")
    public_key = _load_public_key(pub)
    try:
        doc = json.loads(path.read_text())
        signature = base64.b64decode(doc.pop("signature"), validate=True)
        public_key.verify(signature, _APPROVALS_DOMAIN + _canonical(doc))
        if doc.get("format") != FORMAT or doc.get("version") != 1:
            raise ValueError("not a facefl approvals file")
        if doc.get("site") != site:
            raise ValueError(f"it belongs to site {doc.get('site')!r}")
        apps, revoked = dict(doc["apps"]), dict(doc["revoked"])
    except InvalidSignature:
        raise AppApprovalError(f"{path} fails its signature check (it was changed without the operator's key); every "
                               "app is refused until the operator restores it from a backup.") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AppApprovalError(f"Cannot read {path} ({exc}); every app is refused until the operator restores it "
                               "from a backup.") from None
    return Approvals(site, apps, revoked)


def approve(state: str | Path, site: str, content: bytes, *, operator_key: str | Path | None = None,
            note: str = "") -> FabInfo:
    """Record ``content`` (a FAB) as approved at ``site``, signed with the operator's key (made on first use in
    ``STATE/app-operator.key`` when ``operator_key`` is not given)."""
    info = fab_info(content)
    state = Path(state)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(state):
        key = _operator_key(state, operator_key, create=True)
        current = load_approvals(state, site) if (state / APPROVALS_FILE).exists() else Approvals(site, {}, {})
        apps, revoked = dict(current.apps), dict(current.revoked)
        revoked.pop(info.sha256, None)
        apps[info.sha256] = {"name": info.name, "version": info.version, "publisher": info.publisher,
                             "files": [[path, size] for path, size in info.files], "approved_at": _now(), "note": note}
        _write(state, key, Approvals(site, apps, revoked))
    return info


def revoke(state: str | Path, site: str, sha256: str, *, operator_key: str | Path | None = None) -> dict:
    """Withdraw the approval of the app with this SHA-256 (a unique prefix of at least 8 digits is enough)."""
    state = Path(state)
    if not approvals_configured(state):
        raise AppApprovalError(f"No app is approved at site {site} (no {state / APPROVALS_FILE}); nothing to revoke.")
    with _locked(state):
        current = load_approvals(state, site)
        full = _match(sha256, current.apps, state)
        key = _operator_key(state, operator_key, create=False)
        apps, revoked = dict(current.apps), dict(current.revoked)
        entry = apps.pop(full)
        revoked[full] = {**entry, "revoked_at": _now()}
        _write(state, key, Approvals(site, apps, revoked))
    return {"sha256": full, **entry}


def read_trusted_keys(path: str | Path) -> dict[str, str]:
    """Key id -> public key line from a bundle's ``trusted-entities.yaml`` (the format ``deploy init`` writes:
    ``id: "ssh-ed25519 ..."`` lines)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise AppApprovalError(f"Cannot read the trusted app-signing keys {path} ({exc.strerror}); copy the site's "
                               "whole bundle.") from None
    keys = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            key_id, _, value = line.partition(":")
            keys[key_id.strip()] = json.loads(value.strip()) if value.strip().startswith('"') else value.strip()
    if not keys:
        raise AppApprovalError(f"{path} names no app-signing key; copy it from the deployment's app-signing/ folder.")
    return keys


# ------------------------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class Decision:
    """Whether a site runs an app, and why (one line)."""

    allowed: bool
    reason: str
    info: FabInfo | None = None


def judge(content: bytes, *, site: str, state: str | Path, trusted_keys: dict[str, str] | None = None,
          required: bool = False) -> Decision:
    """Decide whether ``site`` runs this FAB: approved by its SHA-256 at the site, or signed by a trusted key.

    With no approvals configured, no trusted keys and ``required`` off, every app runs (the site warned about this
    when it started)."""
    sha256 = hashlib.sha256(content).hexdigest()
    try:
        info = fab_info(content)
    except AppApprovalError:
        return Decision(False, f"app {sha256} is not a readable app bundle")
    label = f"app {info.name} {info.version} (sha256 {sha256})"
    configured = approvals_configured(state)
    if not (configured or trusted_keys or required):
        return Decision(True, f"{label} runs unchecked: no app approvals are configured at this site", info)
    if configured:
        try:
            approvals = load_approvals(state, site)
        except AppApprovalError as exc:
            return Decision(False, f"{label} refused: {exc}", info)
        if sha256 in approvals.apps:
            return Decision(True, f"{label} approved at this site on {approvals.apps[sha256]['approved_at']}", info)
        if sha256 in approvals.revoked:
            return Decision(False, f"{label} refused: its approval was revoked on "
                                   f"{approvals.revoked[sha256]['revoked_at']}", info)
    if trusted_keys:
        signer = verify_app_signature(content, trusted_keys)
        if signer:
            return Decision(True, f"{label} signed by the federation's app-signing key {signer}", info)
    return Decision(False, f"{label} refused: not approved at this site (the operator approves an app with "
                           "`facefl site approve`)" + (" and not signed by a trusted key" if trusted_keys else ""),
                    info)


# ---------------------------------------------------------------------------------------------------- I/O


def _operator_key(state: Path, path: str | Path | None, *, create: bool) -> ed25519.Ed25519PrivateKey:
    """The operator's private key, checked against ``STATE/app-operator.pub`` (made together on first use)."""
    key_path = Path(path).expanduser().absolute() if path else state / OPERATOR_KEY
    pub = state / OPERATOR_PUB
    if not key_path.exists():
        if not create or pub.exists():
            raise AppApprovalError(f"No operator key at {key_path}; pass --operator-key with the key that signed "
                                   f"{state / APPROVALS_FILE}.")
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write_bytes(pub, line + b" facefl-site-operator\n")
        return key
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise AppApprovalError(f"Cannot read the operator key {key_path} ({exc}).") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AppApprovalError(f"{key_path} is not an Ed25519 OpenSSH private key.")
    if pub.exists():
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if _load_public_key(pub).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != raw:
            raise AppApprovalError(f"{key_path} is not the key of {pub}; pass --operator-key with the key that "
                                   "signed this site's approvals.")
    else:
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write_bytes(pub, line + b" facefl-site-operator\n")
    return key


def _load_public_key(pub: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(pub.read_bytes().strip())
    except (OSError, ValueError) as exc:
        raise AppApprovalError(f"Cannot read the operator's public key {pub} ({exc}); restore it from a backup.") \
            from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise AppApprovalError(f"{pub} is not an Ed25519 public key; restore it from a backup.")
    return key


def _write(state: Path, key: ed25519.Ed25519PrivateKey, approvals: Approvals) -> None:
    doc = {"format": FORMAT, "version": 1, "site": approvals.site, "updated_at": _now(),
           "apps": approvals.apps, "revoked": approvals.revoked}
    doc["signature"] = base64.b64encode(key.sign(_APPROVALS_DOMAIN + _canonical(doc))).decode("ascii")
    atomic_write_bytes(state / APPROVALS_FILE, (json.dumps(doc, indent=2) + "\n").encode())


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """One approve or revoke at a time on a site's approvals (each reads, changes and re-signs the whole file)."""
    fd = os.open(state / ".app-approvals.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """A private key: created 0600 from the start, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _match(prefix: str, apps: dict[str, dict], state: Path) -> str:
    prefix = prefix.strip().lower()
    found = [h for h in apps if h.startswith(prefix)] if len(prefix) >= 8 else []
    if len(found) != 1:
        what = "matches several approved apps" if found else "matches no approved app"
        raise AppApprovalError(f"{prefix!r} {what} in {state / APPROVALS_FILE}; give 8 or more digits of a SHA-256 "
                               "from `facefl site approvals`.")
    return found[0]


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
