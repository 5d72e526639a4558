"""Read a run directory for reporting, including one that was interrupted or is partly damaged.

A run directory holds ``config.json``, ``metrics.json`` and ``checkpoints/round-NNNN.pt`` (see
``server/rundir.py``). Every file there is written atomically, but a run can still stop at any point (killed,
out of budget, a machine restart) and files can be lost or damaged when copied. :func:`read_run` returns what can
be read, with a note for each thing that could not, and raises :class:`RunDirError` only when the folder is not a
facefl run at all.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from server.rundir import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, RunDirectory, RunDirError


@dataclass
class RunData:
    """One run as the report sees it."""

    path: Path
    name: str
    cfg: RunConfig
    info: dict[str, Any]
    run: dict[str, Any]
    rounds: list[dict[str, Any]]
    privacy: dict[str, dict[str, Any]]
    checkpoint_round: int | None
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # the latest checkpoint's models
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.run.get("status", "unknown"))

    @property
    def completed_rounds(self) -> int:
        return max([int(r["round"]) for r in self.rounds] + [self.checkpoint_round or 0])

    @property
    def interrupted(self) -> bool:
        return self.status != "completed" or self.completed_rounds < self.cfg.num_rounds

    @property
    def sites(self) -> list[str]:
        names = set(self.privacy)
        for r in self.rounds:
            names.update(r.get("sites", {}))
        return sorted(names)

    def final_global(self) -> dict[str, float]:
        """The global metrics of the last evaluated round."""
        return dict(self.rounds[-1]["global"]) if self.rounds else {}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(rounds, values)`` of a global metric (missing rounds give NaN)."""
        xs = [int(r["round"]) for r in self.rounds]
        return xs, [_num(r.get("global", {}).get(key)) for r in self.rounds]

    def site_series(self, site: str, key: str) -> tuple[list[int], list[float]]:
        """``(rounds, values)`` of one site's reported metric, over the rounds where it replied."""
        xs, ys = [], []
        for r in self.rounds:
            m = r.get("sites", {}).get(site)
            if m is not None:
                xs.append(int(r["round"]))
                ys.append(_num(m.get(key)))
        return xs, ys

    def last_site_metrics(self, site: str) -> dict[str, float]:
        for r in reversed(self.rounds):
            m = r.get("sites", {}).get(site)
            if m is not None and not m.get("declined"):
                return dict(m)
        for r in reversed(self.rounds):
            if site in r.get("sites", {}):
                return dict(r["sites"][site])
        return {}

    def wall_seconds(self) -> float | None:
        """Wall-clock time: start to finish when both are known, else the sum of the recorded rounds."""
        start, end = _time(self.run.get("started")), _time(self.run.get("finished"))
        if start and end and not self.run.get("resumed"):
            return (end - start).total_seconds()
        total = sum(float(r.get("seconds", 0.0)) for r in self.rounds)
        return total or None


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _read_json(path: Path, notes: list[str]) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{path.name} could not be read ({type(exc).__name__}); it is ignored.")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object; it is ignored.")
        return None
    return data


def read_run(path: str | Path) -> RunData:
    """Everything the report needs from one run directory (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise RunDirError(f"{path} is not a folder; give the run directory that `facefl simulate` printed.")
    has_checkpoints = (root / CHECKPOINT_DIR).is_dir() and any((root / CHECKPOINT_DIR).glob("round-*.pt"))
    if not (root / CONFIG_FILE).exists() and not (root / METRICS_FILE).exists() and not has_checkpoints:
        raise RunDirError(f"{path} is not a facefl run directory (no {CONFIG_FILE}, {METRICS_FILE} or "
                          f"{CHECKPOINT_DIR}/).")
    notes: list[str] = []
    saved = _read_json(root / CONFIG_FILE, notes)
    if not (root / CONFIG_FILE).exists():
        notes.append(f"{CONFIG_FILE} is missing; the configuration is taken from the latest checkpoint.")
    raw_cfg = saved.get("config") if saved else None

    checkpoint = None
    if has_checkpoints:
        placeholder = RunConfig()
        checkpoint = RunDirectory(root, placeholder).latest_checkpoint()
        newest = max(int(p.stem.split("-")[1]) for p in (root / CHECKPOINT_DIR).glob("round-*.pt")
                     if p.stem.split("-")[1].isdigit())
        if checkpoint is None:
            notes.append("No checkpoint could be read; model evaluations and images are omitted.")
        elif int(checkpoint["round"]) < newest:
            notes.append(f"The checkpoint of round {newest} is damaged; models are from round "
                         f"{checkpoint['round']}.")
    if raw_cfg is None and checkpoint is not None:
        raw_cfg = checkpoint.get("config")
    if raw_cfg is None:
        raise RunDirError(f"{path} has no readable configuration ({CONFIG_FILE} or a checkpoint); it cannot be "
                          "reported.")
    try:
        cfg = RunConfig.from_saved(raw_cfg)
    except (ValueError, TypeError) as exc:
        raise RunDirError(f"{path}: the saved configuration is not valid ({exc}).") from exc

    metrics = _read_json(root / METRICS_FILE, notes)
    if metrics is None and not (root / METRICS_FILE).exists():
        notes.append(f"{METRICS_FILE} is missing: no per-round curves (the run stopped before its first "
                     "evaluation, or the file was lost).")
    metrics = metrics or {}
    rounds = [r for r in metrics.get("rounds", []) if isinstance(r, dict) and "round" in r]
    rounds.sort(key=lambda r: int(r["round"]))
    privacy = metrics.get("privacy") or (checkpoint or {}).get("privacy") or {}
    run = dict(metrics.get("run") or {})
    data = RunData(path=root, name=root.resolve().name, cfg=cfg, info=dict((saved or {}).get("info") or {}),
                   run=run, rounds=rounds, privacy=privacy,
                   checkpoint_round=int(checkpoint["round"]) if checkpoint else None,
                   state=checkpoint["state_dict"] if checkpoint else None, notes=notes)
    for r in rounds:
        refused = r.get("refused")
        if isinstance(refused, dict) and refused:
            notes.append(f"Round {r['round']}: site{'s' if len(refused) > 1 else ''} {', '.join(sorted(refused))} "
                         "refused the run's app (not approved there); the round went on without "
                         f"{'them' if len(refused) > 1 else 'it'}.")
    if data.status == "failed":
        notes.insert(0, f"The run failed after round {data.completed_rounds} of {cfg.num_rounds}: "
                        f"{str(run.get('error', 'no error recorded')).rstrip('.')}.")
    elif data.interrupted:
        notes.insert(0, f"The run stopped after round {data.completed_rounds} of {cfg.num_rounds} "
                        f"(status '{data.status}': interrupted, or still running). This report shows the "
                        "completed rounds; `facefl simulate --resume` continues it.")
    return data
