"""``facefl``: the one command-line entry point.

Subcommands: ``simulate`` (a federation on this machine), ``evaluate`` (a run's or a pretrained face model on a
dataset's test protocol), ``scenarios`` (list named scenarios), ``data prepare``
(preprocess and cache a face dataset), ``anonymize`` (stylize the faces in photos), ``style list|train|export``
(stylizers), ``report`` (one HTML page per run, or several runs side by side), ``morph`` (a VAE morph between
two photos), ``bench train`` (DP cost and LFW View-1), ``bench vae`` (the VAE judged by dlib) and ``bench anonymize``
(re-identification with dlib).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from common.config import ConfigError

# common.anonymization.styles.DEFAULT_STYLE, repeated so that the command line starts without importing torch
# (tests/test_face_prior.py checks that they agree).
DEFAULT_STYLE = "shipwreck"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="facefl: federated, differentially private face models with Flower and Opacus.")
data_app = typer.Typer(no_args_is_help=True, help="Face datasets: preprocess and cache.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures.")
app.add_typer(data_app, name="data")
style_app = typer.Typer(no_args_is_help=True, help="Style transfer for anonymization: train, list, export.")
app.add_typer(bench_app, name="bench")
app.add_typer(style_app, name="style")
audit_app = typer.Typer(no_args_is_help=True, help="Audits: the hash-chained logs of the server and the sites, and "
                        "the privacy of a run's models (membership inference).")
app.add_typer(audit_app, name="audit")


def _add_deploy() -> None:
    from simulations.deploy_cli import deploy_app, site_app, superlink_command

    app.add_typer(deploy_app, name="deploy")
    app.command("superlink")(superlink_command)
    app.add_typer(site_app, name="site")


_add_deploy()
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
    tracking: Optional[str] = typer.Option(None, help="none | mlflow: log config, metrics, epsilons and the report "
                                           "to MLflow (needs the mlflow extra)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: a local store in the run "
                                               "directory, RUN/mlflow.db)."),
    cpus_per_site: float = typer.Option(1.0, help="CPU cores each simulated site's Ray actor holds (the number of "
                                        "sites training at once is the cluster's cores divided by this)."),
    gpus_per_site: float = typer.Option(0.0, help="GPUs each simulated site's actor holds (a fraction shares one)."),
    ray_address: Optional[str] = typer.Option(None, help="Join this running Ray cluster (HEAD:6379, or auto) "
                                              "instead of starting Ray on this machine; see the README."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write RUN/report.html and summary.json at "
                                "the end (see `facefl report`)."),
    privacy_audit: bool = typer.Option(False, "--privacy-audit", help="Audit the final models for membership "
                                       "inference at the end and print the result (see `facefl audit privacy`; "
                                       "the report audits too unless --no-report)."),
    report_stylizer: Optional[str] = typer.Option(None, help="Stylizer .pt anonymizing the report's faces "
                                                  "(default: the starry-night stylizer, trained once and cached)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a federation of N virtual sites on this machine (Flower simulation engine, Ray backend)."""
    from simulations.simulate import config_from_options, prepare_config
    from simulations.simulate import simulate as run_sim

    _setup_logging(verbose)
    options = {"data": data, "num-rounds": rounds, "task": task, "strategy": strategy, "dp": dp,
               "target-epsilon": epsilon, "target-delta": delta, "max-grad-norm": clip, "accountant": accountant,
               "tracking": tracking, "tracking-uri": tracking_uri}
    cfg, num_sites = config_from_options(options, scenario=scenario, sets=_parse_sets(set_), sites=sites)
    cfg = prepare_config(cfg, num_sites=num_sites, out=out, resume=resume, num_rounds=rounds)
    what = f"data {cfg.data}" if cfg.data else "synthetic smoke-test faces (use --data for real faces)"
    privacy = (f"DP-SGD, each site epsilon <= {cfg.target_epsilon:g}" if cfg.dp else "no DP (baseline)")
    console.print(f"[bold]facefl simulate[/]: {num_sites} sites, {cfg.num_rounds} rounds, task {cfg.task}, "
                  f"{cfg.strategy}, {privacy}; {what}")
    if cfg.trains_embedding:
        model = (f"dlib's pretrained face ResNet, {cfg.trainable_part} trains (lr {cfg.backbone_learning_rate:g}, "
                 f"margin heads {cfg.embedding_lr:g})" if cfg.model == "dlib-resnet" else f"{cfg.model} from scratch")
        guard = (f"; rounds that score worse on {cfg.validation_people} validation people are rejected"
                 if cfg.guards_rounds else "")
        console.print(f"face model: {model}, batch {cfg.batch_size}{guard}")
    console.print(f"run directory: {cfg.run_dir}")
    try:
        run_dir = run_sim(cfg, num_sites, cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site,
                          ray_address=ray_address, verbose=verbose)
    except Exception:
        if report:  # the completed rounds of a failed run are still worth a page
            try:
                _write_report([cfg.run_dir], stylizer=report_stylizer, data=cfg.data or None, quiet=True)
            except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
                console.print(f"no report: {exc}", markup=False)
        raise
    _print_summary(run_dir)
    if cfg.canary_gradients or cfg.canary_inputs:  # a canary run is audited at once (it is cheap)
        from server.privacy_audit.canaries import canary_audit, canary_lines

        console.print("\n".join(canary_lines(canary_audit(run_dir))), markup=False, highlight=False, soft_wrap=True)
    if privacy_audit:
        from server.privacy_audit.audit_run import audit_run

        console.print("privacy audit: membership inference against the final models ...")
        console.print(audit_summary(audit_run(run_dir)), markup=False, highlight=False, soft_wrap=True)
    if report:
        _write_report([run_dir], stylizer=report_stylizer, data=cfg.data or None)


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


