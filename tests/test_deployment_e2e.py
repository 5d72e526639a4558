"""A real deployment on this machine: `facefl superlink` and three `facefl site` processes (Flower's deployment
engine, TLS, SuperNode authentication), a DP run on LFW slices started with `flwr run`, and SuperNodes that must
be turned away (an unregistered key, no TLS). Every process is real and started as a user would start it."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import marked_processes, patience
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.privacy import PrivacyLedger
from client.supernode import IMAGE_SUFFIXES
from common.audit import verify_log
from common.config import ConfigError
from common.data.datasets import IMAGE_EXTENSIONS
from common.deployment import DeploymentRunError
from common.processes import process_table
from server.deployment.flwr_cli import CONNECTION, flwr_json, run_logs, run_status, start_run, wait_run
from server.deployment.provision import init_deployment, revoke_site
from server.deployment.superlink import list_nodes, write_flwr_config

REPO = Path(__file__).resolve().parents[1]
SITES = ("a", "b", "c")
PEOPLE_PER_SITE = 6
MARK = f"facefl-deploy-test-{uuid.uuid4().hex}"  # in the environment of every process this file starts
BINDIR = Path(sys.executable).parent


@dataclass
class Federation:
    root: Path  # the deployment folder
    state: Path  # the SuperLink's state folder
    port: int
    superlink: subprocess.Popen | None
    superlink_out: Path | None
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)  # everything started, stopped at the end
    superlinks: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)  # the running `facefl site` processes
    run_id: int | None = None  # the run of test_three_sites_train_a_dp_run_over_tls
    site_outs: dict[str, Path] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(argv: list, out: Path) -> subprocess.Popen:
    """A process in a session of its own (stopped as a group), marked, output to ``out``."""
    with open(out, "ab") as fh:
        return subprocess.Popen([str(a) for a in argv], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "FACEFL_TEST_MARK": MARK, "FLWR_HOME": str(out.parent / "flwr-home"),
                                     "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                                     "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}"})


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the group (what Ctrl-C or a service manager does), SIGKILL if it is not gone in ``grace`` s."""
    if proc.poll() is None:
        with _suppress():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with _suppress():
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


def _leftover_processes() -> list[str]:
    """Live processes (not zombies) started by this file, found by the mark in their environment."""
    return [f"{pid}: {cmdline[:160]}" for pid, cmdline in marked_processes(MARK).items()]


def _wait_for(condition, timeout: float, what: str, *logs: Path, poll: float = 0.5) -> None:
    """Poll ``condition`` every ``poll`` s until it holds; fail after ``timeout`` seconds of a quiet machine (times
    PATIENCE). A condition that asks the SuperLink through the `flwr` CLI starts a Python process (about a second of
    CPU) each time: poll those every few seconds."""
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-4000:]}" for p in logs if p.exists())
            pytest.fail(f"{what} (after {timeout:g} s)\n{tails}")
        time.sleep(poll)


def _site_data(lfw_root: Path, dest: Path) -> dict[str, Path]:
    """Per-site identity folders: symlinks to LFW people of peopleDevTrain.txt with exactly 4 photos, six distinct
    people per site (the server evaluates on pairsDevTest.txt people, whom no site has)."""
    lines = (lfw_root / "peopleDevTrain.txt").read_text().splitlines()[1:]
    people = sorted(name for name, count in (line.split("\t") for line in lines if "\t" in line)
                    if int(count) == 4 and len(list((lfw_root / name).glob("*.jpg"))) == 4)
    assert len(people) >= PEOPLE_PER_SITE * len(SITES)
    folders = {}
    for i, site in enumerate(SITES):
        folder = dest / site
        folder.mkdir(parents=True)
        for name in people[i * PEOPLE_PER_SITE:(i + 1) * PEOPLE_PER_SITE]:
            (folder / name).symlink_to(lfw_root / name, target_is_directory=True)
        folders[site] = folder
    return folders


def _nodes(fed: Federation) -> dict[int, str]:
    return {int(n["node-id"]): n["status"] for n in list_nodes(fed.state)}


