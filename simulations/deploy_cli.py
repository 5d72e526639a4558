"""The deployment commands of ``facefl``: ``deploy init|add-site|revoke-site|rotate-site-key|rotate-cert|sign-app`` (key material for a SuperLink
and one SuperNode per site, ``server/deployment/provision.py``), ``deploy status`` (``server/deployment/status.py``),
``superlink`` (``server/deployment/superlink.py``) and ``site`` (``client/supernode.py``).

Registered in ``simulations/cli.py``; ``python -m simulations.deploy_cli deploy|superlink|site ...`` runs them
without the rest of the CLI. Errors are raised as
``ValueError`` / ``FileNotFoundError`` (``ProvisionError`` is a ``ValueError``) with a one-line message; the main
entry point prints them as ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

_BY_HELP = ("Who is acting, for the deployment's audit log (DIR/audit.jsonl): a name or an e-mail (default: this "
            "machine's user@host).")

deploy_app = typer.Typer(no_args_is_help=True,
                         help="Multi-site deployment: certificates and keys for a SuperLink and its sites.")


@deploy_app.command("init")
def init(
    server_host: str = typer.Option(..., "--server-host", help="DNS name or IP address the sites dial to reach "
                                    "the SuperLink (no scheme, no port)."),
    sites: str = typer.Option(..., "--sites", help="Comma-separated site names, e.g. hospital-a,hospital-b."),
    out: Path = typer.Option(..., "--out", help="Deployment folder to create (must not exist)."),
    san: list[str] = typer.Option([], "--san", help="Another DNS name or IP address of the SuperLink for its "
                                  "certificate (repeatable). localhost, 127.0.0.1 and ::1 are always included."),
) -> None:
    """Create a CA, the SuperLink's TLS certificate, one authentication key per site and an app-signing key."""
    from server.deployment.provision import init_deployment

    names = [s.strip() for s in sites.split(",") if s.strip()]
    dep = init_deployment(out, server_host, names, extra_sans=san)
    typer.echo(f"Created deployment {dep.root} for SuperLink {dep.superlink_address} with sites: "
               f"{', '.join(dep.sites)}.")
    typer.echo(f"  keep private:   {dep.ca_cert.parent}/ and {dep.signing_private_key.parent}/ (CA and "
               "app-signing keys)")
    typer.echo(f"  SuperLink host: {dep.superlink_dir}/")
    for name in dep.sites:
        typer.echo(f"  site {name}:{' ' * max(1, 9 - len(name))}{dep.site(name).path}/  (only to that site)")
    typer.echo("Then, on the SuperLink host:\n"
               f"  facefl superlink --deployment {dep.root}\n"
               "and at each site, with its own bundle:\n"
               "  facefl site --deployment BUNDLE --site NAME --data /path/to/its/faces")


@deploy_app.command("add-site")
def add_site_cmd(
    name: str = typer.Argument(..., help="New site name: lowercase letters, digits and hyphens."),
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init`."),
    by: Optional[str] = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Add a site: a new authentication key, its bundle and its SuperLink allow-list entry."""
    from server.deployment.provision import add_site, load_deployment

    bundle = add_site(deployment, name, by=by)
    dep = load_deployment(deployment)
    typer.echo(f"Added site {name}: give {bundle}/ to that site only. A running `facefl superlink` registers it "
               f"on SIGHUP (or restart it); by hand: flwr supernode register {dep.allow_list()[name]} facefl "
               f"--name {name}")


@deploy_app.command("revoke-site")
def revoke_site_cmd(
    name: str = typer.Argument(..., help="Site to revoke."),
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init`."),
    by: Optional[str] = typer.Option(None, "--by", help=_BY_HELP),
    reason: str = typer.Option("", "--reason", help="Why, for the audit log (e.g. 'left the consortium')."),
) -> None:
    """Revoke a site: remove it from the allow-list, delete its private key, and never reuse its name. The
    deployment's audit log (DIR/audit.jsonl) records who revoked it, when and why."""
    from server.deployment.provision import revoke_site

    entry = revoke_site(deployment, name, by=by, reason=reason)
    typer.echo(f"Revoked site {name} at {entry['revoked_at']} by {entry['revoked_by']}. A running `facefl "
               "superlink` unregisters its node on SIGHUP (kill -HUP its pid; or restart it), which disconnects it "
               "and refuses its next connection; a run in progress goes on with the other sites.")


