"""``facefl deploy``: the CA, TLS and key material for a SuperLink and its sites, checked with Flower's own loaders."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import typer
from conftest import patience
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner

from common.audit import verify_log
from server.deployment import provision
from server.deployment.provision import (ProvisionError, add_site, init_deployment, load_deployment, revoke_site,
                                         rotate_server_certificate, rotate_site_key, sign_fab)
from simulations.deploy_cli import deploy_app

SITES = ["a", "b", "c"]
HOST = "superlink.hospital.example"


@pytest.fixture()
def dep(tmp_path):
    return init_deployment(tmp_path / "dep", HOST, SITES)


def _private_files(root: Path) -> list[Path]:
    return [root / "ca/ca.key", root / "superlink/server.key", root / "app-signing/app-signing.key",
            *sorted(root.glob("sites/*/supernode.key"))]


def _flower_node_keys(key_file: Path):
    """The SuperNode's key pair exactly as ``flower-supernode --auth-supernode-private-key`` loads it."""
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(auth_supernode_private_key=str(key_file), auth_supernode_public_key=None)
    return _try_setup_client_authentication(args)


def _flower_trusted_entities(path: Path) -> dict[str, str]:
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    entities = _try_obtain_trusted_entities(path)
    _validate_public_keys_ed25519(entities)
    return entities


def test_file_modes(dep):
    for path in _private_files(dep.root):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, (path, oct(mode))
    for path in [dep.ca_cert, dep.server_cert, dep.superlink_ca_cert, dep.signing_public_key, dep.trusted_entities,
                 *dep.allow_list().values(), dep.root / "deployment.json",
                 *(p for n in SITES for p in (dep.site(n).public_key, dep.site(n).config, dep.site(n).ca_cert))]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for folder in [dep.root, dep.root / "ca", dep.root / "app-signing", dep.superlink_dir,
                   *(dep.site(n).path for n in SITES)]:
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0, folder
    assert not list(dep.root.rglob("*.tmp")) and not list(dep.root.parent.glob(".dep.*"))


