"""Benchmarks: the training step with a breakdown, the EiCue eigensolvers, the data stream.

    python -m eagle_dist.bench step [key=value ...] [--warmup 2] [--steps 5] [--json step.json]
    python -m eagle_dist.bench step eicue.solver=krylov --json step_krylov.json
    python -m eagle_dist.bench step --batch-sizes 4,32 --large-steps 2 --json step_4_32.json
    python -m eagle_dist.bench eigen [--batch 16] [--side 28] [--repeats 7] [--json eigen.json]
    python -m eagle_dist.bench eigen --device cuda --batch 64 --cases model --solvers eigh,krylov
    python -m eagle_dist.bench data [...]            # delegates to eagle_dist.cli.bench_data
    python -m eagle_dist.bench gpu --json gpu.json   # the prepared GPU check (eagle_dist.cli.bench_gpu)
    torchrun --nproc_per_node 2 -m eagle_dist.bench step ...   # adds the communication share

``step`` builds the model from the config (defaults: the official COCO-Stuff-27 config,
ViT-S/8 at 224, batch 4 per process, random ViT weights unless ``model.weights`` is set), keeps one
synthetic batch in memory and times the whole training step (forward, backward, optimizer; the
all-reduces under ``torchrun``) after warm-up steps. It prints the median step time, images/s,
peak memory, the time of the backbone alone on the same two views and the ratio, and a
breakdown from the ``profiling.section`` marks of the model code (synchronised on CUDA through
events). The ``u`` switch is on (``--train-step`` past ``loss.step_schedulers``), so the step
includes the object-centric loss. The synthetic ``img_aug`` blurs the expected share
(``data.blur_p``) of the batch and carries the stream's ``aug_mask``, so the step runs the backbone
on about 1.5 batches (``backbone_passes_per_step``); "backbone only" stays both views in full.
``--batch-sizes 4,32`` repeats the benchmark per batch size and adds a per-component table.

``eigen`` compares batched ``torch.linalg.eigh`` (float32, float64) with the fast block Krylov
solver (:mod:`eagle_dist.method.eigensolvers`) on Laplacians built exactly as training builds them
(synthetic images of flat coloured regions plus noise -> random ViT -> seg head -> graph), on the
``rgb01`` colour graph, and on random block-model graphs with small eigengaps. Accuracy is
against float64 eigh: eigenvalue error, the sine of the largest principal angle between the
k-dimensional subspaces, the per-vector error, and the agreement of EiCue maps (eigen-probe
argmax with a fixed random probe, after the sign rule). Times are medians of interleaved runs.

Numbers depend on what else runs on the machine: both commands record the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from eagle_dist import profiling
from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD

from eagle_dist.method import eicue
from eagle_dist.config import ConfigError, load_config, to_dict

# Default per-process batch of the step benchmark (the throughput target is stated for batch 4).
DEFAULT_STEP_BATCH = 4
# Sections whose times add up to the forward pass; the rest of the step is named separately.
FORWARD_PARTS = ("backbone", "heads", "eicue", "corr", "nce", "probes")
STEP_PARTS = FORWARD_PARTS + ("backward", "optimizer", "comm")


# ----------------------------------------------------------------------------- shared helpers


def synthetic_images(batch: int, size: int, regions: int = 5, noise: float = 0.05,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """ImageNet-normalised pictures of ``regions`` flat-coloured Voronoi cells plus Gaussian noise:
    ``[batch, 3, size, size]`` (the kind of input the parity fixtures use)."""
    centres_BR2 = torch.rand(batch, regions, 2, generator=generator) * size
    colours_BR3 = torch.rand(batch, regions, 3, generator=generator)
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    dist_BRHW = (yy - centres_BR2[:, :, 0, None, None]) ** 2 + (xx - centres_BR2[:, :, 1, None, None]) ** 2
    cell_BHW = dist_BRHW.argmin(dim=1)
    rgb_BHW3 = torch.gather(colours_BR3, 1, cell_BHW.reshape(batch, -1, 1).expand(-1, -1, 3))
    rgb_B3HW = rgb_BHW3.reshape(batch, size, size, 3).permute(0, 3, 1, 2)
    rgb_B3HW = (rgb_B3HW + noise * torch.randn(rgb_B3HW.shape, generator=generator)).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((rgb_B3HW - mean) / std).contiguous()


def _blurred(img_B3HW: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    from eagle_dist.data.stream import gaussian_blur3

    return gaussian_blur3(img_B3HW, torch.full((img_B3HW.shape[0],), sigma))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return device


def _machine(device: torch.device) -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        print(f"wrote {path}")


def _median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ----------------------------------------------------------------------------- step


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the resident-set high-water mark of this process.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_rss_high_water"


def _step_setup(args: argparse.Namespace, cfg):
    """(dist, backbone, heads, optimizer, batch): the trainer's model on one synthetic batch."""
    from eagle_dist import distributed as dist_mod
    from eagle_dist.method.eagle import build_model, build_optimizer

    if args.device != "auto" and dist_mod.detect_launch().world_size == 1:
        device = _pick_device(args.device)
        if device.type == "cpu":
            os.environ["ACCELERATE_USE_CPU"] = "1"  # setup() then stays off the GPU
    # A lone process gets a world of one: the step below is the trainer's, collectives included.
    d = dist_mod.setup(strategy="ddp", mixed_precision=cfg.dist.mixed_precision, grad_clip=cfg.optim.grad_clip,
                       seed=cfg.train.seed, cpu_threads=args.threads or cfg.dist.cpu_threads)
    batch_size, device = cfg.data.batch_size, d.device
    # Random weights are expected here (speed does not depend on them): no warning.
    backbone, heads = build_model(cfg, device, quiet=True)
    if args.channels_last:
        heads = heads.to(memory_format=torch.channels_last)
    if args.compile:
        heads.seg_head = torch.compile(heads.seg_head)
    optimizer = build_optimizer(heads, cfg.optim, global_batch=batch_size * d.world_size)
    heads, optimizer = d.prepare(heads, optimizer)
    heads.train()

    gen = torch.Generator().manual_seed(cfg.train.seed + d.rank)
    img = synthetic_images(batch_size, cfg.data.resolution, generator=gen)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    # The stream blurs each image with probability data.blur_p; the benchmark blurs the expected
    # number (rounded half up) so that every timed step does the average backbone work.
    aug_mask = torch.arange(batch_size) < math.floor(cfg.data.blur_p * batch_size + 0.5)
    img_aug = img.clone()
    img_aug[aug_mask] = _blurred(img[aug_mask])
    batch = {
        "img": img.to(device).contiguous(memory_format=memory_format),
        "img_aug": img_aug.to(device).contiguous(memory_format=memory_format),
        "aug_mask": aug_mask.to(device),
        "label": torch.randint(-1, cfg.model.n_classes, (batch_size, cfg.data.resolution, cfg.data.resolution),
                               generator=gen).to(device),
    }
    return d, backbone, heads, optimizer, batch


