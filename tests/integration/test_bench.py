"""Smoke tests of ``python -m eagle_dist.bench`` at tiny sizes: the JSON it writes, not its timings.

    .venv/bin/python -m pytest tests/integration/test_bench.py -q
"""

import json
import math
import statistics
import sys

import pytest
import torch

from eagle_dist import profiling
from eagle_dist.cli import bench
from eagle_dist.cli.bench import components, eigen, synth

TINY_STEP = ["data.batch_size=1", "data.resolution=64", "--warmup", "1", "--steps", "2", "--threads", "1"]


def run_bench(argv, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert bench.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("solver", ["eigh", "krylov"])
def test_step_reports_times_breakdown_and_config(tmp_path, capsys, solver):
    r = run_bench(["step", f"eicue.solver={solver}", *TINY_STEP], tmp_path, f"step_{solver}")
    assert r["config"]["eicue"]["solver"] == solver
    assert r["config"]["data"]["batch_size"] == 1 and r["batch_size_per_process"] == 1
    assert len(r["step_times_s"]) == 2 and r["step_median_s"] > 0 and r["backbone_only_s"] > 0
    assert r["ratio"] == pytest.approx(r["step_median_s"] / r["backbone_only_s"])
    # the denominator is timed between the timed steps, one backbone-only pass per step
    assert len(r["backbone_only_times_s"]) == 2 and r["backbone_only_s"] == pytest.approx(
        statistics.median(r["backbone_only_times_s"]))
    assert r["images_per_s"] == pytest.approx(1 / r["step_median_s"])
    assert r["peak_memory_bytes"] > 0 and r["peak_memory_kind"] == "cpu_rss_high_water"
    assert r["backbone_passes_per_step"] == 2.0  # the one image of the batch is blurred
    parts = r["breakdown"]
    for name in ("backbone", "heads", "eicue", "eicue.affinities", "eicue.laplacian", "eicue.eigensolver",
                 "corr", "nce", "probes", "backward", "optimizer", "other"):
        assert name in parts, name
    assert all(parts[p] > 0 for p in ("backbone", "heads", "eicue", "backward"))
    assert "comm" not in parts  # a single process has no collectives
    top_level = sum(v for k, v in parts.items() if "." not in k)
    assert top_level == pytest.approx(r["step_median_s"])
    assert parts["eicue.eigensolver"] <= parts["eicue"] + 1e-9
    order = list(parts)
    assert order.index("backbone") < order.index("eicue") < order.index("eicue.affinities") < order.index("corr")
    assert r["machine"]["torch_threads"] == 1
    printed = capsys.readouterr().out
    assert "step median" in printed and "ratio" in printed and "eicue.eigensolver" in printed


def test_step_at_several_batch_sizes_reports_a_component_table(tmp_path, capsys):
    argv = ["step", "--batch-sizes", "2,1", "data.resolution=64", "--warmup", "1", "--steps", "2",
            "--large-steps", "1", "--threads", "1"]
    r = run_bench(argv, tmp_path, "sizes")
    assert r["batch_sizes"] == [1, 2] and set(r["by_batch_size"]) == {"1", "2"}
    one, two = r["by_batch_size"]["1"], r["by_batch_size"]["2"]
    assert r["batch_size_per_process"] == 1 and r["step_median_s"] == one["step_median_s"]
    assert len(one["step_times_s"]) == 2 and len(two["step_times_s"]) == 1  # --large-steps after the smallest
    # blur_p = 0.5: the expected share of img_aug is blurred, the rest reuses img's keys
    assert one["backbone_passes_per_step"] == 2.0 and two["backbone_passes_per_step"] == 1.5
    table = r["component_table"]
    for row in ("backbone", "heads", "nce", "probes", "backward", "step", "backbone passes", "peak memory MiB"):
        assert set(table[row]) == {"1", "2"}, row
    assert table["peak memory MiB"]["2"] >= table["peak memory MiB"]["1"] > 0
    assert table["step"]["2"] == two["step_median_s"] and two["peak_memory_bytes"] > 0
    assert "per-component medians" in capsys.readouterr().out


def test_step_rejects_a_bad_override_by_name():
    with pytest.raises(SystemExit, match="eicue.solver"):
        bench.main(["step", "eicue.solver=lapack", *TINY_STEP])


def test_eigen_compares_solvers_against_float64(tmp_path):
    r = run_bench(["eigen", "--batch", "2", "--side", "8", "--repeats", "1", "--cases", "model,sbm",
                   "--threads", "1"], tmp_path, "eigen")
    assert set(r["cases"]) == {"model", "model_aug_view", "sbm"}
    assert set(r["solvers"]) == {"eigh", "eigh64", "krylov"}
    for case in r["cases"].values():
        for entry in case["solvers"].values():
            assert entry["time_s"] > 0
            assert 0.0 <= entry["map_agreement"] <= 1.0
            assert math.isfinite(entry["max_subspace_err"])
        ref = case["solvers"]["eigh64"]
        assert ref["max_subspace_err"] < 1e-6 and ref["map_agreement"] == 1.0
    fast = r["solvers"]["krylov"]
    assert fast["max_subspace_err"] < 1e-3 and fast["map_agreement"] >= 0.99
    assert fast["max_eigenvalue_err"] < 1e-5 and fast["krylov_converged"]
    assert "krylov_warm" in r["cases"]["model_aug_view"]["solvers"]
    assert r["cases"]["model"]["n"] == 64 and r["cases"]["model"]["batch"] == 2
    assert set(r["targets_on_model_case"]) >= {"speedup_ge_20", "subspace_err_le_1e-3", "map_agreement_ge_0.99"}


def test_eigen_metrics_detect_wrong_answers():
    gen = torch.Generator().manual_seed(0)
    ref = torch.linalg.qr(torch.randn(3, 50, 4, generator=gen, dtype=torch.float64)).Q
    assert float(eigen.subspace_error(ref, ref).max()) < 1e-12
    # Column signs and rotations inside the span do not count as subspace errors ...
    mixed = ref @ torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64)).Q
    assert float(eigen.subspace_error(-mixed, ref).max()) < 1e-12
    # ... but they do change individual vectors, and a foreign direction changes the span.
    assert float(eigen.vector_errors(mixed, ref).max()) > 0.1
    assert float(eigen.vector_errors(-ref, ref).max()) < 1e-12
    other = ref.clone()
    other[:, :, 3] = torch.linalg.qr(torch.randn(3, 50, 5, generator=gen, dtype=torch.float64)).Q[:, :, 4]
    assert float(eigen.subspace_error(other, ref).max()) > 0.1
    centroids = torch.randn(32, 3, generator=gen)
    assert torch.equal(eigen.eicue_map(ref, centroids), eigen.eicue_map(ref.clone(), centroids))


