"""App approval at a site, without a federation: the signed approvals file, signed apps, the decision the gate
takes, the operator's commands and their errors. Real keys, real bundles built by Flower from real folders; the
end-to-end check with real processes is tests/test_app_approval_e2e.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import patience

from client import app_gate
from client.app_approval import (APPROVALS_FILE, OPERATOR_KEY, OPERATOR_PUB, AppApprovalError, approve, fab_info,
                                 judge, load_approvals, read_app, read_trusted_keys, revoke)
from client.supernode import SiteSettings, app_policy, launcher_argv, resolve_site, supernode_argv
from common.app_signature import SIGNATURE_FILE, verify_app_signature
from common.audit import verify_log
from common.deployment import app_refused_reason, refusing_site
from server.deployment.provision import init_deployment, sign_app

REPO = Path(__file__).resolve().parents[1]


def _tiny_app(folder: Path, body: str = "VALUE = 1\n") -> Path:
    """A small but valid Flower app folder."""
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client_app.py").write_text(body + "app = None\n")
    (folder / "tinyapp" / "server_app.py").write_text("app = None\n")
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "hospital-it"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tinyapp.server_app:app"\nclientapp = "tinyapp.client_app:app"\n\n'
        '[tool.flwr.app.config]\nnum-rounds = 1\n')
    return folder


@pytest.fixture()
def app(tmp_path):
    return _tiny_app(tmp_path / "app")


def test_a_folder_is_read_as_the_bundle_flower_builds(app):
    from flwr.cli.build import build_fab_from_disk

    content, info = read_app(app)
    assert content == build_fab_from_disk(app) and info.sha256 == hashlib.sha256(content).hexdigest()
    assert (info.name, info.version, info.publisher, info.fab_id) == ("tinyapp", "1.0.0", "hospital-it",
                                                                      "hospital-it/tinyapp")
    assert "tinyapp/client_app.py" in dict(info.files) and info.sha256 in info.describe()
    fab = app.parent / "tinyapp.fab"
    fab.write_bytes(content)
    assert read_app(fab) == (content, info)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no pyproject.toml"),
    (lambda p: (p / "x.fab").write_bytes(b"not a zip") and p / "x.fab", "is not a Flower app bundle"),
])
def test_bad_apps_give_one_clear_line(tmp_path, make, message):
    with pytest.raises(AppApprovalError, match=message) as err:
        read_app(make(tmp_path))
    assert "\n" not in str(err.value)


def test_approved_apps_run_others_are_refused_and_revocation_holds(tmp_path, app):
    state = tmp_path / "state"
    content, info = read_app(app)
    other, _ = read_app(_tiny_app(tmp_path / "other", "VALUE = 2\n"))
    assert judge(content, site="a", state=state).allowed  # nothing configured: runs unchecked
    assert "runs unchecked" in judge(content, site="a", state=state).reason
    assert not judge(content, site="a", state=state, required=True).allowed

    approve(state, "a", content, note="reviewed by IT")
    assert (state / OPERATOR_KEY).stat().st_mode & 0o077 == 0
    yes, no = judge(content, site="a", state=state), judge(other, site="a", state=state)
    assert yes.allowed and "approved at this site" in yes.reason
    assert not no.allowed and "not approved at this site" in no.reason and hashlib.sha256(other).hexdigest() in no.reason
    assert load_approvals(state, "a").apps[info.sha256]["note"] == "reviewed by IT"
    with pytest.raises(AppApprovalError, match="belongs to site 'a'"):
        load_approvals(state, "b")

    revoke(state, "a", info.sha256[:10])
    decision = judge(content, site="a", state=state)
    assert not decision.allowed and "revoked" in decision.reason
    with pytest.raises(AppApprovalError, match="matches no approved app"):
        revoke(state, "a", info.sha256)
    approve(state, "a", content)  # approved again
    assert judge(content, site="a", state=state).allowed and not load_approvals(state, "a").revoked


@pytest.mark.parametrize("damage", ["edit", "own-key", "drop-file", "drop-key"])
def test_a_tampered_approvals_file_refuses_every_app(tmp_path, app, damage):
    state = tmp_path / "state"
    content, info = read_app(app)
    other, other_info = read_app(_tiny_app(tmp_path / "other", "VALUE = 2\n"))
    approve(state, "a", content)
    path = state / APPROVALS_FILE
    doc = json.loads(path.read_text())
    if damage == "edit":  # someone adds an app by hand
        doc["apps"][other_info.sha256] = doc["apps"][info.sha256]
        path.write_text(json.dumps(doc))
    elif damage == "own-key":  # ... and signs it with a key of their own, kept next to the file
        approve(tmp_path / "forger", "a", other)
        forged = json.loads((tmp_path / "forger" / APPROVALS_FILE).read_text())
        path.write_text(json.dumps(forged))
    elif damage == "drop-file":
        path.unlink()
    else:
        (state / OPERATOR_PUB).unlink()
    for fab in (content, other):
        decision = judge(fab, site="a", state=state)
        assert not decision.allowed and "every app is refused" in decision.reason, decision.reason


def test_the_operator_key_can_live_elsewhere_and_must_match(tmp_path, app):
    state, key = tmp_path / "state", tmp_path / "usb" / "operator.key"
    content, info = read_app(app)
    approve(state, "a", content, operator_key=key)
    assert key.is_file() and not (state / OPERATOR_KEY).exists()
    with pytest.raises(AppApprovalError, match="No operator key"):
        revoke(state, "a", info.sha256)  # the default key is not there
    approve(tmp_path / "elsewhere", "a", content)
    with pytest.raises(AppApprovalError, match="is not the key of"):
        approve(state, "a", content, operator_key=tmp_path / "elsewhere" / OPERATOR_KEY)
    revoke(state, "a", info.sha256, operator_key=key)


def test_signed_apps_run_where_the_signing_key_is_trusted(tmp_path, app):
    dep = init_deployment(tmp_path / "dep", "127.0.0.1", ["a"])
    keys = read_trusted_keys(dep.site("a").trusted_entities)
    signature, sha256 = sign_app(dep.root, app)
    assert signature == app / SIGNATURE_FILE
    content, info = read_app(app)
    assert info.sha256 == sha256 and verify_app_signature(content, keys) == dep.signing_key_id
    decision = judge(content, site="a", state=tmp_path / "state", trusted_keys=keys)
    assert decision.allowed and "signed by the federation's app-signing key" in decision.reason
    # Not trusted at a site that did not opt in (and approved nothing, but requires approval).
    assert not judge(content, site="a", state=tmp_path / "state", required=True).allowed
    # Another deployment's key does not verify it.
    other = init_deployment(tmp_path / "other", "127.0.0.1", ["a"])
    assert verify_app_signature(content, read_trusted_keys(other.site("a").trusted_entities)) is None
    # One byte changed in one file voids the signature.
    code = app / "tinyapp" / "client_app.py"
    code.write_text(code.read_text().replace("VALUE = 1", "VALUE = 2"))
    changed, _ = read_app(app)
    decision = judge(changed, site="a", state=tmp_path / "state", trusted_keys=keys)
    assert not decision.allowed and "not signed by a trusted key" in decision.reason


def test_the_gate_checks_the_bytes_it_received_and_records_its_decision(tmp_path, app, capfd):
    state = tmp_path / "state"
    content, info = read_app(app)
    approve(state, "c", read_app(_tiny_app(tmp_path / "other", "VALUE = 2\n"))[0])
    wrong = app_gate.check_fab("0" * 64, content, site="c", state=state, trusted_keys=None, required=False)
    assert not wrong.allowed and "is not the one the run names" in wrong.reason
    decision = app_gate.check_fab(info.sha256, content, site="c", state=state, trusted_keys=None, required=False)
    assert not decision.allowed
    app_gate.record(decision, site="c", state=state, run_id=42, fab_hash=info.sha256)
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "site c REFUSED run 42" in lines[0] and info.sha256 in lines[0]
    log = verify_log(state / "audit.jsonl")
    assert log.ok and log.events == {"app-refused": 1}
    entry = json.loads((state / "audit.jsonl").read_text().splitlines()[-1])["data"]
    assert (entry["run_id"], entry["fab_hash"], entry["app"]) == (42, info.sha256, "hospital-it/tinyapp 1.0.0")
    reason = app_refused_reason("c", decision.reason)
    assert refusing_site(reason) == "c" and refusing_site("ClientApp raised an exception") is None


def test_the_gate_runs_the_apps_own_modules_not_the_sites(tmp_path, monkeypatch):
    """Before the app is loaded, the runner forgets the site's modules whose names the app also defines."""
    installed = tmp_path / "installed"
    (installed / "client").mkdir(parents=True)
    (installed / "client" / "__init__.py").write_text("")
    (installed / "helper.py").write_text("")
    (installed / "README.md").write_text("")
    for name in ("client.fake_mod", "helper", "unrelated_mod"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    app_gate._forget_shadowed_modules(installed)
    assert "client.fake_mod" not in sys.modules and "client" not in sys.modules and "helper" not in sys.modules
    assert "unrelated_mod" in sys.modules


def test_a_site_without_approvals_warns_loudly_and_runs_its_apps_through_the_gate(tmp_path, lfw_root):
    dep = init_deployment(tmp_path / "dep", "127.0.0.1", ["a"])
    faces = tmp_path / "faces" / "person"
    faces.mkdir(parents=True)
    for src in sorted((lfw_root / "Aaron_Peirsol").glob("*.jpg"))[:2]:
        (faces / src.name).symlink_to(src)
    settings = resolve_site(dep.root, "a", data=faces.parent, state=tmp_path / "state")
    assert "RUNS ANY APP THE SERVER SENDS" in app_policy(settings)
    argv = supernode_argv(settings)
    assert argv[argv.index("--isolation") + 1] == "process"
    assert launcher_argv(settings)[1:3] == ["-m", "client.app_launcher"]
    content, _ = read_app(_tiny_app(tmp_path / "app"))
    approve(settings.state, "a", content)
    assert "runs only apps its operator approved" in app_policy(settings)
    bundle = dep.site("a").config
    bundle.write_text(bundle.read_text().replace("trust-signed-apps = false", "trust-signed-apps = true"))
    trusting = resolve_site(dep.root, "a", data=faces.parent, state=tmp_path / "fresh")
    assert trusting.signing_keys == dep.site("a").trusted_entities
    assert "--trusted-keys" in launcher_argv(trusting) and "signed by the keys" in app_policy(trusting)
    required = SiteSettings(**{**trusting.__dict__, "signing_keys": None, "require_approved_apps": True})
    assert "every app is refused until" in app_policy(required)


def _cli(*args) -> subprocess.CompletedProcess:
    """The deployment commands as an operator runs them (`facefl site|deploy ...` without the rest of the CLI)."""
    return subprocess.run([sys.executable, "-m", "simulations.deploy_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=patience(60), env=dict(os.environ))


def test_operator_commands(tmp_path, app):
    dep = init_deployment(tmp_path / "dep", "127.0.0.1", ["a"])
    bundle = tmp_path / "bundle-a"
    shutil.copytree(dep.site("a").path, bundle)  # what the site received
    site = ["--deployment", bundle, "--site", "a"]
    state = bundle / "state"  # site.toml's state-dir

    listed = _cli("site", "approvals", *site)
    assert listed.returncode == 0 and "runs any app the server sends" in listed.stdout
    approved = _cli("site", "approve", app, *site, "--yes", "--note", "ticket 7")
    _, info = read_app(app)
    assert approved.returncode == 0 and "tinyapp/client_app.py" in approved.stdout, approved.stderr
    assert f"sha256 {info.sha256}" in approved.stdout and (state / APPROVALS_FILE).is_file()
    listed = _cli("site", "approvals", *site)
    assert listed.returncode == 0 and "1 approved, 0 revoked (signature checked)" in listed.stdout and info.sha256 in listed.stdout
    revoked = _cli("site", "revoke", info.sha256[:12], *site)
    assert revoked.returncode == 0 and "Revoked tinyapp 1.0.0" in revoked.stdout, revoked.stderr
    assert verify_log(state / "audit.jsonl").events == {"app-approved": 1, "app-revoked": 1}

    (state / APPROVALS_FILE).write_text((state / APPROVALS_FILE).read_text().replace("ticket 7", "ticket 8"))
    for args in (("site", "approvals", *site), ("site", "approve", tmp_path / "nowhere", *site, "--yes"),
                 ("site", "--site", "a")):
        done = _cli(*args)
        assert done.returncode == 2 and done.stderr.startswith("error: "), (args, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(ValueError, match="has no pyproject.toml"):
        sign_app(dep.root, tmp_path / "nowhere")
    signed = _cli("deploy", "sign-app", app, "--deployment", dep.root)
    assert signed.returncode == 0 and (app / SIGNATURE_FILE).is_file(), signed.stderr
    shown = _cli("site", "show", app)
    assert shown.returncode == 0 and SIGNATURE_FILE in shown.stdout and "hospital-it" in shown.stdout
    assert fab_info(read_app(app)[0]).sha256 in signed.stdout
