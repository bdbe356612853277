"""`eagle-dist sweep`: one config, several seeds, optional arms; ordinary training runs and a report.

    # 2 arms x 5 seeds on this machine, one run after the other (4 processes each):
    eagle-dist sweep --out sweeps/solver --config configs/cocostuff27.yaml --seeds 0-4 --nproc 4 \\
        --arm eigh:eicue.solver=eigh --arm krylov:eicue.solver=krylov model.weights=W.pth
    # the same as one Slurm job array (each task is launch/slurm/train.sbatch, preemption-safe):
    eagle-dist sweep --out sweeps/solver --slurm --sbatch-arg=--gpus-per-node=4 ... (same arguments)
    # statistics of what has finished so far (written at the end of a local sweep too):
    eagle-dist sweep report sweeps/solver

Every run is `launch/train.py` with the config, the sweep's overrides, its arm's overrides and
`train.seed=S`, in its own folder `OUT/runs/<arm>-seed<S>/` with its own MLflow run, nested under
one parent run of the sweep.  Without --nproc a run starts as `python launch/train.py` would
(the embedded default, without --config, restarts itself under torchrun with 2 processes);
with --nproc N under `torchrun --standalone --nproc_per_node N`.  An arm is `NAME:key=value`,
several overrides joined by commas (`NAME:a.b=1,c.d=x`) or given by repeating --arm NAME.

Launching the same sweep again (`eagle-dist sweep --out OUT`, the other arguments may be left
out; if given they must match) continues it: runs whose final checkpoint exists are kept,
interrupted ones resume from their newest complete checkpoint (the trainer does that), missing
ones start.  A run that fails is recorded (exit status, log) and the others go on.

The report (OUT/report.{md,json,png}, also logged to the parent MLflow run) gives per arm and
metric the mean, sd, min, max and n over finished seeds at the final checkpoint and, labelled
optimistic, at the best logged evaluation; per pair of arms the difference of the means with a
95 % Welch interval and a verdict; the gap to the published number (configs/published.yaml).
See eagle_dist/evaluation/seedstats.py for the methods.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagle_dist.distributed import STOP_SIGNALS, TORCHRUN_CODE
from eagle_dist.errors import EagleError

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
ARRAY_SBATCH = REPO / "launch" / "slurm" / "sweep.sbatch"
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
PUBLISHED = REPO / "configs" / "published.yaml"
SPEC = "sweep.json"
ATTEMPTS = "attempts.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepError(EagleError, ValueError):
    """A sweep that cannot be started or continued as asked; the message says what to do."""


# ----------------------------------------------------------------------------- the plan


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]; both forms mix ('0-2,7')."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise SweepError(f"--seeds {text!r}: use a range like 0-4 or a list like 0,2,5 (non-negative integers)")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r} names a seed twice")
    return seeds


def parse_arms(texts: list[str]) -> list[dict[str, Any]]:
    """['eigh:eicue.solver=eigh', 'x:a=1,b=2', 'x:c=3'] -> [{'name': 'eigh', 'overrides': [...]}, ...]."""
    arms: dict[str, list[str]] = {}
    for text in texts:
        name, sep, rest = text.partition(":")
        if not sep or not _NAME.match(name) or not rest:
            raise SweepError(f"--arm {text!r}: write NAME:key=value[,key=value...], NAME of letters, digits, _ . -")
        # Split on commas that start a new `key=`, so a value may itself hold a comma.
        overrides = [o for o in re.split(r",(?=[A-Za-z_][\w.]*=)", rest) if o]
        if any("=" not in o for o in overrides):
            raise SweepError(f"--arm {text!r}: every override is key.sub=value")
        arms.setdefault(name, []).extend(overrides)
    return [{"name": name, "overrides": ov} for name, ov in arms.items()]


@dataclass(frozen=True)
class Run:
    index: int  # the Slurm array task id
    arm: str
    seed: int
    overrides: tuple[str, ...]  # everything after the config, in order

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


class Sweep:
    """A sweep folder: its spec (sweep.json), run folders, logs and report."""

    def __init__(self, out: Path, spec: dict[str, Any]):
        self.out = out
        self.spec = spec

    @property
    def config_path(self) -> Path:
        return Path(self.spec["config"]) if self.spec["config"] else DEFAULT_CONFIG

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    def runs(self) -> list[Run]:
        fixed = [f"train.output_dir={self.runs_dir}", "train.job_id_in_run_name=false"]
        if self.spec.get("tracking_uri"):
            fixed.append(f"tracking.uri={self.spec['tracking_uri']}")
        if self.spec.get("parent_run_id"):
            fixed.append(f"tracking.parent_run_id={self.spec['parent_run_id']}")
        out: list[Run] = []
        # Seed-major: a sweep stopped part-way has every arm at its first seeds (a balanced, paired
        # report) instead of every seed of the first arm.
        for seed in self.spec["seeds"]:
            for arm in self.spec["arms"]:
                name = f"{arm['name']}-seed{seed}"
                ov = (*self.spec["overrides"], *arm["overrides"], f"train.seed={seed}", f"train.run_name={name}", *fixed)
                out.append(Run(len(out), arm["name"], seed, ov))
        return out

    def config(self, run: Run):
        from eagle_dist.config import load_config

        return load_config(self.config_path, list(run.overrides))

    def run_dir(self, run: Run) -> Path:
        return self.runs_dir / run.name

    def log_path(self, run: Run) -> Path:
        return self.out / "logs" / f"{run.name}.log"

    def state(self, run: Run) -> tuple[str, int | None]:
        """('finished', step) when the final checkpoint exists, ('partial', step) for an
        interrupted run with a complete checkpoint, ('started', None) for a run folder without
        one, ('missing', None) when nothing was written."""
        from eagle_dist.checkpoint import latest_complete, read_state

        folder = self.run_dir(run)
        if not folder.is_dir():
            return "missing", None
        latest = latest_complete(folder / "checkpoints") if (folder / "checkpoints").is_dir() else None
        if latest is None:
            return "started", None
        state = read_state(latest)
        step = int(state.get("extra", {}).get("step", state.get("step", 0)))
        return ("finished" if state.get("extra", {}).get("reason") == "final" else "partial"), step

    def command(self, run: Run) -> list[str]:
        config = ["--config", str(self.config_path)] if self.spec["config"] else []
        nproc = self.spec.get("nproc")
        if nproc:
            # torchrun as eagle-dist's launcher, which leaves the stop signals to the workers (they
            # save and exit 0) instead of shutting them down with a traceback.
            launcher = [sys.executable, "-c", TORCHRUN_CODE, "--standalone", "--nproc_per_node", str(nproc)]
        else:
            launcher = [sys.executable]
        return [*launcher, str(TRAIN), *config, *run.overrides]

    def train_args(self, run: Run) -> list[str]:
        """What launch/train.py gets (the Slurm array task hands these to train.sbatch)."""
        return [*(["--config", str(self.config_path)] if self.spec["config"] else []), *run.overrides]

    def last_attempts(self) -> dict[str, dict]:
        path = self.out / ATTEMPTS
        found: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                found[row["run"]] = row
        return found


def _spec_from_args(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    arms = parse_arms(args.arm or []) or [{"name": "base", "overrides": []}]
    config = str(Path(args.config).resolve()) if args.config else None
    if config and not Path(config).is_file():
        raise SweepError(f"config file not found: {args.config} (presets live in configs/)")
    return {"version": 1, "config": config, "seeds": parse_seeds(args.seeds), "arms": arms,
            "overrides": list(args.overrides), "nproc": args.nproc}


PLAN_KEYS = ("config", "seeds", "arms", "overrides", "nproc")


def open_sweep(args: argparse.Namespace) -> Sweep:
    """A new sweep from the arguments, or the one in --out (the arguments given must match it)."""
    out = Path(args.out).resolve()
    path = out / SPEC
    if path.is_file():
        spec = json.loads(path.read_text())
        given = {"config": args.config, "seeds": args.seeds, "arms": args.arm, "overrides": args.overrides or None,
                 "nproc": args.nproc}
        if any(v is not None for v in given.values()):
            asked = _spec_from_args(argparse.Namespace(**{**vars(args), "seeds": args.seeds or "0"}), out)
            differ = [k for k in PLAN_KEYS if given[k] is not None and asked[k] != spec[k]]
            if differ:
                raise SweepError(
                    f"{out} holds a sweep with other {', '.join(differ)} ({', '.join(f'{k}={spec[k]!r}' for k in differ)}). "
                    f"Continue it with `eagle-dist sweep --out {args.out}` alone, or give a new --out for a new sweep.")
        return Sweep(out, spec)
    if args.seeds is None:
        raise SweepError(f"no sweep in {out} yet: start one with --seeds (and --config, --arm as needed)")
    spec = _spec_from_args(args, out)
    spec["experiment"], spec["tracking_uri"] = None, None
    sweep = Sweep(out, spec)
    runs = sweep.runs()
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SweepError("two runs would share a folder name; give the arms different names")
    from eagle_dist.config import ConfigError

    try:
        cfg = sweep.config(runs[0])
        for run in runs[1:]:
            sweep.config(run)  # a bad override of any arm is found before anything runs
    except ConfigError as err:
        raise SweepError(f"config error: {err}") from None
    from eagle_dist.engine.tracking import default_uri

    explicit = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    # The runs log into the sweep's own store unless a tracking server is configured, so the
    # parent run and its children are in one place.
    spec["tracking_uri"] = None if explicit else default_uri(out)
    spec["experiment"] = cfg.tracking.experiment
    out.mkdir(parents=True, exist_ok=True)
    _write_spec(sweep)
    return sweep


def _write_spec(sweep: Sweep) -> None:
    tmp = sweep.out / (SPEC + ".tmp")
    tmp.write_text(json.dumps(sweep.spec, indent=1) + "\n")
    tmp.replace(sweep.out / SPEC)


def _parent_tracker(sweep: Sweep):
    """The sweep's MLflow run (created once; its id is kept in sweep.json)."""
    from eagle_dist.engine.tracking import MlflowTracker

    tracker = MlflowTracker(sweep.out, uri=sweep.spec.get("tracking_uri"), experiment=sweep.spec["experiment"],
                            job="the sweep")
    params = {"sweep.config": sweep.spec["config"] or "(embedded default)", "sweep.seeds": sweep.spec["seeds"],
              "sweep.arms": {a["name"]: " ".join(a["overrides"]) for a in sweep.spec["arms"]},
              "sweep.overrides": " ".join(sweep.spec["overrides"]), "sweep.nproc": sweep.spec.get("nproc")}
    tracker.start(run_name=f"sweep-{sweep.out.name}", params=params, run_id=sweep.spec.get("parent_run_id"),
                  tags={"eagle-dist.kind": "sweep"})
    if tracker.run_id and tracker.run_id != sweep.spec.get("parent_run_id"):
        sweep.spec["parent_run_id"] = tracker.run_id
        _write_spec(sweep)
    return tracker