@deploy_app.command("rotate-site-key")
def rotate_site_key_cmd(
    name: str = typer.Argument(..., help="The site whose authentication key is replaced."),
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init`."),
    by: Optional[str] = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Give a site a new SuperNode authentication key (the old one is never accepted again). Then SIGHUP `facefl
    superlink` (the old node is unregistered, the new key registered) and hand the site its new supernode.key."""
    from server.deployment.provision import rotate_site_key

    entry = rotate_site_key(deployment, name, by=by)
    typer.echo(f"New key for site {name} ({entry['fingerprint']}). SIGHUP `facefl superlink` to register it (the "
               f"old key's node is unregistered), then give {deployment}/sites/{name}/supernode.key to that site "
               "only and restart its `facefl site`: its state folder (privacy ledger, audit log) carries over.")


@deploy_app.command("rotate-cert")
def rotate_cert_cmd(
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init` "
                                    "(its ca/ key signs the new certificate)."),
    by: Optional[str] = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Give the SuperLink a new TLS key and certificate from the deployment's CA (same names). The sites trust the
    CA, so nothing changes for them; restart `facefl superlink` to serve it (its state, runs and sites are kept)."""
    from server.deployment.provision import rotate_server_certificate

    cert = rotate_server_certificate(deployment, by=by)
    typer.echo(f"New SuperLink certificate {cert['fingerprint_sha256'][:23]}... valid until {cert['not_after']}. "
               "Restart `facefl superlink` (same --state) to serve it: registered sites, node ids and past runs are "
               "kept, and the sites reconnect by themselves.")


@deploy_app.command("sign-app")
def sign_app_cmd(
    app: Path = typer.Argument(..., help="The Flower app's folder (what `flwr run` is given)."),
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init` "
                                    "(its app-signing/ key signs)."),
) -> None:
    """Sign an app with the deployment's app-signing key (APP/facefl-app-signature.json). Sites whose site.toml says
    trust-signed-apps = true run it without approving its hash; change any file and it must be signed again."""
    from server.deployment.provision import sign_app

    path, sha256 = sign_app(deployment, app)
    typer.echo(f"Signed {app}: {path} (the bundle `flwr run` sends has sha256 {sha256}).")


@deploy_app.command("status")
def status_cmd(
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init`."),
    state: Optional[Path] = typer.Option(None, "--state", help="The SuperLink's state folder (default "
                                         "DIR/superlink/state): node ids, Flower's database."),
    run: Optional[Path] = typer.Option(None, "--run", help="A run folder (its run-dir): the last round each site's "
                                       "update was aggregated."),
    site_state: list[str] = typer.Option([], "--site-state", help="NAME=PATH: a site's state folder, for its "
                                         "privacy ledger (repeatable; default: state-dir in the site's bundle, "
                                         "where it exists on this machine)."),
) -> None:
    """Each site's last contact, node status and privacy ledger; the CA's and SuperLink's certificate expiry;
    revoked sites. Reads files only: works with the SuperLink stopped, and changes nothing."""
    from client.privacy import PrivacyLedger
    from server.deployment.status import deployment_status, format_status, site_state_dirs

    given = {}
    for item in site_state:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"Invalid --site-state {item!r}: give NAME=PATH (e.g. a=/srv/facefl/a).")
        given[name] = path
    ledgers = {}
    for name, folder in site_state_dirs(deployment, given).items():
        ledger = PrivacyLedger.load(folder)
        if ledger is not None:
            ledgers[name] = {**ledger.summary(),
                             "trained_rounds": [r["round"] for r in ledger.rounds if r["status"] == "trained"]}
    typer.echo(format_status(deployment_status(deployment, state=state, run=run, ledgers=ledgers)))


def superlink_command(
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init`."),
    state: Optional[Path] = typer.Option(None, "--state", help="State folder: database (registered sites, runs), "
                                         "nodes.json, log, FLWR_HOME. Default DIR/superlink/state."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTPS port of the Fleet, Control and Runtime APIs "
                                       "(default: the deployment's, 8000)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    startup_timeout: float = typer.Option(90.0, "--startup-timeout", help="Seconds to wait for the SuperLink "
                                          "to accept connections."),
) -> None:
    """Run the deployment's SuperLink (TLS, SuperNode authentication), register its sites, print how to start
    a run; stays in the foreground until Ctrl-C."""
    from server.deployment.superlink import run_superlink

    raise typer.Exit(run_superlink(deployment, state=state, port=port, host=host, startup_timeout=startup_timeout))


site_app = typer.Typer(help="Run this site (`facefl site --deployment BUNDLE --site NAME --data FACES`), and "
                       "approve the apps it may run (approve, approvals, revoke, show).")


@site_app.callback(invoke_without_command=True)
def site_command(
    ctx: typer.Context,
    deployment: Optional[Path] = typer.Option(None, "--deployment", help="The deployment folder, or this site's "
                                              "bundle (DIR/sites/NAME as the operator handed it out)."),
    site: Optional[str] = typer.Option(None, "--site", help="This site's name."),
    data: Optional[Path] = typer.Option(None, "--data", help="This site's faces: a folder of identity folders "
                                        "(default: data-path in site.toml)."),
    state: Optional[Path] = typer.Option(None, "--state", help="Privacy ledger, audit log, app approvals, margin "
                                         "head, FLWR_HOME (default: state-dir in site.toml, or "
                                         "~/.local/share/facefl/NAME)."),
    superlink: Optional[str] = typer.Option(None, "--superlink", help="SuperLink HOST:PORT (default: the bundle's)."),
    runtime_port: Optional[int] = typer.Option(None, "--runtime-port", help="Local port of the SuperNode's "
                                               "Runtime API (default 9094; one per site on a machine)."),
    max_retries: Optional[int] = typer.Option(None, "--max-retries", help="Give up after this many failed "
                                              "connection attempts (default: never)."),
    max_wait_time: Optional[float] = typer.Option(None, "--max-wait-time", help="Give up reconnecting after "
                                                  "this many seconds (default: never)."),
    require_secure_aggregation: Optional[bool] = typer.Option(
        None, "--require-secure-aggregation/--allow-plain-aggregation",
        help="Refuse rounds that are not securely aggregated (SecAgg+), so the server never holds this site's "
             "update alone (default: require-secure-aggregation in site.toml, else allow)."),
) -> None:
    """Run this site's SuperNode: it trains on the local faces when the SuperLink asks, and runs only the apps
    its operator approved (see `facefl site approve --help`); stays in the foreground until Ctrl-C."""
    ctx.obj = {"deployment": deployment, "site": site, "state": state}
    if ctx.invoked_subcommand is not None:
        return
    if deployment is None or site is None:
        raise ValueError("Give --deployment BUNDLE and --site NAME to run a site (or a command: facefl site "
                         "approve|approvals|revoke|show).")
    from client.supernode import run_site

    raise typer.Exit(run_site(deployment, site, data=data, state=state, superlink=superlink,
                              runtime_port=runtime_port, max_retries=max_retries, max_wait_time=max_wait_time,
                              require_secure_aggregation=require_secure_aggregation))


_DEPLOYMENT = typer.Option(None, "--deployment", help="The deployment folder, or this site's bundle.")
_SITE = typer.Option(None, "--site", help="This site's name.")
_STATE = typer.Option(None, "--state", help="The site's state folder (default: as `facefl site` finds it).")
_OPERATOR_KEY = typer.Option(None, "--operator-key", help="The site operator's Ed25519 key that signs the "
                             "approvals (default STATE/app-operator.key, made on the first approval).")


def _site_state(ctx: typer.Context, deployment: Optional[Path], site: Optional[str], state: Optional[Path]
                ) -> tuple[str, Path]:
    from client.supernode import site_state

    parent = ctx.obj or {}
    deployment, site, state = deployment or parent.get("deployment"), site or parent.get("site"), \
        state or parent.get("state")
    if deployment is None or site is None:
        raise ValueError("Give --deployment BUNDLE and --site NAME (the site whose approvals these are).")
    return site, site_state(deployment, site, state)


@site_app.command("show")
def site_show(app: Path = typer.Argument(..., help="A .fab file, or the app's folder (built as `flwr run` "
                                         "builds it).")) -> None:
    """Show what an app is (name, version, publisher, SHA-256, files) without approving or running it."""
    from client.app_approval import read_app

    _, info = read_app(app)
    typer.echo(info.describe())


@site_app.command("approve")
def site_approve(
    ctx: typer.Context,
    app: Path = typer.Argument(..., help="A .fab file, or the app's folder (built as `flwr run` builds it)."),
    deployment: Optional[Path] = _DEPLOYMENT, site: Optional[str] = _SITE, state: Optional[Path] = _STATE,
    operator_key: Optional[Path] = _OPERATOR_KEY,
    yes: bool = typer.Option(False, "--yes", help="Approve without asking (after showing the app)."),
    note: str = typer.Option("", "--note", help="Why it was approved (kept with the approval)."),
) -> None:
    """Approve an app at this site: from then on the site runs exactly this app (by its SHA-256) when a run sends it;
    every other app is refused before any of its code runs."""
    from client.app_approval import approve, read_app
    from common.audit import AuditLog

    name, folder = _site_state(ctx, deployment, site, state)
    content, info = read_app(app)
    typer.echo(info.describe())
    if not yes and not typer.confirm(f"Approve this app at site {name}?", default=False):
        raise typer.Exit(1)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    approve(folder, name, content, operator_key=operator_key, note=note)
    AuditLog(folder / "audit.jsonl", actor=f"site:{name}").append(
        "app-approved", fab_hash=info.sha256, app=f"{info.fab_id} {info.version}", files=len(info.files), note=note)
    typer.echo(f"Approved {info.name} {info.version} (sha256 {info.sha256}) at site {name}; recorded in "
               f"{folder / 'app-approvals.json'}.")


@site_app.command("approvals")
def site_approvals(ctx: typer.Context, deployment: Optional[Path] = _DEPLOYMENT, site: Optional[str] = _SITE,
                   state: Optional[Path] = _STATE) -> None:
    """List the apps approved (and revoked) at this site, after checking the approvals' signature."""
    from client.app_approval import approvals_configured, load_approvals

    name, folder = _site_state(ctx, deployment, site, state)
    if not approvals_configured(folder):
        typer.echo(f"No app is approved at site {name} ({folder}): it runs any app the server sends. Approve one "
                   "with `facefl site approve APP`.")
        return
    approvals = load_approvals(folder, name)
    typer.echo(f"Site {name}: {len(approvals.apps)} approved, {len(approvals.revoked)} revoked (signature checked).")
    for sha, entry in sorted(approvals.apps.items(), key=lambda kv: kv[1]["approved_at"]):
        typer.echo(f"  approved {entry['approved_at']}  {sha}  {entry['name']} {entry['version']} "
                   f"({entry['publisher']}, {len(entry['files'])} files)")
    for sha, entry in sorted(approvals.revoked.items(), key=lambda kv: kv[1]["revoked_at"]):
        typer.echo(f"  revoked  {entry['revoked_at']}  {sha}  {entry['name']} {entry['version']}")


