"""The site's task launcher: takes each ClientApp task from its SuperNode and starts ``client.app_gate`` for it.

``facefl site`` starts ``flower-supernode --isolation process``, which runs no app itself, and this process next
to it, in place of Flower's ``flower-superexec``: it asks the SuperNode's Runtime API (local, ``127.0.0.1:PORT``)
for pending ClientApp tasks (``AcquireTask``, as ``flower-superexec`` does) and starts one gated runner per task
with the task's token. The runner checks the app before any of it runs (see ``client/app_gate.py``).

Run as ``python -m client.app_launcher --runtime-api-address 127.0.0.1:PORT --site NAME --state DIR [...]``; it
stops with its parent (the ``facefl site`` process) and takes its runners with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

POLL_S = 1.0  # as flower-superexec's default task poll interval


def gate_argv(address: str, token: str, *, site: str, state: Path, trusted_keys: Path | None, required: bool
              ) -> list[str]:
    """The command line of the runner for one task."""
    argv = [sys.executable, "-m", "client.app_gate", "--runtime-api-address", address, "--token", token,
            "--site", site, "--state", str(state), "--parent-pid", str(os.getpid())]
    if trusted_keys is not None:
        argv += ["--trusted-keys", str(trusted_keys)]
    if required:
        argv.append("--require-approved-apps")
    return argv


def run_launcher(address: str, *, site: str, state: Path, trusted_keys: Path | None, required: bool,
                 parent_pid: int | None) -> None:
    """Acquire ClientApp tasks from the SuperNode at ``address`` and start a gated runner for each, until a
    signal (or the parent's exit)."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, retry_invoker=make_simple_http_retry_invoker(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    runners: list[subprocess.Popen] = []

    def stop(signum, _frame) -> None:
        for proc in runners:
            if proc.poll() is None:
                proc.terminate()
        client.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"facefl: site {site}: taking ClientApp tasks from the SuperNode at {address}; each app is checked "
          "before it runs", flush=True)
    while True:
        try:
            reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value],
                                                          agentapp_fab_hashes=[]))
        except Exception as exc:  # noqa: BLE001 -- the SuperNode is starting or restarting: ask again
            print(f"facefl: site {site}: the SuperNode's Runtime API at {address} did not answer ({exc}); retrying",
                  flush=True)
            time.sleep(5 * POLL_S)
            continue
        if reply.HasField("task") and reply.token:
            runners.append(subprocess.Popen(gate_argv(address, reply.token, site=site, state=state,
                                                      trusted_keys=trusted_keys, required=required),
                                            stdin=subprocess.DEVNULL))
        runners = [proc for proc in runners if proc.poll() is None]
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="facefl's task launcher for a SuperNode in process isolation.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--trusted-keys", type=Path)
    parser.add_argument("--require-approved-apps", action="store_true")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    run_launcher(args.runtime_api_address, site=args.site, state=args.state, trusted_keys=args.trusted_keys,
                 required=args.require_approved_apps, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
