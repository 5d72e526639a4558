"""`facefl deploy status`: certificates' expiry, each site's node status and last contact (from the SuperLink's own
database, written here by Flower's own LinkState code), revocations, the last round a run aggregated each site, and
the sites' privacy ledgers. Files only: no SuperLink runs."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from typer.testing import CliRunner

from client.privacy import PrivacyLedger
from common.audit import AuditLog
from server.deployment.provision import init_deployment, revoke_site
from server.deployment.status import deployment_status, format_status, last_aggregated_rounds, site_state_dirs
from simulations.deploy_cli import deploy_app

SITES = ["a", "b", "c"]


def _superlink_database(path, sites: list[str]) -> dict[str, int]:
    """A SuperLink database made by Flower's own SqlLinkState: every site's node created (as `flwr supernode
    register` does), site a activated and heartbeating (as its SuperNode does). Returns site -> node id."""
    from flwr.server.superlink.linkstate.linkstate_factory import LinkStateFactory
    from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    state = LinkStateFactory(str(path), NoOpFederationManager(), ObjectStoreFactory()).state()
    ids = {s: state.create_node("operator", "operator", f"key-{s}".encode(), 30.0, name=s) for s in sites}
    assert state.activate_node(ids["a"], 30.0) and state.acknowledge_node_heartbeat(ids["a"], 30.0)
    assert state.activate_node(ids["c"], 30.0) and state.deactivate_node(ids["c"])  # c's SuperNode stopped
    return ids


@pytest.fixture
def deployment(tmp_path):
    dep = init_deployment(tmp_path / "dep", "10.20.30.1", SITES)
    revoke_site(dep.root, "c")
    state = dep.superlink_dir / "state"
    state.mkdir()
    ids = _superlink_database(state / "superlink.db", SITES)
    nodes = {s: {"node_id": ids[s], "status": "registered"} for s in SITES}
    nodes["c"].update(status="unregistered", reason="revoked")
    (state / "nodes.json").write_text(json.dumps({"nodes": nodes}))

    ledger = PrivacyLedger.create(site="a", target_epsilon=8.0, target_delta=0.0, accountant="rdp", num_examples=120)
    for r in (1, 3):
        ledger.record_round(r, [(1.1, 0.25, 4)])
    ledger.save(tmp_path / "a-state")
    b_ledger = PrivacyLedger.create(site="b", target_epsilon=8.0, target_delta=0.0, accountant="rdp", num_examples=80)
    b_ledger.record_round(1, [(1.1, 0.25, 4)])
    b_ledger.save(dep.root / "sites" / "b" / "state")  # the bundle's default state-dir, found by itself

    run = tmp_path / "run"
    run.mkdir()
    audit = AuditLog(run / "audit.jsonl", actor="server")
    audit.append("round-results", round=1, aggregated=["a", "b"], declined=[], rejected=[], failed=[])
    audit.append("round-results", round=2, aggregated=["b"], declined=[], rejected=[], failed=["node-1"])
    audit.append("round-results", round=3, aggregated=["a"], declined=[], rejected=[], failed=[])
    return dep, state, ids, ledger, tmp_path


def test_status_reads_nodes_contacts_revocations_ledgers_and_expiry(deployment):
    dep, state, ids, ledger, tmp = deployment
    dirs = site_state_dirs(dep.root, {"a": tmp / "a-state"})
    assert dirs == {"a": tmp / "a-state", "b": dep.root / "sites" / "b" / "state"}
    ledgers = {"a": {**ledger.summary(), "trained_rounds": [1, 3]}}
    now = dt.datetime.now(dt.timezone.utc)
    status = deployment_status(dep.root, run=tmp / "run", ledgers=ledgers, now=now)

    a, b, c = (status.sites[s] for s in SITES)
    assert (a.node_id, a.node_status) == (ids["a"], "online")
    assert abs((now - a.last_contact).total_seconds()) < 30  # the heartbeat just acknowledged
    assert (b.node_status, b.last_contact) == ("registered", None)  # registered, never connected
    assert c.revoked and c.revoked_at and not a.revoked and not b.revoked
    assert c.node_status == "offline" and abs((now - c.last_contact).total_seconds()) < 30  # it signed off just now
    assert a.fingerprint.startswith("SHA256:") and a.fingerprint == dep.fingerprints["a"]
    assert (a.last_aggregated_round, b.last_aggregated_round, c.last_aggregated_round) == (3, 2, None)
    assert a.ledger["epsilon"] == pytest.approx(ledger.spent) and b.ledger is None
    assert status.nodes_source == str(state / "superlink.db")

    certs = {c.what: c for c in status.certificates}
    assert set(certs) == {"CA", "SuperLink TLS"}
    assert 3649 < certs["CA"].days_left < 3651 and 824 < certs["SuperLink TLS"].days_left < 826
    assert {c.state for c in certs.values()} == {"valid"}

    text = format_status(status)
    assert "10.20.30.1:8000" in text and "REVOKED" in text and "revoked at" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("a "))
    assert "online" in line and "round 3" in line and f"epsilon {ledger.spent:.2f} of 8" in line and "(1, 3)" in line


def test_a_node_whose_heartbeat_lapsed_is_offline_and_certificates_expire(deployment):
    dep, _, _, _, _ = deployment
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=800)
    status = deployment_status(dep.root, now=later)
    assert status.sites["a"].node_status == "offline"  # online_until (2 x 30 s after its heartbeat) has passed
    assert {c.what: c.state for c in status.certificates} == {"CA": "valid", "SuperLink TLS": "expires soon"}
    status = deployment_status(dep.root, now=later + dt.timedelta(days=30))
    assert {c.what: c.state for c in status.certificates}["SuperLink TLS"] == "EXPIRED"
    assert "EXPIRED" in format_status(status) and "days ago" in format_status(status)


def test_the_command_prints_the_status_and_finds_the_site_ledgers(deployment):
    dep, state, _, ledger, tmp = deployment
    done = CliRunner().invoke(deploy_app, ["status", "--deployment", str(dep.root), "--run", str(tmp / "run"),
                                           "--site-state", f"a={tmp / 'a-state'}"])
    assert done.exit_code == 0, done.output
    lines = {ln.split()[0]: ln for ln in done.output.splitlines()[1:] if ln.strip() and ln.startswith("  ")}
    assert "online" in lines["a"] and "(1, 3)" in lines["a"]
    assert "epsilon" in lines["b"] and "1 rounds trained (1)" in lines["b"]  # its bundle's state-dir
    assert "REVOKED" in lines["c"]
    bad = CliRunner().invoke(deploy_app, ["status", "--deployment", str(dep.root), "--site-state", "a"])
    assert bad.exit_code != 0 and "NAME=PATH" in str(bad.exception)


def test_without_the_superlink_state_status_still_reports_the_deployment(tmp_path):
    dep = init_deployment(tmp_path / "dep", "superlink.example.org", ["a"])
    status = deployment_status(dep.root)
    assert status.nodes_source == "" and status.sites["a"].node_status == "not registered"
    assert "SuperLink state: not found" in format_status(status)
    with pytest.raises(FileNotFoundError, match="pass --run"):
        last_aggregated_rounds(tmp_path / "nothing")