@site_app.command("revoke")
def site_revoke(
    ctx: typer.Context,
    sha256: str = typer.Argument(..., help="The app's SHA-256 (8 or more leading digits) from `facefl site "
                                 "approvals`."),
    deployment: Optional[Path] = _DEPLOYMENT, site: Optional[str] = _SITE, state: Optional[Path] = _STATE,
    operator_key: Optional[Path] = _OPERATOR_KEY,
) -> None:
    """Withdraw an app's approval: the site refuses it from its next task on."""
    from client.app_approval import revoke
    from common.audit import AuditLog

    name, folder = _site_state(ctx, deployment, site, state)
    entry = revoke(folder, name, sha256, operator_key=operator_key)
    AuditLog(folder / "audit.jsonl", actor=f"site:{name}").append(
        "app-revoked", fab_hash=entry["sha256"], app=f"{entry['publisher']}/{entry['name']} {entry['version']}")
    typer.echo(f"Revoked {entry['name']} {entry['version']} (sha256 {entry['sha256']}) at site {name}.")


def _main() -> None:
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="facefl deployment processes: a SuperLink and its sites.")
    app.add_typer(deploy_app, name="deploy")
    app.command("superlink")(superlink_command)
    app.add_typer(site_app, name="site")
    try:
        app()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _main()
