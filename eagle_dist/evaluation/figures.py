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


def confusion_png(stats: np.ndarray, class_names: list[str], path: Path, cell: int = 14,
                  row_names: list[str] | None = None) -> Path:
    """Column-normalised confusion (rows = predictions, columns = classes) with class names.

    Rows are named ``c0, c1, ...`` (cluster ids) unless ``row_names`` are given.
    """
    stats = np.asarray(stats, dtype=np.float64)
    norm = stats / np.maximum(stats.sum(axis=0, keepdims=True), 1)
    rows, cols = norm.shape
    row_names = row_names or [f"c{r}" for r in range(rows)]
    margin = 8 + 6 * max((len(n) for n in list(class_names) + list(row_names)), default=4)
    img = Image.new("RGB", (margin + cols * cell + 4, margin + rows * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    for r in range(rows):
        draw.text((2, margin + r * cell), row_names[r], fill="black")
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


def sample_grid_png(samples: list[dict], path: Path, n_colors: int | None = None,
                    columns: tuple[str, ...] = ("image", "label", "cluster", "eicue"),
                    titles: list[str] | None = None) -> Path:
    """One row per sample: the image, then one colour-coded map per key of `columns` (resized).

    ``titles`` (one per column) are written in a strip above the grid.
    """
    cols = list(columns)
    tiles = []
    for s in samples:
        h, w = s["image"].shape[-2:]
        n = n_colors or int(max(int(s[key].max()) for key in cols[1:]) + 1)
        row = [denormalize(s["image"])]
        for key in cols[1:]:
            lab = s[key].numpy()
            tile = Image.fromarray(colorize(lab, n)).resize((w, h), Image.NEAREST)
            row.append(np.asarray(tile))
        tiles.append(np.concatenate(row, axis=1))
    grid = Image.fromarray(np.concatenate(tiles, axis=0))
    if titles:
        grid = _with_header(grid, list(titles), grid.width // len(cols))
    grid.save(path)
    return path


def _with_header(img: Image.Image, titles: list[str], tile_w: int, height: int = 14) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + height), "white")
    draw = ImageDraw.Draw(out)
    for i, title in enumerate(titles):
        draw.text((i * tile_w + 2, 1), title, fill="black")
    out.paste(img, (0, height))
    return out


def overlay(image_HW3: np.ndarray, labels_HW: np.ndarray, n: int, alpha: float = 0.5) -> np.ndarray:
    """The image blended with the colour-coded labels (ignore ids keep the image's pixels)."""
    colours = colorize(labels_HW, n).astype(np.float32)
    valid = ((labels_HW >= 0) & (labels_HW < n))[..., None]
    mixed = (1 - alpha) * image_HW3.astype(np.float32) + alpha * colours
    return np.where(valid, mixed, image_HW3).round().clip(0, 255).astype(np.uint8)


def heatmap(values_HW: np.ndarray) -> np.ndarray:
    """Diverging blue-white-red map, symmetric around 0 (eigenvectors have arbitrary sign)."""
    v = np.asarray(values_HW, dtype=np.float32)
    scale = float(np.abs(v).max()) or 1.0
    t = np.clip(v / scale, -1, 1)[..., None]
    white = np.array([255, 255, 255], dtype=np.float32)
    red = np.array([200, 30, 30], dtype=np.float32)
    blue = np.array([30, 60, 200], dtype=np.float32)
    rgb = np.where(t >= 0, white + t * (red - white), white - t * (blue - white))
    return rgb.round().astype(np.uint8)


def eigen_png(image_HW3: np.ndarray, eigvecs_KHW: np.ndarray, eicue_HW: np.ndarray, kmeans_HW: np.ndarray,
              path: Path, n_colors: int, kmeans_title: str = "k-means", min_height: int = 224) -> Path:
    """One row: image, one heat map per non-trivial eigenvector, EiCue clusters, k-means clusters.

    Small images are enlarged (nearest) to at least `min_height` rows so the maps stay legible.
    """
    h, w = image_HW3.shape[:2]
    if h < min_height:
        factor = -(-min_height // h)
        h, w = h * factor, w * factor
        image_HW3 = np.asarray(Image.fromarray(image_HW3).resize((w, h), Image.NEAREST))

    def up(arr: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.NEAREST))

    tiles = [image_HW3]
    titles = ["image"]
    for k, vec in enumerate(eigvecs_KHW, start=1):
        tiles.append(np.asarray(Image.fromarray(heatmap(vec)).resize((w, h), Image.BILINEAR)))
        titles.append(f"eigenvector {k}")
    tiles += [up(colorize(eicue_HW, n_colors)), up(colorize(kmeans_HW, n_colors))]
    titles += ["EiCue", kmeans_title]
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    _with_header(Image.fromarray(row), titles, w + 4).save(path)
    return path
