"""`bench components`: the object-centric InfoNCE (with the projection and the kappa Gram) and
the correspondence loss, ours against the official modules, on the same inputs.

    python -m eagle_dist.bench components --batch-sizes 4,8,32 --json components.json
    EAGLE_REF_DIR=$REF/src_EAGLE python -m eagle_dist.bench components --batch-sizes 4,8,32 \\
        --official-python $REF/venv/bin/python --reference-harness ../shared/reference --json components.json

Each part is timed forward (what the official harness's categories time: wall clock around the
calls) and backward (the gradient of its loss into the codes), median of ``--reps`` after one
warm-up.  With ``--official-python`` the official side runs in that interpreter (the reference
environment of ``../shared/reference/README.md``, which imports the unmodified official tree
through its ``ref_env.py``), as a child process per batch size and round, alternating with
ours: rounds of (ours, official) at each batch size.  This file is that child too
(``--side official``); it imports only torch and, on our side, ``eagle_dist.method``.

What each side runs, per batch size B (inputs: keys ``[B, 1152, 28, 28]`` for the three views,
codes ``[B, 512, 28, 28]`` with gradient, EiCue ids in 32 clusters, all drawn from ``--seed``):

* nce, ours: ``ProjectionHead`` on two views, ``key_similarity_weights`` on two views, two
  ``object_centric_nce`` calls (prototype centroids, the COCO settings);
  official: ``project_head`` + normalise on two views, the two ``corr_feats`` Gram matrices of
  ``training_step`` (matmul + normalise), two ``newLocalGlobalInfoNCE`` calls;
* corr, ours: ``correspondence_loss``; official: ``CorrespondenceLoss.forward`` plus the means
  the step takes of its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

KEY_CHANNELS, CODE_DIM, SIDE, EIGEN_CLUSTERS = 1152, 512, 28, 32
PARTS = ("nce", "corr")


def inputs(batch: int, seed: int) -> dict:
    """The same tensors on both sides (same torch, same generator calls)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    keys = {view: randn(batch, KEY_CHANNELS, SIDE, SIDE) for view in ("x", "p", "a")}
    codes = {view: randn(batch, CODE_DIM, SIDE, SIDE) for view in ("x", "p", "a")}
    maps = {view: torch.randint(0, EIGEN_CLUSTERS, (batch, SIDE, SIDE), generator=gen) for view in ("p", "a")}
    projection = torch.nn.Linear(CODE_DIM, CODE_DIM)
    with torch.no_grad():
        projection.weight.copy_(randn(CODE_DIM, CODE_DIM) / CODE_DIM ** 0.5)
        projection.bias.copy_(randn(CODE_DIM) * 0.01)
    return {"keys": keys, "codes": codes, "maps": maps, "projection": projection}


def _timed(forward, reps: int) -> dict:
    """Median forward and backward seconds of ``forward() -> loss`` after one warm-up call."""
    fwd, bwd = [], []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return {"forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
            "total_s": statistics.median(f + b for f, b in zip(fwd, bwd)), "loss": loss.item()}


def _leaf_codes(data: dict) -> dict:
    return {view: c.clone().requires_grad_(True) for view, c in data["codes"].items()}


def ours(batch: int, reps: int, seed: int) -> dict:
    from eagle_dist.config import LossConfig
    from eagle_dist.method import losses
    from eagle_dist.method.heads import ProjectionHead

    data, lc = inputs(batch, seed), LossConfig()
    head = ProjectionHead(CODE_DIM)
    head.linear.load_state_dict(data["projection"].state_dict())
    keys, maps = data["keys"], data["maps"]

    def nce():
        codes = _leaf_codes(data)
        z_p, z_a = head(codes["p"]), head(codes["a"])
        kappa_p, kappa_a = losses.key_similarity_weights(keys["p"]), losses.key_similarity_weights(keys["a"])
        def one(anchor, other, labels, kappa):
            return losses.object_centric_nce(anchor, other, labels, kappa, tau=lc.contrastive_temp,
                                             global_weight=lc.global_loss_weight,
                                             centroid_mode=lc.centroid_mode, variant=lc.nce_variant)

        return one(z_p, z_a, maps["p"], kappa_p) + one(z_a, z_p, maps["a"], kappa_a)

    def corr():
        codes = _leaf_codes(data)
        out = losses.correspondence_loss(keys["x"], keys["p"], keys["a"], codes["x"], codes["p"], codes["a"])
        return out["pos_inter_loss"] + out["neg_inter_loss"]

    return {"nce": _timed(nce, reps), "corr": _timed(corr, reps)}


