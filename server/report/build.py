"""``facefl report``: one self-contained HTML page (and ``summary.json``) for one run or several side by side.

The report reads each run directory (:mod:`server.report.reader`, which copes with interrupted and damaged runs),
evaluates the latest checkpoint on the server's held-out data (:mod:`server.report.evaluate`), passes every face
image through the anonymization egress gate (:class:`common.anonymization.egress.EgressGate`; a refused image is
shown as a grey "withheld" tile and counted), collects the results in the dataclasses of
:mod:`server.report.sections`, and renders the page with :func:`server.report.render.render_report` (a Jinja2
template; charts drawn with matplotlib by :mod:`server.report.charts`). Nothing in the page refers to anything
outside it: charts are inline SVG, images are data URIs. Beside the page it writes ``summary.json`` and, for a VAE,
the morph as an animated GIF.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.atomic import atomic_write_bytes, atomic_write_json, json_safe
from common.data.datasets import DataError
from common.data.sources import eval_data
from common.weights import default_cache_dir
from server.face_judge import load_face_judge
from server.rundir import RunDirError, environment_info
from server.report.evaluate import evaluate_embedding_pairs, models_from_state, vae_images
from server.report.reader import RunData, read_run
from server.report.render import render_report
from server.report.sections import GateStats, ReportResult, RunSection, Tile, VaeSection

log = logging.getLogger("facefl.report")

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
TILE_SIZE = 128  # faces are shown (and anonymized) at this size


def default_out(run_dirs: list[str | Path]) -> Path:
    """``RUN/report.html`` for one run, ``./facefl-report.html`` for several."""
    return Path(run_dirs[0]) / REPORT_FILE if len(run_dirs) == 1 else Path("facefl-report.html")


def summary_path(out: Path) -> Path:
    """``summary.json`` beside ``report.html``; ``NAME.summary.json`` beside any other ``NAME.html``."""
    return out.with_name(SUMMARY_FILE) if out.name == REPORT_FILE else out.with_name(out.stem + ".summary.json")


# ----------------------------------------------------------------------------------------------- images
def png_uri(pixels: np.ndarray) -> str:
    from common.models.morphing import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(Image.fromarray(pixels))).decode()


def _withheld(size: int) -> np.ndarray:
    """A grey tile with a darker cross: clearly not a face."""
    tile = np.full((size, size, 3), 200, np.uint8)
    idx = np.arange(size)
    for off in (-1, 0, 1):
        j = np.clip(idx + off, 0, size - 1)
        tile[idx, j] = 150
        tile[idx, size - 1 - j] = 150
    return tile


def _tile_image(img: torch.Tensor, size: int = TILE_SIZE) -> Image.Image:
    """uint8 ``[3, S, S]`` -> the RGB tile the report shows (and the gate anonymizes)."""
    return Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).resize((size, size), Image.Resampling.BICUBIC)


def release_images(gate, images: torch.Tensor, *, purpose: str, stats: GateStats, size: int = TILE_SIZE,
                   captions: list[str] | None = None) -> list[Tile]:
    """Every image of uint8 ``[N, 3, S, S]`` through ``gate`` at ``size`` pixels; refused ones become withheld
    tiles. Nothing unreleased is ever encoded."""
    from common.anonymization.egress import EgressRefused

    tiles = []
    for i, img in enumerate(images):
        pil = _tile_image(img, size)
        caption = captions[i] if captions else ""
        start = time.perf_counter()
        try:
            released = gate.release(pil, purpose=purpose)
        except EgressRefused as exc:
            stats.withheld += 1
            stats.reasons.append(str(exc))
            tiles.append(Tile(png_uri(_withheld(size)), False, (caption + " " if caption else "") + "(withheld)"))
            continue
        finally:
            stats.seconds += time.perf_counter() - start
        stats.released += 1
        stats.faces += len(released.result.faces)
        stats.distances += [f.reid_distance for f in released.result.faces if f.reid_distance is not None]
        tiles.append(Tile(png_uri(released.pixels), True, caption))
    return tiles


def gif_from_tiles(tiles: list[Tile], frame_ms: int = 150) -> bytes | None:
    """An animated GIF (there and back) of the released frames; None when every frame was withheld."""
    from common.models.morphing import gif_bytes

    if not any(t.released for t in tiles):
        return None
    frames = [Image.open(io.BytesIO(base64.b64decode(t.uri.split(",", 1)[1]))).convert("RGB") for t in tiles]
    return gif_bytes(frames, frame_ms=frame_ms)


# ----------------------------------------------------------------------------------------------- sections
def evaluate_run(data: RunData, gate, stats: GateStats | None, *, image_note: str = "") -> RunSection:
    """Evaluate ``data``'s latest checkpoint on held-out data and release its VAE images through ``gate``."""
    section = RunSection(data)
    if data.state is None:
        section.evaluation_note = "No checkpoint: the run stopped before its first round completed."
        return section
    try:
        models = models_from_state(data.cfg, data.state)
    except ValueError as exc:
        section.evaluation_note = f"The checkpoint does not match the run's configuration ({exc})."
        return section
    try:
        held = eval_data(data.cfg)
    except (DataError, OSError, ValueError) as exc:
        section.evaluation_note = (f"The held-out data ({data.cfg.data or 'synthetic'}) is not available here "
                                   f"({exc}); ROC, distances and VAE images are omitted.")
        return section
    if models.embedding is not None:
        section.embedding = evaluate_embedding_pairs(models.embedding, held)
    if models.vae is not None:
        if gate is None:
            section.evaluation_note = image_note or "Images are omitted: no egress gate."
            return section
        judge = load_face_judge(data.cfg.cache_dir or default_cache_dir())
        images = vae_images(models.vae, held, seed=data.cfg.seed, judge=judge)
        who = data.name
        n = len(images.originals)
        # The held-out originals are other photos of the people whose reconstructions and morphs leave: the gate
        # refuses any released face that matches one of them, not only the image it came from.
        if hasattr(gate, "add_to_gallery"):
            gate.add_to_gallery(_tile_image(img) for img in images.originals)
        rows = {
            "Held-out faces": release_images(gate, images.originals, purpose=f"report:{who}:held-out", stats=stats),
            "Reconstructions": release_images(gate, images.reconstructions, purpose=f"report:{who}:reconstruction",
                                              stats=stats),
            "Samples from the prior": release_images(gate, images.samples, purpose=f"report:{who}:sample",
                                                     stats=stats),
        }
        captions = [f"α={a:.1f}" for a in images.morph_alphas]
        if images.morph_to_a is not None:
            captions = [f"{c} · {da:.2f}/{db:.2f}" for c, da, db in zip(captions, images.morph_to_a,
                                                                          images.morph_to_b)]
        morph = release_images(gate, images.morph, purpose=f"report:{who}:morph", stats=stats, captions=captions)
        section.vae = VaeSection(rows, morph, gif_from_tiles(morph), images.morph_alphas, images.morph_to_a,
                                 images.morph_to_b)
        log.info("report %s: %d held-out faces, reconstructions, samples and %d morph frames through the gate",
                 who, n, len(morph))
    return section