def _start_superlink(fed: Federation, out: Path) -> None:
    """`facefl superlink` on the federation's deployment and port; returns once it has synced its sites."""
    proc = _start([sys.executable, "-m", "simulations.deploy_cli", "superlink", "--deployment", fed.root,
                   "--host", "127.0.0.1", "--port", fed.port], out)
    fed.procs.append(proc)
    fed.superlinks.append((proc, out))
    fed.superlink, fed.superlink_out = proc, out
    _wait_for(lambda: "SuperLink running at" in out.read_text() or proc.poll() is not None, 150,
              "the SuperLink did not start", out)
    assert proc.poll() is None, out.read_text()[-4000:]


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    """A SuperLink started with `facefl superlink` on a free loopback port, with sites a, b, c registered.
    Everything this file starts is stopped at the end, and nothing may be left running."""
    tmp = tmp_path_factory.mktemp("deployment")
    dep = init_deployment(tmp / "dep", "127.0.0.1", list(SITES))
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
        left = _leftover_processes()
        assert not left, "processes left running:\n" + "\n".join(left)
        for proc, out in fed.superlinks:  # each stopped cleanly on SIGTERM
            assert proc.returncode == 0 and "stopped flower-superlink (SIGTERM)" in out.read_text(), \
                out.read_text()[-4000:]


@pytest.mark.slow
def test_superlink_registers_the_sites_and_prints_the_run_command(federation):
    nodes = json.loads((federation.state / "nodes.json").read_text())["nodes"]
    assert set(nodes) == set(SITES)
    listed = _nodes(federation)
    assert {int(e["node_id"]) for e in nodes.values()} <= set(listed)
    assert all(listed[int(e["node_id"])] == "registered" for e in nodes.values())  # known, not yet connected
    out = federation.superlink_out.read_text()
    assert f"FLWR_HOME={federation.state / 'flwr-home'}" in out and " run " in out and "--run-config" in out
    config = (federation.state / "flwr-home" / "config.toml").read_text()
    assert f"address = '{federation.address}'" in config and "ca.crt" in config
    assert (federation.state / "superlink.db").is_file() and (federation.state / "superlink.log").is_file()
    assert IMAGE_SUFFIXES == IMAGE_EXTENSIONS


@pytest.mark.slow
def test_a_second_superlink_on_the_same_state_is_refused(federation):
    done = subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "superlink", "--deployment", federation.root,
                           "--host", "127.0.0.1", "--port", str(_free_port())], cwd=REPO, capture_output=True,
                          text=True, timeout=patience(60), env={**os.environ, "FACEFL_TEST_MARK": MARK})
    assert done.returncode == 2 and "already running with the state folder" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused(federation, lfw_root):
    """A bundle whose key the SuperLink never registered: the SuperLink refuses to activate it and `facefl site`
    exits non-zero, saying why. The node never shows up."""
    rogue = federation.tmp / "rogue-bundle"
    shutil.copytree(federation.root / "sites" / "a", rogue)
    key = ec.generate_private_key(ec.SECP384R1())
    (rogue / "supernode.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.OpenSSH,
                                                            serialization.NoEncryption()))
    data = federation.tmp / "rogue-data"
    (data / "person").mkdir(parents=True)
    for src in sorted((lfw_root / "Aaron_Peirsol").glob("*.jpg"))[:2]:
        (data / "person" / src.name).symlink_to(src)
    before = set(_nodes(federation))
    out = federation.tmp / "rogue.out"
    proc = _start([sys.executable, "-m", "simulations.deploy_cli", "site", "--deployment", rogue, "--site", "a",
                   "--data", data, "--state", federation.tmp / "rogue-state", "--superlink", federation.address,
                   "--runtime-port", _free_port(), "--max-retries", "1", "--max-wait-time", "20"], out)
    federation.procs.append(proc)
    try:
        code = proc.wait(timeout=patience(90))
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key was not turned away:\n" + out.read_text()[-4000:])
    text = out.read_text()
    assert code != 0, text
    assert "Failed to activate SuperNode" in text and "does not accept this site's key" in text, text[-3000:]
    assert "No SuperNode found with the given public key" in (federation.state / "superlink.log").read_text()
    nodes = _nodes(federation)
    assert set(nodes) == before and "online" not in nodes.values()


