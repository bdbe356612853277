"""The WebDataset stream: official transforms, equal steps per rank, exactly-once validation, damaged shards."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from eagle_dist.data import stream as data

from eagle_dist.cli import shard
from eagle_dist.data.stream import DataError

K = 4  # synthetic classes


def _build(out: Path, split: str, count: int, per_shard: int, *extra: str) -> Path:
    shard.run(["--source", "synthetic", "--split", split, "--out", str(out), "--synthetic-count", str(count),
               "--synthetic-size", "40x56", "--synthetic-classes", str(K), "--samples-per-shard", str(per_shard),
               "--workers", "1", "--quiet", *extra])
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    return {
        # 9 images x 5 crops, 2 images per shard: 5 shards of 10, 10, 10, 10, 5 samples
        "train": _build(root / "train", "train", 9, 10),
        # 23 samples in 5 shards (5, 5, 5, 5, 3): does not divide by 2 ranks x 2 workers
        "val": _build(root / "val", "val", 23, 5),
        "val_jpeg": _build(root / "val_jpeg", "val", 23, 5, "--image-format", "jpeg"),
        "one": _build(root / "one", "val", 6, 100),
    }


def all_keys(folder: Path) -> list[str]:
    keys = []
    for s in data.read_manifest(folder)["shards"]:
        with tarfile.open(folder / s["name"]) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def val_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


# --------------------------------------------------------------------------- transforms

SIZES = [(40, 56), (56, 40), (33, 77), (21, 21), (300, 224)]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("res", [16, 32])
def test_resize_and_centre_crop_match_torchvision(hw, res):
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    lab = Image.fromarray(rng.integers(0, 27, hw, dtype=np.uint8), "L")
    ref = T.Compose([T.Resize(res, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(res)])
    assert np.array_equal(data.resize_shorter_centre_crop(img, res), np.asarray(ref(img)))
    assert np.array_equal(data.resize_shorter_centre_crop(lab, res), np.asarray(ref(lab)))


def test_collate_is_totensor_then_normalize_and_maps_ignore():
    rng = np.random.default_rng(0)
    samples = [{"key": f"k{i}", "img": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                "label": rng.choice(np.array([0, 1, 255], np.uint8), (8, 8))} for i in range(3)]
    batch = data.collate(samples)
    x = torch.from_numpy(np.stack([s["img"] for s in samples])).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(batch["img"], (x - mean) / std, atol=1e-6, rtol=0)
    assert batch["img"].dtype == torch.float32 and batch["img"].is_contiguous()
    stored = np.stack([s["label"] for s in samples]).astype(np.int64)
    expected = np.where(stored == 255, -1, stored)
    assert batch["label"].dtype == torch.int64 and np.array_equal(batch["label"].numpy(), expected)
    assert batch["key"] == ["k0", "k1", "k2"]
    T = pytest.importorskip("torchvision.transforms")
    ref = T.Compose([T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    for i, s in enumerate(samples):  # bit-identical to the official transform
        assert torch.equal(batch["img"][i], ref(Image.fromarray(s["img"])))


def test_finished_uint8_batch_equals_the_worker_side_float_pipeline_bit_for_bit():
    # The stream sends uint8 pixels and the blur's draws; finish_batch (on the device) must give
    # the numbers that collate + photometric_aug gave in the workers with the same generator.
    rng = np.random.default_rng(1)
    samples = [{"key": f"k{i}", "img": rng.integers(0, 256, (12, 12, 3), dtype=np.uint8),
                "label": rng.choice(np.array([0, 3, 255], np.uint8), (12, 12))} for i in range(16)]
    old = data.collate(samples)
    old["img_aug"], old["aug_mask"] = data.photometric_aug(old["img"], 0.5, torch.Generator().manual_seed(4),
                                                           return_mask=True)
    raw = data.collate_uint8(samples)
    raw["aug_mask"], raw["aug_sigma"] = data.draw_blur(16, 0.5, torch.Generator().manual_seed(4))
    new = data.finish_batch(raw)
    assert 0 < int(new["aug_mask"].sum()) < 16
    for name in ("img", "img_aug", "aug_mask", "label"):
        assert new[name].dtype == old[name].dtype and torch.equal(new[name], old[name]), name
    assert new["key"] == old["key"] and raw["img"].dtype == torch.uint8  # raw is left as it was
    again = data.finish_batch(new)  # a finished batch keeps its tensors
    assert all(again[name] is new[name] for name in ("img", "img_aug", "label"))


def test_blur_is_a_3x3_gaussian_with_reflect_padding():
    img = torch.randn(3, 3, 9, 11)
    sigma = torch.tensor([0.1, 0.7, 2.0])
    out = data.gaussian_blur3(img, sigma)
    for b in range(3):
        x = np.array([-1.0, 0.0, 1.0])
        k1 = np.exp(-0.5 * (x / sigma[b].item()) ** 2)
        k1 /= k1.sum()
        for c in range(3):
            ref = ndimage.correlate(img[b, c].double().numpy(), np.outer(k1, k1), mode="mirror")
            assert np.allclose(out[b, c].numpy(), ref, atol=1e-5)
    TF = pytest.importorskip("torchvision.transforms.functional")
    for b in range(3):
        ref = TF.gaussian_blur(img[b], [3, 3], [sigma[b].item(), sigma[b].item()])
        assert torch.allclose(out[b], ref, atol=1e-6)


def test_photometric_aug_blurs_each_image_with_probability_p():
    img = torch.randn(400, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(data.photometric_aug(img, 0.0, g), img)
    # sigma near 0.1 leaves a kernel so close to a delta that float32 cannot see the change
    assert (data.photometric_aug(img, 1.0, g) != img).flatten(1).any(1).float().mean() > 0.95
    changed = (data.photometric_aug(img, 0.5, g) != img).flatten(1).any(1).float().mean().item()
    assert 0.4 < changed < 0.6
    a = data.photometric_aug(img, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, data.photometric_aug(img, 0.5, torch.Generator().manual_seed(3)))


def test_photometric_aug_mask_names_the_blurred_images_with_the_same_draws():
    img = torch.randn(64, 3, 6, 6)
    plain = data.photometric_aug(img, 0.5, torch.Generator().manual_seed(3))
    out, mask = data.photometric_aug(img, 0.5, torch.Generator().manual_seed(3), return_mask=True)
    assert torch.equal(out, plain) and mask.dtype == torch.bool and mask.shape == (64,)
    changed = (out != img).flatten(1).any(1)
    assert 0 < int(mask.sum()) < 64
    # Every image the mask leaves out is bit-identical to img (its keys can be reused); a blurred
    # image may still equal img when its sigma is near 0.1 (see the test above).
    assert not changed[~mask].any() and changed[mask].float().mean() > 0.9


# --------------------------------------------------------------------------- training stream

def test_train_batches_have_the_official_views_and_fixed_step_count(shards):
    loader = data.build_train_loader(shards["train"], batch_size=4, rank=0, world_size=1, num_workers=2, seed=0,
                                     resolution=32, shuffle_buffer=20)
    assert len(loader) == 45 // 4  # one pass over the data by default
    batches = list(loader)
    assert len(batches) == 11
    raw = batches[0]  # as the workers send it: uint8 pixels and labels, the blur's draws
    assert raw["img"].shape == (4, 32, 32, 3) and raw["img"].dtype == torch.uint8 and "img_aug" not in raw
    assert raw["label"].shape == (4, 32, 32) and raw["label"].dtype == torch.uint8
    assert raw["aug_sigma"].shape == (4,) and ((raw["aug_sigma"] >= 0.1) & (raw["aug_sigma"] <= 2.0)).all()
    batches = [data.finish_batch(x) for x in batches]
    b = batches[0]
    assert b["img"].shape == b["img_aug"].shape == (4, 3, 32, 32) and b["img"].dtype == torch.float32
    assert b["img"].is_contiguous() and torch.equal(b["img"], data.normalise(raw["img"].permute(0, 3, 1, 2)))
    assert b["label"].shape == (4, 32, 32) and b["label"].dtype == torch.int64
    assert b["label"].min() >= 0 and b["label"].max() < K  # synthetic labels have no ignore pixels
    blurred = torch.cat([(x["img_aug"] != x["img"]).flatten(1).any(1) for x in batches])
    assert 0 < blurred.float().mean() < 1  # blur_p = 0.5 per image
    mask = torch.cat([x["aug_mask"] for x in batches])
    assert mask.dtype == torch.bool and not blurred[~mask].any()  # unmasked images are img's pixels
    assert loader.stats["samples"] >= 44 and loader.stats["corrupt_samples"] == 0
    assert len(list(data.build_train_loader(shards["train"], 4, 0, 1, 0, seed=0, steps_per_epoch=3))) == 3


def test_train_stream_is_reproducible_per_seed_rank_and_epoch(shards):
    def keys(rank, seed=0, epochs=1):
        loader = data.build_train_loader(shards["train"], 3, rank, 2, 2, seed=seed, resolution=16,
                                         shuffle_buffer=10, steps_per_epoch=4)
        return [[k for b in loader for k in b["key"]] for _ in range(epochs)]

    a = keys(0, epochs=2)
    assert a == keys(0, epochs=2)
    assert a[0] != a[1]  # a new epoch draws new shards/shuffles
    assert keys(1)[0] != a[0] and keys(0, seed=1)[0] != a[0]
    one = data.build_train_loader(shards["train"], 3, 0, 1, 0, seed=5, resolution=16, steps_per_epoch=2)
    two = data.build_train_loader(shards["train"], 3, 0, 1, 0, seed=5, resolution=16, steps_per_epoch=2)
    for x, y in zip(one, two):
        x, y = data.finish_batch(x), data.finish_batch(y)
        assert torch.equal(x["img_aug"], y["img_aug"]) and torch.equal(x["label"], y["label"])


@pytest.mark.faults
def test_fewer_shards_than_ranks_times_workers_warns_but_steps_stay_equal(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="eagle_dist.data.stream"):
        loaders = [data.build_train_loader(shards["one"], 2, r, 2, 2, seed=0, resolution=16) for r in range(2)]
    assert "1 shards for 2 ranks x 2 workers" in caplog.text
    assert [len(list(loader)) for loader in loaders] == [6 // 4] * 2 == [len(loaders[0])] * 2


# --------------------------------------------------------------------------- validation stream

def test_slot_pieces_cover_every_sample_once_and_balance():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 9, rng.integers(1, 8)).tolist()
        slots = int(rng.integers(1, 12))
        pieces = data.slot_pieces(counts, slots)
        assert len(pieces) == slots
        seen = [(shard, i) for mine in pieces for shard, a, b in mine for i in range(a, b)]
        assert sorted(seen) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
        sizes = [sum(b - a for _, a, b in mine) for mine in pieces]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (1, 2), (3, 2), (2, 2)])
def test_validation_sees_every_sample_exactly_once(shards, world_size, num_workers):
    expected = all_keys(shards["val"])
    seen, batches = [], 0
    for rank in range(world_size):  # ranks are plain arguments, so one process can play all of them
        loader = data.build_val_loader(shards["val"], 4, rank, world_size, num_workers, resolution=24)
        keys = val_keys(loader)
        assert len(keys) == loader.num_samples
        seen += keys
        batches += len(loader)
    assert sorted(seen) == sorted(expected) and len(seen) == 23
    batch = next(iter(data.build_val_loader(shards["val"], 4, 0, 1, 0, resolution=24)))
    assert batch["img"].shape == (4, 3, 24, 24) and batch["label"].shape == (4, 24, 24) and "img_aug" not in batch


@pytest.mark.faults
def test_loader_workers_ignore_stop_signals_from_others_and_obey_their_parent(shards):
    """Slurm and `kill -- -PGID` signal the loader workers too: they must neither die (the rank
    would fail with "worker exited unexpectedly") nor stop the stream; the DataLoader's own
    SIGTERM (Process.terminate, from the parent) still ends one."""
    import multiprocessing
    import signal
    import subprocess
    import time

    loader = data.build_val_loader(shards["val"], 4, 0, 1, 2, resolution=24)
    batches = iter(loader)
    keys = list(next(batches)["key"])
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for sig in ("TERM", "INT", "USR1"):  # sent by another process, as slurmstepd or kill(1) would
        subprocess.run(["kill", f"-{sig}", *(str(w.pid) for w in workers)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    keys += [k for batch in batches for k in batch["key"]]
    assert sorted(keys) == sorted(all_keys(shards["val"]))

    batches = iter(loader)
    next(batches)
    worker = multiprocessing.active_children()[0]
    worker.terminate()
    worker.join(10)
    assert worker.exitcode == 0
    del batches


# --------------------------------------------------------------------------- damaged shards

def _rewrite_member(path: Path, member: str, data_bytes: bytes) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, content in members:
            content = data_bytes if m.name == member else content
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))


@pytest.mark.faults
def test_corrupt_jpeg_and_truncated_tar_are_skipped_counted_and_the_stream_goes_on(shards, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(shards["val_jpeg"], folder)
    jpeg = (folder / "val-000001.tar")
    key = sorted(k for k in all_keys(folder) if k.startswith("val_0000006"))[0]
    with tarfile.open(jpeg) as tar:
        good = tar.extractfile(f"{key}.jpg").read()
    _rewrite_member(jpeg, f"{key}.jpg", good[: len(good) // 2])  # a cut-off JPEG
    truncated = folder / "val-000002.tar"
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size // 3)

    loader = data.build_val_loader(folder, 4, 0, 1, 2, resolution=24)
    keys = val_keys(loader)
    stats = loader.stats
    assert key not in keys and stats["corrupt_samples"] == 1
    lost = 5 - len([k for k in keys if 10 <= int(k.split("_")[1]) < 15])
    assert lost >= 1 and stats["missing_samples"] + stats["incomplete_samples"] + stats["corrupt_samples"] >= lost + 1
    assert stats["read_errors"] + stats["missing_samples"] >= 1
    # everything after the damage is still there
    assert {f"val_{i:07d}" for i in range(15, 23)} <= set(keys) and stats["samples"] == len(keys)

    train = data.build_train_loader(folder, 4, 0, 1, 2, seed=0, resolution=16, steps_per_epoch=30)
    seen = [k for b in train for k in b["key"]]
    assert len(seen) == 120 and key not in seen
    assert train.stats["corrupt_samples"] + train.stats["missing_samples"] > 0


@pytest.mark.faults
def test_an_unreadable_training_set_raises_instead_of_spinning(shards, tmp_path):
    folder = tmp_path / "garbage"
    shutil.copytree(shards["train"], folder)
    for tar in folder.glob("*.tar"):
        tar.write_bytes(os.urandom(2048))
    loader = data.build_train_loader(folder, 4, 0, 1, 0, seed=0, resolution=16, steps_per_epoch=2)
    with pytest.raises(DataError, match="rebuild"):
        list(loader)


@pytest.mark.faults
def test_manifest_problems_are_one_clear_error(shards, tmp_path):
    with pytest.raises(DataError, match="shard folder not found.*python -m eagle_dist.shard"):
        data.read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json.*merge"):
        data.build_train_loader(tmp_path / "empty", 2, 0, 1, 0, seed=0)
    folder = tmp_path / "partial"
    shutil.copytree(shards["val"], folder)
    (folder / "val-000003.tar").unlink()
    with pytest.raises(DataError, match="val-000003.tar"):
        data.build_val_loader(folder, 2, 0, 1, 0)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"] = []
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists no samples"):
        data.read_manifest(folder)
    with pytest.raises(DataError, match="rank=2"):
        data.build_val_loader(shards["val"], 2, 2, 2, 0)


def test_manifest_gives_classes_and_ignore_value(shards):
    manifest = data.read_manifest(shards["train"])
    assert manifest["num_classes"] == K == len(manifest["classes"]) and manifest["ignore_value"] == 255
    assert all(c["name"] for c in manifest["classes"])


# --------------------------------------------------------------------------- two ranks over gloo

def _gloo_worker(rank: int, world_size: int, init_file: str, train_dir: str, val_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Processes made by mp.spawn default to spawning their DataLoader workers too, which re-imports
    # torch per worker (seconds each); torchrun/accelerate ranks fork them, as here.
    torch.multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        train = data.build_train_loader(train_dir, batch_size=3, rank=rank, world_size=world_size, num_workers=2,
                                        seed=0, resolution=16, shuffle_buffer=8)
        steps = sum(1 for _ in train)
        val = data.build_val_loader(val_dir, batch_size=4, rank=rank, world_size=world_size, num_workers=2,
                                    resolution=16)
        keys = val_keys(val)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, {"steps": steps, "len": len(train), "keys": keys})
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_gloo_ranks_get_equal_steps_and_see_validation_once(shards, tmp_path):
    out = tmp_path / "result.json"
    torch.multiprocessing.spawn(
        _gloo_worker, args=(2, str(tmp_path / "init"), str(shards["train"]), str(shards["val"]), str(out)),
        nprocs=2, join=True,
    )
    results = json.loads(out.read_text())
    assert [r["steps"] for r in results] == [r["len"] for r in results] == [45 // 6] * 2
    keys = [k for r in results for k in r["keys"]]
    assert len(keys) == len(set(keys)) == 23 and sorted(keys) == sorted(all_keys(shards["val"]))
    assert all(r["keys"] for r in results)


# --------------------------------------------------------------------------- benchmark

def test_data_benchmark_reports_both_pipelines(tmp_path):
    from eagle_dist.cli.bench import data as bench_data

    out = tmp_path / "bench.json"
    rc = bench_data.main(["--count", "8", "--size", "48x64", "--workers", "1", "--batch-size", "8",
                          "--steps", "2", "--resolution", "32", "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["config"]["crops"] == 40
    rows = {(r["kind"], r["pipeline"]) for r in result["rows"]}
    assert rows == {("build", "webdataset shards (tar, 5-crop)"), ("build", "per-file crops (official layout)"),
                    ("stream", "webdataset shards"), ("stream", "per-file PIL (official)")}
    assert all(r["images_per_s"] > 0 and r["workers"] == 1 for r in result["rows"])
    assert bench_data.main(["--count", "1", "--steps", "5"]) == 2  # too few batches: a clear error
