"""The real trainer under real launchers (CPU, gloo): DDP via torchrun and accelerate, DeepSpeed
ZeRO-2, a simulated 2-node rendezvous, kill-and-resume, MLflow contents, an unreachable server.

Every run uses a tiny synthetic shard set and a tiny random ViT so a 2-process run takes
seconds of compute; most of the time is process start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, free_port, launch_env, run_ok

HARNESS = str(REPO / "tests" / "train_harness.py")


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *args]


def _accelerate(config: str, *args: str) -> list[str]:
    # The `accelerate` console script is equivalent; the module form needs no PATH entry.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "launch" / "accelerate" / config), "--main_process_port", str(free_port()), *args]


def _load_ranks(out: Path, n: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]


def _assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), f"{k} differs"


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shards):
    """6 uninterrupted steps, 2 processes, torchrun: the run the resumed one must equal."""
    work = tmp_path_factory.mktemp("ref")
    run_ok(_torchrun(2, HARNESS, str(work / "out"), *TINY, *shards, f"train.output_dir={work}/runs",
                   "train.max_steps=6", "train.run_name=ref"))
    return work / "out"


@pytest.mark.multiproc
@pytest.mark.slow
def test_torchrun_ddp_ranks_agree_and_mlflow_has_everything(reference_run):
    from mlflow.tracking import MlflowClient

    ranks = _load_ranks(reference_run, 2)
    _assert_same(ranks[0], ranks[1])
    info = _summary(reference_run)
    assert info["world_size"] == 2 and info["strategy"] == "ddp"
    assert info["summary"]["steps"] == 6
    run_dir = Path(info["run_dir"])
    assert (run_dir / "checkpoints" / "step-00000006" / "COMPLETE").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(info["run_id"])
    assert run.data.params["optim.lr"] == "0.0005" and run.data.params["model.n_classes"] == "4"
    for metric in ("loss", "loss_corr", "images_per_s", "step_time_s", "eval/cluster_official_mIoU",
                   "eval/cluster_strict_mIoU", "eval/linear_official_mIoU"):
        assert metric in run.data.metrics, metric
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"config.yaml", "final_heads.pt", "figures/confusion_cluster.png", "figures/samples.png"} <= artifacts


@pytest.mark.multiproc
@pytest.mark.slow
def test_accelerate_kill_and_resume_equals_uninterrupted(tmp_path, shards, reference_run):
    """Stop after the step-4 checkpoint, restart: same weights, same MLflow run, metrics go on."""
    from mlflow.tracking import MlflowClient

    common = [*TINY, *shards, f"train.output_dir={tmp_path}/runs", "train.run_name=ref"]
    run_ok(_accelerate("cpu_2proc.yaml", HARNESS, str(tmp_path / "first"), *common, "train.max_steps=4"))
    first = _summary(tmp_path / "first")
    run_ok(_accelerate("cpu_2proc.yaml", HARNESS, str(tmp_path / "second"), *common, "train.max_steps=6"))
    second = _summary(tmp_path / "second")
    assert second["summary"]["trained_steps_this_run"] == 2
    assert second["run_id"] == first["run_id"]
    resumed = _load_ranks(tmp_path / "second", 2)
    _assert_same(resumed[0], resumed[1])
    _assert_same(resumed[0], _load_ranks(reference_run, 1)[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(second['run_dir']) / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(second["run_id"], "loss")]
    assert steps == list(range(1, 7))


@pytest.mark.multiproc
@pytest.mark.slow
def test_deepspeed_zero2_two_processes(tmp_path, shards):
    out = tmp_path / "out"
    run_ok(_accelerate("deepspeed_zero2.yaml", "--num_processes", "2", HARNESS, str(out), *TINY, *shards,
                     f"train.output_dir={tmp_path}/runs", "train.max_steps=4"))  # strategy auto follows the accelerate config
    info = _summary(out)
    assert info["strategy"] == "deepspeed" and info["world_size"] == 2
    ranks = _load_ranks(out, 2)
    _assert_same(ranks[0], ranks[1])
    assert (Path(info["run_dir"]) / "checkpoints" / "step-00000004" / "COMPLETE").is_file()


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_node_rendezvous_on_localhost(tmp_path, shards):
    port = free_port()
    out = tmp_path / "out"
    args = [HARNESS, str(out), *TINY, *shards, f"train.output_dir={tmp_path}/runs", "train.max_steps=2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
             "--rdzv_id", "two-node-test", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launch_env(), cwd=REPO,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(log[-3000:] for log in logs)
    assert _summary(out)["world_size"] == 2
    ranks = _load_ranks(out, 2)
    _assert_same(ranks[0], ranks[1])


@pytest.mark.faults
@pytest.mark.slow
def test_unreachable_tracking_server_does_not_stop_training(tmp_path, shards):
    out = tmp_path / "out"
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_ok([sys.executable, HARNESS, str(out), *TINY, *shards, f"train.output_dir={tmp_path}/runs",
                   "train.max_steps=2", f"tracking.uri={dead}"])
    assert f"MLflow tracking at {dead} failed while connecting" in result.stderr
    run_dir = Path(_summary(out)["run_dir"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {1, 2} <= {row["step"] for row in lines if "loss" in row.get("metrics", row)}


@pytest.mark.multiproc
@pytest.mark.slow
def test_bare_accelerate_launch_runs_the_default_on_two_processes(tmp_path, shards):
    """`accelerate launch launch/train.py` without an accelerate config or --config: 2 processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", str(REPO / "launch" / "train.py"),
           *TINY, *shards, f"train.output_dir={tmp_path}/runs", "train.max_steps=2"]
    out = run_ok(cmd)
    assert "starting 2 processes with torchrun" in out.stdout
    assert "world size 2 (ddp, gloo, cpu)" in out.stdout
    assert "final results: 2 steps" in out.stdout
