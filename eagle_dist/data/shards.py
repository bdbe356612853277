"""Build WebDataset tar shards from a dataset as downloaded (five-crop for train splits).

    from eagle_dist.data.shards import ShardOptions, build
    build(ShardOptions(source="synthetic", split="train", out="shards/synthetic6/train"))

The command line is `python -m eagle_dist.shard` (eagle_dist.cli.shard).  Large datasets split
over machines: every part builds its own block of shards, and the last part to finish (or
`merge`) writes the one manifest.

Output (``--out``):

* ``{split}-{index:06d}.tar``: samples with members ``<key>.jpg`` (image; ``<key>.img.png`` when
  stored losslessly), ``<key>.label.png`` (uint8 coarse class ids, 255 = ignore) and
  ``<key>.json`` (source file, crop box, split, dataset, ...).
* ``manifest.json``: dataset, classes with names, ``ignore_value``, per-shard sample counts and
  sha256, builder version and options.  Written only when every shard of the plan exists.
* ``_build/``: the plan and one record per finished shard (its sha256).  Re-running resumes:
  shards whose record and checksum match are kept; the rest are rebuilt.  Shards are written
  under a temporary name and renamed, so a killed build never leaves a half shard under a final
  name.

Shard ``i`` always holds the same input items (a fixed block of the ordered item list), so the
output is byte-identical whatever the worker count or number of parts.  Images: train crops are
JPEG at ``--jpeg-quality`` (75 = PIL's default, what the official crop script wrote); uncropped
samples keep the original JPEG bytes, or are stored as lossless PNG when the source is not a JPEG
(``--image-format auto``), so validation sees the pixels the official code reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eagle_dist.data import sources
from eagle_dist.data.sources import BadInput, Item, Source, SourceLayoutError, five_crop_boxes
from eagle_dist.errors import EagleError

BUILDER_VERSION = "1.0"
IGNORE_VALUE = 255  # stored label value for "no class"; the stream turns it into -1
MANIFEST = "manifest.json"
BUILD_DIR = "_build"
MANIFEST_SKIP_LIST = 1000  # skipped inputs listed by name in the manifest (all are in _build/)

_SAFE_MEMBER = re.compile(r"^[A-Za-z0-9_-]+\.(jpg|img\.png|label\.png|json)$")


class ShardError(EagleError, RuntimeError):
    """Shard building cannot go on; the message says what to do."""


@dataclasses.dataclass
class ShardOptions:
    source: str
    split: str
    out: Path
    root: str | None = None
    samples_per_shard: int = 1000
    crop: str = "auto"  # auto: five-crop when "train" is in the split name
    crop_ratio: float = 0.5
    jpeg_quality: int = 75
    image_format: str = "auto"  # auto | jpeg | png
    workers: int = 1
    strict: bool = False
    num_parts: int = 1
    part: int = 0
    overwrite: bool = False
    progress: bool = True
    quiet: bool = False
    source_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def five_crop(self) -> bool:
        return self.crop == "five" or (self.crop == "auto" and "train" in self.split)


# --------------------------------------------------------------------------- encoding

def _member(key: str, ext: str) -> str:
    name = f"{key}.{ext}"
    # Keys come from sources.safe_key; this guard keeps a future source from ever writing a
    # member that a tar extractor could place outside the shard's folder.
    if not _SAFE_MEMBER.match(name):
        raise ShardError(f"refusing unsafe tar member name {name!r}")
    return name


def encode_sample(sample: sources.SourceSample, box: tuple[int, int, int, int] | None, crop_index: int | None,
                  opts: ShardOptions) -> tuple[str, dict[str, bytes]]:
    """One output sample -> (key, {tar member name: bytes})."""
    image, label = sample.image, sample.label
    key = sample.key if crop_index is None else f"{sample.key}_crop{crop_index}"
    if box is not None:
        top, left, h, w = box
        image = image.crop((left, top, left + w, top + h))
        label = label[top:top + h, left:left + w]
    buf = io.BytesIO()
    if box is None and sample.jpeg is not None and opts.image_format != "png":
        image_member, data, fmt = "jpg", sample.jpeg, "jpeg-original"
    elif opts.image_format == "jpeg" or (opts.image_format == "auto" and box is not None):
        image.save(buf, format="JPEG", quality=opts.jpeg_quality)
        image_member, data, fmt = "jpg", buf.getvalue(), f"jpeg-q{opts.jpeg_quality}"
    else:
        image.save(buf, format="PNG")
        image_member, data, fmt = "img.png", buf.getvalue(), "png"
    stored = np.where(label < 0, IGNORE_VALUE, label).astype(np.uint8)
    label_buf = io.BytesIO()
    Image.fromarray(stored, "L").save(label_buf, format="PNG")
    meta = dict(sample.meta, key=key, crop_box=list(box) if box is not None else None,
                crop_index=crop_index, image_format=fmt)
    return key, {
        _member(key, image_member): data,
        _member(key, "label.png"): label_buf.getvalue(),
        _member(key, "json"): json.dumps(meta, sort_keys=True).encode(),
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same inputs give byte-identical shards (and checksums) on any machine.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# --------------------------------------------------------------------------- one shard (worker)

_WORKER_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _encode_item(source: Source, item: Item, opts: ShardOptions) -> list[tuple[str, dict[str, bytes]]]:
    """The output samples of one input: its five crops (train) or the whole image."""
    sample = source.load(item)
    if not opts.five_crop:
        return [encode_sample(sample, None, None, opts)]
    try:
        boxes = five_crop_boxes(sample.image.height, sample.image.width, opts.crop_ratio)
    except ValueError as exc:
        raise BadInput("bad_format", item.image or item.key, str(exc)) from None
    return [encode_sample(sample, box, k, opts) for k, box in enumerate(boxes)]


def _build_shard(task: dict) -> dict:
    """Write one shard from its block of items; runs in a worker process (or inline)."""
    source = _WORKER_SOURCE
    assert source is not None  # _run_tasks calls _init_worker before any shard
    opts: ShardOptions = task["opts"]
    items: list[Item] = task["items"]
    name = shard_name(opts.split, task["index"])
    final = opts.out / name
    tmp = opts.out / f".{name}.partial-{os.getpid()}"
    skipped: list[dict] = []
    count = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for item in items:
                    try:
                        encoded = _encode_item(source, item, opts)
                    except BadInput as bad:
                        if opts.strict:
                            return {"index": task["index"], "error": f"{bad} (stopped by --strict)"}
                        skipped.append({"file": bad.path, "reason": bad.reason, "detail": bad.detail})
                        continue
                    for _, members in encoded:
                        for member, data in members.items():
                            _add_member(tar, member, data)
                    count += len(encoded)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    record = {
        "name": name, "index": task["index"], "items": [task["start"], task["stop"]], "samples": count,
        "sha256": _sha256(final), "bytes": final.stat().st_size, "skipped": skipped,
        "fingerprint": task["fingerprint"],
    }
    _write_json_atomic(_record_path(opts.out, name), record)
    return record


# --------------------------------------------------------------------------- planning

def _source_from(opts: ShardOptions) -> Source:
    try:
        return sources.open_source(opts.source, opts.root, opts.split, **opts.source_options)
    except (SourceLayoutError, ValueError) as exc:
        raise ShardError(str(exc)) from None


def _build_config(opts: ShardOptions, source: Source, items: list[Item]) -> dict:
    """Everything that determines the bytes of the shards (the root path does not)."""
    digest = hashlib.sha256()
    for it in items:
        digest.update(f"{it.key}\t{it.image}\t{it.label}\t{it.source_index}\n".encode())
    return {
        "builder_version": BUILDER_VERSION, "source": opts.source, "dataset": source.dataset,
        "split": opts.split, "classes": list(source.classes), "five_crop": opts.five_crop,
        "crop_ratio": opts.crop_ratio if opts.five_crop else None, "jpeg_quality": opts.jpeg_quality,
        "image_format": opts.image_format, "samples_per_shard": opts.samples_per_shard,
        "source_options": source.options(), "num_items": len(items), "items_sha256": digest.hexdigest(),
    }


def plan_shards(num_items: int, samples_per_shard: int, crops_per_item: int) -> list[tuple[int, int]]:
    """Item ranges of the shards: fixed blocks, so shard i never depends on what was skipped elsewhere."""
    per_shard = max(1, samples_per_shard // crops_per_item)
    return [(a, min(a + per_shard, num_items)) for a in range(0, num_items, per_shard)]


def part_range(num_shards: int, num_parts: int, part: int) -> range:
    return range(part * num_shards // num_parts, (part + 1) * num_shards // num_parts)


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _own_files(out: Path, split: str) -> list[Path]:
    pattern = re.compile(rf"^\.?{re.escape(split)}-\d{{6}}\.tar(\.partial-\d+)?$")
    found = [p for p in out.iterdir() if pattern.match(p.name)]
    build = out / BUILD_DIR
    if build.is_dir():
        found += list(build.iterdir())
    return found + [p for p in (out / MANIFEST,) if p.exists()]


def _prepare_out(opts: ShardOptions, plan: dict) -> None:
    out = opts.out
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    plan_path = out / BUILD_DIR / "plan.json"
    existing = _read_json(plan_path)
    if existing is not None and existing.get("fingerprint") == plan["fingerprint"]:
        return  # same inputs and options: resume
    if existing is not None:
        if not opts.overwrite:
            old, new = existing.get("config", {}), plan["config"]
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ShardError(
                f"{out} holds shards built from other inputs or options (differences: {', '.join(diff)}). "
                "Use a new --out folder, or --overwrite to delete them and rebuild."
            )
        for path in _own_files(out, existing["config"]["split"]):
            path.unlink()
    _write_json_atomic(plan_path, plan)


def _record_path(out: Path, name: str) -> Path:
    return out / BUILD_DIR / f"{Path(name).stem}.json"


def _finished_record(out: Path, name: str, fingerprint: str, verify: bool = True) -> dict | None:
    """The record of a finished shard of this plan, or None; `verify` re-checks size and sha256."""
    final = out / name
    record = _read_json(_record_path(out, name))
    if record is None or record.get("fingerprint") != fingerprint or not final.is_file():
        return None
    if verify and (final.stat().st_size != record.get("bytes") or _sha256(final) != record.get("sha256")):
        return None
    return record


# --------------------------------------------------------------------------- build / merge

def build(opts: ShardOptions) -> dict:
    """Build this part's shards (resuming), then the manifest if every part is done.  Returns a summary."""
    if opts.samples_per_shard < 1:
        raise ShardError("--samples-per-shard must be >= 1")
    if not 1 <= opts.jpeg_quality <= 100:
        raise ShardError("--jpeg-quality must be in 1..100")
    if not 0 < opts.crop_ratio <= 1:
        raise ShardError("--crop-ratio must be in (0, 1]")
    if opts.crop not in ("auto", "five", "none") or opts.image_format not in ("auto", "jpeg", "png"):
        raise ShardError(f"crop must be auto|five|none and image format auto|jpeg|png "
                         f"(got {opts.crop!r}, {opts.image_format!r})")
    if not (opts.num_parts >= 1 and 0 <= opts.part < opts.num_parts):
        raise ShardError(f"--part must be in 0..{opts.num_parts - 1} (got {opts.part} of {opts.num_parts})")
    t0 = time.perf_counter()
    source = _source_from(opts)
    if source.num_classes > IGNORE_VALUE:
        raise ShardError(f"{source.num_classes} classes do not fit uint8 labels with {IGNORE_VALUE} = ignore")
    try:
        items = source.items()
    except SourceLayoutError as exc:
        raise ShardError(str(exc)) from None
    config = _build_config(opts, source, items)
    fingerprint = _fingerprint(config)
    ranges = plan_shards(len(items), opts.samples_per_shard, 5 if opts.five_crop else 1)
    plan = {"fingerprint": fingerprint, "config": config, "shards": [list(r) for r in ranges]}
    opts.out.mkdir(parents=True, exist_ok=True)
    _prepare_out(opts, plan)

    mine = part_range(len(ranges), opts.num_parts, opts.part)
    for index in mine:  # leftovers of a killed run of this part
        for stale in opts.out.glob(f".{shard_name(opts.split, index)}.partial-*"):
            stale.unlink()
    records: dict[int, dict] = {}
    tasks: list[dict[str, Any]] = []
    for index in mine:
        done = _finished_record(opts.out, shard_name(opts.split, index), fingerprint)
        if done is not None:
            records[index] = done
        else:
            start, stop = ranges[index]
            tasks.append({"index": index, "start": start, "stop": stop, "items": items[start:stop],
                          "opts": opts, "fingerprint": fingerprint})
    kept = len(records)
    total_items = sum(ranges[i][1] - ranges[i][0] for i in mine)
    bar = _progress(opts, total_items, f"{source.dataset} {opts.split}")
    bar.update(sum(ranges[i][1] - ranges[i][0] for i in records))
    try:
        for record in _run_tasks(tasks, source, opts.workers):
            if "error" in record:
                raise ShardError(record["error"])
            records[record["index"]] = record
            bar.update(record["items"][1] - record["items"][0])
    finally:
        bar.close()

    manifest_path = None
    others = [i for i in range(len(ranges)) if i not in records]
    # Other parts verified their own shards when they wrote them; merge re-checks everything.
    other_records = {i: _finished_record(opts.out, shard_name(opts.split, i), fingerprint, verify=False)
                     for i in others}
    found = {i: r for i, r in other_records.items() if r is not None}
    if len(found) == len(other_records):  # every other part has finished
        manifest = _assemble_manifest(plan, {**records, **found})
        manifest_path = opts.out / MANIFEST
        _write_json_atomic(manifest_path, manifest)
    seconds = time.perf_counter() - t0
    mine_records = [records[i] for i in mine]
    built_items = sum(ranges[t["index"]][1] - ranges[t["index"]][0] for t in tasks)
    skipped = [s for r in mine_records for s in r["skipped"]]
    summary = {
        "dataset": source.dataset, "split": opts.split, "part": opts.part, "num_parts": opts.num_parts,
        "items": total_items, "samples": sum(r["samples"] for r in mine_records),
        "shards": len(mine), "shards_built": len(mine) - kept, "shards_kept": kept,
        "skipped": len(skipped), "skipped_by_reason": _count_reasons(skipped), "skipped_files": skipped,
        "seconds": seconds, "built_items_per_s": (built_items / seconds) if seconds > 0 else 0.0,
        "manifest": str(manifest_path) if manifest_path else None,
        "note": getattr(source, "note", None),
    }
    return summary


