"""eagle_dist.distributed: launcher detection, world-size refusal, and real 2-process runs on CPU.

    .venv/bin/python -m pytest -q tests/distributed/test_dist.py                 # all (about a minute)
    .venv/bin/python -m pytest -q tests/distributed/test_dist.py -m "not multiproc"
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

import helpers
import toy_train
from eagle_dist import distributed as dist_mod
from eagle_dist.distributed import DistributedSetupError, WorldSizeError, check_world_size, detect_launch

# --------------------------------------------------------------------------- launcher detection


def test_torchrun_environment_is_the_truth():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == (
        "torchrun", 1, 4, 1, 2)
    assert info.promised_world_size == 4 and info.env_updates == {}
    check_world_size(4, info, None)
    with pytest.raises(WorldSizeError, match="WORLD_SIZE=4"):
        check_world_size(1, info, None)


def test_accelerate_multi_gpu_launcher_is_recognised():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RUN_ID": "none", "ACCELERATE_MIXED_PRECISION": "no"}
    assert detect_launch(env).launcher == "accelerate"


def test_accelerate_cpu_flag_with_several_processes_is_refused_with_the_working_lines():
    # What `accelerate launch --cpu --num_processes 2` exports to the ONE process it starts.
    env = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no",
           "ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    info = detect_launch(env)
    assert info.world_size == 1 and info.promised_min_world_size == 2
    with pytest.raises(WorldSizeError) as err:
        check_world_size(1, info, None)
    message = str(err.value)
    assert "--cpu --num_processes" in message
    assert "--multi_gpu --num_processes 2" in message and "cpu_2proc.yaml" in message
    assert "torchrun --nproc_per_node 2" in message


def test_accelerate_cpu_flag_with_one_process_is_fine():
    env = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}
    check_world_size(1, detect_launch(env), None)


def test_expected_world_size_from_the_config_is_enforced():
    info = detect_launch({})
    check_world_size(1, info, 1)
    with pytest.raises(WorldSizeError, match="expected_world_size=2"):
        check_world_size(1, info, 2)


def test_srun_variables_become_torch_variables():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
           "SLURM_NTASKS": "4"}
    info = detect_launch(env)
    assert info.launcher == "srun"
    assert info.env_updates == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                "MASTER_ADDR": "gpu07", "MASTER_PORT": "23456"}
    assert detect_launch({**env, "MASTER_PORT": "4000"}).env_updates["MASTER_PORT"] == "4000"


def test_python_inside_an_sbatch_script_is_a_single_process():
    # The batch step has SLURM_PROCID/SLURM_NTASKS but no srun step variables.
    info = detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"})
    assert info.launcher == "none" and info.world_size == 1


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[03-05,9]", "gpu03"), ("a[1-2],b7", "a1"), ("x-[010-012]-ib", "x-010-ib"), ("r[1-2]-n[4-5]", "r1-n4"),
])
def test_first_slurm_host(nodelist, first):
    assert dist_mod.first_slurm_host(nodelist) == first


def test_slurm_tasks_per_node():
    assert [dist_mod.slurm_tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    with pytest.raises(DistributedSetupError):
        dist_mod.slurm_tasks_on_node("two", 0)
    with pytest.raises(DistributedSetupError):
        dist_mod.slurm_tasks_on_node("2(x2)", 2)


def test_threads_share_the_cores():
    assert dist_mod.cpu_threads_for(1, override=3) == 3
    cores = dist_mod._usable_cores()
    assert dist_mod.cpu_threads_for(2) == max(1, cores // 2)
    assert dist_mod.cpu_threads_for(10 * cores) == 1
    with pytest.raises(DistributedSetupError):
        dist_mod.cpu_threads_for(1, override=0)


# --------------------------------------------------------------------------- config resolution


def test_auto_follows_the_accelerate_deepspeed_config():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}
    assert dist_mod._resolve("auto", None, "auto", env) == ("deepspeed", 1, "auto")
    assert dist_mod._resolve("auto", 1, "no", env) == ("deepspeed", 1, "no")
    assert dist_mod._resolve("auto", None, "auto", {}) == ("ddp", None, "auto")
    assert dist_mod._resolve("deepspeed", None, "bf16", {}) == ("deepspeed", 2, "bf16")


@pytest.mark.parametrize("args, env, match", [
    (("ddp", None, "auto"), {"ACCELERATE_USE_DEEPSPEED": "true"}, "selects DeepSpeed"),
    (("deepspeed", 2, "auto"), {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO stage 1"),
    (("deepspeed", 3, "auto"), {}, "ZeRO-3"),
    (("ddp", None, "fp16"), {}, "loss scaling"),
    (("fsdp", None, "auto"), {}, "strategy must be one of"),
])
def test_contradictions_are_refused(args, env, match):
    with pytest.raises(DistributedSetupError, match=match):
        dist_mod._resolve(*args, env)


# --------------------------------------------------------------------------- in-process setup


# clean_env: tests/conftest.py


def test_single_process_setup_and_helpers(clean_env):
    d = dist_mod.setup(mixed_precision="bf16", cpu_threads=1)
    try:
        # bf16 asked for by name is honoured on CPU too (tests/unit/test_precision.py runs the step).
        assert (d.rank, d.world_size, d.is_main, d.strategy, d.mixed_precision) == (0, 1, True, "ddp", "bf16")
        assert d.device == torch.device("cpu") and torch.get_num_threads() == 1
        assert d.any_flag(True) and not d.any_flag(False)
        # A device tensor goes into the vote without a host read first (the NaN check).
        assert d.any_flag(~torch.isfinite(torch.tensor(float("nan")))) and not d.any_flag(torch.tensor(False))
        # The clipped norm stays a tensor: reading it every step would stall a GPU.
        model = torch.nn.Linear(2, 1)
        model(torch.ones(1, 2)).sum().backward()
        assert torch.is_tensor(d.clip_grad(model, 0.5))
        assert d.gather_object({"a": 1}) == [{"a": 1}] and d.broadcast_object("x") == "x"
        assert helpers.mean_over_ranks(d, torch.tensor(3.0)) == 3.0
        assert d.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
        assert "world_size=1" in dist_mod.describe(d)
        assert not d.pin_memory and d.to_device({"x": torch.ones(1), "key": "a"}) == {"x": torch.ones(1)}
    finally:
        d.cleanup()
        d.cleanup()  # entry points call it in `finally`; twice must be harmless


def test_loaders_pin_memory_and_copy_asynchronously_only_for_a_gpu(monkeypatch):
    from eagle_dist.config import load_config
    from eagle_dist.data import stream
    from eagle_dist.data.prepare import TrainingStream

    fields = dict(accelerator=None, rank=0, world_size=1, local_rank=0, local_world_size=1, backend=None,
                  strategy="ddp", zero_stage=None, grad_clip=1.0, launcher="none", cpu_threads=1)
    on_gpu = dist_mod.Dist(device=torch.device("cuda", 0), precision=dist_mod.resolve_precision("bf16", "cuda"),
                           **fields)
    on_cpu = dist_mod.Dist(device=torch.device("cpu"), precision=dist_mod.resolve_precision("no", "cpu"), **fields)
    assert on_gpu.pin_memory and not on_cpu.pin_memory

    # The training stream's loader takes the flag from its Dist (the real segment iterator, loader faked).
    for d in (on_gpu, on_cpu):
        seen = {}

        def fake_loader(*args, **kwargs):
            seen.update(kwargs)
            return _OneBatchLoader()

        monkeypatch.setattr(stream, "build_train_loader", fake_loader)
        assert next(TrainingStream(load_config(None, []), d).batches(0)) == {"x": 1}
        assert seen["pin_memory"] is d.pin_memory


class _OneBatchLoader:
    stats = {"corrupt_samples": 0, "incomplete_samples": 0, "missing_samples": 0, "read_errors": 0}

    def __iter__(self):
        yield {"x": 1}


def test_deepspeed_runs_torch_adam_and_builds_no_op():
    """What keeps DeepSpeed from JIT-compiling C++/CUDA ops at start-up (see distributed's docstring)."""
    config = dist_mod._deepspeed_plugin(2, 1.0, 4).deepspeed_config
    # No optimizer section: DeepSpeed uses our client torch.optim.Adam, never FusedAdam.
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"] is True
    # No offload: accelerate would swap the Adam for DeepSpeedCPUAdam, a JIT-built op.
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert config["zero_optimization"]["offload_param"]["device"] == "none"
    assert config["zero_optimization"]["stage"] == 2 and config["train_micro_batch_size_per_gpu"] == 4


def test_setup_refuses_accelerate_cpu_flag_before_starting_anything(clean_env):
    for key, value in {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(key, value)
    with pytest.raises(WorldSizeError, match="started this one alone"):
        dist_mod.setup(cpu_threads=1)
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------- real launches


def _assert_two_rank_run(out, launcher: str, strategy: str = "ddp"):
    r = toy_train.result(out)
    assert r["world_size"] == 2 and r["launcher"] == launcher and r["strategy"] == strategy
    assert r["backend"] == "gloo" and r["final_step"] == 4
    assert r["params_identical"], "ranks ended with different parameters"
    assert r["checks"] == {"any_true": True, "any_false": False, "gather": [0, 1], "broadcast": "from-0",
                           "sum": [2.0, 2.0], "max": [1.0], "mean": 0.5}
    return r


@pytest.mark.multiproc
def test_torchrun_two_processes(tmp_path):
    helpers.assert_ok(toy_train.run_launch(toy_train.torchrun_cmd("--out", str(tmp_path), "--steps", "4")))
    _assert_two_rank_run(tmp_path, "torchrun")


@pytest.mark.multiproc
def test_one_rank_nan_or_missing_batch_is_agreed_on_by_every_rank(tmp_path):
    # Rank 1's loss is NaN at step 1 and it has no batch at step 3: the step's one all-reduce
    # makes both ranks skip step 1's update and stop at step 3 (a rank acting alone would
    # leave the other hanging in its gradient all-reduce, or the weights apart).
    helpers.assert_ok(toy_train.run_launch(toy_train.torchrun_cmd(
        "--out", str(tmp_path), "--steps", "5", "--nan-step", "1", "--no-batch-step", "3", "--fault-rank", "1")))
    r = toy_train.result(tmp_path)
    assert r["skipped_by_rank"] == [[1], [1]] and r["stopped_at_by_rank"] == [3, 3]
    assert r["final_step"] == 3 and r["params_identical"]


@pytest.mark.multiproc
@pytest.mark.parametrize("launch_args", [
    ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"],
    ["--config_file", str(toy_train.ACCELERATE_CONFIGS / "cpu_2proc.yaml")],
], ids=["multi_gpu-flag", "cpu_2proc.yaml"])
def test_accelerate_launch_two_cpu_processes(tmp_path, launch_args):
    cmd = toy_train.accelerate_cmd(*launch_args, str(toy_train.SCRIPT), "--out", str(tmp_path), "--steps", "4")
    helpers.assert_ok(toy_train.run_launch(cmd))
    _assert_two_rank_run(tmp_path, "accelerate")


@pytest.mark.multiproc
def test_accelerate_cpu_flag_is_refused(tmp_path):
    cmd = toy_train.accelerate_cmd("--cpu", "--num_processes", "2", str(toy_train.SCRIPT), "--out", str(tmp_path))
    proc = toy_train.run_launch(cmd)
    assert proc.returncode != 0
    assert "Refusing to train with the wrong world size" in proc.stderr
    assert "accelerate launch --multi_gpu --num_processes 2" in proc.stderr
    assert not (tmp_path / "result.json").exists()


@pytest.mark.multiproc
def test_expected_world_size_mismatch_is_refused_on_every_rank(tmp_path):
    proc = toy_train.run_launch(toy_train.torchrun_cmd("--out", str(tmp_path), "--expected-world-size", "3"))
    assert proc.returncode != 0
    assert proc.stderr.count("expects expected_world_size=3") >= 2  # both ranks say it
    assert not (tmp_path / "result.json").exists()


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_on_two_cpu_processes(tmp_path, stage):
    config = toy_train.ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml"
    cmd = toy_train.accelerate_cmd("--config_file", str(config), "--num_processes", "2",
                                   str(toy_train.SCRIPT), "--out", str(tmp_path), "--steps", "4")
    proc = toy_train.run_launch(cmd)
    helpers.assert_ok(proc)
    r = _assert_two_rank_run(tmp_path, "accelerate", strategy="deepspeed")
    assert r["zero_stage"] == stage
    # The shared-memory op is skipped, not compiled (a compile prints "built successfully").
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr


def _node_cmd(launcher: str, node: int, port: int, out) -> list[str]:
    toy = [str(toy_train.SCRIPT), "--out", str(out), "--steps", "4"]
    if launcher == "torchrun":
        return [toy_train.sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                "--rdzv_id", "eagle-two-node-test", *toy]
    return toy_train.accelerate_cmd(
        "--config_file", str(toy_train.ACCELERATE_CONFIGS / "multi_node.yaml"), "--num_processes", "2",
        "--machine_rank", str(node), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *toy)


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"], ids=["torchrun-c10d", "multi_node.yaml"])
def test_simulated_two_node_run(tmp_path, launcher):
    """Two launcher invocations on 127.0.0.1, one per "node", meeting through c10d rendezvous."""
    port = helpers.free_port()
    procs = [
        subprocess.Popen(_node_cmd(launcher, node, port, tmp_path), env=helpers.launch_env(), cwd=toy_train.REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=toy_train.LAUNCH_TIMEOUT_S))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-3000:] for o in outputs)
    r = _assert_two_rank_run(tmp_path, launcher)
    assert r["world_size"] == 2


