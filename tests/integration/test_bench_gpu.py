"""`python -m eagle_dist.bench gpu` on a CPU machine: the one-line answer, the plan, the guards
around each part, and (slow) the dry run of EVERY part, each of which must end `ok`: the GPU
check is rehearsed whole on the CPU before a GPU sees it."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from eagle_dist.cli import bench
from eagle_dist.cli.bench import gpu as bench_gpu


def test_without_cuda_it_says_so_in_one_line_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu", "--json", str(tmp_path / "gpu.json"), "--workdir", str(tmp_path / "work")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--dry-run" in lines[0]
    assert not (tmp_path / "gpu.json").exists() and not (tmp_path / "work").exists()


def test_the_gpu_plan_is_the_official_step_both_solvers_both_batches_and_a_resume(tmp_path):
    plan = bench_gpu.gpu_plan(295)
    parts = {p.name: p for p in bench_gpu.build_parts(plan, tmp_path)}
    assert list(parts) == ["tests", "step_eigh", "step_krylov", "eigen_32", "eigen_64", "resume", "syncs"]
    assert set(plan.timeouts) == set(parts)  # every part has its own limit
    assert "-m gpu" in " ".join(parts["tests"].commands[0])
    for solver in ("eigh", "krylov"):
        (cmd,) = parts[f"step_{solver}"].commands
        assert {"step", "data.batch_size=32", "dist.mixed_precision=bf16", f"eicue.solver={solver}"} <= set(cmd)
        assert cmd[cmd.index("--device") + 1] == "cuda"
    for batch in (32, 64):
        (cmd,) = parts[f"eigen_{batch}"].commands
        line = " ".join(cmd)
        assert f"--batch {batch} " in line and "--side 28" in line and "--device cuda" in line
        assert "--solvers eigh,krylov" in line
    build_train, build_val, full, first, resumed = parts["resume"].commands
    assert "eagle_dist.shard" in build_train and "eagle_dist.shard" in build_val
    for cmd, run, steps in ((full, "full", 30), (first, "resumed", 20), (resumed, "resumed", 30)):
        assert cmd[cmd.index("--nproc_per_node") + 1] == "1" and "torch.distributed.run" in cmd
        assert f"train.run_name={run}" in cmd and f"train.max_steps={steps}" in cmd
        assert "train.ckpt_interval=10" in cmd  # so step 20 is a checkpoint of the first run as well
    (syncs,) = parts["syncs"].commands
    assert syncs[syncs.index("-m") + 1:syncs.index("-m") + 4] == ["eagle_dist.bench", "gpu", "syncs"]
    assert syncs[syncs.index("--device") + 1] == "cuda"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a killed child nobody reaped yet is not running


def test_each_part_is_guarded_a_hang_is_killed_with_its_children_and_failures_are_reported(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = bench_gpu.Part("hang", [["sh", "-c", f"sleep 600 & echo $! > {pid_file}; wait"]], lambda f, log: {})
    far = time.perf_counter() + 600
    entry = bench_gpu.run_part(hang, bench_gpu.MIN_START_S + 2, far, tmp_path)
    assert entry["status"] == "timeout" and "killed after" in entry["reason"]
    child = int(pid_file.read_text())
    gone_by = time.perf_counter() + 30  # SIGKILL is delivered asynchronously
    while _alive(child) and time.perf_counter() < gone_by:
        time.sleep(0.1)
    assert not _alive(child), "the part's child process outlived its timeout"

    failing = bench_gpu.Part("failing", [["sh", "-c", "echo broken input >&2; exit 3"], ["sh", "-c", "echo never"]],
                             lambda f, log: {})
    entry = bench_gpu.run_part(failing, 60, far, tmp_path)
    assert entry["status"] == "failed" and "exit status 3" in entry["reason"]
    assert "broken input" in entry["log_tail"] and "never" not in entry["log_tail"].replace("echo never", "")

    write = "import json, sys; json.dump({'value': 7}, open(sys.argv[1], 'w'))"
    good = bench_gpu.Part("good", [[sys.executable, "-c", write, str(tmp_path / "good" / "out.json")]],
                          lambda folder, log: json.loads((folder / "out.json").read_text()))
    entry = bench_gpu.run_part(good, 60, far, tmp_path)
    assert entry["status"] == "ok" and entry["result"] == {"value": 7}

    unreadable = bench_gpu.Part("unreadable", [["true"]], lambda folder, log: json.loads((folder / "x").read_text()))
    entry = bench_gpu.run_part(unreadable, 60, far, tmp_path)
    assert entry["status"] == "failed" and "reading its output" in entry["reason"]

    entry = bench_gpu.run_part(good, 60, time.perf_counter() + 1, tmp_path)  # the budget is spent
    assert entry["status"] == "skipped" and entry["reason"] == "budget spent"


@pytest.mark.slow
def test_dry_run_of_every_part_is_ok_and_assembles_one_json(tmp_path):
    out = tmp_path / "dry.json"
    rc = bench_gpu.main(["--dry-run", "--json", str(out), "--workdir", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    names = [p.name for p in bench_gpu.build_parts(bench_gpu.dry_plan(1), tmp_path)]
    assert names == ["tests", "step_eigh", "step_krylov", "eigen_2", "resume", "syncs"]
    failed = {n: {k: p[k] for k in ("status", "reason", "log_tail") if k in p}
              for n, p in report["parts"].items() if p["status"] != "ok"}
    assert rc == 0 and failed == {}, json.dumps(failed, indent=1)[-6000:]
    assert report["dry_run"] and report["device"] == "cpu" and list(report["parts"]) == names
    assert report["preflight"]["modules"]["torch"] == torch.__version__
    summary = report["summary"]
    assert summary["status"] == {name: "ok" for name in names}
    assert summary["gpu_tests"].get("failed", 0) == 0 and summary["gpu_tests"].get("errors", 0) == 0
    for solver in ("eigh", "krylov"):
        assert summary["step"][solver]["images_per_s"] > 0 and summary["step"][solver]["batch_size"] == 2
    assert set(summary["eigen"]["2"]) == {"eigh", "krylov"}
    assert summary["eigen"]["2"]["krylov"]["max_subspace_err"] < 1e-3
    assert summary["resume"]["resumed_at_step"] == 2 and summary["resume"]["weights_bitwise_equal"]
    syncs = report["parts"]["syncs"]["result"]
    assert set(syncs["solvers"]) == {"eigh", "krylov"} and syncs["observed"] is False  # CUDA's mode only
    assert summary["peak_memory"]["part"] in names
    assert "breakdown_s" in report["parts"]["step_eigh"]["result"]
    assert (tmp_path / "work" / "step_eigh.log").is_file()