@pytest.mark.slow
def test_a_supernode_without_tls_cannot_connect(federation):
    """Plain HTTP against the SuperLink's HTTPS port: refused. With a (registered) key, Flower refuses to even try
    (node authentication requires TLS)."""
    site = federation.root / "sites" / "b"
    common = ["--superlink", federation.address, "--insecure", "--max-retries", "2", "--max-wait-time", "15",
              "--node-config", "data-path='/nonexistent'"]
    cases = {"no-key": [], "with-key": ["--auth-supernode-private-key", site / "supernode.key"]}
    for label, extra in cases.items():
        out = federation.tmp / f"insecure-{label}.out"
        proc = _start([BINDIR / "flower-supernode", *common, *extra, "--port", _free_port()], out)
        federation.procs.append(proc)
        try:
            code = proc.wait(timeout=patience(90))
        except subprocess.TimeoutExpired:
            pytest.fail(f"an --insecure SuperNode ({label}) kept running:\n" + out.read_text()[-4000:])
        finally:
            _stop(proc, grace=5)  # its SuperExec is in its process group
        text = out.read_text()
        assert code != 0, text
        if label == "with-key":
            assert "Node authentication can only be used when TLS is enabled" in text, text[-3000:]
        else:
            assert "Failed to initialize the connection to the SuperLink" in text, text[-3000:]
    assert "online" not in _nodes(federation).values()


@pytest.mark.slow
def test_three_sites_train_a_dp_run_over_tls(federation, lfw_root, cache_dir):
    tmp = federation.tmp
    data = _site_data(lfw_root, tmp / "data")
    states = {s: tmp / "site-state" / s for s in SITES}
    outs = {s: tmp / f"site-{s}.out" for s in SITES}
    for s in SITES:
        federation.sites[s] = _start(
            [sys.executable, "-m", "simulations.deploy_cli", "site", "--deployment", federation.root, "--site", s,
             "--data", data[s], "--state", states[s], "--superlink", federation.address,
             "--runtime-port", _free_port()], outs[s])
        federation.procs.append(federation.sites[s])
    federation.site_outs.update(outs)
    site_procs = list(federation.sites.values())
    node_ids = _node_ids(federation)
    _wait_for(lambda: all(_nodes(federation).get(node_ids[s]) == "online" for s in SITES)
              or any(p.poll() is not None for p in site_procs), 120, "the sites did not connect", *outs.values(),
              poll=3)
    assert all(p.poll() is None for p in site_procs), {s: outs[s].read_text()[-2000:] for s in SITES}
    assert all("connected to the SuperLink" in outs[s].read_text() for s in SITES)

    run_dir = tmp / "run"
    federation.run_id = start_run(federation.root, federation.state, REPO, _run_config(lfw_root, tmp, cache_dir))

    # Round 1 completes (checkpoint, metrics, audit entry); the test after this one kills the SuperLink in round 2.
    def round_results() -> list[dict]:
        path = run_dir / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if '"round-results"' in line]

    polls = itertools.count(1)  # the audit log every 0.5 s; the run's status (a `flwr` process) every 5 s
    _wait_for(lambda: round_results() or (next(polls) % 10 == 0 and run_status(
        federation.root, federation.state, federation.run_id)["status"].startswith("finished")), 300,
        "round 1 did not complete", federation.superlink_out, *outs.values())
    logs = run_logs(federation.root, federation.state, federation.run_id)
    assert round_results(), logs[-4000:]
    assert "[ROUND 1/2]" in logs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert {0, 1} <= set(rounds) and metrics["run"]["completed_rounds"] >= 1
    assert set(rounds[1]["sites"]) == set(SITES), rounds[1]
    assert "embedding/roc_auc" in rounds[1]["global"] and "embedding/roc_auc" in rounds[0]["global"]
    assert (run_dir / "checkpoints" / "round-0001.pt").is_file()

    server_log = verify_log(run_dir / "audit.jsonl")
    assert server_log.ok, server_log.problems
    heads = round_results()[0]["data"]["site_audit_heads"]
    assert set(heads) == set(SITES)
    for s in SITES:
        ledger = PrivacyLedger.load(states[s])
        assert ledger is not None and ledger.site == s
        assert [r["round"] for r in ledger.rounds if r["status"] == "trained"][0] == 1
        assert 0 < ledger.spent <= 50 + 1e-6
        report = verify_log(states[s] / "audit.jsonl", expected_head=heads[s])  # anchored in the server log
        assert report.ok and report.events.get("round-trained", 0) >= 1, report.problems
        assert not (run_dir / "sites" / s).exists()  # a deployed site keeps its state at the site
    # The sites and the run stay up for test_a_killed_superlink_and_a_killed_site_do_not_lose_the_run.


