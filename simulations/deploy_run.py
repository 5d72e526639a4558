"""``facefl superlink`` and ``facefl site``: run a deployment made by ``facefl deploy init`` on Flower's deployment
engine, and start runs on it.

``facefl superlink --deployment DIR`` starts ``flower-superlink`` with the deployment's TLS certificate, SuperNode
authentication and a persistent database, waits until it answers, then makes its allow-list match the
deployment: every active site's key is registered (``flwr supernode register``), every revoked site's node is
unregistered (``flwr supernode unregister``, which also disconnects it). SIGHUP syncs again (after
``facefl deploy add-site`` or ``revoke-site``). Everything the SuperLink keeps lives in its state folder::

    STATE/superlink.db        Flower's database: registered nodes, runs (survives restarts)
    STATE/nodes.json          site name -> node id, as registered by this command (written atomically)
    STATE/superlink.log       everything flower-superlink and its ServerApps printed
    STATE/flwr-home/          FLWR_HOME of the SuperLink and of `flwr` commands for it: config.toml holds the
                              `[superlink.facefl]` connection (address and CA), installed apps go to apps/

``facefl site --deployment DIR --site NAME --data PATH`` starts ``flower-supernode`` for one site with the
bundle's CA and authentication key, and tells the ClientApp where the site's faces and state are
(``--node-config "data-path=... site-name=... state-dir=..."``; see ``client.site.Site.from_node_config``).
``DIR`` is either the whole deployment folder or the site's own bundle (``DIR/sites/NAME`` as handed out).
The site keeps reconnecting while the SuperLink is away (Flower's default: no limit on retries).

Both commands stay in the foreground. The Flower process runs in a session and process group of its own, with
its output copied to the log file and to the terminal; SIGINT and SIGTERM are forwarded to that group (a second
one, or 15 s without exit, stops it hard), and on exit every process started under it is stopped, including
those Flower starts in sessions of their own (found through ``/proc``: descendants, and the sessions and groups
they lead). If this process is killed outright, the kernel sends SIGTERM to the Flower process
(``PR_SET_PDEATHSIG``, Linux), which then stops its own children.

Starting a run (the server admin, on the SuperLink's machine)::

    FLWR_HOME=STATE/flwr-home FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \\
        flwr run APP_DIR facefl --stream --run-config "num-rounds=10 min-sites=3 data='/faces/for/evaluation'"

or :func:`start_run`, :func:`wait_run` and :func:`run_logs` from Python. Facts from Flower 1.42 this relies on:
the Fleet, Control and Runtime APIs share one HTTPS port; with ``--enable-supernode-auth`` a SuperNode is
accepted only when its public key was registered through the Control API (the Fleet API refuses
self-registration); ``flwr ... --format json`` exits 0 even on failure and says so in ``"success"``;
``flower-superlink`` starts its SuperExec in a new session (so it is not in the process group); and an app sent
with ``flwr run .`` carries no signature, so ``--trusted-entities`` is passed to a SuperNode only when its
``site.toml`` says ``require-signed-apps = true`` (it then refuses such apps).

Errors are raised as ``DeploymentRunError`` (a ``ValueError``) or ``FileNotFoundError`` with a one-line message.
``python -m simulations.deploy_run superlink|site ...`` runs the two commands without the rest of the CLI.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import json
import math
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer

from common.atomic import atomic_write_bytes
from server.provision import (
    CONNECTION_FILE,
    DATA_PATH_PLACEHOLDER,
    DEPLOYMENT_FILE,
    SITE_CONFIG,
    SUPERNODE_RUNTIME_PORT,
    Deployment,
    check_site_name,
    load_deployment,
)

CONNECTION = "facefl"  # the SuperLink connection's name in $FLWR_HOME/config.toml (flwr ... facefl)
DATABASE = "superlink.db"
NODES_FILE = "nodes.json"
SUPERLINK_LOG = "superlink.log"
SUPERNODE_LOG = "supernode.log"
FLWR_HOME_DIR = "flwr-home"
LOCK_FILE = ".lock"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".pgm"})  # = common.datasets.IMAGE_EXTENSIONS
MIN_IMAGES = 2  # a site learns only from identities with at least two images (client.site -> load_site_folder)
FINISHED = "finished"  # `flwr list` statuses: pending, starting, running, finished:{completed,failed,stopped}
STOP_GRACE_S = 15.0
TAIL_LINES = 25

_PR_SET_PDEATHSIG = 1


class DeploymentRunError(ValueError):
    """A SuperLink or site cannot be started or driven as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ the SuperLink


def superlink_state(deployment: Deployment, state: str | Path | None = None) -> Path:
    """The SuperLink's state folder: ``state`` or ``DIR/superlink/state``."""
    return Path(state).expanduser().absolute() if state else deployment.superlink_dir / "state"