def _run_tasks(tasks: list[dict], source: Source, workers: int):
    if not tasks:
        return
    if workers <= 1 or len(tasks) == 1:
        _init_worker(source)
        for task in tasks:
            yield _build_shard(task)
        return
    # spawn, not fork: the builder is also called from inside training processes that hold
    # threads (and possibly CUDA), which a forked child would inherit in a broken state.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(source,)) as pool:
        yield from pool.imap_unordered(_build_shard, tasks)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(opts: ShardOptions, total: int, desc: str):
    if not opts.progress or opts.quiet:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def _count_reasons(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return dict(sorted(counts.items()))


def _assemble_manifest(plan: dict, records: dict[int, dict]) -> dict:
    config = plan["config"]
    ordered = [records[i] for i in range(len(plan["shards"]))]
    skipped = [s for r in ordered for s in r["skipped"]]
    return {
        "format": "eagle-dist-shards",
        "dataset": config["dataset"],
        "source": config["source"],
        "split": config["split"],
        "num_classes": len(config["classes"]),
        "classes": [{"id": i, "name": name} for i, name in enumerate(config["classes"])],
        "ignore_value": IGNORE_VALUE,
        "members": {
            "image": "<key>.jpg, or <key>.img.png when stored losslessly",
            "label": "<key>.label.png: uint8 coarse class id, ignore_value = no class",
            "meta": "<key>.json",
        },
        "num_samples": sum(r["samples"] for r in ordered),
        "num_items": config["num_items"],
        "shards": [{"name": r["name"], "samples": r["samples"], "sha256": r["sha256"], "bytes": r["bytes"],
                    "items": r["items"]} for r in ordered],
        "skipped": {
            "count": len(skipped), "by_reason": _count_reasons(skipped),
            "files": skipped[:MANIFEST_SKIP_LIST], "listed": min(len(skipped), MANIFEST_SKIP_LIST),
        },
        "builder": {"name": "eagle_dist.data.shards", "version": BUILDER_VERSION,
                    "options": {k: v for k, v in config.items() if k not in ("dataset", "classes")},
                    "fingerprint": plan["fingerprint"]},
    }


def merge(out: str | Path, verify: bool = True) -> dict:
    """Check every planned shard (record, size, sha256) and write the one manifest.json."""
    out = Path(out)
    plan = _read_json(out / BUILD_DIR / "plan.json")
    if plan is None:
        raise ShardError(f"no build plan at {out / BUILD_DIR / 'plan.json'}: build the shards into {out} first")
    split, fingerprint = plan["config"]["split"], plan["fingerprint"]
    records, bad = {}, []
    for index in range(len(plan["shards"])):
        name = shard_name(split, index)
        record = _finished_record(out, name, fingerprint, verify)
        if record is None:
            bad.append(name)
        else:
            records[index] = record
    if bad:
        shown = ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise ShardError(
            f"{len(bad)} of {len(plan['shards'])} shards in {out} are missing or fail their checksum ({shown}); "
            "run the builder again for the parts that own them (it resumes), then merge"
        )
    manifest = _assemble_manifest(plan, records)
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest
