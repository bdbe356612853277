"""`python -m eagle_dist.predict` and `python -m eagle_dist.visualize eigen` on a hand-written checkpoint.

The checkpoint is written in the trainer's on-disk format (model.safetensors, trainer_state.json
with the resolved config, COMPLETE marker) from freshly initialised tiny heads: prediction needs
a loadable model, not a trained one, and this keeps the file fast.  Both tools run in-process.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

N_CLASSES, EXTRA = 4, 1
OVERRIDES = [
    "model.backbone=vit_tiny_patch16_224", "model.dim=32", f"model.n_classes={N_CLASSES}",
    f"model.extra_clusters={EXTRA}", "model.eigen_clusters=6", "data.val_resolution=64", "train.seed=3",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from eagle_dist import checkpoint as ckpt
    from eagle_dist.method.backbone import FrozenViT
    from eagle_dist.config import load_config, to_dict
    from eagle_dist.method.eagle import EagleHeads

    cfg = load_config(None, OVERRIDES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = FrozenViT(cfg.model.backbone, None)
    heads = EagleHeads(cfg.model, cfg.eicue, cfg.loss, backbone.out_channels)
    run = tmp_path_factory.mktemp("predict") / "tiny"
    step = run / "checkpoints" / ckpt.step_dir_name(5)
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(step / ckpt.MODEL_FILE))
    state = {"format": ckpt.FORMAT_VERSION, "step": 5, "world_size": 1, "strategy": "ddp", "zero_stage": None,
             "extra": {"step": 5, "config": to_dict(cfg)}}
    (step / ckpt.STATE_FILE).write_text(json.dumps(state))
    (step / ckpt.MARKER).write_text("{}")
    return run


@pytest.fixture
def images(tmp_path) -> Path:
    """Two images of odd sizes and modes, one corrupt JPEG, one text file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (37, 90, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 256, (130, 61), dtype=np.uint8), mode="L").save(folder / "sub" / "tall.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


SIZES = {"wide": (90, 37), "tall": (61, 130)}


def _predict(*args: str) -> int:
    from eagle_dist.cli import predict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-backbone warning
        return predict.main(list(args))


def test_predict_writes_labels_and_overlays_at_input_size_and_skips_corrupt_files(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict("--checkpoint", str(run), "--input", str(images), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "skipped 1 unreadable" in err
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["tall.png", "wide.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["tall.png", "wide.png"]
    for stem, size in SIZES.items():
        with Image.open(out / "labels" / f"{stem}.png") as label, Image.open(out / "overlays" / f"{stem}.png") as ov:
            assert label.size == size and ov.size == size
            assert label.mode == "L" and ov.mode == "RGB"
            # No assignment table yet: raw cluster ids.
            assert np.asarray(label).max() < N_CLASSES + EXTRA


def test_predict_maps_clusters_to_classes_with_the_evaluation_table(run, images, tmp_path, capsys):
    table = [2, -1, 0, 3, 1]  # cluster 1 won no class
    folder = run / "eval" / "step-00000005"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "assignment.json").write_text(json.dumps({"strict": table, "checkpoint": {"step": 5}}))
    try:
        raw, mapped = tmp_path / "raw", tmp_path / "mapped"
        assert _predict("--checkpoint", str(run), "--input", str(images / "wide.jpg"), "--out", str(raw),
                        "--assignment", str(tmp_path / "missing.json")) == 2
        assert "not found" in capsys.readouterr().err
        assert _predict("--checkpoint", str(run / "checkpoints" / "step-00000005"), "--input",
                        str(images / "wide.jpg"), "--out", str(mapped)) == 0
        assert "Hungarian table" in capsys.readouterr().out
    finally:
        (folder / "assignment.json").unlink()
    assert _predict("--checkpoint", str(run), "--input", str(images / "wide.jpg"), "--out", str(raw)) == 0
    raw_ids = np.asarray(Image.open(raw / "labels" / "wide.png"))
    mapped_ids = np.asarray(Image.open(mapped / "labels" / "wide.png"))
    expected = np.array([c if c >= 0 else 255 for c in table])[raw_ids]
    np.testing.assert_array_equal(mapped_ids, expected)


def test_predict_linear_probe_and_nothing_readable(run, images, tmp_path, capsys):
    out = tmp_path / "lin"
    assert _predict("--checkpoint", str(run), "--input", str(images / "sub"), "--out", str(out),
                    "--probe", "linear") == 0
    assert np.asarray(Image.open(out / "labels" / "tall.png")).max() < N_CLASSES
    assert _predict("--checkpoint", str(run), "--input", str(images / "broken.jpg"), "--out", str(tmp_path / "x")) == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert _predict("--checkpoint", str(run), "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")) == 1


def test_same_stems_get_separate_outputs():
    from eagle_dist.cli.predict import output_stems

    assert output_stems([Path("a/x.jpg"), Path("b/x.png"), Path("c/y.png"), Path("d/x.jpg")]) == [
        "x_jpg", "x_png", "y", "x_jpg_1"]


def test_model_input_keeps_aspect_on_the_patch_grid():
    from eagle_dist.evaluation.inference import model_input

    x = model_input(Image.new("RGB", (300, 97)), short_side=64, patch=16)
    assert x.shape == (1, 3, 64, 192)  # 300 * 64 / 97 = 197.9 -> nearest multiple of 16


def test_visualize_eigen_writes_one_png(run, images, tmp_path):
    from eagle_dist.cli import visualize

    out = tmp_path / "eig.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert visualize.main(["eigen", "--checkpoint", str(run), "--input", str(images / "wide.jpg"),
                               "--out", str(out)]) == 0
    with Image.open(out) as im:
        # image + (eigen_k - 1 = 3) heat maps + EiCue + k-means panels side by side
        assert im.width > 6 * im.height / 2 and im.mode == "RGB"
    from eagle_dist.evaluation.inference import load_model, resolve_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(resolve_checkpoint(run)[0])
    maps = visualize.eigen_figure(loaded, Image.open(images / "wide.jpg").convert("RGB"), tmp_path / "e2.png", 64)
    assert maps["eigenvectors"].shape == (3, 4, 10)  # 64 x 160 input -> 4 x 10 tokens
    assert maps["eicue"].shape == maps["kmeans"].shape == (4, 10)
    assert len(np.unique(maps["kmeans"])) <= max(2, len(np.unique(maps["eicue"])))
