"""The site's ClientApp runner: the check that an app is approved, placed before any file of it is installed or
imported, then Flower's own steps to run it.

Where the check sits in Flower 1.42. A SuperNode started with ``--isolation process`` pulls each message, stores
the run's FAB (as bytes) and creates a task, but runs nothing: a separate process must take the task from the
SuperNode's Runtime API (``client/app_launcher.py``, in place of Flower's ``flower-superexec``), and this runner
(in place of ``flwr-clientapp``) pulls the task's input: the message, the context, the run and the FAB, all of them
data. Up to that point Flower has only read the FAB's ``pyproject.toml`` (the SuperNode fuses the run config from
it). Here the FAB's SHA-256 is computed from the bytes received and judged (``client.app_approval.judge``):

- refused: an error reply to the run (``Error`` code ``INVALID_FAB``, whose reason names the site, the app, its
  hash and why), the task finished as failed, one ``facefl: ... REFUSED ...`` line in the site's log and an
  ``app-refused`` entry in the site's audit log (run id, FAB hash, app, reason). The FAB is never extracted.
- allowed: it is installed into ``FLWR_HOME/facefl-apps/<full sha256>/`` (Flower's ``install_from_fab``, which
  also checks the bundle's manifest) and its ClientApp is loaded from there and called, as ``flwr-clientapp`` does.

The other routes Flower offers were weighed: ``--trusted-entities`` accepts only signatures that Flower Hub
attaches (an app sent with ``flwr run`` arrives without them), and a mod runs inside the ClientApp, i.e. after the
app's code is imported. This runner imports the site's installed facefl (the code the operator installed, not
the FAB's); before the app is loaded, every module whose top-level name the installed app also defines is
dropped from ``sys.modules``, so that the app runs its own code from its bundle, as under ``flwr-clientapp``.

Run as ``python -m client.app_gate --runtime-api-address 127.0.0.1:PORT --token TOKEN --site NAME --state DIR``
(the launcher does this for every task).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import sys
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.telemetry import EventType
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.app_approval import Decision, judge, read_trusted_keys
from common.deployment import app_refused_reason

APPS_DIR = "facefl-apps"  # under FLWR_HOME: one folder per approved bundle, named by its full SHA-256
AUDIT_FILE = "audit.jsonl"  # = client.site.AUDIT_FILE (not imported: client.site pulls in torch and the models)


def run_gated_clientapp(*, runtime_api_address: str, token: str, site: str, state: Path,
                        trusted_keys: dict[str, str] | None, required: bool, parent_pid: int | None) -> None:
    """Take one task from the SuperNode, judge its app, and run it or refuse it (see the module docstring)."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None, retry_invoker=retry_invoker,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)])
    heartbeat = None
    message = reply = None
    context: Context | None = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.",
                             exit_handlers=[on_exit])
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)  # data only: nothing of the app is imported

        decision = check_fab(fab.hash_str, fab.content, site=site, state=state, trusted_keys=trusted_keys,
                             required=required)
        record(decision, site=site, state=state, run_id=run.run_id, fab_hash=fab.hash_str)
        if not decision.allowed:
            details = app_refused_reason(site, decision.reason)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
            exit_code = ExitCode.TASK_PROC_EXCEPTION
        else:
            sha256 = hashlib.sha256(fab.content).hexdigest()
            app_dir = install_from_fab(fab.content, install_dir=_flwr_home() / APPS_DIR / sha256, skip_prompt=True)
            _forget_shadowed_modules(app_dir)
            load = get_load_client_app_fn(default_app_ref="", app_path=str(app_dir), multi_app=True)
            client_app = load(run.fab_id, run.fab_version, fab.hash_str)
            reply = client_app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 -- reported to the run as Flower's flwr-clientapp reports it
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>"
        if isinstance(exc, LoadClientAppError):
            code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load " \
                                                               "`ClientApp`"
        print(f"facefl: site {site}: the ClientApp failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        import traceback

        traceback.print_exc()
        sub_status, details = SubStatus.FAILED, reason
        if message:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
        exit_code = ExitCode.COMMON_APP_IMPORT_ERROR if isinstance(exc, ImportError) else \
            ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply and context:
            try:
                push_message(client, reply, context)
            except Exception as exc:  # noqa: BLE001
                print(f"facefl: site {site}: failed to push the reply: {exc}", file=sys.stderr, flush=True)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def check_fab(claimed_hash: str, content: bytes, *, site: str, state: Path, trusted_keys: dict[str, str] | None,
              required: bool) -> Decision:
    """:func:`client.app_approval.judge` on the bytes received, after checking that they are the bundle the run
    names (Flower loads an installed app by the hash it was told)."""
    actual = hashlib.sha256(content).hexdigest()
    if claimed_hash != actual:
        return Decision(False, f"the bundle received (sha256 {actual}) is not the one the run names "
                               f"(sha256 {claimed_hash})")
    return judge(content, site=site, state=state, trusted_keys=trusted_keys, required=required)


def record(decision: Decision, *, site: str, state: Path, run_id: int, fab_hash: str) -> None:
    """The one-line log at the site, and the site's audit entry for a checked app (refused or accepted)."""
    verdict = "ran" if decision.allowed else "REFUSED"
    print(f"facefl: {_now()} site {site} {verdict} run {run_id}: {decision.reason}", file=sys.stderr, flush=True)
    if decision.allowed and "runs unchecked" in decision.reason:
        return
    from common.audit import AuditLog

    info = decision.info
    AuditLog(state / AUDIT_FILE, actor=f"site:{site}").append(
        "app-accepted" if decision.allowed else "app-refused", run_id=int(run_id), fab_hash=fab_hash,
        app=f"{info.fab_id} {info.version}" if info else "", reason=decision.reason)


def _forget_shadowed_modules(app_dir: Path) -> None:
    """Drop the modules this runner imported whose top-level names the app defines (its own ``client``, ``common``
    ...), so that ``load_app`` imports the app's files from its bundle, not the site's installed copies."""
    names = {p.stem if p.suffix == ".py" else p.name for p in app_dir.iterdir()
             if p.suffix == ".py" or (p.is_dir() and any(p.glob("*.py")))}
    for module in list(sys.modules):
        if module.split(".", 1)[0] in names:
            del sys.modules[module]
    importlib.invalidate_caches()


def _flwr_home() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home())


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="facefl's ClientApp runner: checks the app, then runs it.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--trusted-keys", type=Path, help="trusted-entities.yaml: app-signing keys this site trusts")
    parser.add_argument("--require-approved-apps", action="store_true")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    run_gated_clientapp(runtime_api_address=args.runtime_api_address, token=args.token, site=args.site,
                        state=args.state, trusted_keys=read_trusted_keys(args.trusted_keys) if args.trusted_keys
                        else None, required=args.require_approved_apps, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
