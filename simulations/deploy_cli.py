"""``facefl deploy init|add-site|revoke-site``: key material for a SuperLink and one SuperNode per site.

Registered in ``simulations/cli.py`` with ``app.add_typer(deploy_app, name="deploy")``. Errors are raised as
``ValueError`` / ``FileNotFoundError`` (``ProvisionError`` is a ``ValueError``) with a one-line message; the main
entry point prints them as ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path

import typer

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
    from server.provision import init_deployment

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
) -> None:
    """Add a site: a new authentication key, its bundle and its SuperLink allow-list entry."""
    from server.provision import add_site, load_deployment

    bundle = add_site(deployment, name)
    dep = load_deployment(deployment)
    typer.echo(f"Added site {name}: give {bundle}/ to that site only. A running `facefl superlink` registers it "
               f"on SIGHUP (or restart it); by hand: flwr supernode register {dep.allow_list()[name]} facefl "
               f"--name {name}")


@deploy_app.command("revoke-site")
def revoke_site_cmd(
    name: str = typer.Argument(..., help="Site to revoke."),
    deployment: Path = typer.Option(..., "--deployment", help="Deployment folder made by `facefl deploy init`."),
) -> None:
    """Revoke a site: remove it from the allow-list, delete its private key, and never reuse its name."""
    from server.provision import revoke_site

    revoke_site(deployment, name)
    typer.echo(f"Revoked site {name}. A running `facefl superlink` unregisters its node on SIGHUP (or restart "
               "it); until then the site can still connect.")
