"""Apps signed by a federation's administrator: the signature file an app carries, made on the administrator's side
(``facefl deploy sign-app``, ``server/deployment/provision.py``) and checked at each site (``client/app_approval.py``).

Flower 1.42 passes app signatures to the SuperNodes only for apps from Flower Hub, so the signature travels inside
the app: ``facefl-app-signature.json`` in the app's folder, an Ed25519 signature by the deployment's app-signing key
over the SHA-256 of every other file of the bundle (``path sha256`` lines, sorted; Flower's ``.info/CONTENT``
manifest is derived from those files and left out). A bundle with a file added, removed or changed by one byte no
longer matches. Imports no other facefl module.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SIGNATURE_FILE = "facefl-app-signature.json"  # inside a signed app (its root folder)
CONTENT_FILE = ".info/CONTENT"  # Flower's manifest inside a FAB
FORMAT = "facefl-app-signature"
_DOMAIN = b"facefl-app-signature-v1\0"


class AppSignatureError(ValueError):
    """An app cannot be signed as asked; the message says what to do."""


def fab_files(content: bytes) -> dict[str, bytes]:
    """The files of a FAB that a signature covers: every entry but the signature file and Flower's manifest."""
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise AppSignatureError("The bundle holds the same file twice; it is not a bundle Flower builds.")
        return {name: archive.read(name) for name in names if name not in (SIGNATURE_FILE, CONTENT_FILE)}


def signature_file(files: dict[str, bytes], private_key_path: str | Path, key_id: str) -> bytes:
    """The signature file for a bundle holding ``files`` (path -> bytes, as :func:`fab_files` returns them)."""
    try:
        key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise AppSignatureError(f"Cannot read the app-signing key {private_key_path} ({exc}); use the deployment's "
                                "app-signing/app-signing.key.") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AppSignatureError(f"{private_key_path} is not an Ed25519 OpenSSH private key; use the deployment's "
                                "app-signing/app-signing.key.")
    signature = base64.b64encode(key.sign(_DOMAIN + _manifest(files))).decode("ascii")
    signed_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {"format": FORMAT, "version": 1, "key_id": key_id, "signed_at": signed_at, "signature": signature}
    return (json.dumps(doc, indent=2) + "\n").encode()


def verify_app_signature(content: bytes, trusted: dict[str, str]) -> str | None:
    """The id of the trusted key that signed this FAB (``trusted``: key id -> ``ssh-ed25519 ...`` line); None when
    it carries no signature, or none by a trusted key over exactly its files."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            doc = json.loads(archive.read(SIGNATURE_FILE))
        files = fab_files(content)
        key_line = trusted.get(str(doc["key_id"]))
        signature = base64.b64decode(doc["signature"], validate=True)
        if key_line is None:
            return None
        key = serialization.load_ssh_public_key(key_line.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            return None
        key.verify(signature, _DOMAIN + _manifest(files))
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, InvalidSignature):
        return None
    return str(doc["key_id"])


def _manifest(files: dict[str, bytes]) -> bytes:
    return "".join(f"{path} {hashlib.sha256(data).hexdigest()}\n" for path, data in sorted(files.items())).encode()
