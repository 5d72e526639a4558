"""A site runs only the app its operator approved, checked before any of the app's code runs: a real deployment
(`facefl superlink`, three `facefl site` processes, `flwr run`) in which two sites approved the app with
`facefl site approve` and the third refuses it, then the same app with one byte changed, refused by all three."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import patience
from test_deployment_e2e import (MARK, REPO, SITES, Federation, _free_port, _leftover_processes, _nodes,
                                 _node_ids, _site_data, _start, _start_superlink, _stop, _wait_for)

from client.app_approval import APPROVALS_FILE, approve, read_app
from common.audit import verify_log
from server.deployment.flwr_cli import run_logs, start_run, wait_run
from server.deployment.provision import init_deployment

APPROVING = ("a", "b")  # c requires approved apps and approved none
CANARY = "canary_app.py"  # the test app's ClientApp module: leaves a mark in the site's state when imported


def _make_app(dest: Path, mark: str) -> Path:
    """The facefl app as `flwr run` would send it, whose ClientApp module first leaves ``STATE/<mark>`` (the site's
    FLWR_HOME is STATE/flwr-home) and then is facefl's ClientApp."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__", ".venv", "*.pt"))
    (dest / CANARY).write_text(
        '"""Leaves a mark when imported, then is the facefl ClientApp."""\n'
        "import os\nfrom pathlib import Path\n\n"
        f"(Path(os.environ['FLWR_HOME']).parent / {mark!r}).touch()\n\n"
        "from client.app import app as clientapp  # noqa: E402\n\n"
        "app = clientapp  # an assignment: `flwr run` looks for it without importing this module\n")
    toml = (dest / "pyproject.toml").read_text()
    assert 'clientapp = "client.app:app"' in toml
    (dest / "pyproject.toml").write_text(toml.replace('clientapp = "client.app:app"', 'clientapp = "canary_app:app"'))
    return dest


def _site_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "site", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=patience(60),
                          env={**os.environ, "FACEFL_TEST_MARK": MARK})


def _audit(state: Path, event: str) -> list[dict]:
    path = state / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["data"] for line in lines if json.loads(line)["event"] == event]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approval")
    dep = init_deployment(tmp / "dep", "127.0.0.1", list(SITES))
    toml = dep.root / "sites" / "c" / "site.toml"
    assert "require-approved-apps = false\n" in toml.read_text()
    toml.write_text(toml.read_text().replace("require-approved-apps = false\n", "require-approved-apps = true\n"))
    fed = Federation(dep.root, dep.superlink_dir / "state", _free_port(), None, None, tmp)
    try:
        _start_superlink(fed, tmp / "superlink.out")
        yield fed
    finally:
        for p in reversed(fed.procs):
            _stop(p)
        deadline = time.monotonic() + 20
        while _leftover_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _leftover_processes(), _leftover_processes()


