"""A run directory: ``config.json``, ``metrics.json`` and one checkpoint per completed round.

Every file is written atomically, so an interrupted run leaves the last completed round intact and
``--resume RUN_DIR`` continues from it.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_torch_save, atomic_write_json
from common.config import RunConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
_CKPT = re.compile(r"round-(\d{4,})\.pt$")


class RunDirError(ValueError):
    """A folder is not a facefl run directory, or cannot be resumed."""


class DiskFullError(RuntimeError):
    """The disk holding a run directory filled up while the run wrote to it; the run stopped there."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from (an audit log's error wraps the OSError), is a full disk
    or an exhausted quota (ENOSPC, EDQUOT)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_space(path: str | Path) -> str:
    """The free space on the disk holding ``path``, for a message ("12.3 MB"; "unknown" when it cannot be read)."""
    try:
        return f"{shutil.disk_usage(path).free / 1e6:.1f} MB"
    except OSError:
        return "unknown"


def environment_info() -> dict[str, str]:
    """Versions of what produced a run (recorded in ``config.json`` and shown by ``facefl report``)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for package in ("facefl", "flwr", "torch", "opacus", "facenet-pytorch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def default_run_dir() -> Path:
    return Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a facefl run directory (no {CONFIG_FILE}).")
    try:
        return RunConfig.from_saved(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{path} is not a valid facefl run configuration: {exc}") from exc


class RunDirectory:
    """Writer for one run's directory."""

    def __init__(self, path: str | Path, cfg: RunConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.metrics: dict[str, Any] = {"run": {}, "rounds": [], "privacy": {}}

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str | Path, cfg: RunConfig, info: dict | None = None) -> RunDirectory:
        run = cls(path, cfg)
        run.path.mkdir(parents=True, exist_ok=True)
        if (run.path / CHECKPOINT_DIR).exists() and any((run.path / CHECKPOINT_DIR).iterdir()):
            raise RunDirError(f"{run.path} already holds a run; use --resume {run.path} or another --out.")
        info = {"versions": environment_info(), **(info or {})}
        atomic_write_json(run.path / CONFIG_FILE, {"config": cfg.to_mapping(), "info": info})
        run.metrics["run"] = {"started": _now(), "status": "running", "completed_rounds": 0,
                              "num_rounds": cfg.num_rounds, "resumed": []}
        run._flush()
        return run

    @classmethod
    def resume(cls, path: str | Path, cfg: RunConfig) -> tuple[RunDirectory, dict | None]:
        """Open an existing run; returns it and its latest checkpoint (None if no round completed)."""
        run = cls(path, cfg)
        load_run_config(path)  # a clear error when this is not a run
        metrics_path = run.path / METRICS_FILE
        if metrics_path.exists():
            try:
                run.metrics = json.loads(metrics_path.read_text())
            except json.JSONDecodeError:
                run.metrics = {"run": {}, "rounds": [], "privacy": {}}
        ckpt = run.latest_checkpoint()
        done = ckpt["round"] if ckpt else 0
        run.metrics["rounds"] = [r for r in run.metrics.get("rounds", []) if r["round"] <= done]
        info = run.metrics.setdefault("run", {})
        info.update({"status": "running", "completed_rounds": done, "num_rounds": cfg.num_rounds})
        info.setdefault("resumed", []).append({"at": _now(), "from_round": done})
        if ckpt:
            run.metrics["privacy"] = ckpt.get("privacy", {})
        saved = json.loads((run.path / CONFIG_FILE).read_text())
        atomic_write_json(run.path / CONFIG_FILE, {**saved, "config": cfg.to_mapping()})
        run._flush()
        return run, ckpt

    def finish(self, status: str = "completed", error: str = "") -> None:
        self.metrics["run"].update({"status": status, "finished": _now()})
        if error:
            self.metrics["run"]["error"] = error
        self._flush()

    # ------------------------------------------------------------------ rounds
    def record_round(self, server_round: int, global_metrics: dict[str, float], seconds: float,
                     train_metrics: dict[str, float] | None = None, report=None) -> None:
        entry: dict[str, Any] = {"round": server_round, "global": global_metrics, "seconds": round(seconds, 3)}
        if train_metrics is not None:
            entry["train"] = train_metrics
        if report is not None:
            entry.update(asdict(report))
            for site, m in report.sites.items():
                priv = self.metrics["privacy"].setdefault(site, {"rounds_trained": 0, "rounds_declined": 0})
                priv.update({"epsilon": m.get("epsilon", 0.0), "target_epsilon": m.get("target-epsilon", 0.0),
                             "delta": m.get("delta", 0.0), "noise_multiplier": m.get("noise-multiplier", 0.0),
                             "sample_rate": m.get("sample-rate", 0.0)})
                priv["rounds_declined" if m.get("declined", 0) > 0 else "rounds_trained"] += 1
        self.metrics["rounds"] = [r for r in self.metrics["rounds"] if r["round"] != server_round] + [entry]
        self.metrics["run"]["completed_rounds"] = server_round
        self._flush()

    def save_checkpoint(self, server_round: int, state: dict[str, torch.Tensor], server_state: dict) -> Path:
        path = self.path / CHECKPOINT_DIR / f"round-{server_round:04d}.pt"
        atomic_torch_save(path, {
            "round": server_round,
            "state_dict": state,
            "config": self.cfg.to_mapping(),
            "privacy": self.metrics["privacy"],
            "server_state": server_state,
        })
        return path

    def checkpoint_rounds(self) -> list[int]:
        """The rounds with a checkpoint file, in order (not loaded: see :meth:`latest_checkpoint`)."""
        folder = self.path / CHECKPOINT_DIR
        return sorted(int(m.group(1)) for p in folder.glob("round-*.pt") if (m := _CKPT.search(p.name))) \
            if folder.exists() else []

    def disk_full_message(self, failed_round: int, resume_hint: str) -> str:
        """What to say when the disk filled while round ``failed_round``'s results were written."""
        rounds = self.checkpoint_rounds()
        kept = (f"the checkpoint of round {rounds[-1]} is intact" if rounds else "no round was checkpointed yet")
        return (f"The disk holding the run directory {self.path} is full ({free_space(self.path)} free): round "
                f"{failed_round}'s results could not be written, so the run stopped; {kept}. Free space on that "
                f"disk, then continue the run: {resume_hint}")

    def latest_checkpoint(self) -> dict | None:
        folder = self.path / CHECKPOINT_DIR
        found = sorted((int(m.group(1)), p) for p in folder.glob("round-*.pt") if (m := _CKPT.search(p.name))) \
            if folder.exists() else []
        for _, path in reversed(found):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - any damage (truncation, garbage) falls back to the one before
                continue
        return None

    def _flush(self) -> None:
        atomic_write_json(self.path / METRICS_FILE, self.metrics)


def load_run_models(run_dir: str | Path):
    """The models of a run's latest readable checkpoint: ``(cfg, FederatedModels, round)``.

    Raises :class:`RunDirError` when the folder is not a run or no round has completed yet.
    """
    from common.models.federated import build_models

    cfg = load_run_config(run_dir)
    ckpt = RunDirectory(run_dir, cfg).latest_checkpoint()
    if ckpt is None:
        raise RunDirError(f"{run_dir} has no readable checkpoint yet (no round completed); nothing to load.")
    models = build_models(cfg)
    try:
        models.load_state_dict(ckpt["state_dict"])
    except (KeyError, ValueError) as exc:
        raise RunDirError(f"The checkpoint of round {ckpt.get('round')} in {run_dir} does not fit its "
                          f"configuration: {exc}") from exc
    for module in (models.embedding, models.vae):
        if module is not None:
            module.eval()
    return cfg, models, int(ckpt["round"])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