def official(batch: int, reps: int, seed: int, harness: str) -> dict:
    """The official modules (imported through the reference harness's ref_env.py)."""
    sys.path.insert(0, os.path.abspath(harness))
    import ref_env

    ref_env.setup(threads=torch.get_num_threads())
    import modules  # the official modules.py

    cfg = ref_env.load_cfg("train_config_cocostuff.yml")
    data = inputs(batch, seed)
    project_head = torch.nn.Linear(cfg.dim, cfg.dim)
    project_head.load_state_dict(data["projection"].state_dict())
    ce_loss = modules.newLocalGlobalInfoNCE(cfg, 27)
    corr_loss = modules.CorrespondenceLoss(cfg)
    keys, maps = data["keys"], data["maps"]

    def gram(k):  # training_step's corr_feats_pos / corr_feats_pos_aug
        flat = k.view(k.shape[0], k.shape[1], -1)
        return F.normalize(torch.matmul(flat.transpose(2, 1), flat), dim=1)

    def nce():
        codes = _leaf_codes(data)
        z_p = F.normalize(project_head(codes["p"].permute(0, 2, 3, 1).reshape(-1, cfg.dim)), dim=1)
        z_a = F.normalize(project_head(codes["a"].permute(0, 2, 3, 1).reshape(-1, cfg.dim)), dim=1)
        corr_p, corr_a = gram(keys["p"]), gram(keys["a"])
        return ce_loss(z_p, z_a, maps["p"], corr_p) + ce_loss(z_a, z_p, maps["a"], corr_a)

    def corr():
        codes = _leaf_codes(data)
        pos, _, neg, _ = corr_loss(keys["x"], keys["p"], keys["a"], codes["x"], codes["p"], codes["a"])
        return pos.mean() + neg.mean()

    return {"nce": _timed(nce, reps), "corr": _timed(corr, reps)}


def _child(args: argparse.Namespace, batch: int) -> dict:
    cmd = [args.official_python, os.path.abspath(__file__), "--side", "official", "--batch-sizes", str(batch),
           "--reps", str(args.reps), "--threads", str(args.threads), "--seed", str(args.seed),
           "--reference-harness", args.reference_harness, "--cpu-allocator", args.cpu_allocator]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench components: the official side failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_of(rounds: list[dict]) -> dict:
    return {part: {key: statistics.median(r[part][key] for r in rounds) for key in ("forward_s", "backward_s", "total_s")}
            for part in PARTS}


def format_table(result: dict) -> str:
    sizes = result["batch_sizes"]
    lines = ["component medians (s): forward / backward" + (" ; official ; ours / official (forward)"
                                                           if result.get("official") else "")]
    for part in PARTS:
        for b in sizes:
            o = result["ours"][str(b)][part]
            line = f"  {part:<5} batch {b:>3}: ours {o['forward_s']:7.4f} / {o['backward_s']:7.4f}"
            ref = (result.get("official") or {}).get(str(b))
            if ref:
                r = ref[part]
                line += (f" ; official {r['forward_s']:7.4f} / {r['backward_s']:7.4f} ; "
                         f"{o['forward_s'] / r['forward_s']:5.2f}x forward, {o['total_s'] / r['total_s']:5.2f}x both")
            lines.append(line)
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eagle_dist.bench components",
                                description="Time the InfoNCE and correspondence components, ours and the official.")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",") if x], default=[4, 8, 32])
    p.add_argument("--reps", type=int, default=5, help="timed calls per round after one warm-up (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per batch size (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official-python", help="the reference environment's python: also time the official modules")
    p.add_argument("--reference-harness", default=os.path.join("..", "shared", "reference"),
                   help="folder holding ref_env.py (default ../shared/reference)")
    p.add_argument("--cpu-allocator", choices=("system", "reuse"), default="system",
                   help="the same on both sides (default system: the C library's default)")
    p.add_argument("--side", choices=("both", "official"), default="both", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the result to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.reps < 1 or args.rounds < 1 or any(b < 2 for b in args.batch_sizes):
        raise SystemExit("bench components: --reps and --rounds must be >= 1 and batch sizes >= 2")
    torch.set_num_threads(args.threads)
    if args.cpu_allocator == "reuse":
        from eagle_dist.distributed import keep_freed_host_memory

        keep_freed_host_memory()
    if args.side == "official":  # the child: one batch size, one round, JSON on the last line
        print(json.dumps(official(args.batch_sizes[0], args.reps, args.seed, args.reference_harness)))
        return 0
    if args.official_python and not os.environ.get("EAGLE_REF_DIR"):
        raise SystemExit("bench components: set EAGLE_REF_DIR to the official src_EAGLE/ folder "
                         "(../shared/reference/README.md) for --official-python")
    result: dict = {"command": "components", "batch_sizes": args.batch_sizes, "reps": args.reps,
                    "rounds": args.rounds, "threads": args.threads, "cpu_allocator": args.cpu_allocator,
                    "ours": {}, "official": {} if args.official_python else None,
                    "loadavg_before": list(os.getloadavg())}
    for b in args.batch_sizes:
        ours_rounds, ref_rounds = [], []
        for _ in range(args.rounds):
            ours_rounds.append(ours(b, args.reps, args.seed))
            if args.official_python:
                ref_rounds.append(_child(args, b))
        result["ours"][str(b)] = {**_median_of(ours_rounds), "rounds": ours_rounds}
        if args.official_python:
            result["official"][str(b)] = {**_median_of(ref_rounds), "rounds": ref_rounds}
    result["loadavg_after"] = list(os.getloadavg())
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
