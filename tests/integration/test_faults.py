"""Faults and bad input against the real trainer: each one gives a clear message and loses nothing.

    python -m pytest -m faults tests/integration/test_faults.py          # with the unit-level ones elsewhere:
    python -m pytest -m "slurm or faults"

Most runs call launch/train.py's main() in this process with a single-process Trainer (CPU,
tiny config): start-up is paid once and faults are injected by monkeypatching, so the package
carries no test hooks.  Two need real processes: elastic restarts under torchrun (kills via
tests/train_harness.py with EAGLE_TEST_FAULTS) and a real MLflow server that is killed mid-run.

Faults covered at the unit level elsewhere (also marked `faults`): config keys and types
(test_config), unreadable / foreign weights (test_backbone), unmarked checkpoint folders, disk
full and failed re-saves (test_checkpoint), corrupt members and truncated tars in the stream and
fewer shards than ranks x workers (test_data), unreachable MLflow (test_tracking).
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import TINY, free_port, launch_env

REPO = Path(__file__).resolve().parents[2]
DEFAULT = str(REPO / "configs" / "default.yaml")
FAULT_HARNESS = str(REPO / "tests" / "train_harness.py")  # it injects the faults of EAGLE_TEST_FAULTS

pytestmark = pytest.mark.faults


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def launch_main():
    """launch/train.py's main(), imported once (the real entry point, not a copy)."""
    spec = importlib.util.spec_from_file_location("eagle_launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(autouse=True)
def clean_process(monkeypatch):
    """The Trainer installs SIGUSR1/SIGTERM/SIGINT handlers and reads launcher variables: undo both."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "MLFLOW_TRACKING_URI", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EAGLE_NO_RELAUNCH", "1")
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def run(launch_main, shards, tmp_path, capsys):
    """run(*overrides) -> (exit code, stdout + stderr) of one in-process training run."""

    def go(*overrides: str) -> tuple[int, str]:
        code = launch_main(["--config", DEFAULT, *TINY, *shards, f"train.output_dir={tmp_path / 'runs'}",
                            "train.run_name=f", "train.eval_interval=1000", "dist.cpu_threads=1", *overrides])
        out = capsys.readouterr()
        return code, out.out + out.err

    return go


def _ckpt_dir(tmp_path: Path, run_name: str = "f") -> Path:
    return tmp_path / "runs" / run_name / "checkpoints"


def _extra(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())["extra"]


def _mlflow_status(tmp_path: Path, run_name: str = "f") -> str:
    """Status of the one MLflow run in the run folder's own sqlite store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(tmp_path / 'runs' / run_name).resolve()}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return runs[0].info.status


def _metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wrap_step(monkeypatch, at_step):
    """Call `at_step(step, out)` after every real training step computation (out: its losses)."""
    from eagle_dist.engine import trainer as trainer_mod

    original = trainer_mod.Trainer._forward

    def forward(self, batch, step):
        return at_step(step, original(self, batch, step))

    monkeypatch.setattr(trainer_mod.Trainer, "_forward", forward)


# ----------------------------------------------------------------------------- bad input


def test_mistyped_config_key_exits_2_and_names_the_key():
    done = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", DEFAULT, "optim.lrr=1e-3"],
                          capture_output=True, text=True, env=launch_env(), cwd=REPO, timeout=300)
    assert done.returncode == 2
    assert "config error" in done.stderr and "unknown config key 'optim.lrr'" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_key_in_a_yaml_file_exits_2(launch_main, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 10\n")
    assert launch_main(["--config", str(bad)]) == 2
    assert "train.max_step" in capsys.readouterr().err


def test_missing_shard_folder_is_one_clear_error(run, tmp_path):
    missing = tmp_path / "no-such-shards"
    code, out = run("dataset=cocostuff27", f"data.train_shards={missing}")
    assert code == 2
    assert f"train shard folder not found: {missing}" in out and "python -m eagle_dist.shard" in out
    assert "Traceback" not in out


def test_empty_shard_list_is_one_clear_error(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"shards": [], "classes": ["a", "b", "c", "d"],
                                                     "ignore_value": 255}))
    code, out = run("dataset=cocostuff27", f"data.train_shards={empty}")
    assert code == 2 and "lists no samples" in out and "Traceback" not in out


