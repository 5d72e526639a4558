"""`facefl simulate --ray-address` joins a running Ray cluster: a real head started on loopback with `ray start`,
stopped by the test (its own process group; `ray stop` would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import facefl, patience

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ours(temp: str) -> list[int]:
    """Processes whose command line names the cluster's temporary folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture
def ray_head(tmp_path):
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + patience(120)
        while not _listening(port):
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not start listening"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", head
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + patience(wait)
            while _ours(temp) and time.monotonic() < deadline:
                time.sleep(0.5)
            if not _ours(temp):
                break
        for pid in _ours(temp):  # anything that left the group
            os.kill(pid, signal.SIGKILL)
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_simulate_joins_a_running_ray_cluster_and_leaves_it_running(ray_head, tmp_path):
    address, head = ray_head
    run = tmp_path / "run"
    done = facefl("simulate", "--sites", "3", "--rounds", "1", "--task", "embedding", "--ray-address", address,
                  "--cpus-per-site", "1", "--out", str(run), "--no-report", progress=run)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["status"] == "completed" and sorted(metrics["privacy"]) == ["site-0", "site-1", "site-2"]
    # The sites ran on that cluster: its job table holds the finished facefl driver, and the head is still up.
    assert head.poll() is None
    probe = subprocess.run([sys.executable, "-c", (
        "import json, ray; ray.init(address=%r, logging_level='ERROR'); from ray._private import state; "
        "print(json.dumps([[j.get('Entrypoint', ''), j.get('IsDead')] for j in state.jobs()]))") % address],
        capture_output=True, text=True, timeout=patience(120), env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert probe.returncode == 0, probe.stderr
    jobs = json.loads(probe.stdout.strip().splitlines()[-1])
    assert any("facefl simulate" in entry and dead for entry, dead in jobs), jobs


def test_a_local_simulation_never_attaches_to_another_cluster():
    from simulations.simulate import backend_config

    local = backend_config(cpus_per_site=1.0)
    assert local["init_args"]["address"] == "local" and local["init_args"]["num_cpus"] >= 1
    joined = backend_config(cpus_per_site=0.5, gpus_per_site=0.25, ray_address="10.0.0.5:6379")
    assert joined["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in joined["init_args"]
    assert joined["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}