def _write_report(run_dirs: list, *, out: Optional[str] = None, summary: Optional[str] = None,
                  anonymization: Optional[str] = None, images: bool = True, quiet: bool = False,
                  privacy_audit: bool = True, **gate_options):
    """Build the report (see ``server.report.build``); the egress gate is built only when faces are to be shown."""
    from server.report.build import build_report
    from server.stylizers import build_gate

    def log(text: str) -> None:
        if not quiet:
            console.print(text, markup=False, highlight=False)

    options = {k: v for k, v in gate_options.items() if v is not None}

    def make_gate():
        audit = None
        if len(run_dirs) == 1 and (Path(run_dirs[0]) / "audit.jsonl").is_file():  # the run's log records egress
            from common.audit import AuditLog

            audit = AuditLog(Path(run_dirs[0]) / "audit.jsonl", actor="report")
        return build_gate(site="report", log=log, audit=audit, gallery_rule="any", blank=False, **options)

    factory = make_gate if images else None

    result = build_report(run_dirs, out=out, summary=summary, gate_factory=factory, anonymization=anonymization,
                          log_fn=log, privacy_audit=privacy_audit)
    gate = result.stats.summary() if result.stats else None
    shown = (f"; {gate['released']} face images shown after anonymization, {gate['withheld']} withheld"
             if gate else "")
    console.print(f"report: {result.html}  (summary {result.summary}{shown})", markup=False, highlight=False)
    return result


@app.command()
def report(
    runs: list[str] = typer.Argument(..., help="Run directories (several: their curves side by side)."),
    out: Optional[str] = typer.Option(None, help="HTML file (default RUN/report.html for one run, "
                                      "./facefl-report.html for several)."),
    summary: Optional[str] = typer.Option(None, help="summary.json path (default beside the HTML: summary.json "
                                          "next to report.html, NAME.summary.json next to NAME.html)."),
    images: bool = typer.Option(True, "--images/--no-images", help="Show VAE faces (always anonymized through "
                                "the egress gate); --no-images leaves every face out."),
    method: str = typer.Option("style", help="Anonymization of the report's faces: style | blur | pixelate."),
    style: str = typer.Option(DEFAULT_STYLE, help="Named style for --method style (trained once, cached)."),
    stylizer: Optional[str] = typer.Option(None, help="A trained stylizer .pt (with its .json) instead of --style."),
    sha256: Optional[str] = typer.Option(None, help="Expected SHA-256 of --stylizer (default: from its .json)."),
    strength: float = typer.Option(1.0, help="Stylization strength of the report's faces (0 < S <= 1)."),
    anonymization: Optional[str] = typer.Option(None, help="A `facefl bench anonymize` result "
                                                "(bench-anonymize.json) to show; default: one in the run folder."),
    data: Optional[str] = typer.Option(None, help="Faces to train a missing stylizer on (default: LFW if present)."),
    privacy_audit: bool = typer.Option(True, "--privacy-audit/--no-privacy-audit", help="Audit a run whose latest "
                                       "checkpoint has no membership-inference audit yet (a simulated run whose "
                                       "faces are here); an existing audit is always shown."),
) -> None:
    """One self-contained HTML report (and summary.json) of one or several runs: curves, privacy, evaluation,
    anonymized VAE faces. Works on interrupted runs (it shows the completed rounds)."""
    _setup_logging(False)
    if method not in ("style", "blur", "pixelate"):
        raise ValueError(f"--method must be style, blur or pixelate; got {method!r}.")
    _write_report(runs, out=out, summary=summary, anonymization=anonymization, images=images, method=method,
                  privacy_audit=privacy_audit, style=style, stylizer=stylizer, stylizer_sha256=sha256, strength=strength,
                  data=data or _default_lfw())


