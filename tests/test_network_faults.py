"""A deployment on a network of its own (``tests/netns.py``): `facefl superlink` and three `facefl site` processes,
each in a network namespace with its own 10.x address, TLS with a server certificate that names the SuperLink's
namespace address (not 127.0.0.1), SuperNode authentication, and a DP run on LFW slices started with `flwr run` from
the operator's side of the bridge. Then faults, made on the network: a site partitioned in the middle of round 2.

Marked ``netns`` and left out of the default run (pyproject's addopts); ``.ci/run`` runs the group after the suite:
``python -m pytest -m netns -n0 tests/test_netns.py tests/test_network_faults.py``. Skipped, with the reason, where
the machine does not allow network namespaces.

What Flower 1.42 does when a site disappears mid-round (read from its source, ``flwr/server/superlink/linkstate``):
a SuperNode sends a heartbeat every ~24 s and promises the next within 30 s; the SuperLink counts it offline once
``HEARTBEAT_PATIENCE`` (2) x 30 s pass without one. From then on, the ServerApp's pull of a reply addressed to it
returns an error reply ("Node Unavailable"), so a round waiting for a partitioned site ends within about a minute
of the partition even when ``round-timeout`` is longer, and ``grid.get_node_ids()`` no longer lists the site. A
round's replies are aggregated whatever their number (``min_train_nodes`` only bounds the sampling), and the next
round waits (``wait_for_quorum``, up to ``quorum-timeout``) until ``min-sites`` sites are online again.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import MARK, patience
from test_deployment_e2e import SITES, _site_data, _wait_for  # the same six LFW people per site

from client.privacy import PrivacyLedger
from client.site import RECEIVED_FILE
from common.audit import verify_log
from server.deployment.flwr_cli import run_logs, start_run, wait_run
from server.deployment.provision import init_deployment
from server.deployment.superlink import list_nodes, write_flwr_config

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PORT = 8000  # the deployment's own port: every host has its own network stack, nothing else listens there
BINDIR = Path(sys.executable).parent
HEARTBEAT_LAPSE = 60.0  # Flower 1.42: HEARTBEAT_PATIENCE (2) x HEARTBEAT_DEFAULT_INTERVAL (30 s)
SMALL_DISK = "32m"  # the server's run directory in the disk-full test: room for a few of the model's checkpoints
# Every run on this federation's sites adds to their ledgers (a site's budget is cumulative across runs, and its
# noise multiplier is fixed at the first round it trains from the planned rounds): all tests plan for all of them.
TARGET_EPSILON, PLANNED_ROUNDS = 50, 30  # this file trains each site about 20 rounds


@dataclass
class NetFederation:
    net: object  # tests/netns.py TestNetwork
    root: Path  # the deployment folder
    state: Path  # the SuperLink's state folder (its host)
    operator: Path  # the operator's folder: flwr-home/config.toml names the SuperLink's network address
    tmp: Path
    data: dict[str, Path]
    states: dict[str, Path]
    small_disk: Path  # a small tmpfs mounted before the SuperLink started (its namespace sees the same disk)
    outs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def nodes(self) -> dict[int, str]:
        return {int(n["node-id"]): n["status"] for n in list_nodes(self.operator)}

    def node_ids(self) -> dict[str, int]:
        return {s: int(e["node_id"]) for s, e in json.loads((self.state / "nodes.json").read_text())["nodes"].items()}


def _start(net, host: str, argv: list, out: Path) -> subprocess.Popen:
    """``argv`` in ``host``'s namespace, in a session of its own, marked, output to ``out``."""
    with open(out, "ab") as fh:
        return subprocess.Popen(net.argv(host, argv), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "FACEFL_TEST_MARK": MARK,
                                     "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                 os.environ.get("PYTHONPATH")])),
                                     "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}"})


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the group (what Ctrl-C does), SIGKILL if it is not gone in ``grace`` s."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, signum)
            proc.wait(timeout=wait)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass


def _start_site(fed: NetFederation, s: str) -> None:
    """`facefl site` for site ``s`` in its namespace, with its bundle in the deployment folder and its own state."""
    fed.procs[s] = _start(fed.net, s, [sys.executable, "-m", "simulations.deploy_cli", "site", "--deployment",
                                       fed.root, "--site", s, "--data", fed.data[s], "--state", fed.states[s]],
                          fed.outs[s])


