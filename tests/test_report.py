"""``facefl report``: the page a real federation writes, checked as data, as HTML, and in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import facefl, patience
from PIL import Image

CHROMIUM = Path(os.environ.get("FACEFL_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("FACEFL_CHROMEDRIVER", "/usr/bin/chromedriver"))


class _Page(HTMLParser):
    """Every tag with its attributes, the text, and the ``<img>`` sources of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    @property
    def images(self) -> list[str]:
        return [a["src"] for t, a in self.tags if t == "img"]


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


@pytest.mark.slow
def test_simulate_writes_the_report_and_summary(federated_run):
    html, summary = federated_run / "report.html", federated_run / "summary.json"
    assert html.is_file() and summary.is_file()
    doc = json.loads(summary.read_text())
    run = doc["runs"][0]
    assert run["status"] == "completed" and run["completed_rounds"] == 2 and not run["interrupted"]
    assert sorted(run["privacy"]) == ["site-0", "site-1"]
    assert all(0 < p["epsilon"] <= 50 + 1e-6 and p["rounds_trained"] == 2 for p in run["privacy"].values())
    assert run["versions"]["flwr"].startswith("1.42") and run["versions"]["opacus"]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    ev = run["embedding_evaluation"]
    assert ev["pairs"] == 200 and 0.5 < ev["roc_auc"] <= 1 and "tar@far=1e-1" in ev
    assert ev["roc_auc"] == pytest.approx(run["final"]["embedding/roc_auc"], abs=1e-9)  # same model, same pairs
    images = run["vae_images"]
    assert images["morph_frames"] >= 11 and np.allclose(np.diff(images["morph_alphas"]), 0.1)
    assert images["shown"] + images["withheld"] == 3 * 8 + images["morph_frames"]
    gate = doc["anonymization"]["gate"]
    assert gate["images"] == images["shown"] + images["withheld"] and gate["released"] == images["shown"]
    gif = Image.open(federated_run / "report-morph.gif")
    assert gif.n_frames >= 11

    page = _page(html)
    text = " ".join(page.text)
    for heading in ("Overview", "Learning curves", "Privacy", "Embedding evaluation", "Sites", "Anonymization"):
        assert heading in text, heading
    assert "example-level" in text and "empirical" in text
    assert sum(1 for t, a in page.tags if t == "svg" and "chart" in a.get("class", "")) >= 12
    # Every round's aggregate was scored on the validation people, and the page says which rounds were kept.
    judged = [r["validation"] for r in run["rounds"] if r["round"] > 0]
    assert len(judged) == 2 and all(0.5 < v["validation_auc"] <= 1 and "kept" in v for v in judged)
    assert [r["round_rejected"] for r in run["rounds"][1:]] == [not v["kept"] for v in judged]
    assert "Rounds kept and rejected" in text and f"{sum(not v['kept'] for v in judged)} of 2 rounds rejected" in text

    # Every report audits the run for membership inference: both models, two attacks each, beside the accountant.
    audit = json.loads((federated_run / "privacy_audit.json").read_text())
    assert audit["round"] == 2 and audit["sites"] == 2
    assert run["privacy_audit"].keys() == {"embedding", "vae"}
    for model, entry in run["privacy_audit"].items():
        assert set(entry["attacks"]) == ({"margin", "calibrated"} if model == "embedding" else {"loss", "calibrated"})
        assert entry["accountant_epsilon"] == pytest.approx(max(p["epsilon"] for p in run["privacy"].values()))
        for attack in entry["attacks"].values():
            assert 0 <= attack["auc"] <= 1 and attack["epsilon_lower_bound"] <= entry["accountant_epsilon"]
    assert "Empirical audit: membership inference" in text and "cannot prove" in text
    for model in ("embedding", "VAE"):
        assert f"Membership inference, {model}" in (federated_run / "report.html").read_text()


@pytest.mark.slow
def test_report_never_shows_a_raw_face(federated_run):
    """Every face image in the page went through the gate: none equals (or nearly equals) the raw image the VAE
    section was made from."""
    from server.report.build import TILE_SIZE
    from server.report.evaluate import models_from_state, vae_images
    from server.report.reader import read_run
    from common.data.sources import eval_data

    data = read_run(federated_run)
    raw = vae_images(models_from_state(data.cfg, data.state).vae, eval_data(data.cfg), seed=data.cfg.seed)
    raws = []
    for batch in (raw.originals, raw.reconstructions, raw.samples, raw.morph):
        for img in batch:
            pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC)
            raws.append(np.asarray(pil, dtype=np.float32))
    shown = [_decode(src) for src in _page(federated_run / "report.html").images if src.startswith("data:image/png")]
    assert len(shown) == len(raws)
    for tile in shown:
        closest = min(float(np.abs(tile.astype(np.float32) - r).mean()) for r in raws)
        assert closest > 3.0, f"a report image is within {closest:.2f} grey levels of a raw face"