@pytest.mark.slow
def test_only_approved_apps_run_and_a_changed_byte_is_refused_before_import(fed, lfw_root, cache_dir):
    tmp = fed.tmp
    app = _make_app(tmp / "app", "canary-approved")
    content, info = read_app(app)
    states = {s: tmp / "site-state" / s for s in SITES}

    # The sites start before anything is approved: a and b say loudly that they would run any app, c (which requires
    # approved apps) that it refuses every app. Approvals made while a site runs apply from its next task on.
    data = _site_data(lfw_root, tmp / "data")
    outs = {s: tmp / f"site-{s}.out" for s in SITES}
    for s in SITES:
        fed.sites[s] = _start([sys.executable, "-m", "simulations.deploy_cli", "site", "--deployment", fed.root,
                               "--site", s, "--data", data[s], "--state", states[s], "--superlink", fed.address,
                               "--runtime-port", _free_port()], outs[s])
        fed.procs.append(fed.sites[s])

    # Meanwhile the operators of a and b review the app and approve it: with the command (a) and the same function
    # from Python (b); the approvals are signed and listed after their signature is checked.
    done = _site_cli("approve", app, "--deployment", fed.root, "--site", "a", "--state", states["a"], "--yes")
    assert done.returncode == 0 and f"sha256 {info.sha256}" in done.stdout, done.stdout + done.stderr
    assert f"{CANARY}" in done.stdout and "publisher facefl" in done.stdout  # what the operator was shown
    approve(states["b"], "b", content)
    listed = _site_cli("approvals", "--deployment", fed.root, "--site", "a", "--state", states["a"])
    assert listed.returncode == 0 and info.sha256 in listed.stdout, listed.stderr

    node_ids = _node_ids(fed)
    _wait_for(lambda: all(_nodes(fed).get(node_ids[s]) == "online" for s in SITES)
              or any(p.poll() is not None for p in fed.sites.values()), 120, "the sites did not connect",
              *outs.values(), poll=3)
    for s in APPROVING:
        assert "RUNS ANY APP THE SERVER SENDS" in outs[s].read_text()
    assert "requires approved apps but none is approved yet" in outs["c"].read_text()

    # Run 1: a and b train, c refuses before anything of the app is installed; min-sites=2 is met.
    config = {"task": "embedding", "model": "compact", "validation-people": 0, "data": str(lfw_root),
              "num-rounds": 1, "min-sites": 2, "dp": False, "batch-size": 16, "eval-pairs": 10, "eval-faces": 16,
              "run-dir": str(tmp / "run"), "cache-dir": str(cache_dir), "round-timeout": patience(120)}
    run_id = start_run(fed.root, fed.state, app, config)
    status = wait_run(fed.root, fed.state, run_id, timeout=patience(240), poll=6)  # each poll is a `flwr` process
    logs = run_logs(fed.root, fed.state, run_id)
    assert status == "finished:completed", logs[-4000:]
    assert f"site c refused the app: app facefl {info.version} (sha256 {info.sha256}) refused: not approved" in logs
    rounds = {r["round"]: r for r in json.loads((tmp / "run" / "metrics.json").read_text())["rounds"]}
    assert set(rounds[1]["sites"]) == set(APPROVING) and set(rounds[1]["refused"]) == {"c"}, rounds[1]
    from server.report.reader import read_run

    assert "Round 1: site c refused the run's app (not approved there)" in " ".join(read_run(tmp / "run").notes)
    refused_line = [line for line in outs["c"].read_text().splitlines() if f"REFUSED run {run_id}" in line]
    assert len(refused_line) == 1 and info.sha256 in refused_line[0], outs["c"].read_text()[-3000:]
    assert [(e["run_id"], e["fab_hash"]) for e in _audit(states["c"], "app-refused")] == [(run_id, info.sha256)]
    for s in SITES:
        assert verify_log(states[s] / "audit.jsonl").ok
    for s in APPROVING:
        assert (states[s] / "canary-approved").exists()  # the canary does leave a mark where the app runs
        assert [e["fab_hash"] for e in _audit(states[s], "app-accepted")] == [info.sha256]
    assert not (states["c"] / "canary-approved").exists()
    assert not (states["c"] / "flwr-home" / "facefl-apps").exists()  # c never unpacked it

    # Run 2: the same app with one byte changed in one file: every site refuses it, none imports or installs it.
    changed = _make_app(tmp / "app-changed", "canary-approved")
    source = (changed / CANARY).read_text()
    (changed / CANARY).write_text(source.replace("canary-approved", "canary-approveD"))
    _, changed_info = read_app(changed)
    assert sum(x != y for x, y in zip(source, (changed / CANARY).read_text())) == 1
    run2 = start_run(fed.root, fed.state, changed, {**config, "run-dir": str(tmp / "run-changed")})
    status = wait_run(fed.root, fed.state, run2, timeout=patience(180), poll=6)
    logs = run_logs(fed.root, fed.state, run2)
    assert status == "finished:failed", logs[-4000:]
    assert "3 of 3 sites refused this app (a, b, c: not approved there)" in logs, logs[-4000:]
    assert "3 of 3 sites refused this app" in read_run(tmp / "run-changed").notes[0]  # the report says so first
    for s in SITES:
        assert changed_info.sha256 in [e["fab_hash"] for e in _audit(states[s], "app-refused")], s
        assert not (states[s] / "canary-approveD").exists(), s
        assert not (states[s] / "flwr-home" / "facefl-apps" / changed_info.sha256).exists(), s
        assert f"REFUSED run {run2}" in outs[s].read_text()
    assert json.loads((states["a"] / APPROVALS_FILE).read_text())["apps"].keys() == {info.sha256}
