"""Distributed state: the one module that knows about ranks.

Everything else asks a `Dist` object (rank, world size, is_main, device, collectives);
nothing else reads RANK / WORLD_SIZE / SLURM_* from the environment.

    from eagle_dist import distributed as distmod
    d = distmod.setup(strategy="auto", expected_world_size=None, seed=0)
    model, optimizer = d.prepare(model, optimizer)
    d.backward(loss); d.clip_grad(model); optimizer.step()
    stop = d.any_flag(preempted)          # every rank gets the same answer
    d.cleanup()

Launch lines that really start N processes (tests/distributed/test_dist.py runs each of the first six
with 2 CPU processes; for srun only the SLURM_* mapping is unit-tested, no Slurm here):

    torchrun --nproc_per_node 2 launch/train.py
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml launch/train.py
    accelerate launch --multi_gpu --num_processes 2 launch/train.py   # no GPU: CPU + gloo
    accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml --num_processes 2 launch/train.py
    torchrun --nnodes 2 --node_rank R --nproc_per_node G --rdzv_backend c10d \\
        --rdzv_endpoint HOST:PORT launch/train.py
    accelerate launch --config_file launch/accelerate/multi_node.yaml --num_processes 16 \\
        --machine_rank R --main_process_ip HOST --main_process_port PORT launch/train.py
    srun --ntasks N python launch/train.py     # one task per GPU; RANK etc. derived from SLURM_*

Stop signals (SIGTERM, SIGINT, SIGUSR1) belong to the workers, which checkpoint and exit 0:
`run_torchrun` (launch/torchrun.py, train.sbatch, the embedded default's relaunch) is torchrun
passing them on instead of shutting the workers down itself; `requeue_slurm_job` is the
trainer's SIGUSR1 requeue.

Why each launcher is handled as it is, and the accelerate / DeepSpeed-on-CPU workarounds
below (the simple launcher of `--cpu`, the shm op, micro_batch_size): README, "Launcher notes".

DeepSpeed on GPU builds no C++/CUDA op at run time (a JIT build takes minutes and needs nvcc):
the optimizer is our torch.optim.Adam passed as a client optimizer, so the DeepSpeed config has
no "optimizer" section (DeepSpeed would build FusedAdam for one, and `torch_adam` only applies
inside one; accelerate refuses both a config optimizer and a client one). Optimizer offload
stays "none": with offload accelerate swaps the Adam for DeepSpeedCPUAdam, another JIT op.
The CUDA accelerator has no shared-memory comm op. bf16 stays off in the DeepSpeed config
(see `Precision`). `tests/distributed/test_dist.py` checks the config dict.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from eagle_dist.config import CpuAllocator, MixedPrecision, Strategy
from eagle_dist.errors import EagleError

STRATEGIES = typing.get_args(Strategy)
ZERO_STAGES = (1, 2)
MIXED_PRECISIONS = typing.get_args(MixedPrecision)

WORKING_LAUNCH_LINES = """\
Launch lines that really start N processes:
  torchrun --nproc_per_node 2 launch/train.py
  accelerate launch --config_file launch/accelerate/cpu_2proc.yaml launch/train.py
  accelerate launch --multi_gpu --num_processes 2 launch/train.py   (no GPU: runs on CPU + gloo)
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 launch/train.py"""

CPU_PITFALL = (
    "`accelerate launch --cpu --num_processes N` starts only ONE process: with --cpu accelerate "
    "uses its single-process launcher, so the run would silently train on one process."
)


class DistributedSetupError(EagleError, RuntimeError):
    """The launch or the distributed settings are wrong; the message says how to fix them."""


class WorldSizeError(DistributedSetupError):
    """The number of processes differs from what the launcher or the config promised."""


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process, read from the environment before any init."""

    launcher: str  # "torchrun", "accelerate", "srun", "env" (RANK set by hand) or "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    promised_world_size: int | None  # exact size the launcher promised, if it said one
    promised_min_world_size: int  # at least this many (accelerate --cpu leaves only this)
    promise_source: str  # for error messages: where the promise came from
    env_updates: dict[str, str] = field(default_factory=dict)  # to export before init


