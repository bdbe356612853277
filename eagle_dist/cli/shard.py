"""`python -m eagle_dist.shard` / `eagle-dist shard`: build WebDataset shards from a dataset.

    python -m eagle_dist.shard --source cocostuff --root /data/cocostuff --split train --out shards/cocostuff27/train
    python -m eagle_dist.shard --source cityscapes --root /data/cityscapes --split val --out shards/cityscapes27/val
    python -m eagle_dist.shard --source synthetic --split train --out shards/synthetic6/train --synthetic-count 500
    python -m eagle_dist.shard --source folder --root imgs --labels labels --num-classes 5 --split train --out sh/own

Large datasets split over machines: every part lists the same inputs, builds its own block of
shards, and the last part to finish (or ``merge``) writes the one manifest::

    python -m eagle_dist.shard ... --num-parts 8 --part 3     # defaults from SLURM_ARRAY_TASK_COUNT / _ID
    python -m eagle_dist.shard merge --out shards/cocostuff27/train

What the shards hold and how resuming works: see `eagle_dist.data.shards`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eagle_dist.cli import parse_size
from eagle_dist.data import sources
from eagle_dist.data.shards import MANIFEST, ShardError, ShardOptions, build, merge
from eagle_dist.data.sources import SyntheticSpec


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


def _slurm_parts() -> tuple[int, int]:
    """(num_parts, part) of a Slurm array job, or (1, 0)."""
    count, task = os.environ.get("SLURM_ARRAY_TASK_COUNT"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if count is None or task is None:
        return 1, 0
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(count), int(task) - first


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eagle_dist.shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", required=True, choices=sorted(sources.SOURCES))
    p.add_argument("--root", help="dataset folder as downloaded (not used by --source synthetic)")
    p.add_argument("--split", required=True, help="train / val / ... (source-specific)")
    p.add_argument("--out", required=True, type=Path, help="output folder for this split's shards")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--crop", choices=("auto", "five", "none"), default="auto",
                   help="auto: the official five-crop for splits named *train*, none otherwise")
    p.add_argument("--crop-ratio", type=float, default=0.5)
    p.add_argument("--jpeg-quality", type=int, default=75, help="JPEG quality of re-encoded images (PIL default 75)")
    p.add_argument("--image-format", choices=("auto", "jpeg", "png"), default="auto",
                   help="auto: crops as JPEG; uncropped images keep their JPEG bytes, else lossless PNG")
    p.add_argument("--workers", type=int, default=_default_workers())
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    slurm_parts, slurm_part = _slurm_parts()
    p.add_argument("--num-parts", type=int, default=slurm_parts, help="default: $SLURM_ARRAY_TASK_COUNT or 1")
    p.add_argument("--part", type=int, default=slurm_part, help="default: $SLURM_ARRAY_TASK_ID - MIN, or 0")
    p.add_argument("--overwrite", action="store_true", help="delete shards built with other options in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    g = p.add_argument_group("folder source")
    g.add_argument("--labels", help="folder of label PNGs with the images' relative stems")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--class-names", help="comma-separated class names (label value order)")
    g = p.add_argument_group("synthetic source")
    defaults = SyntheticSpec()
    g.add_argument("--synthetic-count", type=int, default=defaults.count)
    g.add_argument("--synthetic-size", type=parse_size, default=(defaults.height, defaults.width),
                   help="HEIGHTxWIDTH")
    g.add_argument("--synthetic-classes", type=int, default=defaults.num_classes)
    g.add_argument("--synthetic-seed", type=int, default=defaults.seed)
    g.add_argument("--synthetic-colour-groups", type=int, default=None,
                   help="distinct colours (< classes: classes share colours, only texture differs)")
    return p


def parse_args(argv: list[str]) -> ShardOptions:
    a = _parser().parse_args(argv)
    if a.source == "folder":
        names = [n.strip() for n in a.class_names.split(",")] if a.class_names else None
        source_options = {"labels": a.labels, "num_classes": a.num_classes, "class_names": names}
    elif a.source == "synthetic":
        h, w = a.synthetic_size
        source_options = {"spec": SyntheticSpec(count=a.synthetic_count, height=h, width=w,
                                                num_classes=a.synthetic_classes, seed=a.synthetic_seed,
                                                colour_groups=a.synthetic_colour_groups)}
    else:
        source_options = {}
    return ShardOptions(
        source=a.source, split=a.split, out=a.out, root=a.root, samples_per_shard=a.samples_per_shard,
        crop=a.crop, crop_ratio=a.crop_ratio, jpeg_quality=a.jpeg_quality, image_format=a.image_format,
        workers=a.workers, strict=a.strict, num_parts=a.num_parts, part=a.part, overwrite=a.overwrite,
        progress=not a.no_progress, quiet=a.quiet, source_options=source_options,
    )


def format_summary(s: dict, max_files: int = 20) -> str:
    part = f" (part {s['part']} of {s['num_parts']})" if s["num_parts"] > 1 else ""
    lines = [
        f"{s['dataset']} {s['split']}{part}: {s['items']} inputs -> {s['samples']} samples in {s['shards']} shards "
        f"({s['shards_built']} built, {s['shards_kept']} kept) in {s['seconds']:.1f} s "
        f"({s['built_items_per_s']:.1f} inputs built/s)"
    ]
    if s["skipped"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in s["skipped_by_reason"].items())
        lines.append(f"skipped {s['skipped']} inputs ({reasons}):")
        lines += [f"  {f['file']}: {f['reason']}" + (f" ({f['detail']})" if f["detail"] else "")
                  for f in s["skipped_files"][:max_files]]
        if s["skipped"] > max_files:
            lines.append(f"  ... and {s['skipped'] - max_files} more (all listed in _build/*.json)")
    if s.get("note"):
        lines.append(s["note"])
    lines.append(f"manifest: {s['manifest']}" if s["manifest"] else
                 "manifest: not yet (other parts unfinished; `python -m eagle_dist.shard merge --out ...` when done)")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict:
    """Build or merge as the command line says; raises ShardError.  Returns the summary / manifest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        p = argparse.ArgumentParser(prog="python -m eagle_dist.shard merge",
                                    description="Check every shard of a (multi-part) build and write manifest.json.")
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--no-verify", action="store_true", help="skip re-hashing the shards")
        a = p.parse_args(argv[1:])
        manifest = merge(a.out, verify=not a.no_verify)
        print(f"{a.out / MANIFEST}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards")
        return manifest
    opts = parse_args(argv)
    summary = build(opts)
    if not opts.quiet:
        print(format_summary(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`eagle-dist shard` (and `python -m eagle_dist.shard`): 0 on success, 2 with a one-line error otherwise."""
    try:
        run(argv)
    except ShardError as err:
        print(f"eagle-dist shard: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