# ----------------------------------------------------------------------------- running


class _StopRequest:
    """A stop signal (SIGTERM, SIGINT, SIGUSR1) to the sweep: passed on to the running training,
    which saves a checkpoint and exits; no further run starts.  A signal to the whole process
    group reaches the training twice, which it takes as one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signum)
            except OSError:
                pass  # it ended meanwhile


def run_local(sweep: Sweep) -> int:
    """Every unfinished run, one after the other; 0 when all are finished, 130 when stopped."""
    runs = sweep.runs()
    (sweep.out / "logs").mkdir(exist_ok=True)
    failed: list[str] = []
    stop = _StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        for run in runs:
            if stop.signum is not None:
                break
            state, step = sweep.state(run)
            label = f"[{run.index + 1}/{len(runs)}] {run.name}"
            if state == "finished":
                print(f"{label}: finished earlier (step {step}), kept", flush=True)
                continue
            how = f"resuming from step {step}" if state == "partial" else "starting"
            print(f"{label}: {how}; log {sweep.log_path(run)}", flush=True)
            code, seconds = _run_one(sweep, run, stop)
            state, step = sweep.state(run)
            if code == 0 and state == "finished":
                print(f"{label}: finished in {seconds / 60:.1f} min", flush=True)
            elif stop.signum is not None:
                print(f"{label}: stopped by {signal.Signals(stop.signum).name} at step {step} "
                      f"(exit status {code})", flush=True)
            else:
                failed.append(run.name)
                tail = _tail(sweep.log_path(run))
                print(f"{label}: FAILED (exit status {code}, {state}" + (f" at step {step}" if step else "")
                      + f"); the other runs go on. Last lines of {sweep.log_path(run)}:\n{tail}", file=sys.stderr,
                      flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.signum is not None:
        _say_interrupted(sweep)
        return 130
    return 1 if failed else 0


def _say_interrupted(sweep: Sweep) -> None:
    print(f"sweep interrupted; run the same command (or `eagle-dist sweep --out {sweep.out}`) to continue it",
          file=sys.stderr, flush=True)


def _run_one(sweep: Sweep, run: Run, stop: _StopRequest) -> tuple[int, float]:
    """Run one training; (exit status, seconds).  A stop signal meanwhile goes on to it (`stop`)."""
    log = sweep.log_path(run)
    cmd = sweep.command(run)
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n=== eagle-dist sweep: {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        stop.child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=Path.cwd())
        try:
            code = stop.child.wait()
        finally:
            stop.child = None
    _record_attempt(sweep, run, code, start)
    return code, time.time() - start


def _record_attempt(sweep: Sweep, run: Run, code: int | None, start: float) -> None:
    row = {"run": run.name, "exit": code, "start": start, "end": time.time(), "log": str(sweep.log_path(run))}
    with open(sweep.out / ATTEMPTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def _tail(path: Path, lines: int = 8) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


def submit_slurm(sweep: Sweep, sbatch_args: list[str], wait: bool, max_parallel: int | None) -> int:
    """One job array of the unfinished runs through launch/slurm/sweep.sbatch."""
    todo = [run for run in sweep.runs() if sweep.state(run)[0] != "finished"]
    if not todo:
        print("every run of the sweep is finished; nothing to submit", flush=True)
        return 0
    (sweep.out / "logs").mkdir(exist_ok=True)
    array = ",".join(str(run.index) for run in todo) + (f"%{max_parallel}" if max_parallel else "")
    cmd = ["sbatch", "--parsable", f"--array={array}", f"--output={sweep.out / 'logs' / 'slurm-%A_%a.out'}",
           *sbatch_args, *(["--wait"] if wait else []), str(ARRAY_SBATCH), str(sweep.out)]
    env = dict(os.environ)
    env.setdefault("EAGLE_PYTHON", sys.executable)
    if sweep.spec.get("nproc"):
        env["NPROC_PER_NODE"] = str(sweep.spec["nproc"])
    print(f"submitting {len(todo)} run(s): {shlex.join(cmd)}", flush=True)
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if wait else subprocess.PIPE, text=True, env=env,
                              check=False)
    except FileNotFoundError:
        raise SweepError("sbatch not found: --slurm needs a Slurm login node (or run the sweep here without --slurm)")
    job = (done.stdout or "").strip().split(";")[0]
    with open(sweep.out / "slurm_jobs.txt", "a") as f:
        f.write(f"{job} {array} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    if done.returncode != 0 and not wait:
        raise SweepError(f"sbatch failed (exit status {done.returncode}): {done.stderr}")
    names = ", ".join(f"{run.index}={run.name}" for run in todo)
    print(f"job array {job} (task id = run: {names}); logs {sweep.out / 'logs'}", flush=True)
    if not wait:
        print(f"when it has finished: eagle-dist sweep report {sweep.out}", flush=True)
    return done.returncode


def task_args(out: Path, index: int) -> list[str]:
    """launch/train.py arguments of array task `index` (launch/slurm/sweep.sbatch asks for them)."""
    sweep = Sweep(out.resolve(), json.loads((out / SPEC).read_text()))
    runs = sweep.runs()
    if not 0 <= index < len(runs):
        raise SweepError(f"array task {index} is not a run of the sweep in {out} (0..{len(runs) - 1})")
    return sweep.train_args(runs[index])


# ----------------------------------------------------------------------------- the report


def collect(sweep: Sweep) -> dict[str, Any]:
    """Per run its state and metrics, per arm and metric the summaries, per pair the differences."""
    from eagle_dist.evaluation import seedstats

    published_table = seedstats.load_published(PUBLISHED)
    attempts = sweep.last_attempts()
    runs: list[dict[str, Any]] = []
    arm_values: dict[str, dict[str, dict[str, list[float]]]] = {}  # arm -> final/best -> metric -> values
    arm_info: dict[str, dict[str, Any]] = {}
    for run in sweep.runs():
        state, step = sweep.state(run)
        row: dict[str, Any] = {"run": run.name, "arm": run.arm, "seed": run.seed, "state": state, "step": step,
                               "folder": str(sweep.run_dir(run))}
        if run.name in attempts and state != "finished":
            row["last_exit"] = attempts[run.name]["exit"]
            row["log"] = attempts[run.name]["log"]
        if run.arm not in arm_info:
            cfg = sweep.config(run)
            arm_info[run.arm] = {"dataset": cfg.dataset, "backbone": cfg.model.backbone,
                                 "published": seedstats.published_for(published_table, cfg.dataset, cfg.model.backbone)}
        if state == "finished" and step is not None:
            final, best = seedstats.final_and_best(seedstats.run_evaluations(sweep.run_dir(run)), step)
            row["final"], row["best"] = final, best
            for which, values in (("final", final), ("best", best)):
                for metric, value in values.items():
                    arm_values.setdefault(run.arm, {}).setdefault(which, {}).setdefault(metric, []).append(value)
        runs.append(row)
    arms = [a["name"] for a in sweep.spec["arms"]]
    metrics = [m for m in seedstats.METRICS if any(m in arm_values.get(a, {}).get("final", {}) for a in arms)]
    summaries: dict[str, Any] = {}
    for arm in arms:
        summaries[arm] = {**arm_info[arm], "metrics": {}}
        for metric in metrics:
            entry: dict[str, Any] = {}
            for which in ("final", "best"):
                seed_values = arm_values.get(arm, {}).get(which, {}).get(metric, [])
                entry[which] = {**seedstats.summarize(seed_values).to_dict(), "values": seed_values}
            published = arm_info[arm]["published"].get(metric)
            if published is not None:
                s = seedstats.summarize(arm_values.get(arm, {}).get("final", {}).get(metric, []))
                entry["published"] = {"value": published, "gap": s.mean - published, "inside": s.contains(published)}
            summaries[arm]["metrics"][metric] = entry
    pairs = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            for metric in metrics:
                pair = {"a": a, "b": b, "metric": metric}
                for which in ("final", "best"):
                    va = arm_values.get(a, {}).get(which, {}).get(metric, [])
                    vb = arm_values.get(b, {}).get(which, {}).get(metric, [])
                    pair[which] = seedstats.difference(va, vb).to_dict()
                pairs.append(pair)
    return {"sweep": str(sweep.out), "spec": sweep.spec, "method": seedstats.INTERVAL_METHOD,
            "metrics": metrics, "runs": runs, "arms": summaries, "pairs": pairs}


def _f(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def markdown(report: dict[str, Any]) -> str:
    spec = report["spec"]
    lines = [f"# Sweep {Path(report['sweep']).name}", "",
             f"config `{spec['config'] or 'configs/default.yaml (embedded default)'}`, seeds {spec['seeds']}"
             + (f", overrides `{' '.join(spec['overrides'])}`" if spec["overrides"] else ""), ""]
    lines += ["| arm | overrides |", "|---|---|"]
    lines += [f"| {a['name']} | `{' '.join(a['overrides']) or '(none)'}` |" for a in spec["arms"]]
    lines += ["", "## Runs", "", "| run | state | step | note |", "|---|---|---|---|"]
    for row in report["runs"]:
        note = ""
        if row["state"] != "finished" and "last_exit" in row:
            note = f"last attempt exit status {row['last_exit']}, log `{row['log']}`"
        lines.append(f"| {row['run']} | {row['state']} | {row['step'] if row['step'] is not None else '-'} | {note} |")
    finished = sum(r["state"] == "finished" for r in report["runs"])
    lines += ["", f"{finished} of {len(report['runs'])} runs finished; the statistics use the finished ones.",
              f"Metrics in percent, in-training protocol (no flip TTA, no CRF). {report['method']}."]
    titles = {"final": "Final checkpoint",
              "best": ("Best logged evaluation (OPTIMISTIC: per metric the best of the run's evaluations, "
                       "chosen on the evaluation split itself)")}
    for which in ("final", "best"):
        lines += ["", f"## {titles[which]}", "",
                  "| metric | arm | n | mean | sd | min | max | 95 % interval | published | gap | published inside |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for metric in report["metrics"]:
            for arm, info in report["arms"].items():
                e = info["metrics"][metric]
                s = e[which]
                pub = e.get("published") if which == "final" else None
                lines.append(
                    f"| {metric} | {arm} | {s['n']} | {_f(s['mean'])} | {_f(s['sd'])} | {_f(s['min'])} | "
                    f"{_f(s['max'])} | {_f(s['low'])} .. {_f(s['high'])} | "
                    + (f"{pub['value']:.1f} | {pub['gap']:+.2f} | {'yes' if pub['inside'] else 'no'} |" if pub
                       else "- | - | - |"))
    if report["pairs"]:
        lines += ["", "## Differences between arms (B - A, Welch 95 % interval)", "",
                  "| metric | A | B | final: B - A | interval | verdict | best (optimistic): B - A | interval | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in report["pairs"]:
            f, b = p["final"], p["best"]
            lines.append(f"| {p['metric']} | {p['a']} | {p['b']} | {_f(f['diff'])} | {_f(f['low'])} .. {_f(f['high'])} | "
                         f"{f['verdict']} | {_f(b['diff'])} | {_f(b['low'])} .. {_f(b['high'])} | {b['verdict']} |")
    published = {arm: info for arm, info in report["arms"].items() if info["published"]}
    if not published:
        arms = report["arms"].values()
        lines += ["", "No published number for " + ", ".join(sorted({f"{i['dataset']} / {i['backbone']}" for i in arms}))
                  + " (configs/published.yaml)."]
    else:
        lines += ["", ("Published: EAGLE (CVPR 2024), official protocol with flip TTA and CRF, compared with the "
                  "official-protocol metrics of the final checkpoints.")]
    return "\n".join(lines) + "\n"


def figure(report: dict[str, Any], path: Path) -> Path | None:
    """Every seed as a point, each arm's mean with its interval, the published number as a line."""
    metrics = report["metrics"]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for x, arm in enumerate(arms):
            e = report["arms"][arm]["metrics"][metric]
            values = e["final"]["values"]
            jitter = [x - 0.12 + 0.24 * i / max(1, len(values) - 1) for i in range(len(values))]
            ax.scatter(jitter, values, s=14, color="0.45", zorder=2, label="seed" if x == 0 else None)
            s = e["final"]
            if math.isfinite(s["mean"]):
                err = [[s["mean"] - s["low"]], [s["high"] - s["mean"]]] if math.isfinite(s["low"]) else None
                ax.errorbar([x + 0.25], [s["mean"]], yerr=err, fmt="o", color="C0", capsize=4, zorder=3,
                            label="mean, 95 % interval" if x == 0 else None)
            if "published" in e:
                ax.hlines(e["published"]["value"], x - 0.4, x + 0.4, colors="C3", linestyles="--", zorder=1,
                          label="published" if x == 0 else None)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set_title(metric, fontsize=9)
        ax.set_xlim(-0.6, len(arms) - 0.4)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"sweep {Path(report['sweep']).name}: final checkpoints (percent)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep: Sweep, tracker=None) -> dict[str, Any]:
    """report.json, report.md and report.png in the sweep folder, logged to the parent run."""
    report = collect(sweep)
    (sweep.out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    (sweep.out / "report.md").write_text(text)
    png = figure(report, sweep.out / "report.png")
    own = tracker is None
    if own and sweep.spec.get("parent_run_id"):
        tracker = _parent_tracker(sweep)
    if tracker is not None:
        for name in ("report.json", "report.md"):
            tracker.log_artifact(sweep.out / name)
        if png is not None:
            tracker.log_artifact(png)
        if own and all(r["state"] == "finished" for r in report["runs"]):
            tracker.close("FINISHED")
    print(text, flush=True)
    print(f"report: {sweep.out / 'report.md'} (and report.json" + (", report.png" if png else "") + ")", flush=True)
    return report


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eagle-dist sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the sweep folder (created, or continued when it exists)")
    p.add_argument("--config", help="YAML config (default: the embedded default, configs/default.yaml)")
    p.add_argument("--seeds", help="seeds: a range 0-4 or a list 0,2,5 (needed for a new sweep)")
    p.add_argument("--arm", action="append", help="NAME:key=value[,key=value...]; repeat for more arms")
    p.add_argument("--nproc", type=int, help="processes per run (torchrun --standalone; Slurm: per node)")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm job array instead of running here")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="passed to sbatch, e.g. --sbatch-arg=--time=24:00:00 (repeat for more)")
    p.add_argument("--max-parallel", type=int, help="Slurm: at most this many array tasks at once")
    p.add_argument("--wait", action="store_true", help="Slurm: wait for the array to finish, then report")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.max_steps=2000")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["report"]:
            if len(argv) != 2:
                print("usage: eagle-dist sweep report SWEEP_DIR", file=sys.stderr)
                return 2
            out = Path(argv[1])
            if not (out / SPEC).is_file():
                raise SweepError(f"{out} is not a sweep folder (no {SPEC}); start one with `eagle-dist sweep --out ...`")
            write_report(Sweep(out.resolve(), json.loads((out / SPEC).read_text())))
            return 0
        if argv[:1] == ["task-args"]:  # launch/slurm/sweep.sbatch: NUL-separated, for `mapfile -d ''`
            sys.stdout.write("".join(a + "\0" for a in task_args(Path(argv[1]), int(argv[2]))))
            return 0
        args = build_parser().parse_args(argv)
        if args.nproc is not None and args.nproc < 1:
            raise SweepError("--nproc must be >= 1")
        sweep = open_sweep(args)
        tracker = _parent_tracker(sweep)
        if args.slurm:
            code = submit_slurm(sweep, args.sbatch_arg, args.wait, args.max_parallel)
            # The parent run stays RUNNING while tasks are queued; `report` ends it once all finished.
            if args.wait or all(sweep.state(run)[0] == "finished" for run in sweep.runs()):
                report = write_report(sweep, tracker)
                if all(r["state"] == "finished" for r in report["runs"]):
                    tracker.close("FINISHED")
            return code
        code = 130
        try:
            code = run_local(sweep)
        except KeyboardInterrupt:  # Ctrl-C before run_local took the stop signals over: nothing runs yet
            _say_interrupted(sweep)
        finally:
            report = write_report(sweep, tracker)
            finished = all(r["state"] == "finished" for r in report["runs"])
            tracker.close("FINISHED" if finished else "KILLED" if code == 130 else "FAILED")
        return code
    except EagleError as err:
        print(f"eagle-dist sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
