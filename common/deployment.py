"""What both sides of a hospital deployment share: the names in a deployment's files, site names, Flower's
executables and environment, addresses and ports, and Flower's ``key=value`` quoting.

The server side (``server/deployment/``: provisioning, the SuperLink) and the site side (``client/supernode.py``)
both import this module; it imports nothing from facefl. Errors are ``DeploymentRunError`` (a ``ValueError``)
with a one-line message that says what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

DEPLOYMENT_FILE = "deployment.json"  # the operator's record of sites, revocations and ports
SITE_CONFIG = "site.toml"  # a site bundle's settings
DATA_PATH_PLACEHOLDER = "/path/to/this/site's/faces"  # data-path in a fresh site.toml
SUPERNODE_RUNTIME_PORT = 9094  # flower-supernode --port default (local Runtime API for its ClientApps)
FLWR_HOME_DIR = "flwr-home"
SITE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


_APP_REFUSED_RE = re.compile(r"site ([a-z0-9][a-z0-9-]{0,62}) refused the app: ")


def app_refused_reason(site: str, why: str) -> str:
    """The reason of the error reply a site sends when it refuses a run's app (``client/app_gate.py``); the server
    reads the site's name back with :func:`refusing_site`."""
    return f"site {site} refused the app: {why}"


def refusing_site(reason: str) -> str | None:
    """The site that refused the app, when an error reply's reason is a refusal; else None."""
    found = _APP_REFUSED_RE.match(reason or "")
    return found.group(1) if found else None


class DeploymentRunError(ValueError):
    """A SuperLink or site cannot be started or driven as asked; the message says why and what to do."""


def check_site_name(name: str, error: type[ValueError] = DeploymentRunError) -> str:
    """Return ``name`` if it is a valid site name, else raise ``error``."""
    if not isinstance(name, str) or not SITE_NAME_RE.fullmatch(name):
        raise error(f"Invalid site name {name!r}: use 1-63 lowercase letters, digits and hyphens, "
                    "starting with a letter or digit (e.g. hospital-a).")
    return name


def flwr_home(state: str | Path) -> Path:
    """The private ``FLWR_HOME`` of a SuperLink (or site) state folder."""
    return Path(state) / FLWR_HOME_DIR


def flower_bin(name: str) -> str:
    """A Flower executable: next to this Python (the venv), else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` was not found next to {sys.executable} or on PATH; install facefl's "
                                "dependencies (flwr) into this environment.")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: a private FLWR_HOME, this venv's bin first on PATH (Flower starts
    flower-superexec, flwr-serverapp and flwr-clientapp by name), no dependency installation, no telemetry."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tls_ready(address: str, ca_cert: Path) -> bool:
    """True once ``address`` completes a TLS handshake with a certificate from ``ca_cert`` naming it."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=2) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            return True
    except (OSError, ssl.SSLError):
        return False


def check_bindable(host: str, port: int, message: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise DeploymentRunError(f"{message} ({exc.strerror})") from None


def local_address(host: str, port: int) -> str:
    """Where this machine reaches a SuperLink listening on ``host`` (loopback for a wildcard address; the server
    certificate always names the loopback addresses)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    return address(host.strip("[]"), port)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_host_port(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        raise DeploymentRunError(f"Invalid --superlink {address!r}: give HOST:PORT without a scheme "
                                 "(e.g. superlink.hospital.org:8000).")
    check_port(int(port))


def check_port(port: int) -> int:
    if not 1 <= int(port) <= 65535:
        raise DeploymentRunError(f"Invalid port {port}: give a number from 1 to 65535.")
    return int(port)


def node_config_value(value: str) -> str:
    """A string as Flower's ``key=value`` parser (``--node-config``, ``--run-config``) reads it: a quoted TOML
    string, in the quote character it does not contain."""
    if "\n" in value or ("'" in value and '"' in value):
        raise DeploymentRunError(f"Flower's key=value options cannot carry {value!r} (it holds a newline or both "
                                 "quote characters); rename or move the file or folder.")
    return f"'{value}'" if "'" not in value else json.dumps(value, ensure_ascii=False)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DeploymentRunError(f"Run-config values must be finite numbers, got {value}.")
        return repr(value)
    return node_config_value(str(value))
