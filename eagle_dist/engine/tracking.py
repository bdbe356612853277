"""Experiment tracking: MLflow on rank 0, a NullTracker everywhere else, a local file always.

    tracker = make_tracker(dist.is_main, run_dir, uri=None, experiment="eagle-dist")
    tracker.start(run_name="synthetic-default", params=flat_config, run_id=saved_run_id)
    tracker.log_metrics({"loss": 0.3, "images_per_s": 41.0}, step=120)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.close(status="FAILED")      # "FINISHED" (default), "FAILED" or "KILLED"

    # a run nested under another (what `eagle-dist evaluate` does under the training run):
    tracker = MlflowTracker(out_dir, uri=uri, job="evaluation")
    tracker.start(run_name="eval-step-00000400", params=..., parent_run_id=train_run_id, tags={...})

    mlflow ui --backend-store-uri sqlite:///<abs run_dir>/mlflow.db     # browse a local run

Tracking URI: the `uri` argument, else $MLFLOW_TRACKING_URI, else a sqlite store in the run
folder (`<run_dir>/mlflow.db`, artifacts under `<run_dir>/mlartifacts/`). Passing the run id
saved in a checkpoint to `start()` continues that same MLflow run after a resume.

Nothing is lost when MLflow is not there: every metric is appended to `<run_dir>/metrics.jsonl`
first (one JSON object per call: step, time, metrics), and `log_text`/`log_dict` files are
written into the run folder before upload. An unreachable server (checked with a 2-second
probe before the first request) or an MLflow error mid-run produces ONE warning that names the
URI (credentials masked) and what to do; the tracker then stops talking to MLflow for the rest
of the run and the job goes on.  This module is the only MLflow client in eagle-dist. To keep a dead server from stalling a step for minutes we
lower MLflow's HTTP timeout/retries (MLFLOW_HTTP_REQUEST_TIMEOUT=10 s,
MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1) unless already set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
PROBE_TIMEOUT_S = 2.0
METRICS_FILE = "metrics.jsonl"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call


class TrackingWarning(UserWarning):
    """MLflow is unreachable or failed; training continues and metrics go to metrics.jsonl."""


def mask_uri(uri: str) -> str:
    """The URI with user, password and token-like query values replaced by ***."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    secret = ("token", "password", "secret", "key", "auth", "signature", "credential")
    masked = [(k, "***" if any(s in k.lower() for s in secret) else v) for k, v in query]
    if netloc == parts.netloc and masked == query:
        return uri  # nothing secret; urlunsplit would also turn sqlite:////abs into sqlite://abs
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(masked, safe="*"), parts.fragment)
    )


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': '0.001'}; already-flat dicts pass through."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_VALUE]
    return flat