def _node_ids(fed: Federation) -> dict[str, int]:
    return {s: int(e["node_id"]) for s, e in json.loads((fed.state / "nodes.json").read_text())["nodes"].items()}


def _run_config(lfw_root: Path, tmp: Path, cache_dir: Path, **changes) -> dict:
    """The deployment runs' config: a small DP run whose budget is planned over 3 rounds. The server's evaluation
    faces come from the test session's face cache (the sites keep their own, in their state folders)."""
    return {"task": "embedding", "model": "compact", "validation-people": 0, "data": str(lfw_root), "num-rounds": 2, "min-sites": 3, "dp": True,
            "target-epsilon": 50, "accountant": "rdp", "batch-size": 16, "eval-pairs": 100, "eval-faces": 16,
            "run-dir": str(tmp / "run"), "cache-dir": str(cache_dir), "round-timeout": patience(120),
            "planned-rounds": 3,
            **changes}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything under it (descendants, and the sessions and process groups they lead: Flower
    starts its SuperExec in a session of its own), all stopped first so that nothing reacts to the others' death."""
    table = process_table()
    ours, changed = {proc.pid}, True
    while changed:
        changed = False
        for pid, (ppid, pgrp, sid, _start, _state) in table.items():
            if pid not in ours and pid != os.getpid() and (ppid in ours or pgrp in ours or sid in ours):
                ours.add(pid)
                changed = True
    for signum in (signal.SIGSTOP, signal.SIGKILL):
        for pid in ours:
            with _suppress():
                os.kill(pid, signum)
    proc.wait(timeout=10)
    _wait_for(lambda: all(process_table().get(pid, (0, 0, 0, 0, "Z"))[4] == "Z" for pid in ours), 20,
              "a killed process tree did not go away")


