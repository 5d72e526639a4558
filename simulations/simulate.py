"""Run a federation of N virtual sites on this machine through Flower's simulation engine (Ray backend).

The same ServerApp and ClientApp as a deployment run here; the run configuration is passed to both as
overrides, so nothing depends on the working directory. Ray's processes are shut down when the run ends,
whether it completes, fails or is interrupted.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path

from common.config import ConfigError, RunConfig
from common.data.sources import prepare_faces, site_identities
from common.weights import default_cache_dir
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


def backend_config(*, cpus_per_site: float = 1.0, gpus_per_site: float = 0.0, ray_address: str | None = None,
                   verbose: bool = False) -> dict:
    """Flower's Ray backend settings: the resources each simulated site's actor holds, and how Ray starts.

    Without ``ray_address`` Ray starts on this machine with its cores (the dashboard off). With it, the run joins
    that running Ray cluster (``ray start --head`` on one machine, ``ray start --address=HEAD:6379`` on the
    others; ``auto`` finds a cluster started on this machine): the cluster's resources are its own, so nothing
    about them is passed, and Flower places the sites' actors on all of its nodes."""
    if cpus_per_site <= 0 or gpus_per_site < 0:
        raise ConfigError(f"--cpus-per-site must be positive and --gpus-per-site 0 or more; got {cpus_per_site} and "
                          f"{gpus_per_site}.")
    init: dict = {"log_to_driver": verbose, "logging_level": "ERROR", "include_dashboard": False}
    if ray_address:
        init["address"] = ray_address
    else:  # "local": a new instance, even when `ray start` left a cluster running on this machine
        init.update(address="local", num_cpus=max(os.cpu_count() or 1, int(math.ceil(cpus_per_site))))
    return {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site}, "init_args": init}


def simulate(cfg: RunConfig, num_sites: int, *, cpus_per_site: float = 1.0, gpus_per_site: float = 0.0,
             ray_address: str | None = None, verbose: bool = False) -> Path:
    """Run the federation ``cfg`` with ``num_sites`` virtual sites; returns the run directory.

    ``cfg`` must come from :func:`prepare_config` (absolute run directory). ``ray_address`` joins a running Ray
    cluster (see :func:`backend_config`); this process only disconnects from it at the end.
    """
    started = time.perf_counter()
    ready = prepare_faces(cfg, progress=True)  # every core, before the sites' actors each take one
    if ready:
        logging.getLogger("facefl").info("faces ready: %d in %.0f s (cached in %s)", ready,
                                         time.perf_counter() - started, cfg.cache_dir or default_cache_dir())
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
    backend = backend_config(cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site, ray_address=ray_address,
                             verbose=verbose)
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
