"""eagle_dist.engine.tracking: MLflow runs read back with MlflowClient, resume, unreachable servers.

    .venv/bin/python -m pytest -q tests/unit/test_tracking.py
"""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
from mlflow import MlflowClient

import helpers
import toy_train
from eagle_dist.engine import tracking
from eagle_dist.engine.tracking import MlflowTracker, NullTracker, TrackingWarning, make_tracker


@pytest.fixture(autouse=True)
def no_outside_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def closed_port_uri(credentials: str = "") -> str:
    return f"http://{credentials}127.0.0.1:{helpers.free_port()}"  # nothing listens there


def read_jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / tracking.METRICS_FILE).read_text().splitlines()]


@pytest.mark.faults
def test_mask_uri_hides_credentials():
    masked = tracking.mask_uri("https://alice:s3cret@mlflow.example.org:5000/api?token=abc&x=1")
    assert masked == "https://***@mlflow.example.org:5000/api?token=***&x=1"
    assert tracking.mask_uri("sqlite:////tmp/run/mlflow.db") == "sqlite:////tmp/run/mlflow.db"


def test_flatten_params():
    assert tracking.flatten_params({"optim": {"lr": 0.001, "groups": [1, 2]}, "seed": 0}) == {
        "optim.lr": "0.001", "optim.groups": "[1, 2]", "seed": "0"}


def test_sqlite_run_has_params_metrics_and_artifacts(tmp_path):
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(run_dir)
    assert tracker.uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    tracker.start("demo", {"optim": {"lr": 0.01}, "train": {"max_steps": 3}})
    tracker.log_metrics({"loss": 1.5, "images_per_s": 10.0, "note": "not a number"}, step=1)
    tracker.log_metrics({"loss": 1.0, "eval/miou": float("nan")}, step=2)
    (run_dir / "config.yaml").write_text("optim:\n  lr: 0.01\n")
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_dict({"confusion": [[1, 0], [0, 1]]}, "eval/confusion.json")
    tracker.log_text("hello", "notes.txt")
    tracker.close()

    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert run.data.params == {"optim.lr": "0.01", "train.max_steps": "3"}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(1, 1.5), (2, 1.0)]
    assert "note" not in run.data.metrics and "eval/miou" not in run.data.metrics  # NaN stays local
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "notes.txt", "eval"} <= names
    assert [a.path for a in client.list_artifacts(tracker.run_id, "eval")] == ["eval/confusion.json"]
    assert (run_dir / "mlartifacts").is_dir()  # artifacts live in the run folder, not ./mlruns

    lines = read_jsonl(run_dir)
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[0]["metrics"] == {"loss": 1.5, "images_per_s": 10.0}
    assert lines[1]["metrics"]["loss"] == 1.0


def test_resume_continues_the_same_run(tmp_path):
    first = MlflowTracker(tmp_path)
    first.start("demo", {"lr": 0.01})
    first.log_metrics({"loss": 2.0}, step=1)
    first.close(status="KILLED")

    again = MlflowTracker(tmp_path)
    with pytest.warns(TrackingWarning, match="keeps its original values for changed params: lr"):
        again.start("demo", {"lr": 0.02, "new_key": 1}, run_id=first.run_id)
    again.log_metrics({"loss": 1.0}, step=2)
    again.close()

    client = MlflowClient(tracking_uri=again.uri)
    assert again.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01", "new_key": "1"}
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_evaluation_logs_a_nested_run_through_the_tracker(tmp_path):
    from eagle_dist.cli.evaluate import log_to_mlflow

    training = MlflowTracker(tmp_path / "run")
    training.start("train", {"lr": 0.01})
    training.close()
    out = tmp_path / "run" / "eval" / "step-00000004"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    report = {
        "checkpoint": {"step": 4, "path": "runs/x/checkpoints/step-00000004", "mlflow_parent_run_id": training.run_id},
        "protocol": {"flip": True}, "shards": "shards/val",
        "metrics": {"cluster_official": {"mIoU": 50.0, "accuracy": None}},
        "pixels": {"dropped_official_cluster": 3, "labelled": 10},
        "per_class_iou": {"cluster_official": {"sky": 40.0, "a/b (c)": 60.0}},
    }
    run_id = log_to_mlflow(training.uri, report, [out / "metrics.json"], "eagle-dist")

    client = MlflowClient(tracking_uri=training.uri)
    child = client.get_run(run_id)
    assert child.data.tags["mlflow.parentRunId"] == training.run_id
    assert child.data.tags["eagle_dist.kind"] == "evaluation" and child.info.run_name == "eval-step-00000004"
    assert child.info.experiment_id == client.get_run(training.run_id).info.experiment_id
    assert child.data.metrics == {"eval/cluster_official_mIoU": 50.0, "eval/official_dropped_pixels": 3.0,
                                  "eval/labelled_pixels": 10.0, "iou/cluster_official/000": 40.0,
                                  "iou/cluster_official/001": 60.0}
    assert child.data.params["protocol.flip"] == "True" and child.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]

    with pytest.warns(TrackingWarning, match="Evaluation continues") as warned:
        assert log_to_mlflow(closed_port_uri(), report, [out / "metrics.json"], "eagle-dist") is None
    assert len([w for w in warned if issubclass(w.category, TrackingWarning)]) == 1


