"""DINOv2 backbones: our KK features from the official weight files against the official model's.

The fixture folder is ``$EAGLE_DINOV2_FIXTURES`` (default ``../shared/fixtures/dinov2`` next to
the repository; format in its README).  Every weight file and input size is read from
``expected.npz``'s meta; the weight files are looked up as ``<name>`` or ``<name>.gz`` in the
fixture folder, then in ``$EAGLE_DINOV2_WEIGHTS`` if that is set.

    .venv/bin/python -m pytest tests/integration/test_dinov2.py -rA -s    # prints the largest error per file and size
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import helpers
import pytest
import torch

from eagle_dist.method.backbone import FrozenViT, WeightsError
from eagle_dist.method import dinov2

REPO_ROOT = Path(__file__).resolve().parents[2]
ATOL = RTOL = 1e-4  # the fixture README's tolerance


FIXTURE_DIR = helpers.fixture_dir("EAGLE_DINOV2_FIXTURES", "dinov2")
EXPECTED = FIXTURE_DIR / "expected.npz"


def _meta() -> dict:
    if not EXPECTED.is_file():
        return {"models": {}, "sizes": []}
    with np.load(EXPECTED, allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


META = _meta()
MODELS = sorted(META["models"])


@pytest.fixture(scope="module")
def expected():
    with np.load(EXPECTED, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """name -> path of the plain .pth (fixture gzips are decompressed once per session)."""
    folders = [FIXTURE_DIR] + ([Path(os.environ["EAGLE_DINOV2_WEIGHTS"])] if os.environ.get("EAGLE_DINOV2_WEIGHTS") else [])
    out_dir = tmp_path_factory.mktemp("dinov2_weights")
    found = {}
    for name in MODELS:
        for folder in folders:
            if (folder / name).is_file():
                found[name] = folder / name
                break
            if (folder / f"{name}.gz").is_file():
                found[name] = out_dir / name
                with gzip.open(folder / f"{name}.gz", "rb") as src, open(found[name], "wb") as dst:
                    shutil.copyfileobj(src, dst)
                break
        else:
            pytest.fail(f"weight file {name} (or {name}.gz) not found in {', '.join(map(str, folders))}; "
                        "set EAGLE_DINOV2_WEIGHTS to the folder holding it")
    return found


def test_fixture_folder_has_models():
    assert EXPECTED.is_file(), (f"{EXPECTED} does not exist; set EAGLE_DINOV2_FIXTURES to the folder holding "
                                "expected.npz and the DINOv2 weight files")
    assert MODELS and META["sizes"], f"{EXPECTED}: meta lists no models or no input sizes"


@pytest.mark.parametrize("name", MODELS)
def test_names_and_interpolation_rule_match_the_official_hub(name):
    model = META["models"][name]
    assert dinov2.timm_name(model["stem"]) == model["timm_name"]
    assert dinov2.register_count(model["timm_name"]) == model["num_register_tokens"]
    rule = dinov2.pos_embed_rule(model["timm_name"])
    assert rule.offset == pytest.approx(model["interpolate_offset"])
    assert rule.antialias == model["interpolate_antialias"]


@pytest.mark.parametrize("name", MODELS)
def test_kk_features_match_the_official_model(name, expected, weight_files):
    model = META["models"][name]
    vit = FrozenViT(model["timm_name"], weights=weight_files[name])
    failures = []
    for h, w in META["sizes"]:
        ref = torch.from_numpy(expected[f"out__{model['stem']}__kk_{h}x{w}"])
        ours = vit(torch.from_numpy(expected[f"in__img_{h}x{w}"]))
        assert ours.shape == ref.shape, f"{name} at {h}x{w}: {tuple(ours.shape)} vs {tuple(ref.shape)}"
        err = (ours - ref).abs()
        print(f"{name} {h}x{w}: largest KK error {float(err.max()):.3g} (|ref| up to {float(ref.abs().max()):.3g})")
        if not (err <= ATOL + RTOL * ref.abs()).all():
            failures.append(f"{h}x{w}: largest error {float(err.max()):.3g}")
    assert not failures, f"{name}: KK features differ from the official model: " + "; ".join(failures)


@pytest.mark.parametrize("name", MODELS)
def test_a_timm_checkpoint_and_the_official_stem_load_the_same_model(name, expected, weight_files, tmp_path):
    model = META["models"][name]
    vit = FrozenViT(model["timm_name"], weights=weight_files[name])
    torch.save({"state_dict": vit.vit.state_dict()}, tmp_path / "timm_layout.pth")
    again = FrozenViT(model["stem"], weights=tmp_path / "timm_layout.pth")
    assert again.arch == model["timm_name"]
    h, w = META["sizes"][-1]
    img = torch.from_numpy(expected[f"in__img_{h}x{w}"])
    assert torch.equal(again(img), vit(img))


@pytest.mark.faults
def test_a_file_of_another_family_or_size_is_a_clear_error(weight_files):
    by_regs = {META["models"][n]["num_register_tokens"]: n for n in MODELS}
    for name in MODELS:
        model = META["models"][name]
        others = [n for r, n in by_regs.items() if r != model["num_register_tokens"]]
        for other in others:
            wrong = META["models"][other]["timm_name"]
            with pytest.raises(WeightsError, match=f"holds a {model['timm_name']}.*model.backbone={model['timm_name']}"):
                FrozenViT(wrong, weights=weight_files[name])
    # Another size: the smallest DINOv2 that is not the file's own.
    name = MODELS[0]
    own = META["models"][name]["timm_name"]
    wrong = next(n for n in ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2") if n != own.replace(
        f"_reg{dinov2.register_count(own)}", ""))
    with pytest.raises(WeightsError, match=f"holds a {own}"):
        FrozenViT(wrong, weights=weight_files[name])


@pytest.mark.faults
def test_a_dino_v1_file_for_a_dinov2_name_is_a_clear_error(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v1 = FrozenViT("vit_tiny_patch16_224")
    torch.save(v1.vit.state_dict(), tmp_path / "dino_v1.pth")
    arch = META["models"][MODELS[0]]["timm_name"] if MODELS else "vit_small_patch14_dinov2"
    with pytest.raises(WeightsError, match="is not a DINOv2 checkpoint"):
        FrozenViT(arch, weights=tmp_path / "dino_v1.pth")


@pytest.mark.slow
def test_a_tiny_run_trains_and_evaluates_on_a_dinov2_backbone(weight_files, tmp_path):
    """Two training steps and an evaluation of their checkpoint on a DINOv2 file (synthetic data)."""
    from eagle_dist.cli import shard
    from eagle_dist.config import patch_size

    name = MODELS[-1]
    arch = META["models"][name]["timm_name"]
    side = 4 * patch_size(arch)  # a 4 x 4 token grid: the smallest EiCue graph worth the name
    for split, count in (("train", 6), ("val", 3)):
        shard.main(["--source", "synthetic", "--split", split, "--out", str(tmp_path / split), "--synthetic-count",
                    str(count), "--synthetic-size", f"{side}x{side + 8}", "--synthetic-classes", "3", "--quiet",
                    "--workers", "1"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(*args):
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env,
                             cwd=REPO_ROOT)
        assert out.returncode == 0, f"{args}\nSTDOUT:\n{out.stdout[-3000:]}\nSTDERR:\n{out.stderr[-5000:]}"
        return out

    run(str(REPO_ROOT / "tests" / "train_harness.py"), str(tmp_path / "harness"),
        f"model.backbone={arch}", f"model.weights={weight_files[name]}", "model.dim=16", "model.n_classes=3",
        "model.extra_clusters=1", "model.eigen_clusters=4", "loss.feature_samples=3", "loss.neg_samples=2",
        "loss.step_schedulers=1", f"data.resolution={side}", f"data.val_resolution={side}", "data.batch_size=2",
        "data.val_batch_size=3", "data.num_workers=0", "data.shuffle_buffer=4", "train.max_steps=2",
        "train.eval_interval=2", "train.ckpt_interval=2",
        f"data.train_shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}",
        f"train.output_dir={tmp_path / 'runs'}", "train.run_name=dinov2")
    summary = json.loads((tmp_path / "harness" / "summary.json").read_text())
    assert summary["summary"]["steps"] == summary["summary"]["trained_steps_this_run"] == 2
    run("-m", "eagle_dist.evaluate", "--checkpoint", summary["run_dir"], "--shards", str(tmp_path / "val"),
        "--out", str(tmp_path / "eval"), "--no-flip", "--no-crf", "--no-mlflow")
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 3
    # The evaluation rebuilt the same DINOv2 backbone from model.weights: the trainer's final
    # validation (same protocol, same checkpoint) gives the same numbers.
    for key in ("cluster_strict", "linear_strict"):
        assert report["metrics"][key]["mIoU"] == pytest.approx(summary["summary"][f"eval/{key}_mIoU"], abs=1e-9)
