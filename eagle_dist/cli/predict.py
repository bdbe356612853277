"""Segment a folder (or a list) of images of any size with a trained checkpoint, on 1..N processes.

    python -m eagle_dist.predict --checkpoint runs/NAME --input photos/ --out predictions/
    python -m eagle_dist.predict --checkpoint runs/NAME/checkpoints/step-00000400 --input a.jpg b.png --out OUT
    python -m eagle_dist.predict --checkpoint runs/NAME --input photos/ --out OUT --probe linear
    torchrun --nproc_per_node 8 -m eagle_dist.predict --checkpoint runs/NAME --input photos/ --out OUT
    accelerate launch --multi_gpu --num_processes 8 -m eagle_dist.predict --checkpoint runs/NAME --input photos/ --out OUT

Writes, per readable image, at the input's size:

* ``OUT/labels/<stem>.png``: a label PNG (8-bit, 16-bit when ids exceed 255).  Cluster probe
  (default): cluster ids mapped to class ids by the Hungarian table that ``eagle_dist.cli.evaluate``
  stored in ``<run>/eval/step-XXXXXXXX/assignment.json`` (or ``--assignment FILE``), using its
  ``strict`` matching; clusters that won no class get 255.  Without a table the raw cluster ids
  are written (and a note says so).  ``--probe linear`` writes the linear probe's class ids.
* ``OUT/overlays/<stem>.png``: the image blended with the colour-coded labels.
* ``OUT/legend.png`` and ``OUT/legend.json``: each id's colour, name and share of all predicted
  pixels (of every image in OUT/labels that this command's inputs name).

A checkpoint trained without labels (``model.n_classes=0``) writes its segment ids
``0..model.n_clusters-1`` (no table, no linear probe).

Any size, bounded memory: the whole image is resized (no crop) so that its shorter side is the
checkpoint's ``data.val_resolution`` (``--resolution R``) and both sides are multiples of the ViT
patch, nearest-neighbour like the evaluation images (quirk 18); the ViT runs on that whole grid.
The probe's scores (not the 512-channel code) are upsampled bilinearly to the input size and the
argmax taken there, in bands of rows (eagle_dist.evaluation.inference.label_bands): the labels are
the official ones (upsampled code, then probe), and the memory is the decoded image, its label
map and overlay, and one band.  Images above ``--max-image-pixels`` (Pillow's default guard
against decompression bombs) are refused with a message naming the option.

At scale: under torchrun / accelerate every process takes its share of the images (one device
each) and writes its own outputs; rank 0 shows the progress (its share, images/s) and writes the
legend.  Every PNG is written under a temporary name in the same folder and renamed, so a name
in labels/ or overlays/ is always a complete file; the label PNG is written last and records the
settings it was made with, so a rerun skips the images already done with the same settings (a
killed job continues where it stopped) and ``--overwrite`` redoes them.  Outputs made with other
settings are refused unless ``--overwrite`` is given.

Files that cannot be read as images are reported and skipped; a summary ends the run.  The exit
status is non-zero only when no image at all could be read.  Images with the same stem in
different folders or formats get the extension appended to keep their outputs apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from eagle_dist.errors import EagleError
from eagle_dist.evaluation import figures
from eagle_dist.evaluation.inference import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EvaluateError,
    ImageReadError,
    load_assignment,
    open_checkpoint,
    open_image,
    pick_device,
    segment,
)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNMATCHED = 255
PARTIAL = "-partial"  # in the temporary name of a PNG being written: .<name>.<pid>-partial.png
SETTINGS_KEY = "eagle-dist-predict"  # the label PNG's text chunk holding its settings' fingerprint


def list_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image files named or inside the given folders (sorted), and the inputs that do not exist."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            missing.append(item)
    return files, missing


def output_stems(files: list[Path]) -> list[str]:
    """File stems, with the extension appended where two inputs share a stem."""
    stems = [p.stem for p in files]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    out, used = [], set()
    for p, s in zip(files, stems):
        name = s if seen[s] == 1 else f"{s}_{p.suffix.lstrip('.').lower()}"
        base, k = name, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eagle_dist.predict",
                                     description="Segment images of any size with an eagle-dist checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="run folder (newest complete checkpoint), step folder, or an official EAGLE .ckpt")
    parser.add_argument("--step", type=int, default=None, help="use this step of the run folder")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder (labels/ and overlays/ are created in it)")
    parser.add_argument("--probe", choices=("cluster", "linear"), default="cluster",
                        help="cluster probe (unsupervised, default) or linear probe")
    parser.add_argument("--assignment", default=None,
                        help="assignment.json from eagle_dist.cli.evaluate (default: <run>/eval/<step>/assignment.json)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="shorter side fed to the ViT (default: the checkpoint's data.val_resolution)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the labels (default 0.5)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda if available; under a launcher each rank's own)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo images whose outputs exist (default: skip those done with the same settings)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"refuse larger images (default {DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's "
                             "decompression-bomb guard; 0 = no limit)")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads per process (default: cores / processes on this node)")
    return parser.parse_args(argv)


@dataclass
class LabelScheme:
    """What the written ids mean: the cluster->class lookup (None: ids as the probe gives them),
    the names for the legend, how many ids can occur, and a note for the log and legend.json."""

    lookup: np.ndarray | None
    class_names: list[str] | None
    n_colors: int
    ids_note: str
    raw_clusters: bool  # ids are cluster (segment) ids, not class ids


def label_scheme(args: argparse.Namespace, loaded, step_dir: Path) -> LabelScheme:
    """The ids to write for `--probe` / `--assignment`; EvaluateError when they cannot be used."""
    cfg = loaded.cfg
    n_classes, n_clusters = cfg.model.n_classes, cfg.model.cluster_count
    if cfg.model.unlabeled and (args.probe == "linear" or args.assignment):
        raise EvaluateError(f"{step_dir} was trained without labels (model.n_classes=0): it has no linear probe "
                            "and no cluster->class table; leave out --probe linear / --assignment to write its segments")
    table, class_names = None, None
    if args.probe == "cluster" and not cfg.model.unlabeled:
        path = Path(args.assignment) if args.assignment else loaded.eval_dir / "assignment.json"
        if path.is_file():
            try:
                table = load_assignment(path, n_clusters, None if args.assignment else loaded.step)
                class_names = json.loads(path.read_text()).get("class_names")
            except (ValueError, OSError) as err:
                raise EvaluateError(f"cannot use the cluster->class table {path}: {err}") from err
        elif args.assignment:
            raise EvaluateError(f"assignment file not found: {path}")
    if cfg.model.unlabeled:
        ids_note, n_colors = f"segment ids 0..{n_clusters - 1} (trained without labels)", n_clusters
    elif args.probe == "linear":
        ids_note, n_colors = "linear-probe class ids", n_classes
    elif table is not None:
        ids_note, n_colors = f"class ids (Hungarian table {path}; {UNMATCHED} = unmatched cluster)", n_classes
    else:
        ids_note, n_colors = (f"raw cluster ids (no table at {path}: run eagle_dist.cli.evaluate on this "
                              "checkpoint, or pass --assignment)"), n_clusters
    # uint8 ids stay uint8 through the lookup (a 54-megapixel map is 54 MB, not 432)
    dtype = np.uint8 if n_classes <= UNMATCHED else np.uint16
    lookup = None if table is None else np.asarray([c if c >= 0 else UNMATCHED for c in table], dtype=dtype)
    return LabelScheme(lookup, class_names, n_colors, ids_note, raw_clusters=table is None and args.probe == "cluster")


def fingerprint(loaded, labels: LabelScheme, probe: str, short_side: int, alpha: float) -> str:
    """What the outputs depend on, hashed: the label PNG carries it, a rerun compares it."""
    settings = {"checkpoint": str(Path(loaded.step_dir).resolve()), "step": loaded.step, "probe": probe,
                "resolution": short_side, "alpha": alpha,
                "lookup": None if labels.lookup is None else labels.lookup.tolist()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def partial_name(final: Path) -> Path:
    return final.with_name(f".{final.stem}.{os.getpid()}{PARTIAL}{final.suffix}")


def save_png(image: Image.Image, final: Path, **params) -> None:
    """`image` as the PNG `final`, written under a temporary name in the same folder and renamed:
    `final` never names half a file."""
    tmp = partial_name(final)
    try:
        image.save(tmp, format="PNG", **params)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partials(out: Path) -> int:
    """Delete the temporary files a killed run left (before any process of this run writes)."""
    stale = [p for sub in ("labels", "overlays", ".") for p in (out / sub).glob(f".*{PARTIAL}.*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def done_with(label_png: Path, overlay_png: Path) -> str | None:
    """The settings fingerprint of a finished output pair ("" for a label PNG without one), None
    when it is not finished (the label PNG is written last)."""
    if not label_png.is_file() or not overlay_png.is_file():
        return None
    try:
        with Image.open(label_png) as im:
            return str(im.info.get(SETTINGS_KEY, ""))
    except (OSError, ValueError, SyntaxError):
        return None


@dataclass
class Plan:
    """What every rank does: the inputs, their output stems, which still need segmenting (todo)
    and which are finished with the same settings (done: their pixels count for the legend)."""

    files: list[Path]
    stems: list[str]
    todo: list[int]
    done: list[int]


def make_plan(files: list[Path], out: Path, key: str, overwrite: bool) -> Plan:
    stems = output_stems(files)
    todo, done, other = [], [], []
    for i, stem in enumerate(stems):
        found = done_with(out / "labels" / f"{stem}.png", out / "overlays" / f"{stem}.png")
        if found is None or overwrite:
            todo.append(i)
        elif found == key:
            done.append(i)
        else:
            other.append(stem)
    if other:
        raise EvaluateError(f"{out} already holds {len(other)} prediction(s) made with other settings (checkpoint, "
                            f"probe, resolution, table or alpha), e.g. labels/{other[0]}.png; pass --overwrite to "
                            "replace them, or choose another --out")
    return Plan(files, stems, todo, done)


def id_counts(ids: np.ndarray, labels: LabelScheme) -> tuple[np.ndarray, np.ndarray]:
    """The ids to colour (-1: unmatched cluster, drawn as the photo) and how many pixels each id has."""
    colour = ids.astype(np.int32)
    if labels.lookup is not None:
        colour[ids == UNMATCHED] = -1
    kept = colour[(colour >= 0) & (colour < labels.n_colors)]
    return colour, np.bincount(kept, minlength=labels.n_colors)[: labels.n_colors]


def write_outputs(image: Image.Image, ids: np.ndarray, labels: LabelScheme, alpha: float, out: Path, stem: str,
                  key: str) -> np.ndarray:
    """The overlay, then the label PNG (which marks the pair finished); returns pixels per id.
    The overlay is drawn in bands of rows so that only one band is ever held as floats."""
    w, h = image.size
    shown = Image.new("RGB", (w, h))
    pixels = np.zeros(labels.n_colors, dtype=np.int64)
    step = max(1, (1 << 20) // max(w, 1))
    for top in range(0, h, step):
        bottom = min(top + step, h)
        colour, counts = id_counts(ids[top:bottom], labels)
        pixels += counts
        band = np.asarray(image.crop((0, top, w, bottom)))
        shown.paste(Image.fromarray(figures.overlay(band, colour, labels.n_colors, alpha)), (0, top))
    save_png(shown, out / "overlays" / f"{stem}.png")
    del shown
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, key)
    save_png(Image.fromarray(ids), out / "labels" / f"{stem}.png", pnginfo=info)
    return pixels


def segment_share(d, loaded, labels: LabelScheme, plan: Plan, args, short_side: int, out: Path,
                  key: str) -> tuple[int, list[tuple[str, str]], np.ndarray]:
    """Segment this rank's share of the images: (written, skipped with reasons, pixels per id).

    One thread decodes the next image and one writes the previous outputs while the model runs
    (Pillow's decoders and encoders release the GIL); each holds at most one image.
    """
    from tqdm import tqdm

    mine = plan.todo[d.rank::d.world_size]
    lookup = labels.lookup
    skipped: list[tuple[str, str]] = []
    written = 0
    pixels = np.zeros(labels.n_colors, dtype=np.int64)
    limit = args.max_image_pixels or None
    bar = tqdm(total=len(mine), unit="img", file=sys.stderr, disable=not d.is_main,
               desc="segmenting" if d.world_size == 1 else f"segmenting (rank 0's share; {d.world_size} processes)")
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending: Future | None = None
        reads = [reader.submit(open_image, plan.files[i], limit) for i in mine[:1]]
        for n, i in enumerate(mine):
            if n + 1 < len(mine):
                reads.append(reader.submit(open_image, plan.files[mine[n + 1]], limit))
            path, stem = plan.files[i], plan.stems[i]
            try:
                image = reads.pop(0).result()
            except ImageReadError as err:
                image = None
                skipped.append((str(path), str(err)))
                bar.write(f"skipped {err}", file=sys.stderr)
            if image is not None:
                ids = segment(loaded, image, short_side, args.probe)
                if lookup is not None:
                    ids = lookup[ids]
                if pending is not None:
                    pixels += pending.result()
                pending = writer.submit(write_outputs, image, ids, labels, args.alpha, out, stem, key)
                written += 1
                del image, ids
            bar.update(1)
        if pending is not None:
            pixels += pending.result()
    bar.close()
    return written, skipped, pixels


def count_done(d, plan: Plan, labels: LabelScheme, out: Path) -> np.ndarray:
    """Pixels per id of this rank's share of the images finished by an earlier run (for the legend)."""
    pixels = np.zeros(labels.n_colors, dtype=np.int64)
    for i in plan.done[d.rank::d.world_size]:
        with Image.open(out / "labels" / f"{plan.stems[i]}.png") as im:
            ids = np.asarray(im)
        for top in range(0, ids.shape[0], 256):
            pixels += id_counts(ids[top:top + 256], labels)[1]
    return pixels


def write_legend(out: Path, names: list[str], pixels: np.ndarray, n_colors: int, ids_note: str) -> Path:
    """``OUT/legend.png`` (colour, name, share of all predicted pixels per id) and ``legend.json``."""
    shares = (pixels / max(int(pixels.sum()), 1)).tolist()
    colours = figures.palette(n_colors)[:n_colors].tolist()
    final = out / "legend.json"
    tmp = partial_name(final)
    tmp.write_text(json.dumps({
        "labels": ids_note,
        "ids": [{"id": i, "name": names[i], "rgb": colours[i], "pixel_share": shares[i]} for i in range(n_colors)],
    }, indent=1))
    os.replace(tmp, final)
    final = out / "legend.png"
    os.replace(figures.legend_png(names, n_colors, partial_name(final), shares=shares, title="id: share of pixels"),
               final)
    return final


def _plan_on_rank0(d, args, out: Path, key: str) -> Plan | tuple[int, str]:
    """Rank 0 lists the inputs, clears a killed run's temporary files and decides what to do; the
    others get the same plan (or the exit status and error to report) through one broadcast."""
    result: Plan | tuple[int, str] | None = None
    if d.is_main:
        files, missing = list_inputs(args.input)
        for item in missing:
            print(f"warning: {item} does not exist; skipped", file=sys.stderr)
        if not files:
            result = 1, (f"no image files found in {' '.join(args.input)} "
                      f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        else:
            try:
                (out / "labels").mkdir(parents=True, exist_ok=True)
                (out / "overlays").mkdir(parents=True, exist_ok=True)
                remove_partials(out)
                result = make_plan(files, out, key, args.overwrite)
            except (EagleError, OSError) as err:
                result = 2, str(err)
    return d.broadcast_object(result)


def main(argv: list[str] | None = None) -> int:
    from eagle_dist import distributed as dist_mod

    args = parse_args(argv)
    d = dist_mod.setup(strategy="ddp", mixed_precision="no", cpu_threads=args.cpu_threads)
    try:
        return _run(d, args)
    except EagleError as err:
        if d.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        d.cleanup()


def _run(d, args) -> int:
    loaded, selection = open_checkpoint(args.checkpoint, args.step, pick_device(args.device, d), quiet=not d.is_main)
    labels = label_scheme(args, loaded, loaded.step_dir)
    short_side = args.resolution or loaded.cfg.data.val_resolution
    key = fingerprint(loaded, labels, args.probe, short_side, args.alpha)
    out = Path(args.out)
    plan = _plan_on_rank0(d, args, out, key)
    if isinstance(plan, tuple):
        if d.is_main:
            print(f"error: {plan[1]}", file=sys.stderr)
        return plan[0]
    d.print(f"checkpoint {loaded.step_dir} ({selection}); {len(plan.files)} images, {len(plan.todo)} to segment"
            + (f", {len(plan.done)} already done (--overwrite redoes them)" if plan.done else "")
            + (f" on {d.world_size} processes" if d.world_size > 1 else "") + f"; labels are {labels.ids_note}")

    t0 = time.perf_counter()
    written, skipped, pixels = segment_share(d, loaded, labels, plan, args, short_side, out, key)
    pixels += count_done(d, plan, labels, out)
    totals = torch.tensor([written, *pixels.tolist()], dtype=torch.int64, device=d.device)
    d.all_reduce_sum(totals)
    wall = time.perf_counter() - t0  # until the last process is done: the job's rate
    written, pixels = int(totals[0]), totals[1:].cpu().numpy()
    skipped = [s for share in d.gather_object(skipped) for s in share]
    if not d.is_main:
        return 0 if written + len(plan.done) else 1
    n_colors = labels.n_colors
    finished = written + len(plan.done)
    if finished:
        kind = "segment" if labels.raw_clusters else "class"
        names = list(labels.class_names or [])[:n_colors] if kind == "class" else []
        names += [f"{kind} {i}" for i in range(len(names), n_colors)]
        legend = write_legend(out, names, pixels, n_colors, labels.ids_note)
        rate = f" in {wall:.1f} s ({written / max(wall, 1e-9):.2f} images/s)" if written else ""
        print(f"segmented {written} of {len(plan.files)} images{rate} into {out}/labels and {out}/overlays"
              + (f" ({len(plan.done)} were already done)" if plan.done else "")
              + f"; colours and pixel shares in {legend}")
    else:
        print(f"segmented 0 of {len(plan.files)} images")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {reason}", file=sys.stderr)
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