def _audit(run_dir: Path, event: str) -> list[dict]:
    path = run_dir / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if f'"{event}"' in line]


def _received_round(state: Path) -> int:
    """The round of the newest global model the site received (0 before any)."""
    try:
        return int(torch.load(state / RECEIVED_FILE, weights_only=True, map_location="cpu")["round"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.fixture(scope="module")
def netfed(test_network, tmp_path_factory, lfw_root) -> NetFederation:
    """The SuperLink in its namespace (listening on all its interfaces, TLS with the deployment's certificate) and
    sites a, b, c in theirs, dialling the address in their bundles; stopped at the end, nothing left running."""
    net = test_network
    tmp = tmp_path_factory.mktemp("netfed")
    host = net.address("superlink")
    dep = init_deployment(tmp / "dep", host, list(SITES))  # the certificate names the namespace address
    state = dep.superlink_dir / "state"
    fed = NetFederation(net, dep.root, state, tmp / "operator", tmp, _site_data(lfw_root, tmp / "data"),
                        {s: tmp / "site-state" / s for s in SITES}, tmp / "small-disk")
    write_flwr_config(dep, fed.operator, f"{host}:{PORT}")  # the operator dials the SuperLink over the bridge
    # Mounted before the SuperLink starts: `ip netns exec` gives it a copy of this mount table (this machine's
    # mounts do not propagate), so a disk mounted later would not exist there.
    fed.small_disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK},mode=0700", "facefl-test-disk",
                    str(fed.small_disk)], check=True, capture_output=True, timeout=30)
    try:
        fed.outs["superlink"] = tmp / "superlink.out"
        fed.procs["superlink"] = _start(net, "superlink", [sys.executable, "-m", "simulations.deploy_cli",
                                                           "superlink", "--deployment", dep.root, "--port", PORT],
                                        fed.outs["superlink"])
        out = fed.outs["superlink"]
        _wait_for(lambda: "SuperLink running at" in out.read_text() or fed.procs["superlink"].poll() is not None,
                  150, "the SuperLink did not start", out)
        assert fed.procs["superlink"].poll() is None, out.read_text()[-4000:]
        for s in SITES:
            fed.outs[s] = tmp / f"site-{s}.out"
            _start_site(fed, s)
        ids = fed.node_ids()
        _wait_for(lambda: all(fed.nodes().get(ids[s]) == "online" for s in SITES)
                  or any(fed.procs[s].poll() is not None for s in SITES), 120, "the sites did not connect",
                  *fed.outs.values(), poll=2)
        assert all(fed.procs[s].poll() is None for s in SITES), {s: fed.outs[s].read_text()[-2000:] for s in SITES}
        yield fed
    finally:
        for name in (*SITES, "superlink"):
            if name in fed.procs:
                _stop(fed.procs[name])
        deadline = time.monotonic() + 20
        while net.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [f"{pid}: {cmd}" for pid, cmd in net.processes().items()]
        subprocess.run(["umount", "-l", str(fed.small_disk)], capture_output=True, timeout=30)
        assert not left, "processes left running in the test network:\n" + "\n".join(left)


def test_the_sites_reach_the_superlink_by_its_network_address_over_tls(netfed):
    """The certificate names the namespace address and nothing routable besides loopback; every host is alone in
    its namespace, and the sites dialled the address their bundles name."""
    from cryptography import x509

    host = netfed.net.address("superlink")
    cert = x509.load_pem_x509_certificate((netfed.root / "superlink" / "server.crt").read_bytes())
    sans = {str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.IPAddress)}
    assert host in sans and not host.startswith("127.")
    for s in SITES:
        assert f'superlink = "{host}:{PORT}"' in (netfed.root / "sites" / s / "site.toml").read_text()
        assert "connected to the SuperLink" in netfed.outs[s].read_text()
    ids, nodes = netfed.node_ids(), netfed.nodes()
    assert all(nodes[ids[s]] == "online" for s in SITES), nodes


