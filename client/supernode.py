"""``facefl site``: run one site of a deployment (``flower-supernode``), and the site's checks before it starts.

``facefl site --deployment DIR --site NAME --data PATH`` starts ``flower-supernode`` for one site with the
bundle's CA and authentication key, and tells the ClientApp where the site's faces and state are
(``--node-config "data-path=... site-name=... state-dir=..."``; see ``client.site.Site.from_node_config``).
``DIR`` is either the whole deployment folder or the site's own bundle (``DIR/sites/NAME`` as handed out). Before
anything starts, the site checks its bundle (CA, key, ``site.toml``), its data folder (identity folders of two or
more images) and its ports. The site keeps reconnecting while the SuperLink is away (Flower's default: no limit
on retries). The command stays in the foreground under :mod:`common.processes`.

Which apps run here: the SuperNode is started with ``--isolation process``, so it runs no app itself; next to it
``client/app_launcher.py`` takes each ClientApp task and starts ``client/app_gate.py``, which checks the app
(approved at this site by ``facefl site approve``, or signed with the federation's app-signing key when
``site.toml`` says ``trust-signed-apps = true``) before any file of it is installed or imported. A site whose
operator approved nothing and that trusts no signing key runs whatever app the server sends, and says so loudly
when it starts (``require-approved-apps = true`` in ``site.toml`` refuses every app until one is approved).

Flower's own ``--trusted-entities`` is passed to the SuperNode only when ``site.toml`` says
``require-signed-apps = true``: Flower 1.42 fills in those signatures only for Flower Hub apps, so such a site
refuses every app sent with ``flwr run``.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.app_approval import APPROVALS_FILE, approvals_configured, read_trusted_keys
from common.deployment import (DATA_PATH_PLACEHOLDER, DEPLOYMENT_FILE, SITE_CONFIG, SUPERNODE_RUNTIME_PORT,
                               DeploymentRunError, check_bindable, check_host_port, check_port, check_site_name,
                               flower_bin, flower_env, flwr_home, node_config_value)
from common.processes import ChildProcess, exclusive, run_in_foreground, say

SUPERNODE_LOG = "supernode.log"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".pgm"})  # = common.data.datasets.IMAGE_EXTENSIONS
MIN_IMAGES = 2  # a site learns only from identities with at least two images (client.site -> load_site_folder)


@dataclass(frozen=True)
class SiteSettings:
    """What ``flower-supernode`` is started with for one site (paths absolute)."""

    name: str
    bundle: Path
    superlink: str
    ca_cert: Path
    private_key: Path
    data: Path
    state: Path
    runtime_port: int
    trusted_entities: Path | None = None
    require_secure_aggregation: bool = False
    signing_keys: Path | None = None  # trusted-entities.yaml whose keys' signed apps run (trust-signed-apps)
    require_approved_apps: bool = False  # refuse every app not approved (or signed), even with no approvals yet


def resolve_site(deployment_dir: str | Path, site: str, *, data: str | Path | None = None,
                 state: str | Path | None = None, superlink: str | None = None,
                 runtime_port: int | None = None, require_secure_aggregation: bool | None = None) -> SiteSettings:
    """Find the site's bundle and settings (command line over ``site.toml``), and check its data folder."""
    name = check_site_name(site)
    bundle, ports = _find_bundle(Path(deployment_dir).expanduser().absolute(), name)
    config = _read_site_toml(bundle)
    if config.get("site-name", name) != name:
        raise DeploymentRunError(f"{bundle / SITE_CONFIG} belongs to site {config['site-name']!r}, not {name!r}.")

    def bundle_path(key: str, default: str) -> Path:
        return (bundle / str(config.get(key) or default)).expanduser().absolute()

    ca_cert, private_key = bundle_path("root-certificates", "ca.crt"), bundle_path("auth-supernode-private-key",
                                                                                   "supernode.key")
    if not ca_cert.is_file():
        raise FileNotFoundError(f"No CA certificate at {ca_cert}; copy the site's whole bundle from the operator.")
    if not private_key.is_file():
        raise FileNotFoundError(f"No authentication key at {private_key}: the bundle is incomplete, or site {name} "
                                "was revoked (its key is deleted then); ask the operator for a new site.")
    if data:
        data_path = check_site_data(data)
    elif config.get("data-path") and config["data-path"] != DATA_PATH_PLACEHOLDER:
        data_path = check_site_data(bundle_path("data-path", ""))
    else:
        raise DeploymentRunError(f"No data folder for site {name}: pass --data PATH (a folder of identity folders) "
                                 f"or set data-path in {bundle / SITE_CONFIG}.")
    state_dir = _state_dir(bundle, config, name, state)
    address = superlink or str(config.get("superlink") or "")
    if not address:
        raise DeploymentRunError(f"No SuperLink address for site {name}: pass --superlink HOST:PORT.")
    check_host_port(address)
    trusted = bundle_path("trusted-entities", "trusted-entities.yaml") if config.get("require-signed-apps") else None
    if trusted is not None and not trusted.is_file():
        raise FileNotFoundError(f"require-signed-apps is set in {bundle / SITE_CONFIG} but {trusted} is missing.")
    signing = bundle_path("trusted-entities", "trusted-entities.yaml") if config.get("trust-signed-apps") else None
    if signing is not None:
        read_trusted_keys(signing)  # a missing or empty key file stops the site here, with what to do
    port = runtime_port if runtime_port is not None else ports.get("supernode_runtime", SUPERNODE_RUNTIME_PORT)
    secure = bool(config.get("require-secure-aggregation", False)) if require_secure_aggregation is None \
        else require_secure_aggregation
    return SiteSettings(name, bundle, address, ca_cert, private_key, data_path, state_dir, check_port(port),
                        trusted, secure, signing, bool(config.get("require-approved-apps", False)))