@dataclass(frozen=True)
class Precision:
    """How the training forward runs, decided once by `resolve_precision` (setup() keeps it on
    `Dist.precision`). The model and the benchmark enter `precision.context()`; nothing else
    looks at `dist.mixed_precision` of the config again.

    Autocast is the only mechanism: accelerate and DeepSpeed are always built with
    mixed_precision="no", so the trainable heads keep fp32 weights, gradients and optimizer
    state under DDP and DeepSpeed alike (DeepSpeed's own bf16 mode would turn the weights
    into bf16; the heads are a few MB, so that would save nothing and change the numerics).
    Eigendecompositions and the losses switch autocast off inside and run in fp32.
    """

    device_type: str  # the autocast device: "cuda" or "cpu"
    dtype: torch.dtype  # compute dtype inside the autocast region; float32 when off
    autocast: bool

    @property
    def mode(self) -> str:
        """The resolved config value: "bf16" or "no" (never "auto")."""
        return "bf16" if self.autocast else "no"

    def context(self) -> Any:
        """The autocast region of the forward pass (a no-op context when off).

        Off is `nullcontext`, not `autocast(enabled=False)`: it must not switch off an
        autocast region a caller opened around us.
        """
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def __str__(self) -> str:
        if self.autocast:
            return f"bf16 (autocast {self.dtype} on {self.device_type}, fp32 weights)"
        return "no (fp32, no autocast)"


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """`dist.mixed_precision` -> what runs on `device`.

    "auto": bf16 autocast on a GPU with native bf16 (Ampere and newer), fp32 elsewhere.
    "bf16": bf16 autocast wherever it was asked for, CPU included. On CPU this is slow on most
        processors, but it was asked for by name ("auto" is the CPU default), and it is the
        only way to run the GPU's bf16 code path (dtypes of heads, losses, eigensolvers) on a
        machine without one. GPUs without native bf16 emulate it (slowly), likewise.
    "no": fp32 without autocast.
    """
    if requested not in MIXED_PRECISIONS:
        raise DistributedSetupError(
            f"mixed_precision must be one of {MIXED_PRECISIONS}, got {requested!r} "
            "(fp16 needs loss scaling, which this trainer does not do; use bf16 on GPUs)."
        )
    device_type = torch.device(device).type
    if requested == "auto":
        native_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        requested = "bf16" if native_bf16 else "no"
    if requested == "bf16":
        return Precision(device_type=device_type, dtype=torch.bfloat16, autocast=True)
    return Precision(device_type=device_type, dtype=torch.float32, autocast=False)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    try:
        return int(value)
    except ValueError:
        return default


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm hostlist: 'gpu[03-05,9],cpu1' -> 'gpu03', 'r[1-2]-n[4-5]' -> 'r1-n4'."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if match is None or not (match.group(1) or match.group(2)):
        raise DistributedSetupError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    host = prefix + ranges.split(",")[0].split("-")[0] + suffix
    return first_slurm_host(host) if "[" in suffix else host


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from Slurm's compressed form: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise DistributedSetupError(f"cannot parse Slurm tasks-per-node {tasks_per_node!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    if not 0 <= node_id < len(counts):
        raise DistributedSetupError(f"node id {node_id} outside Slurm tasks-per-node {tasks_per_node!r}")
    return counts[node_id]


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The Slurm job id (stable across requeues), or None outside a Slurm job."""
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID") or None


def elastic_run_id(env: Mapping[str, str] | None = None) -> str | None:
    """torchrun's rendezvous id (the same for every restart of one torchrun job), or None.

    torchrun's default id for multi-node rendezvous is the literal "none", which every job
    shares, so it identifies nothing and is dropped; `--standalone` draws a fresh one per job.
    """
    env = os.environ if env is None else env
    run_id = env.get("TORCHELASTIC_RUN_ID") or ""
    return run_id if run_id and run_id != "none" else None


def _is_accelerate_env(env: Mapping[str, str]) -> bool:
    # Every accelerate launcher exports these; torchrun alone never does.
    return "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's environment (torchrun, accelerate, srun or nothing)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        if _is_accelerate_env(env):
            launcher = "accelerate"
        elif "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        else:
            launcher = "env"
        return LaunchInfo(
            launcher=launcher,
            rank=_int(env, "RANK", 0),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            # Without LOCAL_WORLD_SIZE assume everyone is local: fewer threads, never more.
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
            promised_world_size=world,
            promised_min_world_size=1,
            promise_source=f"the launcher ({launcher}) exported WORLD_SIZE={world}",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS", 1)
        rank = _int(env, "SLURM_PROCID", 0)
        local_rank = _int(env, "SLURM_LOCALID", 0)
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        local_world = (
            slurm_tasks_on_node(per_node, _int(env, "SLURM_NODEID", 0)) if per_node else 1
        )
        nodelist = (
            env.get("SLURM_STEP_NODELIST")
            or env.get("SLURM_JOB_NODELIST")
            or env.get("SLURM_NODELIST")
            or "127.0.0.1"
        )
        # Distinct jobs sharing a node get distinct ports; 20000-29999 avoids the
        # ephemeral range Linux hands out to outgoing connections.
        port = env.get("MASTER_PORT") or str(20000 + _int(env, "SLURM_JOB_ID", 0) % 10000)
        updates = {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            "MASTER_PORT": port,
        }
        return LaunchInfo(
            launcher="srun",
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            promised_world_size=world,
            promised_min_world_size=1,
            promise_source=f"srun (SLURM_STEP_NUM_TASKS={world})",
            env_updates=updates,
        )
    # No ranks in the environment: a single process. accelerate's simple launcher exports
    # MASTER_ADDR/MASTER_PORT only when asked for more than one process or machine.
    simple_accelerate = "ACCELERATE_USE_CPU" in env and _is_accelerate_env(env)
    asked_for_many = simple_accelerate and "MASTER_ADDR" in env and "MASTER_PORT" in env
    return LaunchInfo(
        launcher="accelerate" if simple_accelerate else "none",
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        promised_world_size=None,
        promised_min_world_size=2 if asked_for_many else 1,
        promise_source=(
            "accelerate launch was asked for several processes (it exported MASTER_ADDR and "
            "MASTER_PORT) but started this one alone"
            if asked_for_many
            else "no launcher"
        ),
    )


# The signals that stop training with a checkpoint (eagle_dist.engine.trainer decides how).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
TORCHRUN_CODE = "import sys; from eagle_dist.distributed import run_torchrun; sys.exit(run_torchrun(sys.argv[1:]))"


def relaunch_under_torchrun(script: str | Path, args: list[str], reason: str, nproc: int = 2) -> int | None:
    """Exit code of an `nproc`-process torchrun of `script args`, or None to run here.

    Only a lone process on a CPU machine with at least `nproc` cores relaunches (a run that wants
    `nproc` processes, started as one); EAGLE_NO_RELAUNCH=1 keeps it in one process.
    """
    info = detect_launch()
    if info.world_size != 1 or info.promised_min_world_size != 1 or torch.cuda.is_available():
        return None
    if (os.cpu_count() or 1) < nproc or os.environ.get("EAGLE_NO_RELAUNCH"):
        return None
    print(f"eagle-dist: {reason}: starting {nproc} processes with torchrun "
          "(set EAGLE_NO_RELAUNCH=1 to stay in one process)", flush=True)
    # torchrun runs as `run_torchrun`, which passes the stop signals on to the workers. This
    # process passes them to torchrun: a signal to this process alone (docker stop, `kill PID`)
    # stops the run too; a signal to the whole process group (a terminal's Ctrl-C, `kill --
    # -PGID`) reaches the workers twice, which they take as one.  Ignored until torchrun has
    # started (it inherits that only until run_torchrun installs its handlers).
    cmd = [sys.executable, "-c", TORCHRUN_CODE, "--standalone", "--nproc_per_node", str(nproc), str(script), *args]
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        agent = subprocess.Popen(cmd)
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _frame: _signal(agent.pid, signum))
        code = agent.wait()
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_torchrun(argv: list[str]) -> int:
    """torchrun (`torch.distributed.run`) that passes the stop signals on to its workers.

    Plain torchrun acts on SIGTERM and SIGINT itself (and dies of SIGUSR1): it signals its workers,
    gives them 30 s (--shutdown-timeout), kills them, and ends with a SignalException traceback and
    a non-zero exit, so a stop that checkpoints looks like a crash.  Here each stop signal only goes
    on to the workers' process groups (torchrun starts each worker in a session of its own, so a
    signal to torchrun's process group does not reach them); the workers save and exit 0 and
    torchrun ends as they do.  Under Slurm every process of the step gets the signal anyway; the
    second copy changes nothing.  Before any worker runs, a stop signal ends torchrun, as
    its default action would.  SIGHUP and SIGQUIT keep torchrun's own handling.
    """
    from torch.distributed import run as torch_run

    if any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv):
        print("eagle-dist: --signals-to-handle is set by this launcher (SIGHUP,SIGQUIT: torchrun's own "
              "handling; SIGTERM, SIGINT, SIGUSR1: passed on to the workers); leave it out", file=sys.stderr)
        return 2
    for sig in STOP_SIGNALS:
        signal.signal(sig, _pass_on_to_workers)
    torch_run.main(["--signals-to-handle", "SIGHUP,SIGQUIT", *argv])
    return 0


def _pass_on_to_workers(signum: int, _frame: Any) -> None:
    if not _signal_children_of(os.getpid(), signum):  # no worker yet: stop, as torchrun would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass  # exited meanwhile


def _signal_children_of(parent: int, sig: int) -> bool:
    """Send `sig` to the process group of every child of `parent` (Linux /proc); False if none."""
    found = False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == parent:  # fields[1]: the parent pid
            found = True
            try:
                os.killpg(int(stat.parent.name), sig)
            except OSError:
                pass
    return found


def requeue_slurm_job(job_id: str, scontrol: str = "scontrol", timeout_s: float = 60.0) -> str | None:
    """Put Slurm job `job_id` back in the queue: None on success, else why it failed.

    Slurm then ends the running job (SIGTERM, then SIGKILL after KillWait) and starts it again
    with the same job id once its requeue delay has passed.
    """
    try:
        done = subprocess.run([scontrol, "requeue", str(job_id)], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{type(err).__name__}: {err}"
    if done.returncode != 0:
        return (done.stderr.strip() or done.stdout.strip() or "no output") + f" (exit status {done.returncode})"
    return None


def check_world_size(actual: int, info: LaunchInfo, expected_world_size: int | None) -> None:
    """Refuse to run when the process group differs from what was promised."""
    problems = []
    if info.promised_world_size is not None and actual != info.promised_world_size:
        problems.append(
            f"{info.promise_source}, but the process group has {actual} process(es)."
        )
    if actual < info.promised_min_world_size:
        problems.append(f"{info.promise_source}; the process group has {actual} process(es).")
    if expected_world_size is not None and actual != expected_world_size:
        problems.append(
            f"The run config expects expected_world_size={expected_world_size}, but "
            f"{actual} process(es) were started. Fix the launch line or set "
            f"expected_world_size={actual} (or null to trust the launcher)."
        )
    if problems:
        raise WorldSizeError(
            "Refusing to train with the wrong world size.\n  "
            + "\n  ".join(problems)
            + f"\nKnown pitfall: {CPU_PITFALL}\n{WORKING_LAUNCH_LINES}"
        )


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads_for(local_world_size: int, override: int | None = None) -> int:
    """Threads per rank so co-located ranks share the cores instead of oversubscribing.

    Launchers' OMP_NUM_THREADS is ignored on purpose: torchrun sets it to 1 whenever it
    starts several workers, which would starve a CPU run on a big machine.
    """
    if override is not None:
        if override < 1:
            raise DistributedSetupError(f"cpu_threads must be >= 1 (or None for automatic), got {override}")
        return override
    return max(1, _usable_cores() // max(1, local_world_size))


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
CPU_ALLOCATORS = typing.get_args(CpuAllocator)


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel; True if set.

    glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
    unmaps it on free, so each large tensor of a CPU step (batch 32: the [B, 1152, 28, 28] keys
    and head activations, 115 MiB each; the [B, 784, 784] graphs) is faulted in page by page,
    every step: 3.3-4.5 M page faults and 9-12 s of kernel time per batch-32 step on the
    development machine (docs/performance.md, "Performance round 3: the step").  With mmap off
    and no trimming, freed blocks go back to the heap and the next step reuses them.  The cost:
    the process keeps its high-water mark and fragmentation can raise it (batch 32: +19 % RSS).
    No-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (see module doc)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _deepspeed_plugin(zero_stage: int, grad_clip: float, micro_batch_size: int) -> Any:
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.imports import is_transformers_available

    class _DeepSpeedPlugin(DeepSpeedPlugin):
        def set_deepspeed_weakref(self) -> None:
            # accelerate registers the config with transformers for ZeRO-3 from_pretrained;
            # without transformers (and with ZeRO-3 refused) there is nothing to register.
            if is_transformers_available():
                super().set_deepspeed_weakref()

    plugin = _DeepSpeedPlugin(
        zero_stage=zero_stage,
        gradient_clipping=grad_clip if grad_clip > 0 else 0.0,
        gradient_accumulation_steps=1,
        offload_optimizer_device="none",
        offload_param_device="none",
    )
    # No "optimizer" section and no offload: DeepSpeed runs our torch Adam and builds no op
    # (see the module docstring).
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    plugin.deepspeed_config.pop("train_batch_size", None)
    # Our optimizer is plain torch AdamW with named groups, which DeepSpeed calls "untested".
    plugin.deepspeed_config["zero_allow_untested_optimizer"] = True
    return plugin


@dataclass
class Dist:
    """Distributed state and the collectives the trainer needs. Build it with `setup()`."""

    accelerator: Any
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None
    strategy: str  # "ddp" or "deepspeed"
    zero_stage: int | None
    precision: Precision
    grad_clip: float
    launcher: str
    cpu_threads: int

    @property
    def mixed_precision(self) -> str:
        """The resolved `dist.mixed_precision`: "bf16" or "no" (see `Precision`)."""
        return self.precision.mode

    @property
    def pin_memory(self) -> bool:
        """Loaders pin their batches when they go to a GPU: the host-to-device copy can then run
        asynchronously (`.to(device, non_blocking=True)`); on CPU pinning only costs a copy."""
        return self.device.type == "cuda"

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of a loader batch on this rank's device; other entries are dropped.

        From pinned memory the copies are asynchronous and ordered before the step's kernels on
        the same stream, so the step does not wait for them on the host.
        """
        return {k: v.to(self.device, non_blocking=self.pin_memory) for k, v in batch.items() if torch.is_tensor(v)}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (and return it). Tensor must be on `device`."""
        if self.distributed:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks in place (and return it)."""
        if self.distributed:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
        return tensor

    def any_flag(self, flag: bool | torch.Tensor) -> bool:
        """True on every rank if `flag` is True on any rank (preemption, NaN, save failure).

        `flag` may be a one-element tensor on `device` (e.g. `~torch.isfinite(loss)`): it then
        goes into the all-reduce without a host read first, and the reduced answer is the only
        host sync.
        """
        if torch.is_tensor(flag):
            value = flag.detach().reshape(1).to(device=self.device, dtype=torch.int32)
        else:
            value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        return bool(self.all_reduce_max(value).item())

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank gets the list of all ranks' (picklable) objects, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Every rank gets rank `src`'s (picklable) object."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on rank 0 only, flushed so lines interleave sanely with other output."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def prepare(self, *objects: Any) -> Any:
        """accelerator.prepare: wraps the model in DDP / a DeepSpeed engine, the optimizer too."""
        return self.accelerator.prepare(*objects)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad(self, model_or_params: Any, max_norm: float | None = None) -> torch.Tensor | float | None:
        """Clip gradients to `max_norm` (default: setup's grad_clip) and return the total norm.

        The norm stays a tensor on the device (reading it would stall the step on the GPU);
        callers read it at logging intervals. Under DeepSpeed the engine clips inside
        `optimizer.step()` to setup's grad_clip (it is part of the DeepSpeed config); this then
        returns the engine's last global norm (DeepSpeed keeps it as a float), None before the
        first step.
        """
        params = (
            model_or_params.parameters()
            if isinstance(model_or_params, torch.nn.Module)
            else model_or_params
        )
        limit = self.grad_clip if max_norm is None else max_norm
        if self.strategy == "deepspeed":
            return self.accelerator.clip_grad_norm_(params, limit)
        if limit <= 0:
            return None
        return self.accelerator.clip_grad_norm_(params, limit)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain module inside DDP / DeepSpeed wrappers."""
        return self.accelerator.unwrap_model(model)

    def cleanup(self) -> None:
        """Tear the process group down; safe to call twice (entry points call it in finally)."""
        from accelerate.state import AcceleratorState, GradientState
        from torch.nn.parallel import DistributedDataParallel

        # With gloo, a DDP Reducer still alive when the interpreter exits aborts the process now
        # and then ("terminate called without an active exception"), turning a finished run into
        # a failed one. Free the reducers while the process group exists; the models are not
        # trained after cleanup anyway.
        for model in getattr(self.accelerator, "_models", []):
            if isinstance(model, DistributedDataParallel):
                # torch types the reducer as always present; dropping it is this teardown's point.
                model.reducer = None  # type: ignore[assignment]
        self.accelerator.free_memory()
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
        if self.strategy == "deepspeed":
            import deepspeed.comm.comm as ds_comm

            ds_comm.cdb = None  # else a later setup() in this process reuses a dead group
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _resolve(
    strategy: str, zero_stage: int | None, mixed_precision: str, env: Mapping[str, str]
) -> tuple[str, int | None, str]:
    """Combine the run config with what an accelerate config file put in the environment."""
    if strategy not in STRATEGIES:
        raise DistributedSetupError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    launcher_ds = _truthy(env.get("ACCELERATE_USE_DEEPSPEED"))
    if strategy == "auto":
        strategy = "deepspeed" if launcher_ds else "ddp"
    elif strategy == "ddp" and launcher_ds:
        raise DistributedSetupError(
            "The accelerate config selects DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but the run "
            "config says strategy='ddp' (dist.strategy). Use a DDP accelerate config "
            "(launch/accelerate/ddp_multi_gpu.yaml), or set dist.strategy=auto (follow the "
            "accelerate config) or dist.strategy=deepspeed."
        )
    stage: int | None = None
    if strategy == "deepspeed":
        launcher_stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if launcher_stage is not None and zero_stage is not None and int(launcher_stage) != zero_stage:
            raise DistributedSetupError(
                f"The accelerate config asks for ZeRO stage {launcher_stage} but the run config "
                f"asks for zero_stage={zero_stage} (dist.zero_stage). Make them agree, or set "
                "dist.zero_stage=null to take the accelerate config's stage."
            )
        stage = zero_stage if zero_stage is not None else int(launcher_stage or 2)
        if stage not in ZERO_STAGES:
            raise DistributedSetupError(
                f"zero_stage must be one of {ZERO_STAGES}, got {stage}: ZeRO-3 shards the "
                "parameters themselves, which the trainer's evaluation and frozen backbone do not support."
            )
    resolve_precision(mixed_precision, "cpu")  # refuse a bad value before anything starts
    return strategy, stage, mixed_precision


def _make_accelerator(
    info: LaunchInfo,
    strategy: str,
    stage: int | None,
    on_gpu: bool,
    grad_clip: float,
    expected_world_size: int | None,
    micro_batch_size: int,
    find_unused_parameters: bool,
    timeout_s: float,
) -> Any:
    """The Accelerator of `setup`, which starts the process group (DDP or DeepSpeed)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # A lone process must not name a backend: accelerate would then look for a process
    # group that nobody started. Refuse a broken launcher promise before any init.
    if info.world_size == 1 and strategy == "ddp":
        check_world_size(1, info, expected_world_size)
        handlers: list[Any] = []
    else:
        backend = "nccl" if on_gpu else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        handlers = [InitProcessGroupKwargs(backend=backend, timeout=timeout)]
    if strategy == "deepspeed":
        if info.launcher == "none":
            # DeepSpeed always wants a process group; give a lone process a world of one
            # instead of letting DeepSpeed go looking for MPI.
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
            )
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            _skip_deepspeed_shm_op()
        assert stage is not None  # _resolve always picks a ZeRO stage for deepspeed
        return Accelerator(
            deepspeed_plugin=_deepspeed_plugin(stage, grad_clip, micro_batch_size),
            mixed_precision="no",  # precision is Dist.precision's autocast (see Precision)
            kwargs_handlers=handlers,
        )
    return Accelerator(
        cpu=not on_gpu,
        mixed_precision="no",  # precision is Dist.precision's autocast (see Precision)
        kwargs_handlers=[
            *handlers,
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
        ],
    )