def _breakdown(step_parts: list[dict], step_median: float, local_parts: list[dict] | None) -> dict:
    """Median seconds per part, parents in step order, each followed by its sub-sections."""
    seen = list(dict.fromkeys(name for parts in step_parts for name in parts))
    parents = [p for p in STEP_PARTS if p in seen] + [s for s in seen if "." not in s and s not in STEP_PARTS]
    ordered = [s for p in parents for s in [p, *(c for c in seen if c.startswith(p + "."))]]
    ordered += [s for s in seen if s not in ordered]
    breakdown = {name: _median([parts.get(name, 0.0) for parts in step_parts]) for name in ordered}
    if local_parts is not None:
        # DDP overlaps the gradient all-reduce with backward: what it costs is the backward time
        # with synchronisation minus the same backward under no_sync().
        backward_local = _median([p["backward"] for p in local_parts])
        breakdown["comm.grad_allreduce"] = max(0.0, breakdown["backward"] - backward_local)
        breakdown["comm"] = breakdown.get("comm", 0.0) + breakdown["comm.grad_allreduce"]
        breakdown["backward"] = backward_local
    breakdown["other"] = step_median - sum(breakdown.get(p, 0.0) for p in STEP_PARTS)
    return breakdown


def _backbone_only(d, backbone, batch: dict, warmup: int, steps: int) -> float:
    """Median time of the backbone alone on the step's two views (the ratio's denominator)."""
    times = []
    for _ in range(warmup + steps):
        _sync(d.device)
        t0 = time.perf_counter()
        with d.precision.context():
            backbone(batch["img"])
            backbone(batch["img_aug"])
        _sync(d.device)
        times.append(time.perf_counter() - t0)
    return _median(times[warmup:])