class _Boom:
    """A pickle that would run code on load (weights_only=False would execute it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["garbage", "not-a-state-dict", "wrong-architecture", "malicious-pickle"])
def test_bad_weights_files_are_refused_with_a_reason(run, tmp_path, kind):
    weights, marker = tmp_path / "weights.pth", tmp_path / "pwned"
    if kind == "garbage":
        weights.write_bytes(b"this is not a checkpoint" * 10)
        needle = "could not read"
    elif kind == "not-a-state-dict":
        torch.save([1, 2, 3], weights)
        needle = "does not contain a state dict"
    elif kind == "wrong-architecture":
        torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "pos_embed": torch.zeros(1, 5, 8)}, weights)
        needle = "does not fit the backbone architecture"
    else:
        torch.save({"model": _Boom(marker)}, weights)
        needle = "could not read"
    code, out = run(f"model.weights={weights}")
    assert code == 2 and needle in out and str(weights) in out
    assert not marker.exists()  # weights_only=True never ran the pickled code


def _damage_shards(src: Path, dst: Path) -> None:
    """Copy a shard folder; in every shard, make the first JPEG undecodable and cut the tar
    off in the middle of a later member."""
    shutil.copytree(src, dst)
    for tar_path in sorted(dst.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        first_jpg = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg"))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, (member, data) in enumerate(members):
                if i == first_jpg:
                    data = b"\xff\xd8 not really a jpeg" + bytes(200)
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        raw = buf.getvalue()
        tar_path.write_bytes(raw[: int(len(raw) * 0.7) + 100])  # mid-member, not on a 512 boundary


def test_corrupt_jpeg_and_truncated_tar_mid_run_are_skipped_and_counted(run, shards, tmp_path):
    train = Path(shards[0].split("=", 1)[1])
    damaged = tmp_path / "damaged"
    _damage_shards(train, damaged)
    code, out = run(f"data.train_shards={damaged}", "train.max_steps=6")
    assert code == 0, out[-4000:]
    assert "corrupt" in out and "training goes on" in out
    rows = [r for r in _metric_rows(tmp_path / "runs" / "f") if "loss" in r["metrics"]]
    assert [r["step"] for r in rows] == list(range(1, 7))
    last = rows[-1]["metrics"]
    assert last["data/corrupt_samples"] >= 1
    assert last["data/missing_samples"] + last["data/read_errors"] >= 1
    assert _extra(_ckpt_dir(tmp_path) / "step-00000006")["data_skips"]["corrupt_samples"] >= 1


def test_shards_with_nothing_usable_stop_with_one_message(run, shards, tmp_path):
    train = Path(shards[0].split("=", 1)[1])
    ruined = tmp_path / "ruined"
    shutil.copytree(train, ruined)
    for tar_path in ruined.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        with tarfile.open(tar_path, "w") as tar:
            for member, data in members:
                if member.name.endswith(".jpg"):
                    data = b"garbage" * 20
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    code, out = run(f"data.train_shards={ruined}", "train.max_steps=4")
    assert code == 2
    assert "read/decode errors in a row without one usable sample" in out and "Stopped at step 0." in out
    assert not _ckpt_dir(tmp_path).exists() or not any(_ckpt_dir(tmp_path).iterdir())


def test_a_data_error_mid_run_stops_every_rank_with_a_checkpoint(run, tmp_path, monkeypatch):
    from eagle_dist.data.prepare import TrainingStream
    from eagle_dist.data.stream import DataError

    original = TrainingStream.batches

    def failing(self, start_step):
        for i, batch in enumerate(original(self, start_step)):
            if i == 3:
                raise DataError("the shard server went away; check the mount")
            yield batch

    monkeypatch.setattr(TrainingStream, "batches", failing)
    code, out = run("train.max_steps=10")
    assert code == 2
    assert "the shard server went away; check the mount" in out
    assert f"Stopped at step 3; saved a checkpoint in {_ckpt_dir(tmp_path)}" in out
    assert _extra(_ckpt_dir(tmp_path) / "step-00000003")["reason"] == "data error"


def test_nan_and_inf_losses_are_skipped_then_stop_with_a_checkpoint(run, tmp_path, monkeypatch):
    bad = {1: float("nan"), 3: float("inf"), 4: float("nan"), 5: float("-inf")}

    def poison(step, out):
        if step in bad:
            out["loss"] = out["loss"] * 0 + bad[step]
        return out

    _wrap_step(monkeypatch, poison)
    code, out = run("train.max_steps=10", "train.max_bad_steps=3")
    assert code == 2
    assert "the loss was NaN/Inf for 3 steps in a row (at step 5)" in out and "saved a checkpoint" in out
    ckpts = _ckpt_dir(tmp_path)
    state = _extra(ckpts / "step-00000005")
    assert state["reason"] == "diverged" and state["skipped_steps"] == 4
    skipped = {r["step"]: r["metrics"]["skipped_steps"] for r in _metric_rows(tmp_path / "runs" / "f")
               if "loss" in r["metrics"]}
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 2, 5: 3}  # one lone NaN is skipped, training goes on


def test_a_run_stopped_by_an_error_is_marked_failed_in_mlflow(run, tmp_path, monkeypatch):
    # Trainer.close used to mark the MLflow run FINISHED whatever happened.
    def poison(step, out):
        out["loss"] = out["loss"] * float("nan")
        return out

    _wrap_step(monkeypatch, poison)
    code, out = run("train.max_steps=4", "train.max_bad_steps=1")
    assert code == 2 and "the loss was NaN/Inf for 1 steps in a row" in out
    assert _mlflow_status(tmp_path) == "FAILED"
    assert run("train.max_steps=2")[0] == 0  # the same run, resumed and finished
    assert _mlflow_status(tmp_path) == "FINISHED"


def test_eigensolver_failures_are_retried_in_float64_then_skipped_then_stop_with_a_checkpoint(
        run, tmp_path, monkeypatch):
    from eagle_dist.engine import trainer as trainer_mod
    from eagle_dist.method import eicue

    # Step 1: the float32 solve fails, the float64 retry works. Steps 3-5: both fail.
    fails = {1: {"eigh"}, 3: {"eigh", "eigh64"}, 4: {"eigh", "eigh64"}, 5: {"eigh", "eigh64"}}
    current = {"step": -1}
    original_eig, original_forward = eicue.smallest_eigenpairs, trainer_mod.Trainer._forward

    def eigenpairs(lap_BNN, k, solver="eigh"):
        if solver in fails.get(current["step"], ()):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge because the input "
                                           "matrix is ill-conditioned or has too many repeated eigenvalues")
        return original_eig(lap_BNN, k, solver)

    def forward(self, batch, step):
        current["step"] = step
        return original_forward(self, batch, step)

    monkeypatch.setattr(eicue, "smallest_eigenpairs", eigenpairs)
    monkeypatch.setattr(trainer_mod.Trainer, "_forward", forward)
    code, out = run("train.max_steps=10", "train.max_bad_steps=3", "eicue.solver=eigh")
    assert code == 2 and "Traceback" not in out
    assert "step 1, rank 0: the eigh eigensolver failed (linalg.eigh: The algorithm failed to converge" in out
    assert "the float64 retry succeeded" in out
    assert "step 3, rank 0: the eigensolver failed even in float64" in out
    assert ("the eigensolver did not converge, even in float64, for 3 steps in a row (at step 5): the affinity "
            "graphs are degenerate") in out
    state = _extra(_ckpt_dir(tmp_path) / "step-00000005")
    assert state["reason"] == "diverged" and state["skipped_steps"] == 3  # step 1 was trained
    assert (_ckpt_dir(tmp_path) / "step-00000002" / "COMPLETE").is_file()  # nothing earlier lost


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_resume_works(run, tmp_path, monkeypatch):
    from eagle_dist import checkpoint as checkpoint_mod

    original = checkpoint_mod.CheckpointManager._write_own_files

    def write_own_files(self, tmp, *args, **kwargs):
        if tmp.name.endswith("step-00000004"):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
        return original(self, tmp, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.CheckpointManager, "_write_own_files", write_own_files)
    code, out = run("train.max_steps=6")
    assert code == 2 and "no space left on device" in out and "Traceback" not in out
    ckpts = _ckpt_dir(tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    assert (ckpts / "step-00000002" / "COMPLETE").is_file()

    monkeypatch.setattr(checkpoint_mod.CheckpointManager, "_write_own_files", original)  # space freed
    code, out = run("train.max_steps=6")
    assert code == 0, out[-4000:]
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in out
    assert _extra(ckpts / "step-00000006")["mlflow_run_id"] == _extra(ckpts / "step-00000002")["mlflow_run_id"]


def test_unfinished_checkpoint_folders_are_ignored_with_a_note(run, tmp_path):
    from eagle_dist.checkpoint import CheckpointError, read_state

    assert run("train.max_steps=4")[0] == 0
    ckpts = _ckpt_dir(tmp_path)
    (ckpts / "step-00000004" / "COMPLETE").unlink()  # a save that died before its marker
    shutil.copytree(ckpts / "step-00000002", ckpts / ".incomplete-step-00000006")  # marker, never renamed
    with pytest.raises(CheckpointError, match="has no COMPLETE marker: it was not fully written"):
        read_state(ckpts / "step-00000004")  # asked for by name, it is refused
    code, out = run("train.max_steps=6")
    assert code == 0, out[-4000:]
    assert "ignoring unfinished checkpoint folder(s)" in out
    assert ".incomplete-step-00000006, step-00000004" in out
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in out


def _final_heads(tmp_path: Path, run_name: str = "f") -> dict:
    return torch.load(tmp_path / "runs" / run_name / "final_heads.pt", weights_only=True)


def test_damaged_checkpoint_is_moved_aside_and_the_rerun_matches_an_uninterrupted_run(run, tmp_path):
    from eagle_dist.checkpoint import CheckpointDamagedError, MODEL_FILE
    from eagle_dist.evaluation.inference import resolve_checkpoint

    assert run("train.max_steps=6", "train.run_name=clean")[0] == 0
    assert run("train.max_steps=4")[0] == 0
    ckpts = _ckpt_dir(tmp_path)
    weights = ckpts / "step-00000004" / MODEL_FILE
    raw = bytearray(weights.read_bytes())
    raw[-2] ^= 0x01  # one bit in the last tensor, as a bad copy to shared storage does
    weights.write_bytes(bytes(raw))
    before = {p.name for p in (tmp_path / "runs" / "f").rglob("*")}

    for step in (None, 4):  # evaluate / predict refuse it, naming the file and the way out
        with pytest.raises(CheckpointDamagedError, match="model.safetensors: sha256 differs") as refused:
            resolve_checkpoint(tmp_path / "runs" / "f", step=step)
        assert "pass --step N for another one (complete steps: 2)" in str(refused.value)

    code, out = run("train.max_steps=6")
    assert code == 0, out[-4000:]
    assert "Traceback" not in out
    assert f"checkpoint {ckpts / 'step-00000004'} is damaged: model.safetensors: sha256 differs" in out
    assert f"moved it aside to {ckpts / 'damaged-step-00000004'} (kept, not deleted)" in out
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in out
    after = {p.name for p in (tmp_path / "runs" / "f").rglob("*")}
    assert before <= after  # nothing written earlier is gone (step 4 was saved again)
    assert (ckpts / "damaged-step-00000004" / MODEL_FILE).read_bytes() == bytes(raw)
    clean, resumed = _final_heads(tmp_path, "clean"), _final_heads(tmp_path)
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"{path} never appeared\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def test_second_trainer_in_a_live_run_folder_is_refused_and_a_killed_holder_is_taken_over(
        run, shards, tmp_path):
    import socket

    log = tmp_path / "holder.log"
    with open(log, "w") as out:
        holder = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "train.py"), "--config", DEFAULT, *TINY, *shards,
             f"train.output_dir={tmp_path / 'runs'}", "train.run_name=f", "train.eval_interval=1000",
             "dist.cpu_threads=1", "train.max_steps=100000"],
            stdout=out, stderr=subprocess.STDOUT, env={**launch_env(), "EAGLE_NO_RELAUNCH": "1"}, cwd=REPO)
    try:
        ckpts = _ckpt_dir(tmp_path)
        _wait_for(ckpts / "step-00000002" / "COMPLETE", holder, log)
        code, out = run("train.max_steps=4")
        assert code == 2 and "Traceback" not in out
        assert (f"run folder {tmp_path / 'runs' / 'f'} is in use by another training job "
                f"(host {socket.gethostname()}, pid {holder.pid}, started ") in out
        assert holder.poll() is None  # the live job goes on untouched
        holder.kill()  # SIGKILL: no chance to remove its lock
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (tmp_path / "runs" / "f" / "LOCK").is_file()
    newest = max(int(p.name[5:]) for p in ckpts.glob("step-*") if (p / "COMPLETE").is_file())
    code, out = run(f"train.max_steps={newest + 2}")
    assert code == 0, out[-4000:]
    assert f"took over the run lock of process {holder.pid} on this host, which no longer runs" in out
    assert f"resumed from {ckpts / f'step-{newest:08d}'} at step {newest}" in out
    assert not (tmp_path / "runs" / "f" / "LOCK").exists()  # released at the end


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_stop_signal_saves_and_exits_0_and_only_sigusr1_requeues(run, tmp_path, monkeypatch, sig):
    calls = tmp_path / "scontrol-calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                    'echo "slurm_requeue error: Invalid job id specified" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    def send(step, out):
        if step == 2:
            os.kill(os.getpid(), getattr(signal, sig))  # the handler only sets a flag
        return out

    _wrap_step(monkeypatch, send)
    code, out = run("train.max_steps=20")
    assert code == 0, out[-4000:]
    ckpts = _ckpt_dir(tmp_path, "f-4242")  # the run folder carries the job id
    assert _extra(ckpts / "step-00000003")["reason"] == "preemption"
    assert "final results" not in out
    if sig == "SIGUSR1":
        assert calls.read_text().split() == ["requeue", "4242"]
        assert "could not requeue Slurm job 4242 (slurm_requeue error: Invalid job id specified (exit status 1))" in out
    else:
        assert not calls.exists()
        assert "stop requested by SIGTERM" in out and "exiting cleanly" in out
    assert _mlflow_status(tmp_path, "f-4242") == "KILLED"  # not FINISHED: the run resumes later


def _sigint_env(**extra_env: str) -> dict[str, str]:
    env = {**launch_env(), **extra_env}
    env.pop("EAGLE_NO_RELAUNCH", None)
    return env


def _sigint_run(cmd: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    """Start `cmd` in its own process group, as a terminal would run it, output to `log`."""
    env = _sigint_env(**extra_env)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)


@pytest.mark.multiproc
@pytest.mark.slow
def test_ctrl_c_to_a_2_process_torchrun_saves_exits_0_and_the_rerun_resumes(tmp_path, shards):
    # No --config: launch/train.py restarts itself under torchrun with 2 processes (`make train`).
    base = [sys.executable, str(REPO / "launch" / "train.py"), *TINY, *shards, f"train.output_dir={tmp_path / 'runs'}",
            "train.run_name=c", "train.eval_interval=1000", "dist.cpu_threads=1"]
    ckpts = _ckpt_dir(tmp_path, "c")
    log = tmp_path / "first.log"
    proc = _sigint_run([*base, "train.max_steps=100000"], log)
    try:
        _wait_for(ckpts / "step-00000002" / "COMPLETE", proc, log)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher, torchrun and both workers
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    step = assert_one_clean_stop(code, out, "Ctrl-C (SIGINT)", ckpts, reason="interrupted")
    assert step >= 2
    assert not (tmp_path / "runs" / "c" / "LOCK").exists()

    assert_resumes_at(base, step, ckpts)


@pytest.mark.multiproc
@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_without_a_half_checkpoint_under_a_final_name(tmp_path, shards):
    started = tmp_path / "interrupt-save-started"
    out = tmp_path / "out"
    # A plain torchrun, as users type it: it forwards a Ctrl-C to its workers as SIGINT, and a
    # second one (while it waits for them) as SIGTERM.
    proc = _sigint_run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", FAULT_HARNESS,
         str(out), *TINY, *shards, f"train.output_dir={tmp_path / 'runs'}", "train.run_name=d",
         "train.eval_interval=1000", "dist.cpu_threads=1", "train.max_steps=100000"],
        tmp_path / "run.log", EAGLE_TEST_SLOW_INTERRUPT_SAVE=str(started))
    ckpts = _ckpt_dir(tmp_path, "d")
    try:
        _wait_for(ckpts / "step-00000002" / "COMPLETE", proc, tmp_path / "run.log")
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(started, proc, tmp_path / "run.log", timeout_s=120)
        time.sleep(1.5)  # a human's second press
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)  # "at once": well before the slowed save could finish
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = (tmp_path / "run.log").read_text()
    assert code != 0
    assert "eagle-dist: second Ctrl-C: stopped at once at step" in text, text[-5000:]
    final = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert all((ckpts / name / "COMPLETE").is_file() for name in final)  # complete or absent
    from eagle_dist.checkpoint import verify_checkpoint

    assert all(verify_checkpoint(ckpts / name) for name in final)
    assert not (tmp_path / "runs" / "d" / "LOCK").exists()


def _signal_the_group(cmd: list[str], log: Path, ready: Path, sig: int, **extra_env: str) -> tuple[int, str]:
    """Start `cmd` in a session of its own, send `sig` to its whole process group once `ready`
    exists, and return (exit code, log) once it has exited."""
    proc = _sigint_run(cmd, log, **extra_env)
    try:
        _wait_for(ready, proc, log)
        os.killpg(proc.pid, sig)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, log.read_text()


def assert_resumes_at(base: list[str], step: int, ckpts: Path) -> None:
    """The same command, one step longer, resumes from the checkpoint of the stop step."""
    done = subprocess.run([*base, f"train.max_steps={step + 1}"], capture_output=True, text=True,
                          env=_sigint_env(), cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {ckpts / f'step-{step:08d}'} at step {step}" in done.stdout


def assert_one_clean_stop(code: int, out: str, what: str, ckpts: Path, reason: str = "preemption") -> int:
    """Exit 0, no traceback, one stop line; the checkpoint of the stop step verifies.  Its step."""
    from eagle_dist.checkpoint import verify_checkpoint

    assert code == 0, out[-5000:]
    for bad in ("Traceback", "exited unexpectedly", "SignalException"):
        assert bad not in out, out[-5000:]
    saved = [line for line in out.splitlines() if line.startswith("stop requested by")]
    assert len(saved) == 1 and saved[0].startswith(f"stop requested by {what}: saved step "), out[-5000:]
    assert "start the same command again to resume" in saved[0]
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert verify_checkpoint(ckpts / f"step-{step:08d}") and _extra(ckpts / f"step-{step:08d}")["reason"] == reason
    return step


# The signals Slurm (scancel, preemption, the time limit) and `kill -- -PGID` send reach every process
# of the group; with two loader workers per rank these used to die of it and take the ranks down.
SIGNAL_RUN = [*TINY, "data.num_workers=2", "train.ckpt_interval=2", "train.max_steps=100000", "dist.cpu_threads=1"]


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigterm_to_the_process_group_during_training_saves_and_the_rerun_resumes(tmp_path, shards):
    # No --config: launch/train.py starts torchrun with 2 processes itself (`make train`).
    base = [sys.executable, str(REPO / "launch" / "train.py"), *SIGNAL_RUN, *shards,
            f"train.output_dir={tmp_path / 'runs'}", "train.run_name=t", "train.eval_interval=1000"]
    ckpts = _ckpt_dir(tmp_path, "t")
    code, out = _signal_the_group(base, tmp_path / "first.log", ckpts / "step-00000002" / "COMPLETE", signal.SIGTERM)
    step = assert_one_clean_stop(code, out, "SIGTERM", ckpts)
    assert not (tmp_path / "runs" / "t" / "LOCK").exists()

    assert_resumes_at(base, step, ckpts)


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigusr1_to_the_process_group_during_an_evaluation_ends_it_saves_and_the_rerun_resumes(tmp_path, shards):
    # launch/torchrun.py: the launcher that passes stop signals on (Slurm's, here without Slurm).
    started = tmp_path / "evaluation-started"
    base = [sys.executable, str(REPO / "launch" / "torchrun.py"), "--standalone", "--nproc_per_node", "2",
            FAULT_HARNESS, str(tmp_path / "out"), *SIGNAL_RUN, *shards, f"train.output_dir={tmp_path / 'runs'}",
            "train.run_name=e", "train.eval_interval=3"]
    ckpts = _ckpt_dir(tmp_path, "e")
    code, out = _signal_the_group(base, tmp_path / "first.log", started, signal.SIGUSR1,
                                  EAGLE_TEST_SLOW_EVAL=str(started))
    step = assert_one_clean_stop(code, out, "SIGUSR1 (Slurm's pre-timeout signal)", ckpts)
    assert step == 3 and "evaluation at step 3" not in out  # ended after its first batch, no table

    assert_resumes_at(base, step, ckpts)


def test_requeue_without_scontrol_is_reported_not_raised(tmp_path):
    from eagle_dist.distributed import requeue_slurm_job

    problem = requeue_slurm_job("17", scontrol=str(tmp_path / "no-scontrol"))
    assert problem is not None and "FileNotFoundError" in problem


# ----------------------------------------------------------------------------- MLflow server


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend); yields (uri, db uri, process)."""
    port = free_port()
    db = tmp_path / "server.db"
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--default-artifact-root", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=launch_env(), cwd=tmp_path,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("mlflow server did not come up:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
        yield uri, f"sqlite:///{db}", proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn/job-runner children
        proc.wait(timeout=30)
        log.close()