def test_a_site_partitioned_in_round_2_rejoins_and_its_ledger_counts_what_it_trained(netfed, lfw_root, cache_dir):
    """Site c is cut off right after it received round 2's model, for longer than the round's timeout. Round 2
    completes with a and b (Flower reports c unavailable once its heartbeat lapses); round 3 waits for min-sites=3
    until c is back; c trains round 3 with the others. c's ledger holds exactly what it trained: rounds 1, 2 (it
    trained, its reply was lost: epsilon is never given back) and 3; the server aggregated c in rounds 1 and 3."""
    net, tmp = netfed.net, netfed.tmp
    run_dir = tmp / "run"
    round_timeout = max(HEARTBEAT_LAPSE + 30, patience(30))  # Flower's heartbeat lapse ends round 2 first
    config = {"task": "embedding", "model": "compact", "validation-people": 0, "data": str(lfw_root),
              "num-rounds": 3, "min-sites": 3, "dp": True, "target-epsilon": TARGET_EPSILON, "accountant": "rdp",
              "batch-size": 16, "eval-pairs": 100, "eval-faces": 16, "run-dir": str(run_dir),
              "cache-dir": str(cache_dir), "round-timeout": round_timeout, "quorum-timeout": patience(300),
              "planned-rounds": PLANNED_ROUNDS}
    run_id = start_run(netfed.root, netfed.operator, REPO, config)
    logs = [netfed.outs["superlink"], *(netfed.outs[s] for s in SITES)]
    _wait_for(lambda: _received_round(netfed.states["c"]) >= 2 or
              any(r["data"]["round"] >= 2 for r in _audit(run_dir, "round-results")), 300,
              "round 2 did not reach site c", *logs, poll=0.2)
    net.partition("c")
    cut = time.monotonic()
    assert _received_round(netfed.states["c"]) == 2, "site c was cut off after round 2 had ended"
    ids = netfed.node_ids()

    _wait_for(lambda: any(r["data"]["round"] == 2 for r in _audit(run_dir, "round-results")), HEARTBEAT_LAPSE + 60,
              "round 2 did not complete without site c", *logs)
    ended = time.monotonic() - cut
    assert netfed.nodes()[ids["c"]] == "offline"
    time.sleep(max(0.0, round_timeout + 10 - (time.monotonic() - cut)))  # the partition outlasts the round timeout
    assert _audit(run_dir, "round-results")[-1]["data"]["round"] == 2  # round 3 waits for min-sites=3
    net.heal("c")
    status = wait_run(netfed.root, netfed.operator, run_id, timeout=patience(300), poll=5)
    text = run_logs(netfed.root, netfed.operator, run_id)
    assert status == "finished:completed", text[-4000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds) == {0, 1, 2, 3}
    assert set(rounds[1]["sites"]) == set(SITES) and set(rounds[3]["sites"]) == set(SITES), rounds
    assert set(rounds[2]["sites"]) == {"a", "b"} and f"node-{ids['c']}" in rounds[2]["failed"], rounds[2]
    assert "Node Unavailable" in rounds[2]["failed"][f"node-{ids['c']}"]
    assert ended < round_timeout  # Flower's heartbeat lapse, not round-timeout, ended round 2
    results = {r["data"]["round"]: r["data"] for r in _audit(run_dir, "round-results")}
    assert results[2]["aggregated"] == ["a", "b"] and results[3]["aggregated"] == list(SITES)
    server_log = verify_log(run_dir / "audit.jsonl")
    assert server_log.ok, server_log.problems
    for r in (1, 2, 3):
        assert (run_dir / "checkpoints" / f"round-{r:04d}.pt").is_file()
        torch.load(run_dir / "checkpoints" / f"round-{r:04d}.pt", weights_only=True)

    for s in SITES:
        ledger = PrivacyLedger.load(netfed.states[s])
        trained = [r for r in ledger.rounds if r["status"] == "trained"]
        site_log = verify_log(netfed.states[s] / "audit.jsonl", expected_head=results[3]["site_audit_heads"][s])
        assert site_log.ok, site_log.problems
        logged = [json.loads(line)["data"] for line in (netfed.states[s] / "audit.jsonl").read_text().splitlines()
                  if '"round-trained"' in line]
        # The ledger holds every round the site trained, and nothing else: c's round 2 counts although its reply
        # never arrived (its data was used), and the steps add up to the mechanisms accounted.
        assert [r["round"] for r in trained] == [r["round"] for r in logged] == [1, 2, 3], (s, ledger.rounds)
        assert ledger.total_steps == sum(r["steps"] for r in trained)
        assert abs(trained[-1]["epsilon"] - ledger.spent) < 1e-9 and ledger.spent <= TARGET_EPSILON + 1e-6
        assert rounds[3]["sites"][s]["epsilon"] == pytest.approx(ledger.spent, rel=1e-6)
    assert netfed.procs["c"].poll() is None  # the site rode out the partition by itself

    # What the operator sees afterwards: c online again, aggregated in round 3, its ledger (rounds 1, 2 and 3).
    done = subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "deploy", "status", "--deployment",
                           str(netfed.root), "--run", str(run_dir), "--site-state", f"c={netfed.states['c']}"],
                          cwd=REPO, capture_output=True, text=True, timeout=patience(60))
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("  c "))
    assert str(ids["c"]) in line and "online" in line and "round 3" in line and "(1, 2, 3)" in line, done.stdout


