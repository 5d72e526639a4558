"""``facefl superlink``: run a deployment made by ``facefl deploy init`` on Flower's deployment engine.

``facefl superlink --deployment DIR`` starts ``flower-superlink`` with the deployment's TLS certificate, SuperNode
authentication and a persistent database, waits until it answers, then makes its allow-list match the
deployment: every active site's key is registered (``flwr supernode register``), every revoked site's node is
unregistered (``flwr supernode unregister``, which also disconnects it). SIGHUP syncs again (after
``facefl deploy add-site`` or ``revoke-site``). Everything the SuperLink keeps lives in its state folder::

    STATE/superlink.db        Flower's database: registered nodes, runs (survives restarts)
    STATE/nodes.json          site name -> node id, as registered by this command (written atomically)
    STATE/audit.jsonl         the SuperLink's hash-chained log: every site registered and unregistered (who
                              revoked it, and when)
    STATE/superlink.log       everything flower-superlink and its ServerApps printed
    STATE/flwr-home/          FLWR_HOME of the SuperLink and of `flwr` commands for it: config.toml holds the
                              `[superlink.facefl]` connection (address and CA), installed apps go to apps/

The command stays in the foreground under :mod:`common.processes`. Facts from Flower 1.42 this relies on: the
Fleet, Control and Runtime APIs share one HTTPS port; with ``--enable-supernode-auth`` a SuperNode is accepted
only when its public key was registered through the Control API (the Fleet API refuses self-registration); and
``flower-superlink`` starts its SuperExec in a new session (so it is not in the process group). Starting runs on
it: :mod:`server.deployment.flwr_cli`.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from common.audit import AuditLog
from common.deployment import (DEPLOYMENT_FILE, DeploymentRunError, address, check_bindable, check_port, flower_bin,
                               flower_env, flwr_home, local_address, split_address, tls_ready, toml_value)
from common.processes import ChildProcess, exclusive, now, run_in_foreground, say, wait_until
from server.deployment.flwr_cli import CONNECTION, flwr_json
from server.deployment.provision import CONNECTION_FILE, Deployment, load_deployment

DATABASE = "superlink.db"
NODES_FILE = "nodes.json"
AUDIT_FILE = "audit.jsonl"
SUPERLINK_LOG = "superlink.log"


def superlink_state(deployment: Deployment, state: str | Path | None = None) -> Path:
    """The SuperLink's state folder: ``state`` or ``DIR/superlink/state``."""
    return Path(state).expanduser().absolute() if state else deployment.superlink_dir / "state"


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
    port = dep.ports["superlink"] if port is None else check_port(port)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with exclusive(state_dir, "facefl superlink"):
        check_bindable(host, port, f"The SuperLink's port {port} on {host} is in use (another SuperLink?); stop "
                        "it or pass another --port.")
        local = local_address(host, port)
        write_flwr_config(dep, state_dir, local)
        log_path = state_dir / SUPERLINK_LOG
        argv = [flower_bin("flower-superlink"),
                "--ssl-ca-certfile", str(dep.superlink_ca_cert),
                "--ssl-certfile", str(dep.server_cert),
                "--ssl-keyfile", str(dep.server_key),
                "--enable-supernode-auth",
                "--database", str(state_dir / DATABASE),
                "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
                "--host", host, "--port", str(port)]
        say(f"starting the SuperLink on {address(host, port)} (state {state_dir}, log {log_path})")
        child = ChildProcess("flower-superlink", argv, env=flower_env(flwr_home(state_dir)), cwd=state_dir,
                       log_path=log_path, echo=echo)
        with child:
            wait_until(lambda: tls_ready(local, dep.superlink_ca_cert), child, startup_timeout,
                        f"The SuperLink did not accept TLS connections on {local} within {startup_timeout:g} s")
            nodes = sync_allow_list(dep, state_dir)
            _print_superlink_ready(dep, state_dir, host, local, nodes)

            def resync() -> None:
                try:
                    sync_allow_list(load_deployment(dep.root), state_dir)
                except (ValueError, OSError) as exc:  # keep serving; the operator sees why and can retry
                    say(f"allow-list sync failed: {exc}")

            return run_in_foreground(child, on_hup=resync)


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
             "[superlink]", f"default = {toml_value(CONNECTION)}", "", f"[superlink.{CONNECTION}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in block.items()]
    path = flwr_home(state) / "config.toml"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def sync_allow_list(deployment: Deployment, state: str | Path) -> dict[str, dict]:
    """Make the running SuperLink's allow-list match the deployment; returns ``STATE/nodes.json``'s nodes.

    Every active site without a live registration is registered (its node id recorded in ``nodes.json`` right
    away, atomically); every recorded site that is no longer active (revoked, or gone from ``deployment.json``)
    is unregistered, which also disconnects it. Both are recorded in the SuperLink's audit log
    (``STATE/audit.jsonl``), an unregistration with who revoked the site and when."""
    state = Path(state)
    record = _read_nodes(state)
    nodes: dict[str, dict] = record["nodes"]
    audit = AuditLog(state / AUDIT_FILE, actor="superlink")
    listed = {int(n["node-id"]): n["status"] for n in flwr_json(state, "supernode", "list", CONNECTION)["nodes"]}

    for name, public_key in deployment.allow_list().items():
        entry = nodes.get(name)
        live = entry and listed.get(int(entry["node_id"]), "unregistered") != "unregistered"
        if live and entry.get("fingerprint") and entry["fingerprint"] != deployment.fingerprints.get(name):
            # `facefl deploy rotate-site-key`: the old key's node goes (which disconnects it), the new key registers.
            old_id = int(entry["node_id"])
            try:
                flwr_json(state, "supernode", "unregister", str(old_id), CONNECTION)
            except DeploymentRunError as exc:
                if "not found" not in str(exc).lower():
                    raise
            audit.append("site-key-retired", site=name, node_id=old_id, fingerprint=entry["fingerprint"])
            say(f"unregistered site {name}'s old key (node {old_id})")
            previous = [*entry.get("previous_node_ids", []), old_id]
            nodes[name] = entry = {**entry, "status": "unregistered", "previous_node_ids": previous}
            live = False
        if live:
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
                       "registered_at": now(), "status": "registered",
                       **({"previous_node_ids": entry["previous_node_ids"]} if entry and
                          entry.get("previous_node_ids") else {})}
        _write_nodes(state, record)
        audit.append("site-registered", site=name, node_id=nodes[name]["node_id"],
                     fingerprint=nodes[name]["fingerprint"])
        say(f"registered site {name} as node {nodes[name]['node_id']}")

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
        revocation = deployment.revoked.get(name, {})
        entry.update(status="unregistered", unregistered_at=now(),
                     reason="revoked" if name in deployment.revoked else "not in the deployment")
        if revocation:
            entry.update(revoked_at=revocation.get("revoked_at", ""), revoked_by=revocation.get("revoked_by", ""))
        _write_nodes(state, record)
        audit.append("site-unregistered", site=name, node_id=node_id, reason=entry["reason"],
                     revoked_at=revocation.get("revoked_at", ""), revoked_by=revocation.get("revoked_by", ""),
                     revoke_reason=revocation.get("reason", ""))
        say(f"unregistered site {name} (node {node_id}, {entry['reason']})")
    return nodes