def setup(
    strategy: str = "auto",
    zero_stage: int | None = None,
    mixed_precision: str = "auto",
    grad_clip: float = 1.0,
    expected_world_size: int | None = None,
    seed: int = 0,
    cpu_threads: int | None = None,
    micro_batch_size: int = 1,
    find_unused_parameters: bool = False,
    timeout_s: float = 1800.0,
    cpu_allocator: str = "system",
) -> Dist:
    """Detect the launcher, start the process group through accelerate, check the world size.

    strategy: "ddp", "deepspeed", or "auto" (DeepSpeed iff the accelerate config selects it).
    zero_stage: 1 or 2; None takes the accelerate config's stage, else 2.
    mixed_precision: "auto" (bf16 on GPU, fp32 on CPU), "no" or "bf16" (honoured on CPU too);
        resolved once by `resolve_precision` into `Dist.precision`, which the model's forward
        enters. The run config decides; the launcher's --mixed_precision is ignored.
    grad_clip: max grad norm (<= 0 disables); DeepSpeed applies it inside its step.
    expected_world_size: refuse to run unless exactly this many processes exist (None: trust
        the launcher, whose promise is checked anyway).
    seed: seeds python/numpy/torch identically on every rank (identical model init);
        per-rank streams (data order, augmentation) are the trainer's job.
    cpu_threads: torch threads per rank; None = usable cores // ranks on this node.
    micro_batch_size: per-rank batch size, which DeepSpeed insists on knowing.
    cpu_allocator: on a CPU run, "reuse" keeps freed host memory in the process
        (`keep_freed_host_memory`; training passes ``dist.cpu_allocator``, "reuse" by default:
        every step allocates the same large tensors again), "system" leaves the C library's
        defaults (evaluate and predict: per-image sizes vary, and a heap that never shrinks
        would keep the largest photo's memory and its fragments).
    """
    from accelerate.utils import set_seed

    if expected_world_size is not None and expected_world_size < 1:
        raise DistributedSetupError(f"expected_world_size must be >= 1 or None, got {expected_world_size}")
    if micro_batch_size < 1:
        raise DistributedSetupError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    strategy, stage, mp = _resolve(strategy, zero_stage, mixed_precision, os.environ)

    info = detect_launch(os.environ)
    os.environ.update(info.env_updates)
    on_gpu = torch.cuda.is_available() and not _truthy(os.environ.get("ACCELERATE_USE_CPU"))
    precision = resolve_precision(mp, "cuda" if on_gpu else "cpu")

    if cpu_allocator not in CPU_ALLOCATORS:
        raise DistributedSetupError(f"cpu_allocator must be one of {CPU_ALLOCATORS}, got {cpu_allocator!r}")
    if cpu_allocator == "reuse" and not on_gpu:
        keep_freed_host_memory()
    threads = cpu_threads_for(info.local_world_size, cpu_threads)
    torch.set_num_threads(threads)
    accelerator = _make_accelerator(
        info, strategy, stage, on_gpu, grad_clip, expected_world_size, micro_batch_size,
        find_unused_parameters, timeout_s,
    )

    d = Dist(
        accelerator=accelerator,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        local_world_size=info.local_world_size,
        # accelerate reports "cpu:0" for multi-CPU runs; "cpu" compares equal to tensors' devices.
        device=torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device,
        backend=tdist.get_backend() if tdist.is_available() and tdist.is_initialized() else None,
        strategy=strategy,
        zero_stage=stage,
        precision=precision,
        grad_clip=grad_clip,
        launcher=info.launcher,
        cpu_threads=threads,
    )
    try:
        check_world_size(d.world_size, info, expected_world_size)
    except WorldSizeError:
        d.cleanup()
        raise
    set_seed(seed)
    return d


def describe(d: Dist) -> str:
    """One line for the run log: who launched us and how the world looks."""
    return (
        f"launcher={d.launcher} strategy={d.strategy}"
        + (f"(zero{d.zero_stage})" if d.zero_stage else "")
        + f" world_size={d.world_size} local_world_size={d.local_world_size} "
        f"backend={d.backend} device={d.device} mixed_precision={d.precision} "
        f"cpu_threads={d.cpu_threads} python={sys.version.split()[0]} torch={torch.__version__}"
    )