def privacy_audit_for(data: RunData, *, run_audit: bool) -> tuple[dict | None, str]:
    """The run's membership-inference audit of its latest checkpoint: the one in ``privacy_audit.json`` when it is
    of that round, else a new one when ``run_audit`` (a simulated run whose faces are here); ``(audit, note)``."""
    from server.privacy_audit.audit_run import audit_run, load_audit

    if data.state is None:
        return None, "No checkpoint to audit."
    found = load_audit(data.path)
    if found is not None and found.get("round") == data.checkpoint_round and found.get("models"):
        return found, ""  # (a file holding only a canary audit has no membership audit yet)
    if not run_audit:
        if found is not None and found.get("round") == data.checkpoint_round and found.get("canaries"):
            return found, ""
        return None, ("No privacy audit of this checkpoint: run `facefl audit privacy " f"{data.path}`.")
    try:
        return audit_run(data.path), ""
    except (RunDirError, DataError, OSError, ValueError) as exc:
        return None, f"No privacy audit: {exc}"


def load_anonymization(path: str | Path | None, runs: list[RunData]) -> dict | None:
    """A ``facefl bench anonymize`` result (``bench-anonymize.json``): the path given, or one in a run folder."""
    candidates = [Path(path)] if path else [r.path / "bench-anonymize.json" for r in runs]
    for candidate in candidates:
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RunDirError(f"{candidate} is not a readable bench-anonymize result ({exc}).") from exc
            if not isinstance(data, dict) or "reid" not in data:
                raise RunDirError(f"{candidate} is not a `facefl bench anonymize` result (no 'reid').")
            data["source"] = str(candidate)
            return data
        if path:
            raise FileNotFoundError(f"Anonymization benchmark file not found: {candidate}")
    return None


# ----------------------------------------------------------------------------------------------- summary
def run_summary(section: RunSection) -> dict:
    data = section.data
    out = {
        "name": data.name, "path": str(data.path.resolve()), "status": data.status,
        "completed_rounds": data.completed_rounds, "num_rounds": data.cfg.num_rounds,
        "interrupted": data.interrupted, "notes": data.notes, "checkpoint_round": data.checkpoint_round,
        "config": data.cfg.to_mapping(), "versions": data.info.get("versions", {}),
        "started": data.run.get("started"), "finished": data.run.get("finished"),
        "wall_seconds": data.wall_seconds(), "evaluation_data": data.run.get("evaluation"),
        "final": data.final_global(),
        "rounds": [{"round": r["round"], "global": r.get("global", {}), "train": r.get("train", {}),
                    "declined": sorted(r.get("declined", {})), "failed": sorted(r.get("failed", {})),
                    "rejected": sorted(r.get("rejected", {})),
                    "round_rejected": not r.get("guard", {}).get("kept", True),
                    "validation": r.get("guard") or None} for r in data.rounds],
        "privacy": data.privacy,
        "sites": {s: data.last_site_metrics(s) for s in data.sites},
    }
    if section.embedding is not None:
        out["embedding_evaluation"] = section.embedding.summary()
    if section.vae is not None:
        tiles = [t for row in section.vae.rows.values() for t in row] + section.vae.morph
        out["vae_images"] = {"shown": sum(t.released for t in tiles), "withheld": sum(not t.released for t in tiles),
                             "morph_frames": len(section.vae.morph), "morph_alphas": section.vae.morph_alphas}
    if section.evaluation_note:
        out["evaluation_note"] = section.evaluation_note
    if section.privacy_audit is not None:
        out["privacy_audit"] = {model: {k: v for k, v in entry.items() if k != "attacks"} | {
            "attacks": {name: {k: v for k, v in a.items() if not k.startswith("roc_")}
                        for name, a in entry["attacks"].items()}} for model, entry in section.privacy_audit["models"].items()}
    elif section.privacy_audit_note:
        out["privacy_audit_note"] = section.privacy_audit_note
    if section.privacy_audit is not None and section.privacy_audit.get("canaries"):
        out["canary_audit"] = section.privacy_audit["canaries"]
    return out