def _run_config(run_dir: Path, lfw_root: Path, cache_dir: Path, **changes) -> dict:
    """The README's recipe on small data (compact model, DP, as the partition test), in ``run_dir``."""
    return {"task": "embedding", "model": "compact", "validation-people": 0, "data": str(lfw_root),
            "num-rounds": 2, "min-sites": 3, "dp": True, "target-epsilon": TARGET_EPSILON, "accountant": "rdp",
            "batch-size": 16, "eval-pairs": 100, "eval-faces": 16, "run-dir": str(run_dir),
            "cache-dir": str(cache_dir), "round-timeout": patience(300), "quorum-timeout": patience(300),
            "planned-rounds": PLANNED_ROUNDS, **changes}


def _trained(state: Path) -> list[dict]:
    ledger = PrivacyLedger.load(state)
    return [r for r in ledger.rounds if r["status"] == "trained"] if ledger is not None else []


def _fill(folder: Path) -> Path:
    """Fill the disk holding ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # unbuffered: a write either lands or fails with ENOSPC
            block = b"\0" * size
            try:
                while os.write(fd, block):
                    pass
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return filler


def test_the_servers_disk_fills_during_a_checkpoint_the_run_stops_intact_and_resumes(netfed, lfw_root, cache_dir):
    """The server's run directory is on a small disk, filled to the last byte as soon as round 1's checkpoint is
    written. Round 2 trains at every site, then its results cannot be written: the run stops with one message that
    says the disk is full, which round was lost, that round 1's checkpoint is intact and how to resume; no file is
    half-written (metrics.json parses, the audit chain verifies, no temporary file is left). Once space is freed,
    a run started with resume-from continues from round 1 and finishes.

    What the resumed run cannot equal: a fault-free run's round 2. The sites trained round 2 twice (their privacy
    ledgers count both: the first time their data was used, whatever became of the result), and the second time
    started from the margin head and optimizer state each site kept after the first, so the final model differs
    from a fault-free run's by that second pass; the DP noise of round 2 is drawn from the same seed both times."""
    run_dir = netfed.small_disk / "run"
    before = {s: len(_trained(netfed.states[s])) for s in SITES}
    config = _run_config(run_dir, lfw_root, cache_dir)
    run_id = start_run(netfed.root, netfed.operator, REPO, config)
    logs = [netfed.outs["superlink"], *(netfed.outs[s] for s in SITES)]
    first = run_dir / "checkpoints" / "round-0001.pt"
    _wait_for(lambda: first.is_file(), 300, "round 1 was not checkpointed", *logs, poll=0.1)
    filler = _fill(netfed.small_disk)
    try:
        status = wait_run(netfed.root, netfed.operator, run_id, timeout=patience(300), poll=5)
        text = run_logs(netfed.root, netfed.operator, run_id)
    finally:
        filler.unlink()
    assert status == "finished:failed", text[-4000:]
    assert (f"The disk holding the run directory {run_dir} is full" in text
            and "round 2's results could not be written" in text and "checkpoint of round 1 is intact" in text
            and f"resume-from='{run_dir}'" in text), text[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt"]
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert torch.load(first, weights_only=True)["round"] == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["status"] in ("running", "failed")  # "failed" when that write still found room
    assert verify_log(run_dir / "audit.jsonl").ok
    # Every site trained round 2 before the server's disk failed it: the ledgers count it.
    assert all([r["round"] for r in _trained(netfed.states[s])[before[s]:]] == [1, 2] for s in SITES)

    run_id = start_run(netfed.root, netfed.operator, REPO, {**config, "resume-from": str(run_dir)})
    status = wait_run(netfed.root, netfed.operator, run_id, timeout=patience(300), poll=5)
    assert status == "finished:completed", run_logs(netfed.root, netfed.operator, run_id)[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["status"] == "completed" and metrics["run"]["completed_rounds"] == 2
    assert [r["from_round"] for r in metrics["run"]["resumed"]] == [1]
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert all(set(metrics["rounds"][r]["sites"]) == set(SITES) for r in (1, 2))
    for r in (1, 2):
        assert torch.load(run_dir / "checkpoints" / f"round-{r:04d}.pt", weights_only=True)["round"] == r
    server_log = verify_log(run_dir / "audit.jsonl")
    assert server_log.ok, server_log.problems
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert [e["data"]["resumed_after_round"] for e in events if e["event"] == "run-started"] == [0, 1]
    heads = [e["data"] for e in events if e["event"] == "round-results"][-1]["site_audit_heads"]
    for s in SITES:
        ledger = PrivacyLedger.load(netfed.states[s])
        assert [r["round"] for r in _trained(netfed.states[s])[before[s]:]] == [1, 2, 2]
        assert ledger.total_steps == sum(r["steps"] for r in _trained(netfed.states[s]))
        assert ledger.spent <= TARGET_EPSILON + 1e-6
        assert metrics["rounds"][2]["sites"][s]["epsilon"] == pytest.approx(ledger.spent, rel=1e-6)
        assert verify_log(netfed.states[s] / "audit.jsonl", expected_head=heads[s]).ok


def test_the_superlink_cut_off_from_every_site_for_a_minute_the_sites_reconnect_and_the_run_finishes(
        netfed, lfw_root, cache_dir):
    """The SuperLink's host loses its link for a minute in round 2 (sites and operator cannot reach it; the
    ServerApp, on the SuperLink's host, can). The sites keep retrying by themselves and reconnect when the link is
    back; the rounds that lost replies record why, later rounds wait for the quorum, and the run finishes with all
    three sites aggregated in its last round. Ledgers count exactly what each site trained."""
    net, tmp = netfed.net, netfed.tmp
    run_dir = tmp / "run-superlink-cut"
    before = {s: len(_trained(netfed.states[s])) for s in SITES}
    run_id = start_run(netfed.root, netfed.operator, REPO, _run_config(run_dir, lfw_root, cache_dir,
                                                                       **{"num-rounds": 3}))
    logs = [netfed.outs["superlink"], *(netfed.outs[s] for s in SITES)]
    _wait_for(lambda: any(r["data"]["round"] >= 1 for r in _audit(run_dir, "round-results")), 300,
              "round 1 did not complete", *logs, poll=0.2)
    net.partition("superlink")
    try:
        time.sleep(60)
    finally:
        net.heal("superlink")
    status = wait_run(netfed.root, netfed.operator, run_id, timeout=patience(400), poll=5)
    text = run_logs(netfed.root, netfed.operator, run_id)
    assert status == "finished:completed", text[-4000:]
    assert all(netfed.procs[s].poll() is None for s in SITES)  # nobody restarted a site
    ids, nodes = netfed.node_ids(), netfed.nodes()
    assert all(nodes[ids[s]] == "online" for s in SITES), nodes

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds) == {0, 1, 2, 3}
    assert set(rounds[1]["sites"]) == set(rounds[3]["sites"]) == set(SITES), rounds
    for r in (2, 3):  # every site either replied or is recorded as failed, with Flower's reason
        failed = {s for s in SITES if s in rounds[r]["failed"] or f"node-{ids[s]}" in rounds[r]["failed"]}
        assert set(rounds[r]["sites"]) | failed == set(SITES), rounds[r]
    server_log = verify_log(run_dir / "audit.jsonl")
    assert server_log.ok, server_log.problems
    results = {r["data"]["round"]: r["data"] for r in _audit(run_dir, "round-results")}
    for s in SITES:
        trained = [r["round"] for r in _trained(netfed.states[s])[before[s]:]]
        logged = [json.loads(line)["data"]["round"] for line in
                  (netfed.states[s] / "audit.jsonl").read_text().splitlines() if '"round-trained"' in line]
        assert trained == logged[len(logged) - len(trained):] and trained[0] == 1 and trained[-1] == 3, (s, trained)
        assert all(r in trained for r in (1, 3)) and s in results[3]["aggregated"]
        assert verify_log(netfed.states[s] / "audit.jsonl", expected_head=results[3]["site_audit_heads"][s]).ok
    for r in (1, 2, 3):
        torch.load(run_dir / "checkpoints" / f"round-{r:04d}.pt", weights_only=True)


def test_a_site_on_a_1_mbit_link_is_waited_for_within_round_timeout_and_left_out_after_it(netfed, lfw_root,
                                                                                          cache_dir):
    """Site c's link is limited to 1 Mbit/s both ways (tc tbf); the model is 2.8 MB, so c needs at least
    2 x 22 s on the wire per round. With a round-timeout above that the round waits for c and aggregates all three
    (a log line says how long it waited); with round-timeout below it, a and b are aggregated and c is left out
    after the timeout, with a log line naming it and the reason in metrics.json. If c got to train that round, its
    ledger counts it (its data was used) although the server never saw its update."""
    net, tmp = netfed.net, netfed.tmp
    from common.config import RunConfig
    from common.models.federated import build_models

    model = build_models(RunConfig.from_mapping(_run_config(tmp, lfw_root, cache_dir)))
    update_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert update_bytes > 2_500_000  # several MB: 20 s or more at 1 Mbit/s, each way
    on_the_wire = 2 * update_bytes * 8 / 1e6  # seconds, model down and update up, at 1 Mbit/s
    ids = netfed.node_ids()
    net.limit("c", rate="1mbit")
    try:
        outcomes = {}
        for name, timeout in (("waits", patience(300)), ("leaves-out", on_the_wire * 0.6)):
            run_dir = tmp / f"run-slow-{name}"
            before = len(_trained(netfed.states["c"]))
            run_id = start_run(netfed.root, netfed.operator, REPO, _run_config(
                run_dir, lfw_root, cache_dir, **{"num-rounds": 1, "round-timeout": timeout}))
            status = wait_run(netfed.root, netfed.operator, run_id, timeout=patience(400), poll=5)
            text = run_logs(netfed.root, netfed.operator, run_id)
            assert status == "finished:completed", text[-4000:]
            metrics = json.loads((run_dir / "metrics.json").read_text())
            outcomes[name] = (metrics["rounds"][1], text, before)
    finally:
        net.unlimit("c")
    waited, text, before = outcomes["waits"]
    assert set(waited["sites"]) == set(SITES) and not waited["failed"], waited
    line = next(ln for ln in text.splitlines() if "round 1: 3 of 3 sites replied; the round waited" in ln)
    assert float(line.split("waited ")[1].split(" s")[0]) >= on_the_wire * 0.9, line  # it did wait for c's link
    assert [r["round"] for r in _trained(netfed.states["c"])[before:before + 1]] == [1]

    left_out, text, before = outcomes["leaves-out"]
    assert set(left_out["sites"]) == {"a", "b"}, left_out
    # Named by its node id: the run's first round, and a ServerApp knows site names only from their replies.
    assert left_out["failed"] == {f"node-{ids['c']}": f"no reply within round-timeout ({on_the_wire * 0.6:g} s): "
                                                      "left out of this round"}, left_out
    assert f"node {ids['c']} sent no reply within round-timeout" in text, text[-4000:]
    assert "round 1: 2 of 3 sites replied" in text
    # Whether c trained that round depends on how far its download got before the run ended (a SuperNode ignores a
    # message of a finished run): its ledger holds the round exactly when its audit log says it trained it.
    trained_c = [r["round"] for r in _trained(netfed.states["c"])[before:]]
    logged = [json.loads(line)["data"]["round"] for line in
              (netfed.states["c"] / "audit.jsonl").read_text().splitlines() if '"round-trained"' in line]
    assert trained_c in ([], [1]) and logged[len(logged) - len(trained_c):] == trained_c


def test_a_sites_key_rotated_it_reconnects_with_the_new_key_and_keeps_its_ledger(netfed, lfw_root, cache_dir):
    """`facefl deploy rotate-site-key b` and SIGHUP: the SuperLink unregisters b's old node and registers the new
    key (a new node id, the old one kept in nodes.json); b's running SuperNode, still on the old key, is refused
    and `facefl site` exits 3; restarted with the new key and the same state folder, b trains the next run and its
    privacy ledger goes on from where it was."""
    tmp, out = netfed.tmp, netfed.outs["superlink"]
    old_id = netfed.node_ids()["b"]
    before = _trained(netfed.states["b"])
    ledger = PrivacyLedger.load(netfed.states["b"])  # None when no earlier test of this file ran
    spent = ledger.spent if ledger is not None else 0.0
    done = subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "deploy", "rotate-site-key", "b",
                           "--deployment", str(netfed.root), "--by", "ops@hospital-b"],
                          cwd=REPO, capture_output=True, text=True, timeout=patience(60))
    assert done.returncode == 0, done.stderr
    os.kill(netfed.procs["superlink"].pid, signal.SIGHUP)
    _wait_for(lambda: netfed.node_ids()["b"] != old_id, 60, "SIGHUP did not register b's new key", out)
    _wait_for(lambda: netfed.procs["b"].poll() is not None, 120, "b's old key was not refused",
              netfed.outs["b"], out)
    assert netfed.procs["b"].returncode == 3, netfed.outs["b"].read_text()[-3000:]
    _start_site(netfed, "b")
    new_id = netfed.node_ids()["b"]
    _wait_for(lambda: netfed.nodes().get(new_id) == "online", 120, "b did not connect with its new key",
              netfed.outs["b"], poll=3)
    assert netfed.nodes()[old_id] == "unregistered"
    entry = json.loads((netfed.state / "nodes.json").read_text())["nodes"]["b"]
    assert entry["previous_node_ids"] == [old_id] and entry["node_id"] == new_id
    retired = [json.loads(line)["data"] for line in (netfed.state / "audit.jsonl").read_text().splitlines()
               if '"site-key-retired"' in line]
    assert [r["node_id"] for r in retired] == [old_id] and verify_log(netfed.state / "audit.jsonl").ok

    run_dir = tmp / "run-rotated"
    run_id = start_run(netfed.root, netfed.operator, REPO, _run_config(run_dir, lfw_root, cache_dir,
                                                                       **{"num-rounds": 1}))
    status = wait_run(netfed.root, netfed.operator, run_id, timeout=patience(300), poll=5)
    assert status == "finished:completed", run_logs(netfed.root, netfed.operator, run_id)[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["rounds"][1]["sites"]) == set(SITES)
    ledger = PrivacyLedger.load(netfed.states["b"])
    assert _trained(netfed.states["b"])[:len(before)] == before and len(_trained(netfed.states["b"])) == \
        len(before) + 1
    assert ledger.spent > spent and metrics["rounds"][1]["sites"]["b"]["epsilon"] == pytest.approx(ledger.spent)


