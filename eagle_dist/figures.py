"""PNG figures drawn with Pillow (no plotting library needed): confusion matrix, sample grids.

Colours for label maps come from a fixed palette so that the same id has the same colour in
every figure of a run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (golden-ratio hues), index n is black for "ignore"."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    out = np.zeros((n + 1, 3), dtype=np.uint8)
    for i, h in enumerate(hues):
        k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
        rgb = 1 - 0.85 * np.clip(np.minimum(k, 4 - k), 0, 1)
        out[i] = (rgb * 255 * (0.75 + 0.25 * (i % 2))).astype(np.uint8)
    return out


def colorize(labels: np.ndarray, n: int) -> np.ndarray:
    """[H, W] ids (negative or >= n = ignore) -> [H, W, 3] uint8."""
    pal = palette(n)
    ids = np.where((labels >= 0) & (labels < n), labels, n)
    return pal[ids]


def denormalize(img_3HW: torch.Tensor) -> np.ndarray:
    arr = img_3HW.detach().cpu().float().numpy().transpose(1, 2, 0)
    return (np.clip(arr * IMAGENET_STD + IMAGENET_MEAN, 0, 1) * 255).astype(np.uint8)


def confusion_png(stats: np.ndarray, class_names: list[str], path: Path, cell: int = 14) -> Path:
    """Row-normalised confusion (rows = predicted clusters, columns = classes) with class names."""
    stats = np.asarray(stats, dtype=np.float64)
    norm = stats / np.maximum(stats.sum(axis=0, keepdims=True), 1)
    rows, cols = norm.shape
    margin = 8 + 6 * max((len(n) for n in class_names), default=4)
    img = Image.new("RGB", (margin + cols * cell + 4, margin + rows * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    for r in range(rows):
        draw.text((2, margin + r * cell), f"c{r}", fill="black")
        for c in range(cols):
            v = int(255 * (1 - norm[r, c]))
            x0, y0 = margin + c * cell, margin + r * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(v, v, 255))
    # Column names, written vertically by rotating a strip.
    strip = Image.new("RGB", (margin, cols * cell), "white")
    sdraw = ImageDraw.Draw(strip)
    for c, name in enumerate(class_names[:cols]):
        sdraw.text((2, c * cell), name, fill="black")
    img.paste(strip.rotate(90, expand=True), (margin, 0))
    img.save(path)
    return path


def sample_grid_png(samples: list[dict], path: Path, n_colors: int | None = None) -> Path:
    """One row per sample: image, ground truth, cluster prediction, EiCue map (each resized)."""
    cols = ["image", "label", "cluster", "eicue"]
    tiles = []
    for s in samples:
        h, w = s["image"].shape[-2:]
        n = n_colors or int(max(int(s["label"].max()), int(s["cluster"].max()), int(s["eicue"].max())) + 1)
        row = [denormalize(s["image"])]
        for key in cols[1:]:
            lab = s[key].numpy()
            tile = Image.fromarray(colorize(lab, n)).resize((w, h), Image.NEAREST)
            row.append(np.asarray(tile))
        tiles.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)
    return path
