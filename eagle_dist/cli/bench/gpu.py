"""One prepared GPU check: everything a CPU machine cannot show, in one command and one JSON.

    make gpu-check                                   # the same as the next line
    python -m eagle_dist.bench gpu --json runs/gpu-check.json [--budget 295] [--parts step_eigh,resume]
    python -m eagle_dist.bench gpu --dry-run --json dry.json     # the tiny CPU variant of every part

GPU machines are lent for minutes (device start-up included), so the check is sized to finish
in under 5 minutes on one H200 and every part runs as its own process group under its own
timeout, capped by what is left of ``--budget``: a hang in one part (a CUDA kernel, an NCCL
rendezvous) is killed and reported, and the other parts still run. The parts:

``tests``        ``pytest -m gpu``: the CUDA tests (skipped on machines without CUDA).
``step_eigh``    ``bench step`` at the official COCO-Stuff config (ViT-S/8, 224 px, batch 32,
``step_krylov``  bf16) with ``eicue.solver=eigh`` / ``krylov``: images/s, the per-component
                 breakdown and the peak CUDA memory.
``eigen_32``     ``bench eigen --device cuda`` on 32 and 64 model Laplacians of 784 x 784 (fp32):
``eigen_64``     time and accuracy of eigh and the Krylov solver against float64 eigh.
``resume``       the small embedded-default config under ``torchrun --nproc_per_node 1`` (NCCL):
                 30 uninterrupted steps; 20 steps, then a resumed run to 30 from the step-20
                 checkpoint; the two final weights compared.
``syncs``        one training step under ``torch.cuda.set_sync_debug_mode("warn")``: every line of
                 eagle_dist that makes the host wait for the GPU, counted per solver.

Without CUDA (and without ``--dry-run``) it prints one line and exits 0, so CI can call it.
It installs nothing. On a bare CUDA image, eagle_dist's own imports need ``webdataset`` (and its
``braceexpand``), the DeepSpeed tests ``deepspeed``; without ``mlflow`` training logs to
metrics.jsonl only. The JSON's ``preflight`` lists what is missing.
``--dry-run`` runs every part on the CPU with tiny sizes: it checks the plan, the commands and
the JSON, not the GPU. The JSON holds, per part, its status (ok, failed, timeout, skipped), its
wall time, the commands, the figures and the tail of its log; ``summary`` gathers the figures a
closing note needs. Full logs go to ``--workdir`` (default ``runs/gpu-check``). Exit status 0
when every part is ok, else 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from eagle_dist.cli.bench.step import step_forward, step_setup
from eagle_dist.config import load_config
from eagle_dist.engine.step import run_step
from eagle_dist.method.eagle import loss_names

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "eagle_dist"
BENCH = PACKAGE / "cli" / "bench"

# The official COCO-Stuff-27 run (the config defaults) at its per-GPU batch, in bf16.
OFFICIAL_STEP = ["data.batch_size=32", "dist.mixed_precision=bf16"]
# The dry run's stand-in: the same commands, sized for a loaded CPU, in fp32 (bf16 autocast on
# most CPUs is emulated and many times slower; tests/unit/test_precision.py runs the bf16 path on CPU).
TINY_STEP = ["model.backbone=vit_tiny_patch16_224", "data.resolution=64", "data.batch_size=2",
             "loss.feature_samples=4", "loss.neg_samples=2", "dist.mixed_precision=no"]
# The resume check trains the embedded default (configs/default.yaml) on generated shards.
RESUME_SMALL = ["train.eval_interval=100000", "eval.max_batches=2", "train.log_interval=10",
                "train.ckpt_interval=10", "data.num_workers=2"]
RESUME_TINY = ["model.backbone=vit_tiny_patch16_224", "model.dim=32", "model.n_classes=4",
               "model.extra_clusters=1", "model.eigen_clusters=6", "loss.feature_samples=4",
               "loss.neg_samples=2", "loss.step_schedulers=1", "data.resolution=64", "data.val_resolution=64",
               "data.batch_size=2", "data.val_batch_size=3", "data.num_workers=0", "data.shuffle_buffer=8",
               "train.log_interval=1", "train.eval_interval=100000", "train.ckpt_interval=1",
               "eval.max_batches=1",
               # One thread: with two on a loaded 2-core machine the uninterrupted and the resumed
               # run ended up to 8e-4 apart after 3 steps (rounding, then a discrete EiCue/medoid
               # choice), so the bitwise comparison failed now and then (CUDA runs are unaffected).
               "dist.cpu_threads=1"]
# Modules a part imports; a missing one fails that part, and the preflight names it up front.
MODULES = ("torch", "timm", "accelerate", "deepspeed", "webdataset", "mlflow", "yaml", "pytest")
# Shortest time worth starting a command with; below it the part is skipped for lack of budget.
MIN_START_S = 5.0
# The global step the sync audit's training step runs at: past the `u` switch (NCE on).
SYNC_AUDIT_STEP = 1000
TAIL_OK, TAIL_FAILED = 800, 4000


@dataclass
class Plan:
    """Sizes and limits of one check: `gpu_plan` on a GPU, `dry_plan` for the CPU rehearsal."""

    device: str
    step_overrides: list[str]
    sync_overrides: list[str]
    step_warmup: int
    step_steps: int
    eigen_batches: tuple[int, ...]
    eigen_side: int
    eigen_repeats: int
    resume_config: list[str]
    resume_steps: int  # uninterrupted length
    resume_at: int  # the interrupted run stops (and checkpoints) here
    shard_counts: tuple[int, int]  # generated train / val samples for the resume runs
    shard_size: str
    shard_classes: int
    timeouts: dict[str, float]
    budget_s: float


def gpu_plan(budget_s: float) -> Plan:
    return Plan(
        device="cuda", step_overrides=OFFICIAL_STEP, step_warmup=2, step_steps=5,
        # Where the host waits does not depend on the batch size: a smaller one is quicker.
        sync_overrides=["data.batch_size=8", "dist.mixed_precision=bf16"],
        eigen_batches=(32, 64), eigen_side=28, eigen_repeats=5,
        resume_config=RESUME_SMALL, resume_steps=30, resume_at=20,
        shard_counts=(128, 16), shard_size="128x128", shard_classes=6,
        # Expected on one H200 (process start-up included): tests ~40 s, each step part ~30 s,
        # each eigen part ~20 s, resume ~90 s, syncs ~25 s. The limits leave room, and the budget
        # caps their sum.
        timeouts={"tests": 100, "step_eigh": 80, "step_krylov": 60, "eigen_32": 50, "eigen_64": 60,
                  "resume": 170, "syncs": 60},
        budget_s=budget_s,
    )


def dry_plan(budget_s: float) -> Plan:
    return Plan(
        device="cpu", step_overrides=TINY_STEP, sync_overrides=TINY_STEP, step_warmup=0, step_steps=1,
        eigen_batches=(2,), eigen_side=6, eigen_repeats=1,
        resume_config=RESUME_TINY, resume_steps=3, resume_at=2,
        shard_counts=(12, 3), shard_size="48x64", shard_classes=4,
        timeouts={"tests": 300, "step_eigh": 300, "step_krylov": 300, "eigen_2": 300, "resume": 600,
                  "syncs": 300},
        budget_s=budget_s,
    )


@dataclass
class Part:
    """Commands run in order (the first failure stops the part) and what to read off them."""

    name: str
    commands: list[list[str]]
    collect: Callable[[Path, str], dict]  # (part folder, its log) -> figures for the JSON
    env: dict[str, str | None] = field(default_factory=dict)  # None removes a variable


# ----------------------------------------------------------------------------- the parts


def _module_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collect_tests(folder: Path, log: str) -> dict:
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", log)}
    return {"counts": counts}


def _collect_step(folder: Path, log: str) -> dict:
    r = json.loads((folder / "step.json").read_text())
    return {
        "solver": r["config"]["eicue"]["solver"],
        "mixed_precision": r["mixed_precision"],
        "batch_size": r["batch_size_per_process"],
        "images_per_s": r["images_per_s"],
        "step_median_s": r["step_median_s"],
        "backbone_only_s": r["backbone_only_s"],
        "ratio_to_backbone": r["ratio"],
        "peak_memory_bytes": r["peak_memory_bytes"],
        "peak_memory_kind": r["peak_memory_kind"],
        "breakdown_s": r["breakdown"],
        "device": r["machine"]["device"],
        "device_name": r["machine"].get("device_name"),
    }


def _collect_eigen(folder: Path, log: str) -> dict:
    r = json.loads((folder / "eigen.json").read_text())
    out = {"batch": r["batch"], "n": r["n"], "k": r["k"], "device": r["machine"]["device"], "solvers": {}}
    for name, e in r["cases"]["model"]["solvers"].items():
        out["solvers"][name] = {
            key: e[key] for key in ("time_s", "speedup_vs_eigh_fp32", "max_eigenvalue_err", "max_subspace_err",
                                    "max_vector_err", "map_agreement") if key in e
        }
        if "krylov_steps" in e:
            out["solvers"][name]["krylov_steps_max"] = max(e["krylov_steps"])
            out["solvers"][name]["krylov_converged"] = e["krylov_converged"]
    if "peak_memory_bytes" in r:
        out["peak_memory_bytes"], out["peak_memory_kind"] = r["peak_memory_bytes"], r["peak_memory_kind"]
    return out


def _collect_resume(plan: Plan) -> Callable[[Path, str], dict]:
    def collect(folder: Path, log: str) -> dict:
        full = torch.load(folder / "runs" / "full" / "final_heads.pt", map_location="cpu", weights_only=True)
        resumed = torch.load(folder / "runs" / "resumed" / "final_heads.pt", map_location="cpu", weights_only=True)
        if full.keys() != resumed.keys():
            raise RuntimeError(f"the two runs saved different tensors: {sorted(full.keys() ^ resumed.keys())}")
        diffs = {k: float((full[k].double() - resumed[k].double()).abs().max()) for k in full if full[k].numel()}
        scale = max(float(v.double().abs().max()) for v in full.values() if v.numel())
        world = re.findall(r"world size (\d+) \((\w+), (\w+), ([^)]+)\)", log)
        resumed_at = re.findall(r"resumed from \S+ at step (\d+)", log)
        expected = str(plan.resume_at)
        if resumed_at != [expected]:
            raise RuntimeError(f"expected one resume at step {expected}, the logs show {resumed_at or 'none'}")
        return {
            "steps": plan.resume_steps,
            "checkpoint_step": plan.resume_at,
            "resumed_at_step": int(resumed_at[0]),
            "launch": "torchrun --nproc_per_node 1",
            "world_size_strategy_backend_device": [list(w) for w in world],
            "weights_bitwise_equal": all(torch.equal(full[k], resumed[k]) for k in full),
            "max_abs_diff": max(diffs.values()),
            "largest_weight": scale,
            "worst_tensor": max(diffs, key=lambda name: diffs[name]),
        }

    return collect


def _collect_syncs(folder: Path, log: str) -> dict:
    return json.loads((folder / "syncs.json").read_text())


def build_parts(plan: Plan, workdir: Path) -> list[Part]:
    # A test module that cannot be imported there (a package missing on the GPU image) must not
    # stop the GPU tests of the other modules.
    parts = [Part("tests", [_module_cmd("pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                        "--continue-on-collection-errors", str(REPO / "tests"))],
                  _collect_tests)]
    for solver in ("eigh", "krylov"):
        folder = workdir / f"step_{solver}"
        parts.append(Part(f"step_{solver}", [_module_cmd(
            "eagle_dist.bench", "step", *plan.step_overrides, f"eicue.solver={solver}", "--device", plan.device,
            "--warmup", str(plan.step_warmup), "--steps", str(plan.step_steps), "--json", str(folder / "step.json"),
        )], _collect_step))
    for batch in plan.eigen_batches:
        folder = workdir / f"eigen_{batch}"
        parts.append(Part(f"eigen_{batch}", [_module_cmd(
            "eagle_dist.bench", "eigen", "--device", plan.device, "--batch", str(batch), "--side", str(plan.eigen_side),
            "--cases", "model", "--solvers", "eigh,krylov", "--repeats", str(plan.eigen_repeats),
            "--json", str(folder / "eigen.json"),
        )], _collect_eigen))

    folder = workdir / "resume"
    shards = folder / "shards"
    build = [
        _module_cmd("eagle_dist.shard", "--source", "synthetic", "--split", split, "--out", str(shards / split),
                    "--synthetic-count", str(count), "--synthetic-size", plan.shard_size,
                    "--synthetic-classes", str(plan.shard_classes), "--samples-per-shard", "8", "--quiet",
                    "--workers", "1")
        for split, count in zip(("train", "val"), plan.shard_counts)
    ]
    common = [*plan.resume_config, f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}",
              f"train.output_dir={folder / 'runs'}", "dist.expected_world_size=1"]

    def train(run: str, steps: int) -> list[str]:
        return _module_cmd("torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
                           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "default.yaml"),
                           *common, f"train.run_name={run}", f"train.max_steps={steps}")

    parts.append(Part("resume", [*build, train("full", plan.resume_steps), train("resumed", plan.resume_at),
                                 train("resumed", plan.resume_steps)], _collect_resume(plan),
                      # MLflow goes to the run folder's sqlite file, never to a server named outside.
                      env={"MLFLOW_TRACKING_URI": None}))
    folder = workdir / "syncs"
    parts.append(Part("syncs", [_module_cmd(
        "eagle_dist.bench", "gpu", "syncs", *plan.sync_overrides, "--device", plan.device,
        "--json", str(folder / "syncs.json"),
    )], _collect_syncs))
    return parts


# ----------------------------------------------------------------------------- running


def _env(extra: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run_command(cmd: list[str], timeout_s: float, log, env: dict[str, str]) -> tuple[int | None, float]:
    """(exit status or None on timeout, seconds). The command runs in its own process group so a
    timeout kills what it started too (torchrun's workers, DataLoader workers)."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    # A worker left behind by a launcher that died would hold the GPU for the next part.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc, time.perf_counter() - t0


def run_part(part: Part, timeout_s: float, deadline: float, workdir: Path) -> dict:
    folder = workdir / part.name
    folder.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{part.name}.log"
    entry: dict = {"status": "ok", "timeout_s": timeout_s, "commands": [" ".join(c) for c in part.commands],
                   "log": str(log_path)}
    part_deadline = min(time.perf_counter() + timeout_s, deadline)
    t0 = time.perf_counter()
    env = _env(part.env)
    with open(log_path, "w") as log:
        for cmd in part.commands:
            left = part_deadline - time.perf_counter()
            if left < MIN_START_S:
                entry["status"] = "timeout" if part_deadline < deadline else "skipped"
                entry["reason"] = "no time left in the part's limit" if part_deadline < deadline else "budget spent"
                break
            rc, _ = _run_command(cmd, left, log, env)
            if rc is None:
                entry["status"], entry["reason"] = "timeout", f"killed after {left:.0f} s: {' '.join(cmd[:6])} ..."
                break
            if rc != 0:
                entry["status"], entry["reason"] = "failed", f"exit status {rc}: {' '.join(cmd[:6])} ..."
                break
    entry["wall_s"] = round(time.perf_counter() - t0, 2)
    text = log_path.read_text(errors="replace")
    if entry["status"] == "ok":
        try:
            entry["result"] = part.collect(folder, text)
        except Exception as err:  # a part that ran but left no usable output is a failure to report
            entry["status"], entry["reason"] = "failed", f"reading its output: {type(err).__name__}: {err}"
    entry["log_tail"] = text[-(TAIL_OK if entry["status"] == "ok" else TAIL_FAILED):]
    return entry


def preflight() -> dict:
    modules = {}
    for name in MODULES:
        if importlib.util.find_spec(name) is None:
            modules[name] = "missing"
            continue
        dist_name = {"yaml": "pyyaml"}.get(name, name)
        try:
            modules[name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            modules[name] = "present"
    info: dict[str, object] = {"python": sys.version.split()[0], "torch_cuda": torch.version.cuda, "modules": modules,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_count"] = torch.cuda.device_count()
        info["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
    return info


def summarize(parts: dict) -> dict:
    """The figures a closing note quotes, from the parts that finished."""
    def result(name: str) -> dict:
        return parts.get(name, {}).get("result", {})

    summary: dict = {"status": {name: p["status"] for name, p in parts.items()}}
    if result("tests"):
        summary["gpu_tests"] = result("tests")["counts"]
    steps = {s: result(f"step_{s}") for s in ("eigh", "krylov") if result(f"step_{s}")}
    if steps:
        summary["step"] = {s: {"images_per_s": r["images_per_s"], "step_median_s": r["step_median_s"],
                               "batch_size": r["batch_size"], "eicue_s": r["breakdown_s"].get("eicue"),
                               "backbone_s": r["breakdown_s"].get("backbone")} for s, r in steps.items()}
    eigen = {name.split("_", 1)[1]: result(name) for name in parts if name.startswith("eigen_") and result(name)}
    if eigen:
        summary["eigen"] = {batch: {s: {"time_s": e["time_s"], "max_subspace_err": e["max_subspace_err"],
                                        "map_agreement": e["map_agreement"]} for s, e in r["solvers"].items()}
                            for batch, r in eigen.items()}
    if result("resume"):
        r = result("resume")
        summary["resume"] = {k: r[k] for k in ("resumed_at_step", "weights_bitwise_equal", "max_abs_diff",
                                               "world_size_strategy_backend_device")}
    if result("syncs"):
        summary["host_syncs_per_step"] = {s: r["total"] for s, r in result("syncs")["solvers"].items()}
    peaks = [(r["peak_memory_bytes"], name, r["peak_memory_kind"]) for name in parts
             if "peak_memory_bytes" in (r := result(name))]
    if peaks:
        top = max(peaks)
        summary["peak_memory"] = {"bytes": top[0], "gib": round(top[0] / 2**30, 2), "part": top[1], "kind": top[2],
                                  "per_part_bytes": {name: b for b, name, _ in peaks}}
    return summary


def run_check(args: argparse.Namespace) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        print(f"bench gpu: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing to check: run it on a GPU machine, or add --dry-run for the CPU rehearsal")
        return 0
    plan = dry_plan(args.budget) if args.dry_run else gpu_plan(args.budget)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    parts = build_parts(plan, workdir)
    names = [p.name for p in parts]
    wanted = [n for n in args.parts.split(",") if n] if args.parts else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"bench gpu: unknown part(s) {unknown}; the parts are {names}")

    t0 = time.perf_counter()
    deadline = t0 + plan.budget_s
    report: dict = {"command": "gpu", "dry_run": args.dry_run, "device": plan.device, "budget_s": plan.budget_s,
                    "preflight": preflight(), "parts": {}}
    for part in parts:
        if part.name not in wanted:
            continue
        print(f"[gpu-check] {part.name} (limit {plan.timeouts[part.name]:.0f} s, "
              f"{deadline - time.perf_counter():.0f} s of budget left)", flush=True)
        entry = run_part(part, plan.timeouts[part.name], deadline, workdir)
        report["parts"][part.name] = entry
        print(f"[gpu-check] {part.name}: {entry['status']} in {entry['wall_s']:.1f} s"
              + (f" ({entry['reason']})" if "reason" in entry else ""), flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    report["summary"] = summarize(report["parts"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.json} ({report['wall_s']:.0f} s)")
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


# ----------------------------------------------------------------------------- host-sync audit


def _sync_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost eagle_dist line on the stack (the op may sit inside torch's own Python)."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if PACKAGE in path.parents and BENCH not in path.parents:
            return f"{path.relative_to(REPO)}:{frame.lineno} {(frame.line or '').strip()[:90]}"
    return "outside eagle_dist"


def audit_syncs(args: argparse.Namespace) -> dict:
    """One training step per solver with CUDA's sync debug mode on: where the host waits.

    The step is the trainer's: `bench step`'s setup (`build_model`, the `Dist`'s precision and
    `prepare`) and `engine.step.run_step` (forward, the ranks' all-reduce, backward, clipping,
    the optimizer), at a global step past the `u` switch, after one warm-up step so lazy
    initialisation is not counted. On CPU nothing is observed (the mode is CUDA's); the dry run
    checks that the audit runs.
    """
    result: dict = {"device": args.device, "observed": False, "solvers": {}}
    for solver in ("eigh", "krylov"):
        cfg = load_config(None, [*args.overrides, f"eicue.solver={solver}"])
        d, backbone, heads, optimizer, batch = step_setup(cfg, args.device)
        try:
            device = d.device
            result["device"], result["observed"] = str(device), device.type == "cuda"
            forward = step_forward(cfg, d, backbone, heads, SYNC_AUDIT_STEP)

            def step() -> None:
                run_step(d, heads, optimizer, forward, batch, step=SYNC_AUDIT_STEP,
                         metric_names=loss_names(cfg.model), grad_clip=cfg.optim.grad_clip)

            step()
            sites: Counter = Counter()

            def record(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message):
                    sites[_sync_site(traceback.extract_stack()[:-1])] += 1

            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = record
                    step()
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            d.cleanup()
        result["solvers"][solver] = {"total": sum(sites.values()), "sites": dict(sites.most_common())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eagle_dist.bench gpu",
                                description="The prepared GPU check (see the module docstring).")
    p.add_argument("--json", default="runs/gpu-check.json", help="where the one JSON goes (default %(default)s)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all parts together (default 295 on a GPU, 1800 for --dry-run)")
    p.add_argument("--parts", default="", help="comma list of parts to run (default: all)")
    p.add_argument("--workdir", default="runs/gpu-check", help="logs and part outputs (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="the tiny CPU variant of every part")
    return p


def _syncs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eagle_dist.bench gpu syncs",
                                description="Count host syncs in one training step (the gpu check's `syncs` part).")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["syncs"]:
        audit_syncs(_syncs_parser().parse_args(argv[1:]))
        return 0
    args = _parser().parse_args(argv)
    if args.budget is None:
        args.budget = 1800.0 if args.dry_run else 295.0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