def test_synthetic_images_are_normalised_flat_regions():
    img = synth.synthetic_images(2, 32, regions=3, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 32, 32)
    assert len(torch.unique(img[0].flatten(1), dim=1).T) <= 3  # at most three colours without noise
    assert float(img.min()) >= -2.2 and float(img.max()) <= 2.7  # ImageNet-normalised [0, 1] pixels


def test_every_subcommand_is_dispatched_with_its_arguments(monkeypatch):
    seen = {}
    for name in bench.COMMANDS:
        monkeypatch.setitem(bench.COMMANDS, name, lambda argv, name=name: seen.setdefault(name, argv) and 0)
    for name in ("step", "eigen", "data", "gpu", "components"):
        assert bench.main([name, "--x", name]) == 0
    assert seen == {name: ["--x", name] for name in ("step", "eigen", "data", "gpu", "components")}


def test_usage_and_unknown_commands(capsys):
    assert bench.main([]) == 2
    assert bench.main(["--help"]) == 0
    assert bench.main(["fly"]) == 2
    assert "step" in capsys.readouterr().out


def test_profiling_sections_are_free_when_off_and_add_up_when_on():
    assert profiling.section("x") is profiling.section("y")  # one shared no-op context
    with profiling.recording("cpu") as rec:
        for _ in range(2):
            with profiling.section("part"):
                sum(range(1000))
        with pytest.raises(RuntimeError, match="already active"):
            with profiling.recording("cpu"):
                pass
    assert set(rec.totals()) == {"part"} and rec.totals()["part"] > 0
    assert profiling.section("z") is profiling.section("y")


@pytest.mark.multiproc
def test_step_under_torchrun_reports_communication(tmp_path):
    import os
    import subprocess

    out = tmp_path / "dist.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "eagle_dist.bench", "step", *TINY_STEP, "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["images_per_s"] == pytest.approx(2 / r["step_median_s"])
    assert r["breakdown"]["comm"] >= r["breakdown"]["comm.grad_allreduce"] >= 0
    assert r["step_median_slowest_rank_s"] >= r["step_median_s"]


def test_data_rounds_alternate_the_pipelines_and_report_medians(tmp_path, capsys):
    argv = ["data", "--count", "8", "--size", "48x64", "--workers", "1", "--batch-size", "4", "--resolution", "16",
            "--steps", "2", "--rounds", "3", "--samples-per-shard", "10", "--shuffle-buffer", "4"]
    r = run_bench(argv, tmp_path, "data")
    stream = [row for row in r["rows"] if row["kind"] == "stream"]
    assert [row["pipeline"] for row in stream] == ["webdataset shards", "per-file PIL (official)"]
    for row in stream:
        assert len(row["rounds"]) == 3 and all(rate > 0 for rate in row["rounds"])
        assert row["images_per_s"] == round(sorted(row["rounds"])[1], 1)  # the median of the 3
    assert r["config"]["rounds"] == 3 and r["finish_batch_cpu_ms"] > 0
    printed = capsys.readouterr().out
    assert "median of 3 alternating rounds" in printed and "finish_batch" in printed
    assert bench.main(["data", "--rounds", "0"]) == 2


def test_components_times_both_parts_forward_and_backward(tmp_path, capsys, monkeypatch):
    out = tmp_path / "components.json"
    assert components.main(["--batch-sizes", "2", "--reps", "1", "--rounds", "2", "--threads", "1",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["official"] is None and result["batch_sizes"] == [2]
    for part in components.PARTS:
        timed = result["ours"]["2"][part]
        assert timed["forward_s"] > 0 and timed["backward_s"] > 0
        assert [math.isfinite(r[part]["loss"]) for r in result["ours"]["2"]["rounds"]] == [True, True]
    assert "nce   batch   2: ours" in capsys.readouterr().out
    monkeypatch.delenv("EAGLE_REF_DIR", raising=False)
    with pytest.raises(SystemExit, match="EAGLE_REF_DIR"):
        components.main(["--batch-sizes", "2", "--official-python", sys.executable])