@app.command()
def evaluate(
    run: Optional[str] = typer.Argument(None, help="Run directory: its latest checkpoint is evaluated."),
    model: Optional[str] = typer.Option(None, help="Instead of a run: a model with no training (dlib-resnet: its "
                                        "pretrained weights; compact: a fresh initialisation)."),
    data: Optional[str] = typer.Option(None, help="Dataset whose test protocol to use (LFW: View 1 pairsDevTest.txt "
                                       "and the peopleDevTest.txt people). Default: the run's."),
    set_: list[str] = typer.Option([], "--set", help="Run-config KEY=VALUE for --model (e.g. cache-dir=...)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
) -> None:
    """Verification (10-fold accuracy, ROC AUC, TAR at FAR 1e-2 and 1e-3) and rank-1 identification of a run's
    face-embedding model, or of a pretrained one, on people no site trained on."""
    from common.atomic import atomic_write_json
    from server.evaluate import evaluate_command

    _setup_logging(False)
    result = evaluate_command(run, model=model, data=data, settings=_parse_sets(set_))
    m = result["metrics"]
    table = Table(title=f"{result['evaluated']} on {result['protocol']}")
    for col in ("accuracy", "ROC AUC", "TAR@FAR 1e-2", "TAR@FAR 1e-3", "rank-1"):
        table.add_column(col, justify="right")
    table.add_row(f"{m['accuracy']:.4f} ± {m['accuracy_std']:.4f}", f"{m['roc_auc']:.4f}", f"{m['tar@far=1e-2']:.4f}",
                  f"{m['tar@far=1e-3']:.4f}", f"{m['rank1']:.4f}")
    Console().print(table)
    if json_out:
        atomic_write_json(Path(json_out), result)
        console.print(f"written to {json_out}", markup=False, highlight=False)


@audit_app.command("verify")
def audit_verify(
    files: list[str] = typer.Argument(..., help="Audit logs (RUN/audit.jsonl, a site's STATE/audit.jsonl)."),
    head: Optional[str] = typer.Option(None, help="A head hash recorded elsewhere (the server's log records each "
                                       "site's); it must still be in the chain, or the log was cut short."),
) -> None:
    """Check that audit logs are unbroken hash chains (no entry edited, deleted, reordered or cut off).
    Exit 0 when every log verifies, 1 otherwise."""
    from common.audit import summarize, verify_log

    failed = False
    for path in files:
        report = verify_log(path, expected_head=head)
        Console().print(summarize(report), markup=False, highlight=False)
        failed = failed or not report.ok
    raise typer.Exit(1 if failed else 0)


@audit_app.command("privacy")
def audit_privacy(
    run_dir: str = typer.Argument(..., help="A finished simulated run (its latest checkpoint is audited)."),
    sites: Optional[int] = typer.Option(None, help="Number of sites (default: read from the run)."),
    reference_epochs: int = typer.Option(0, help="Epochs of the reference models (0 = 4 for the VAE, 10 for the "
                                         "embedding)."),
    confidence: float = typer.Option(0.95, help="Confidence of the empirical epsilon lower bound."),
) -> None:
    """Membership inference against a run's models: AUC, TPR at FPR 1% and 0.1%, and the empirical epsilon lower
    bound beside the accountant's; written to RUN_DIR/privacy_audit.json and shown by `facefl report`."""
    from server.privacy_audit.audit_run import AuditSettings, audit_run
    from server.rundir import RunDirError

    _setup_logging(False)
    if not 0.5 < confidence < 1.0:
        raise typer.BadParameter(f"--confidence must be between 0.5 and 1; got {confidence}.")
    if reference_epochs < 0:
        raise typer.BadParameter(f"--reference-epochs must be 0 or more; got {reference_epochs}.")
    settings = AuditSettings(confidence=confidence)
    if reference_epochs:
        settings = AuditSettings(reference_epochs, reference_epochs, confidence)
    try:
        result = audit_run(run_dir, sites=sites, settings=settings)
    except (RunDirError, ValueError, OSError) as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    console.print(audit_summary(result), markup=False, highlight=False, soft_wrap=True)
    console.print(f"written to {Path(run_dir) / 'privacy_audit.json'}", markup=False, highlight=False)


@audit_app.command("canaries")
def audit_canaries(
    run_dir: str = typer.Argument(..., help="A finished simulated run trained with canaries (--set canary-gradients=M "
                                  "and/or canary-inputs=M)."),
    sites: Optional[int] = typer.Option(None, help="Number of sites (default: read from the run)."),
    confidence: float = typer.Option(0.95, help="Confidence of the one-run epsilon lower bounds."),
) -> None:
    """The one-run canary audit (Steinke et al. 2023): white-box (gradient canaries read off every site's per-round
    update) and black-box (input canaries scored on the final model) epsilon lower bounds, with the number of
    canaries, guesses and correct guesses and the largest bound those canaries could certify; written into
    RUN_DIR/privacy_audit.json (key "canaries"), the report and MLflow."""
    from server.privacy_audit.canaries import canary_audit, canary_lines
    from server.rundir import RunDirError

    _setup_logging(False)
    if not 0.5 < confidence < 1.0:
        raise typer.BadParameter(f"--confidence must be between 0.5 and 1; got {confidence}.")
    try:
        result = canary_audit(run_dir, sites=sites, confidence=confidence)
    except (RunDirError, ValueError, OSError) as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    console.print("\n".join(canary_lines(result)), markup=False, highlight=False, soft_wrap=True)
    console.print(f"written to {Path(run_dir) / 'privacy_audit.json'}", markup=False, highlight=False)


@audit_app.command("site")
def audit_site(
    state: str = typer.Option(..., "--state", help="The site's state folder (privacy ledger, margin head, audit log, "
                              "the latest global model it received)."),
    data: str = typer.Option(..., "--data", help="The site's photo folder (one sub-folder per person)."),
    model: Optional[str] = typer.Option(None, help="A model file the server distributed (a run checkpoint) instead "
                                        "of the latest one the site received."),
    confidence: float = typer.Option(0.95, help="Confidence of the empirical epsilon lower bound."),
) -> None:
    """A site audits the global model against its own faces (members: its training faces; non-members: its held-out
    faces of the same people), at the site: nothing is sent anywhere. Written to STATE/privacy_self_audit.json and
    the site's audit log."""
    from server.privacy_audit.site_audit import SelfAuditError, self_audit

    _setup_logging(False)
    if not 0.5 < confidence < 1.0:
        raise typer.BadParameter(f"--confidence must be between 0.5 and 1; got {confidence}.")
    try:
        result = self_audit(state, data=data, model=model, confidence=confidence)
    except (SelfAuditError, ValueError, OSError) as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    eps = result["accountant_epsilon"]
    lines = [f"site {result['site']}: the global model of round {result['round']} against its own faces "
             f"({result['members']} members / {result['non_members']} non-members); accountant epsilon "
             f"{'none (no DP)' if eps == float('inf') else f'{eps:.2f}'}"]
    for name, a in result["attacks"].items():
        lines.append(f"  {name}: AUC {a['auc']:.3f} [{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}], epsilon >= "
                     f"{a['epsilon_lower_bound']:.2f}")
    lines.append(f"written to {Path(state) / 'privacy_self_audit.json'} and the site's audit log; nothing was sent")
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def audit_summary(result: dict) -> str:
    """The audit's lines for the console: one per model and attack."""
    lines = [result["game"]]
    for model, entry in result["models"].items():
        eps = entry["accountant_epsilon"]
        lines.append(f"{model}: accountant epsilon {'none (no DP)' if eps == float('inf') else f'{eps:.2f}'}, delta "
                     f"{entry['delta']:.1e}")
        for name, a in entry["attacks"].items():
            lines.append(f"  {name}: AUC {a['auc']:.3f} [{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}], TPR "
                         f"{a['tpr_at_fpr_1pct']:.3f} at FPR 1%, {a['tpr_at_fpr_0.1pct']:.3f} at 0.1%, epsilon >= "
                         f"{a['epsilon_lower_bound']:.2f} ({a['confidence']:.1%} confidence; estimate "
                         f"{a['epsilon_estimate']:.2f})")
    return "\n".join(lines)


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
    mode: str = typer.Option("aligned", help="aligned (what runs use: dlib's 5-point chips, cached at 150x150, "
                             "cut tighter and resized for the from-scratch models and the VAE) | dlib (the chips "
                             "themselves, for model=dlib-resnet; --size 150) | crop (centre crop) | detect (MTCNN + "
                             "alignment) | auto (crop for LFW, else detect)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Processes that compute the faces (default: every core, "
                                          "or $FACEFL_PREP_WORKERS; 1 = this process only). Each identity is cached "
                                          "as soon as it is done: an interrupted preparation resumes where it "
                                          "stopped."),
) -> None:
    """Preprocess a dataset once (detect/align or crop, resize) into the cache; later runs reuse it."""
    from common.data.datasets import PrepStats, load_faces

    _setup_logging(False)
    stats = PrepStats()
    faces = load_faces(data, image_size=size, mode=mode, min_images=1, progress=True, workers=workers, stats=stats)
    if stats.photos:
        done = (f"prepared {stats.photos} photos of {stats.identities} identities in {stats.seconds:.1f} s "
                f"({stats.faces_per_second:.1f} faces/s, {stats.workers} "
                f"{'process' if stats.workers == 1 else 'worker processes'})")
    else:
        done = "nothing to prepare"
    console.print(f"{done}; {stats.cached_identities} identities were already cached. {len(faces)} faces of "
                  f"{faces.num_identities} identities cached at {size}x{size}; skipped: {faces.skipped or 'none'}",
                  markup=False, highlight=False, soft_wrap=True)


