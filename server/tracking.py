"""Run tracking in MLflow (``tracking = "mlflow"``; the optional extra ``pip install "facefl[mlflow]"``).

A tracked run logs its configuration as parameters, every round's global metrics and each site's epsilon as metrics
(step = round), the membership-inference audit's figures, and its report (``report.html``, ``summary.json``, the
morph GIF) as artifacts. The store is ``tracking-uri`` when given (an MLflow tracking server, ``http://host:5000``,
or any store URI), else a local SQLite store in the run directory (``sqlite:///RUN/mlflow.db``, artifacts in
``RUN/mlartifacts``; MLflow 3 keeps its plain-file store in maintenance mode), which ``mlflow ui
--backend-store-uri sqlite:///RUN/mlflow.db`` shows. ``RUN/tracking.json`` records the store and the MLflow run id,
so a resumed run, a later report and an audit add to the same MLflow run. A tracking failure after the run has started
is logged and does not stop training.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

from common.atomic import atomic_write_json
from common.config import ConfigError, RunConfig

log = logging.getLogger("facefl.tracking")

TRACKING_FILE = "tracking.json"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_name(key: str) -> str:
    """An MLflow-safe metric name (letters, digits, ``_ - . /`` and spaces): ``tar@far=1e-1`` -> ``tar_far_1e-1``."""
    return _UNSAFE.sub("_", key)


def local_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / LOCAL_DB).resolve()}"


def _mlflow():
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError as exc:
        raise ConfigError('tracking=mlflow needs MLflow: pip install "facefl[mlflow]" (or set tracking=none).') \
            from exc
    return mlflow, MlflowClient


class MlflowTracker:
    """One facefl run's MLflow run."""

    def __init__(self, client, run_id: str, run_dir: Path) -> None:
        self.client = client
        self.run_id = run_id
        self.run_dir = run_dir
        self._warned = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def start(cls, cfg: RunConfig, run_dir: str | Path) -> MlflowTracker:
        """Open the run's MLflow run: the one in ``tracking.json`` (a resumed run), else a new one with the run's
        configuration as parameters. Fails with a clear error when the store cannot be reached."""
        run_dir = Path(run_dir)
        existing = cls.open(run_dir)
        if existing is not None:
            existing.client.update_run(existing.run_id, status="RUNNING")
            return existing
        _, client_cls = _mlflow()
        uri = cfg.tracking_uri or local_uri(run_dir)
        _check_reachable(uri)
        try:
            client = client_cls(tracking_uri=uri)
            experiment = client.get_experiment_by_name(cfg.tracking_experiment)
            if experiment is None:
                location = None if cfg.tracking_uri else (run_dir / LOCAL_ARTIFACTS).resolve().as_uri()
                experiment_id = client.create_experiment(cfg.tracking_experiment, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            run = client.create_run(experiment_id, run_name=run_dir.name,
                                    tags={"facefl.run_dir": str(run_dir.resolve()), "facefl.task": cfg.task})
        except Exception as exc:  # noqa: BLE001 - any store failure: say which store, before training starts
            raise ConfigError(f"Cannot log to MLflow at {uri}: {exc}. Check tracking-uri (is the tracking server "
                              "running?) or set tracking=none.") from exc
        tracker = cls(client, run.info.run_id, run_dir)
        params = [(k, str(v)[:6000]) for k, v in sorted(cfg.to_mapping().items())]
        tracker._call("log_batch", run.info.run_id, params=[_param(k, v) for k, v in params])
        atomic_write_json(run_dir / TRACKING_FILE, {"backend": "mlflow", "tracking_uri": uri,
                                                    "experiment_id": experiment_id, "run_id": run.info.run_id})
        log.info("facefl: tracking this run in MLflow at %s (run %s)", uri, run.info.run_id)
        return tracker

    @classmethod
    def open(cls, run_dir: str | Path) -> MlflowTracker | None:
        """The tracker recorded in ``RUN/tracking.json``; None when the run is not tracked."""
        import json

        path = Path(run_dir) / TRACKING_FILE
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
            uri, run_id = info["tracking_uri"], info["run_id"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s is unreadable (%s); not tracking.", path, exc)
            return None
        _, client_cls = _mlflow()
        return cls(client_cls(tracking_uri=uri), run_id, Path(run_dir))

    # ------------------------------------------------------------------ logging
    def _call(self, method: str, *args, **kwargs) -> None:
        try:
            getattr(self.client, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            if not self._warned:
                log.warning("MLflow tracking failed (%s: %s); the run goes on, metrics.json has everything.",
                            type(exc).__name__, exc)
                self._warned = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in sorted(metrics.items())
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1,000 metrics per batch
            self._call("log_batch", self.run_id, metrics=batch[start : start + 1000])

    def log_round(self, server_round: int, global_metrics: dict[str, float], privacy: dict[str, dict],
                  seconds: float) -> None:
        """A round's global metrics, each site's epsilon so far and the round's wall-clock seconds."""
        values = dict(global_metrics)
        values["round/seconds"] = seconds
        for site, p in privacy.items():
            values[f"privacy/{site}/epsilon"] = p.get("epsilon", 0.0)
        self.log_metrics(values, server_round)

    def log_audit(self, audit: dict) -> None:
        """The membership-inference audit's figures, at the audited round."""
        values = {}
        for model, entry in audit.get("models", {}).items():
            for name, a in entry.get("attacks", {}).items():
                for key in ("auc", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "epsilon_lower_bound"):
                    values[f"audit/{model}/{name}/{key}"] = a[key]
        for setting, c in audit.get("canaries", {}).get("settings", {}).items():  # the one-run canary audit
            for key in ("epsilon_lower_bound", "max_certifiable", "canaries", "guesses", "correct"):
                values[f"audit/canaries/{setting}/{key}"] = float(c[key])
        self.log_metrics(values, int(audit.get("round", 0)))

    def log_artifacts(self, paths: list[Path], folder: str = "report") -> None:
        for path in paths:
            if Path(path).is_file():
                self._call("log_artifact", self.run_id, str(path), folder)

    def finish(self, status: str = "completed") -> None:
        self._call("set_terminated", self.run_id, "FINISHED" if status == "completed" else "FAILED")


def _check_reachable(uri: str, timeout: float = 10.0) -> None:
    """A tracking server that does not answer fails the run at once (MLflow's client would retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot reach the MLflow tracking server at {uri} ({exc}): start it (`mlflow server`) or "
                          "check tracking-uri, or set tracking=none.") from exc


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def start_tracking(cfg: RunConfig, run_dir: Path) -> MlflowTracker | None:
    """The run's tracker when ``cfg.tracking`` asks for one (opened before the first round)."""
    return MlflowTracker.start(cfg, run_dir) if cfg.tracking == "mlflow" else None


def _run_tracker(run_dir: str | Path) -> MlflowTracker | None:
    """The tracker of a run that is tracked, None otherwise (or when MLflow is missing, with a warning)."""
    try:
        return MlflowTracker.open(run_dir)
    except ConfigError as exc:
        log.warning("%s", exc)
        return None


def track_report(run_dir: str | Path, files: list[Path]) -> None:
    """Log a report's files to the run's MLflow run, if the run is tracked."""
    if (tracker := _run_tracker(run_dir)) is not None:
        tracker.log_artifacts(files)


def track_audit(run_dir: str | Path, audit: dict) -> None:
    """Log an audit's figures to the run's MLflow run, if the run is tracked."""
    if (tracker := _run_tracker(run_dir)) is not None:
        tracker.log_audit(audit)
