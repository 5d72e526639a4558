"""What the report shows: the results :mod:`server.report.build` computes and :mod:`server.report.render` draws.

Plain dataclasses, shared by both modules so that neither imports the other's internals (build imports render;
render imports only this module, the reader's :class:`RunData` and the evaluation's :class:`EmbeddingEval`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.report.evaluate import EmbeddingEval
from server.report.reader import RunData


@dataclass
class Tile:
    """One image in the report: a PNG data URI of released pixels, or a withheld placeholder."""

    uri: str
    released: bool
    caption: str = ""


@dataclass
class VaeSection:
    """The VAE's released images of one run: rows of tiles by kind, the morph frames, its GIF and its alphas."""

    rows: dict[str, list[Tile]]
    morph: list[Tile]
    morph_gif: bytes | None
    morph_alphas: list[float]
    morph_to_a: list[float] | None = None  # dlib descriptor distance of each frame to each source face
    morph_to_b: list[float] | None = None


@dataclass
class GateStats:
    """What the egress gate did for one report."""

    method: str
    released: int = 0
    withheld: int = 0
    faces: int = 0
    distances: list[float] = field(default_factory=list)
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        d = np.asarray(self.distances, dtype=float)
        total = self.released + self.withheld
        return {"method": self.method, "images": total, "released": self.released, "withheld": self.withheld,
                "faces_found": self.faces,
                "reid_distance_min": float(d.min()) if d.size else None,
                "reid_distance_median": float(np.median(d)) if d.size else None,
                "seconds_per_image": self.seconds / total if total else None}


@dataclass
class RunSection:
    """Everything the page shows about one run."""

    data: RunData
    embedding: EmbeddingEval | None = None
    vae: VaeSection | None = None
    evaluation_note: str = ""
    privacy_audit: dict | None = None  # server.privacy_audit.audit_run's result for the latest checkpoint
    privacy_audit_note: str = ""  # why there is none


@dataclass
class ReportResult:
    """The files one ``facefl report`` wrote, and what its egress gate did (None without a gate)."""

    html: Path
    summary: Path
    gifs: list[Path]
    stats: GateStats | None