@bench_app.command("train")
def bench_train(
    data: str = typer.Option(..., help="LFW root (with its protocol files)."),
    rounds: int = typer.Option(5, help="Rounds of the pretrained backbone's federated runs of --parts pretrained "
                                       "(centralized: as many epochs)."),
    scratch_rounds: int = typer.Option(15, help="Rounds of the from-scratch runs (centralized: as many epochs)."),
    sites: int = typer.Option(4, help="Sites for the federated runs of --parts pretrained, scratch, compact."),
    epsilons: str = typer.Option("8,2", help="Per-site epsilons of the DP runs (the from-scratch DP run uses the "
                                             "first)."),
    never_worse_sites: str = typer.Option("2,4", help="Numbers of sites of the never-worse table."),
    trainables: str = typer.Option("projection,last-stage,all", help="Trainable parts of the never-worse table."),
    max_identities: int = typer.Option(0, help="Use only this many training identities (0 = all)."),
    parts: str = typer.Option("default,never-worse,masked", help="Comma-separated: default (`facefl simulate --data "
                              "DATA` as printed, against zero-shot), never-worse (every trainable part x epsilon x "
                              "sites), masked (masked faces: zero-shot, centralized, federated DP), "
                              "dp-cost, pretrained, scratch (the scattering network), compact (the compact CNN from "
                              "scratch). The VAE: `facefl bench vae`."),
    batch_size: int = typer.Option(256, help="Batch size of --parts pretrained's training runs."),
    set_: list[str] = typer.Option([], "--set", help="Run-config KEY=VALUE for the trained rows of --parts masked "
                                   "(repeatable), to try other settings."),
    out: str = typer.Option("runs/bench", help="Folder for the benchmark's runs and its JSON summary."),
) -> None:
    """What `facefl simulate --data` gives by default; never worse than zero-shot; DP cost; LFW View-1 face models
    (pretrained and from scratch; centralized, federated, federated DP)."""
    from simulations.bench import run_bench

    _setup_logging(False)
    eps = _numbers(epsilons, "--epsilons", float)
    site_counts = _numbers(never_worse_sites, "--never-worse-sites", int)
    part_list = [p.strip() for p in parts.split(",") if p.strip()]
    known = {"default", "never-worse", "masked", "dp-cost", "pretrained", "scratch", "compact"}
    unknown = sorted(set(part_list) - known)
    if unknown:
        raise typer.BadParameter(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))} "
                                 "(the VAE has `facefl bench vae`).")
    parts_trainable = tuple(t.strip() for t in trainables.split(",") if t.strip())
    if not parts_trainable or set(parts_trainable) - {"projection", "last-stage", "all"}:
        raise typer.BadParameter(f"--trainables takes projection, last-stage and/or all; got {trainables!r}.")
    run_bench(data=data, rounds=rounds, scratch_rounds=scratch_rounds, sites=sites, epsilons=eps,
              max_identities=max_identities, parts=part_list, site_counts=site_counts, trainables=parts_trainable,
              sets=_parse_sets(set_), out=Path(out), console=Console(width=160), batch_size=batch_size)


def _numbers(text: str, option: str, kind):
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated numbers such as 8,2; got {text!r}.")
    if not values or min(values) <= 0:
        raise typer.BadParameter(f"{option} needs positive numbers; got {text!r}.")
    return values


