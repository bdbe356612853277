"""`eagle-dist sweep` here, one run after the other: 2 arms x 2 seeds of the tiny config, stopped
by SIGTERM to its process group during the second run and launched again, with one run that fails.

    .venv/bin/python -m pytest tests/integration/test_sweep.py -q

The Slurm job-array path is tested at the end of tests/distributed/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, launch_env

DEFAULT = str(REPO / "configs" / "default.yaml")
ARMS = ["--arm", "eigh:eicue.solver=eigh", "--arm", "krylov:eicue.solver=krylov,eicue.sign_rule=per_vector"]
RUNS = ["eigh-seed0", "krylov-seed0", "eigh-seed1", "krylov-seed1"]  # seed-major


def sweep_cmd(out: Path, shards: list[str]) -> list[str]:
    return [sys.executable, "-m", "eagle_dist.sweep", "--out", str(out), "--config", DEFAULT, "--seeds", "0-1", *ARMS,
            *TINY, *shards, "train.max_steps=6", "train.keep_last=5", "dist.cpu_threads=1"]


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()


@pytest.fixture(scope="module")
def relaunched(shards, tmp_path_factory):
    """SIGTERM to the sweep's whole process group once the second run saved its first checkpoint
    (the run saves where it stopped, the sweep ends), then launch it again; krylov-seed1 fails
    (its checkpoints path is a file)."""
    out = tmp_path_factory.mktemp("sweep") / "solver"
    runs = out / "runs"
    (runs / "krylov-seed1").mkdir(parents=True)
    (runs / "krylov-seed1" / "checkpoints").write_text("not a folder")
    env = launch_env()
    first = subprocess.Popen(sweep_cmd(out, shards), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not complete(runs / "krylov-seed0", 2) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGTERM)  # as `kill -- -PGID` or a scheduler would: every process
    killed_out = first.communicate(timeout=300)[0]
    assert first.returncode == 130, killed_out[-4000:]
    assert "[2/4] krylov-seed0: stopped by SIGTERM at step" in killed_out and "sweep interrupted" in killed_out
    assert "[3/4]" not in killed_out  # no run starts after a stop
    assert complete(runs / "eigh-seed0", 6), killed_out[-4000:]
    assert not complete(runs / "krylov-seed0", 6), "the second run finished before the kill:\n" + killed_out[-4000:]
    saved = max(int(p.parent.name.split("-")[1]) for p in (runs / "krylov-seed0" / "checkpoints").glob("step-*/COMPLETE"))
    kept_metrics = (runs / "eigh-seed0" / "metrics.jsonl").read_text()
    second = subprocess.run(sweep_cmd(out, shards), cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    return out, saved, kept_metrics, second


def test_relaunch_keeps_finished_resumes_interrupted_and_reports_the_failure(relaunched):
    out, saved, kept_metrics, second = relaunched
    text = second.stdout + second.stderr
    assert second.returncode == 1, text[-6000:]  # one run failed, the others finished
    assert "[1/4] eigh-seed0: finished earlier (step 6), kept" in text
    assert f"[2/4] krylov-seed0: resuming from step {saved}" in text
    assert "[3/4] eigh-seed1: starting" in text and "[3/4] eigh-seed1: finished" in text
    assert "[4/4] krylov-seed1: FAILED (exit status 1" in text and "the other runs go on" in text
    runs = out / "runs"
    assert (runs / "eigh-seed0" / "metrics.jsonl").read_text() == kept_metrics  # not trained again
    assert (out / "logs" / "eigh-seed0.log").read_text().count("=== eagle-dist sweep:") == 1
    log1 = (out / "logs" / "krylov-seed0.log").read_text()
    assert log1.count("=== eagle-dist sweep:") == 2
    assert f"resumed from {runs / 'krylov-seed0' / 'checkpoints' / f'step-{saved:08d}'} at step {saved}" in log1
    assert all(complete(runs / name, 6) for name in RUNS[:3])

    report = json.loads((out / "report.json").read_text())
    states = {r["run"]: r["state"] for r in report["runs"]}
    assert states == {"eigh-seed0": "finished", "eigh-seed1": "finished", "krylov-seed0": "finished",
                      "krylov-seed1": "started"}
    failed = next(r for r in report["runs"] if r["run"] == "krylov-seed1")
    assert failed["last_exit"] == 1 and failed["log"].endswith("krylov-seed1.log")
    eigh = report["arms"]["eigh"]["metrics"]["cluster_official_mIoU"]
    values = [json.loads(line)["metrics"]["eval/cluster_official_mIoU"]
              for name in ("eigh-seed0", "eigh-seed1")
              for line in (runs / name / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["step"] == 6 and "eval/cluster_official_mIoU" in json.loads(line)["metrics"]]
    assert eigh["final"]["n"] == 2 and eigh["final"]["mean"] == pytest.approx(sum(values[-2:]) / 2)
    assert eigh["best"]["mean"] >= eigh["final"]["mean"]
    assert report["arms"]["krylov"]["metrics"]["cluster_official_mIoU"]["final"]["n"] == 1
    pair = report["pairs"][0]
    assert (pair["a"], pair["b"]) == ("eigh", "krylov") and pair["final"]["verdict"].startswith("no interval")
    assert set(report["metrics"]) == {f"{p}_{q}_{s}" for p in ("cluster", "linear") for q in ("official", "strict")
                                      for s in ("mIoU", "acc")}
    md = (out / "report.md").read_text()
    assert "| krylov-seed1 | started | - | last attempt exit status 1" in md and "OPTIMISTIC" in md
    assert (out / "report.png").stat().st_size > 10_000

    from mlflow import MlflowClient

    spec = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(spec["tracking_uri"])
    parent = client.get_run(spec["parent_run_id"])
    assert parent.info.status == "FAILED"  # a run failed: the sweep did not finish
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"report.json", "report.md", "report.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(RUNS[:3])  # the resumed run kept its MLflow run


def test_arguments_that_do_not_fit_are_refused(relaunched, tmp_path):
    from eagle_dist.cli import sweep

    out = relaunched[0]
    code = subprocess.run([sys.executable, "-m", "eagle_dist.sweep", "--out", str(out), "--seeds", "0-2"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, check=False)
    assert code.returncode == 2 and "other seeds" in code.stderr and "--out" in code.stderr
    assert sweep.parse_seeds("0-2,7") == [0, 1, 2, 7]
    assert sweep.parse_arms(["a:x.y=1,z.w=a,b", "a:q.r=2"]) == [{"name": "a", "overrides": ["x.y=1", "z.w=a,b", "q.r=2"]}]
    for bad in (["--seeds", "3-1"], ["--seeds", "0", "--arm", "noequals"], ["--seeds", "0", "eicue.solver=lapack"]):
        assert sweep.main(["--out", str(tmp_path / "new"), *bad]) == 2
    assert not (tmp_path / "new").exists()  # nothing written for a refused sweep
