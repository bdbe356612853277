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


# --------------------------------------------------------------------------- any size, at scale


def _loaded(run):
    from eagle_dist.evaluation.inference import load_model, resolve_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(resolve_checkpoint(run)[0])


@pytest.mark.parametrize("probe", ["cluster", "linear"])
def test_banded_labels_equal_one_band_and_the_official_order(run, probe):
    """Bands of one row give the labels of one band over the whole image, and those are the
    official prediction (probe on the bilinearly upsampled code, then argmax) wherever the
    official top-1 / top-2 gap rules out a tie."""
    import torch
    import torch.nn.functional as F

    from eagle_dist.evaluation.inference import model_input, segment

    loaded = _loaded(run)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (97, 151, 3), dtype=np.uint8))
    banded = segment(loaded, image, 64, probe, band_rows=1)
    whole = segment(loaded, image, 64, probe, band_rows=10**6)
    assert banded.shape == (97, 151)
    np.testing.assert_array_equal(banded, whole)

    with torch.no_grad():
        code = loaded.heads.seg_head(loaded.backbone(model_input(image, 64, loaded.backbone.patch)))
        up = F.interpolate(code, size=(97, 151), mode="bilinear", align_corners=False)
        scores = loaded.heads.cluster_probe.inner_products(up) if probe == "cluster" else loaded.heads.linear_probe(up)
    top2 = scores[0].topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-4).numpy()
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(banded[clear], scores[0].argmax(0).numpy()[clear])
    assert len(np.unique(banded)) > 1  # a constant map would pass the comparisons above trivially


def test_images_above_the_pixel_limit_get_one_error_naming_the_option(run, tmp_path, capsys):
    from eagle_dist.cli import visualize

    photo = tmp_path / "big.png"
    Image.new("RGB", (120, 100), (90, 120, 30)).save(photo)
    assert _predict("--checkpoint", str(run), "--input", str(photo), "--out", str(tmp_path / "o"),
                    "--max-image-pixels", "5000") == 1
    err = capsys.readouterr().err
    assert "12,000 pixels is above the limit of 5,000" in err and "--max-image-pixels 12000" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert visualize.main(["eigen", "--checkpoint", str(run), "--input", str(photo), "--out",
                               str(tmp_path / "e.png"), "--max-image-pixels", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-image-pixels 12000" in err
    assert _predict("--checkpoint", str(run), "--input", str(photo), "--out", str(tmp_path / "o"),
                    "--max-image-pixels", "12000") == 0


def _state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (hidden ones included) with its inode and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reruns_skip_finished_images_and_overwrite_redoes_them(run, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict("--checkpoint", str(run), "--input", str(images), "--out", str(out)) == 0
    first, legend = _state(out), json.loads((out / "legend.json").read_text())
    pairs = [f"{d}/{s}.png" for d in ("labels", "overlays") for s in SIZES]
    assert set(pairs) <= set(first) and not [n for n in first if "partial" in n]

    (out / "labels" / ".wide.4242-partial.png").write_bytes(b"half a png")  # what a killed run leaves
    assert _predict("--checkpoint", str(run), "--input", str(images), "--out", str(out)) == 0
    assert "segmented 0 of 3 images" in capsys.readouterr().out  # 2 done, broken.jpg unreadable
    after = _state(out)
    assert {n: after[n] for n in pairs} == {n: first[n] for n in pairs}  # not rewritten
    assert not [n for n in after if "partial" in n]
    assert json.loads((out / "legend.json").read_text()) == legend  # the skipped images' pixels still count

    # The overlay of 'tall' written, its label (written last) not: only 'tall' is redone.
    (out / "labels" / "tall.png").unlink()
    assert _predict("--checkpoint", str(run), "--input", str(images), "--out", str(out)) == 0
    assert "segmented 1 of 3 images" in capsys.readouterr().out
    redone = _state(out)
    assert redone["labels/wide.png"] == first["labels/wide.png"]
    assert redone["overlays/tall.png"] != first["overlays/tall.png"]

    # Other settings into the same folder: refused, nothing touched; --overwrite redoes all.
    assert _predict("--checkpoint", str(run), "--input", str(images), "--out", str(out), "--probe", "linear") == 2
    assert "other settings" in capsys.readouterr().err and _state(out) == redone
    assert _predict("--checkpoint", str(run), "--input", str(images), "--out", str(out), "--probe", "linear",
                    "--overwrite") == 0
    final = _state(out)
    assert all(final[n][0] != redone[n][0] for n in pairs)  # each replaced by a new file


def test_a_failed_write_leaves_neither_a_half_png_nor_a_temporary_file(tmp_path, monkeypatch):
    from eagle_dist.cli.predict import save_png

    def half_then_fail(im, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    target = tmp_path / "x.png"
    monkeypatch.setitem(Image.SAVE, "PNG", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_png(Image.new("RGB", (4, 4)), target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.multiproc
def test_two_process_predict_killed_halfway_continues_and_matches_one_process(run, tmp_path):
    """torchrun, 2 processes, SIGTERM to the whole job once a few outputs exist; the rerun writes
    only the rest, each image once, and the result equals a 1-process run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import helpers

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    n = 16
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.jpg")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(helpers.free_port()), "-m", "eagle_dist.predict", "--checkpoint", str(run), "--input", str(photos),
           "--out", str(out), "--cpu-threads", "1"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=helpers.launch_env(),
                                cwd=helpers.REPO, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(list((out / "labels").glob("p*.png"))) < 2 and proc.poll() is None:
                assert time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to both workers
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    before = _state(out)
    done = [p for p in before if p.startswith("labels/p")]
    assert 2 <= len(done) < n, f"the job was not stopped halfway: {len(done)} of {n} done"

    rerun = helpers.run_ok(cmd[:6] + [str(helpers.free_port())] + cmd[7:])
    assert f"segmented {n - len(done)} of {n} images" in rerun.stdout and f"({len(done)} were already done)" in rerun.stdout
    after = _state(out)
    assert {p: after[p] for p in done} == {p: before[p] for p in done}  # finished ones never rewritten
    assert sorted(p for p in after if p.startswith(("labels/", "overlays/"))) == sorted(
        f"{d}/p{i:02d}.png" for d in ("labels", "overlays") for i in range(n))  # all there, no temporaries

    single = tmp_path / "single"
    assert _predict("--checkpoint", str(run), "--input", str(photos), "--out", str(single)) == 0
    for name in sorted(p for p in after if p.endswith(".png")):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(single / name)), name)
    assert json.loads((out / "legend.json").read_text()) == json.loads((single / "legend.json").read_text())


def test_device_choice_is_one_clear_error_when_it_cannot_work(run, tmp_path, capsys):
    import torch

    from eagle_dist.evaluation.inference import EvaluateError, pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(EvaluateError, match="not a device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        assert _predict("--checkpoint", str(run), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--device", "cuda") == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