def test_a_site_revoked_mid_run_is_refused_and_the_run_goes_on_with_the_rest(netfed, lfw_root, cache_dir):
    """The operator revokes site c during round 2 (`facefl deploy revoke-site c --by ... --reason ...`, then SIGHUP
    to `facefl superlink`). The SuperLink unregisters c's node, which disconnects it and refuses its next
    connection; the run goes on with a and b (min-sites 2) and completes. The deployment's audit log and the
    SuperLink's record who revoked c and when; `facefl deploy status` shows it. Last in this file: c stays out."""
    tmp = netfed.tmp
    run_dir = tmp / "run-revoke"
    before = {s: len(_trained(netfed.states[s])) for s in SITES}
    ids = netfed.node_ids()
    run_id = start_run(netfed.root, netfed.operator, REPO, _run_config(run_dir, lfw_root, cache_dir, **{
        "num-rounds": 3, "min-sites": 2}))
    logs = [netfed.outs["superlink"], *(netfed.outs[s] for s in SITES)]
    _wait_for(lambda: any(r["data"]["round"] >= 1 for r in _audit(run_dir, "round-results")), 300,
              "round 1 did not complete", *logs, poll=0.2)
    revoked = subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "deploy", "revoke-site", "c",
                              "--deployment", str(netfed.root), "--by", "dr.lee@hospital-a",
                              "--reason", "left the consortium"],
                             cwd=REPO, capture_output=True, text=True, timeout=patience(60))
    assert revoked.returncode == 0 and "by dr.lee@hospital-a" in revoked.stdout, revoked.stderr
    os.kill(netfed.procs["superlink"].pid, signal.SIGHUP)
    out = netfed.outs["superlink"]
    _wait_for(lambda: "unregistered site c" in out.read_text(), 60, "SIGHUP did not apply the revocation",
              out)
    status = wait_run(netfed.root, netfed.operator, run_id, timeout=patience(300), poll=5)
    text = run_logs(netfed.root, netfed.operator, run_id)
    assert status == "finished:completed", text[-4000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert set(rounds) == {0, 1, 2, 3} and set(rounds[1]["sites"]) == set(SITES)
    assert set(rounds[3]["sites"]) == {"a", "b"} and not rounds[3]["failed"], rounds[3]  # c is no longer asked
    assert netfed.nodes()[ids["c"]] == "unregistered"
    # c trained nothing after the revocation (at most the round it was in), and its ledger holds what it trained.
    trained_c = [r["round"] for r in _trained(netfed.states["c"])[before["c"]:]]
    assert trained_c[0] == 1 and set(trained_c) <= {1, 2}, trained_c
    for s in ("a", "b"):
        assert [r["round"] for r in _trained(netfed.states[s])[before[s]:]] == [1, 2, 3]
    assert verify_log(run_dir / "audit.jsonl").ok

    # Who revoked c, when and why: in the operator's log, the SuperLink's log and its node record.
    record = json.loads((netfed.root / "deployment.json").read_text())["revoked"]["c"]
    assert record["revoked_by"] == "dr.lee@hospital-a" and record["reason"] == "left the consortium"
    operator = [json.loads(line) for line in (netfed.root / "audit.jsonl").read_text().splitlines()]
    assert verify_log(netfed.root / "audit.jsonl").ok
    assert [(e["actor"], e["event"], e["data"]["site"]) for e in operator if e["event"] == "site-revoked"] == [
        ("operator:dr.lee@hospital-a", "site-revoked", "c")]  # (the key-rotation test may have logged before)
    superlink = [json.loads(line) for line in (netfed.state / "audit.jsonl").read_text().splitlines()]
    assert verify_log(netfed.state / "audit.jsonl").ok
    unregistered = [e["data"] for e in superlink if e["event"] == "site-unregistered"]
    assert unregistered == [{"site": "c", "node_id": ids["c"], "reason": "revoked", "revoked_at": record["revoked_at"],
                             "revoked_by": "dr.lee@hospital-a", "revoke_reason": "left the consortium"}]
    # c's next request was refused (HTTP 401 at the SuperLink, from c's address); Flower's SuperNode then stops,
    # and `facefl site` says why, records it in the site's audit log and exits non-zero.
    c_address = netfed.net.address("c")
    _wait_for(lambda: netfed.procs["c"].poll() is not None, 120, "site c was not refused",
              netfed.outs["c"], out)
    refused = [line for line in out.read_text().splitlines() if f"{c_address}:" in line and '" 401' in line]
    assert refused, out.read_text()[-3000:]
    assert netfed.procs["c"].returncode == 3, netfed.outs["c"].read_text()[-3000:]
    assert "site c is no longer connected" in netfed.outs["c"].read_text()
    stopped = [json.loads(line) for line in (netfed.states["c"] / "audit.jsonl").read_text().splitlines()
               if '"site-stopped"' in line]
    assert len(stopped) == 1 and verify_log(netfed.states["c"] / "audit.jsonl").ok
    done = subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "deploy", "status", "--deployment",
                           str(netfed.root), "--run", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=patience(60))
    assert done.returncode == 0, done.stderr
    assert "REVOKED" in done.stdout and "by dr.lee@hospital-a (left the consortium)" in done.stdout, done.stdout

