"""`python -m eagle_dist.evaluate` on a checkpoint trained in this module (tiny ViT, synthetic shards).

Covers: outputs with and without flip / CRF, a no-flip/no-CRF evaluation that reproduces the
trainer's own final validation, explicit checkpoint selection and the refusal of incomplete
folders, the nested MLflow run, the missing-CRF error, DenseCRF on hand-made inputs, and a
2-process (torchrun, gloo) evaluation whose confusion matrices equal the 1-process ones.
Metric maths (Hungarian vs brute force, protocols, absent classes) is in test_core_components.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
HAVE_CRF = importlib.util.find_spec("pydensecrf") is not None
needs_crf = pytest.mark.skipif(not HAVE_CRF, reason="DenseCRF extra not installed: pip install 'eagle-dist[crf]'")

# The shared tiny run, 4 steps with checkpoints at 2 and 4 (kept), the u switch after step 1.
TINY = [*helpers.TINY, "loss.step_schedulers=1", "train.max_steps=4", "train.keep_last=3"]
VAL_IMAGES = 7


def _run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=helpers.launch_env(), cwd=REPO)
    if ok:
        assert out.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{out.stdout[-4000:]}\nSTDERR:\n{out.stderr[-6000:]}"
    return out


def _evaluate(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "eagle_dist.evaluate", *args], ok=ok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, its shards and the trainer's summary."""
    root = tmp_path_factory.mktemp("eval")
    helpers.synthetic_shards(root, {"train": 12, "val": VAL_IMAGES}, per_shard=3)
    out = root / "harness"
    _run([sys.executable, str(REPO / "tests" / "train_harness.py"), str(out), *TINY,
          f"data.train_shards={root / 'train'}", f"data.val_shards={root / 'val'}",
          f"train.output_dir={root / 'runs'}", "train.run_name=tiny"])
    summary = json.loads((out / "summary.json").read_text())
    run = Path(summary["run_dir"])
    assert (run / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    return {"run": run, "val": root / "val", "summary": summary, "root": root}


def _read(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_no_flip_no_crf_reproduces_training_validation_and_writes_outputs(trained, tmp_path):
    out = tmp_path / "eval"
    res = _evaluate("--checkpoint", str(trained["run"]), "--shards", str(trained["val"]), "--out", str(out),
                    "--no-flip", "--no-crf", "--no-mlflow", "--samples", "3")
    report = _read(out)
    assert report["checkpoint"]["step"] == 4 and report["checkpoint"]["selected"] == "last"
    assert report["protocol"]["flip"] is False and report["protocol"]["crf"] is False
    assert report["protocol"]["resolution"] == 64 and report["images"] == VAL_IMAGES
    # The trainer's final validation is this protocol on the same checkpoint: same numbers,
    # which also shows the random backbone was rebuilt exactly.
    final = trained["summary"]["summary"]
    for key in ("cluster_official", "cluster_strict", "linear_official", "linear_strict"):
        assert report["metrics"][key]["mIoU"] == pytest.approx(final[f"eval/{key}_mIoU"], abs=1e-9)
        assert report["metrics"][key]["accuracy"] == pytest.approx(final[f"eval/{key}_acc"], abs=1e-9)
    manifest = json.loads((trained["val"] / "manifest.json").read_text())
    names = [c["name"] for c in manifest["classes"]]
    assert report["class_names"] == names
    assert set(report["per_class_iou"]["cluster_official"]) == set(names)
    assert report["pixels"]["labelled"] == int(np.asarray(report["confusion"]["cluster"]).sum())
    assert report["pixels"]["dropped_official_cluster"] == int(np.asarray(report["confusion"]["cluster"])[4:].sum())
    assignment = json.loads((out / "assignment.json").read_text())
    assert len(assignment["strict"]) == 5 and set(assignment["strict"]) <= {-1, 0, 1, 2, 3}
    for png in ("confusion_cluster.png", "confusion_linear.png", "samples.png", "iou_per_class.png"):
        with Image.open(out / png) as im:
            assert im.width > 20 and im.height > 20
    with Image.open(out / "samples.png") as im:  # 3 rows of 64 px tiles (enlarged), titles, legend
        tile = 64 * -(-160 // 64)
        assert im.height > 3 * tile and im.width == 4 * tile + 3 * 4
    assert "official protocol dropped" in res.stdout and names[0] in res.stdout


@needs_crf
def test_flip_and_crf_on_a_named_step_logs_a_nested_mlflow_run(trained):
    step_dir = trained["run"] / "checkpoints" / "step-00000002"
    # In-process CRF here; the pool path runs in the 2-process test and the CRF unit test.
    res = _evaluate("--checkpoint", str(step_dir), "--shards", str(trained["val"]), "--crf-workers", "0")
    out = trained["run"] / "eval" / "step-00000002"  # the default output folder
    report = _read(out)
    assert report["checkpoint"]["step"] == 2 and report["checkpoint"]["selected"] == "step 2"
    p = report["protocol"]
    assert p["flip"] is True and p["crf"] is True and p["cluster_alpha"] == 4.0
    assert p["crf_params"]["bilateral"] == {"sxy": 67, "srgb": 3, "compat": 4}
    assert p["crf_params"]["gaussian"] == {"sxy": 1, "compat": 3} and p["crf_params"]["iterations"] == 10
    assert report["pixels"]["labelled"] == VAL_IMAGES * 64 * 64
    assert all(v["accuracy"] is not None for v in report["metrics"].values())

    from mlflow import MlflowClient

    parent = report["checkpoint"]["mlflow_parent_run_id"]
    assert parent == trained["summary"]["run_id"]
    client = MlflowClient(f"sqlite:///{trained['run'].resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 1 and "MLflow: run" in res.stdout
    child = runs[0]
    logged = child.data.metrics["eval/cluster_official_mIoU"]
    assert logged == pytest.approx(report["metrics"]["cluster_official"]["mIoU"])
    assert child.data.params["protocol.crf"] == "True"
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"metrics.json", "confusion_cluster.png", "samples.png", "assignment.json"} <= artifacts


@pytest.mark.multiproc
def test_two_processes_give_the_same_confusion_matrices_as_one(trained, tmp_path):
    # Batch 1 and one thread per process: every image goes through the same arithmetic in both
    # runs, so the sums must agree exactly (any lost, duplicated or misrouted image shows).
    common = ["--checkpoint", str(trained["run"]), "--shards", str(trained["val"]), "--no-mlflow",
              "--cpu-threads", "1", "--crf-workers", "1", "--flip", "--crf" if HAVE_CRF else "--no-crf",
              "data.val_batch_size=1"]
    _evaluate(*common, "--out", str(tmp_path / "one"))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(helpers.free_port()),
          "-m", "eagle_dist.evaluate", *common, "--out", str(tmp_path / "two")])
    one, two = _read(tmp_path / "one"), _read(tmp_path / "two")
    assert two["protocol"]["world_size"] == 2 and one["protocol"]["world_size"] == 1
    assert one["images"] == two["images"] == VAL_IMAGES
    assert one["confusion"] == two["confusion"]
    assert one["metrics"] == two["metrics"]


def test_checkpoint_selection_is_explicit_and_refuses_incomplete_folders(trained, tmp_path):
    from eagle_dist.checkpoint import CheckpointError
    from eagle_dist.evaluation.inference import EvaluateError, resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained["run"] / "checkpoints", run / "checkpoints")
    assert resolve_checkpoint(run) == (run / "checkpoints" / "step-00000004", "last")
    assert resolve_checkpoint(run, step=2) == (run / "checkpoints" / "step-00000002", "step 2")
    assert resolve_checkpoint(run / "checkpoints" / "step-00000002")[1] == "step 2"
    with pytest.raises(CheckpointError, match="complete steps: 2, 4"):
        resolve_checkpoint(run, step=3)
    with pytest.raises(EvaluateError, match="contradicts"):
        resolve_checkpoint(run / "checkpoints" / "step-00000002", step=4)
    # A newer folder that never got its marker is neither "last" nor loadable by name.
    broken = run / "checkpoints" / "step-00000006"
    shutil.copytree(run / "checkpoints" / "step-00000004", broken)
    (broken / "COMPLETE").unlink()
    assert resolve_checkpoint(run)[0].name == "step-00000004"
    with pytest.raises(CheckpointError, match="COMPLETE"):
        resolve_checkpoint(broken)
    res = _evaluate("--checkpoint", str(broken), "--no-crf", ok=False)
    assert res.returncode == 2
    assert "COMPLETE" in res.stderr and "Traceback" not in res.stderr


