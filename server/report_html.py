"""The report's HTML: one self-contained page (inline CSS, inline SVG plots, data-URI images, no scripts).

:func:`render_report` takes the sections :mod:`server.report` computed and returns the page as a string.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence

import numpy as np

from common.svgplot import Series, histogram, line_chart
from server.report import GateStats, RunSection, Tile

CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2430; background: #f5f6f8; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 36px 0 8px; border-bottom: 1px solid #dde1e7; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 22px 0 6px; }
nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #dde1e7; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.notice { background: #fff4d6; border: 1px solid #e8c45c; padding: 10px 14px; border-radius: 4px; margin: 12px 0; }
.muted { color: #5b6573; font-size: 13px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.charts svg { border: 1px solid #e6e9ee; border-radius: 4px; }
.row { display: flex; gap: 10px; align-items: flex-start; margin: 8px 0; }
.row > .label { flex: 0 0 150px; padding-top: 50px; font-size: 14px; }
.tiles { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; text-align: center; font-size: 12px; color: #5b6573; }
figure img { display: block; width: 128px; height: 128px; image-rendering: auto; border-radius: 3px; }
.withheld img { outline: 2px solid #c0392b; }
.privacy-text { max-width: 900px; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    """Numbers for tables: NaN and missing as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return esc(value)
    if not math.isfinite(v):
        return "–"
    if v.is_integer() and abs(v) < 1e5:
        return str(int(v))
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence], *, cls: str = "", numeric_from: int = 1) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if isinstance(cell, str):
                cells.append(f"<td>{esc(cell)}</td>")
            else:
                klass = ' class="num"' if i >= numeric_from else ""
                cells.append(f"<td{klass}>{fmt(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _label(section: RunSection, many: bool, what: str = "") -> str:
    if not many:
        return what
    return f"{section.data.name}: {what}" if what else section.data.name


# ----------------------------------------------------------------------------------------------- sections
def overview(sections: list[RunSection], generated: str, report_versions: dict) -> str:
    columns = []
    for s in sections:
        d, cfg = s.data, s.data.cfg
        versions = d.info.get("versions") or {}
        v = ", ".join(f"{k} {versions[k]}" for k in ("facefl", "flwr", "torch", "opacus") if k in versions) \
            or "not recorded by this run"
        split = f"{cfg.partition}" + (f" (Dirichlet α={cfg.dirichlet_alpha:g})" if cfg.partition == "dirichlet" else "")
        split += (f", at most {cfg.max_identities} identities" if cfg.max_identities else "")
        split += f"; {cfg.heldout_fraction:.0%} of identities held out for evaluation, {cfg.val_fraction:.0%} of each site's images for validation"
        dp = "off"
        if cfg.dp:
            sig = sorted({round(p.get("noise_multiplier", 0.0), 3) for p in d.privacy.values()})
            q = sorted({round(p.get("sample_rate", 0.0), 4) for p in d.privacy.values() if p.get("sample_rate")})
            delta = sorted({p.get("delta", 0.0) for p in d.privacy.values()})
            dp = (f"DP-SGD (Opacus), noise multiplier σ={', '.join(f'{x:g}' for x in sig) or '–'}, clip C={cfg.max_grad_norm:g}, "
                  f"sampling rate q={', '.join(f'{x:g}' for x in q) or 'not recorded'} (Poisson), accountant {cfg.accountant.upper()}, "
                  f"δ={', '.join(f'{x:.2e}' for x in delta) or ('1/(10 N)' if not cfg.target_delta else f'{cfg.target_delta:g}')}, "
                  f"budget ε={cfg.target_epsilon:g} per site")
        strategy = cfg.strategy + (f" (μ={cfg.proximal_mu:g})" if cfg.strategy == "fedprox" else "") + \
            (f" (server lr {cfg.server_lr:g})" if cfg.strategy == "fedadam" else "") + \
            (f", {cfg.aggregator} aggregation" + (f" (trim {cfg.trim_fraction:g})" if cfg.aggregator == "trimmed-mean"
                                                  else "") if cfg.aggregator != "mean" else "") + \
            (f", updates above norm {cfg.max_update_norm:g} rejected" if cfg.max_update_norm else "") + \
            (f", secure aggregation (SecAgg+: the server saw only the sum of the updates; threshold "
             f"{cfg.secagg_threshold:g}, clip ±{cfg.secagg_clip_range:g})" if cfg.secure_aggregation else "")
        wall = d.wall_seconds()
        columns.append([
            ("Run", f"{d.name} — {d.path.resolve()}"),
            ("Started / finished", f"{d.run.get('started', '–')} / {d.run.get('finished', '–')} (status {d.status})"),
            ("Versions (run)", v),
            ("Dataset", f"{cfg.data or 'synthetic faces'}; evaluation: {d.run.get('evaluation', '–')}"),
            ("Split across sites", split),
            ("Sites", f"{len(d.sites)}: {', '.join(d.sites) or '–'}"),
            ("Rounds", f"{d.completed_rounds} completed of {cfg.num_rounds} planned"),
            ("Strategy", f"{strategy}, fraction of sites per round {cfg.fraction_train:g}, at least {cfg.min_sites}"),
            ("Task(s)", {"both": "face embedding + VAE", "embedding": "face embedding", "vae": "VAE"}[cfg.task]
             + f"; {cfg.model} embedding ({cfg.embedding_dim}-d, {cfg.loss})" * cfg.trains_embedding
             + f"; VAE latent {cfg.latent_dim}, β={cfg.vae_beta:g}" * cfg.trains_vae
             + f"; {cfg.local_epochs} local epoch(s), batch {cfg.batch_size}, {cfg.image_size}px faces"),
            ("Differential privacy", dp),
            ("Wall-clock time", f"{wall / 60:.1f} min" if wall else "–"),
        ])
    report_v = ", ".join(f"{k} {report_versions[k]}" for k in ("facefl", "flwr", "torch", "opacus") if k in report_versions)
    # One column per run, one row per property.
    body = "".join(f"<tr><th>{esc(key)}</th>" + "".join(f"<td>{esc(col[i][1])}</td>" for col in columns) + "</tr>"
                   for i, (key, _) in enumerate(columns[0]))
    generated_line = f'<p class="muted">Report generated {esc(generated)} with {esc(report_v)}.</p>'
    return f'<section id="overview"><h2>Overview</h2><table class="overview">{body}</table>{generated_line}</section>'


def notices(sections: list[RunSection], image_note: str) -> str:
    items = [f"<strong>{esc(s.data.name)}</strong>: {esc(n)}" for s in sections for n in s.data.notes]
    items += [f"<strong>{esc(s.data.name)}</strong>: {esc(s.evaluation_note)}" for s in sections if s.evaluation_note
              and s.evaluation_note != image_note]
    if image_note:
        items.append(esc(image_note))
    if not items:
        return ""
    return '<div class="notice" id="notices">' + "<br>".join(items) + "</div>"


def _chart_row(charts: list[str]) -> str:
    return '<div class="charts">' + "".join(c for c in charts if c) + "</div>"


def _metric_chart(sections, keys: list[tuple[str, str]], title: str, y_label: str, y_range=None) -> str:
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


def learning_curves(sections: list[RunSection]) -> str:
    parts = ['<section id="curves"><h2>Learning curves</h2>',
             '<p class="muted">Global models evaluated by the server after every round on held-out people that no '
             'site trains on (round 0 is the initial model).</p>']
    emb = [s for s in sections if s.data.cfg.trains_embedding]
    if emb:
        tar_keys = [(k, k.replace("tar@far=", "TAR@FAR ")) for k in ("tar@far=1e-1", "tar@far=1e-2", "tar@far=1e-3")]
        parts.append("<h3>Face embedding (verification)</h3>")
        parts.append(_chart_row([
            _metric_chart(emb, [("embedding/accuracy", "accuracy"), ("embedding/roc_auc", "ROC AUC")],
                          "Verification accuracy and ROC AUC", "", y_range=None),
            _metric_chart(emb, [("embedding/" + k, n) for k, n in tar_keys], "TAR at fixed FAR", "TAR"),
        ]))
    vae = [s for s in sections if s.data.cfg.trains_vae]
    if vae:
        parts.append("<h3>VAE (reconstruction of held-out faces)</h3>")
        parts.append(_chart_row([_metric_chart(vae, [("vae/psnr", "PSNR")], "VAE PSNR", "dB"),
                                 _metric_chart(vae, [("vae/ssim", "SSIM")], "VAE SSIM", "SSIM")]))
    charts = []
    for key, title in (("embedding-train-loss", "Embedding training loss by site"),
                       ("vae-train-loss", "VAE training loss by site")):
        series = []
        for i, s in enumerate(sections):
            for site in s.data.sites:
                xs, ys = s.data.site_series(site, key)
                if any(math.isfinite(y) for y in ys):
                    series.append(Series(_label(s, len(sections) > 1, site) or site, xs, ys, dashed=bool(i % 2)))
        if series:
            charts.append(line_chart(series, title=title, x_label="round", y_label="loss", integer_x=True))
    if charts:
        parts.append("<h3>Each site's local training loss</h3>" + _chart_row(charts))
    parts.append("</section>")
    return "".join(parts)


PRIVACY_TEXT = """
<p>Each site trains with DP-SGD (Opacus): every example's gradient is clipped to norm C and Gaussian noise of
standard deviation σ·C is added to each batch sum. The site's own accountant composes every step of every round it
trained, across restarts (its ledger is kept in its state directory), into the ε shown here; a site declines a round
rather than exceed its budget.</p>
<p><strong>What ε covers.</strong> (ε, δ) <em>example-level</em> differential privacy <em>for each site separately</em>:
adding or removing any one face image from that site's training data changes the distribution of everything the site
sends (its model updates) by at most e<sup>ε</sup> (with probability of failure δ), and so of everything computed from
those updates: the global models, the curves and the model outputs in this report.</p>
<p><strong>What it does not cover.</strong> A person with several photos at a site is protected only with a weaker,
group-level guarantee (roughly k·ε for k photos); a person whose photos are at several sites is covered by each site's
ε separately, and these add up. It says nothing about what a site does with its data locally, about metadata such as
the number of examples and identities each site reports (shown below), or about the server's held-out evaluation
faces, which are not trained on. It assumes the noise is drawn from a secure random generator (see the README's
privacy section). The anonymization of images in this report (style transfer, checked by an independent
recognizer) is a separate, <em>empirical</em> protection, measured by re-identification rates; it carries no formal
guarantee.</p>
"""


def privacy(sections: list[RunSection]) -> str:
    parts = ['<section id="privacy"><h2>Privacy</h2>']
    many = len(sections) > 1
    series, budgets = [], []
    for i, s in enumerate(sections):
        if not s.data.cfg.dp:
            continue
        for site in s.data.sites:
            xs, ys = s.data.site_series(site, "epsilon")
            if xs:
                series.append(Series(_label(s, many, site) or site, xs, ys, dashed=bool(i % 2)))
        budgets.append((f"budget ε={s.data.cfg.target_epsilon:g}" + (f" ({s.data.name})" if many else ""),
                        s.data.cfg.target_epsilon))
    if series:
        top = max([b for _, b in budgets] + [y for s in series for y in s.y if math.isfinite(y)])
        parts.append(_chart_row([line_chart(series, title="Cumulative ε by round, per site", x_label="round",
                                            y_label="ε", integer_x=True, hlines=budgets,
                                            y_range=(0.0, top * 1.08 or 1.0))]))
    for s in sections:
        d = s.data
        if many:
            parts.append(f"<h3>{esc(d.name)}</h3>")
        if not d.cfg.dp:
            parts.append("<p><strong>This run did not use differential privacy</strong>: its model updates carry no "
                         "formal privacy guarantee.</p>")
            continue
        rows = []
        for site in d.sites:
            p = d.privacy.get(site, {})
            rows.append([site, p.get("epsilon"), p.get("target_epsilon", d.cfg.target_epsilon), p.get("delta"),
                         p.get("noise_multiplier"), p.get("sample_rate"), p.get("rounds_trained", 0),
                         p.get("rounds_declined", 0)])
        parts.append(table(["site", "ε spent", "ε budget", "δ", "noise σ", "sampling q", "rounds trained",
                            "rounds declined"], rows, cls="epsilon-table"))
    parts.append(f'<div class="privacy-text">{PRIVACY_TEXT}</div></section>')
    return "".join(parts)


def embedding_eval(sections: list[RunSection]) -> str:
    evaluated = [s for s in sections if s.embedding is not None]
    if not evaluated:
        return ""
    many = len(sections) > 1
    parts = ['<section id="embedding"><h2>Embedding evaluation</h2>',
             f'<p class="muted">Latest checkpoint of each run on the held-out pairs '
             f'({esc(evaluated[0].data.run.get("evaluation", ""))}); similarity is the cosine of flip-averaged '
             'embeddings, distance is 1 − cosine.</p>']
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
    parts.append(_chart_row(charts))
    rows = []
    for s in evaluated:
        m = s.embedding.metrics
        rows.append([s.data.name, s.embedding.pairs, m.get("accuracy"), m.get("roc_auc"), m.get("tar@far=1e-1"),
                     m.get("tar@far=1e-2"), m.get("tar@far=1e-3")])
    parts.append(table(["run", "pairs", "accuracy", "ROC AUC", "TAR@FAR 1e-1", "TAR@FAR 1e-2", "TAR@FAR 1e-3"], rows))
    parts.append('<p class="muted">A TAR@FAR value is shown only where the held-out set has enough different-person '
                 'pairs to measure that false accept rate (at least 1/FAR of them).</p></section>')
    return "".join(parts)


def _tile(t: Tile) -> str:
    klass = "" if t.released else ' class="withheld"'
    alt = "anonymized face" if t.released else "withheld by the egress gate"
    return f'<figure{klass}><img src="{t.uri}" alt="{esc(alt)}" width="128" height="128"><figcaption>{esc(t.caption)}</figcaption></figure>'


def _row(label: str, tiles: list[Tile]) -> str:
    return f'<div class="row"><div class="label">{esc(label)}</div><div class="tiles">{"".join(map(_tile, tiles))}</div></div>'


def vae_section(sections: list[RunSection], gif_names: dict[str, str]) -> str:
    shown = [s for s in sections if s.vae is not None]
    if not shown:
        return ""
    parts = ['<section id="vae"><h2>VAE: reconstructions, samples and a morph</h2>',
             '<p class="muted">Every face below passed through the anonymization egress gate (style transfer, then '
             'an independent recognizer must fail to match it to its source); the report never shows a raw face. '
             'A red-framed grey tile is an image the gate withheld.</p>']
    for s in shown:
        if len(sections) > 1:
            parts.append(f"<h3>{esc(s.data.name)}</h3>")
        for label, tiles in s.vae.rows.items():
            parts.append(_row(label, tiles))
        step = s.vae.morph_alphas[1] - s.vae.morph_alphas[0] if len(s.vae.morph_alphas) > 1 else 1.0
        parts.append(f"<h3>Morph between two held-out people ({len(s.vae.morph)} frames, α step {step:.2g})</h3>")
        parts.append(_row("latent interpolation", s.vae.morph))
        if s.vae.morph_gif is not None:
            uri = "data:image/gif;base64," + base64.b64encode(s.vae.morph_gif).decode()
            name = gif_names.get(s.data.name, "")
            parts.append(f'<figure style="width:160px"><img src="{uri}" alt="animated morph" width="128" height="128">'
                         f'<figcaption>animated ({esc(name)})</figcaption></figure>')
    parts.append("</section>")
    return "".join(parts)


def anonymization_section(gate: GateStats | None, bench: dict | None) -> str:
    if gate is None and bench is None:
        return ""
    parts = ['<section id="anonymization"><h2>Anonymization</h2>']
    if gate is not None:
        g = gate.summary()
        parts.append("<h3>This report's images</h3>")
        parts.append(table(["method", "images", "released", "withheld", "faces found", "min dlib distance",
                            "median dlib distance", "seconds / image"],
                           [[g["method"], g["images"], g["released"], g["withheld"], g["faces_found"],
                             g["reid_distance_min"], g["reid_distance_median"], g["seconds_per_image"]]], numeric_from=1))
        parts.append('<p class="muted">dlib distance: between each face before and after anonymization; below 0.6 '
                     'dlib calls it the same person, and the gate withholds the image.</p>')
    if bench is not None:
        parts.append(f"<h3>Re-identification benchmark</h3><p class=\"muted\">From {esc(bench.get('source', ''))}: "
                     f"{esc(bench.get('recognizer', 'dlib'))}, LFW test people.</p>")
        rows = [[r.get("name", ""), r.get("people"), r.get("match_rate"), r.get("top1"), r.get("chance"),
                 r.get("detection_rate"), r.get("landmark_displacement")] for r in bench.get("reid", [])]
        parts.append(table(["transform", "people", "match rate", "top-1", "chance", "detection retained",
                            "landmark shift (×IOD)"], rows))
        speed = {k: v for k, v in (bench.get("speed") or {}).items() if isinstance(v, (int, float))}
        if speed:
            parts.append(table(["speed", "value"], [[k.replace("_", " "), v] for k, v in speed.items()]))
    parts.append("</section>")
    return "".join(parts)


def sites_table(sections: list[RunSection]) -> str:
    parts = ['<section id="sites"><h2>Sites</h2>']
    for s in sections:
        d = s.data
        if len(sections) > 1:
            parts.append(f"<h3>{esc(d.name)}</h3>")
        rows = []
        for site in d.sites:
            m = d.last_site_metrics(site)
            p = d.privacy.get(site, {})
            rows.append([site, m.get("num-examples"), m.get("num-identities"), p.get("rounds_trained"),
                         p.get("rounds_declined"), m.get("embedding-train-loss"), m.get("embedding-val-accuracy"),
                         m.get("vae-train-loss"), m.get("vae-val-loss"), p.get("epsilon") if d.cfg.dp else None])
        parts.append(table(["site", "examples", "identities", "rounds trained", "rounds declined",
                            "embedding loss", "identification val acc", "VAE loss", "VAE val loss", "ε"], rows,
                           cls="sites-table"))
    parts.append("</section>")
    return "".join(parts)


def comparison(sections: list[RunSection]) -> str:
    if len(sections) < 2:
        return ""
    rows = []
    for s in sections:
        d, f = s.data, s.data.final_global()
        eps = max([p.get("epsilon", 0.0) for p in d.privacy.values()] or [0.0]) if d.cfg.dp else None
        rows.append([d.name, d.cfg.task, d.cfg.strategy, "on" if d.cfg.dp else "off", eps,
                     f"{d.completed_rounds}/{d.cfg.num_rounds}", f.get("embedding/accuracy"), f.get("embedding/roc_auc"),
                     f.get("embedding/tar@far=1e-2"), f.get("vae/psnr"), f.get("vae/ssim"),
                     (d.wall_seconds() or math.nan) / 60])
    return ('<section id="comparison"><h2>Runs compared</h2>'
            + table(["run", "task", "strategy", "DP", "max ε", "rounds", "accuracy", "ROC AUC", "TAR@FAR 1e-2",
                     "PSNR", "SSIM", "minutes"], rows, numeric_from=4) + "</section>")


def render_report(sections: list[RunSection], *, generated: str, report_versions: dict, gate: GateStats | None,
                  anonymization: dict | None, image_note: str, gif_names: dict[str, str]) -> str:
    title = "facefl report: " + ", ".join(s.data.name for s in sections)
    nav = ['<a href="#overview">Overview</a>', '<a href="#curves">Learning curves</a>', '<a href="#privacy">Privacy</a>']
    body = [overview(sections, generated, report_versions), comparison(sections), learning_curves(sections),
            privacy(sections), embedding_eval(sections), vae_section(sections, gif_names),
            anonymization_section(gate, anonymization), sites_table(sections)]
    for anchor, name in (("comparison", "Compared"), ("embedding", "Embedding"), ("vae", "VAE"),
                         ("anonymization", "Anonymization")):
        if any(f'id="{anchor}"' in b for b in body):
            nav.append(f'<a href="#{anchor}">{name}</a>')
    nav.append('<a href="#sites">Sites</a>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><nav>{''.join(nav)}</nav>{notices(sections, image_note)}"
            + "".join(body) + "</main></body></html>\n")