def site_state(deployment_dir: str | Path, site: str, state: str | Path | None = None) -> Path:
    """The site's state folder (where its approvals are kept), as ``facefl site`` resolves it, without checking
    its data folder: ``state``, else ``state-dir`` in ``site.toml``, else ``~/.local/share/facefl/NAME``."""
    name = check_site_name(site)
    bundle, _ = _find_bundle(Path(deployment_dir).expanduser().absolute(), name)
    return _state_dir(bundle, _read_site_toml(bundle), name, state)


def _state_dir(bundle: Path, config: dict[str, Any], name: str, state: str | Path | None) -> Path:
    if state:
        return Path(state).expanduser().absolute()
    if config.get("state-dir"):
        return (bundle / str(config["state-dir"])).expanduser().absolute()
    return Path.home() / ".local" / "share" / "facefl" / name


def supernode_argv(settings: SiteSettings, *, max_retries: int | None = None,
                   max_wait_time: float | None = None) -> list[str]:
    """The ``flower-supernode`` command line for a site."""
    node_config = " ".join(f"{key}={node_config_value(value)}" for key, value in (
        ("data-path", str(settings.data)), ("site-name", settings.name), ("state-dir", str(settings.state)),
        ("require-secure-aggregation", "true" if settings.require_secure_aggregation else "false")))
    argv = [flower_bin("flower-supernode"),
            "--superlink", settings.superlink,
            "--root-certificates", str(settings.ca_cert),
            "--auth-supernode-private-key", str(settings.private_key),
            "--node-config", node_config,
            "--isolation", "process",  # runs no app itself: client.app_launcher and client.app_gate do
            "--port", str(settings.runtime_port)]
    if settings.trusted_entities is not None:
        argv += ["--trusted-entities", str(settings.trusted_entities)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def run_site(deployment_dir: str | Path, site: str, *, data: str | Path | None = None,
             state: str | Path | None = None, superlink: str | None = None, runtime_port: int | None = None,
             max_retries: int | None = None, max_wait_time: float | None = None, echo: bool = True,
             require_secure_aggregation: bool | None = None) -> int:
    """Start one site's SuperNode and stay in the foreground until a signal (or until it exits).

    Returns 0 after a stop by signal, else flower-supernode's exit status (non-zero when the SuperLink refuses the
    site or cannot be reached within ``max_retries`` / ``max_wait_time``; by default it retries forever)."""
    settings = resolve_site(deployment_dir, site, data=data, state=state, superlink=superlink,
                            runtime_port=runtime_port, require_secure_aggregation=require_secure_aggregation)
    settings.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with exclusive(settings.state, f"facefl site {settings.name}"):
        check_bindable("127.0.0.1", settings.runtime_port,
                        f"Port {settings.runtime_port} (the SuperNode's local Runtime API) is in use, by another site "
                        "on this machine?; pass another --runtime-port.")
        if settings.trusted_entities is not None:
            say("require-signed-apps is on: apps sent with `flwr run .` carry no signature in Flower 1.42 and "
                 "will be refused by this site.")
        say(app_policy(settings))
        log_path = settings.state / SUPERNODE_LOG
        say(f"starting site {settings.name}: SuperLink {settings.superlink}, data {settings.data}, "
             f"state {settings.state}, log {log_path}")
        child = ChildProcess(f"flower-supernode ({settings.name})", supernode_argv(settings, max_retries=max_retries,
                                                                             max_wait_time=max_wait_time),
                       env=flower_env(flwr_home(settings.state)), cwd=settings.state, log_path=log_path, echo=echo,
                       on_line=_site_watcher(settings))
        launcher = ChildProcess(f"app launcher ({settings.name})", launcher_argv(settings),
                                env=flower_env(flwr_home(settings.state)), cwd=settings.state, log_path=log_path,
                                echo=echo)
        with child, launcher:
            code = run_in_foreground(child, companions=[launcher])
        hint = _site_hint(child.tail()) if code else ""
        if hint:
            say(hint)
        if code == 0 and not child.stopped_by_signal:
            if "Giving up reconnection" in child.tail():  # --max-retries / --max-wait-time ran out
                say(_site_hint(child.tail()))
                return 1
            return _stopped_on_its_own(settings)
        return code


def launcher_argv(settings: SiteSettings) -> list[str]:
    """The command line of the site's task launcher (``client/app_launcher.py``), next to its SuperNode."""
    argv = [sys.executable, "-m", "client.app_launcher", "--runtime-api-address",
            f"127.0.0.1:{settings.runtime_port}", "--site", settings.name, "--state", str(settings.state),
            "--parent-pid", str(os.getpid())]
    if settings.signing_keys is not None:
        argv += ["--trusted-keys", str(settings.signing_keys)]
    if settings.require_approved_apps:
        argv.append("--require-approved-apps")
    return argv


def app_policy(settings: SiteSettings) -> str:
    """One line on which apps this site runs; a loud warning when it runs any app the server sends."""
    rules = []
    if approvals_configured(settings.state):
        rules.append(f"apps its operator approved ({settings.state / APPROVALS_FILE})")
    if settings.signing_keys is not None:
        rules.append(f"apps signed by the keys in {settings.signing_keys}")
    if rules:
        return f"site {settings.name} runs only " + " and ".join(rules) + "; every other app is refused."
    if settings.require_approved_apps:
        return (f"site {settings.name} requires approved apps but none is approved yet: every app is refused until "
                "the operator runs `facefl site approve APP`.")
    return (f"WARNING: site {settings.name} RUNS ANY APP THE SERVER SENDS, next to this site's data: no app is "
            "approved here and no signing key is trusted. Approve the app with `facefl site approve APP "
            f"--deployment BUNDLE --site {settings.name}` (or set trust-signed-apps = true in site.toml).")


def check_site_data(path: str | Path) -> Path:
    """``path`` if it is a folder with at least one identity folder of two or more images; else a one-line error."""
    root = Path(path).expanduser().absolute()
    layout = "a folder of identity folders, root/<person>/<image> (jpg, jpeg, png, pgm)"
    if not root.exists():
        raise DeploymentRunError(f"Site data folder {root} does not exist; pass --data with {layout}.")
    if not root.is_dir():
        raise DeploymentRunError(f"Site data {root} is not a folder; pass --data with {layout}.")
    folders = 0
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                folders += 1
                with os.scandir(entry.path) as files:
                    images = sum(1 for f in files if not f.name.startswith(".") and f.is_file()
                                 and os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES)
                if images >= MIN_IMAGES:
                    return root
    except OSError as exc:
        raise DeploymentRunError(f"Cannot read the site data folder {exc.filename or root}: {exc.strerror}.") from None
    if not folders:
        raise DeploymentRunError(f"Site data folder {root} has no identity folders; expected {layout}.")
    raise DeploymentRunError(f"No identity folder in {root} has {MIN_IMAGES} or more images; a site learns only from "
                             f"people with several photos ({layout}).")


def _find_bundle(root: Path, name: str) -> tuple[Path, dict[str, int]]:
    """(bundle folder, the deployment's ports if known) from a deployment folder or a site's own bundle."""
    if (root / DEPLOYMENT_FILE).is_file():
        try:
            record = json.loads((root / DEPLOYMENT_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise DeploymentRunError(f"Cannot read {root / DEPLOYMENT_FILE} ({exc}); restore it from a backup.") \
                from None
        if name in record.get("revoked", {}):
            raise DeploymentRunError(f"Site {name!r} was revoked in {root}; it can no longer join.")
        if name not in record.get("sites", {}):
            raise DeploymentRunError(f"No site {name!r} in {root}; the sites are: "
                                     f"{', '.join(record.get('sites', {})) or 'none'}.")
        return root / "sites" / name, {k: int(v) for k, v in record.get("ports", {}).items()}
    for candidate in (root, root / "sites" / name, root / name):
        if (candidate / SITE_CONFIG).is_file():
            return candidate, {}
    raise FileNotFoundError(f"{root} is neither a deployment folder nor site {name}'s bundle (no {DEPLOYMENT_FILE} "
                            f"or {SITE_CONFIG}); pass the folder the operator gave this site.")


def _read_site_toml(bundle: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((bundle / SITE_CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"No {SITE_CONFIG} in {bundle}; copy the site's whole bundle.") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentRunError(f"Cannot read {bundle / SITE_CONFIG}: {exc}.") from exc


def _site_watcher(settings: SiteSettings) -> Callable[[str], None]:
    seen = {"connected": False}

    def on_line(line: str) -> None:
        if not seen["connected"] and ("SuperNode ID:" in line or "Connection successful" in line):
            seen["connected"] = True
            say(f"site {settings.name} connected to the SuperLink at {settings.superlink}")
    return on_line


EXIT_STOPPED_BY_SUPERLINK = 3


def _stopped_on_its_own(settings: SiteSettings) -> int:
    """flower-supernode exited with status 0 although nobody stopped it. Flower 1.42's SuperNode does this when the
    SuperLink refuses it mid-run (HTTP 401 on its next request: its key was unregistered, as a revocation does), and
    prints nothing but "SuperNode terminated gracefully". Say so, record it in the site's audit log, and exit
    non-zero, so that a service manager or an operator sees that this site is out."""
    from common.audit import AuditLog

    message = (f"site {settings.name} is no longer connected: its SuperNode stopped on its own, which Flower's "
               "SuperNode does when the SuperLink refuses this site's key (the operator revoked or unregistered "
               "the site). Ask the federation's operator: `facefl deploy status` lists revoked sites, with who "
               "revoked them and when.")
    say(message)
    try:
        AuditLog(settings.state / "audit.jsonl", actor=f"site:{settings.name}").append(
            "site-stopped", reason="the SuperNode stopped on its own (refused by the SuperLink)",
            superlink=settings.superlink)
    except (OSError, ValueError) as exc:
        say(f"could not record it in the site's audit log: {exc}")
    return EXIT_STOPPED_BY_SUPERLINK


def _site_hint(tail: str) -> str:
    if "Failed to activate SuperNode" in tail or "code: 2004" in tail:
        return ("The SuperLink does not accept this site's key: it is not registered there (the operator's "
                "`facefl superlink` registers every active site) or the site was revoked.")
    if "CERTIFICATE_VERIFY_FAILED" in tail or "certificate verify failed" in tail.lower():
        return ("TLS failed: the SuperLink's certificate is not signed by this bundle's ca.crt, or does not name "
                "the address in --superlink.")
    if "Giving up reconnection" in tail:
        return "The SuperLink could not be reached; check --superlink and that it is running."
    return ""