@pytest.mark.faults
def test_unknown_run_id_starts_a_new_run_with_a_warning(tmp_path):
    tracker = MlflowTracker(tmp_path)
    with pytest.warns(TrackingWarning, match="starting a new run"):
        tracker.start("demo", {}, run_id="0123456789abcdef0123456789abcdef")
    assert tracker.active and tracker.run_id != "0123456789abcdef0123456789abcdef"
    tracker.close()


@pytest.mark.faults
def test_unreachable_server_warns_once_and_keeps_metrics_locally(tmp_path, monkeypatch):
    for key in tracking.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    uri = closed_port_uri("bob:hunter2@")
    tracker = MlflowTracker(tmp_path, uri=uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.start("demo", {"lr": 1}, run_id="keep-me")
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.log_artifact(tmp_path / "missing.txt")
        tracker.close()
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "***@127.0.0.1" in message and "hunter2" not in message and "bob" not in message
    assert "metrics.jsonl" in message and "unreachable" in message
    assert not tracker.active and tracker.run_id == "keep-me"  # checkpoints keep the id for later
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3]
    assert tracking.os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"  # set before any request


@pytest.mark.faults
def test_server_failing_mid_run_warns_once(tmp_path, monkeypatch):
    tracker = MlflowTracker(tmp_path)
    tracker.start("demo", {})
    tracker.log_metrics({"loss": 3.0}, step=1)

    def gone(*_args, **_kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(tracker._client, "log_batch", gone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (2, 3, 4):
            tracker.log_metrics({"loss": 3.0 / step}, step=step)
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert "logging metrics at step 2" in str(caught[0].message)
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4]
    tracker.close()


def test_null_tracker_mirrors_the_api_and_writes_nothing(tmp_path):
    public = {n for n, f in inspect.getmembers(MlflowTracker, inspect.isfunction) if not n.startswith("_")}
    assert public <= {n for n, _ in inspect.getmembers(NullTracker, inspect.isfunction)}
    for name in public:
        real = inspect.signature(getattr(MlflowTracker, name)).parameters
        null = inspect.signature(getattr(NullTracker, name)).parameters
        assert list(real) == list(null), name
    null_tracker = make_tracker(False, tmp_path / "rank1")
    assert isinstance(null_tracker, NullTracker) and null_tracker.run_id is None
    null_tracker.start("x", {"a": 1})
    null_tracker.log_metrics({"loss": 1.0}, step=1)
    null_tracker.close()
    assert not (tmp_path / "rank1").exists()
    assert isinstance(make_tracker(True, tmp_path / "rank0"), MlflowTracker)


@pytest.mark.faults
@pytest.mark.multiproc
def test_training_goes_on_when_the_server_is_unreachable(tmp_path):
    proc = toy_train.run_launch(toy_train.torchrun_cmd(
        "--out", str(tmp_path), "--steps", "4", "--tracking", "--tracking-uri", closed_port_uri()))
    assert proc.returncode == 0, proc.stderr[-5000:]
    r = toy_train.result(tmp_path)
    assert r["final_step"] == 4 and r["params_identical"]
    assert proc.stderr.count("TrackingWarning") == 1  # one warning, from rank 0 only
    assert [x["step"] for x in read_jsonl(tmp_path)] == [1, 2, 3, 4]
    assert not (tmp_path / "mlflow.db").exists()


def test_subprocess_helpers_strip_launcher_variables(monkeypatch):
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    env = helpers.launch_env(EXTRA="1")
    assert "RANK" not in env and "ACCELERATE_USE_CPU" not in env and env["EXTRA"] == "1"