def test_crf_without_the_extra_is_one_clear_error(monkeypatch):
    from eagle_dist.evaluation import crf

    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # makes `import pydensecrf...` fail
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(crf.CRFUnavailableError, match=r"pip install 'eagle-dist\[crf\]'"):
        crf.require()
    with pytest.raises(crf.CRFUnavailableError):
        crf.CRFPool(0)


@needs_crf
def test_dense_crf_keeps_confident_maps_and_cleans_a_noisy_pixel():
    from eagle_dist.evaluation import crf

    h, w, c = 24, 32, 3
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, w // 2:] = 200
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2:] = 2
    probs = np.full((c, h, w), 0.2, dtype=np.float32)
    probs[truth, np.arange(h)[:, None], np.arange(w)[None, :]] = 0.6
    probs[:, 5, 5] = [0.3, 0.4, 0.3]  # a weakly wrong pixel inside the class-0 half
    log_probs = torch.from_numpy(np.log(probs / probs.sum(0)))
    marginals = crf.dense_crf(image, log_probs.numpy())
    assert marginals.shape == (c, h, w)
    np.testing.assert_allclose(marginals.sum(0), 1.0, atol=1e-4)
    assert (log_probs.argmax(0).numpy() != truth).sum() == 1
    assert (marginals.argmax(0) == truth).all()
    # The pool path gives the same answer as the in-process one, per map, in order.
    batch = log_probs.unsqueeze(0).repeat(2, 1, 1, 1)
    with crf.CRFPool(1) as pool:
        first, second = pool.refine(np.stack([image, image]), batch, batch.flip(1))
    assert first.shape == (2, h, w) and (first == torch.from_numpy(truth)).all()
    assert (second == 2 - torch.from_numpy(truth)).all()


def test_to_uint8_undoes_the_loader_normalisation():
    from eagle_dist.evaluation import crf
    from eagle_dist.data.stream import IMAGENET_MEAN, IMAGENET_STD

    rgb = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = rgb.float().div(255).sub(mean).div(std)
    back = crf.to_uint8(normalised)
    assert back.shape == (2, 5, 7, 3) and back.dtype == np.uint8
    # Truncation like to_pil_image may lose one level where the float round trip lands below.
    diff = rgb.permute(0, 2, 3, 1).numpy().astype(int) - back.astype(int)
    assert diff.min() >= 0 and diff.max() <= 1
