"""The server admin's side of a running deployment: starting runs on the SuperLink and following them, through
Flower's own ``flwr`` command with the SuperLink's private ``FLWR_HOME`` (``STATE/flwr-home``)::

    FLWR_HOME=STATE/flwr-home FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \\
        flwr run APP_DIR facefl --stream --run-config "num-rounds=10 min-sites=3 data='/faces/for/evaluation'"

or :func:`start_run`, :func:`wait_run` and :func:`run_logs` from Python. ``flwr ... --format json`` exits 0 even
on failure and says so in ``"success"``; :func:`flwr_json` turns that into ``DeploymentRunError``. An app sent
with ``flwr run .`` carries no signature in Flower 1.42 (see ``client/supernode.py`` on signed apps).
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.deployment import DeploymentRunError, flower_bin, flower_env, flwr_home, toml_value
from server.deployment.provision import load_deployment

CONNECTION = "facefl"  # the SuperLink connection's name in $FLWR_HOME/config.toml (flwr ... facefl)
FINISHED = "finished"  # `flwr list` statuses: pending, starting, running, finished:{completed,failed,stopped}


def start_run(deployment_dir: str | Path, state_dir: str | Path | None, app_dir: str | Path,
              run_config: Mapping[str, Any]) -> int:
    """Start a run of the app in ``app_dir`` on the deployment's SuperLink (``flwr run APP facefl``); returns its id.

    ``run_config`` holds run-config overrides (``[tool.flwr.app.config]`` keys); they are checked against the app's
    keys and ``common.config.RunConfig`` before anything is sent. ``state_dir`` is the SuperLink's state folder
    (default ``DIR/superlink/state``) whose ``flwr-home`` ``facefl superlink`` wrote."""
    from common.config import RunConfig

    state = running_state(deployment_dir, state_dir)
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
    overrides = " ".join(f"{key}={toml_value(getattr(cfg, key.replace('-', '_')))}" for key in run_config)
    out = flwr_json(state, "run", str(app), CONNECTION, *(["--run-config", overrides] if overrides else []),
                    timeout=300)
    return int(out["run-id"])


def run_status(deployment_dir: str | Path, state_dir: str | Path | None, run_id: int) -> dict:
    """``flwr list --run-id``: the run's record (``status`` is pending, starting, running or
    ``finished:completed|failed|stopped``)."""
    state = running_state(deployment_dir, state_dir)
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
    state = running_state(deployment_dir, state_dir)
    done = _flwr(state, "log", str(run_id), CONNECTION, "--show", timeout=120)
    return done.stdout


def running_state(deployment_dir: str | Path, state_dir: str | Path | None) -> Path:
    state = Path(state_dir).expanduser().absolute() if state_dir else load_deployment(deployment_dir).superlink_dir / \
        "state"
    if not (flwr_home(state) / "config.toml").is_file():
        raise DeploymentRunError(f"No SuperLink connection in {flwr_home(state)}; start the SuperLink first with "
                                 f"`facefl superlink --deployment {deployment_dir}`" +
                                 (f" --state {state_dir}." if state_dir else "."))
    return state


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
    env = flower_env(flwr_home(state))
    try:
        return subprocess.run([flower_bin("flwr"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise DeploymentRunError(f"`flwr {' '.join(args)}` did not answer within {timeout:g} s.") from exc
