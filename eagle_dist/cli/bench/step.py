"""`bench step`: the whole training step (`engine.step.run_step` on the model of `build_model`),
timed after warm-up steps, with a per-component breakdown.

    python -m eagle_dist.bench step [key=value ...] [--warmup 2] [--steps 5] [--json step.json]
    python -m eagle_dist.bench step eicue.solver=krylov --json step_krylov.json
    python -m eagle_dist.bench step --batch-sizes 4,32 --large-steps 2 --json step_4_32.json
    torchrun --nproc_per_node 2 -m eagle_dist.bench step ...   # adds the communication share

It builds the model from the config (defaults: the official COCO-Stuff-27 config, ViT-S/8 at
224, batch 4 per process, random ViT weights unless ``model.weights`` is set), keeps one
synthetic batch in memory and times the whole training step (forward, backward, optimizer; the
all-reduces under ``torchrun``). It prints the median step time, images/s, peak memory, the
time of the backbone alone on the same two views (timed before each step, interleaved with
the steps) and the ratio, and a breakdown from the
``profiling.section`` marks of the model code (synchronised on CUDA through events). The ``u``
switch is on (``--train-step`` past ``loss.step_schedulers``), so the step includes the
object-centric loss. The synthetic ``img_aug`` blurs the expected share (``data.blur_p``) of the
batch and carries the stream's ``aug_mask``, so the step runs the backbone on about 1.5 batches
(``backbone_passes_per_step``); "backbone only" stays both views in full. ``--batch-sizes 4,32``
repeats the benchmark per batch size and adds a per-component table.

Numbers depend on what else runs on the machine: the result records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from typing import Any

import torch

from eagle_dist import profiling
from eagle_dist.cli.bench.synth import (
    blurred,
    machine,
    median,
    peak_memory,
    pick_device,
    sync,
    synthetic_images,
    write_json,
)
from eagle_dist.config import ConfigError, load_config, to_dict
from eagle_dist.distributed import detect_launch, setup
from eagle_dist.engine.step import run_step
from eagle_dist.method.eagle import build_model, build_optimizer, loss_names, momentum, training_step_losses

# Default per-process batch of the step benchmark (the throughput target is stated for batch 4).
DEFAULT_STEP_BATCH = 4
# Sections whose times add up to the forward pass; the rest of the step is named separately.
FORWARD_PARTS = ("backbone", "heads", "eicue", "corr", "nce", "probes")
STEP_PARTS = FORWARD_PARTS + ("backward", "optimizer", "comm")


def step_setup(cfg, device: str = "auto", threads: int = 0, channels_last: bool = False,
               compile: bool = False):
    """(dist, backbone, heads, optimizer, batch): the trainer's model (`build_model`) on one
    synthetic batch, under a `Dist` (a lone process gets a world of one, so `run_step`'s
    collectives are the trainer's).  The caller owns `dist.cleanup()`."""
    if device != "auto" and detect_launch().world_size == 1:
        if pick_device(device).type == "cpu":
            os.environ["ACCELERATE_USE_CPU"] = "1"  # setup() then stays off the GPU
    d = setup(strategy="ddp", mixed_precision=cfg.dist.mixed_precision, grad_clip=cfg.optim.grad_clip,
              seed=cfg.train.seed, cpu_threads=threads or cfg.dist.cpu_threads, cpu_allocator=cfg.dist.cpu_allocator)
    batch_size = cfg.data.batch_size
    # Random weights are expected here (speed does not depend on them): no warning.
    backbone, built = build_model(cfg, d.device, quiet=True)
    heads: Any = built  # .to(memory_format=...) and torch.compile are beyond torch's stubs
    if channels_last:
        heads = heads.to(memory_format=torch.channels_last)
    if compile:
        heads.seg_head = torch.compile(heads.seg_head)
    optimizer = build_optimizer(heads, cfg.optim, global_batch=batch_size * d.world_size)
    heads, optimizer = d.prepare(heads, optimizer)
    heads.train()

    gen = torch.Generator().manual_seed(cfg.train.seed + d.rank)
    img = synthetic_images(batch_size, cfg.data.resolution, generator=gen)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # The stream blurs each image with probability data.blur_p; the benchmark blurs the expected
    # number (rounded half up) so that every timed step does the average backbone work.
    aug_mask = torch.arange(batch_size) < math.floor(cfg.data.blur_p * batch_size + 0.5)
    img_aug = img.clone()
    img_aug[aug_mask] = blurred(img[aug_mask])
    batch = {
        "img": img.to(d.device).contiguous(memory_format=memory_format),
        "img_aug": img_aug.to(d.device).contiguous(memory_format=memory_format),
        "aug_mask": aug_mask.to(d.device),
        "label": torch.randint(-1, cfg.model.n_classes, (batch_size, cfg.data.resolution, cfg.data.resolution),
                               generator=gen).to(d.device),
    }
    return d, backbone, heads, optimizer, batch


def step_forward(cfg, d, backbone, heads, train_step: int):
    """The trainer's forward at global step `train_step` (the loss's `u` switch follows it)."""
    u = momentum(cfg.loss, train_step, cfg.train.step_unit)

    def forward(batch, _step):
        return training_step_losses(backbone, heads, batch, u, precision=d.precision)

    return forward


def _breakdown(step_parts: list[dict], step_median: float, local_parts: list[dict] | None) -> dict:
    """Median seconds per part, parents in step order, each followed by its sub-sections."""
    seen = list(dict.fromkeys(name for parts in step_parts for name in parts))
    parents = [p for p in STEP_PARTS if p in seen] + [s for s in seen if "." not in s and s not in STEP_PARTS]
    ordered = [s for p in parents for s in [p, *(c for c in seen if c.startswith(p + "."))]]
    ordered += [s for s in seen if s not in ordered]
    breakdown = {name: median([parts.get(name, 0.0) for parts in step_parts]) for name in ordered}
    if local_parts is not None:
        # DDP overlaps the gradient all-reduce with backward: what it costs is the backward time
        # with synchronisation minus the same backward under no_sync().
        backward_local = median([p["backward"] for p in local_parts])
        breakdown["comm.grad_allreduce"] = max(0.0, breakdown["backward"] - backward_local)
        breakdown["comm"] = breakdown.get("comm", 0.0) + breakdown["comm.grad_allreduce"]
        breakdown["backward"] = backward_local
    breakdown["other"] = step_median - sum(breakdown.get(p, 0.0) for p in STEP_PARTS)
    return breakdown


def _backbone_only(d, backbone, batch: dict) -> float:
    """Seconds of the backbone alone on the step's two views (the ratio's denominator)."""
    sync(d.device)
    t0 = time.perf_counter()
    with d.precision.context():
        backbone(batch["img"])
        backbone(batch["img_aug"])
    sync(d.device)
    return time.perf_counter() - t0


def run_step_bench(args: argparse.Namespace) -> dict | None:
    try:
        cfg = load_config(None, [f"data.batch_size={DEFAULT_STEP_BATCH}", *args.overrides])
    except ConfigError as err:
        raise SystemExit(f"bench step: {err}") from None
    d, backbone, heads, optimizer, batch = step_setup(cfg, args.device, args.threads, args.channels_last,
                                                      args.compile)
    device, passes = d.device, []
    forward = step_forward(cfg, d, backbone, heads, args.train_step)  # the step index stays at --train-step

    backbone_times: list[float] = []

    def timed_steps(count: int, sync_grads: bool = True, backbone_too: bool = False) -> tuple[list[float], list[dict]]:
        times, parts = [], []
        for _ in range(count):
            if backbone_too:
                # The ratio's denominator, timed between the steps: a drift of the machine's speed
                # (it moves by several per cent within minutes) then touches both sides alike.
                backbone_times.append(_backbone_only(d, backbone, batch))
            with profiling.recording(device) as rec:
                sync(device)
                t0 = time.perf_counter()
                with contextlib.nullcontext() if sync_grads else heads.no_sync():
                    res = run_step(d, heads, optimizer, forward, batch, step=args.train_step,
                                   metric_names=loss_names(cfg.model), grad_clip=cfg.optim.grad_clip)
                passes.append(res.metrics["backbone_passes"])
                sync(device)
                times.append(time.perf_counter() - t0)
                parts.append(rec.totals())
        return times, parts

    try:
        load_before = list(os.getloadavg())
        timed_steps(args.warmup, backbone_too=True)
        backbone_times.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        passes.clear()
        step_times, step_parts = timed_steps(args.steps, backbone_too=True)
        passes_per_step = statistics.fmean(passes)
        peak_bytes, peak_kind = peak_memory(device)
        step_median = median(step_times)
        local_parts = timed_steps(max(2, args.steps // 2), sync_grads=False)[1] if d.distributed else None
        breakdown = _breakdown(step_parts, step_median, local_parts)

        backbone_only = median(backbone_times)
        # Every rank measured its own step; the slowest rank's median sets the pace.
        slowest = float(d.all_reduce_max(torch.tensor(step_median, dtype=torch.float64, device=device)))
    finally:
        d.cleanup()

    result = {
        "command": "step",
        "step_median_s": step_median,
        "step_times_s": step_times,
        "backbone_only_s": backbone_only,
        "backbone_only_times_s": backbone_times,
        "ratio": step_median / backbone_only,
        "backbone_passes_per_step": passes_per_step,
        "images_per_s": cfg.data.batch_size * d.world_size / step_median,
        "images_per_s_per_process": cfg.data.batch_size / step_median,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak_kind,
        "breakdown": breakdown,
        "world_size": d.world_size,
        "mixed_precision": d.precision.mode,
        "batch_size_per_process": cfg.data.batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "train_step": args.train_step,
        "options": {"channels_last": args.channels_last, "compile": args.compile},
        "overrides": list(args.overrides),
        "config": to_dict(cfg),
        "machine": {**machine(device), "loadavg_before": load_before},
    }
    if d.world_size > 1:
        result["step_median_slowest_rank_s"] = slowest
    if not d.is_main:
        return None
    print(format_step(result))
    write_json(args.json, result)
    return result


def run_step_sizes(args: argparse.Namespace) -> dict | None:
    """``bench step --batch-sizes 4,32``: the step benchmark at each batch size in one process,
    smallest first, then one per-component table.  Batch sizes after the smallest run
    ``--large-steps`` timed steps after one warm-up step.  The JSON holds the smallest size's
    result at the top level (the single-size layout) and every size under ``by_batch_size``,
    each with its own peak memory: on CUDA the peak is reset per size; on CPU it is the process's
    resident high-water mark, which only grows, hence smallest first.
    """
    sizes = sorted(set(args.batch_sizes))
    if any(b < 1 for b in sizes):
        raise SystemExit(f"bench step: batch sizes must be >= 1, got {args.batch_sizes}")
    if len(sizes) > 1 and detect_launch().world_size > 1:
        raise SystemExit("bench step: --batch-sizes with several sizes runs in one process; "
                         "under torchrun pass one size (data.batch_size=N)")
    results: dict[int, dict | None] = {}
    for i, size in enumerate(sizes):
        sub = argparse.Namespace(**vars(args))
        sub.overrides = [*args.overrides, f"data.batch_size={size}"]
        sub.json = None
        if i > 0:
            sub.steps, sub.warmup = args.large_steps, min(args.warmup, 1)
        results[size] = run_step_bench(sub)
    done = {b: r for b, r in results.items() if r is not None}
    if len(done) < len(results):
        return None  # not the main process
    first = done[sizes[0]]
    combined = {**first, "batch_sizes": sizes, "by_batch_size": {str(b): r for b, r in done.items()}}
    combined["component_table"] = step_component_table(done)
    print(format_component_table(combined["component_table"], sizes))
    write_json(args.json, combined)
    return combined


def step_component_table(results: dict[int, dict]) -> dict[str, dict[str, float]]:
    """``{row: {batch size: value}}``: top-level parts of the step (median s), the step, the
    backbone alone on two full views, the ratio, backbone passes and peak memory (MiB)."""
    table: dict[str, dict[str, float]] = {}
    names = list(dict.fromkeys(n for r in results.values() for n in r["breakdown"] if "." not in n))
    for name in names:
        table[name] = {str(b): r["breakdown"].get(name, 0.0) for b, r in results.items()}
    for key, row in (("step_median_s", "step"), ("backbone_only_s", "backbone only (2 full views)"),
                     ("ratio", "ratio step / backbone only"), ("backbone_passes_per_step", "backbone passes")):
        table[row] = {str(b): r[key] for b, r in results.items()}
    table["peak memory MiB"] = {str(b): r["peak_memory_bytes"] / 2**20 for b, r in results.items()}
    table["timed steps"] = {str(b): float(r["steps"]) for b, r in results.items()}
    return table


def format_component_table(table: dict[str, dict[str, float]], sizes: list[int]) -> str:
    lines = ["per-component medians (s per step) by batch size:",
             "  " + f"{'part':<30}" + "".join(f"{'batch ' + str(b):>12}" for b in sizes)]
    for name, row in table.items():
        lines.append("  " + f"{name:<30}" + "".join(f"{row.get(str(b), float('nan')):12.3f}" for b in sizes))
    return "\n".join(lines)


def format_step(r: dict) -> str:
    cfg = r["config"]
    lines = [
        f"step benchmark: {cfg['model']['backbone']} {cfg['data']['resolution']}px, batch "
        f"{r['batch_size_per_process']} x {r['world_size']} process(es), solver={cfg['eicue']['solver']}, "
        f"mixed_precision={r['mixed_precision']}, "
        f"device={r['machine']['device']}, threads={r['machine']['torch_threads']}, "
        f"load {r['machine']['loadavg_before'][0]:.2f} -> {r['machine']['loadavg_1_5_15'][0]:.2f}",
        f"  step median      {r['step_median_s']:8.3f} s   ({r['images_per_s']:.2f} images/s, "
        f"{r['steps']} steps after {r['warmup']} warm-up)",
        f"  backbone only    {r['backbone_only_s']:8.3f} s   (the same two views)",
        f"  ratio            {r['ratio']:8.3f}     (step / backbone only)",
        f"  backbone passes  {r['backbone_passes_per_step']:8.3f}     per step (1 + the blurred share of img_aug)",
        f"  peak memory      {r['peak_memory_bytes'] / 2**20:8.0f} MiB ({r['peak_memory_kind']})",
        "  breakdown (median s per step, share of the step):",
    ]
    total = r["step_median_s"]
    for name, seconds in r["breakdown"].items():
        indent = "      " if "." in name else "    "
        lines.append(f"{indent}{name:<22}{seconds:8.3f}  {100 * seconds / total:5.1f} %")
    return "\n".join(lines)


def _step_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eagle_dist.bench step",
                                description="Time the full training step, with a breakdown.")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=8 eicue.solver=krylov")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",") if x], default=None,
                   help="comma list, e.g. 4,32: run at each per-process batch size (overrides data.batch_size) "
                        "and print a per-component table; one process only")
    p.add_argument("--large-steps", type=int, default=2,
                   help="timed steps for the batch sizes after the smallest of --batch-sizes (default 2)")
    p.add_argument("--train-step", type=int, default=1000,
                   help="global step index passed to the loss (default 1000: past the u switch, NCE on)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (single process)")
    p.add_argument("--channels-last", action="store_true", help="heads and inputs in channels-last layout")
    p.add_argument("--compile", action="store_true", help="torch.compile the segmentation head")
    p.add_argument("--json", help="write the result to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _step_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.large_steps < 1:
        raise SystemExit("bench step: --steps and --large-steps must be >= 1 and --warmup >= 0")
    if args.batch_sizes:
        run_step_sizes(args)
    else:
        run_step_bench(args)
    return 0
