"""``facefl bench privacy``: the membership-inference audit of federations with and without DP, both models, and the
one-run canary audit (``--parts canaries``: the README's pretrained recipe and the from-scratch scattering network, 4
sites, without DP and at each epsilon, white-box and black-box bounds; ``<out>/bench-canaries.json``).

Five simulated federations on LFW (``--sites`` sites of the ``peopleDevTrain.txt`` people, task both: the scattering
embedding network and the VAE at 64 px): non-DP and DP at each ``--epsilons`` value with the benchmark recipe, and a
run made to overfit (``--overfit-identities`` people, ``--overfit-epochs`` local epochs, a third of each person's
faces kept out as non-members) without DP and with DP at the first epsilon. Each is audited by
:func:`server.privacy_audit.audit_run.audit_run`; the table and the goal lines are printed and everything is written
to ``<out>/bench-privacy.json``. Runs that completed before are audited again, not retrained (``--retrain`` to redo).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.atomic import atomic_write_json
from common.config import RunConfig

RECIPE = {"task": "both", "model": "scatternet", "margin": 0.2, "image_size": 64, "local_epochs": 2, "batch_size": 64}
AUC_GOAL = 0.55


def privacy_rows(base: RunConfig, *, rounds: int, epsilons: tuple[float, ...], overfit_identities: int,
                 overfit_epochs: int) -> list[tuple[str, RunConfig]]:
    cfg = base.replace(num_rounds=rounds, **RECIPE)
    rows = [("non-DP", cfg.replace(dp=False)), (f"DP eps={epsilons[0]:g}", cfg.replace(dp=True,
                                                                                   target_epsilon=epsilons[0]))]
    if overfit_identities:  # before the other epsilons: the two rows the audit's own check needs come first
        over = cfg.replace(max_identities=overfit_identities, local_epochs=overfit_epochs, val_fraction=0.34,
                           batch_size=16)
        rows += [("overfit non-DP", over.replace(dp=False)),
                 (f"overfit DP eps={epsilons[0]:g}", over.replace(dp=True, target_epsilon=epsilons[0]))]
    rows += [(f"DP eps={e:g}", cfg.replace(dp=True, target_epsilon=e)) for e in epsilons[1:]]
    return rows


def _completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "metrics.json").read_text())["run"]["status"] == "completed"
    except (OSError, KeyError, json.JSONDecodeError):
        return False


def _train(cfg: RunConfig, run_dir: Path, *, sites: int, retrain: bool, console: Console, what: str) -> None:
    """Run ``cfg`` on ``sites`` sites into ``run_dir`` through `facefl simulate`'s path, unless a completed run is
    there already (and not ``retrain``); an unfinished one is removed first."""
    import shutil

    from simulations.simulate import prepare_config, simulate

    if not retrain and _completed(run_dir):
        return
    console.print(what)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    simulate(prepare_config(cfg, num_sites=sites, out=str(run_dir)), sites)


def _f(value: float, fmt: str) -> str:
    return "inf" if value == math.inf else format(value, fmt)


def privacy_table(rows: dict[str, dict]) -> Table:
    table = Table(title="Membership inference against each run's final models (members: training faces; "
                        "non-members: the same people's validation faces); epsilon lower bounds at 95% confidence")
    for col in ("run", "model", "attack", "AUC (95% CI)", "TPR@1%", "TPR@0.1%", "eps lower bound", "eps estimate",
                "accountant eps", "members / non"):
        table.add_column(col)
    for name, row in rows.items():
        for model, entry in row["audit"]["models"].items():
            for attack, a in entry["attacks"].items():
                table.add_row(name, model, attack, f"{a['auc']:.3f} ({a['auc_ci'][0]:.3f}-{a['auc_ci'][1]:.3f})",
                              f"{a['tpr_at_fpr_1pct']:.3f}", f"{a['tpr_at_fpr_0.1pct']:.3f}",
                              _f(a["epsilon_lower_bound"], ".2f"), _f(a["epsilon_estimate"], ".2f"),
                              _f(entry["accountant_epsilon"], ".2f"), f"{a['members']} / {a['non_members']}")
    return table


def goal_lines(rows: dict[str, dict], epsilons: tuple[float, ...]) -> list[str]:
    lines = []
    dp8 = rows.get("DP eps=8", {}).get("audit", {}).get("models", {})
    for model, entry in dp8.items():
        auc = entry["best_auc"]
        lines.append(f"DP eps=8, {model}: highest attack AUC {auc:.3f} (goal <= {AUC_GOAL}): "
                     f"{'met' if auc <= AUC_GOAL else 'NOT met'}")
    for name, row in rows.items():
        for model, entry in row["audit"]["models"].items():
            if entry["dp"]:
                ok = entry["epsilon_lower_bound"] <= entry["accountant_epsilon"]
                lines.append(f"{name}, {model}: empirical lower bound {entry['epsilon_lower_bound']:.2f} <= accountant "
                             f"{entry['accountant_epsilon']:.2f}: {'met' if ok else 'NOT met (a bug to find)'}")
    plain, private = rows.get("overfit non-DP"), rows.get(f"overfit DP eps={epsilons[0]:g}")
    if plain and private:
        for model in plain["audit"]["models"]:
            a, b = plain["audit"]["models"][model], private["audit"]["models"].get(model)
            if b is None:
                continue
            best = max(a["attacks"].values(), key=lambda x: x["auc"])
            other = max(b["attacks"].values(), key=lambda x: x["auc"])
            clear = best["auc_ci"][0] > other["auc_ci"][1]
            lines.append(f"overfit, {model}: AUC {best['auc']:.3f} without DP against {other['auc']:.3f} with DP "
                         f"(95% intervals apart: {'yes' if clear else 'NO'})")
    return lines


def run_privacy_bench(*, data: str, rounds: int, sites: int, epsilons: tuple[float, ...], overfit_identities: int,
                      overfit_epochs: int, out: Path, console: Console, retrain: bool = False) -> dict:
    from server.privacy_audit.audit_run import audit_run

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(data).expanduser().resolve())
    warnings.filterwarnings("ignore", message=".*Secure RNG.*")
    report: dict = {"data": data, "rounds": rounds, "sites": sites, "epsilons": list(epsilons), "recipe": RECIPE,
                    "rows": {}}
    for name, cfg in privacy_rows(RunConfig(data=data, model="compact"), rounds=rounds, epsilons=epsilons,
                                  overfit_identities=overfit_identities, overfit_epochs=overfit_epochs):
        run_dir = out / name.replace(" ", "-").replace("=", "")
        _train(cfg, run_dir, sites=sites, retrain=retrain, console=console,
               what=f"[bold]{name}[/]: training {cfg.num_rounds} rounds x {cfg.local_epochs} local epochs")
        console.print(f"[bold]{name}[/]: auditing {run_dir}")
        audit = audit_run(run_dir)
        last = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["global"]
        report["rows"][name] = {"run_dir": str(run_dir), "audit": audit,
                                "utility": {k: last[k] for k in ("embedding/accuracy", "vae/psnr") if k in last}}
        for model, entry in audit["models"].items():
            console.print(f"  {model}: best AUC {entry['best_auc']:.3f}, eps lower bound "
                          f"{entry['epsilon_lower_bound']:.2f} (accountant {_f(entry['accountant_epsilon'], '.2f')})")
        atomic_write_json(out / "bench-privacy.json", report)
    console.print(privacy_table(report["rows"]))
    report["goals"] = goal_lines(report["rows"], epsilons)
    for line in report["goals"]:
        console.print(line)
    atomic_write_json(out / "bench-privacy.json", report)
    console.print(f"wrote {out / 'bench-privacy.json'}")
    return report


# ----------------------------------------------------------------------------------------------- canary rows
# The from-scratch recipe of the README (scattering network, batch 256, margin 0.2); the pretrained one is the default.
SCRATCH = {"model": "scatternet", "batch_size": 256, "margin": 0.2}


def canary_rows(data: str, *, rounds: int, scratch_rounds: int, epsilons: tuple[float, ...], gradients: int,
                inputs: int, recipes: tuple[str, ...] = ("pretrained", "scratch")) -> list[tuple[str, RunConfig]]:
    """(name, config) of the canary runs: each recipe without DP and at each epsilon, with ``gradients`` gradient and
    ``inputs`` input canaries per site."""
    rows = []
    for recipe in recipes:
        base = RunConfig(data=data, canary_gradients=gradients, canary_inputs=inputs)
        base = (base.replace(num_rounds=rounds) if recipe == "pretrained"
                else RunConfig(data=data, canary_gradients=gradients, canary_inputs=inputs, num_rounds=scratch_rounds,
                               **SCRATCH))
        rows.append((f"canaries {recipe} non-DP", base.replace(dp=False)))
        rows += [(f"canaries {recipe} DP eps={e:g}", base.replace(dp=True, target_epsilon=e)) for e in epsilons]
    return rows


def canary_table(rows: dict[str, dict]) -> Table:
    table = Table(title="One-run canary audit (Steinke et al. 2023): epsilon lower bounds at 95% confidence")
    for col in ("run", "setting", "canaries", "guesses", "correct", "eps lower bound", "largest certifiable",
                "accountant eps", "delta", "utility"):
        table.add_column(col)
    for name, row in rows.items():
        audit = row["canaries"]
        for setting, s in audit["settings"].items():
            table.add_row(name, setting, str(s["canaries"]), str(s["guesses"]), str(s["correct"]),
                          f"{s['epsilon_lower_bound']:.2f}", f"{s['max_certifiable']:.2f}",
                          _f(audit["accountant_epsilon"], ".2f"), f"{audit['delta']:.1e}",
                          ", ".join(f"{k} {v:.3f}" for k, v in row["utility"].items()))
    return table


def canary_goal_lines(rows: dict[str, dict]) -> list[str]:
    """The issue's goals: non-DP white-box >= 4; DP at 8: >= 2 and never above the accountant; DP at 2: <= 2."""
    lines = []
    for name, row in rows.items():
        audit = row["canaries"]
        white = audit["settings"].get("white-box")
        eps = audit["accountant_epsilon"]
        for setting, s in audit["settings"].items():
            if audit["dp"]:
                ok = s["epsilon_lower_bound"] <= eps
                lines.append(f"{name}, {setting}: {s['epsilon_lower_bound']:.2f} <= accountant {eps:.2f}: "
                             f"{'met' if ok else 'NOT met (a bug to find)'}")
        if white is None:
            continue
        if not audit["dp"]:
            lines.append(f"{name}, white-box: {white['epsilon_lower_bound']:.2f} >= 4 (largest certifiable "
                         f"{white['max_certifiable']:.2f}): {'met' if white['epsilon_lower_bound'] >= 4 else 'NOT met'}")
        elif "eps=8" in name:
            lines.append(f"{name}, white-box: {white['epsilon_lower_bound']:.2f} >= 2: "
                         f"{'met' if white['epsilon_lower_bound'] >= 2 else 'NOT met'}")
    return lines


