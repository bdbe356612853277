"""Data benchmark: shard build rate and stream throughput, beside a plain per-file PIL pipeline.

    python -m eagle_dist.bench data --count 200 --size 480x640 --workers 1,2 --json bench_data.json

What it measures, on a synthetic set written to a temporary folder as JPEG images + PNG labels
(COCO-like originals):

* build: ``eagle_dist.data.shards`` (folder source, official five-crop, tar shards) against writing the
  same crops as individual files the way the official crop script does (``img/<n>.jpg``,
  ``label/<n>.png`` with label + 1), both with the same number of processes.
* stream: ``eagle_dist.data.stream.build_train_loader`` against a map-style ``DataLoader`` that opens one
  JPEG and one PNG per sample with PIL (the official loader), both doing the same decode, nearest
  resize and centre crop.  The official loader normalises and blurs in its workers; our stream's
  workers send uint8 pixels and the blur's draws, and ``stream.finish_batch`` normalises and blurs
  on the device (its cost on this CPU is printed under the table: it is not part of the stream
  rows).  Reported as images/s and images/s per worker, after one warm-up batch (worker start-up
  is not counted); with ``--rounds N`` the two pipelines alternate N times per worker count and
  the rows give the median (every round's rate is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eagle_dist.cli import parse_size
from eagle_dist.data import shards as shard
from eagle_dist.data import sources
from eagle_dist.data import stream as data
from eagle_dist.data.sources import SyntheticSpec, five_crop_boxes


def _write_originals(folder: Path, spec: SyntheticSpec) -> None:
    """Synthetic images as JPEG (quality 95, like camera/COCO files) and label PNGs, one per file."""
    src = sources.Synthetic(split="train", spec=spec)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir(parents=True)
    for i in range(spec.count):
        img, label = src.render(i)
        Image.fromarray(img).save(folder / "images" / f"{i:06d}.jpg", quality=95)
        Image.fromarray(label.astype(np.uint8), "L").save(folder / "labels" / f"{i:06d}.png")


def _per_file_crops(task: tuple[str, int, list, str]) -> int:
    """Worker: the official crop script's output for some items (crop n = 5 * item + k)."""
    root, num_classes, items, out = task
    src = sources.open_source("folder", Path(root) / "images", "train", labels=Path(root) / "labels",
                              num_classes=num_classes)
    for item in items:
        sample = src.load(item)
        for k, (top, left, h, w) in enumerate(five_crop_boxes(sample.image.height, sample.image.width, 0.5)):
            n = 5 * item.source_index + k
            sample.image.crop((left, top, left + w, top + h)).save(Path(out) / "img" / f"{n}.jpg", quality=75)
            stored = (sample.label[top:top + h, left:left + w] + 1).astype(np.uint8)  # official: label + 1
            Image.fromarray(stored, "L").save(Path(out) / "label" / f"{n}.png")
    return len(items)


def build_per_file(root: Path, out: Path, num_classes: int, workers: int) -> float:
    (out / "img").mkdir(parents=True)
    (out / "label").mkdir(parents=True)
    src = sources.open_source("folder", root / "images", "train", labels=root / "labels", num_classes=num_classes)
    items = src.items()
    chunks = [items[i::workers * 4] for i in range(workers * 4)]
    t0 = time.perf_counter()
    tasks = [(str(root), num_classes, chunk, str(out)) for chunk in chunks if chunk]
    if workers == 1:
        for task in tasks:
            _per_file_crops(task)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_per_file_crops, tasks)
    return time.perf_counter() - t0


class PerFileDataset(torch.utils.data.Dataset):
    """The official loader's I/O: one PIL open per image and per label, label stored + 1."""

    def __init__(self, folder: Path, resolution: int):
        self.folder, self.resolution = folder, resolution
        self.n = len(list((folder / "img").glob("*.jpg")))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.folder / "img" / f"{i}.jpg") as im:
            img = im.convert("RGB")
        with Image.open(self.folder / "label" / f"{i}.png") as lab:
            label = lab.copy()
        # back to the shard convention (255 = ignore) so both pipelines share `data.collate`
        stored = data.resize_shorter_centre_crop(label, self.resolution).astype(np.int16) - 1
        return {"key": str(i), "img": data.resize_shorter_centre_crop(img, self.resolution),
                "label": np.where(stored < 0, 255, stored).astype(np.uint8)}


class _CollateWithBlur:
    def __init__(self, blur_p: float):
        self.blur_p = blur_p
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, samples: list[dict]) -> dict:
        batch = data.collate(samples)
        batch["img_aug"] = data.photometric_aug(batch["img"], self.blur_p, self.generator)
        return batch