def list_nodes(state: str | Path) -> list[dict]:
    """``flwr supernode list``: one dict per node (``node-id``, ``status``: registered, online, offline,
    unregistered, and times)."""
    return flwr_json(state, "supernode", "list", CONNECTION)["nodes"]


def _print_superlink_ready(dep: Deployment, state: Path, host: str, local: str, nodes: dict[str, dict]) -> None:
    allowed = ", ".join(f"{n} (node {nodes[n]['node_id']})" for n in dep.sites) or "none"
    revoked = sorted(n for n, e in nodes.items() if e.get("status") == "unregistered")
    say(f"SuperLink running at {address(host, split_address(local)[1])}; allowed sites: {allowed}" +
         (f"; unregistered: {', '.join(revoked)}" if revoked else ""))
    port = split_address(local)[1]
    if port != dep.ports["superlink"]:
        say(f"note: the sites' bundles name port {dep.ports['superlink']}; start each site with "
             f"--superlink {address(dep.host, port)}")
    app = _default_app_dir()
    example = (f"num-rounds=10 min-sites={max(1, len(dep.sites))} data='/path/to/evaluation/faces' "
               f"run-dir='runs/deployment'")
    say("start a run (server admin, on this machine):\n"
         f"  FLWR_HOME={shlex.quote(str(flwr_home(state)))} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \\\n"
         f"    {shlex.quote(flower_bin('flwr'))} run {shlex.quote(str(app))} {CONNECTION} --stream "
         f"--run-config \"{example}\"\n"
         f"SIGHUP re-syncs the allow-list with {dep.root / DEPLOYMENT_FILE}; Ctrl-C stops the SuperLink.")


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
    record["updated_at"] = now()
    atomic_write_bytes(state / NODES_FILE, (json.dumps(record, indent=2) + "\n").encode())


def _default_app_dir() -> Path:
    return Path(__file__).resolve().parents[2]  # the facefl app: server/deployment/ -> the repository