@pytest.mark.parametrize("host", ["superlink.hospital.example", "10.20.30.40", "fd00::5"])
def test_server_certificate(tmp_path, host):
    dep = init_deployment(tmp_path / "dep", host, SITES, extra_sans=["backup.hospital.example"])
    ca = x509.load_pem_x509_certificate(dep.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(dep.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert cert.signature_hash_algorithm.name == "sha256"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        assert host in san.get_values_for_type(x509.DNSName)
        subject: x509.GeneralName = x509.DNSName(host)
    else:
        assert ip in san.get_values_for_type(x509.IPAddress)
        assert host not in san.get_values_for_type(x509.DNSName)
        subject = x509.IPAddress(ip)
    # The SuperLink's own SuperExec dials 127.0.0.1 with the same CA.
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "backup.hospital.example" in san.get_values_for_type(x509.DNSName)
    # Full RFC 5280 path validation for the name the sites dial, and for a name the certificate lacks.
    store = Store([x509.load_pem_x509_certificate(dep.site("a").ca_cert.read_bytes())])
    PolicyBuilder().store(store).build_server_verifier(subject).verify(cert, [])
    with pytest.raises(Exception):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.example")).verify(cert, [])
    assert (dep.superlink_address == f"[{host}]:8000") == (":" in host)


def test_site_bundles_hold_only_their_own_key(dep):
    secrets_ = {"ca": dep.ca_key.read_bytes(), "server": dep.server_key.read_bytes(),
                "signing": dep.signing_private_key.read_bytes()}
    site_keys = {n: dep.site(n).private_key.read_bytes() for n in SITES}
    site_pubs = {n: dep.allow_list()[n].read_bytes().split()[1] for n in SITES}
    assert len(set(site_keys.values())) == len(SITES) and len(set(site_pubs.values())) == len(SITES)
    for name in SITES:
        bundle = dep.site(name).path
        files = {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
        assert set(files) == {"ca.crt", "supernode.key", "supernode.pub", "trusted-entities.yaml", "site.toml"}
        blob = b"\n".join(files.values())
        for label, secret in secrets_.items():
            assert secret not in blob, (name, label)
        for other in SITES:
            if other != name:
                assert site_keys[other] not in blob and site_pubs[other] not in blob, (name, other)
        assert files["supernode.key"] == site_keys[name]
        assert blob.count(b"PRIVATE KEY") == 2  # one BEGIN/END pair: its own key only
        own = serialization.load_ssh_private_key(files["supernode.key"], None)
        for other in SITES:  # none of the others' key numbers either, whatever the encoding
            key = serialization.load_ssh_private_key(site_keys[other], None)
            assert (key.private_numbers() == own.private_numbers()) == (other == name)


def test_site_keys_load_with_flower_and_are_allowed(dep):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    allowed = {try_load_public_key(path) for path in dep.allow_list().values()}  # what `flwr supernode register` sends
    for name in SITES:
        private, public = _flower_node_keys(dep.site(name).private_key)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
        assert public_key_to_bytes(public) in allowed
        assert try_load_public_key(dep.site(name).public_key) == public_key_to_bytes(public)
        fingerprint = json.loads((dep.root / "deployment.json").read_text())["sites"][name]["fingerprint"]
        assert fingerprint == dep.fingerprints[name] and fingerprint.startswith("SHA256:")


def test_trusted_entities_and_app_signing(dep):
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    signing = serialization.load_ssh_private_key(dep.signing_private_key.read_bytes(), None)
    assert isinstance(signing, ed25519.Ed25519PrivateKey)
    public_line = dep.signing_public_key.read_text().split()
    for name in SITES:
        entities = _flower_trusted_entities(dep.site(name).trusted_entities)
        assert list(entities) == [dep.signing_key_id]
        assert entities[dep.signing_key_id].split()[:2] == public_line[:2]
    signing.public_key().verify(signing.sign(b"facefl"), b"facefl")

    entities = _flower_trusted_entities(dep.site("a").trusted_entities)
    fab = b"a flower app bundle"
    verifications = sign_fab(fab, dep.signing_private_key, dep.signing_key_id)
    assert _verify_fab(Fab(hashlib.sha256(fab).hexdigest(), fab, verifications), entities)
    assert not _verify_fab(Fab(hashlib.sha256(b"x").hexdigest(), b"tampered", verifications), entities)
    assert not _verify_fab(Fab("", fab, sign_fab(fab, dep.signing_private_key, "fpk_other")), entities)
    with pytest.raises(ProvisionError):
        sign_fab(fab, dep.site("a").private_key, dep.signing_key_id)


def test_site_config_template(dep):
    config = tomllib.loads(dep.site("b").config.read_text())
    assert config["site-name"] == "b"
    assert config["superlink"] == f"{HOST}:8000" == dep.superlink_address
    assert config["data-path"] == "/path/to/this/site's/faces"
    for key in ("root-certificates", "auth-supernode-private-key", "trusted-entities"):
        assert (dep.site("b").path / config[key]).is_file()
    assert config["state-dir"] and config["require-signed-apps"] is False and config["require-secure-aggregation"] is False
    connection = tomllib.loads(dep.connection_file.read_text())["superlink"]["facefl"]
    assert connection == {"address": f"{HOST}:8000", "root-certificates": str(dep.superlink_ca_cert)}


def test_add_then_revoke(dep):
    bundle = add_site(dep.root, "d")
    after_add = load_deployment(dep.root)
    assert after_add.sites == ("a", "b", "c", "d") and bundle == after_add.site("d").path
    assert after_add.allow_list()["d"].is_file()
    assert stat.S_IMODE(after_add.site("d").private_key.stat().st_mode) == 0o600
    _flower_node_keys(after_add.site("d").private_key)
    assert after_add.site("d").trusted_entities.read_bytes() == dep.trusted_entities.read_bytes()

    old_key = dep.site("b").private_key.read_bytes()
    record = revoke_site(dep.root, "b", by="dr.lee@hospital-a", reason="left the consortium")
    after = load_deployment(dep.root)
    assert after.sites == ("a", "c", "d") and "b" in after.revoked
    assert after.revoked["b"]["fingerprint"] == dep.fingerprints["b"] and after.revoked["b"]["revoked_at"]
    assert after.revoked["b"] == record and record["revoked_by"] == "dr.lee@hospital-a"
    # The operator's audit log: who added and who revoked which key, when and why, hash-chained.
    log = verify_log(dep.root / "audit.jsonl")
    assert log.ok, log.problems
    entries = [json.loads(line) for line in (dep.root / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["data"]["site"]) for e in entries] == [("site-added", "d"), ("site-revoked", "b")]
    revoked = entries[1]
    assert revoked["actor"] == "operator:dr.lee@hospital-a" and revoked["data"]["reason"] == "left the consortium"
    assert revoked["data"]["fingerprint"] == dep.fingerprints["b"]
    assert revoked["data"]["revoked_at"] == record["revoked_at"]
    assert entries[0]["actor"].startswith("operator:") and "@" in entries[0]["actor"]  # user@host by default
    assert not (dep.allow_list_dir / "b.pub").exists()
    assert sorted(p.name for p in dep.allow_list_dir.iterdir()) == ["a.pub", "c.pub", "d.pub"]
    assert not (dep.root / "sites" / "b").exists()
    assert all(old_key not in p.read_bytes() for p in dep.root.rglob("*") if p.is_file())
    with pytest.raises(ProvisionError, match="revoked"):
        after.site("b")
    with pytest.raises(ProvisionError, match="revoked"):
        add_site(dep.root, "b")
    with pytest.raises(ProvisionError, match="already revoked"):
        revoke_site(dep.root, "b")
    with pytest.raises(ProvisionError, match="already exists"):
        add_site(dep.root, "a")
    with pytest.raises(ProvisionError, match="No site"):
        revoke_site(dep.root, "zz")


def test_init_refuses_existing(dep, tmp_path):
    before = (dep.root / "deployment.json").read_bytes()
    with pytest.raises(ProvisionError, match="add-site"):
        init_deployment(dep.root, HOST, ["x"])
    assert (dep.root / "deployment.json").read_bytes() == before
    (tmp_path / "empty").mkdir()
    assert init_deployment(tmp_path / "empty", HOST, ["x"]).sites == ("x",)
    with pytest.raises(FileNotFoundError, match="deploy init"):
        add_site(tmp_path / "nowhere", "x")


@pytest.mark.parametrize("name", ["", "A", "-a", "a_b", "a.b", "../x", "a b", "a" * 64, "é"])
def test_invalid_site_names(tmp_path, dep, name):
    with pytest.raises(ProvisionError, match="Invalid site name"):
        init_deployment(tmp_path / "new", HOST, [name])
    with pytest.raises(ProvisionError, match="Invalid site name"):
        add_site(dep.root, name)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("host", ["https://x.example", "x.example:8000", "", "bad_host", "a..b"])
def test_invalid_hosts_and_duplicates(tmp_path, host):
    with pytest.raises(ProvisionError, match="server-host"):
        init_deployment(tmp_path / "new", host, ["a"])
    with pytest.raises(ProvisionError, match="already exists"):
        init_deployment(tmp_path / "new", HOST, ["a", "a"])
    assert "a" * 63 in init_deployment(tmp_path / "ok", HOST, ["a" * 63]).sites


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(provision, "_site_toml", boom)  # after the CA, server and the first site's keys
    with pytest.raises(RuntimeError):
        init_deployment(tmp_path / "dep", HOST, SITES)
    assert list(tmp_path.iterdir()) == []


def test_add_site_failure_leaves_deployment_unchanged(dep, monkeypatch):
    snapshot = {p: p.read_bytes() for p in dep.root.rglob("*") if p.is_file() and p.name != ".lock"}
    monkeypatch.setattr(provision, "_site_toml", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        add_site(dep.root, "d")
    assert {p: p.read_bytes() for p in dep.root.rglob("*") if p.is_file() and p.name != ".lock"} == snapshot
    assert not list(dep.root.rglob("*.tmp"))


def test_cli(tmp_path):
    app = typer.Typer()
    app.add_typer(deploy_app, name="deploy")
    runner = CliRunner()
    out = tmp_path / "dep"
    result = runner.invoke(app, ["deploy", "init", "--server-host", "10.0.0.5", "--sites", "a, b,c",
                                 "--out", str(out), "--san", "superlink.lan"])
    assert result.exit_code == 0, result.output
    assert "facefl superlink --deployment" in result.output and "facefl site --deployment" in result.output
    result = runner.invoke(app, ["deploy", "add-site", "d", "--deployment", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["deploy", "revoke-site", "a", "--deployment", str(out)])
    assert result.exit_code == 0, result.output
    dep = load_deployment(out)
    assert dep.sites == ("b", "c", "d") and list(dep.revoked) == ["a"] and dep.host == "10.0.0.5"
    result = runner.invoke(app, ["deploy", "init", "--server-host", "10.0.0.5", "--sites", "x", "--out", str(out)])
    assert isinstance(result.exception, ValueError) and "add-site" in str(result.exception)
    result = runner.invoke(app, ["deploy", "add-site", "Bad_Name", "--deployment", str(out)])
    assert isinstance(result.exception, ValueError)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is this process and its children
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_real_superlink_accepts_the_files(tmp_path):
    """flower-superlink serves our TLS files; a registered site's key activates, an unregistered one is refused."""
    bindir = Path(sys.executable).parent
    if not (bindir / "flower-superlink").is_file():
        pytest.skip("flower-superlink is not installed next to this Python")
    dep = init_deployment(tmp_path / "dep", "127.0.0.1", ["a", "b"])
    port = _free_port()
    log = tmp_path / "superlink.log"
    with log.open("wb") as fh:
        link = subprocess.Popen([bindir / "flower-superlink", "--ssl-ca-certfile", dep.superlink_ca_cert,
                                 "--ssl-certfile", dep.server_cert, "--ssl-keyfile", dep.server_key,
                                 "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
                                 "--isolation", "process"],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    nodes: list[subprocess.Popen] = []
    try:
        import ssl
        import urllib.error
        import urllib.request

        context = ssl.create_default_context(cafile=str(dep.site("a").ca_cert))  # verifies 127.0.0.1 too

        def tls_up() -> bool:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/", context=context, timeout=2)
            except urllib.error.HTTPError:
                return True  # TLS handshake and certificate check passed; / is simply not a route
            except (urllib.error.URLError, OSError):
                return False
            return True

        assert _wait_for(tls_up, patience(60)), log.read_text()[-3000:]

        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(dep.connection_file.read_text().replace(":8000", f":{port}"))
        env = {**os.environ, "FLWR_HOME": str(home)}
        registered = subprocess.run([bindir / "flwr", "supernode", "register", dep.allow_list()["a"], "facefl",
                                     "--name", "a", "--format", "json"],
                                    env=env, capture_output=True, text=True, timeout=patience(120))
        assert registered.returncode == 0, registered.stdout + registered.stderr
        node_id = json.loads(registered.stdout[registered.stdout.index("{"):])["node-id"]

        for name in ("a", "b"):
            nodes.append(subprocess.Popen(
                [bindir / "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                 "--root-certificates", dep.site(name).ca_cert,
                 "--auth-supernode-private-key", dep.site(name).private_key,
                 "--isolation", "process", "--port", str(_free_port()), "--max-retries", "0"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=tmp_path))
        assert _wait_for(lambda: f"Activated node_id={node_id}" in log.read_text(), patience(90)), \
            log.read_text()[-3000:]
        assert nodes[1].wait(timeout=patience(90)) != 0  # site b was never registered: the SuperLink turns it away
        assert "No SuperNode found with the given public key" in log.read_text()
    finally:
        for proc in [*nodes, link]:
            _stop(proc)


def test_rotating_the_superlink_certificate_keeps_the_names_and_the_sites_bundles(dep):
    """A new key and certificate from the same CA, with the same names: the sites' unchanged ca.crt verifies it;
    the old certificate is retired in deployment.json and the rotation is in the operator's audit log."""
    before = load_deployment(dep.root)
    old_cert = x509.load_pem_x509_certificate(before.server_cert.read_bytes())
    old_key, bundle_ca = before.server_key.read_bytes(), dep.site("a").ca_cert.read_bytes()
    record = rotate_server_certificate(dep.root, by="ops@hospital-a")
    after = load_deployment(dep.root)
    cert = x509.load_pem_x509_certificate(after.server_cert.read_bytes())
    key = serialization.load_pem_private_key(after.server_key.read_bytes(), password=None)
    assert after.server_key.read_bytes() != old_key and stat.S_IMODE(after.server_key.stat().st_mode) == 0o600
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.serial_number != old_cert.serial_number
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans == old_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert dep.site("a").ca_cert.read_bytes() == bundle_ca  # nothing to hand out to the sites
    store = Store([x509.load_pem_x509_certificate(bundle_ca)])
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost")).verify(cert, [])
    saved = json.loads((dep.root / "deployment.json").read_text())
    assert saved["server_cert"] == record and record["fingerprint_sha256"] == cert.fingerprint(
        hashes.SHA256()).hex(":")
    assert saved["retired_server_certs"][0]["fingerprint_sha256"] == old_cert.fingerprint(hashes.SHA256()).hex(":")
    entries = [json.loads(line) for line in (dep.root / "audit.jsonl").read_text().splitlines()]
    assert [(e["actor"], e["event"]) for e in entries] == [("operator:ops@hospital-a", "server-certificate-rotated")]
    assert entries[0]["data"]["new"] == record and verify_log(dep.root / "audit.jsonl").ok
    (dep.root / "ca" / "ca.key").rename(dep.root / "ca.key.elsewhere")
    with pytest.raises(ProvisionError, match="No CA key"):
        rotate_server_certificate(dep.root)


def test_rotating_a_site_key_replaces_it_in_the_bundle_and_the_allow_list(dep):
    old = dep.site("b").private_key.read_bytes()
    old_print = dep.fingerprints["b"]
    entry = rotate_site_key(dep.root, "b", by="ops@hospital-b")
    after = load_deployment(dep.root)
    assert after.site("b").private_key.read_bytes() != old and after.fingerprints["b"] == entry["fingerprint"]
    assert entry["fingerprint"] != old_print and entry["retired_keys"][0]["fingerprint"] == old_print
    _flower_node_keys(after.site("b").private_key)
    assert after.allow_list()["b"].read_bytes() == after.site("b").path.joinpath("supernode.pub").read_bytes()
    assert stat.S_IMODE(after.site("b").private_key.stat().st_mode) == 0o600
    assert all(old not in p.read_bytes() for p in dep.root.rglob("*") if p.is_file())
    assert after.fingerprints["a"] == dep.fingerprints["a"]  # the other sites keep theirs
    events = [json.loads(line) for line in (dep.root / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["data"]["site"], e["data"]["old_fingerprint"]) for e in events] == [
        ("site-key-rotated", "b", old_print)]
    revoke_site(dep.root, "c")
    with pytest.raises(ProvisionError, match="No active site"):
        rotate_site_key(dep.root, "c")