@pytest.mark.slow
def test_a_killed_superlink_and_a_killed_site_do_not_lose_the_run(federation, lfw_root, cache_dir):
    """The run of test_three_sites_train_a_dp_run_over_tls is in round 2 when the SuperLink's whole process tree
    (with the ServerApp) is SIGKILLed. Started again on the same state, it keeps its registrations and past runs, and
    the sites reconnect on their own. A run resumed from the checkpoint continues from the last completed round,
    under secure aggregation, and site c's whole tree is killed as that round starts: SecAgg+ unmasks the mean of a
    and b and the run completes. Last, `deploy revoke-site c` and SIGHUP unregister c, and its saved key is refused."""
    tmp = federation.tmp
    run_dir = tmp / "run"
    procs, outs = federation.sites, federation.site_outs
    assert set(procs) == set(SITES) and all(p.poll() is None for p in procs.values())
    states = {s: tmp / "site-state" / s for s in SITES}
    node_ids = _node_ids(federation)
    registered = json.loads((federation.state / "nodes.json").read_text())["nodes"]
    runs_before = flwr_json(federation.state, "list", CONNECTION)["runs"]

    # The SuperLink dies outright, mid-run, and comes back on the same state folder.
    killed, killed_out = federation.superlink, federation.superlink_out
    _kill_tree(killed)
    federation.superlinks.remove((killed, killed_out))  # not stopped by SIGTERM: left out of the final check
    done = json.loads((run_dir / "metrics.json").read_text())["run"]["completed_rounds"]  # 1, unless round 2 won
    assert done >= 1
    trained_before = {s: [r["round"] for r in PrivacyLedger.load(states[s]).rounds if r["status"] == "trained"]
                      for s in SITES}
    eps_before = {s: PrivacyLedger.load(states[s]).spent for s in SITES}
    _start_superlink(federation, tmp / "superlink-after-kill.out")
    out = federation.superlink_out
    assert "registered site" not in out.read_text()  # the registrations survived
    assert json.loads((federation.state / "nodes.json").read_text())["nodes"] == registered
    runs_after = {r["run-id"] for r in flwr_json(federation.state, "list", CONNECTION)["runs"]}
    assert {r["run-id"] for r in runs_before} <= runs_after
    _wait_for(lambda: all(_nodes(federation).get(node_ids[s]) == "online" for s in SITES), 120,
              "the sites did not reconnect", out, *outs.values(), poll=3)
    assert all(p.poll() is None for p in procs.values()), {s: outs[s].read_text()[-2000:] for s in SITES}

    # The next round, resumed and securely aggregated; site c is killed (its whole tree) as it starts.
    nxt = done + 1
    run_id = start_run(federation.root, federation.state, REPO, _run_config(
        lfw_root, tmp, cache_dir, **{"num-rounds": nxt, "min-sites": 2, "resume-from": str(run_dir), "secure-aggregation": True,
                          "round-timeout": patience(60), "secagg-timeout": patience(15)}))
    _wait_for(lambda: "[ROUND 1/1] (secure aggregation" in run_logs(federation.root, federation.state, run_id), 120,
              f"round {nxt} did not start", out, poll=1)
    time.sleep(2)
    _kill_tree(procs["c"])
    status = wait_run(federation.root, federation.state, run_id, timeout=patience(240), poll=5)
    logs = run_logs(federation.root, federation.state, run_id)
    assert status == "finished:completed", logs[-4000:]
    assert "Secure aggregation completed" in logs, logs[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds) == set(range(nxt + 1)) and metrics["run"]["completed_rounds"] == nxt
    assert [r["from_round"] for r in metrics["run"]["resumed"]] == [done]
    assert set(rounds[nxt]["sites"]) == {"a", "b"} and f"node-{node_ids['c']}" in rounds[nxt]["failed"], rounds[nxt]
    assert all(rounds[nxt]["sites"][s]["secagg-weight"] > 0 for s in ("a", "b"))
    before, after = (torch.load(run_dir / "checkpoints" / f"round-{r:04d}.pt", weights_only=True)["state_dict"]
                     for r in (done, nxt))
    assert any(not torch.equal(before[k], after[k]) for k in after)  # a and b's securely aggregated update applied
    for s in SITES:
        ledger = PrivacyLedger.load(states[s])
        trained = [r["round"] for r in ledger.rounds if r["status"] == "trained"]
        # Every training is on the ledger, a round interrupted by the kill included: epsilon is never given back.
        assert trained[:len(trained_before[s])] == trained_before[s] and ledger.spent >= eps_before[s]
        assert (trained[-1] == nxt) if s != "c" else (trained[-1] <= nxt), (s, ledger.rounds)
        assert ledger.spent <= 50 + 1e-6
    server_log = verify_log(run_dir / "audit.jsonl")
    assert server_log.ok, server_log.problems
    last = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()
            if '"round-results"' in line][-1]["data"]
    assert last["round"] == nxt and set(last["site_audit_heads"]) == {"a", "b"}
    for s in ("a", "b"):
        assert verify_log(states[s] / "audit.jsonl", expected_head=last["site_audit_heads"][s]).ok

    # A revoked site: SIGHUP unregisters it, `facefl site` refuses to start it, and its saved key is refused.
    saved_key = tmp / "c-supernode.key"
    shutil.copy2(federation.root / "sites" / "c" / "supernode.key", saved_key)
    revoke_site(federation.root, "c")
    os.kill(federation.superlink.pid, signal.SIGHUP)
    _wait_for(lambda: "unregistered site c" in out.read_text(), 60, "SIGHUP did not apply the revocation", out)
    nodes = json.loads((federation.state / "nodes.json").read_text())["nodes"]
    assert nodes["c"]["status"] == "unregistered" and nodes["c"]["reason"] == "revoked"
    assert _nodes(federation)[int(nodes["c"]["node_id"])] == "unregistered"
    assert federation.superlink.poll() is None  # SIGHUP does not stop it
    refused = subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "site", "--deployment",
                              federation.root, "--site", "c", "--data", tmp / "data" / "c"],
                             cwd=REPO, capture_output=True, text=True, timeout=patience(60),
                             env={**os.environ, "FACEFL_TEST_MARK": MARK})
    assert refused.returncode == 2 and "was revoked" in refused.stderr, refused.stderr
    log = tmp / "revoked-key.out"
    proc = _start([BINDIR / "flower-supernode", "--superlink", federation.address, "--root-certificates",
                   federation.root / "ca" / "ca.crt", "--auth-supernode-private-key", saved_key,
                   "--max-retries", "1", "--max-wait-time", "15", "--port", _free_port()], log)
    federation.procs.append(proc)
    try:
        assert proc.wait(timeout=patience(90)) != 0, log.read_text()
    finally:
        _stop(proc, grace=5)
    assert "Failed to activate SuperNode" in log.read_text()

    # Stopping a site (as Ctrl-C does) stops everything under it.
    for s in ("a", "b"):
        _stop(procs[s])
        assert procs[s].returncode == 0
        assert "stopped flower-supernode" in outs[s].read_text()
    _wait_for(lambda: not any("simulations.deploy_cli site" in line or "flower-supernode" in line
                              for line in _leftover_processes()), 20, "site processes left running")