def env_uri() -> str | None:
    """$MLFLOW_TRACKING_URI (None when unset or empty): the one place eagle-dist reads it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the tracking server answers at all (any HTTP status), else the reason it does not.

    Only http(s) stores need a probe; local stores (sqlite, file) are always reachable.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (perhaps 401/404 behind a proxy): reachable
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"{type(reason).__name__}: {reason}"


class NullTracker:
    """What non-zero ranks get: the same methods, doing nothing."""

    run_id: str | None = None
    uri_for_display: str = ""
    active = False

    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None,
              parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """MLflow client for rank 0 that never stops training and never loses a metric."""

    def __init__(self, run_dir: str | os.PathLike, uri: str | None = None, experiment: str = "eagle-dist",
                 job: str = "training"):
        self.run_dir = Path(run_dir)
        self.job = job  # what goes on when MLflow fails (named in the warning)
        self.uri = uri or env_uri() or default_uri(self.run_dir)
        self.uri_for_display = mask_uri(self.uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self.active = False  # True while MLflow calls are being made
        self.failed = False  # MLflow failed at some point (warned once; files only since)
        self._client: Any = None
        self._warned = False
        self._closed = False
        self._metrics_path = self.run_dir / METRICS_FILE
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)

    # -- failure handling

    def _disable(self, what: str, err: BaseException | str) -> None:
        self.active = False
        self.failed = True
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"MLflow tracking at {self.uri_for_display} failed while {what} ({err}). {self.job.capitalize()} "
            f"continues; metrics keep going to {self._metrics_path} and files stay in "
            f"{self.run_dir}. Check that the server is up (or unset MLFLOW_TRACKING_URI / set "
            "tracking.uri to use the local sqlite store) and restart to resume logging into "
            f"run {self.run_id or '(not created)'}.",
            TrackingWarning,
            stacklevel=3,
        )

    # -- lifecycle

    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None,
              parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Create (or with `run_id`, continue) the MLflow run and log the params.

        parent_run_id: nest a new run under that run (in its experiment); tags: set on a new run.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Keep the id even if MLflow is down, so checkpoints still carry it and a later resume
        # with the server back continues the same run.
        self.run_id = run_id
        unreachable = probe(self.uri)
        if unreachable is not None:
            self._disable("connecting", f"unreachable: {unreachable}")
            return
        try:
            self._start(run_name, run_id, parent_run_id, dict(tags or {}))
            self.active = True
            self.log_params(params)
        except Exception as err:  # noqa: BLE001  (any MLflow/HTTP/DB error must not stop training)
            self._disable("starting the run", err)

    def _start(self, run_name: str, run_id: str | None, parent_run_id: str | None, tags: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        # Schema-migration chatter on first use of a sqlite store is noise in a training log.
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._client = client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            try:
                client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                return
            except MlflowException as err:
                warnings.warn(
                    f"MLflow run {run_id} (from the checkpoint) is not in {self.uri_for_display} "
                    f"({err}); starting a new run.",
                    TrackingWarning,
                    stacklevel=3,
                )
        experiment_id = self._parent_experiment(parent_run_id, tags) if parent_run_id else None
        if experiment_id is None:
            experiment_id = self._experiment_id()
        self.run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def _experiment_id(self) -> str:
        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        if self.uri.startswith("sqlite:") and self.uri == default_uri(self.run_dir):
            # The run folder's own store keeps its artifacts next to it, not in ./mlruns.
            artifacts = (self.run_dir.resolve() / "mlartifacts").as_uri()
            return self._client.create_experiment(self.experiment, artifact_location=artifacts)
        return self._client.create_experiment(self.experiment)

    def _parent_experiment(self, parent_run_id: str, tags: dict[str, str]) -> str | None:
        """The parent run's experiment id (and the nesting tag in `tags`), None if it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            experiment_id = self._client.get_run(parent_run_id).info.experiment_id
        except MlflowException:
            warnings.warn(f"the parent run {parent_run_id} is not in {self.uri_for_display}; logging a "
                          "top-level run instead.", TrackingWarning, stacklevel=4)
            return None
        tags["mlflow.parentRunId"] = parent_run_id
        return experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested dicts are flattened to dotted keys). On a resumed run, params
        already logged are skipped; a changed value is reported, since MLflow params are
        immutable."""
        if not self.active:
            return
        from mlflow.entities import Param

        flat = flatten_params(params)
        try:
            existing = self._client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
            new = [Param(k, v) for k, v in flat.items() if k not in existing]
            for i in range(0, len(new), PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, params=new[i : i + PARAMS_PER_BATCH])
        except Exception as err:  # noqa: BLE001
            self._disable("logging params", err)
            return
        if changed:
            warnings.warn(
                f"resumed MLflow run {self.run_id} keeps its original values for changed params: "
                + ", ".join(changed[:20]),
                TrackingWarning,
                stacklevel=2,
            )

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append to metrics.jsonl, then send to MLflow. Non-numeric values are skipped."""
        values = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                continue
        now = time.time()
        record = {"step": int(step), "time": now, "metrics": values}
        with open(self._metrics_path, "a") as f:
            # NaN/Inf stay visible in the file (JSON extension Python reads back).
            f.write(json.dumps(record) + "\n")
        if not self.active or not values:
            return
        from mlflow.entities import Metric

        stamp = int(now * 1000)
        batch = [Metric(k, v, stamp, int(step)) for k, v in values.items() if math.isfinite(v)]
        try:
            for i in range(0, len(batch), METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=batch[i : i + METRICS_PER_BATCH])
        except Exception as err:  # noqa: BLE001
            self._disable(f"logging metrics at step {step}", err)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (it stays where it is, so nothing is lost if MLflow is down)."""
        if not self.active:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:  # noqa: BLE001
            self._disable(f"uploading {path}", err)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Write `name` (JSON) into the run folder and upload it."""
        local = self.run_dir / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        self.log_artifact(local, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def log_text(self, text: str, name: str) -> None:
        """Write `name` into the run folder and upload it."""
        local = self.run_dir / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        self.log_artifact(local, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED). Safe to call twice: the first status stays."""
        if self._closed:
            return
        self._closed = True
        if self.active:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as err:  # noqa: BLE001
                self._disable("closing the run", err)
        self.active = False


def make_tracker(
    is_main: bool, run_dir: str | os.PathLike, uri: str | None = None, experiment: str = "eagle-dist",
    job: str = "training",
) -> MlflowTracker | NullTracker:
    """MlflowTracker on rank 0, NullTracker on every other rank."""
    if not is_main:
        return NullTracker()
    return MlflowTracker(run_dir, uri=uri, experiment=experiment, job=job)
