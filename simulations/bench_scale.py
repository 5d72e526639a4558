"""``facefl bench scale``: many small sites on one machine. For each number of sites (10, 30 and 100 by default) of
the LFW View-1 training people (DP on, the default embedding model), a simulated federation of ``--rounds`` rounds
through Flower's simulation engine; printed per number of sites and round: seconds per round, seconds per site
(the round's actor time divided among its sites), the share of a site's time spent in training steps, and the peak
memory of the whole process tree (this process, Ray and its workers), sampled every half second from ``/proc``.
Everything is written to ``<out>/bench-scale.json`` (``bench-scale-fraction-F.json`` with ``--fraction-train F``),
with the global metrics of every round (the same seed gives the same result)."""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.atomic import atomic_write_json
from common.config import RunConfig


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(stat[1]), []).append(int(entry.name))
    return tree


def tree_rss(root: int | None = None) -> int:
    """Resident memory in bytes of process ``root`` (default: this one) and all its descendants (Linux)."""
    tree, page = _children(), os.sysconf("SC_PAGE_SIZE")
    todo, total = [root or os.getpid()], 0
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
        todo += tree.get(pid, [])
    return total


class PeakMemory:
    """Samples :func:`tree_rss` on a thread every ``interval`` seconds; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def scale_rows(run_dir: Path, sites: int, actors: int) -> list[dict]:
    """Per round of a finished run: seconds, seconds per site, training share, sites that trained."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = []
    for r in metrics["rounds"]:
        if r["round"] == 0:
            continue
        replied = r.get("sites", {})
        fit = [m.get("fit-seconds", float("nan")) for m in replied.values()]
        site_time = r["seconds"] * min(actors, max(len(replied), 1)) / max(len(replied), 1)
        rows.append({"round": r["round"], "seconds": r["seconds"], "sites_trained": len(replied),
                     "seconds_per_site": site_time,
                     "training_share": (sum(fit) / len(fit)) / site_time if fit and site_time else float("nan")})
    return rows


def run_scale_bench(*, data: str, site_counts: tuple[int, ...], rounds: int, fraction: float, out: Path,
                    console: Console, cpus_per_site: float = 1.0, set_values: dict | None = None) -> dict:
    from simulations.simulate import prepare_config, simulate

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*Secure RNG.*")
    actors = max(1, int((os.cpu_count() or 1) // cpus_per_site))
    summary = out / ("bench-scale.json" if fraction == 1 else f"bench-scale-fraction-{fraction:g}.json")
    report: dict = {"data": str(Path(data).resolve()), "rounds": rounds, "fraction_train": fraction,
                    "cores": os.cpu_count(), "actors": actors, "runs": {}}
    for n in site_counts:
        cfg = RunConfig.from_mapping({"data": str(Path(data).resolve()), "num-rounds": rounds, "dp": True,
                                      "fraction-train": fraction, "min-sites": max(2, int(n * fraction * 0.8)),
                                      **(set_values or {})})
        run_dir = out / (f"{n}-sites" + ("" if fraction == 1 else f"-fraction-{fraction:g}"))
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        console.print(f"[bold]{n} sites[/]: {rounds} rounds, fraction-train {fraction:g}")
        start = time.perf_counter()
        with PeakMemory() as memory:
            simulate(prepare_config(cfg, num_sites=n, out=str(run_dir)), n, cpus_per_site=cpus_per_site)
        wall = time.perf_counter() - start
        rows = scale_rows(run_dir, n, actors)
        final = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["global"]
        report["runs"][str(n)] = {"run_dir": str(run_dir), "wall_seconds": wall, "peak_memory_gb": memory.peak / 2**30,
                                  "rounds": rows, "final_global": final}
        atomic_write_json(summary, report)
        for r in rows:
            console.print(f"  round {r['round']}: {r['seconds']:.0f} s, {r['sites_trained']} sites, "
                          f"{r['seconds_per_site']:.2f} s per site, training {r['training_share']:.0%}")
        console.print(f"  peak memory {memory.peak / 2**30:.2f} GB; final {final}")
    table = Table(title=f"Simulated federations on {os.cpu_count()} cores ({actors} sites at a time), DP on")
    for col in ("sites", "round", "sites trained", "s / round", "s / site", "training share", "peak memory GB"):
        table.add_column(col)
    for n, run in report["runs"].items():
        for r in run["rounds"]:
            table.add_row(n, str(r["round"]), str(r["sites_trained"]), f"{r['seconds']:.1f}",
                          f"{r['seconds_per_site']:.2f}", f"{r['training_share']:.0%}", f"{run['peak_memory_gb']:.2f}")
    console.print(table)
    atomic_write_json(summary, report)
    console.print(f"wrote {summary}")
    return report