def flwr_home(state: str | Path) -> Path:
    """The private ``FLWR_HOME`` of a SuperLink (or site) state folder."""
    return Path(state) / FLWR_HOME_DIR


def run_superlink(deployment_dir: str | Path, *, state: str | Path | None = None, port: int | None = None,
                  host: str = "0.0.0.0", startup_timeout: float = 90.0, echo: bool = True) -> int:
    """Start the deployment's SuperLink, sync its allow-list, and stay in the foreground until a signal.

    Parameters
    ----------
    deployment_dir : path
        Folder made by ``facefl deploy init`` (its ``superlink/`` part and ``deployment.json`` are enough).
    state : path, optional
        State folder (database, node ids, log, FLWR_HOME). Default ``DIR/superlink/state``.
    port : int, optional
        HTTPS port of the Fleet, Control and Runtime APIs. Default: the deployment's (8000); the sites' bundles
        name that port, so another one must be given to each site with ``--superlink``.
    host : str (default "0.0.0.0")
        Address to listen on; ``127.0.0.1`` keeps the SuperLink local to this machine.
    startup_timeout : float (default 90)
        Seconds to wait for the SuperLink to accept TLS connections before giving up.

    Returns the exit status: 0 after a stop by signal, else flower-superlink's own status.
    """
    dep = load_deployment(deployment_dir)
    state_dir = superlink_state(dep, state)
    port = dep.ports["superlink"] if port is None else _check_port(port)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _exclusive(state_dir, "facefl superlink"):
        _check_bindable(host, port, f"The SuperLink's port {port} on {host} is in use (another SuperLink?); stop "
                        "it or pass another --port.")
        local = _local_address(host, port)
        write_flwr_config(dep, state_dir, local)
        log_path = state_dir / SUPERLINK_LOG
        argv = [_flower_bin("flower-superlink"),
                "--ssl-ca-certfile", str(dep.superlink_ca_cert),
                "--ssl-certfile", str(dep.server_cert),
                "--ssl-keyfile", str(dep.server_key),
                "--enable-supernode-auth",
                "--database", str(state_dir / DATABASE),
                "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
                "--host", host, "--port", str(port)]
        _say(f"starting the SuperLink on {_address(host, port)} (state {state_dir}, log {log_path})")
        child = _Child("flower-superlink", argv, env=_flower_env(flwr_home(state_dir)), cwd=state_dir,
                       log_path=log_path, echo=echo)
        with child:
            _wait_until(lambda: _tls_ready(local, dep.superlink_ca_cert), child, startup_timeout,
                        f"The SuperLink did not accept TLS connections on {local} within {startup_timeout:g} s")
            nodes = sync_allow_list(dep, state_dir)
            _print_superlink_ready(dep, state_dir, host, local, nodes)

            def resync() -> None:
                try:
                    sync_allow_list(load_deployment(dep.root), state_dir)
                except (ValueError, OSError) as exc:  # keep serving; the operator sees why and can retry
                    _say(f"allow-list sync failed: {exc}")

            return _foreground(child, on_hup=resync)