def test_mlflow_server_going_away_mid_run_loses_no_metric(run, tmp_path, monkeypatch, mlflow_server):
    from mlflow.tracking import MlflowClient

    from eagle_dist.engine.tracking import TrackingWarning

    uri, db_uri, server = mlflow_server

    def kill_server(step, out):
        if step == 3 and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        return out

    _wrap_step(monkeypatch, kill_server)
    with pytest.warns(TrackingWarning) as warned:
        code, out = run("train.max_steps=6", f"tracking.uri={uri}")
    assert code == 0, out[-4000:]
    messages = [str(w.message) for w in warned if issubclass(w.category, TrackingWarning)]
    assert len(messages) == 1 and f"MLflow tracking at {uri} failed while" in messages[0]
    assert "Training continues" in messages[0]
    run_dir = tmp_path / "runs" / "f"
    assert [r["step"] for r in _metric_rows(run_dir) if "loss" in r["metrics"]] == list(range(1, 7))
    run_id = _extra(_ckpt_dir(tmp_path) / "step-00000006")["mlflow_run_id"]
    logged = [m.step for m in MlflowClient(tracking_uri=db_uri).get_metric_history(run_id, "loss")]
    assert logged[:3] == [1, 2, 3] and logged == sorted(set(logged)) and len(logged) < 6


