"""The README's "Train on your own images" recipe on a folder of generated photos without labels:
shard -> 2-process training with configs/folder.yaml (tiny overrides) -> predict / visualize.

    PYTHONPATH=$PWD python -m pytest -q tests/integration/test_own_images.py

One training run (module fixture) serves every check; the model and step count are tiny, so
most of the time is process start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import helpers
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
N_SEGMENTS = 5
BAD_ADVICE = "set model.n_classes=0"  # what the unlabeled path once told users (issue 17)

# configs/folder.yaml scaled down to seconds on a CPU; everything else comes from the file.
TINY = ["model.weights=null", *helpers.TINY_SIZES, f"model.n_clusters={N_SEGMENTS}", "train.max_steps=4",
        "train.log_interval=2", "eval.max_batches=2"]
SIZES = [(96, 128), (120, 90), (80, 80), (100, 150)]  # (height, width): photos come in any shape


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A 'photo': sky-like gradient, a ground band and one bright blob, with noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    img[..., 2] = 200 - 80 * y / h
    img[..., 1] = 140 - 40 * y / h
    ground = y > h * rng.uniform(0.5, 0.7)
    img[ground] = rng.uniform(40, 140, 3)
    cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.25) * min(h, w)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = rng.uniform(150, 255, 3)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Shard a label-free photo folder and train on it with 2 processes, as the README says."""
    from eagle_dist.cli import shard

    work = tmp_path_factory.mktemp("own")
    photos = work / "photos"
    (photos / "holiday").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        folder = photos / "holiday" if i % 2 else photos
        Image.fromarray(_photo(rng, h, w)).save(folder / f"img_{i}.jpg", quality=90)
    shards = work / "shards" / "mine" / "train"
    summary = shard.run(["--source", "folder", "--root", str(photos), "--split", "train", "--out", str(shards),
                         "--samples-per-shard", "7", "--workers", "1", "--no-progress"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(helpers.free_port()), str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "folder.yaml"),
           *TINY, f"data.train_shards={shards}", f"train.output_dir={work / 'runs'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, f"STDOUT:\n{out.stdout[-4000:]}\nSTDERR:\n{out.stderr[-6000:]}"
    return {"photos": photos, "shards": shards, "shard_summary": summary, "run": work / "runs" / "mine",
            "stdout": out.stdout, "stderr": out.stderr}


@pytest.mark.multiproc
def test_shard_train_without_labels_reports_label_free_evaluation(trained):
    assert trained["shard_summary"]["samples"] == 5 * len(SIZES)  # five crops per photo
    assert "no labels" in trained["shard_summary"]["note"]
    stdout, both = trained["stdout"], trained["stdout"] + trained["stderr"]
    assert "world size 2 (ddp, gloo, cpu)" in stdout
    assert stdout.count("training without labels") == 1  # said once, by rank 0
    assert "linear probe and the supervised metrics (mIoU, accuracy) are off" in stdout
    assert "EiCue agreement between the two views" in stdout and "final results: 4 steps" in stdout
    assert BAD_ADVICE not in both and "mIoU" not in stdout.split("final results")[1]

    run = trained["run"]
    saved = (run / "config.yaml").read_text()
    assert "n_classes: 0" in saved and f"n_clusters: {N_SEGMENTS}" in saved
    for name in ("samples.png", "eicue.png"):
        with Image.open(run / "figures" / name) as im:
            assert im.width > 64 and im.height > 64, name

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("eagle-dist").experiment_id])
    metrics = mlrun.data.metrics
    assert mlrun.data.params["model.n_classes"] == "0"
    assert "loss_linear" not in metrics and not any("mIoU" in k for k in metrics)
    shares = [metrics[f"eval/segment_{k:02d}_pixel_share"] for k in range(N_SEGMENTS)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)
    assert 1 <= metrics["eval/segments_used"] <= N_SEGMENTS
    assert 0.0 < metrics["eval/eicue_agreement"] <= 1.0
    assert metrics["eval/images"] > 0
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "eval/eicue_agreement")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "figures")}
    assert {"figures/samples.png", "figures/eicue.png"} <= artifacts