def run_canary_bench(*, data: str, rounds: int, scratch_rounds: int, sites: int, epsilons: tuple[float, ...],
                     gradients: int, inputs: int, out: Path, console: Console, retrain: bool = False,
                     recipes: tuple[str, ...] = ("pretrained", "scratch")) -> dict:
    """Train (or reuse) the canary runs, audit each, print the table and the goals; ``<out>/bench-canaries.json``."""
    from server.privacy_audit.canaries import canary_audit

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(data).expanduser().resolve())
    report: dict = {"data": data, "sites": sites, "rounds": rounds, "scratch_rounds": scratch_rounds,
                    "canaries_per_site": {"gradients": gradients, "inputs": inputs}, "rows": {}}
    for name, cfg in canary_rows(data, rounds=rounds, scratch_rounds=scratch_rounds, epsilons=epsilons,
                                 gradients=gradients, inputs=inputs, recipes=recipes):
        run_dir = out / name.replace(" ", "-").replace("=", "")
        _train(cfg, run_dir, sites=sites, retrain=retrain, console=console,
               what=f"[bold]{name}[/]: training {cfg.num_rounds} rounds, {cfg.model}")
        audit = canary_audit(run_dir)
        last = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["global"]
        report["rows"][name] = {"run_dir": str(run_dir), "canaries": audit,
                                "utility": {k: last[k] for k in ("embedding/accuracy",) if k in last}}
        for setting, s in audit["settings"].items():
            console.print(f"  {setting}: eps >= {s['epsilon_lower_bound']:.2f} ({s['correct']}/{s['guesses']}, "
                          f"m={s['canaries']}, largest {s['max_certifiable']:.2f}; accountant "
                          f"{_f(audit['accountant_epsilon'], '.2f')})")
        atomic_write_json(out / "bench-canaries.json", report)
    console.print(canary_table(report["rows"]))
    report["goals"] = canary_goal_lines(report["rows"])
    for line in report["goals"]:
        console.print(line)
    atomic_write_json(out / "bench-canaries.json", report)
    console.print(f"wrote {out / 'bench-canaries.json'}")
    return report