@bench_app.command("privacy")
def bench_privacy(
    data: str = typer.Option(..., help="LFW root (with its protocol files)."),
    rounds: int = typer.Option(3, help="Federated rounds of each run (2 local epochs each)."),
    sites: int = typer.Option(4, help="Sites of each federation."),
    epsilons: str = typer.Option("8,2", help="Comma-separated per-site epsilons of the DP runs."),
    overfit_identities: int = typer.Option(40, help="People of the overfit runs (0 = no overfit runs)."),
    overfit_epochs: int = typer.Option(10, help="Local epochs per round of the overfit runs."),
    out: str = typer.Option("runs/bench-privacy", help="Folder for the benchmark's runs and its JSON summary."),
    retrain: bool = typer.Option(False, help="Train every run again, even one that completed before."),
    parts: str = typer.Option("membership,canaries", help="membership (the membership-inference rows) and/or "
                              "canaries (the one-run canary audit rows)."),
    recipes: str = typer.Option("pretrained,scratch", help="Canary rows: the README's pretrained recipe and/or the "
                                "from-scratch scattering network."),
    canary_gradients: int = typer.Option(250, help="Canary rows: gradient canaries per site (white-box)."),
    canary_inputs: int = typer.Option(100, help="Canary rows: input canaries per site (black-box)."),
    scratch_rounds: int = typer.Option(5, help="Canary rows: rounds of the from-scratch runs."),
) -> None:
    """Membership inference against federations without DP and with DP, both models, and against a run made to
    overfit: AUC, TPR at low FPR, empirical epsilon lower bounds beside the accountant's. And the one-run canary
    audit (white-box and black-box bounds, the largest certifiable, the accountant's epsilon) of the pretrained and
    from-scratch recipes."""
    from simulations.bench_privacy import run_canary_bench, run_privacy_bench

    _setup_logging(False)
    try:
        eps = tuple(float(e) for e in epsilons.split(",") if e.strip())
    except ValueError:
        raise typer.BadParameter(f"--epsilons takes comma-separated numbers such as 8,2; got {epsilons!r}.")
    if not eps or any(e <= 0 for e in eps):
        raise typer.BadParameter(f"--epsilons must be positive numbers; got {epsilons!r}.")
    if rounds < 1 or sites < 1 or overfit_epochs < 1 or overfit_identities < 0:
        raise typer.BadParameter("--rounds, --sites and --overfit-epochs must be at least 1.")
    chosen = {p.strip() for p in parts.split(",") if p.strip()}
    chosen_recipes = tuple(r.strip() for r in recipes.split(",") if r.strip())
    if not chosen or chosen - {"membership", "canaries"} or set(chosen_recipes) - {"pretrained", "scratch"}:
        raise typer.BadParameter(f"--parts takes membership,canaries and --recipes pretrained,scratch; got {parts!r} "
                                 f"and {recipes!r}.")
    if "membership" in chosen:
        run_privacy_bench(data=data, rounds=rounds, sites=sites, epsilons=eps, overfit_identities=overfit_identities,
                          overfit_epochs=overfit_epochs, out=Path(out), console=Console(width=170), retrain=retrain)
    if "canaries" in chosen:
        run_canary_bench(data=data, rounds=rounds, scratch_rounds=scratch_rounds, sites=sites, epsilons=eps,
                         gradients=canary_gradients, inputs=canary_inputs, out=Path(out), console=Console(width=170),
                         retrain=retrain, recipes=chosen_recipes)


@bench_app.command("scale")
def bench_scale(
    data: str = typer.Option(..., help="LFW root (the View-1 training people are split over the sites)."),
    sites: str = typer.Option("10,30,100", help="Comma-separated numbers of sites."),
    rounds: int = typer.Option(2, help="Federated rounds of each run."),
    fraction_train: float = typer.Option(1.0, help="Share of the sites sampled to train in each round."),
    cpus_per_site: float = typer.Option(1.0, help="CPU cores each site's Ray actor holds."),
    set_: list[str] = typer.Option([], "--set", help="Any other run-config key, KEY=VALUE (repeatable)."),
    out: str = typer.Option("runs/bench-scale", help="Folder for the benchmark's runs and its JSON summary."),
) -> None:
    """Many small sites on this machine: seconds per round and per site, the share of a site's time spent training,
    and the peak memory of the whole process tree."""
    from simulations.bench_scale import run_scale_bench

    _setup_logging(False)
    try:
        counts = tuple(int(n) for n in sites.split(",") if n.strip())
    except ValueError:
        raise typer.BadParameter(f"--sites takes comma-separated numbers such as 10,30,100; got {sites!r}.")
    if not counts or min(counts) < 2 or rounds < 1 or not 0 < fraction_train <= 1:
        raise typer.BadParameter("--sites must be 2 or more each, --rounds at least 1, --fraction-train in (0, 1].")
    run_scale_bench(data=data, site_counts=counts, rounds=rounds, fraction=fraction_train, out=Path(out),
                    console=Console(width=160), cpus_per_site=cpus_per_site, set_values=_parse_sets(set_))


@bench_app.command("vae")
def bench_vae(
    data: str = typer.Option(..., help="LFW root (with its protocol files)."),
    rounds: int = typer.Option(3, help="Federated rounds of the 64 px runs (2 local epochs each)."),
    rounds_128: int = typer.Option(2, help="Federated rounds of the 128 px runs."),
    sites: int = typer.Option(4, help="Sites of each federation."),
    epsilon: float = typer.Option(8.0, help="Per-site epsilon of the DP runs."),
    sizes: str = typer.Option("64,128", help="Comma-separated image sizes: 64, 128."),
    max_identities: int = typer.Option(0, help="Use only this many training identities (0 = all)."),
    perceptual: float = typer.Option(0.0, help="Weight of the VAE's perceptual term (vae-perceptual) in every row; "
                                                "0 = off (the default recipe)."),
    out: str = typer.Option("runs/bench-vae", help="Folder for the benchmark's runs and its JSON summary."),
) -> None:
    """The federated VAE, non-DP and DP, at 64 and 128 px: PSNR, SSIM, identity kept, Frechet distance in dlib's
    descriptor space (with its real-vs-real floor), morph ends and smoothness."""
    from simulations.bench_vae import run_vae_bench

    _setup_logging(False)
    try:
        size_list = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"--sizes takes comma-separated sizes such as 64,128; got {sizes!r}.")
    if not size_list or any(s not in (64, 128) for s in size_list):
        raise typer.BadParameter(f"--sizes takes 64 and/or 128; got {sizes!r}.")
    if epsilon <= 0:
        raise typer.BadParameter(f"--epsilon must be positive; got {epsilon}.")
    if rounds < 1 or rounds_128 < 1:
        raise typer.BadParameter("--rounds and --rounds-128 must be at least 1.")
    if perceptual < 0:
        raise typer.BadParameter(f"--perceptual must be 0 or more; got {perceptual}.")
    run_vae_bench(data=data, rounds={64: rounds, 128: rounds_128}, sites=sites, perceptual=perceptual, epsilon=epsilon, sizes=size_list,
                  max_identities=max_identities, out=Path(out), console=Console(width=200))


_STYLE_HELP = "A named style (see `facefl style list`) or the path of a painting."