@pytest.mark.slow  # DeepSpeed's import and engine set-up: seconds, a minute on a loaded machine
def test_deepspeed_in_one_process_trains_torch_adam_in_fp32_without_building_an_op(clean_env):
    """The same test on a GPU machine checks the CUDA path (NCCL, CUDA accelerator)."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    def no_build(self, *args, **kwargs):
        raise AssertionError(f"DeepSpeed tried to JIT-build {self.name}")

    clean_env.setattr(OpBuilder, "jit_load", no_build)
    saved_env = dict(os.environ)  # setup() exports RANK etc. for a lone DeepSpeed process
    try:
        d = dist_mod.setup(strategy="deepspeed", zero_stage=2, mixed_precision="bf16", cpu_threads=1,
                           micro_batch_size=2)
        try:
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 2).to(d.device)
            engine, optimizer = d.prepare(model, torch.optim.Adam(model.parameters(), lr=0.1))
            assert isinstance(engine.optimizer.optimizer, torch.optim.Adam)  # ours, not FusedAdam
            assert not engine.config["bf16"]["enabled"]  # bf16 is our autocast, not DeepSpeed's
            before = model.weight.detach().clone()
            with d.precision.context():
                loss = engine(torch.ones(2, 3, device=d.device)).float().square().mean()
            d.backward(loss)
            optimizer.step()
            assert model.weight.dtype == torch.float32 and not torch.equal(model.weight.detach(), before)
        finally:
            d.cleanup()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