@pytest.mark.multiproc
def test_predict_and_visualize_without_labels_write_segments_and_a_legend(trained, tmp_path, capsys):
    from eagle_dist.cli import predict, visualize

    out = tmp_path / "pred"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning
        assert predict.main(["--checkpoint", str(trained["run"]), "--input", str(trained["photos"]),
                             "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"segment ids 0..{N_SEGMENTS - 1} (trained without labels)" in printed
        for i, (h, w) in enumerate(SIZES):
            with Image.open(out / "labels" / f"img_{i}.png") as im:
                ids = np.asarray(im)
            assert ids.shape == (h, w) and ids.max() < N_SEGMENTS
            with Image.open(out / "overlays" / f"img_{i}.png") as im:
                assert im.size == (w, h) and im.mode == "RGB"
        legend = json.loads((out / "legend.json").read_text())
        assert [e["name"] for e in legend["ids"]] == [f"segment {k}" for k in range(N_SEGMENTS)]
        assert sum(e["pixel_share"] for e in legend["ids"]) == pytest.approx(1.0)
        assert (out / "legend.png").is_file()

        assert predict.main(["--checkpoint", str(trained["run"]), "--input", str(trained["photos"]),
                             "--out", str(tmp_path / "lin"), "--probe", "linear"]) == 2
        assert "trained without labels" in capsys.readouterr().err

        fig = tmp_path / "eicue.png"
        assert visualize.main(["eigen", "--checkpoint", str(trained["run"]), "--input",
                               str(trained["photos"] / "img_0.jpg"), "--out", str(fig)]) == 0
        with Image.open(fig) as im:
            assert im.width > im.height  # one row: image, eigenvectors, EiCue, k-means


def test_class_count_mismatch_gives_advice_that_works(tmp_path):
    """Labelled shards with the wrong model.n_classes: the message names both ways out, and the
    label-free one (model.n_classes=0) is a valid config now."""
    from eagle_dist.config import load_config
    from eagle_dist.data.shards import ShardOptions, build
    from eagle_dist.data.sources import SyntheticSpec
    from eagle_dist.data.stream import DataError
    from eagle_dist.engine.trainer import Trainer

    shards = tmp_path / "train"
    build(ShardOptions(source="synthetic", split="train", out=shards, quiet=True, progress=False,
                       source_options={"spec": SyntheticSpec(count=2, height=32, width=32, num_classes=3)}))
    cfg = load_config(None, [f"data.train_shards={shards}", "model.n_classes=5", "dist.cpu_threads=1",
                             f"train.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError) as err:
        Trainer(cfg)
    message = str(err.value)
    assert "set model.n_classes=3, or model.n_classes=0 to train without the labels" in message
    assert BAD_ADVICE not in message
    assert load_config(None, ["model.n_classes=0"]).model.cluster_count == 12


def test_eicue_agreement_is_blind_to_id_names_and_maps_ids_back():
    import torch

    from eagle_dist.evaluation.loop import _matched_agreement

    a = torch.tensor([[0, 0, 1, 1, 2, 2], [3, 3, 3, 3, 3, 0]])
    renamed = torch.tensor([2, 0, 1, 3])[a]  # the same partition under other names
    noisy = renamed.clone()
    noisy[1, 0] = 1  # one pixel of the second image disagrees
    agree, table = _matched_agreement(a, noisy, 4)
    assert agree.tolist() == pytest.approx([1.0, 5 / 6])
    assert torch.equal(torch.gather(table, 1, renamed), a)


def test_mixed_folder_uses_labels_where_present(tmp_path):
    """A label folder that covers some images: the others are stored unlabelled, and said so."""
    from eagle_dist.data.sources import open_source

    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        Image.fromarray(_photo(rng, 24, 32)).save(images / f"{name}.png")
    Image.fromarray(np.full((24, 32), 1, np.uint8), "L").save(labels / "a.png")
    src = open_source("folder", images, "train", labels=labels, num_classes=2)
    loaded = {it.image: src.load(it).label for it in src.items()}
    assert (loaded["a.png"] == 1).all() and (loaded["b.png"] == -1).all() and (loaded["c.png"] == -1).all()
    assert src.note.startswith("2 of 3 images have no label PNG")


def test_demo_config_pointed_at_photo_shards_trains_without_labels_on_them(tmp_path, capsys):
    """The issue's first attempt: the embedded default with data.train_shards=<photo shards>.  No
    synthetic shards are generated next to them, the model switches to no labels, and the
    synthetic validation split of another dataset is not used for evaluation."""
    from eagle_dist.config import load_config
    from eagle_dist.data.shards import ShardOptions, build
    from eagle_dist.data.sources import SyntheticSpec
    from eagle_dist.engine.trainer import Trainer
    from eagle_dist.method.backbone import WeightsError

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(_photo(rng, 40, 48)).save(photos / f"{i}.jpg")
    mine, synthetic_val = tmp_path / "mine", tmp_path / "synthetic_val"
    build(ShardOptions(source="folder", root=str(photos), split="train", out=mine, quiet=True, progress=False))
    build(ShardOptions(source="synthetic", split="val", out=synthetic_val, quiet=True, progress=False,
                       source_options={"spec": SyntheticSpec(count=2, height=32, width=32)}))
    # A missing weights file stops the trainer right after the data checks: what they decided is
    # visible without building a model or an MLflow run (the 2-process test covers those).
    cfg = load_config(REPO / "configs" / "default.yaml", [
        f"data.train_shards={mine}", f"data.val_shards={synthetic_val}", f"model.weights={tmp_path / 'none.pth'}",
        "dist.cpu_threads=1", f"train.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(WeightsError):
        Trainer(cfg)
    out = capsys.readouterr().out
    assert cfg.model.n_classes == 0 and cfg.model.cluster_count == cfg.model.n_clusters
    assert f"training without labels (the shards in {mine} carry no labels)" in out
    assert "holds dataset 'synthetic6', the training shards 'folder'; evaluating on the training shards" in out
    assert "building synthetic" not in out
