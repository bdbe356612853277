"""One optimizer step and the ranks' agreement: the code every training loop here runs.

    from eagle_dist.engine.step import run_step
    result = run_step(dist, heads, optimizer, forward, batch, step=s, metric_names=LOSS_NAMES,
                      flags=lambda: {"stop_usr1": usr1_seen})
    if not result.updated: ...          # NaN/Inf loss or a missing batch on some rank
    if result.flags["stop_usr1"]: ...   # set on some rank; the step itself was taken

`Trainer.train_step` (eagle_dist.engine.trainer), `eagle-dist bench step` and the test
harnesses call `run_step`, so what is timed and tested is what trains.

Everything the ranks must agree on travels in ONE all-reduce per step, after the forward: the
forward's scalars (averaged for logging), "this rank has no batch" (its data stream failed),
"this rank's loss is NaN/Inf" and the caller's flags (stop signals).  Each rank then takes the
same decision: update, or skip the update when any rank lacks a batch or has a non-finite loss.
A stop flag does not cancel the step: the update is taken and the caller stops after it, so a
checkpoint written then is a plain step boundary (resuming from it replays nothing).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from eagle_dist import profiling


@dataclass
class StepResult:
    """What every rank learned from the step's all-reduce (the same on every rank)."""

    metrics: dict[str, float]  # the forward's scalars, averaged over ranks (0 from a rank without a batch)
    flags: dict[str, bool] = field(default_factory=dict)  # the caller's flags: True if set on any rank
    missing_batch: bool = False  # some rank had no batch (its data stream failed): no update
    nonfinite: bool = False  # the loss was NaN/Inf on some rank: no update

    @property
    def updated(self) -> bool:
        return not (self.missing_batch or self.nonfinite)


def run_step(
    dist: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    forward: Callable[[dict, int], Mapping[str, torch.Tensor]],
    batch: dict | None,
    *,
    step: int,
    metric_names: Sequence[str],
    flags: Callable[[], Mapping[str, bool]] | None = None,
    grad_clip: float | None = None,
    scheduler: Any = None,
) -> StepResult:
    """Forward, agree, then backward, clip, optimizer (and scheduler) step; gradients are zeroed.

    dist: an `eagle_dist.distributed.Dist`.  forward(batch, step) returns scalar tensors keyed by
    `metric_names` (one of them "loss"); a rank whose stream failed passes batch=None and
    contributes zeros.  flags() is read after the forward, so a signal that arrives during
    the forward is in this step's vote.  grad_clip: None uses the Dist's own (setup's) value.

    The forward must not issue collectives (DDP module buffers, ZeRO-3 gathers): a rank without
    a batch does not run it.
    """
    names = list(metric_names)
    zero = torch.zeros((), dtype=torch.float64, device=dist.device)
    out, values, nonfinite = None, [zero] * len(names), zero
    if batch is not None:
        out = forward(batch, step)
        if set(out) != set(names):
            raise ValueError(f"the forward returned {sorted(out)}, but the step was told {sorted(names)}")
        values = [torch.as_tensor(out[name]).detach().to(dist.device, torch.float64).reshape(()) for name in names]
        nonfinite = (~torch.isfinite(out["loss"].detach())).to(torch.float64).reshape(())
    # `flags` is the callable; `raised` this rank's answers to it, in a fixed order.
    raised = dict(flags()) if flags is not None else {}
    missing = torch.tensor(float(batch is None), dtype=torch.float64, device=dist.device)
    local = torch.tensor([float(bool(v)) for v in raised.values()], dtype=torch.float64, device=dist.device)
    # A lone process has no collective to time (`bench step` reports no "comm" part then).
    with profiling.section("comm") if dist.world_size > 1 else contextlib.nullcontext():
        # Sums of 0/1 flags are > 0 iff any rank set them; float64 keeps the counts exact.
        agreed = dist.all_reduce_sum(torch.cat([torch.stack([missing, nonfinite, *values]), local])).tolist()
    result = StepResult(
        metrics={name: agreed[2 + i] / dist.world_size for i, name in enumerate(names)},
        flags={name: agreed[2 + len(names) + i] > 0 for i, name in enumerate(raised)},
        missing_batch=agreed[0] > 0,
        nonfinite=agreed[1] > 0,
    )
    if result.updated:
        assert out is not None  # updated: no rank, this one included, went without a batch
        with profiling.section("backward"):
            dist.backward(out["loss"])
        with profiling.section("optimizer"):
            dist.clip_grad(model, grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    with profiling.section("optimizer"):
        optimizer.zero_grad(set_to_none=True)
    return result
