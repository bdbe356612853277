"""A tiny training run on eagle_dist.distributed / checkpoint / tracking, for the multi-process tests.

    torchrun --nproc_per_node 2 tests/toy_train.py --out /tmp/toy --steps 6 --ckpt-every 2
    python -m accelerate.commands.launch --config_file launch/accelerate/cpu_2proc.yaml \\
        tests/toy_train.py --out /tmp/toy
    python -m accelerate.commands.launch --config_file launch/accelerate/deepspeed_zero2.yaml \\
        --num_processes 2 tests/toy_train.py --out /tmp/toy --strategy auto

Model: dropout + two nn.Linear layers, AdamW with two named parameter groups, LambdaLR warm-up. Each
rank draws its batches from its own global torch RNG (seeded per rank), so an exact resume
needs model, optimizer, scheduler AND the RNG states restored. On start it resumes from the
newest complete checkpoint in <out>/checkpoints. Rank 0 writes <out>/result.json: final
weights as every rank sees them, the MLflow run id, collective self-checks, save errors.

Each step is eagle_dist.engine.step.run_step, the trainer's own step.  Fault switches:
--kill-after-step S (SIGKILL every rank after step S), --enospc-step S with --enospc-rank R
(torch.save raises ENOSPC on rank R during the save at step S), --nan-step S / --no-batch-step S
with --fault-rank R (rank R's loss is NaN at step S / rank R has no batch at step S: every rank
skips that update / every rank stops there; result.json says what each rank saw).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import eagle_dist  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402

from eagle_dist import distributed as dist_mod  # noqa: E402
from eagle_dist.checkpoint import CheckpointManager, CheckpointSaveError  # noqa: E402
from eagle_dist.engine.step import run_step  # noqa: E402
from eagle_dist.engine.tracking import NullTracker, make_tracker  # noqa: E402
from helpers import launch_env, mean_over_ranks  # noqa: E402

IN_DIM, HIDDEN, OUT_DIM, BATCH = 8, 16, 4, 16
SCRIPT = Path(__file__).resolve()
ACCELERATE_CONFIGS = REPO / "launch" / "accelerate"
LAUNCH_TIMEOUT_S = 240  # a hung rendezvous must fail the test, not the CI job


# ----------------------------------------------------------------------------- for the tests


def torchrun_cmd(*toy_args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(SCRIPT), *toy_args]


def accelerate_cmd(*launch_args: str) -> list[str]:
    """`accelerate launch ...` through the CLI module the console script runs."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *launch_args]