@pytest.mark.slow
def test_report_references_nothing_outside_itself(federated_run):
    source = (federated_run / "report.html").read_text(encoding="utf-8")
    page = _page(federated_run / "report.html")
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for name in ("src", "href", "xlink:href", "srcset", "poster", "data"):
            value = attrs.get(name)
            if value is None:
                continue
            if name == "href":
                assert value.startswith("#"), f"<{tag} href={value[:60]}>"
            else:
                assert value.startswith("data:"), f"<{tag} {name}={value[:60]}>"
    without_xmlns = source.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_xmlns and "https://" not in without_xmlns
    assert all(ref.startswith("#") for ref in re.findall(r"url\(\s*['\"]?([^)'\"]*)", source))  # clip paths only
    assert "@import" not in source and "file:" not in source


@pytest.mark.slow
def test_report_in_headless_chromium(federated_run, tmp_path):
    """The page loads in a real browser with no console errors, every image and plot renders, the epsilon table has
    one row per site; a screenshot is kept."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("FACEFL_REQUIRE_BROWSER"):
            pytest.fail(f"Chromium or ChromeDriver missing ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium "
                        "chromium-driver")
        pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1280,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get((federated_run / "report.html").resolve().as_uri())
        # driver.get can return before the load event on a loaded machine: wait for it (images included).
        WebDriverWait(driver, patience(60), poll_frequency=0.2).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
        assert len(images) >= 3 * 8 + 11 + 1
        assert all(ok and w > 0 and h > 0 for ok, w, h, _ in images), [i for i in images if not i[1]]
        charts = driver.execute_script(
            "return Array.from(document.querySelectorAll('svg.chart')).map(s => {const r = s.getBoundingClientRect();"
            " return [r.width, r.height, s.querySelectorAll('g.series, g.hist').length,"
            " s.getAttribute('aria-label')]})")
        assert len(charts) >= 8
        assert all(w > 0 and h > 0 and n > 0 for w, h, n, _ in charts), charts
        rows = driver.execute_script("return document.querySelectorAll('table.epsilon-table tbody tr').length")
        assert rows == 2
        sites = driver.execute_script(
            "return Array.from(document.querySelectorAll('table.epsilon-table tbody tr td:first-child'))"
            ".map(td => td.textContent)")
        assert sorted(sites) == ["site-0", "site-1"]
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(int(height), 12000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
        keep = os.environ.get("FACEFL_TEST_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "report.png")
    finally:
        driver.quit()


@pytest.mark.slow
def test_interrupted_and_damaged_runs_still_report(federated_run, tmp_path):
    """A run killed after round 1 (its round-2 files never written) reports round 1 with a visible note; a truncated
    metrics.json is noted, not fatal; a folder that is not a run is a one-line error."""
    run = tmp_path / "interrupted"
    shutil.copytree(federated_run, run)
    (run / "checkpoints" / "round-0002.pt").unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["rounds"] = [r for r in metrics["rounds"] if r["round"] <= 1]
    metrics["run"].update(status="running", completed_rounds=1)
    metrics["run"].pop("finished", None)
    (run / "metrics.json").write_text(json.dumps(metrics))
    for stale in ("report.html", "summary.json", "report-morph.gif"):
        (run / stale).unlink()

    done = facefl("report", str(run), "--no-images")
    assert done.returncode == 0, done.stdout + done.stderr
    page = _page(run / "report.html")
    notice = [a for t, a in page.tags if t == "div" and a.get("id") == "notices"]
    assert notice and "stopped after round 1 of 2" in " ".join(page.text)
    doc = json.loads((run / "summary.json").read_text())
    assert doc["runs"][0]["interrupted"] and doc["runs"][0]["completed_rounds"] == 1
    assert doc["runs"][0]["checkpoint_round"] == 1 and [r["round"] for r in doc["runs"][0]["rounds"]] == [0, 1]
    assert not page.images  # --no-images: no face at all

    text = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(text[: len(text) // 2])  # as if cut off while copied
    damaged = facefl("report", str(run), "--no-images", "--out", str(tmp_path / "damaged.html"))
    assert damaged.returncode == 0, damaged.stderr
    assert "metrics.json could not be read" in (tmp_path / "damaged.html").read_text()
    assert (tmp_path / "damaged.summary.json").is_file()

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"not a run")
    for bad, message in ((tmp_path / "photos", "not a facefl run directory"), (tmp_path / "nowhere", "not a folder")):
        out = facefl("report", str(bad))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "photos" / "report.html").exists()


@pytest.mark.slow
def test_several_runs_side_by_side(federated_run, tmp_path):
    """Two runs in one page: curves overlaid (one series per run), a comparison table with a row per run."""
    other = tmp_path / "run-b"
    shutil.copytree(federated_run, other)
    metrics = json.loads((other / "metrics.json").read_text())
    for r in metrics["rounds"]:  # a different run: shift its curve so the two series differ
        r["global"]["embedding/roc_auc"] = r["global"]["embedding/roc_auc"] * 0.5
    (other / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "compare.html"
    done = facefl("report", str(federated_run), str(other), "--out", str(out), "--no-images")
    assert done.returncode == 0, done.stderr
    page = _page(out)
    series = [a.get("data-series", "") for t, a in page.tags if t == "g" and a.get("class") == "series"]
    assert any(s.startswith(f"{federated_run.name}:") for s in series), series[:5]
    assert any(s.startswith("run-b:") for s in series)
    doc = json.loads((tmp_path / "compare.summary.json").read_text())
    assert [r["name"] for r in doc["runs"]] == [federated_run.name, "run-b"]
    a, b = (r["final"]["embedding/roc_auc"] for r in doc["runs"])
    assert b == pytest.approx(a * 0.5)
    assert "Runs compared" in " ".join(page.text)


@pytest.mark.slow
def test_user_text_is_escaped(federated_run):
    """Run names, site names and notes come from users: markup in them is shown as text, in tables, headings and
    chart labels alike, and never becomes an element."""
    from server.report.reader import read_run
    from server.report.render import render_report
    from server.report.sections import RunSection

    run, site, note = 'run <b>x</b> "q"', 'site "<b>x</b>"', '<b>note</b> & "quoted"'
    renamed = read_run(federated_run)
    renamed.name = run
    renamed.privacy[site] = renamed.privacy.pop("site-1")
    for r in renamed.rounds:
        if "site-1" in r.get("sites", {}):
            r["sites"][site] = r["sites"].pop("site-1")
    plain = read_run(federated_run)
    html = render_report([RunSection(plain), RunSection(renamed)], generated="now", report_versions={}, gate=None,
                         anonymization=None, image_note=note, gif_names={})
    assert "<b>" not in html and 'x</b>"' not in html
    page = _Page()
    page.feed(html)
    assert not [t for t, _ in page.tags if t == "b"]
    text = " ".join(page.text)
    assert run in text and site in text and note in text
    assert f"facefl report: {plain.name}, {run}" in text  # title and heading
    tables = re.findall(r'<table class="epsilon-table">.*?</table>', html, re.S)
    assert [t.split("<tbody>", 1)[1].count("<tr>") for t in tables] == [2, 2]  # one row per site, per run
    series = [a.get("data-series") for t, a in page.tags if t == "g" and a.get("class") == "series"]
    assert f"{run}: {site}" in series and f"{plain.name}: site-1" in series


def test_anonymization_section_shows_the_benchmark_curve_and_columns():
    """A `facefl bench anonymize` result becomes the section's table (HOG retention, source match, gate withholds)
    and the strength curve with blur's reference lines."""
    from server.report.render import anonymization_section

    def row(name, match, hog):
        return {"name": name, "people": 150, "match_rate": match, "top1": match / 2, "chance": 1 / 150,
                "detection_rate": 1.0, "landmark_displacement": 0.04, "hog_retention": hog,
                "source_match_rate": match, "gate_withheld_rate": match}

    bench = {"reid": [row("none", 0.92, 1.0), row("blur r8, whole image", 0.14, 0.2)],
             "reid_heldout": [row("held-out: shipped s=1", 0.02, 0.99)],
             "curve": {"stylizer": "shipped", "points": [{"strength": s, "match_rate": m, "top1": m / 2,
                                                         "detection_rate": 1.0, "hog_retention": 0.99}
                                                        for s, m in ((0.5, 0.6), (1.0, 0.02))],
                       "references": {"blur r8, whole image": {"match_rate": 0.14, "detection_rate": 0.95,
                                                               "hog_retention": 0.2}}}}
    section = anonymization_section(None, bench)["bench"]
    assert [r[0] for r in section["rows"]] == ["none", "blur r8, whole image", "held-out: shipped s=1"]
    assert all(len(r) == 10 for r in section["rows"]) and section["rows"][1][7] == 0.2
    svg = section["curve"]
    assert svg.startswith("<") and "strength" in svg and "blur r8: match" in svg and "HOG finds the face" in svg
    assert anonymization_section(None, {"reid": []})["bench"]["curve"] is None