# ----------------------------------------------------------------------------------------------- entry point
def build_report(run_dirs: list[str | Path], *, out: str | Path | None = None, summary: str | Path | None = None,
                 gate_factory: Callable[[], object] | None = None, anonymization: str | Path | None = None,
                 log_fn: Callable[[str], None] = print, privacy_audit: bool = True) -> ReportResult:
    """Write the report of ``run_dirs`` (one or several runs) and its ``summary.json``.

    ``gate_factory`` builds the egress gate (it may train a stylizer the first time); when it is None or fails,
    the report is written without face images and says why. Raises :class:`RunDirError` when a folder is not a
    facefl run. With ``privacy_audit`` a run without an audit of its latest checkpoint is audited
    (:func:`privacy_audit_for`).
    """
    if not run_dirs:
        raise RunDirError("Give at least one run directory.")
    runs = [read_run(p) for p in run_dirs]  # every folder is checked before anything is computed
    names = [r.name for r in runs]
    for i, run in enumerate(runs):  # distinct labels when two runs share a folder name
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({i + 1})"
    out_path = Path(out) if out else default_out(run_dirs)
    summary_file = Path(summary) if summary else summary_path(out_path)
    bench = load_anonymization(anonymization, runs)

    gate, image_note = None, ""
    needs_images = any(r.cfg.trains_vae and r.state is not None for r in runs)
    if needs_images and gate_factory is not None:
        try:
            gate = gate_factory()
        except Exception as exc:  # noqa: BLE001 - any failure to build the gate means: show no faces
            image_note = f"Face images are omitted: the anonymization gate could not be built ({exc})."
    elif needs_images:
        image_note = "Face images are omitted (no anonymization gate was configured)."
    stats = GateStats(method=_gate_method(gate)) if gate is not None else None

    sections = []
    for run in runs:
        log_fn(f"report: evaluating {run.name} (round {run.checkpoint_round or 0} of {run.cfg.num_rounds})")
        section = evaluate_run(run, gate, stats, image_note=image_note)
        if privacy_audit and run.state is not None and not (run.path / "privacy_audit.json").is_file():
            log_fn(f"report: auditing {run.name} for membership inference (`facefl audit privacy`)")
        section.privacy_audit, section.privacy_audit_note = privacy_audit_for(run, run_audit=privacy_audit)
        sections.append(section)

    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    gifs: list[Path] = []
    gif_names: dict[str, str] = {}
    for section in sections:
        if section.vae is not None and section.vae.morph_gif is not None:
            suffix = "" if len(sections) == 1 else "-" + "".join(c if c.isalnum() else "-" for c in section.data.name)
            gif_path = out_path.with_name(f"{out_path.stem}{suffix}-morph.gif")
            atomic_write_bytes(gif_path, section.vae.morph_gif)
            gifs.append(gif_path)
            gif_names[section.data.name] = gif_path.name
    html = render_report(sections, generated=generated, report_versions=environment_info(), gate=stats,
                         anonymization=bench, image_note=image_note, gif_names=gif_names)
    atomic_write_bytes(out_path, html.encode("utf-8"))
    document = {
        "generated": generated, "report_versions": environment_info(), "html": str(out_path.resolve()),
        "runs": [run_summary(s) for s in sections],
        "anonymization": {"gate": stats.summary() if stats else None, "note": image_note or None,
                          "benchmark": bench},
        "morph_gifs": [str(g.resolve()) for g in gifs],
    }
    atomic_write_json(summary_file, json_safe(document))
    if len(runs) == 1:  # a tracked run's MLflow run gets its report
        from server.tracking import track_report

        track_report(runs[0].path, [out_path, summary_file, *gifs])
    return ReportResult(out_path, summary_file, gifs, stats)


def _gate_method(gate) -> str:
    region = getattr(getattr(gate, "anonymizer", None), "region_filter", None)
    return str(getattr(region, "name", type(region).__name__)) if region is not None else "unknown"