def test_site_checks_its_data_and_bundle_before_starting_anything(tmp_path, lfw_root):
    dep = init_deployment(tmp_path / "dep", "127.0.0.1", ["a", "b"])
    revoke_site(dep.root, "b")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "photo.jpg").write_bytes(b"")
    (tmp_path / "one-each" / "person").mkdir(parents=True)
    (tmp_path / "one-each" / "person" / "x.jpg").symlink_to(next(iter((lfw_root / "Aaron_Peirsol").glob("*.jpg"))))
    cases = {("a", tmp_path / "missing"): "does not exist",
             ("a", tmp_path / "flat"): "has no identity folders",
             ("a", tmp_path / "one-each"): "has 2 or more images",
             ("a", None): "No data folder for site a",
             ("b", tmp_path / "one-each"): "was revoked",
             ("zz", tmp_path / "one-each"): "No site 'zz'"}
    for (site, data), message in cases.items():
        argv = [sys.executable, "-m", "simulations.deploy_cli", "site", "--deployment", str(dep.root), "--site", site,
                "--state", str(tmp_path / "state"), *(["--data", str(data)] if data else [])]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=patience(60),
                              env={**os.environ, "FACEFL_TEST_MARK": MARK})
        assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert not (tmp_path / "state" / "supernode.log").exists()  # nothing was started


def test_start_run_checks_the_run_config_before_sending_it(tmp_path):
    dep = init_deployment(tmp_path / "dep", "127.0.0.1", ["a"])
    state = tmp_path / "state"
    with pytest.raises(DeploymentRunError, match="start the SuperLink first"):
        start_run(dep.root, state, REPO, {"num-rounds": 2})
    write_flwr_config(dep, state, "127.0.0.1:1")  # nothing listens there: any call that got through would fail
    with pytest.raises(DeploymentRunError, match="Unknown run-config key.*num-round"):
        start_run(dep.root, state, REPO, {"num-round": 2})
    with pytest.raises(ConfigError):
        start_run(dep.root, state, REPO, {"num-rounds": "many"})
    config = (state / "flwr-home" / "config.toml").read_text()
    assert "default = 'facefl'" in config and "[superlink.facefl]" in config
    assert f"root-certificates = '{dep.superlink_ca_cert}'" in config


def test_a_site_can_require_secure_aggregation(tmp_path, lfw_root):
    """`facefl site --require-secure-aggregation` (or site.toml) reaches the ClientApp as node config; the ClientApp's
    refusal of plain rounds is tested in test_secure_aggregation."""
    from client.supernode import resolve_site, supernode_argv

    dep = init_deployment(tmp_path / "dep", "127.0.0.1", ["a"])
    (tmp_path / "faces" / "person").mkdir(parents=True)
    for src in sorted((lfw_root / "Aaron_Peirsol").glob("*.jpg"))[:2]:
        (tmp_path / "faces" / "person" / src.name).symlink_to(src)
    bundle = dep.root / "sites" / "a"

    def node_config(**kwargs) -> str:
        argv = supernode_argv(resolve_site(dep.root, "a", data=tmp_path / "faces", state=tmp_path / "state", **kwargs))
        return argv[argv.index("--node-config") + 1]

    assert "require-secure-aggregation='false'" in node_config()
    assert "require-secure-aggregation='true'" in node_config(require_secure_aggregation=True)
    toml = (bundle / "site.toml").read_text()
    (bundle / "site.toml").write_text(toml.replace("require-secure-aggregation = false",
                                                   "require-secure-aggregation = true"))
    assert "require-secure-aggregation='true'" in node_config()
    assert "require-secure-aggregation='false'" in node_config(require_secure_aggregation=False)
