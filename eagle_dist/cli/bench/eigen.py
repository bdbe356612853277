"""`bench eigen`: the EiCue eigensolvers on the Laplacians training builds, speed and accuracy.

    python -m eagle_dist.bench eigen [--batch 16] [--side 28] [--repeats 7] [--json eigen.json]
    python -m eagle_dist.bench eigen --device cuda --batch 64 --cases model --solvers eigh,krylov

It compares batched ``torch.linalg.eigh`` (float32, float64) with the fast block Krylov solver
(:mod:`eagle_dist.method.eigensolvers`) on Laplacians built exactly as training builds them
(synthetic images of flat coloured regions plus noise -> random ViT -> seg head -> graph), on the
``rgb01`` colour graph, and on random block-model graphs with small eigengaps. Accuracy is
against float64 eigh: eigenvalue error, the sine of the largest principal angle between the
k-dimensional subspaces, the per-vector error, and the agreement of EiCue maps (eigen-probe
argmax with a fixed random probe, after the sign rule). Times are medians of interleaved runs.

Numbers depend on what else runs on the machine: the result records the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

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
from eagle_dist.method import eicue
from eagle_dist.method.backbone import FrozenViT
from eagle_dist.method.eigensolvers import DEFAULT_BLOCK, DEFAULT_MAX_STEPS, DEFAULT_TOL, block_krylov_smallest
from eagle_dist.method.heads import SegHead


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
    return (lap_P, laplacian(blurred(img.cpu()).to(device))) if views else lap_P


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

    runs: dict[str, list[float]] = {s: [] for s in solvers}
    outputs = {}
    for s, fn in solvers.items():  # warm-up (allocations, first-call overheads)
        outputs[s] = fn(lap, init if s.endswith("warm") else None)
    for _ in range(repeats):
        for s, fn in solvers.items():
            sync(lap.device)  # on CUDA a solver's time is its kernels' time, not the launches'
            t0 = time.perf_counter()
            fn(lap, init if s.endswith("warm") else None)
            sync(lap.device)
            runs[s].append(time.perf_counter() - t0)

    case = {
        "batch": lap.shape[0], "n": lap.shape[1], "k": k,
        "eigengap_k_k1_min": float((lam[:, k] - lam[:, k - 1]).min()),
        "eigengap_within_min": float(own_gap[:, 1:].min()) if k > 1 else float("nan"),
        "eigenvalues_first": vals64[:, : k + 2].tolist(),
        "solvers": {},
    }
    base = median(runs["eigh"]) if "eigh" in runs else float("nan")
    for s, (vals, vecs, info) in outputs.items():
        verr_Bk = vector_errors(vecs, ref_vecs)
        aligned = align_columns(vecs, ref_vecs)
        entry = {
            "time_s": median(runs[s]),
            "times_s": runs[s],
            "speedup_vs_eigh_fp32": base / median(runs[s]),
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
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
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
        "machine": {**machine(device), "loadavg_before": load_before},
    }
    if device.type == "cuda":
        result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory(device)
    print(format_eigen(result))
    write_json(args.json, result)
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


def main(argv: list[str] | None = None) -> int:
    args = _eigen_parser().parse_args(argv)
    if args.k < 2 or args.repeats < 1 or args.batch < 1:
        raise SystemExit("bench eigen: need --k >= 2, --repeats >= 1 and --batch >= 1")
    run_eigen_bench(args)
    return 0