def run_step_bench(args: argparse.Namespace) -> dict | None:
    from eagle_dist.engine.step import run_step
    from eagle_dist.method.eagle import loss_names, momentum, training_step_losses

    try:
        cfg = load_config(None, [f"data.batch_size={DEFAULT_STEP_BATCH}", *args.overrides])
    except ConfigError as err:
        raise SystemExit(f"bench step: {err}") from None
    d, backbone, heads, optimizer, batch = _step_setup(args, cfg)
    device, passes = d.device, []
    u = momentum(cfg.loss, args.train_step, cfg.train.step_unit)  # the step index stays at --train-step

    def forward(batch_, _step):
        return training_step_losses(backbone, heads, batch_, u, precision=d.precision)

    def timed_steps(count: int, sync_grads: bool = True) -> tuple[list[float], list[dict]]:
        times, parts = [], []
        for _ in range(count):
            with profiling.recording(device) as rec:
                _sync(device)
                t0 = time.perf_counter()
                with contextlib.nullcontext() if sync_grads else heads.no_sync():
                    res = run_step(d, heads, optimizer, forward, batch, step=args.train_step,
                                   metric_names=loss_names(cfg.model), grad_clip=cfg.optim.grad_clip)
                passes.append(res.metrics["backbone_passes"])
                _sync(device)
                times.append(time.perf_counter() - t0)
                parts.append(rec.totals())
        return times, parts

    try:
        load_before = list(os.getloadavg())
        timed_steps(args.warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        passes.clear()
        step_times, step_parts = timed_steps(args.steps)
        passes_per_step = statistics.fmean(passes)
        peak_bytes, peak_kind = _peak_memory(device)
        step_median = _median(step_times)
        local_parts = timed_steps(max(2, args.steps // 2), sync_grads=False)[1] if d.distributed else None
        breakdown = _breakdown(step_parts, step_median, local_parts)

        backbone_only = _backbone_only(d, backbone, batch, args.warmup, args.steps)
        # Every rank measured its own step; the slowest rank's median sets the pace.
        slowest = float(d.all_reduce_max(torch.tensor(step_median, dtype=torch.float64, device=device)))
    finally:
        d.cleanup()

    result = {
        "command": "step",
        "step_median_s": step_median,
        "step_times_s": step_times,
        "backbone_only_s": backbone_only,
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
        "machine": {**_machine(device), "loadavg_before": load_before},
    }
    if d.world_size > 1:
        result["step_median_slowest_rank_s"] = slowest
    if not d.is_main:
        return None
    print(format_step(result))
    _write_json(args.json, result)
    return result


def run_step_sizes(args: argparse.Namespace) -> dict | None:
    """``bench step --batch-sizes 4,32``: the step benchmark at each batch size in one process,
    smallest first, then one per-component table.  Batch sizes after the smallest run
    ``--large-steps`` timed steps after one warm-up step.  The JSON holds the smallest size's
    result at the top level (the single-size layout) and every size under ``by_batch_size``,
    each with its own peak memory: on CUDA the peak is reset per size; on CPU it is the process's
    resident high-water mark, which only grows, hence smallest first.
    """
    from eagle_dist import distributed as dist_mod

    sizes = sorted(set(args.batch_sizes))
    if any(b < 1 for b in sizes):
        raise SystemExit(f"bench step: batch sizes must be >= 1, got {args.batch_sizes}")
    if len(sizes) > 1 and dist_mod.detect_launch().world_size > 1:
        raise SystemExit("bench step: --batch-sizes with several sizes runs in one process; "
                         "under torchrun pass one size (data.batch_size=N)")
    results = {}
    for i, size in enumerate(sizes):
        sub = argparse.Namespace(**vars(args))
        sub.overrides = [*args.overrides, f"data.batch_size={size}"]
        sub.json = None
        if i > 0:
            sub.steps, sub.warmup = args.large_steps, min(args.warmup, 1)
        results[size] = run_step_bench(sub)
    if any(r is None for r in results.values()):
        return None  # not the main process
    first = results[sizes[0]]
    combined = {**first, "batch_sizes": sizes, "by_batch_size": {str(b): r for b, r in results.items()}}
    combined["component_table"] = step_component_table(results)
    print(format_component_table(combined["component_table"], sizes))
    _write_json(args.json, combined)
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


# ----------------------------------------------------------------------------- eigen


def model_laplacians(batch: int, side: int, color_mode: str = "official", seed: int = 0,
                     backbone: str = "vit_small_patch8_224", views: bool = False,
                     device: torch.device | str = "cpu"):
    """Laplacians built the way training builds them, from a random ViT and a random seg head.

    Synthetic images (flat coloured regions plus noise) at ``side * patch`` pixels -> frozen ViT
    keys -> segmentation head (eval mode) -> ``normalized_laplacian(A_seg, A_color)``.
    Returns ``[B, side^2, side^2]``; with ``views=True`` also the Laplacians of the blurred images
    (the augmented view of the same pictures), as ``(lap_P, lap_A)``. The images are drawn on the
    CPU (the same pictures on every device); the ViT and the graph run on ``device``.
    """
    from eagle_dist.method.backbone import FrozenViT
    from eagle_dist.method.heads import SegHead

    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        vit = FrozenViT(backbone).to(device)
        head = SegHead(vit.out_channels).eval().to(device)
    img = synthetic_images(batch, side * vit.patch, generator=gen).to(device)

    @torch.no_grad()
    def laplacian(pixels):
        code_BDhw = head(vit(pixels))
        code_BND = code_BDhw.flatten(2).transpose(1, 2)
        color_BNN = eicue.color_affinity(eicue.resize_for_color(img, side, color_mode),
                                         scale=eicue._COLOR_SCALE[color_mode])
        return eicue.normalized_laplacian(eicue.semantic_affinity(code_BND), color_BNN)

    lap_P = laplacian(img)
    return (lap_P, laplacian(_blurred(img.cpu()).to(device))) if views else lap_P


def block_model_laplacians(batch: int, n: int, blocks: int, p_in: float, p_out: float, seed: int = 0) -> torch.Tensor:
    """Normalised Laplacians of random graphs from a stochastic block model with ``blocks`` equal
    blocks: eigenvalues 2..blocks are (nearly) repeated, so the eigengaps inside the wanted set,
    and between it and the rest, are small."""
    gen = torch.Generator().manual_seed(seed)
    block_N = torch.arange(n) * blocks // n
    prob_NN = torch.where(block_N[:, None] == block_N[None, :], p_in, p_out)
    upper = (torch.rand(batch, n, n, generator=gen) < prob_NN).float().triu(1)
    weights_BNN = upper + upper.mT
    return eicue.normalized_laplacian(weights_BNN, torch.zeros_like(weights_BNN))


def _orthonormal(vecs_BNk: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(vecs_BNk.double()).Q


def subspace_error(vecs_BNk: torch.Tensor, ref_BNk: torch.Tensor) -> torch.Tensor:
    """Sine of the largest principal angle between span(vecs) and span(ref), per image ``[B]``."""
    ours = _orthonormal(vecs_BNk)
    ref = _orthonormal(ref_BNk)
    return torch.linalg.matrix_norm(ours - ref @ (ref.mT @ ours), ord=2)


def align_columns(vecs_BNk: torch.Tensor, ref_BNk: torch.Tensor) -> torch.Tensor:
    """Flip each column to the sign of the reference's (the parity fixtures' rule)."""
    dots_Bk = (vecs_BNk.double() * ref_BNk.double()).sum(dim=1)
    signs_Bk = torch.where(dots_Bk < 0, -1.0, 1.0).to(vecs_BNk.dtype)
    return vecs_BNk * signs_Bk.unsqueeze(1)


def vector_errors(vecs_BNk: torch.Tensor, ref_BNk: torch.Tensor) -> torch.Tensor:
    """Per eigenvector ``|v - v_ref|`` after sign alignment and normalisation: ``[B, k]``."""
    ours = align_columns(vecs_BNk, ref_BNk).double()
    ours = ours / ours.norm(dim=1, keepdim=True)
    return (ours - ref_BNk.double()).norm(dim=1)


def eicue_map(vecs_BNk: torch.Tensor, centroids_C3: torch.Tensor) -> torch.Tensor:
    """EiCue map ids ``[B, N]``: sign rule, drop the trivial vector, cosine argmax over a probe."""
    spectral_BNj = eicue.apply_sign_rule(vecs_BNk.float())[:, :, 1:]
    unit_BNj = torch.nn.functional.normalize(spectral_BNj, dim=2)
    unit_Cj = torch.nn.functional.normalize(centroids_C3.float(), dim=1)
    return (unit_BNj @ unit_Cj.T).argmax(dim=2)


def _solver_table(k: int, block: int, max_steps: int, tol: float):
    from eagle_dist.method.eigensolvers import block_krylov_smallest

    def eigh_fn(dtype):
        def solve(lap, init=None):
            vals, vecs = torch.linalg.eigh(lap.to(dtype), UPLO="U")
            return vals[:, :k].float(), vecs[:, :, :k].float(), None
        return solve

    def krylov(lap, init=None):
        vals, vecs, info = block_krylov_smallest(lap, k, block=block, max_steps=max_steps, tol=tol, init=init,
                                                 return_info=True)
        return vals, vecs, info

    return {"eigh": eigh_fn(torch.float32), "eigh64": eigh_fn(torch.float64), "krylov": krylov}


def _compare_case(lap: torch.Tensor, solvers: dict, repeats: int, centroids: torch.Tensor,
                  k: int, init: torch.Tensor | None = None) -> dict:
    """Time every solver on ``lap`` (interleaved repeats, medians) and score it against float64 eigh."""
    vals64, vecs64 = torch.linalg.eigh(lap.double(), UPLO="U")
    ref_vals, ref_vecs = vals64[:, :k], vecs64[:, :, :k]
    ref_map = eicue_map(ref_vecs, centroids)
    lam = vals64[:, : k + 1]
    # Gap of each wanted eigenvalue to its nearest neighbour (per-vector conditioning), and the
    # gap between the k-th and (k+1)-th (subspace conditioning).
    neighbours = torch.cat([torch.full_like(lam[:, :1], float("inf")), lam, torch.full_like(lam[:, :1], float("inf"))], 1)
    own_gap = torch.minimum(neighbours[:, 1:k + 1] - neighbours[:, :k], neighbours[:, 2:k + 2] - neighbours[:, 1:k + 1])

    runs = {s: [] for s in solvers}
    outputs = {}
    for s, fn in solvers.items():  # warm-up (allocations, first-call overheads)
        outputs[s] = fn(lap, init if s.endswith("warm") else None)
    for _ in range(repeats):
        for s, fn in solvers.items():
            _sync(lap.device)  # on CUDA a solver's time is its kernels' time, not the launches'
            t0 = time.perf_counter()
            fn(lap, init if s.endswith("warm") else None)
            _sync(lap.device)
            runs[s].append(time.perf_counter() - t0)

    case = {
        "batch": lap.shape[0], "n": lap.shape[1], "k": k,
        "eigengap_k_k1_min": float((lam[:, k] - lam[:, k - 1]).min()),
        "eigengap_within_min": float(own_gap[:, 1:].min()) if k > 1 else float("nan"),
        "eigenvalues_first": vals64[:, : k + 2].tolist(),
        "solvers": {},
    }
    base = _median(runs["eigh"]) if "eigh" in runs else float("nan")
    for s, (vals, vecs, info) in outputs.items():
        verr_Bk = vector_errors(vecs, ref_vecs)
        aligned = align_columns(vecs, ref_vecs)
        entry = {
            "time_s": _median(runs[s]),
            "times_s": runs[s],
            "speedup_vs_eigh_fp32": base / _median(runs[s]),
            "max_eigenvalue_err": float((vals.double() - ref_vals).abs().max()),
            "max_subspace_err": float(subspace_error(vecs, ref_vecs).max()),
            "max_vector_err": float(verr_Bk.max()),
            "max_vector_err_per_column": verr_Bk.amax(dim=0).tolist(),
            "map_agreement": float((eicue_map(aligned, centroids) == ref_map).double().mean()),
            "map_agreement_raw_signs": float((eicue_map(vecs, centroids) == ref_map).double().mean()),
        }
        if info is not None:
            entry["krylov_steps"] = info["steps"].tolist()
            entry["krylov_converged"] = bool(info["converged"].all())
        case["solvers"][s] = entry
    return case


def run_eigen_bench(args: argparse.Namespace) -> dict:
    from eagle_dist.method.eigensolvers import DEFAULT_BLOCK, DEFAULT_MAX_STEPS, DEFAULT_TOL

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _pick_device(args.device)
    k = args.k
    n = args.side * args.side
    gen = torch.Generator().manual_seed(args.seed)
    centroids = torch.randn(args.clusters, k - 1, generator=gen).to(device)  # a fixed random eigen probe
    block = args.block or DEFAULT_BLOCK
    max_steps = args.max_steps if args.max_steps is not None else DEFAULT_MAX_STEPS
    tol = args.tol if args.tol is not None else DEFAULT_TOL
    solvers = _solver_table(k, block, max_steps, tol)
    chosen = {s: solvers[s] for s in args.solvers.split(",") if s}
    unknown = set(args.solvers.split(",")) - set(solvers) - {""}
    if unknown:
        raise SystemExit(f"bench eigen: unknown solver(s) {sorted(unknown)}; choose from {sorted(solvers)}")
    if "eigh" not in chosen:
        chosen = {"eigh": solvers["eigh"], **chosen}  # the speed-up is quoted against it

    load_before = list(os.getloadavg())
    cases = {}
    for case in args.cases.split(","):
        t0 = time.perf_counter()
        if case == "model":
            lap_P, lap_A = model_laplacians(args.batch, args.side, "official", args.seed, views=True, device=device)
            cases["model"] = _compare_case(lap_P, chosen, args.repeats, centroids, k)
            # Warm start: the augmented view's graph solved from the plain view's vectors, as a
            # training step could (both views' graphs are built in the same step).
            warm = {**chosen, "krylov_warm": chosen.get("krylov", solvers["krylov"])}
            init = solvers["eigh"](lap_P)[1]
            cases["model_aug_view"] = _compare_case(lap_A, warm, args.repeats, centroids, k, init)
        elif case == "model_rgb01":
            lap = model_laplacians(args.batch, args.side, "rgb01", args.seed, device=device)
            cases[case] = _compare_case(lap, chosen, args.repeats, centroids, k)
        elif case == "sbm":
            # k - 1 equal communities: the wanted eigenvalues 2..k form one near-degenerate cluster.
            lap = block_model_laplacians(args.batch, n, k, 0.5, 0.3, args.seed).to(device)
            cases[case] = _compare_case(lap, chosen, args.repeats, centroids, k)
        elif case == "sbm_gap":
            # k communities: eigenvalue k sits next to k+1 (a small gap at the edge of the subspace).
            lap = block_model_laplacians(args.batch, n, k + 1, 0.5, 0.3, args.seed).to(device)
            cases[case] = _compare_case(lap, chosen, args.repeats, centroids, k)
        else:
            raise SystemExit(f"bench eigen: unknown case {case!r}; choose from model, model_rgb01, sbm, sbm_gap")
        print(f"  [{case}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)

    primary = cases.get("model") or next(iter(cases.values()))
    fast = primary["solvers"].get("krylov")
    targets = None
    if fast is not None:
        targets = {
            "speedup_vs_eigh_fp32": fast["speedup_vs_eigh_fp32"],
            "speedup_ge_20": fast["speedup_vs_eigh_fp32"] >= 20.0,
            "subspace_err_le_1e-3": fast["max_subspace_err"] <= 1e-3,
            "map_agreement_ge_0.99": fast["map_agreement"] >= 0.99,
        }
    result = {
        "command": "eigen",
        "batch": args.batch, "n": n, "k": k, "repeats": args.repeats,
        "krylov": {"block": block, "max_steps": max_steps, "tol": tol},
        "solvers": primary["solvers"],
        "cases": cases,
        "targets_on_model_case": targets,
        "machine": {**_machine(device), "loadavg_before": load_before},
    }
    if device.type == "cuda":
        result["peak_memory_bytes"], result["peak_memory_kind"] = _peak_memory(device)
    print(format_eigen(result))
    _write_json(args.json, result)
    return result


def format_eigen(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"eigen benchmark: {r['batch']} x {r['n']} x {r['n']}, k={r['k']}, medians of {r['repeats']} interleaved "
        f"runs, threads={m['torch_threads']}, load {m['loadavg_before'][0]:.2f} -> {m['loadavg_1_5_15'][0]:.2f}",
    ]
    head = (f"    {'solver':<12}{'time ms':>9}{'speedup':>9}{'eigval err':>12}{'subspace':>10}"
            f"{'vector':>10}{'map agr':>9}{'raw sign':>9}")
    for name, case in r["cases"].items():
        lines.append(f"  {name}: gap(k,k+1) >= {case['eigengap_k_k1_min']:.2e}, "
                     f"smallest gap inside the wanted pairs {case['eigengap_within_min']:.2e}")
        lines.append(head)
        for s, e in case["solvers"].items():
            lines.append(
                f"    {s:<12}{1e3 * e['time_s']:9.2f}{e['speedup_vs_eigh_fp32']:8.1f}x{e['max_eigenvalue_err']:12.1e}"
                f"{e['max_subspace_err']:10.1e}{e['max_vector_err']:10.1e}{100 * e['map_agreement']:8.2f}%"
                f"{100 * e['map_agreement_raw_signs']:8.2f}%"
                + (f"  steps {min(e['krylov_steps'])}-{max(e['krylov_steps'])}" if "krylov_steps" in e else "")
            )
    if r["targets_on_model_case"]:
        t = r["targets_on_model_case"]
        lines.append(
            f"  targets (model case, krylov): speed-up {t['speedup_vs_eigh_fp32']:.1f}x >= 20: {t['speedup_ge_20']}; "
            f"subspace error <= 1e-3: {t['subspace_err_le_1e-3']}; map agreement >= 99 %: {t['map_agreement_ge_0.99']}"
        )
    lines.append("  (errors are against float64 eigh; 'map agr' aligns each column's sign to it first, "
                 "'raw sign' keeps the solver's own signs)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


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


def _eigen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eagle_dist.bench eigen",
                                description="Compare eigensolvers on EiCue Laplacians.")
    p.add_argument("--batch", type=int, default=16, help="Laplacians per batch (default 16)")
    p.add_argument("--side", type=int, default=28, help="token grid side: N = side^2 (default 28 -> 784)")
    p.add_argument("--k", type=int, default=4, help="eigenpairs kept (default 4, as EiCue)")
    p.add_argument("--clusters", type=int, default=32, help="centroids of the random eigen probe (default 32)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per solver, interleaved (default 7)")
    p.add_argument("--solvers", default="eigh,eigh64,krylov", help="comma list of eigh, eigh64, krylov")
    p.add_argument("--cases", default="model,model_rgb01,sbm,sbm_gap",
                   help="comma list of model (with its augmented view), model_rgb01, sbm, sbm_gap")
    p.add_argument("--block", type=int, default=0, help="Krylov block width (0: the solver default)")
    p.add_argument("--max-steps", type=int, default=None, help="Krylov step cap (default: the solver default)")
    p.add_argument("--tol", type=float, default=None, help="Krylov tolerance (default: the solver default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: where the Laplacians are built and solved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result to this JSON file")
    return p


USAGE = """usage: python -m eagle_dist.bench {step,eigen,data,gpu} [options]

  step    time the full training step with a breakdown      (python -m eagle_dist.bench step --help)
  eigen   compare EiCue eigensolvers (speed and accuracy)   (python -m eagle_dist.bench eigen --help)
  data    shard build and stream throughput                 (python -m eagle_dist.bench data --help)
  gpu     the prepared GPU check, one JSON                   (python -m eagle_dist.bench gpu --help)"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "step":
        args = _step_parser().parse_args(rest)
        if args.steps < 1 or args.warmup < 0 or args.large_steps < 1:
            raise SystemExit("bench step: --steps and --large-steps must be >= 1 and --warmup >= 0")
        if args.batch_sizes:
            run_step_sizes(args)
        else:
            run_step_bench(args)
        return 0
    if command == "eigen":
        args = _eigen_parser().parse_args(rest)
        if args.k < 2 or args.repeats < 1 or args.batch < 1:
            raise SystemExit("bench eigen: need --k >= 2, --repeats >= 1 and --batch >= 1")
        run_eigen_bench(args)
        return 0
    if command == "gpu":
        from eagle_dist.cli import bench_gpu

        return bench_gpu.main(rest)
    if command == "data":
        try:
            bench_data = importlib.import_module("eagle_dist.cli.bench_data")
        except ModuleNotFoundError as err:
            if err.name != "eagle_dist.cli.bench_data":
                raise
            print("bench data: eagle_dist.cli.bench_data is not installed in this checkout "
                  "(the data benchmark lives there); update the checkout or run the step/eigen benchmarks",
                  file=sys.stderr)
            return 2
        return int(bench_data.main(rest) or 0)
    print(f"unknown benchmark {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
