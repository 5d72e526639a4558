"""Run a federation of N virtual sites on this machine through Flower's simulation engine (Ray backend).

The same ServerApp and ClientApp as a deployment run here; the run configuration is passed to both as
overrides, so nothing depends on the working directory. Ray's processes are shut down when the run ends,
whether it completes, fails or is interrupted.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from common.config import ConfigError, RunConfig
from common.data.sources import site_identities
from server.rundir import default_run_dir, load_run_config


def config_from_options(options: dict, *, scenario: str | None = None, sets: dict | None = None,
                        sites: int | None = None) -> tuple[RunConfig, int]:
    """The run config and number of sites of ``facefl simulate``: a named scenario's values, then the command's
    options (None = not given), then ``--set KEY=VALUE`` pairs, each overriding the one before."""
    from simulations.scenarios import get_scenario

    values: dict = {}
    num_sites = 2
    if scenario:
        chosen = get_scenario(scenario)
        values.update(chosen.config)
        num_sites = chosen.sites
    values.update({key: value for key, value in options.items() if value is not None})
    values.update(sets or {})
    return RunConfig.from_mapping(values), sites or num_sites


def prepare_config(cfg: RunConfig, *, num_sites: int, out: str | None = None, resume: str | None = None,
                   num_rounds: int | None = None) -> RunConfig:
    """Resolve paths for a simulated run: a new run directory, or the one being resumed."""
    if num_sites < 1:
        raise ConfigError(f"A federation needs at least one site; got --sites {num_sites}.")
    if resume:
        saved = load_run_config(resume)
        changes: dict = {"resume_from": str(Path(resume).resolve()), "run_dir": str(Path(resume).resolve())}
        if num_rounds:
            changes["num_rounds"] = num_rounds
        return saved.replace(**changes)
    run_dir = Path(out) if out else default_run_dir()
    cfg = cfg.replace(run_dir=str(run_dir.resolve()), min_sites=min(cfg.min_sites, num_sites),
                       data=str(Path(cfg.data).expanduser().resolve()) if cfg.data else "")
    # Fail fast, before any process starts: a missing or empty dataset, or too few people for the sites.
    site_identities(cfg, 0, num_sites)
    return cfg


def simulate(cfg: RunConfig, num_sites: int, *, cpus_per_site: float = 1.0, verbose: bool = False) -> Path:
    """Run the federation ``cfg`` with ``num_sites`` virtual sites; returns the run directory.

    ``cfg`` must come from :func:`prepare_config` (absolute run directory).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_log = logging.getLogger("flwr")
    file_handler = logging.FileHandler(run_dir / "flower.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("flwr", "facefl"):
        logging.getLogger(name).addHandler(file_handler)
    saved = {"propagate": flwr_log.propagate, "levels": {h: h.level for h in flwr_log.handlers}}
    if not verbose:  # Flower's own lines go to flower.log; the console shows facefl's progress lines.
        flwr_log.propagate = False
        for handler in flwr_log.handlers:
            if handler is not file_handler:
                handler.setLevel(logging.ERROR)
    overrides = cfg.to_mapping()
    backend = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(os.cpu_count() or 1, int(cpus_per_site)), "include_dashboard": False,
                      "log_to_driver": verbose, "logging_level": "ERROR"},
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=make_server_app(overrides),
                client_app=make_client_app(overrides),
                num_supernodes=num_sites,
                backend_config=backend,
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        flwr_log.propagate = saved["propagate"]
        for handler, level in saved["levels"].items():
            handler.setLevel(level)
        for name in ("flwr", "facefl"):
            logging.getLogger(name).removeHandler(file_handler)
        file_handler.close()
    return run_dir
