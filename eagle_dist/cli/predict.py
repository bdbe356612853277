"""Segment a folder (or a list) of images of any size with a trained checkpoint.

    python -m eagle_dist.predict --checkpoint runs/NAME --input photos/ --out predictions/
    python -m eagle_dist.predict --checkpoint runs/NAME/checkpoints/step-00000400 --input a.jpg b.png --out OUT
    python -m eagle_dist.predict --checkpoint runs/NAME --input photos/ --out OUT --probe linear

Writes, per readable image, at the input's size:

* ``OUT/labels/<stem>.png``: a label PNG (8-bit, 16-bit when ids exceed 254).  Cluster probe
  (default): cluster ids mapped to class ids by the Hungarian table that ``eagle_dist.cli.evaluate``
  stored in ``<run>/eval/step-XXXXXXXX/assignment.json`` (or ``--assignment FILE``), using its
  ``strict`` matching; clusters that won no class get 255.  Without a table the raw cluster ids
  are written (and a note says so).  ``--probe linear`` writes the linear probe's class ids.
* ``OUT/overlays/<stem>.png``: the image blended with the colour-coded labels.
* ``OUT/legend.png`` and ``OUT/legend.json``: each id's colour, name and share of all predicted
  pixels.

A checkpoint trained without labels (``model.n_classes=0``) writes its segment ids
``0..model.n_clusters-1`` (no table, no linear probe).

How any size is handled: the whole image is resized (no crop) so that its shorter side is the
checkpoint's ``data.val_resolution`` and both sides are multiples of the ViT patch (aspect kept
within half a patch), nearest-neighbour like the training and evaluation images (quirk 18).  The
ViT runs on that whole grid (DINO's position-embedding interpolation handles any grid), so no
sliding window is needed; the probe scores are upsampled bilinearly to the input size and the
argmax taken there.  ``--resolution R`` changes the shorter side.

Files that cannot be read as images are reported and skipped; a summary ends the run.  The exit
status is non-zero only when no image at all could be read.  Images with the same stem in
different folders or formats get the extension appended to keep their outputs apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNMATCHED = 255


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


def write_label_png(ids: np.ndarray, path: Path) -> None:
    if ids.max(initial=0) <= 255:
        Image.fromarray(ids.astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray(ids.astype(np.uint16)).save(path)


def write_legend(out: Path, names: list[str], pixels: np.ndarray, n_colors: int, ids_note: str) -> Path:
    """``OUT/legend.png`` (colour, name, share of all predicted pixels per id) and ``legend.json``."""
    from eagle_dist.evaluation import figures

    shares = (pixels / max(int(pixels.sum()), 1)).tolist()
    colours = figures.palette(n_colors)[:n_colors].tolist()
    (out / "legend.json").write_text(json.dumps({
        "labels": ids_note,
        "ids": [{"id": i, "name": names[i], "rgb": colours[i], "pixel_share": shares[i]} for i in range(n_colors)],
    }, indent=1))
    return figures.legend_png(names, n_colors, out / "legend.png", shares=shares, title="id: share of pixels")


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
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
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
    from eagle_dist.evaluation.inference import EvaluateError, load_assignment

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
    lookup = None if table is None else np.asarray([c if c >= 0 else UNMATCHED for c in table], dtype=np.int64)
    return LabelScheme(lookup, class_names, n_colors, ids_note, raw_clusters=table is None and args.probe == "cluster")


def segment_files(files: list[Path], loaded, labels: LabelScheme, short_side: int, args: argparse.Namespace,
                  out: Path) -> tuple[int, list[tuple[Path, str]], np.ndarray]:
    """Write the label PNG and overlay of every readable file: (written, skipped with reasons,
    pixels per id)."""
    from tqdm import tqdm

    from eagle_dist.evaluation import figures
    from eagle_dist.evaluation.inference import segment

    n_colors, lookup = labels.n_colors, labels.lookup
    skipped: list[tuple[Path, str]] = []
    written = 0
    pixels = np.zeros(n_colors, dtype=np.int64)  # per drawn id, for the legend
    for path, stem in tqdm(list(zip(files, output_stems(files))), desc="segmenting", unit="img", file=sys.stderr):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            skipped.append((path, f"{type(err).__name__}: {err}"))
            tqdm.write(f"skipped {path}: not a readable image ({err})", file=sys.stderr)
            continue
        ids = segment(loaded, image, short_side, args.probe)
        if lookup is not None:
            ids = lookup[ids]
        write_label_png(ids, out / "labels" / f"{stem}.png")
        colour_ids = np.where(ids == UNMATCHED, -1, ids) if lookup is not None else ids
        pixels += np.bincount(colour_ids[colour_ids >= 0].ravel(), minlength=n_colors)[:n_colors]
        Image.fromarray(figures.overlay(np.asarray(image), colour_ids, n_colors, args.alpha)).save(
            out / "overlays" / f"{stem}.png")
        written += 1
    return written, skipped, pixels


def main(argv: list[str] | None = None) -> int:
    from eagle_dist.errors import USER_ERRORS
    from eagle_dist.evaluation.inference import EvaluateError, load_model, resolve_checkpoint

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        step_dir, selection = resolve_checkpoint(args.checkpoint, args.step)
        loaded = load_model(step_dir, device=device)
    except (*USER_ERRORS, EvaluateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        labels = label_scheme(args, loaded, step_dir)
    except EvaluateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    short_side = args.resolution or loaded.cfg.data.val_resolution

    files, missing = list_inputs(args.input)
    for item in missing:
        print(f"warning: {item} does not exist; skipped", file=sys.stderr)
    if not files:
        print(f"error: no image files found in {' '.join(args.input)} "
              f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})", file=sys.stderr)
        return 1
    out = Path(args.out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {step_dir} ({selection}); {len(files)} images; labels are {labels.ids_note}")

    written, skipped, pixels = segment_files(files, loaded, labels, short_side, args, out)
    n_colors = labels.n_colors
    if written:
        kind = "segment" if labels.raw_clusters else "class"
        names = list(labels.class_names or [])[:n_colors] if kind == "class" else []
        names += [f"{kind} {i}" for i in range(len(names), n_colors)]
        legend = write_legend(out, names, pixels, n_colors, labels.ids_note)
        print(f"segmented {written} of {len(files)} images into {out}/labels and {out}/overlays; "
              f"colours and pixel shares in {legend}")
    else:
        print(f"segmented 0 of {len(files)} images")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
