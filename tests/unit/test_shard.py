"""The shard builder on tiny dataset trees: contents, manifest, determinism, bad inputs, resume, parts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_sources import (H, W, make_cityscapes_tree, make_coco_tree, make_potsdam_tree, make_potsdamraw_tree)

from eagle_dist.cli import shard as shard_cli
from eagle_dist.data import shards as shard

from eagle_dist.data import sources
from eagle_dist.data.shards import ShardError
from eagle_dist.data.sources import five_crop_boxes

REPO = Path(__file__).resolve().parents[2]


def build(*args: str) -> dict:
    return shard_cli.run(["--workers", "1", "--quiet", *args])


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes}, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def read_all(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    merged: dict[str, dict[str, bytes]] = {}
    for s in manifest["shards"]:
        merged.update(read_tar(out / s["name"]))
    return merged


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- contents

def test_coco_train_is_five_cropped_with_official_boxes_and_coarse_labels(tmp_path):
    ids = make_coco_tree(tmp_path / "coco", n_train=3)
    out = tmp_path / "shards" / "train"
    summary = build("--source", "cocostuff", "--root", str(tmp_path / "coco"), "--split", "train",
                    "--out", str(out), "--samples-per-shard", "10")
    assert summary["samples"] == 15 and summary["skipped"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [10, 5]
    samples = read_all(out)
    assert list(samples) == [f"{i}_crop{k}" for i in ids["train2017"] for k in range(5)]
    boxes = five_crop_boxes(H, W, 0.5)
    for n, image_id in enumerate(ids["train2017"]):
        source = Image.open(tmp_path / "coco" / "images" / "train2017" / f"{image_id}.jpg").convert("RGB")
        fine = np.asarray(Image.open(tmp_path / "coco" / "annotations" / "train2017" / f"{image_id}.png"))
        coarse = sources.COCOSTUFF_FINE_TO_COARSE[fine]
        for k, (top, left, h, w) in enumerate(boxes):
            members = samples[f"{image_id}_crop{k}"]
            assert set(members) == {"jpg", "label.png", "json"}
            meta = json.loads(members["json"])
            assert meta["crop_box"] == [top, left, h, w] and meta["crop_index"] == k
            assert meta["source_file"] == f"images/train2017/{image_id}.jpg" and meta["split"] == "train"
            assert meta["dataset"] == "cocostuff27" and meta["image_format"] == "jpeg-q75"
            label = png(members["label.png"])
            expected = coarse[top:top + h, left:left + w]
            assert label.dtype == np.uint8 and np.array_equal(label, np.where(expected < 0, 255, expected))
            # the crop re-encoded exactly as the builder should: PIL JPEG at quality 75
            buf = io.BytesIO()
            source.crop((left, top, left + w, top + h)).save(buf, format="JPEG", quality=75)
            assert members["jpg"] == buf.getvalue()
        if n == 0:  # image 0 holds every fine id: every coarse class and the ignore value appear
            crops = [png(samples[f"{image_id}_crop{k}"]["label.png"]) for k in range(5)]
            seen = set().union(*(np.unique(c).tolist() for c in crops))
            assert seen == set(range(27)) | {255}


def test_manifest_describes_classes_ignore_value_counts_and_checksums(tmp_path):
    make_coco_tree(tmp_path / "coco", n_train=3)
    out = tmp_path / "train"
    build("--source", "cocostuff", "--root", str(tmp_path / "coco"), "--split", "train", "--out", str(out),
          "--samples-per-shard", "10", "--jpeg-quality", "90")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "cocostuff27" and manifest["split"] == "train"
    assert manifest["classes"] == [{"id": i, "name": n} for i, n in enumerate(sources.COCOSTUFF27_CLASSES)]
    assert manifest["num_classes"] == 27 and manifest["ignore_value"] == 255
    assert manifest["num_samples"] == 15 and manifest["skipped"]["count"] == 0
    for s in manifest["shards"]:
        assert s["sha256"] == sha(out / s["name"]) and s["bytes"] == (out / s["name"]).stat().st_size
        assert s["samples"] == len(read_tar(out / s["name"]))
    builder = manifest["builder"]
    assert builder["version"] == shard.BUILDER_VERSION
    assert builder["options"]["jpeg_quality"] == 90 and builder["options"]["five_crop"] is True
    assert builder["options"]["crop_ratio"] == 0.5 and builder["options"]["samples_per_shard"] == 10
    assert str(tmp_path) not in json.dumps(manifest)  # no machine-specific paths


def test_coco_val_is_not_cropped_and_keeps_the_original_jpeg(tmp_path):
    ids = make_coco_tree(tmp_path / "coco", n_val=2)
    out = tmp_path / "val"
    build("--source", "cocostuff", "--root", str(tmp_path / "coco"), "--split", "val", "--out", str(out))
    samples = read_all(out)
    assert list(samples) == ids["val2017"]
    for image_id, members in samples.items():
        assert members["jpg"] == (tmp_path / "coco" / "images" / "val2017" / f"{image_id}.jpg").read_bytes()
        meta = json.loads(members["json"])
        assert meta["crop_box"] is None and meta["image_format"] == "jpeg-original"
        assert png(members["label.png"]).shape == (H, W)


def test_cityscapes_val_stores_png_images_losslessly_and_maps_label_ids(tmp_path):
    make_cityscapes_tree(tmp_path / "cs")
    out = tmp_path / "val"
    build("--source", "cityscapes", "--root", str(tmp_path / "cs"), "--split", "val", "--out", str(out))
    samples = read_all(out)
    assert list(samples) == ["aachen_000000_000019", "bonn_000000_000019"]
    members = samples["aachen_000000_000019"]
    source = tmp_path / "cs" / "leftImg8bit" / "val" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    assert np.array_equal(png(members["img.png"]), np.asarray(Image.open(source).convert("RGB")))
    gt = tmp_path / "cs" / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    fine = np.asarray(Image.open(gt))
    assert np.array_equal(png(members["label.png"]), np.where(fine < 7, 255, fine - 7))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "cityscapes27"
    assert [c["name"] for c in manifest["classes"]][:2] == ["road", "sidewalk"]


def test_potsdam_train_crops_and_unlabelled_tiles(tmp_path):
    make_potsdam_tree(tmp_path / "p")
    out = tmp_path / "train"
    summary = build("--source", "potsdam", "--root", str(tmp_path / "p"), "--split", "train", "--out", str(out))
    assert summary["samples"] == 10
    labels = np.stack([png(m["label.png"]) for m in read_all(out).values()])
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 255}
    out_u = tmp_path / "unl"
    build("--source", "potsdam", "--root", str(tmp_path / "p"), "--split", "unlabelled_train", "--out", str(out_u))
    unl = read_all(out_u)
    assert len(unl) == 5 and all((png(m["label.png"]) == 255).all() for m in unl.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == list(sources.POTSDAM3_CLASSES)


def test_potsdamraw_folder_and_synthetic_build(tmp_path):
    make_potsdamraw_tree(tmp_path / "raw")
    build("--source", "potsdamraw", "--root", str(tmp_path / "raw"), "--split", "all", "--out", str(tmp_path / "r"))
    assert list(read_all(tmp_path / "r")) == ["2_0_0", "2_0_1", "2_1_0", "10_0_0"]
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"im{i}.png")
    build("--source", "folder", "--root", str(tmp_path / "imgs"), "--split", "train", "--out", str(tmp_path / "f"))
    assert len(read_all(tmp_path / "f")) == 15
    summary = build("--source", "synthetic", "--split", "val", "--out", str(tmp_path / "s"),
                    "--synthetic-count", "4", "--synthetic-size", "24x32", "--synthetic-classes", "3")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert summary["samples"] == 4 and manifest["dataset"] == "synthetic3" and len(manifest["classes"]) == 3
    labels = np.stack([png(m["label.png"]) for m in read_all(tmp_path / "s").values()])
    assert labels.shape == (4, 24, 32) and labels.max() <= 2


def test_tar_members_are_safe_and_metadata_fixed(tmp_path):
    make_coco_tree(tmp_path / "coco")
    out = tmp_path / "train"
    build("--source", "cocostuff", "--root", str(tmp_path / "coco"), "--split", "train", "--out", str(out))
    with tarfile.open(out / "train-000000.tar") as tar:
        for m in tar.getmembers():
            assert "/" not in m.name and ".." not in m.name and m.isreg()
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    with pytest.raises(ShardError, match="unsafe"):
        shard._member("../escape", "jpg")
    with pytest.raises(ShardError, match="unsafe"):
        shard._member("a/b", "json")


# --------------------------------------------------------------------------- determinism and parts

SYN = ["--source", "synthetic", "--split", "train", "--synthetic-count", "12", "--synthetic-size", "24x32",
       "--samples-per-shard", "10"]


def _shard_hashes(out: Path) -> list[tuple[str, str]]:
    return [(p.name, sha(p)) for p in sorted(out.glob("train-*.tar"))]


@pytest.mark.multiproc
def test_output_is_identical_for_any_worker_count_or_part_split(tmp_path):
    one = tmp_path / "one"
    build(*SYN, "--out", str(one))
    shard_cli.run([*SYN, "--out", str(tmp_path / "two"), "--workers", "2", "--quiet"])
    assert len(_shard_hashes(one)) == 6
    assert _shard_hashes(one) == _shard_hashes(tmp_path / "two")

    parts = tmp_path / "parts"
    first = build(*SYN, "--out", str(parts), "--num-parts", "2", "--part", "0")
    assert first["manifest"] is None and first["shards"] == 3 and not (parts / "manifest.json").exists()
    with pytest.raises(ShardError, match="3 of 6 shards"):
        shard.merge(parts)
    second = build(*SYN, "--out", str(parts), "--num-parts", "2", "--part", "1")
    assert second["manifest"] is not None  # the last part to finish writes the manifest
    (parts / "manifest.json").unlink()
    shard.merge(parts)
    assert _shard_hashes(parts) == _shard_hashes(one)
    assert (parts / "manifest.json").read_bytes() == (one / "manifest.json").read_bytes()


def test_slurm_array_variables_give_the_part(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    opts = shard_cli.parse_args([*SYN, "--out", str(tmp_path)])
    assert (opts.num_parts, opts.part) == (4, 2)
    assert shard_cli.parse_args([*SYN, "--out", str(tmp_path), "--part", "0"]).part == 0
    with pytest.raises(ShardError, match="--part"):
        shard.build(shard_cli.parse_args([*SYN, "--out", str(tmp_path), "--num-parts", "2", "--part", "2"]))


# --------------------------------------------------------------------------- bad input

def _damage_coco(root: Path, ids: list[str]) -> None:
    folder = "train2017"
    (root / "images" / folder / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(np.zeros((H + 2, W), np.uint8), "L").save(root / "annotations" / folder / f"{ids[1]}.png")
    Image.fromarray(np.full((H, W), 190, np.uint8), "L").save(root / "annotations" / folder / f"{ids[2]}.png")
    (root / "annotations" / folder / f"{ids[3]}.png").unlink()


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, capsys):
    ids = make_coco_tree(tmp_path / "coco", n_train=5)["train2017"]
    _damage_coco(tmp_path / "coco", ids)
    out = tmp_path / "train"
    assert shard_cli.main(["--source", "cocostuff", "--root", str(tmp_path / "coco"), "--split", "train",
                       "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 5  # only the last image survives
    skipped = manifest["skipped"]
    assert skipped["count"] == 4
    assert skipped["by_reason"] == {"label_out_of_range": 1, "missing": 1, "size_mismatch": 1, "unreadable": 1}
    files = {f["reason"]: f["file"] for f in skipped["files"]}
    assert files["unreadable"] == f"images/train2017/{ids[0]}.jpg"
    assert files["size_mismatch"] == f"annotations/train2017/{ids[1]}.png"
    assert files["label_out_of_range"] == f"annotations/train2017/{ids[2]}.png"
    assert files["missing"] == f"annotations/train2017/{ids[3]}.png"
    assert "skipped 4 inputs" in printed and all(f in printed for f in files.values())


def test_strict_stops_at_the_first_bad_input(tmp_path, capsys):
    ids = make_coco_tree(tmp_path / "coco", n_train=5)["train2017"]
    _damage_coco(tmp_path / "coco", ids)
    out = tmp_path / "train"
    rc = shard_cli.main(["--source", "cocostuff", "--root", str(tmp_path / "coco"), "--split", "train",
                     "--out", str(out), "--workers", "1", "--quiet", "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and f"images/train2017/{ids[0]}.jpg" in err and "--strict" in err
    assert not list(out.glob("*.tar")) and not list(out.glob(".*partial*"))
    assert not (out / "manifest.json").exists()


def test_missing_root_or_list_is_one_clear_error(tmp_path, capsys):
    rc = shard_cli.main(["--source", "cocostuff", "--root", str(tmp_path / "nope"), "--split", "train",
                     "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "nope") in err and "Traceback" not in err
    (tmp_path / "coco").mkdir()
    rc = shard_cli.main(["--source", "cocostuff", "--root", str(tmp_path / "coco"), "--split", "val",
                     "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "coco" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt") in err
    assert shard_cli.main(["--source", "synthetic", "--split", "val", "--out", str(tmp_path / "o"), "--quiet",
                       "--synthetic-classes", "1"]) == 2
    assert "num_classes" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume

def test_resume_keeps_verified_shards_and_rebuilds_damaged_ones(tmp_path):
    out = tmp_path / "train"
    build(*SYN, "--out", str(out))
    reference = _shard_hashes(out)
    stats = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    with open(out / "train-000002.tar", "r+b") as f:  # flip bytes in the middle of one shard
        f.seek(700)
        f.write(b"\x00" * 16)
    (out / "train-000004.tar").unlink()
    time.sleep(0.01)
    summary = build(*SYN, "--out", str(out))
    assert (summary["shards_kept"], summary["shards_built"]) == (4, 2)
    assert _shard_hashes(out) == reference
    for name, mtime in stats.items():
        if name not in ("train-000002.tar", "train-000004.tar"):
            assert (out / name).stat().st_mtime_ns == mtime


def test_other_options_in_the_same_folder_need_overwrite(tmp_path):
    out = tmp_path / "train"
    build(*SYN, "--out", str(out))
    with pytest.raises(ShardError, match="jpeg_quality"):
        build(*SYN, "--out", str(out), "--jpeg-quality", "90")
    summary = build(*SYN, "--out", str(out), "--jpeg-quality", "90", "--overwrite")
    assert summary["shards_built"] == 6
    assert json.loads((out / "manifest.json").read_text())["builder"]["options"]["jpeg_quality"] == 90


@pytest.mark.faults
def test_builder_resumes_after_sigkill_mid_shard(tmp_path):
    args = ["--source", "synthetic", "--split", "val", "--synthetic-count", "40", "--synthetic-size", "384x384",
            "--samples-per-shard", "4", "--workers", "1", "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "eagle_dist.shard", *args, "--out", str(out)],
                            cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while True:
            finals = list(out.glob("val-*.tar")) if out.is_dir() else []
            partial = list(out.glob(".val-*.partial-*")) if out.is_dir() else []
            if finals and partial:
                break
            if proc.poll() is not None:
                pytest.fail(f"builder exited before the kill: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "builder never started a second shard"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob(".val-*.partial-*")) and not (out / "manifest.json").exists()
    recorded = {p.name: p.stat().st_mtime_ns for p in out.glob("val-*.tar")
                if (out / "_build" / f"{p.stem}.json").exists()}
    assert recorded, "no shard finished before the kill"

    summary = shard_cli.run([*args, "--out", str(out)])
    assert summary["shards_kept"] >= len(recorded) and summary["shards"] == 10
    assert not list(out.glob(".val-*.partial-*"))
    for name, mtime in recorded.items():  # verified and kept, not rewritten
        assert (out / name).stat().st_mtime_ns == mtime
    fresh = tmp_path / "fresh"
    shard_cli.run([*args, "--out", str(fresh)])
    assert [(p.name, sha(p)) for p in sorted(out.glob("val-*.tar"))] == \
           [(p.name, sha(p)) for p in sorted(fresh.glob("val-*.tar"))]
    assert (out / "manifest.json").read_bytes() == (fresh / "manifest.json").read_bytes()
