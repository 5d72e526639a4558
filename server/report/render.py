"""The report's HTML: one self-contained page (inline CSS, inline SVG charts, data-URI images, no scripts).

:func:`render_report` takes the sections :mod:`server.report.build` computed (:mod:`server.report.sections`) and
returns the page as a string. The markup lives in the Jinja2 template ``templates/report.html`` (with its macros in
``templates/macros.html``), rendered with autoescaping on, so every run name, site name, path and note is escaped;
only the chart SVGs, which :mod:`server.report.charts` draws with matplotlib, are inserted as markup. The functions
here only turn sections into plain data for the template: rows of cells, labels, chart SVG strings.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from server.report.charts import Series, histogram, line_chart
from server.report.sections import GateStats, RunSection

TEMPLATES = Path(__file__).with_name("templates")
VERSION_KEYS = ("facefl", "flwr", "torch", "opacus")


def fmt(value, digits: int = 3) -> str:
    """Numbers for tables: NaN and missing as an en dash (the template's ``fmt`` filter; it escapes the result)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "–"
    if v.is_integer() and abs(v) < 1e5:
        return str(int(v))
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def environment() -> Environment:
    """The Jinja2 environment of the report's templates: autoescaping on, undefined names an error."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = fmt
    return env


def _label(section: RunSection, many: bool, what: str = "") -> str:
    if not many:
        return what
    return f"{section.data.name}: {what}" if what else section.data.name


def _versions(versions: dict) -> str:
    return ", ".join(f"{k} {versions[k]}" for k in VERSION_KEYS if k in versions)


# ----------------------------------------------------------------------------------------------- overview
def _dp_text(section: RunSection) -> str:
    d, cfg = section.data, section.data.cfg
    if not cfg.dp:
        return "off"
    sig = ", ".join(f"{x:g}" for x in sorted({round(p.get("noise_multiplier", 0.0), 3) for p in d.privacy.values()}))
    q = ", ".join(f"{x:g}" for x in sorted({round(p.get("sample_rate", 0.0), 4) for p in d.privacy.values()
                                            if p.get("sample_rate")}))
    delta = ", ".join(f"{x:.2e}" for x in sorted({p.get("delta", 0.0) for p in d.privacy.values()}))
    delta = delta or ("1/(10 N)" if not cfg.target_delta else f"{cfg.target_delta:g}")
    clip = {"embedding": cfg.max_grad_norm if cfg.trains_embedding else None,
            "VAE": cfg.vae_max_grad_norm if cfg.trains_vae else None}
    clips = [f"{v:g} ({k})" for k, v in clip.items() if v is not None]
    clip_text = clips[0].split(" ")[0] if len(clips) == 1 else ", ".join(clips)
    return (f"DP-SGD (Opacus), noise multiplier σ={sig or '–'}, clip C={clip_text}, "
            f"sampling rate q={q or 'not recorded'} (Poisson), accountant {cfg.accountant.upper()}, "
            f"δ={delta}, budget ε={cfg.target_epsilon:g} per site")


def _strategy_text(cfg) -> str:
    return (cfg.strategy + (f" (μ={cfg.proximal_mu:g})" if cfg.strategy == "fedprox" else "")
            + (f" (server lr {cfg.server_lr:g})" if cfg.strategy == "fedadam" else "")
            + (f", {cfg.aggregator} aggregation" + (f" (trim {cfg.trim_fraction:g})" if cfg.aggregator == "trimmed-mean"
                                                    else "") if cfg.aggregator != "mean" else "")
            + (f", updates above norm {cfg.max_update_norm:g} rejected" if cfg.max_update_norm else "")
            + (f", secure aggregation (SecAgg+: the server saw only the sum of the updates; threshold "
               f"{cfg.secagg_threshold:g}, clip ±{cfg.secagg_clip_range:g})" if cfg.secure_aggregation else ""))


def _overview_column(section: RunSection) -> list[tuple[str, str]]:
    d, cfg = section.data, section.data.cfg
    split = f"{cfg.partition}" + (f" (Dirichlet α={cfg.dirichlet_alpha:g})" if cfg.partition == "dirichlet" else "")
    split += (f", at most {cfg.max_identities} identities" if cfg.max_identities else "")
    split += (f"; {cfg.heldout_fraction:.0%} of identities held out for evaluation, {cfg.val_fraction:.0%} of each "
              "site's images for validation")
    wall = d.wall_seconds()
    return [
        ("Run", f"{d.name} — {d.path.resolve()}"),
        ("Started / finished", f"{d.run.get('started', '–')} / {d.run.get('finished', '–')} (status {d.status})"),
        ("Versions (run)", _versions(d.info.get("versions") or {}) or "not recorded by this run"),
        ("Dataset", f"{cfg.data or 'synthetic faces'}; evaluation: {d.run.get('evaluation', '–')}"),
        ("Split across sites", split),
        ("Sites", f"{len(d.sites)}: {', '.join(d.sites) or '–'}"),
        ("Rounds", f"{d.completed_rounds} completed of {cfg.num_rounds} planned"),
        ("Strategy", f"{_strategy_text(cfg)}, fraction of sites per round {cfg.fraction_train:g}, "
                     f"at least {cfg.min_sites}"),
        ("Task(s)", {"both": "face embedding + VAE", "embedding": "face embedding", "vae": "VAE"}[cfg.task]
         + f"; {cfg.model} embedding ({cfg.embedding_dim}-d, {cfg.loss})" * cfg.trains_embedding
         + f"; VAE latent {cfg.latent_channels}×{cfg.image_size // 4}×{cfg.image_size // 4}, β={cfg.vae_beta:g}" * cfg.trains_vae
         + f"; {cfg.local_epochs} local epoch(s), batch {cfg.batch_size}, {cfg.image_size}px faces"),
        ("Differential privacy", _dp_text(section)),
        ("Wall-clock time", f"{wall / 60:.1f} min" if wall else "–"),
    ]


def overview(sections: list[RunSection]) -> list[tuple[str, list[str]]]:
    """One row per property, one value per run."""
    columns = [_overview_column(s) for s in sections]
    return [(key, [col[i][1] for col in columns]) for i, (key, _) in enumerate(columns[0])]


def notices(sections: list[RunSection], image_note: str) -> list[tuple[str, str]]:
    """``(run name, text)`` of every note; the run name is empty for the report's own note."""
    items = [(s.data.name, n) for s in sections for n in s.data.notes]
    items += [(s.data.name, s.evaluation_note) for s in sections
              if s.evaluation_note and s.evaluation_note != image_note]
    return items + ([("", image_note)] if image_note else [])


def comparison(sections: list[RunSection]) -> list[list] | None:
    """One row per run for the "Runs compared" table; None for a single run."""
    if len(sections) < 2:
        return None
    rows = []
    for s in sections:
        d, f = s.data, s.data.final_global()
        eps = max([p.get("epsilon", 0.0) for p in d.privacy.values()] or [0.0]) if d.cfg.dp else None
        rows.append([d.name, d.cfg.task, d.cfg.strategy, "on" if d.cfg.dp else "off", eps,
                     f"{d.completed_rounds}/{d.cfg.num_rounds}", f.get("embedding/accuracy"),
                     f.get("embedding/roc_auc"), f.get("embedding/tar@far=1e-2"), f.get("vae/psnr"), f.get("vae/ssim"),
                     (d.wall_seconds() or math.nan) / 60])
    return rows


# ----------------------------------------------------------------------------------------------- charts
def _metric_chart(sections: list[RunSection], keys: list[tuple[str, str]], title: str, y_label: str,
                  y_range=None) -> str:
    many = len(sections) > 1
    series = []
    for i, s in enumerate(sections):
        for key, name in keys:
            xs, ys = s.data.series(key)
            if any(math.isfinite(y) for y in ys):
                series.append(Series(_label(s, many, name) if len(keys) > 1 or many else name, xs, ys,
                                     dashed=bool(i % 2) and many))
    if not series:
        return ""
    return line_chart(series, title=title, x_label="round", y_label=y_label, integer_x=True, y_range=y_range)


def _site_series(sections: list[RunSection], key: str, *, privacy: bool = False) -> list[Series]:
    """One series per site of every run (dashed for every other run) of a metric the sites report each round,
    for the sites with a value. ``privacy``: ε, of the runs with DP, for every site that replied in any round."""
    many = len(sections) > 1
    series = []
    for i, s in enumerate(sections):
        if privacy and not s.data.cfg.dp:
            continue
        for site in s.data.sites:
            xs, ys = s.data.site_series(site, key)
            shown = bool(xs) if privacy else any(math.isfinite(y) for y in ys)
            if shown:
                series.append(Series(_label(s, many, site) or site, xs, ys, dashed=bool(i % 2)))
    return series


def learning_curves(sections: list[RunSection]) -> dict:
    """Chart rows of the learning-curves section: ``embedding`` and ``vae`` (None when no run trains that model)
    and ``loss`` (each site's training loss)."""
    emb = [s for s in sections if s.data.cfg.trains_embedding]
    vae = [s for s in sections if s.data.cfg.trains_vae]
    tar_keys = [("embedding/" + k, k.replace("tar@far=", "TAR@FAR ")) for k in ("tar@far=1e-1", "tar@far=1e-2",
                                                                               "tar@far=1e-3")]
    loss = []
    for key, title in (("embedding-train-loss", "Embedding training loss by site"),
                       ("vae-train-loss", "VAE training loss by site")):
        series = _site_series(sections, key)
        if series:
            loss.append(line_chart(series, title=title, x_label="round", y_label="loss", integer_x=True))
    guard = guard_rows(sections)
    rejected = sum(row[-1].startswith("REJECTED") for row in guard)
    return {
        "guard": guard,
        "guard_summary": f"{rejected} of {len(guard)} rounds rejected." if guard else "",
        "embedding": [
            _metric_chart(emb, [("embedding/accuracy", "accuracy"), ("embedding/roc_auc", "ROC AUC")],
                          "Verification accuracy and ROC AUC", ""),
            _metric_chart(emb, tar_keys, "TAR at fixed FAR", "TAR"),
        ] if emb else None,
        "vae": [_metric_chart(vae, [("vae/psnr", "PSNR")], "VAE PSNR", "dB"),
                _metric_chart(vae, [("vae/ssim", "SSIM")], "VAE SSIM", "SSIM"),
                _metric_chart(vae, [("vae/identity-kept", "identity kept"), ("vae/morph-ends-matched",
                                                                             "morph ends matched")],
                              "VAE faces dlib still recognizes", "share"),
                _metric_chart(vae, [("vae/frechet-samples", "prior samples"), ("vae/frechet-recon", "reconstructions"),
                                    ("vae/frechet-reference", "real vs real")],
                              "Frechet distance in dlib's descriptor space", "distance")] if vae else None,
        "loss": loss,
    }


def guard_rows(sections: list[RunSection]) -> list[list]:
    """One row per round the server's guard judged (``server.round_guard``): run, round, the aggregate's validation
    ROC AUC and accuracy, the best AUC before it, and whether the round was kept or rejected."""
    rows = []
    for s in sections:
        for r in s.data.rounds:
            g = r.get("guard") or {}
            if g:
                rows.append([s.data.name, r["round"], f"{g['validation_auc']:.5f}", f"{g['validation_accuracy']:.3f}",
                             f"{g['best_auc_before']:.5f}", f"{g.get('tolerance', 0.0):g}",
                             ("kept" if g.get("enabled", True) else "kept (reject-worse-rounds off)") if g["kept"]
                             else "REJECTED: the previous global model was kept"])
    return rows


# ----------------------------------------------------------------------------------------------- privacy
def privacy(sections: list[RunSection]) -> dict:
    """The cumulative-ε chart ('' without DP) and, per run, its name (when several), whether it used DP and one
    ε-table row per site."""
    many = len(sections) > 1
    series = _site_series(sections, "epsilon", privacy=True)
    budgets = [(f"budget ε={s.data.cfg.target_epsilon:g}" + (f" ({s.data.name})" if many else ""),
                s.data.cfg.target_epsilon) for s in sections if s.data.cfg.dp]
    chart = ""
    if series:
        top = max([b for _, b in budgets] + [y for s in series for y in s.y if math.isfinite(y)])
        chart = line_chart(series, title="Cumulative ε by round, per site", x_label="round", y_label="ε",
                           integer_x=True, hlines=budgets, y_range=(0.0, top * 1.08 or 1.0))
    runs = []
    for s in sections:
        d = s.data
        rows = [[site, p.get("epsilon"), p.get("target_epsilon", d.cfg.target_epsilon), p.get("delta"),
                 p.get("noise_multiplier"), p.get("sample_rate"), p.get("rounds_trained", 0),
                 p.get("rounds_declined", 0)]
                for site, p in ((site, d.privacy.get(site, {})) for site in d.sites)]
        runs.append({"name": d.name if many else "", "dp": d.cfg.dp, "rows": rows})
    return {"chart": chart, "runs": runs}


MODEL_NAMES = {"embedding": "embedding", "vae": "VAE"}


def membership(sections: list[RunSection]) -> dict | None:
    """The membership-inference audit: ROC charts (linear and log FPR) per model, one table row per run, model and
    attack, and the runs without an audit with the reason; None when no run has an audit or a note."""
    audited = [s for s in sections if s.privacy_audit is not None]
    notes = [(s.data.name, s.privacy_audit_note) for s in sections if s.privacy_audit is None and s.privacy_audit_note]
    if not audited and not notes:
        return None
    many = len(sections) > 1
    charts, rows = [], []
    for model in ("embedding", "vae"):
        series = []
        for s in audited:
            entry = s.privacy_audit["models"].get(model)
            if entry is None:
                continue
            for name, a in entry["attacks"].items():
                label = name + (f" — {s.data.name}" if many else "")
                series.append(Series(label, a["roc_fpr"], a["roc_tpr"], markers=False))
                eps = entry["accountant_epsilon"]
                rows.append([s.data.name, MODEL_NAMES[model], name, a["auc"],
                             f"{a['auc_ci'][0]:.3f}–{a['auc_ci'][1]:.3f}", a["tpr_at_fpr_1pct"],
                             a["tpr_at_fpr_0.1pct"], a["epsilon_lower_bound"], a["epsilon_estimate"],
                             eps if math.isfinite(eps) else "no DP", f"{a['members']} / {a['non_members']}"])
        if series:
            title = f"Membership inference, {MODEL_NAMES[model]}"
            charts.append(line_chart(series, title=title, x_label="false positive rate",
                                     y_label="true positive rate", x_range=(0.0, 1.0), y_range=(0.0, 1.0),
                                     diagonal=True))
            charts.append(line_chart(series, title=title + ", log scales", x_label="false positive rate (log)",
                                     y_label="true positive rate (log)", x_log=True, y_log=True,
                                     x_range=(1e-3, 1.0), y_range=(1e-3, 1.0), diagonal=True))
    first = audited[0].privacy_audit if audited else {}
    attacks = {}
    for s in audited:
        for model, entry in s.privacy_audit["models"].items():
            for name, a in entry["attacks"].items():
                attacks[f"{MODEL_NAMES[model]}, {name}"] = a.get("description", "")
    return {"charts": charts, "rows": rows, "notes": notes, "game": first.get("game", ""),
            "reference": first.get("reference", ""), "limits": first.get("limits", ""),
            "confidence": first.get("confidence", 0.95), "attacks": list(attacks.items()),
            "canaries": canary_rows(audited)}


def canary_rows(audited: list[RunSection]) -> dict | None:
    """The one-run canary audit (``facefl audit canaries``): one row per run and setting, each bound beside the
    largest bound its canaries could certify and the accountant's epsilon; None when no run has one."""
    rows, whats, limits = [], [], ""
    for s in audited:
        c = s.privacy_audit.get("canaries")
        if not c:
            continue
        limits = c.get("limits", "")
        eps = c["accountant_epsilon"]
        for setting, e in c["settings"].items():
            rows.append([s.data.name, setting, e["canaries"], e["included"], e["guesses"], e["correct"],
                         e["epsilon_lower_bound"], e["max_certifiable"], eps if math.isfinite(eps) else "no DP",
                         f"{e['delta']:.1e}", f"{e['confidence']:.0%}"])
            whats.append((setting, e.get("what", "")))
    return {"rows": rows, "whats": list(dict(whats).items()), "limits": limits} if rows else None


# ----------------------------------------------------------------------------------------------- evaluation
def embedding_eval(sections: list[RunSection]) -> dict | None:
    """ROC charts, one pair-distance histogram per run, and one metrics row per run; None when nothing was
    evaluated."""
    evaluated = [s for s in sections if s.embedding is not None]
    if not evaluated:
        return None
    many = len(sections) > 1
    roc = [Series(_label(s, many, "ROC") or "ROC", s.embedding.fpr.tolist(), s.embedding.tpr.tolist(), markers=False,
                  dashed=bool(i % 2) and many) for i, s in enumerate(evaluated)]
    charts = [line_chart(roc, title="ROC (held-out pairs)", x_label="false accept rate", y_label="true accept rate",
                         x_range=(0.0, 1.0), y_range=(0.0, 1.0), diagonal=True),
              line_chart(roc, title="ROC, log FAR", x_label="false accept rate (log)", y_label="true accept rate",
                         x_log=True, x_range=(1e-3, 1.0), y_range=(0.0, 1.0), diagonal=True)]
    for s in evaluated:
        e = s.embedding
        threshold = 1.0 - e.metrics["threshold"]
        charts.append(histogram([("same person", e.matched_distances.tolist()),
                                 ("different people", e.mismatched_distances.tolist())],
                                title="Pair distances" + (f" — {s.data.name}" if many else ""),
                                x_label="cosine distance", y_label="fraction of pairs",
                                vlines=[(f"threshold {threshold:.3f}", threshold)]))
    rows = [[s.data.name, s.embedding.pairs, *(s.embedding.metrics.get(k) for k in (
        "accuracy", "roc_auc", "tar@far=1e-1", "tar@far=1e-2", "tar@far=1e-3"))] for s in evaluated]
    return {"evaluation": str(evaluated[0].data.run.get("evaluation", "")), "charts": charts, "rows": rows}


VAE_QUALITY = (  # (metric, label, format) of the VAE's last evaluated round
    ("vae/psnr", "PSNR (dB)", "{:.2f}"), ("vae/ssim", "SSIM", "{:.3f}"),
    ("vae/identity-kept", "identity kept (dlib matches the reconstruction to its input)", "{:.1%}"),
    ("vae/descriptor-distance", "mean descriptor distance, reconstruction to input (dlib's threshold: 0.6)", "{:.3f}"),
    ("vae/frechet-samples", "Frechet distance in dlib's descriptor space: prior samples vs real faces", "{:.3f}"),
    ("vae/frechet-recon", "the same for reconstructions", "{:.3f}"),
    ("vae/frechet-reference", "the same between two disjoint sets of real held-out faces (the floor)", "{:.3f}"),
    ("vae/morph-ends-matched", "morphs whose end frames dlib matches to their source faces", "{:.1%}"),
    ("vae/morph-smooth", "morphs with no step between frames above 0.25 (descriptor units)", "{:.1%}"),
)


def vae_quality(final: dict[str, float]) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the VAE's face-aware metrics in a run's last round (those it has)."""
    return [(label, fmt.format(final[key])) for key, label, fmt in VAE_QUALITY
            if isinstance(final.get(key), (int, float)) and math.isfinite(final[key])]


def vae_section(sections: list[RunSection], gif_names: dict[str, str]) -> list[dict] | None:
    """Per run with VAE images: its name (when several), rows of tiles, the morph and its GIF; None when none."""
    shown = [s for s in sections if s.vae is not None]
    if not shown:
        return None
    runs = []
    for s in shown:
        alphas = s.vae.morph_alphas
        gif = s.vae.morph_gif
        runs.append({
            "name": s.data.name if len(sections) > 1 else "",
            "rows": list(s.vae.rows.items()),
            "morph": s.vae.morph,
            "step": f"{alphas[1] - alphas[0] if len(alphas) > 1 else 1.0:.2g}",
            "gif_uri": "data:image/gif;base64," + base64.b64encode(gif).decode() if gif is not None else "",
            "gif_name": gif_names.get(s.data.name, ""),
            "quality": vae_quality(s.data.final_global()),
            "judged_morph": s.vae.morph_to_a is not None,
        })
    return runs


def tradeoff_chart(curve: dict | None) -> str | None:
    """The stylizer's strength against dlib's match rate and top-1 and the two detectors' retention, with blur r8's
    match rate and HOG retention as reference lines (``facefl bench anonymize``'s ``curve``); None without one."""
    points = (curve or {}).get("points") or []
    if not points:
        return None
    x = [p.get("strength") for p in points]
    series = [Series(label, x, [p.get(key) for p in points]) for label, key in (
        ("dlib match rate", "match_rate"), ("dlib top-1", "top1"), ("MTCNN finds the face", "detection_rate"),
        ("HOG finds the face", "hog_retention"))]
    refs = []
    blur = (curve.get("references") or {}).get("blur r8, whole image") or {}
    if isinstance(blur.get("match_rate"), (int, float)):
        refs.append(("blur r8: match", blur["match_rate"]))
    if isinstance(blur.get("hog_retention"), (int, float)):
        refs.append(("blur r8: HOG", blur["hog_retention"]))
    return line_chart(series, title=f"Privacy against utility: {curve.get('stylizer', 'stylizer')}",
                      x_label="strength", y_label="fraction of people", y_range=(0.0, 1.0), hlines=refs)


def anonymization_section(gate: GateStats | None, bench: dict | None) -> dict | None:
    """The gate's row for this report's images and the re-identification benchmark's rows; None without both."""
    if gate is None and bench is None:
        return None
    out: dict = {"gate": None, "bench": None}
    if gate is not None:
        g = gate.summary()
        out["gate"] = [g["method"], g["images"], g["released"], g["withheld"], g["faces_found"],
                       g["reid_distance_min"], g["reid_distance_median"], g["seconds_per_image"]]
    if bench is not None:
        speed = {k: v for k, v in (bench.get("speed") or {}).items() if isinstance(v, (int, float))}
        out["bench"] = {
            "source": str(bench.get("source", "")), "recognizer": str(bench.get("recognizer", "dlib")),
            "rows": [[r.get("name", ""), r.get("people"), r.get("match_rate"), r.get("top1"), r.get("chance"),
                      r.get("detection_rate"), r.get("landmark_displacement"), r.get("hog_retention"),
                      r.get("source_match_rate"), r.get("gate_withheld_rate")]
                     for r in bench.get("reid", []) + bench.get("reid_heldout", [])],
            "speed": [[k.replace("_", " "), v] for k, v in speed.items()],
            "curve": tradeoff_chart(bench.get("curve")),
        }
    return out


def sites_table(sections: list[RunSection]) -> list[dict]:
    """Per run: its name (when several) and one row per site."""
    runs = []
    for s in sections:
        d = s.data
        rows = []
        for site in d.sites:
            m, p = d.last_site_metrics(site), d.privacy.get(site, {})
            rows.append([site, m.get("num-examples"), m.get("num-identities"), p.get("rounds_trained"),
                         p.get("rounds_declined"), m.get("embedding-train-loss"), m.get("embedding-val-accuracy"),
                         m.get("vae-train-loss"), m.get("vae-val-loss"), p.get("epsilon") if d.cfg.dp else None])
        runs.append({"name": d.name if len(sections) > 1 else "", "rows": rows})
    return runs


def render_report(sections: list[RunSection], *, generated: str, report_versions: dict, gate: GateStats | None,
                  anonymization: dict | None, image_note: str, gif_names: dict[str, str]) -> str:
    """The whole page for ``sections`` (one per run, in order)."""
    return environment().get_template("report.html").render(
        title="facefl report: " + ", ".join(s.data.name for s in sections),
        generated=generated,
        report_versions=_versions(report_versions),
        notices=notices(sections, image_note),
        overview=overview(sections),
        comparison=comparison(sections),
        curves=learning_curves(sections),
        privacy=privacy(sections),
        membership=membership(sections),
        embedding=embedding_eval(sections),
        vae=vae_section(sections, gif_names),
        anonymization=anonymization_section(gate, anonymization),
        sites=sites_table(sections),
    )