@app.command()
def anonymize(
    paths: list[str] = typer.Argument(..., help="Image files and folders to anonymize (never modified)."),
    out: str = typer.Option(..., "--out", help="Output folder (created; structure of input folders kept)."),
    style: str = typer.Option(DEFAULT_STYLE, help=_STYLE_HELP),
    strength: float = typer.Option(1.0, help="0 < S <= 1: blend of stylized and original face (1 = full style)."),
    method: str = typer.Option("style", help="style (fast stylizer) | gatys (slow optimisation) | blur | pixelate."),
    no_face: str = typer.Option("whole", help="When no face is found: whole (stylize everything) | refuse | pass."),
    width: str = typer.Option("half", help="Stylizer width: half (phones) | full."),
    stylizer: Optional[str] = typer.Option(None, help="A trained stylizer .pt (with its .json) instead of --style."),
    sha256: Optional[str] = typer.Option(None, help="Expected SHA-256 of --stylizer (default: from its .json)."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Check every face with dlib; a face still matched is not written."),
    styles_dir: Optional[str] = typer.Option(None, help="Folder of style paintings (default ../shared/data/styles)."),
    data: Optional[str] = typer.Option(None, help="Faces to train a missing stylizer on (default: LFW if present)."),
    gallery: list[str] = typer.Option([], help="Other photos of the people in PATHS (files or folders, repeatable): "
                                      "with --verify, a face that still matches any of them is not written."),
    check_inputs: bool = typer.Option(True, "--check-inputs/--no-check-inputs",
                                      help="With --verify, also check every face against all the input photos (other "
                                      "photos of the same people are often among them)."),
    workers: int = typer.Option(0, help="Worker processes (0: every core; 1: this process only)."),
) -> None:
    """Stylize every face in photos so they can be shared; reports faces found and re-identification scores.

    With --verify (default) a face is withheld when dlib still matches it to its original, or to another photo of
    the same person among the inputs and --gallery (README, "Anonymize photos": the gate's rule)."""
    import functools

    from client.photos import anonymize_files, summary_line
    from common.worker_pool import available_cores
    from server.stylizers import default_recognizer, photo_pipeline

    _setup_logging(False)
    if workers < 0:
        raise typer.BadParameter(f"--workers must be 0 (every core) or more; got {workers}.")
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    options = dict(method=method, style=style, strength=strength, no_face=no_face, width=width, styles_dir=styles_dir,
                   data=data or _default_lfw(), stylizer=stylizer, stylizer_sha256=sha256)
    verify = verify and no_face != "pass" and default_recognizer(log) is not None
    # Built here first: a bad option fails before any work, and a stylizer that must be trained is trained (and
    # cached) once, not by every worker.
    anonymizer, gate = photo_pipeline(verify=verify, log=log, **options)
    if gate is not None and (gallery or check_inputs):
        log(f"checking every face against the faces of {'the inputs' if check_inputs else ''}"
            f"{' and ' if check_inputs and gallery else ''}{'--gallery' if gallery else ''} "
            "(withheld: a match to the same person)")

    def report(o) -> None:
        if o.status in ("anonymized", "whole-image"):
            return  # the progress bar counts them; every file is in the report
        where = f" (matched {o.matched}, distance {o.distance:.3f})" if o.matched else ""
        log(f"{o.status:11s} {o.source}: {o.message}{where}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    stages = {"describe": "Describing faces (gallery)", "anonymize": "Anonymizing"}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stages.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done)

        summary = anonymize_files(paths, out, anonymizer=anonymizer, gate=gate, gallery=list(gallery),
                                  check_inputs=check_inputs, workers=workers or available_cores(),
                                  build=functools.partial(photo_pipeline, verify=verify, **options), verify=verify,
                                  report=report, progress=progress)
    console.print(summary_line(summary) + f" in {summary['seconds']:.0f} s ({summary['workers']} "
                  f"worker{'s' if summary['workers'] != 1 else ''}); report in {Path(out) / 'anonymize-report.json'}",
                  markup=False, highlight=False, soft_wrap=True)
    if summary["errors"] or summary["refused"]:
        raise typer.Exit(1)


def _default_lfw() -> Optional[str]:
    from common.anonymization.styles import default_styles_dir

    lfw = default_styles_dir().parent / "lfw"
    return str(lfw) if (lfw / "peopleDevTrain.txt").is_file() else None


@style_app.command("list")
def style_list(styles_dir: Optional[str] = typer.Option(None, help="Folder of style paintings.")) -> None:
    """The named styles, whether their paintings are found, and the trained stylizers in the cache."""
    from common.anonymization.styles import NAMED_STYLES, StyleError, cached_stylizers, resolve_style

    table = Table(title="Named styles (public-domain paintings)")
    for col in ("name", "painting", "file"):
        table.add_column(col)
    for name, st in NAMED_STYLES.items():
        try:
            where = str(resolve_style(name, styles_dir)[1])
        except StyleError:
            where = "not found (pass --styles-dir)"
        table.add_row(name, st.title, where)
    Console().print(table)
    from common.anonymization.styles import SHIPPED_STYLIZERS, shipped_stylizer

    table = Table(title="Stylizers that ship with facefl (used unless the cache holds one for the same style)")
    for col in ("style", "width", "path"):
        table.add_column(col)
    for shipped_style, shipped_width in SHIPPED_STYLIZERS:
        found = shipped_stylizer(shipped_style, shipped_width)
        table.add_row(shipped_style, shipped_width, str(found[0]) if found and found[0].is_file() else "missing")
    Console().print(table)
    cached = cached_stylizers()
    table = Table(title="Trained stylizers in the cache")
    for col in ("style", "width", "steps", "identity model", "path"):
        table.add_column(col)
    for meta in cached:
        table.add_row(str(meta.get("style")), str(meta.get("width")), str(meta.get("settings", {}).get("steps")),
                      str(meta.get("identity_model", ""))[:40], meta["path"])
    Console().print(table if cached else "no trained stylizers yet (`facefl style train` or first use trains one)")


@style_app.command("train")
def style_train(
    style: str = typer.Option(DEFAULT_STYLE, help=_STYLE_HELP),
    data: Optional[str] = typer.Option(None, help="Identity-folder faces to train on (LFW: peopleDevTrain only). "
                                       "Default: LFW beside the project if present, else synthetic faces."),
    width: str = typer.Option("half", help="half (phones, fastest) | full."),
    steps: int = typer.Option(900, help="Training steps."),
    batch_size: int = typer.Option(4, help="Faces per step."),
    image_size: int = typer.Option(128, help="Training (and working) size of face regions."),
    style_weight: Optional[float] = typer.Option(None, help="Weight of the style (Gram) loss (default 30)."),
    identity_weight: Optional[float] = typer.Option(None, help="Weight of the identity term against "
                                                    "--identity's from-scratch model (default 0: off; the face prior "
                                                    "removes identity)."),
    structure_weight: Optional[float] = typer.Option(None, help="Weight of the face-structure term (MTCNN must "
                                                     "still find the face, landmarks in place; default 1; 0 turns it "
                                                     "off)."),
    face_prior: bool = typer.Option(True, "--face-prior/--no-face-prior",
                                    help="Paint a generic face over each inner face before stylizing (default)."),
    identity: str = typer.Option("auto", help="auto (train a CompactFaceNet once, cached) | none | RUN_DIR."),
    identity_epochs: int = typer.Option(4, help="Epochs of the auto identity model."),
    margin: float = typer.Option(0.45, help="Face-region margin (fraction of the face box per side) the stylizer "
                                 "is trained for; recorded in its .json and used by the anonymizer."),
    identity_margin: Optional[float] = typer.Option(None, help="Centred cosine below which the identity term "
                                                    "stops pushing (default 0)."),
    out: Optional[str] = typer.Option(None, help="Write <out>.pt/.json here instead of the cache."),
    styles_dir: Optional[str] = typer.Option(None, help="Folder of style paintings."),
    vgg19: Optional[str] = typer.Option(None, help="Local torchvision VGG19 weights for the perceptual loss "
                                        "(default: a fixed random-weight network; nothing is downloaded)."),
    vgg19_sha256: Optional[str] = typer.Option(None, help="SHA-256 of --vgg19 (required with it)."),
) -> None:
    """Train a fast feed-forward stylizer for one style: a face prior fitted on the training faces, then style,
    content and MTCNN-structure terms (about 5 minutes on 2 cores for LFW)."""
    from server.stylizers import anonymizer_settings, ensure_stylizer

    _setup_logging(False)
    overrides = {"steps": steps, "batch_size": batch_size, "image_size": image_size}
    if style_weight is not None:
        overrides["style_weight"] = style_weight
    if identity_weight is not None:
        overrides["identity_weight"] = identity_weight
    if structure_weight is not None:
        overrides["structure_weight"] = structure_weight
    if identity_margin is not None:
        overrides["identity_margin"] = identity_margin
    settings = anonymizer_settings(**overrides)
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    _, meta, path = ensure_stylizer(style, width=width, styles_dir=styles_dir, data=data or _default_lfw(),
                                    settings=settings, identity=identity, out=out, retrain=True, log=log,
                                    vgg19=vgg19, vgg19_sha256=vgg19_sha256, identity_epochs=identity_epochs,
                                    margin=margin, face_prior=face_prior,
                                    command="facefl " + shlex.join(sys.argv[1:]))
    console.print(f"stylizer for {meta['style']!r} ({width}) written to {path} (sha256 {meta['sha256'][:16]}...)")


@style_app.command("export")
def style_export(
    out: str = typer.Option(..., "--out", help="Folder for the exported files."),
    style: str = typer.Option(DEFAULT_STYLE, help=_STYLE_HELP),
    width: str = typer.Option("half", help="half | full."),
    stylizer: Optional[str] = typer.Option(None, help="A trained stylizer .pt (with its .json) instead of --style."),
    sha256: Optional[str] = typer.Option(None, help="Expected SHA-256 of --stylizer."),
    styles_dir: Optional[str] = typer.Option(None, help="Folder of style paintings."),
) -> None:
    """Export a stylizer as TorchScript and ONNX for phones and edge boxes (each checked against PyTorch)."""
    from common.anonymization.styles import load_stylizer
    from server.stylizers import ensure_stylizer, export_stylizer

    _setup_logging(False)
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    if stylizer:
        model, meta = load_stylizer(stylizer, sha256)
    else:
        model, meta, _ = ensure_stylizer(style, width=width, styles_dir=styles_dir, data=_default_lfw(), log=log)
    written = export_stylizer(model, meta, out)
    for key, value in written.items():
        console.print(f"{key}: {value}")


@bench_app.command("anonymize")
def bench_anonymize(
    data: str = typer.Option(..., help="LFW root (with pairsDevTest.txt)."),
    people: int = typer.Option(150, help="LFW test people (>= 100 for the reported figures)."),
    style: str = typer.Option(DEFAULT_STYLE, help=_STYLE_HELP),
    strengths: str = typer.Option("0.5,0.75,1.0", help="Comma-separated strengths for the privacy/fidelity curve."),
    gatys_people: int = typer.Option(0, help="Also run Gatys optimisation on this many people (slow)."),
    stylizer: list[str] = typer.Option([], help="Trained stylizer .pt files to measure instead of --style's "
                                       "(repeatable; each gets the strength curve)."),
    heldout_people: int = typer.Option(150, help="LFW test people after the first --people, measured apart as "
                                       "photos no stylizer saw (0: none; ../shared/data/faces is measured too)."),
    out: str = typer.Option("runs/bench-anonymize", help="Folder for the JSON summary."),
    transforms: bool = typer.Option(True, "--transforms/--no-transforms",
                                    help="The stylizer, blur and pixelation rows and the speed table."),
    folders: str = typer.Option("150,heldout-150,1000,multi",
                                help="Folder rows: `facefl anonymize` with its defaults on folders of LFW people "
                                "(150, heldout-150, 1000, multi: 2-4 photos per person; empty: none)."),
    workers: int = typer.Option(0, help="Worker processes for the folder rows (0: every core, as the command)."),
) -> None:
    """Re-identification (dlib), detection and landmark retention, and speed: style transfer vs blur/pixelation,
    and `facefl anonymize` itself on folders of many people."""
    from simulations.bench_folders import FOLDER_PARTS, run_folder_bench
    from simulations.bench_style import run_style_bench

    _setup_logging(False)
    parts = [p.strip() for p in folders.split(",") if p.strip()]
    unknown = [p for p in parts if p not in FOLDER_PARTS]
    if unknown:
        raise typer.BadParameter(f"Unknown folder rows {', '.join(unknown)}; use {', '.join(FOLDER_PARTS)}.")
    wide = Console(width=170)
    if transforms:
        run_style_bench(data=data, people=people, style=style,
                        strengths=[float(s) for s in strengths.split(",") if s.strip()], gatys_people=gatys_people,
                        stylizers=stylizer, heldout_people=heldout_people, out=Path(out), console=wide)
    if parts:
        run_folder_bench(data=data, out=Path(out), console=wide, parts=parts, workers=workers)


@app.command()
def morph(
    image_a: str = typer.Argument(..., help="Photo of the first face (never modified)."),
    image_b: str = typer.Argument(..., help="Photo of the second face (never modified)."),
    run: str = typer.Option(..., "--run", help="Run directory with a trained VAE (task vae or both)."),
    steps: int = typer.Option(11, help="Frames from A to B, at least 2 (11 gives alpha steps of 0.1)."),
    out: str = typer.Option("morph.gif", "--out", help="Animated GIF to write; the PNG strip goes beside it "
                            "as <stem>-strip.png."),
    mode: str = typer.Option("linear", help="Latent interpolation: linear | slerp."),
    anonymize: bool = typer.Option(True, "--anonymize/--no-anonymize",
                                   help="Release every frame through the egress gate (default). --no-anonymize "
                                   "writes the raw VAE frames, which can show recognisable faces."),
    style: str = typer.Option(DEFAULT_STYLE, help=_STYLE_HELP),
    stylizer: Optional[str] = typer.Option(None, help="A trained stylizer .pt (with its .json) instead of --style."),
    sha256: Optional[str] = typer.Option(None, help="Expected SHA-256 of --stylizer (default: from its .json)."),
    strength: float = typer.Option(1.0, help="0 < S <= 1: blend of stylized and original face (1 = full style)."),
    method: str = typer.Option("style", help="Anonymization: style | blur | pixelate."),
    size: int = typer.Option(128, help="Side of each output frame in pixels (VAE frames are upscaled)."),
    frame_ms: int = typer.Option(120, help="Duration of each GIF frame in milliseconds."),
    pingpong: bool = typer.Option(True, "--pingpong/--no-pingpong", help="Loop A -> B -> A (default) or A -> B."),
) -> None:
    """Morph one face into another through the latent space of a run's VAE; writes a GIF and a PNG strip."""
    from server.morph import check_request, check_run, morph_images, read_photo
    from server.stylizers import build_gate

    _setup_logging(False)
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    check_request(image_a, image_b, out=out, steps=steps, mode=mode, size=size, frame_ms=frame_ms)
    check_run(run)
    for path in (image_a, image_b):
        read_photo(path)  # fail on a bad photo before a stylizer is loaded or trained
    gate = None
    if anonymize:
        # Frames are generated, not photos: any frame that matches either person's photo is withheld.
        gate = build_gate(site="this device", log=log, gallery_rule="any", blank=False, method=method, style=style,
                          strength=strength, stylizer=stylizer, stylizer_sha256=sha256, data=_default_lfw())
        gate.add_to_gallery([read_photo(image_a), read_photo(image_b)])  # a frame must not match either person
    result = morph_images(image_a, image_b, run_dir=run, steps=steps, mode=mode, out=out, gate=gate, size=size,
                          frame_ms=frame_ms, pingpong=pingpong)
    privacy = (f"{result.released} released through the egress gate, {result.withheld} withheld"
               if result.anonymized else "not anonymized (--no-anonymize)")
    console.print(f"morph: wrote {result.gif} and {result.strip}; {result.steps} frames ({result.gif_frames} in the "
                  f"loop), {privacy}; checkpoint round {result.round}; {result.seconds:.1f}s",
                  markup=False, highlight=False, soft_wrap=True)
    if result.to_a is not None:
        from server.face_judge import MORPH_MAX_STEP

        distances = " ".join(f"{da:.2f}/{db:.2f}" for da, db in zip(result.to_a, result.to_b))
        console.print(f"dlib descriptor distance of each frame to A/B (same person below 0.6): {distances}; ends "
                      f"{'matched' if result.ends_matched else 'NOT matched'} to their photos; largest step "
                      f"{result.max_step:.3f} ({'smooth' if result.max_step <= MORPH_MAX_STEP else 'NOT smooth'}: "
                      f"bound {MORPH_MAX_STEP:g})", markup=False, highlight=False, soft_wrap=True)
    if not anonymize:
        console.print("warning: --no-anonymize: the frames are the VAE's decodings as they are and can show "
                      "recognisable faces of the people in the two photos; do not share them.",
                      markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point: known errors become one line on stderr and exit status 2. facefl's own errors
    (ConfigError, DataError, RunDirError, PrivacyBudgetError, StyleError, ...) are ValueErrors, so nothing is imported
    here for them: a command that fails on its arguments answers in a fraction of a second, before torch loads. A
    federation that stops on its own failure (``DiskFullError``, ``QuorumError``: RuntimeErrors of facefl's modules)
    prints its one-line message and exits with status 1."""
    try:
        app()
    except (ValueError, FileNotFoundError, KeyError) as exc:
        if os.environ.get("FACEFL_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as exc:  # a running federation's own failure (a full disk, no quorum): its message says it all
        if type(exc).__module__.split(".")[0] not in ("server", "client", "common", "simulations") or \
                os.environ.get("FACEFL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        hint = " Completed rounds are checkpointed: resume with --resume RUN_DIR." if sys.argv[1:2] == ["simulate"] \
            else ""
        console.print(f"interrupted.{hint}")
        sys.exit(130)


if __name__ == "__main__":
    main()