def _finish_cost_ms(shard_dir: Path, args: argparse.Namespace) -> float:
    """Median time of ``stream.finish_batch`` (normalise + blur) per batch on this CPU, one thread:
    the work our stream leaves to the device."""
    batches = list(data.build_train_loader(shard_dir, args.batch_size, 0, 1, 0, seed=0, resolution=args.resolution,
                                           shuffle_buffer=1, steps_per_epoch=3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for batch in batches:
            t0 = time.perf_counter()
            data.finish_batch(batch)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1000 * float(np.median(times))


def _rate(loader, steps: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: worker start-up and the first shard opens are not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        batch = next(it)
        n += batch["img"].shape[0]
    return n / (time.perf_counter() - t0)


def run_data_bench(args: argparse.Namespace) -> dict:
    """Run the benchmark described in the module docstring; returns rows + configuration."""
    h, w = args.size
    spec = SyntheticSpec(count=args.count, height=h, width=w, num_classes=args.classes, seed=0)
    workers_list = sorted({int(x) for x in str(args.workers).split(",")})
    rows: list[dict] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="eagle-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        _write_originals(tmp / "originals", spec)
        write_s = time.perf_counter() - t0
        crops = 5 * args.count
        for nw in workers_list:
            out = tmp / f"shards-{nw}"
            t0 = time.perf_counter()
            shard.build(shard.ShardOptions(
                source="folder", split="train", out=out, root=str(tmp / "originals" / "images"),
                samples_per_shard=args.samples_per_shard, workers=nw, quiet=True,
                source_options={"labels": str(tmp / "originals" / "labels"), "num_classes": args.classes},
            ))
            secs = time.perf_counter() - t0
            rows.append(_row("build", "webdataset shards (tar, 5-crop)", nw, args.count / secs, crops / secs))
            secs = build_per_file(tmp / "originals", tmp / f"files-{nw}", args.classes, nw)
            rows.append(_row("build", "per-file crops (official layout)", nw, args.count / secs, crops / secs))
        shard_dir, file_dir = tmp / f"shards-{workers_list[0]}", tmp / f"files-{workers_list[0]}"
        for nw in workers_list:
            ours, official = [], []
            for _ in range(args.rounds):  # alternating, so both see the same machine load
                loader = data.build_train_loader(shard_dir, args.batch_size, 0, 1, nw, seed=0,
                                                 resolution=args.resolution, shuffle_buffer=args.shuffle_buffer,
                                                 steps_per_epoch=args.steps + 1)
                ours.append(_rate(loader, args.steps))
                plain = torch.utils.data.DataLoader(
                    PerFileDataset(file_dir, args.resolution), batch_size=args.batch_size, shuffle=True,
                    num_workers=nw, collate_fn=_CollateWithBlur(0.5), drop_last=True,
                    generator=torch.Generator().manual_seed(0),
                )
                if len(plain) < args.steps + 1:
                    raise SystemExit(f"--count {args.count} gives {len(plain)} per-file batches; need --steps + 1 "
                                     f"= {args.steps + 1}: raise --count or lower --steps")
                official.append(_rate(plain, args.steps))
            for name, rates in (("webdataset shards", ours), ("per-file PIL (official)", official)):
                rate = float(np.median(rates))
                rows.append({**_row("stream", name, nw, rate, rate), "rounds": [round(r, 1) for r in rates]})
        finish_ms = _finish_cost_ms(shard_dir, args)
    return {
        "benchmark": "data",
        "config": {"count": args.count, "size": f"{h}x{w}", "crops": crops, "classes": args.classes,
                   "batch_size": args.batch_size, "resolution": args.resolution, "steps": args.steps,
                   "samples_per_shard": args.samples_per_shard, "shuffle_buffer": args.shuffle_buffer,
                   "rounds": args.rounds, "originals_write_s": round(write_s, 2)},
        "finish_batch_cpu_ms": round(finish_ms, 1),
        # Other work on the machine changes these numbers: the 1-minute load says how much there was.
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "load_before": round(load_before[0], 2),
                    "load_after": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }


def _row(kind: str, pipeline: str, workers: int, images_per_s: float, samples_per_s: float) -> dict:
    # Build rows count source images (5 crops each); stream rows count 224px training images.
    per_worker = (samples_per_s if kind == "stream" else images_per_s) / max(1, workers)
    return {"kind": kind, "pipeline": pipeline, "workers": workers, "images_per_s": round(images_per_s, 1),
            "samples_per_s": round(samples_per_s, 1), "per_worker": round(per_worker, 1)}


def format_table(result: dict) -> str:
    c, m = result["config"], result["machine"]
    lines = [
        f"data benchmark: {c['count']} synthetic {c['size']} images -> {c['crops']} five-crops; "
        f"batch {c['batch_size']}, {c['resolution']} px, {c['steps']} timed batches; "
        f"{m['cpus']} CPUs, load {m['load_before']} -> {m['load_after']}",
        f"{'stage':<7}{'pipeline':<36}{'workers':>8}{'images/s':>11}{'crops/s':>10}{'per worker':>12}",
    ]
    for r in result["rows"]:
        crops = f"{r['samples_per_s']:>10.1f}" if r["kind"] == "build" else f"{'':>10}"
        lines.append(f"{r['kind']:<7}{r['pipeline']:<36}{r['workers']:>8}{r['images_per_s']:>11.1f}{crops}"
                     f"{r['per_worker']:>12.1f}")
    lines.append("build: source images/s (each gives 5 crops); stream: training images/s at the model's input; "
                 "per worker: build = source images/s, stream = images/s, divided by the workers"
                 + (f"; stream rows: median of {c['rounds']} alternating rounds" if c.get("rounds", 1) > 1 else ""))
    if "finish_batch_cpu_ms" in result:
        lines.append(f"not in the stream rows: finish_batch (normalise + blur, run on the device in training) takes "
                     f"{result['finish_batch_cpu_ms']:.1f} ms per batch on one thread of this CPU")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eagle_dist.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=160, help="synthetic source images")
    p.add_argument("--size", type=parse_size, default=(480, 640), help="HEIGHTxWIDTH of the source images")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--workers", default=",".join(str(n) for n in sorted({1, min(4, os.cpu_count() or 1)})),
                   help="comma-separated worker counts to measure")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--steps", type=int, default=12, help="timed batches per stream measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="stream measurements per pipeline and worker count, alternating; rows give the median")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--shuffle-buffer", type=int, default=200)
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    if math.ceil(5 * args.count / args.batch_size) < args.steps + 1:
        print(f"error: {5 * args.count} crops make fewer than --steps + 1 = {args.steps + 1} batches of "
              f"{args.batch_size}; raise --count", file=sys.stderr)
        return 2
    result = run_data_bench(args)
    print(format_table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
