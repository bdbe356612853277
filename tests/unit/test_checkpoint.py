"""eagle_dist.checkpoint: atomic folders, markers, pruning, disk-full safety, exact resume.

    .venv/bin/python -m pytest -q tests/unit/test_checkpoint.py
    .venv/bin/python -m pytest -q tests/unit/test_checkpoint.py -m "not multiproc"   # seconds
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch

import helpers
import toy_train
from eagle_dist import checkpoint as ck
from eagle_dist.checkpoint import CheckpointError, CheckpointManager, CheckpointSaveError
from eagle_dist.cli.checkpoint import main as checkpoint_cli
from helpers import launch_env

# --------------------------------------------------------------------------- single process


@pytest.fixture(scope="module")
def d(solo_dist):
    return solo_dist


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(
        [{"name": "first", "params": model[0].parameters(), "lr": 1e-2},
         {"name": "last", "params": model[2].parameters(), "lr": 1e-3}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def draw_randoms():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_roundtrip_restores_everything(tmp_path, d):
    model, optimizer, scheduler = make_training()
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=3, dist=d)
    extra = {"step": 3, "mlflow_run_id": "abc", "config": {"optim": {"lr": 0.01}}, "counters": [1, 2]}
    path = mgr.save(3, model, optimizer, extra, scheduler=scheduler)
    assert path.name == "step-00000003" and ck.is_complete(path)
    after_save = draw_randoms()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()

    other, other_opt, other_sched = make_training(seed=1)  # different weights, moments, lr, RNG
    got = mgr.load(path, other, other_opt, scheduler=other_sched)

    assert got == extra
    assert all(torch.equal(weights[k], v) for k, v in other.state_dict().items())
    new_state = other_opt.state_dict()
    for pid, st in opt_state["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(new_state["state"][pid][key]))
    assert [g["lr"] for g in other_opt.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert other_sched.last_epoch == scheduler.last_epoch == 3
    assert draw_randoms() == after_save  # torch, numpy and python streams continue exactly


def test_every_file_loads_with_weights_only(tmp_path, d):
    model, optimizer, scheduler = make_training()
    path = CheckpointManager(tmp_path, 2, d).save(1, model, optimizer, {"step": 1}, scheduler=scheduler)
    pt_files = sorted(path.rglob("*.pt"))
    assert {p.name for p in pt_files} == {"optimizer.pt", "scheduler.pt", "rank-00000.pt"}
    for file in pt_files:
        torch.load(file, weights_only=True)
    assert set(safetensors.torch.load_file(path / ck.MODEL_FILE)) == set(model.state_dict())
    json.loads((path / ck.STATE_FILE).read_text())


@pytest.mark.faults
@pytest.mark.parametrize("generator", ["MT19937", "PCG64"])
def test_numpy_rng_survives_a_checkpoint_with_any_global_bit_generator(tmp_path, generator):
    # np.random.get_state() returns a dict, not a 5-tuple, once np.random.set_bit_generator
    # chose another generator; capture_rng unpacked it as a tuple and every save failed.
    original = np.random.get_bit_generator()
    try:
        np.random.set_bit_generator(getattr(np.random, generator)(7))
        np.random.standard_normal()  # leave a cached gaussian in the state too
        torch.save(ck.capture_rng(), tmp_path / "rng.pt")
        expected = np.random.random(5)
        np.random.random(3)  # move on, so the restore has something to undo
        ck.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
        assert np.random.get_bit_generator().state["bit_generator"] == generator
        np.testing.assert_array_equal(np.random.random(5), expected)
    finally:
        np.random.set_bit_generator(original)


def test_folders_without_marker_are_ignored(tmp_path, d):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=5, dist=d)
    good = mgr.save(2, model, optimizer, {"step": 2})
    half = tmp_path / "step-00000009"  # e.g. copied by hand, or written by a killed older writer
    half.mkdir()
    (half / ck.STATE_FILE).write_text("{}")
    (tmp_path / ".incomplete-step-00000010").mkdir()
    assert ck.latest_complete(tmp_path) == good and mgr.latest() == good
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        mgr.load(half, model, optimizer)
    assert checkpoint_cli([str(tmp_path)]) == 0


def test_keep_last_counts_only_complete_checkpoints(tmp_path, d):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=2, dist=d)
    (tmp_path / "step-00000000").mkdir(parents=True)  # incomplete: neither counted nor deleted
    for step in (1, 2, 3, 4):
        mgr.save(step, model, optimizer, {"step": step})
    assert [p.name for p in mgr.all()] == ["step-00000003", "step-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000000", "step-00000003", "step-00000004"]


@pytest.mark.faults
def test_stale_temp_folders_are_cleaned_and_a_step_can_be_saved_again(tmp_path, d):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=3, dist=d)
    stale = tmp_path / ".incomplete-step-00000005"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("half written")
    mgr.save(6, model, optimizer, {"step": 6, "v": 1})
    assert not stale.exists()
    mgr.save(6, model, optimizer, {"step": 6, "v": 2})  # re-save after resuming at step 6
    assert mgr.load(mgr.latest(), model, optimizer)["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000006"]


def _damage(path, kind: str) -> str:
    """Damage one file of checkpoint `path` the way copies and disks do; the expected reason."""
    weights = path / ck.MODEL_FILE
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
        return "model.safetensors: 100 bytes, the save recorded"
    if kind == "altered":
        raw = bytearray(weights.read_bytes())
        raw[-3] ^= 0x40  # inside the last tensor: safetensors would load it silently
        weights.write_bytes(bytes(raw))
        return "model.safetensors: sha256 differs from the one recorded at save time"
    if kind == "missing":
        (path / ck.RNG_DIR / "rank-00000.pt").unlink()
        return "rng/rank-00000.pt: missing"
    (path / ck.MARKER).write_text('{"step": 4, "files": {"model.safe')  # cut off mid-copy
    return "COMPLETE: unreadable"


@pytest.mark.faults
@pytest.mark.parametrize("kind", ["truncated", "altered", "missing", "marker"])
def test_damaged_checkpoint_is_refused_moved_aside_and_resume_falls_back(tmp_path, d, kind, capsys):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=5, dist=d)
    older = mgr.save(2, model, optimizer, {"step": 2})
    newest = mgr.save(4, model, optimizer, {"step": 4})
    recorded = json.loads((newest / ck.MARKER).read_text())["files"]
    assert set(recorded) == {ck.STATE_FILE, ck.MODEL_FILE, ck.OPTIMIZER_FILE, "rng/rank-00000.pt"}
    assert recorded[ck.MODEL_FILE]["sha256"] == ck.file_digest(newest / ck.MODEL_FILE)
    reason = _damage(newest, kind)

    with pytest.raises(ck.CheckpointDamagedError, match=f"checkpoint {newest} is damaged: {reason}"):
        mgr.load(newest, model, optimizer)  # asked for by name: refused, left where it is
    assert checkpoint_cli(["verify", str(tmp_path)]) == 1
    listing = capsys.readouterr().out
    assert "step-00000002  ok" in listing and f"step-00000004  DAMAGED: {reason}" in listing

    assert mgr.latest() == older  # resume: reported, moved aside, the previous one is used
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged: {reason}" in err
    assert f"moved it aside to {tmp_path / 'damaged-step-00000004'} (kept, not deleted)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged-step-00000004", "step-00000002"]
    assert mgr.load(older, model, optimizer)["step"] == 2
    mgr.save(4, model, optimizer, {"step": 4})  # training redoes the step; the damaged copy stays
    mgr.save(6, model, optimizer, {"step": 6})
    assert (tmp_path / "damaged-step-00000004").is_dir() and mgr.latest() == tmp_path / "step-00000006"


@pytest.mark.faults
def test_checkpoint_without_digests_still_loads_with_one_note(tmp_path, d, capsys):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=5, dist=d)
    for step in (1, 2):
        path = mgr.save(step, model, optimizer, {"step": step})
        # The marker as eagle-dist wrote it before digests were recorded.
        (path / ck.MARKER).write_text(json.dumps({"step": step, "world_size": 1, "completed_at": 0.0}))
    ck._warned_legacy.clear()
    assert mgr.latest() == path and mgr.load(path, model, optimizer)["step"] == 2
    assert mgr.load(tmp_path / "step-00000001", model, optimizer)["step"] == 1
    assert capsys.readouterr().err.count("saved before checkpoints recorded sha256 digests") == 1
    assert checkpoint_cli(["verify", str(path)]) == 0
    assert "unchecked (saved before checkpoints recorded digests)" in capsys.readouterr().out
    # The module's own `python -m` line runs the same tool.
    shim = subprocess.run([sys.executable, "-m", "eagle_dist.checkpoint", "verify", str(path)], capture_output=True,
                          text=True, env=launch_env(), timeout=120)
    assert shim.returncode == 0 and "step-00000002  unchecked" in shim.stdout, shim.stderr[-2000:]


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.faults
@pytest.mark.parametrize("where", ["torch.save", "safetensors", "rename"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, d, monkeypatch, where):
    model, optimizer, scheduler = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=1, dist=d)
    first = mgr.save(1, model, optimizer, {"step": 1}, scheduler=scheduler)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with monkeypatch.context() as m:
        if where == "torch.save":
            m.setattr(torch, "save", _no_space)
        elif where == "safetensors":
            m.setattr(safetensors.torch, "save_file", _no_space)
        else:
            m.setattr(ck.os, "replace", _no_space)
        with pytest.raises(CheckpointSaveError) as err:
            mgr.save(2, model, optimizer, {"step": 2}, scheduler=scheduler)
    message = str(err.value)
    assert "no space left on device" in message and f"{first} is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no temp, no step 2
    assert mgr.latest() == first
    mgr.load(first, model, optimizer, scheduler=scheduler)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@pytest.mark.faults
def test_any_write_error_becomes_a_save_error_on_every_rank(tmp_path, d, monkeypatch):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=1, dist=d)

    def refuses(*_args, **_kwargs):
        raise RuntimeError("shared storage")

    monkeypatch.setattr(safetensors.torch, "save_file", refuses)
    with pytest.raises(CheckpointSaveError, match="rank 0: RuntimeError: shared storage") as err:
        mgr.save(1, model, optimizer, {"step": 1})
    assert "disk space" not in str(err.value)  # not a storage problem: no storage advice
    assert list(tmp_path.iterdir()) == []


@pytest.mark.faults
def test_failed_resave_of_a_step_keeps_the_old_copy(tmp_path, d, monkeypatch):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=2, dist=d)
    mgr.save(6, model, optimizer, {"step": 6, "v": 1})
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old step-6 is already moved aside; putting the new one fails
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(CheckpointSaveError, match="Input/output error"):
        mgr.save(6, model, optimizer, {"step": 6, "v": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000006"]
    assert mgr.load(mgr.latest(), model, optimizer)["v"] == 1


def test_extra_that_is_not_json_is_refused_before_writing(tmp_path, d):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=1, dist=d)
    with pytest.raises(TypeError, match="JSON"):
        mgr.save(1, model, optimizer, {"step": 1, "bad": object()})
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.faults
def test_wrong_architecture_and_wrong_strategy_are_clear_errors(tmp_path, d):
    model, optimizer, _ = make_training()
    mgr = CheckpointManager(tmp_path, keep_last=1, dist=d)
    path = mgr.save(1, model, optimizer, {"step": 1})
    wide = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        mgr.load(path, wide, None)
    state = json.loads((path / ck.STATE_FILE).read_text())
    (path / ck.STATE_FILE).write_text(json.dumps({**state, "strategy": "deepspeed"}))
    with pytest.raises(ck.CheckpointDamagedError, match="trainer_state.json"):
        mgr.load(path, model, optimizer)  # edited after the save: the digest sees it first
    # A checkpoint really written by such a run carries matching digests: skip them to get
    # to the checks behind.
    with pytest.raises(CheckpointError, match="written by a deepspeed run"):
        mgr.load(path, model, optimizer, verify=False)
    (path / ck.STATE_FILE).write_text(json.dumps({**state, "format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        mgr.load(path, model, optimizer, verify=False)


# --------------------------------------------------------------------------- multi-process


def _toy(launch: str, out, *args: str) -> subprocess.CompletedProcess:
    toy_args = ["--out", str(out), "--steps", "6", "--ckpt-every", "2", *args]
    if launch == "torchrun":
        return toy_train.run_launch(toy_train.torchrun_cmd(*toy_args))
    config = toy_train.ACCELERATE_CONFIGS / "deepspeed_zero2.yaml"
    return toy_train.run_launch(
        toy_train.accelerate_cmd("--config_file", str(config), "--num_processes", "2", str(toy_train.SCRIPT), *toy_args))


@pytest.mark.faults
@pytest.mark.multiproc
@pytest.mark.parametrize("launch", ["torchrun", "deepspeed"])
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, launch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    tracking = ["--tracking"] if launch == "torchrun" else []
    helpers.assert_ok(_toy(launch, straight, *tracking))

    killed = _toy(launch, stopped, *tracking, "--kill-after-step", "5")
    assert killed.returncode != 0  # every rank SIGKILLed after step 5; the newest checkpoint is step 4
    newest = [p.name for _, p in ck.complete_checkpoints(stopped / "checkpoints")]
    assert newest == ["step-00000002", "step-00000004"]
    run_id_before = json.loads((stopped / "checkpoints" / "step-00000004" / ck.STATE_FILE).read_text())["extra"][
        "mlflow_run_id"]
    helpers.assert_ok(_toy(launch, stopped, *tracking))

    a, b = toy_train.result(straight), toy_train.result(stopped)
    assert b["resumed_from"] == 4 and b["final_step"] == 6 and b["params_identical"]
    assert b["weights"] == a["weights"], "resumed run diverged from the uninterrupted one"
    if launch == "deepspeed":
        assert b["strategy"] == "deepspeed" and b["zero_stage"] == 2
        # Our loader reads DeepSpeed's shards with weights_only=True plus three allowed classes.
        shards = sorted((stopped / "checkpoints" / "step-00000006" / ck.DEEPSPEED_DIR).rglob("*.pt"))
        assert len(shards) == 3
        with torch.serialization.safe_globals(ck._deepspeed_safe_globals()):
            for shard in shards:
                torch.load(shard, weights_only=True)
    else:
        from mlflow import MlflowClient

        assert run_id_before is not None and b["run_id"] == run_id_before
        client = MlflowClient(tracking_uri=f"sqlite:///{stopped / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.run_id for r in runs] == [run_id_before]  # rank 0 only, one run across the kill
        steps = sorted({m.step for m in client.get_metric_history(run_id_before, "loss")})
        assert steps == [1, 2, 3, 4, 5, 6] and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["toy.steps"] == "6"


@pytest.mark.faults
@pytest.mark.multiproc
@pytest.mark.parametrize("launch", ["torchrun", "deepspeed"])
def test_disk_full_on_one_rank_fails_the_save_everywhere_and_keeps_the_previous(tmp_path, launch):
    proc = _toy(launch, tmp_path, "--enospc-step", "4", "--enospc-rank", "1")
    helpers.assert_ok(proc)  # the toy catches CheckpointSaveError and trains on, as a trainer may
    r = toy_train.result(tmp_path)
    assert r["final_step"] == 6 and r["params_identical"]
    assert len(r["save_errors"]) == 1
    message = r["save_errors"][0]
    assert "step-00000004" in message and "rank 1: no space left on device" in message
    assert "step-00000002 is intact" in message
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000006"]  # no half-written step 4, no temp folder