def run_launch(cmd: list[str], timeout: float = LAUNCH_TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=launch_env(**env), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def result(out: Path) -> dict:
    return json.loads((Path(out) / "result.json").read_text())


# ----------------------------------------------------------------------------- the toy run


def self_check(d: dist_mod.Dist) -> dict:
    """Every collective helper, with answers that depend on the real world size."""
    ws = d.world_size
    return {
        "any_true": d.any_flag(d.rank == ws - 1),
        "any_false": d.any_flag(False),
        "gather": d.gather_object(d.rank),
        "broadcast": d.broadcast_object(f"from-{d.rank}"),
        "sum": d.all_reduce_sum(torch.ones(2, device=d.device)).tolist(),
        "max": d.all_reduce_max(torch.tensor([float(d.rank)], device=d.device)).tolist(),
        "mean": mean_over_ranks(d, float(d.rank)),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--expected-world-size", type=int, default=None)
    p.add_argument("--tracking", action="store_true", help="log to MLflow (rank 0)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--kill-after-step", type=int, default=None)
    p.add_argument("--enospc-step", type=int, default=None)
    p.add_argument("--enospc-rank", type=int, default=1)
    p.add_argument("--nan-step", type=int, default=None)
    p.add_argument("--no-batch-step", type=int, default=None)
    p.add_argument("--fault-rank", type=int, default=1)
    args = p.parse_args()

    out = Path(args.out)
    d = dist_mod.setup(
        strategy=args.strategy, expected_world_size=args.expected_world_size, seed=0, cpu_threads=1,
        micro_batch_size=BATCH,
    )
    try:
        return run(d, args, out)
    finally:
        d.cleanup()


def run(d: dist_mod.Dist, args: argparse.Namespace, out: Path) -> int:
    d.print(dist_mod.describe(d))
    checks = self_check(d)

    model = torch.nn.Sequential(
        torch.nn.Dropout(0.2), torch.nn.Linear(IN_DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT_DIM))
    # Two parameters per group: ZeRO then keeps each group in one flat buffer whose views are
    # the parameters, which is what real heads look like to the checkpoint code.
    groups = [
        {"name": "hidden", "params": list(model[1].parameters()), "lr": 0.05},
        {"name": "out", "params": list(model[3].parameters()), "lr": 0.01},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    model, optimizer = d.prepare(model, optimizer)
    torch.manual_seed(1000 * (d.rank + 1))  # per-rank data and dropout streams

    ckpt = CheckpointManager(out / "checkpoints", args.keep_last, d)
    step, run_id, resumed_from = 0, None, None
    latest = ckpt.latest()
    if latest is not None:
        extra = ckpt.load(latest, model, optimizer, scheduler=scheduler)
        step, run_id, resumed_from = extra["step"], extra["mlflow_run_id"], extra["step"]
        d.print(f"resumed from {latest} at step {step}")

    tracker = make_tracker(d.is_main, out, uri=args.tracking_uri) if args.tracking else NullTracker()
    tracker.start(run_name="toy", params={"toy": {"steps": args.steps, "lr": 0.05}, "world_size": d.world_size},
                  run_id=run_id)

    true_w = torch.linspace(-1, 1, IN_DIM * OUT_DIM).reshape(OUT_DIM, IN_DIM)

    def forward(batch, step_):
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if step_ == args.nan_step and d.rank == args.fault_rank:
            loss = loss * float("nan")
        return {"loss": loss}

    save_errors, skipped, stopped_at = [], [], None
    model.train()
    while step < args.steps:
        x = torch.randn(BATCH, IN_DIM)
        batch = {"x": x.to(d.device), "y": (x @ true_w.T + 0.1 * torch.randn(BATCH, OUT_DIM)).to(d.device)}
        if step == args.no_batch_step and d.rank == args.fault_rank:
            batch = None
        done = run_step(d, model, optimizer, forward, batch, step=step, metric_names=["loss"], scheduler=scheduler)
        if done.missing_batch:
            stopped_at = step
            break
        if done.nonfinite:
            skipped.append(step)
        step += 1
        tracker.log_metrics({"loss": done.metrics["loss"], "lr": scheduler.get_last_lr()[0]}, step=step)

        if step % args.ckpt_every == 0 or step == args.steps:
            real_save = torch.save
            if step == args.enospc_step and d.rank == args.enospc_rank:
                def full_disk(*_a, **_k):
                    raise OSError(errno.ENOSPC, "No space left on device (simulated)")
                torch.save = full_disk
            try:
                ckpt.save(step, model, optimizer,
                          {"step": step, "mlflow_run_id": tracker.run_id, "data_seed": 1000},
                          scheduler=scheduler)
            except CheckpointSaveError as err:
                save_errors.append(str(err))
                d.print(f"checkpoint at step {step} failed: {err}")
            finally:
                torch.save = real_save
        if step == args.kill_after_step:
            d.barrier()  # every rank finished the step (and its checkpoint) before dying
            os.kill(os.getpid(), signal.SIGKILL)

    weights = torch.cat([t.detach().reshape(-1).cpu() for t in d.unwrap(model).parameters()])
    everyone = d.gather_object(weights.tolist())
    skipped_by_rank, stopped_at_by_rank = d.gather_object(skipped), d.gather_object(stopped_at)
    tracker.close()
    if d.is_main:
        result = {
            "world_size": d.world_size,
            "strategy": d.strategy,
            "zero_stage": d.zero_stage,
            "launcher": d.launcher,
            "backend": d.backend,
            "final_step": step,
            "resumed_from": resumed_from,
            "weights": everyone,
            "params_identical": all(w == everyone[0] for w in everyone),
            "run_id": tracker.run_id,
            "checks": checks,
            "save_errors": save_errors,
            "skipped_by_rank": skipped_by_rank,
            "stopped_at_by_rank": stopped_at_by_rank,
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    # The process group is already torn down (main's finally).  Leave without the interpreter's
    # teardown: with DeepSpeed on gloo it now and then aborts there ("terminate called without an
    # active exception", seen under load), which would fail a run whose results are written.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
