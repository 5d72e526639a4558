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


@dataclass
class NetFederation:
    net: object  # tests/netns.py TestNetwork
    root: Path  # the deployment folder
    state: Path  # the SuperLink's state folder (its host)
    operator: Path  # the operator's folder: flwr-home/config.toml names the SuperLink's network address
    tmp: Path
    data: dict[str, Path]
    states: dict[str, Path]
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
                        {s: tmp / "site-state" / s for s in SITES})
    write_flwr_config(dep, fed.operator, f"{host}:{PORT}")  # the operator dials the SuperLink over the bridge
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
            fed.procs[s] = _start(net, s, [sys.executable, "-m", "simulations.deploy_cli", "site", "--deployment",
                                           dep.root, "--site", s, "--data", fed.data[s], "--state", fed.states[s]],
                                  fed.outs[s])
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
              "num-rounds": 3, "min-sites": 3, "dp": True, "target-epsilon": 50, "accountant": "rdp",
              "batch-size": 16, "eval-pairs": 100, "eval-faces": 16, "run-dir": str(run_dir),
              "cache-dir": str(cache_dir), "round-timeout": round_timeout, "quorum-timeout": patience(300),
              "planned-rounds": 4}
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
        assert abs(trained[-1]["epsilon"] - ledger.spent) < 1e-9 and ledger.spent <= 50 + 1e-6
        assert rounds[3]["sites"][s]["epsilon"] == pytest.approx(ledger.spent, rel=1e-6)
    assert netfed.procs["c"].poll() is None  # the site rode out the partition by itself

    # What the operator sees afterwards: c online again, aggregated in round 3, its ledger (rounds 1, 2 and 3).
    done = subprocess.run([sys.executable, "-m", "simulations.deploy_cli", "deploy", "status", "--deployment",
                           str(netfed.root), "--run", str(run_dir), "--site-state", f"c={netfed.states['c']}"],
                          cwd=REPO, capture_output=True, text=True, timeout=patience(60))
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("  c "))
    assert str(ids["c"]) in line and "online" in line and "round 3" in line and "(1, 2, 3)" in line, done.stdout
