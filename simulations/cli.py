"""``facefl``: the one command-line entry point.

Subcommands: ``simulate`` (a federation on this machine), ``scenarios`` (list named scenarios), ``data prepare``
(preprocess and cache a face dataset), ``bench train`` (DP cost and LFW View-1 benchmark).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from common.config import ConfigError, RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="facefl: federated, differentially private face models with Flower and Opacus.")
data_app = typer.Typer(no_args_is_help=True, help="Face datasets: preprocess and cache.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("facefl")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=console, show_path=False, show_level=verbose, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE (a run-config key such as lr=0.05); got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip().strip("'\"")
    return out


@app.command()
def simulate(
    data: Optional[str] = typer.Option(None, help="Identity-folder face dataset (LFW, VGGFace2, CASIA layout). "
                                       "Omitted: the synthetic smoke-test set."),
    sites: Optional[int] = typer.Option(None, help="Number of virtual sites (default 2, or the scenario's)."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    task: Optional[str] = typer.Option(None, help="embedding | vae | both."),
    strategy: Optional[str] = typer.Option(None, help="fedavg | fedprox | fedadam."),
    dp: Optional[bool] = typer.Option(None, "--dp/--no-dp", help="DP-SGD at every site (default on)."),
    epsilon: Optional[float] = typer.Option(None, help="Each site's total privacy budget (target epsilon)."),
    delta: Optional[float] = typer.Option(None, help="Delta; 0 means 1/(10 N) for a site with N examples."),
    clip: Optional[float] = typer.Option(None, help="Per-sample gradient clipping bound (max-grad-norm)."),
    accountant: Optional[str] = typer.Option(None, help="prv | rdp."),
    out: Optional[str] = typer.Option(None, help="Run directory to create (default runs/<timestamp>)."),
    resume: Optional[str] = typer.Option(None, help="Continue RUN_DIR from its last completed round."),
    scenario: Optional[str] = typer.Option(None, help="A named scenario (see `facefl scenarios`)."),
    set_: list[str] = typer.Option([], "--set", help="Any run-config key, KEY=VALUE (repeatable)."),
    cpus_per_site: float = typer.Option(1.0, help="CPU cores reserved per simulated site."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a federation of N virtual sites on this machine (Flower simulation engine, Ray backend)."""
    from simulations.scenarios import get_scenario
    from simulations.simulate import prepare_config
    from simulations.simulate import simulate as run_sim

    _setup_logging(verbose)
    values: dict = {}
    num_sites = 2
    if scenario:
        sc = get_scenario(scenario)
        values.update(sc.config)
        num_sites = sc.sites
    options = {"data": data, "num-rounds": rounds, "task": task, "strategy": strategy, "dp": dp,
               "target-epsilon": epsilon, "target-delta": delta, "max-grad-norm": clip, "accountant": accountant}
    values.update({k: v for k, v in options.items() if v is not None})
    values.update(_parse_sets(set_))
    num_sites = sites or num_sites
    cfg = RunConfig.from_mapping(values)
    cfg = prepare_config(cfg, num_sites=num_sites, out=out, resume=resume, num_rounds=rounds)
    what = f"data {cfg.data}" if cfg.data else "synthetic smoke-test faces (use --data for real faces)"
    privacy = (f"DP-SGD, each site epsilon <= {cfg.target_epsilon:g}" if cfg.dp else "no DP (baseline)")
    console.print(f"[bold]facefl simulate[/]: {num_sites} sites, {cfg.num_rounds} rounds, task {cfg.task}, "
                  f"{cfg.strategy}, {privacy}; {what}")
    console.print(f"run directory: {cfg.run_dir}")
    run_dir = run_sim(cfg, num_sites, cpus_per_site=cpus_per_site, verbose=verbose)
    _print_summary(run_dir)


def _print_summary(run_dir: Path) -> None:
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = Table(title=f"Privacy spent per site ({run_dir})")
    for col in ("site", "epsilon", "budget", "delta", "rounds trained", "rounds declined"):
        table.add_column(col)
    for site, p in sorted(metrics.get("privacy", {}).items()):
        table.add_row(site, f"{p.get('epsilon', 0):.3f}", f"{p.get('target_epsilon', 0):g}",
                      f"{p.get('delta', 0):.2e}", str(p.get("rounds_trained", 0)), str(p.get("rounds_declined", 0)))
    console.print(table)
    status = metrics.get("run", {}).get("status")
    console.print(f"status: {status}; completed rounds: {metrics.get('run', {}).get('completed_rounds')}")


@app.command()
def scenarios() -> None:
    """List the named simulation scenarios."""
    from simulations.scenarios import SCENARIOS

    table = Table()
    table.add_column("name")
    table.add_column("sites")
    table.add_column("what")
    for name, sc in SCENARIOS.items():
        table.add_row(name, str(sc.sites), sc.description)
    Console().print(table)


@data_app.command("prepare")
def data_prepare(
    data: str = typer.Argument(..., help="Identity-folder dataset root."),
    size: int = typer.Option(64, help="Face crop size in pixels."),
    mode: str = typer.Option("auto", help="auto | crop (aligned sets such as LFW) | detect (MTCNN + alignment)."),
) -> None:
    """Preprocess a dataset once (detect/align or crop, resize) into the cache; later runs reuse it."""
    from common.datasets import load_faces

    _setup_logging(False)
    faces = load_faces(data, image_size=size, mode=mode, min_images=1, progress=True)
    console.print(f"{len(faces)} faces of {faces.num_identities} identities cached at {size}x{size}; "
                  f"skipped: {faces.skipped or 'none'}")


@bench_app.command("train")
def bench_train(
    data: str = typer.Option(..., help="LFW root (with its protocol files)."),
    rounds: int = typer.Option(5, help="Federated rounds (centralized gets the same number of epochs)."),
    sites: int = typer.Option(4, help="Sites for the federated runs."),
    epsilon: float = typer.Option(8.0, help="Per-site epsilon of the DP run."),
    max_identities: int = typer.Option(0, help="Use only this many training identities (0 = all)."),
    parts: str = typer.Option("dp-cost,view1,vae", help="Comma-separated: dp-cost, view1, vae."),
    batch_size: int = typer.Option(256, help="Batch size of every training run (DP-SGD wants large batches)."),
    out: str = typer.Option("runs/bench", help="Folder for the benchmark's runs and its JSON summary."),
) -> None:
    """DP cost, LFW View-1 verification (centralized vs federated vs federated DP), VAE PSNR/SSIM."""
    from simulations.bench import run_bench

    _setup_logging(False)
    run_bench(data=data, rounds=rounds, sites=sites, epsilon=epsilon, max_identities=max_identities,
              parts=[p.strip() for p in parts.split(",") if p.strip()], out=Path(out), console=Console(),
              batch_size=batch_size)


def main() -> None:
    """Console-script entry point: known errors become one line on stderr and exit status 2."""
    from client.privacy import PrivacyBudgetError
    from common.datasets import DataError
    from server.rundir import RunDirError

    try:
        app()
    except (ConfigError, DataError, RunDirError, PrivacyBudgetError, FileNotFoundError, KeyError, ValueError) as exc:
        if os.environ.get("FACEFL_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; completed rounds are checkpointed (resume with --resume RUN_DIR).")
        sys.exit(130)


if __name__ == "__main__":
    main()