# ----------------------------------------------------------------------------- elastic restarts


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """A training set of ONE shard: fewer shards than 2 ranks x 1 worker."""
    from eagle_dist.cli import shard

    out = tmp_path_factory.mktemp("one-shard") / "train"
    shard.main(["--source", "synthetic", "--split", "train", "--out", str(out), "--synthetic-count", "4",
                "--synthetic-size", "48x64", "--synthetic-classes", "4", "--samples-per-shard", "20", "--quiet",
                "--workers", "1"])
    assert len(list(out.glob("*.tar"))) == 1
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_torchrun_restarts_after_kill_9_and_never_uses_a_half_written_checkpoint(tmp_path, shards, one_shard):
    """Attempt 0: rank 0 is SIGKILLed while committing checkpoint 4 (all files and the marker
    written, not renamed).  Attempt 1: a random rank is SIGKILLed at a random step.  Attempt 2
    finishes.  Each attempt resumes from the newest COMPLETE checkpoint, with the same MLflow run."""
    rng = random.Random()
    kill_step, kill_rank = rng.choice([3, 4, 5]), rng.choice([0, 1])
    expected_resume = max(2, kill_step // 2 * 2)  # checkpoints every 2 steps; step 4 re-saved in attempt 1
    out = tmp_path / "out"
    env = {**launch_env(), "EAGLE_TEST_FAULTS": f"save:4:0;step:{kill_step}:{kill_rank}",
           # torch's shared rendezvous store keeps the last attempt's gloo addresses (see train.sbatch)
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "2", "--nnodes", "1",
           "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
           FAULT_HARNESS, str(out), *TINY, shards[1], f"data.train_shards={one_shard}",
           f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=6", "train.eval_interval=1000",
           "dist.cpu_threads=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    context = f"kill at step {kill_step} on rank {kill_rank}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.returncode == 0, context
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert [(a["restart"], a["start_step"]) for a in attempts] == [(0, 0), (1, 2), (2, expected_resume)], context
    # The checkpoint being committed when rank 0 died is left as a temporary folder and ignored.
    assert attempts[1]["checkpoint_entries"] == [".incomplete-step-00000004", "step-00000002"], context
    assert "ignoring unfinished checkpoint folder(s)" in done.stdout
    assert len({a["run_id"] for a in attempts}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["steps"] == 6 and summary["run_id"] == attempts[0]["run_id"]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # One shard for 2 ranks x 1 worker: a warning, and both ranks still ran the same steps.
    assert "1 shards for 2 ranks x 1 workers" in done.stderr


# ----------------------------------------------------------------------------- security


def _python_files() -> list[Path]:
    return sorted((REPO / "eagle_dist").rglob("*.py")) + sorted((REPO / "launch").rglob("*.py"))


def test_every_torch_load_uses_weights_only_true():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if (owner, name) == ("torch", "load"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} ({owner}.{name})")
    assert not offenders, "loads that can execute pickled code: " + ", ".join(offenders)


def test_reading_shards_never_writes_outside_the_work_folders(tmp_path, monkeypatch):
    """A shard whose member names try to climb out (../, absolute paths) is read in memory only."""
    from eagle_dist.data import stream as data

    def png(mode: str, color) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.new(mode, (8, 8), color).save(buf, format="PNG")
        return buf.getvalue()

    folder = tmp_path / "shards"
    folder.mkdir()
    escape = tmp_path / "escaped"
    with tarfile.open(folder / "evil-000000.tar", "w") as tar:
        for key in ("../../escaped/a", f"{escape}/b", "ok/c"):
            for suffix, payload in ((".img.png", png("RGB", (1, 2, 3))), (".label.png", png("L", 1))):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (folder / "manifest.json").write_text(json.dumps({
        "shards": [{"name": "evil-000000.tar", "samples": 3}], "classes": ["a", "b"], "ignore_value": 255}))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before = sorted(p for p in tmp_path.rglob("*"))
    loader = data.build_val_loader(folder, batch_size=2, rank=0, world_size=1, num_workers=0, resolution=8)
    samples = sum(len(batch["key"]) for batch in loader)
    train = data.build_train_loader(folder, batch_size=2, rank=0, world_size=1, num_workers=0, seed=0,
                                    resolution=8, shuffle_buffer=1, steps_per_epoch=2)
    assert sum(len(batch["key"]) for batch in train) == 4
    assert samples == 3
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not escape.exists() and not (tmp_path.parent / "escaped").exists()


def test_no_secrets_in_logs_config_or_checkpoints(run, tmp_path, recwarn):
    secret_uri = f"http://alice:s3cr3t-pw@127.0.0.1:{free_port()}/?token=t0k3n-value"
    code, out = run("train.max_steps=2", f"tracking.uri={secret_uri}")
    assert code == 0, out[-4000:]
    run_dir = tmp_path / "runs" / "f"
    texts = [out, *(str(w.message) for w in recwarn)]
    texts += [p.read_text(errors="replace") for p in run_dir.rglob("*")
              if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl")]
    assert any("***@127.0.0.1" in t for t in texts)  # the masked form is what gets written
    for text in texts:
        assert "s3cr3t-pw" not in text and "t0k3n-value" not in text