def write_flwr_config(deployment: Deployment, state: str | Path, address: str) -> Path:
    """Write ``STATE/flwr-home/config.toml``: the deployment's ``[superlink.facefl]`` block (from
    ``superlink/flwr-connection.toml``) with ``address`` and the CA's absolute path, set as the default."""
    block: dict[str, Any] = {}
    if deployment.connection_file.is_file():
        try:
            block = tomllib.loads(deployment.connection_file.read_text()).get("superlink", {}).get(CONNECTION, {})
        except tomllib.TOMLDecodeError as exc:
            raise DeploymentRunError(f"Cannot read {deployment.connection_file} ({exc}); restore it from the "
                                     "deployment or a backup.") from exc
    block = {**block, "address": address, "root-certificates": str(deployment.superlink_ca_cert)}
    block.pop("insecure", None)  # TLS only
    lines = [f"# Written by facefl superlink from {deployment.root / 'superlink' / CONNECTION_FILE}.",
             "[superlink]", f"default = {_toml_value(CONNECTION)}", "", f"[superlink.{CONNECTION}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in block.items()]
    path = flwr_home(state) / "config.toml"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def sync_allow_list(deployment: Deployment, state: str | Path) -> dict[str, dict]:
    """Make the running SuperLink's allow-list match the deployment; returns ``STATE/nodes.json``'s nodes.

    Every active site without a live registration is registered (its node id recorded in ``nodes.json`` right
    away, atomically); every recorded site that is no longer active (revoked, or gone from ``deployment.json``)
    is unregistered, which also disconnects it."""
    state = Path(state)
    record = _read_nodes(state)
    nodes: dict[str, dict] = record["nodes"]
    listed = {int(n["node-id"]): n["status"] for n in flwr_json(state, "supernode", "list", CONNECTION)["nodes"]}

    for name, public_key in deployment.allow_list().items():
        entry = nodes.get(name)
        if entry and listed.get(int(entry["node_id"]), "unregistered") != "unregistered":
            continue
        try:
            out = flwr_json(state, "supernode", "register", str(public_key), CONNECTION, "--name", name)
        except DeploymentRunError as exc:
            if "already in use" not in str(exc):
                raise
            raise DeploymentRunError(
                f"Site {name}'s key is registered in {state / DATABASE} but {state / NODES_FILE} does not record "
                f"its node id; restore {NODES_FILE} from a backup, or start from a new --state folder.") from exc
        nodes[name] = {"node_id": int(out["node-id"]), "fingerprint": deployment.fingerprints.get(name, ""),
                       "registered_at": _now(), "status": "registered"}
        _write_nodes(state, record)
        _say(f"registered site {name} as node {nodes[name]['node_id']}")

    for name, entry in nodes.items():
        if name in deployment.sites or entry.get("status") == "unregistered":
            continue
        node_id = int(entry["node_id"])
        if listed.get(node_id, "unregistered") != "unregistered":
            try:
                flwr_json(state, "supernode", "unregister", str(node_id), CONNECTION)
            except DeploymentRunError as exc:
                if "not found" not in str(exc).lower():
                    raise
        entry.update(status="unregistered", unregistered_at=_now(),
                     reason="revoked" if name in deployment.revoked else "not in the deployment")
        _write_nodes(state, record)
        _say(f"unregistered site {name} (node {node_id}, {entry['reason']})")
    return nodes


def list_nodes(state: str | Path) -> list[dict]:
    """``flwr supernode list``: one dict per node (``node-id``, ``status``: registered, online, offline,
    unregistered, and times)."""
    return flwr_json(state, "supernode", "list", CONNECTION)["nodes"]


def _print_superlink_ready(dep: Deployment, state: Path, host: str, local: str, nodes: dict[str, dict]) -> None:
    allowed = ", ".join(f"{n} (node {nodes[n]['node_id']})" for n in dep.sites) or "none"
    revoked = sorted(n for n, e in nodes.items() if e.get("status") == "unregistered")
    _say(f"SuperLink running at {_address(host, _split_address(local)[1])}; allowed sites: {allowed}" +
         (f"; unregistered: {', '.join(revoked)}" if revoked else ""))
    port = _split_address(local)[1]
    if port != dep.ports["superlink"]:
        _say(f"note: the sites' bundles name port {dep.ports['superlink']}; start each site with "
             f"--superlink {_address(dep.host, port)}")
    app = _default_app_dir()
    example = (f"num-rounds=10 min-sites={max(1, len(dep.sites))} data='/path/to/evaluation/faces' "
               f"run-dir='runs/deployment'")
    _say("start a run (server admin, on this machine):\n"
         f"  FLWR_HOME={shlex.quote(str(flwr_home(state)))} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \\\n"
         f"    {shlex.quote(_flower_bin('flwr'))} run {shlex.quote(str(app))} {CONNECTION} --stream "
         f"--run-config \"{example}\"\n"
         f"SIGHUP re-syncs the allow-list with {dep.root / DEPLOYMENT_FILE}; Ctrl-C stops the SuperLink.")


# ----------------------------------------------------------------------------------------------------- a site


@dataclass(frozen=True)
class SiteSettings:
    """What ``flower-supernode`` is started with for one site (paths absolute)."""

    name: str
    bundle: Path
    superlink: str
    ca_cert: Path
    private_key: Path
    data: Path
    state: Path
    runtime_port: int
    trusted_entities: Path | None = None
    require_secure_aggregation: bool = False


def resolve_site(deployment_dir: str | Path, site: str, *, data: str | Path | None = None,
                 state: str | Path | None = None, superlink: str | None = None,
                 runtime_port: int | None = None, require_secure_aggregation: bool | None = None) -> SiteSettings:
    """Find the site's bundle and settings (command line over ``site.toml``), and check its data folder."""
    name = check_site_name(site)
    bundle, ports = _find_bundle(Path(deployment_dir).expanduser().absolute(), name)
    config = _read_site_toml(bundle)
    if config.get("site-name", name) != name:
        raise DeploymentRunError(f"{bundle / SITE_CONFIG} belongs to site {config['site-name']!r}, not {name!r}.")

    def bundle_path(key: str, default: str) -> Path:
        return (bundle / str(config.get(key) or default)).expanduser().absolute()

    ca_cert, private_key = bundle_path("root-certificates", "ca.crt"), bundle_path("auth-supernode-private-key",
                                                                                   "supernode.key")
    if not ca_cert.is_file():
        raise FileNotFoundError(f"No CA certificate at {ca_cert}; copy the site's whole bundle from the operator.")
    if not private_key.is_file():
        raise FileNotFoundError(f"No authentication key at {private_key}: the bundle is incomplete, or site {name} "
                                "was revoked (its key is deleted then); ask the operator for a new site.")
    if data:
        data_path = check_site_data(data)
    elif config.get("data-path") and config["data-path"] != DATA_PATH_PLACEHOLDER:
        data_path = check_site_data(bundle_path("data-path", ""))
    else:
        raise DeploymentRunError(f"No data folder for site {name}: pass --data PATH (a folder of identity folders) "
                                 f"or set data-path in {bundle / SITE_CONFIG}.")
    if state:
        state_dir = Path(state).expanduser().absolute()
    elif config.get("state-dir"):
        state_dir = bundle_path("state-dir", "state")
    else:
        state_dir = Path.home() / ".local" / "share" / "facefl" / name
    address = superlink or str(config.get("superlink") or "")
    if not address:
        raise DeploymentRunError(f"No SuperLink address for site {name}: pass --superlink HOST:PORT.")
    _check_host_port(address)
    trusted = bundle_path("trusted-entities", "trusted-entities.yaml") if config.get("require-signed-apps") else None
    if trusted is not None and not trusted.is_file():
        raise FileNotFoundError(f"require-signed-apps is set in {bundle / SITE_CONFIG} but {trusted} is missing.")
    port = runtime_port if runtime_port is not None else ports.get("supernode_runtime", SUPERNODE_RUNTIME_PORT)
    secure = bool(config.get("require-secure-aggregation", False)) if require_secure_aggregation is None \
        else require_secure_aggregation
    return SiteSettings(name, bundle, address, ca_cert, private_key, data_path, state_dir, _check_port(port),
                        trusted, secure)


def supernode_argv(settings: SiteSettings, *, max_retries: int | None = None,
                   max_wait_time: float | None = None) -> list[str]:
    """The ``flower-supernode`` command line for a site."""
    node_config = " ".join(f"{key}={_node_config_value(value)}" for key, value in (
        ("data-path", str(settings.data)), ("site-name", settings.name), ("state-dir", str(settings.state)),
        ("require-secure-aggregation", "true" if settings.require_secure_aggregation else "false")))
    argv = [_flower_bin("flower-supernode"),
            "--superlink", settings.superlink,
            "--root-certificates", str(settings.ca_cert),
            "--auth-supernode-private-key", str(settings.private_key),
            "--node-config", node_config,
            "--isolation", "subprocess",
            "--port", str(settings.runtime_port)]
    if settings.trusted_entities is not None:
        argv += ["--trusted-entities", str(settings.trusted_entities)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def run_site(deployment_dir: str | Path, site: str, *, data: str | Path | None = None,
             state: str | Path | None = None, superlink: str | None = None, runtime_port: int | None = None,
             max_retries: int | None = None, max_wait_time: float | None = None, echo: bool = True,
             require_secure_aggregation: bool | None = None) -> int:
    """Start one site's SuperNode and stay in the foreground until a signal (or until it exits).

    Returns 0 after a stop by signal, else flower-supernode's exit status (non-zero when the SuperLink refuses the
    site or cannot be reached within ``max_retries`` / ``max_wait_time``; by default it retries forever)."""
    settings = resolve_site(deployment_dir, site, data=data, state=state, superlink=superlink,
                            runtime_port=runtime_port, require_secure_aggregation=require_secure_aggregation)
    settings.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _exclusive(settings.state, f"facefl site {settings.name}"):
        _check_bindable("127.0.0.1", settings.runtime_port,
                        f"Port {settings.runtime_port} (the SuperNode's local Runtime API) is in use, by another site "
                        "on this machine?; pass another --runtime-port.")
        if settings.trusted_entities is not None:
            _say("require-signed-apps is on: apps sent with `flwr run .` carry no signature in Flower 1.42 and "
                 "will be refused by this site.")
        log_path = settings.state / SUPERNODE_LOG
        _say(f"starting site {settings.name}: SuperLink {settings.superlink}, data {settings.data}, "
             f"state {settings.state}, log {log_path}")
        child = _Child(f"flower-supernode ({settings.name})", supernode_argv(settings, max_retries=max_retries,
                                                                             max_wait_time=max_wait_time),
                       env=_flower_env(flwr_home(settings.state)), cwd=settings.state, log_path=log_path, echo=echo,
                       on_line=_site_watcher(settings))
        with child:
            code = _foreground(child)
        hint = _site_hint(child.tail()) if code else ""
        if hint:
            _say(hint)
        return code


def check_site_data(path: str | Path) -> Path:
    """``path`` if it is a folder with at least one identity folder of two or more images; else a one-line error."""
    root = Path(path).expanduser().absolute()
    layout = "a folder of identity folders, root/<person>/<image> (jpg, jpeg, png, pgm)"
    if not root.exists():
        raise DeploymentRunError(f"Site data folder {root} does not exist; pass --data with {layout}.")
    if not root.is_dir():
        raise DeploymentRunError(f"Site data {root} is not a folder; pass --data with {layout}.")
    folders = 0
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                folders += 1
                with os.scandir(entry.path) as files:
                    images = sum(1 for f in files if not f.name.startswith(".") and f.is_file()
                                 and os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES)
                if images >= MIN_IMAGES:
                    return root
    except OSError as exc:
        raise DeploymentRunError(f"Cannot read the site data folder {exc.filename or root}: {exc.strerror}.") from None
    if not folders:
        raise DeploymentRunError(f"Site data folder {root} has no identity folders; expected {layout}.")
    raise DeploymentRunError(f"No identity folder in {root} has {MIN_IMAGES} or more images; a site learns only from "
                             f"people with several photos ({layout}).")


def _find_bundle(root: Path, name: str) -> tuple[Path, dict[str, int]]:
    """(bundle folder, the deployment's ports if known) from a deployment folder or a site's own bundle."""
    if (root / DEPLOYMENT_FILE).is_file():
        try:
            record = json.loads((root / DEPLOYMENT_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise DeploymentRunError(f"Cannot read {root / DEPLOYMENT_FILE} ({exc}); restore it from a backup.") \
                from None
        if name in record.get("revoked", {}):
            raise DeploymentRunError(f"Site {name!r} was revoked in {root}; it can no longer join.")
        if name not in record.get("sites", {}):
            raise DeploymentRunError(f"No site {name!r} in {root}; the sites are: "
                                     f"{', '.join(record.get('sites', {})) or 'none'}.")
        return root / "sites" / name, {k: int(v) for k, v in record.get("ports", {}).items()}
    for candidate in (root, root / "sites" / name, root / name):
        if (candidate / SITE_CONFIG).is_file():
            return candidate, {}
    raise FileNotFoundError(f"{root} is neither a deployment folder nor site {name}'s bundle (no {DEPLOYMENT_FILE} "
                            f"or {SITE_CONFIG}); pass the folder the operator gave this site.")


def _read_site_toml(bundle: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((bundle / SITE_CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"No {SITE_CONFIG} in {bundle}; copy the site's whole bundle.") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentRunError(f"Cannot read {bundle / SITE_CONFIG}: {exc}.") from exc


def _site_watcher(settings: SiteSettings) -> Callable[[str], None]:
    seen = {"connected": False}

    def on_line(line: str) -> None:
        if not seen["connected"] and ("SuperNode ID:" in line or "Connection successful" in line):
            seen["connected"] = True
            _say(f"site {settings.name} connected to the SuperLink at {settings.superlink}")
    return on_line


def _site_hint(tail: str) -> str:
    if "Failed to activate SuperNode" in tail or "code: 2004" in tail:
        return ("The SuperLink does not accept this site's key: it is not registered there (the operator's "
                "`facefl superlink` registers every active site) or the site was revoked.")
    if "CERTIFICATE_VERIFY_FAILED" in tail or "certificate verify failed" in tail.lower():
        return ("TLS failed: the SuperLink's certificate is not signed by this bundle's ca.crt, or does not name "
                "the address in --superlink.")
    if "Giving up reconnection" in tail:
        return "The SuperLink could not be reached; check --superlink and that it is running."
    return ""


# ------------------------------------------------------------------------------------------------------- runs


def start_run(deployment_dir: str | Path, state_dir: str | Path | None, app_dir: str | Path,
              run_config: Mapping[str, Any]) -> int:
    """Start a run of the app in ``app_dir`` on the deployment's SuperLink (``flwr run APP facefl``); returns its id.

    ``run_config`` holds run-config overrides (``[tool.flwr.app.config]`` keys); they are checked against the app's
    keys and ``common.config.RunConfig`` before anything is sent. ``state_dir`` is the SuperLink's state folder
    (default ``DIR/superlink/state``) whose ``flwr-home`` ``facefl superlink`` wrote."""
    from common.config import RunConfig

    state = _running_state(deployment_dir, state_dir)
    run_config = {str(key).replace("_", "-"): value for key, value in run_config.items()}
    app = Path(app_dir).expanduser().absolute()
    try:
        keys = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise DeploymentRunError(f"{app} is not a Flower app (no [tool.flwr.app.config] in pyproject.toml).") from exc
    unknown = sorted(set(run_config) - set(keys))
    if unknown:
        raise DeploymentRunError(f"Unknown run-config key(s) {', '.join(unknown)}: the app in {app} only takes the "
                                 "keys of its [tool.flwr.app.config].")
    cfg = RunConfig.from_mapping(run_config)  # types and values, with the same messages as everywhere else
    overrides = " ".join(f"{key}={_toml_value(getattr(cfg, key.replace('-', '_')))}" for key in run_config)
    out = flwr_json(state, "run", str(app), CONNECTION, *(["--run-config", overrides] if overrides else []),
                    timeout=300)
    return int(out["run-id"])


def run_status(deployment_dir: str | Path, state_dir: str | Path | None, run_id: int) -> dict:
    """``flwr list --run-id``: the run's record (``status`` is pending, starting, running or
    ``finished:completed|failed|stopped``)."""
    state = _running_state(deployment_dir, state_dir)
    runs = flwr_json(state, "list", CONNECTION, "--run-id", str(run_id))["runs"]
    if not runs:
        raise DeploymentRunError(f"The SuperLink knows no run {run_id}.")
    return runs[0]


def wait_run(deployment_dir: str | Path, state_dir: str | Path | None, run_id: int, *, timeout: float = 3600.0,
             poll: float = 2.0) -> str:
    """Wait until run ``run_id`` finishes; returns its final status (``finished:completed`` when it succeeded).
    Raises ``TimeoutError`` after ``timeout`` seconds, with the run's last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(deployment_dir, state_dir, run_id)["status"]
        if status.startswith(FINISHED):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"Run {run_id} did not finish within {timeout:g} s (status {status}).")
        time.sleep(poll)


def run_logs(deployment_dir: str | Path, state_dir: str | Path | None, run_id: int) -> str:
    """The run's log as the SuperLink holds it (``flwr log RUN_ID --show``)."""
    state = _running_state(deployment_dir, state_dir)
    done = _flwr(state, "log", str(run_id), CONNECTION, "--show", timeout=120)
    return done.stdout


def _running_state(deployment_dir: str | Path, state_dir: str | Path | None) -> Path:
    state = Path(state_dir).expanduser().absolute() if state_dir else load_deployment(deployment_dir).superlink_dir / \
        "state"
    if not (flwr_home(state) / "config.toml").is_file():
        raise DeploymentRunError(f"No SuperLink connection in {flwr_home(state)}; start the SuperLink first with "
                                 f"`facefl superlink --deployment {deployment_dir}`" +
                                 (f" --state {state_dir}." if state_dir else "."))
    return state


# ------------------------------------------------------------------------------------------------ flwr commands


def flwr_json(state: str | Path, *args: str, timeout: float = 120.0) -> dict:
    """Run ``flwr ARGS --format json`` with the state's FLWR_HOME; the JSON answer, or ``DeploymentRunError``
    (``flwr`` reports failures in the JSON, with exit status 0)."""
    done = _flwr(state, *args, "--format", "json", timeout=timeout)
    text = done.stdout
    start = text.find("{")
    try:
        out, _ = json.JSONDecoder().raw_decode(text[start:]) if start >= 0 else (None, 0)
    except json.JSONDecodeError:
        out = None
    if not isinstance(out, dict) or not out.get("success") or done.returncode:
        detail = out.get("error-message") if isinstance(out, dict) else (done.stderr or text).strip()
        detail = " ".join(str(detail or f"exit status {done.returncode}").split())
        raise DeploymentRunError(f"`flwr {' '.join(args)}` failed: {detail}")
    return out


def _flwr(state: str | Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = _flower_env(flwr_home(state))
    try:
        return subprocess.run([_flower_bin("flwr"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise DeploymentRunError(f"`flwr {' '.join(args)}` did not answer within {timeout:g} s.") from exc


def _read_nodes(state: Path) -> dict:
    path = state / NODES_FILE
    if not path.exists():
        return {"nodes": {}}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("nodes"), dict):
            raise ValueError("no nodes mapping")
    except (OSError, ValueError) as exc:
        raise DeploymentRunError(f"Cannot read {path} ({exc}); restore it from a backup.") from exc
    return record


def _write_nodes(state: Path, record: dict) -> None:
    record["updated_at"] = _now()
    atomic_write_bytes(state / NODES_FILE, (json.dumps(record, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------ process supervision


class _Child:
    """One Flower process in a session and process group of its own, its output copied to a log file (and the
    terminal), stopped together with every process started under it."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path,
                 echo: bool, on_line: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self.echo, self._on_line = echo, on_line
        self._known: dict[int, int] = {}  # pid -> start time of every process seen under the child
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 (closed in stop)
        self._log.write(f"\n===== {_now()} {shlex.join(argv)}\n".encode())
        self.proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._pump = threading.Thread(target=self._copy_output, name=f"{name} output", daemon=True)
        self._pump.start()

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with contextlib.suppress(OSError, ValueError):
                self._log.write(raw)
            text = raw.decode("utf-8", errors="replace")
            self._lines.append(text.rstrip("\n"))
            if self.echo:
                with contextlib.suppress(OSError, ValueError):
                    sys.stdout.write(text)
                    sys.stdout.flush()
            if self._on_line is not None:
                with contextlib.suppress(Exception):
                    self._on_line(text)

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child's process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def tail(self, lines: int = TAIL_LINES) -> str:
        time.sleep(0.2)  # let the output thread copy the last lines
        return "\n".join(list(self._lines)[-lines:])

    def track(self) -> list[int]:
        """The live processes started under the child, remembered across calls.

        A process is the child's when it descends from it, or shares its session or process group or that of
        one seen before: Flower starts its SuperExec in a new session (so a signal to the group misses it), and
        such a process stays findable through its session after its parent exits and it is re-parented."""
        table = _process_table()
        known = {pid for pid, start in self._known.items() if table.get(pid, (0, 0, 0, -1, ""))[3] == start}
        roots = {self.proc.pid} | known
        ours = set(known)
        changed = True
        while changed:
            changed = False
            for pid, (ppid, pgrp, sid, _start, _state) in table.items():
                if pid not in ours and pid != os.getpid() and (ppid in ours | roots or pgrp in roots or sid in roots):
                    ours.add(pid)
                    roots.add(pid)
                    changed = True
        self._known = {pid: table[pid][3] for pid in ours}
        return [pid for pid in ours if table[pid][4] != "Z"]

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the group, SIGKILL after ``grace`` seconds; then every process left under the child."""
        self.track()
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        for signum, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            left = self.track()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = self.track()
            if not left:
                break
        self._pump.join(timeout=5)
        with contextlib.suppress(OSError):
            self._log.close()


def _foreground(child: _Child, on_hup: Callable[[], None] | None = None, grace: float = STOP_GRACE_S) -> int:
    """Wait for ``child`` to exit or for SIGINT/SIGTERM (forwarded to its group); a second signal or ``grace``
    seconds without exit hard-stop it. SIGHUP calls ``on_hup``. Returns 0 after a stop by signal."""
    received: list[int] = []
    hup = threading.Event()

    def handler(signum, _frame) -> None:
        if signum == signal.SIGHUP:
            hup.set()
            return
        if not received:
            child.signal(signum)
        received.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        deadline, tracked = math.inf, 0.0
        while child.poll() is None:
            if time.monotonic() - tracked > 1.0:  # remember what runs under the child while its tree is intact
                child.track()
                tracked = time.monotonic()
            if received:
                deadline = min(deadline, time.monotonic() + grace)
                if len(received) > 1 or time.monotonic() > deadline:
                    break
            if hup.is_set():
                hup.clear()
                if on_hup is not None:
                    on_hup()
            time.sleep(0.2)
    finally:
        child.stop(grace=1.0 if received else STOP_GRACE_S)
        for signum, old in previous.items():
            signal.signal(signum, old)
    if received:
        _say(f"stopped {child.name} ({signal.Signals(received[0]).name})")
        return 0
    code = child.proc.returncode
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    if code:
        _say(f"{child.name} exited with status {code}" +
             ("." if child.echo else f"; its last lines:\n{child.tail()}"))
    return code


def _wait_until(ready: Callable[[], bool], child: _Child, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if child.poll() is not None:
            raise DeploymentRunError(f"{child.name} exited with status {child.proc.returncode} while starting; its "
                                     f"last lines:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise DeploymentRunError(f"{what}; its last lines:\n{child.tail()}")
        time.sleep(0.5)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _process_table() -> dict[int, tuple[int, int, int, int, str]]:
    """pid -> (parent pid, process group, session, start time, state) from /proc (empty where there is none)."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]),
                                      fields[0].decode())
    return table


@contextlib.contextmanager
def _exclusive(state: Path, what: str):
    """One command per state folder (two SuperLinks on one database, or two SuperNodes on one ledger, would
    corrupt it)."""
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeploymentRunError(f"Another {what} is already running with the state folder {state}; stop it "
                                     "first or pass another --state.") from None
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------ helpers


def _flower_bin(name: str) -> str:
    """A Flower executable: next to this Python (the venv), else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` was not found next to {sys.executable} or on PATH; install facefl's "
                                "dependencies (flwr) into this environment.")
    return found


def _flower_env(home: Path) -> dict[str, str]:
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


def _tls_ready(address: str, ca_cert: Path) -> bool:
    """True once ``address`` completes a TLS handshake with a certificate from ``ca_cert`` naming it."""
    host, port = _split_address(address)
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=2) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            return True
    except (OSError, ssl.SSLError):
        return False


def _check_bindable(host: str, port: int, message: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise DeploymentRunError(f"{message} ({exc.strerror})") from None


def _local_address(host: str, port: int) -> str:
    """Where this machine reaches a SuperLink listening on ``host`` (loopback for a wildcard address; the server
    certificate always names the loopback addresses)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    return _address(host.strip("[]"), port)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_host_port(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        raise DeploymentRunError(f"Invalid --superlink {address!r}: give HOST:PORT without a scheme "
                                 "(e.g. superlink.hospital.org:8000).")
    _check_port(int(port))


def _check_port(port: int) -> int:
    if not 1 <= int(port) <= 65535:
        raise DeploymentRunError(f"Invalid port {port}: give a number from 1 to 65535.")
    return int(port)


def _node_config_value(value: str) -> str:
    """A string as Flower's ``key=value`` parser (``--node-config``, ``--run-config``) reads it: a quoted TOML
    string, in the quote character it does not contain."""
    if "\n" in value or ("'" in value and '"' in value):
        raise DeploymentRunError(f"Flower's key=value options cannot carry {value!r} (it holds a newline or both "
                                 "quote characters); rename or move the file or folder.")
    return f"'{value}'" if "'" not in value else json.dumps(value, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DeploymentRunError(f"Run-config values must be finite numbers, got {value}.")
        return repr(value)
    return _node_config_value(str(value))


def _default_app_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def _say(message: str) -> None:
    print(f"facefl: {message}", flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------- commands


def superlink_command(
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init`."),
    state: Optional[Path] = typer.Option(None, "--state", help="State folder: database (registered sites, runs), "
                                         "nodes.json, log, FLWR_HOME. Default DIR/superlink/state."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTPS port of the Fleet, Control and Runtime APIs "
                                       "(default: the deployment's, 8000)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    startup_timeout: float = typer.Option(90.0, "--startup-timeout", help="Seconds to wait for the SuperLink "
                                          "to accept connections."),
) -> None:
    """Run the deployment's SuperLink (TLS, SuperNode authentication), register its sites, print how to start
    a run; stays in the foreground until Ctrl-C."""
    raise typer.Exit(run_superlink(deployment, state=state, port=port, host=host, startup_timeout=startup_timeout))


def site_command(
    deployment: Path = typer.Option(..., "--deployment", help="The deployment folder, or this site's bundle "
                                    "(DIR/sites/NAME as the operator handed it out)."),
    site: str = typer.Option(..., "--site", help="This site's name."),
    data: Optional[Path] = typer.Option(None, "--data", help="This site's faces: a folder of identity folders "
                                        "(default: data-path in site.toml)."),
    state: Optional[Path] = typer.Option(None, "--state", help="Privacy ledger, audit log, margin head, FLWR_HOME "
                                         "(default: state-dir in site.toml, or ~/.local/share/facefl/NAME)."),
    superlink: Optional[str] = typer.Option(None, "--superlink", help="SuperLink HOST:PORT (default: from the "
                                            "bundle)."),
    runtime_port: Optional[int] = typer.Option(None, "--runtime-port", help="Local port of the SuperNode's "
                                               "Runtime API (default 9094; one per site on a machine)."),
    max_retries: Optional[int] = typer.Option(None, "--max-retries", help="Give up after this many failed "
                                              "connection attempts (default: never)."),
    max_wait_time: Optional[float] = typer.Option(None, "--max-wait-time", help="Give up reconnecting after "
                                                  "this many seconds (default: never)."),
    require_secure_aggregation: Optional[bool] = typer.Option(
        None, "--require-secure-aggregation/--allow-plain-aggregation",
        help="Refuse rounds that are not securely aggregated (SecAgg+), so the server never holds this site's "
             "update alone (default: require-secure-aggregation in site.toml, else allow)."),
) -> None:
    """Run this site's SuperNode: it trains on the local faces when the SuperLink asks; stays in the foreground
    until Ctrl-C."""
    raise typer.Exit(run_site(deployment, site, data=data, state=state, superlink=superlink,
                              runtime_port=runtime_port, max_retries=max_retries, max_wait_time=max_wait_time,
                              require_secure_aggregation=require_secure_aggregation))


def _main() -> None:
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="facefl deployment processes: a SuperLink and its sites.")
    app.command("superlink")(superlink_command)
    app.command("site")(site_command)
    try:
        app()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _main()
