"""PNG figures drawn with Pillow (no plotting library needed): confusion matrix, per-class IoU
bars, sample grids, eigenvector rows.

    from eagle_dist.evaluation import figures
    figures.confusion_png(result.cluster.counts.numpy(), names, Path("confusion.png"), pred_names=...)


Colours for label maps come from a fixed palette so that the same id has the same colour in
every figure of a run.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD


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
    return (np.clip(arr * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32), 0, 1) * 255).astype(np.uint8)


def font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (needs FreeType; otherwise its small fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _text_width(text: str, fnt) -> int:
    return int(math.ceil(fnt.getlength(text)))


def cluster_order(strict_map, class_names: list[str]) -> tuple[list[int], list[str]]:
    """Cluster ids in class order (the cluster matched to class k first), unmatched ones last.

    With the names "class (cK)" / "cK (unmatched)", so that a good model shows a diagonal.
    """
    strict_map = np.asarray(strict_map)
    order = [int(np.flatnonzero(strict_map == k)[0]) for k in range(len(class_names)) if (strict_map == k).any()]
    order += [c for c in range(len(strict_map)) if c not in order]
    names = [f"{class_names[strict_map[c]]} (c{c})" if strict_map[c] >= 0 else f"c{c} (unmatched)" for c in order]
    return order, names


def clusters_to_classes(cluster_ids: torch.Tensor, strict_map) -> torch.Tensor:
    """Cluster ids mapped to their Hungarian class (-1 where a cluster has no class)."""
    lookup = torch.as_tensor(np.asarray(strict_map), dtype=torch.long)
    valid = (cluster_ids >= 0) & (cluster_ids < len(lookup))
    return torch.where(valid, lookup[cluster_ids.clamp(0, len(lookup) - 1)], torch.full_like(cluster_ids, -1))


def confusion_png(counts_PC: np.ndarray, class_names: list[str], path: Path, pred_names: list[str] | None = None,
                  title: str = "", cell: int = 28) -> Path:
    """Confusion matrix: rows = ground-truth classes (each row normalised), columns = predictions.

    ``counts_PC`` is [predictions, classes] as :class:`metrics.ConfusionMatrix` counts it;
    predictions are named ``pred_names`` (default: the class names, for the linear probe).  A
    cell shows the percentage of the row's pixels; the last column is the row's pixel count.
    """
    counts = np.asarray(counts_PC, dtype=np.float64).T  # [classes, predictions]
    rows, cols = counts.shape
    totals = counts.sum(axis=1)
    share = counts / np.maximum(totals[:, None], 1)
    pred_names = list(pred_names) if pred_names is not None else list(class_names[:cols])
    fnt, small, big = font(13), font(max(9, cell // 3 + 1)), font(15)
    pad = 8
    left = pad + max(_text_width(n, fnt) for n in class_names[:rows]) + pad
    bottom = pad + max(_text_width(n, fnt) for n in pred_names) + pad + 18
    top = pad + (22 if title else 0) + 22
    count_w = max(_text_width(f"{int(t):,}", small) for t in totals) + 2 * pad
    width = max(left + cols * cell + count_w + pad, _text_width(title, big) + 2 * pad)
    img = Image.new("RGB", (width, top + rows * cell + bottom), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, fill="black", font=big)
    for r in range(rows):
        y = top + r * cell
        draw.text((left - pad, y + cell // 2), class_names[r], fill="black", font=fnt, anchor="rm")
        for c in range(cols):
            v = share[r, c]
            x = left + c * cell
            shade = (int(255 - 215 * v), int(255 - 175 * v), 255) if totals[r] else (235, 235, 235)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade, outline=(225, 225, 225))
            if totals[r] and round(100 * v) >= 1 and cell >= 18:
                draw.text((x + cell // 2, y + cell // 2), f"{100 * v:.0f}", font=small, anchor="mm",
                          fill="white" if v > 0.55 else "black")
        draw.text((left + cols * cell + pad, y + cell // 2), f"{int(totals[r]):,}", fill=(90, 90, 90), font=small,
                  anchor="lm")
    draw.text((left + cols * cell + pad, top - 2), "pixels", fill=(90, 90, 90), font=small, anchor="lb")
    # Prediction names written vertically under their columns: drawn on a strip, then rotated.
    strip = Image.new("RGB", (bottom - 18, cols * cell), "white")
    sdraw = ImageDraw.Draw(strip)
    for c, name in enumerate(pred_names):
        sdraw.text((bottom - 18 - pad, c * cell + cell // 2), name, fill="black", font=fnt, anchor="rm")
    img.paste(strip.rotate(90, expand=True), (left, top + rows * cell))
    draw.text((left + cols * cell // 2, img.height - 4), "prediction", fill="black", font=fnt, anchor="md")
    draw.text((pad, top - 4), "rows: ground truth (% of the row's pixels)", fill=(90, 90, 90), font=fnt, anchor="lb")
    img.save(path)
    return path


def iou_bars_png(per_class: dict[str, dict[str, float | None]], path: Path,
                 series: tuple[tuple[str, str], ...] = (("cluster_strict", "cluster, strict"),
                                                        ("cluster_official", "cluster, official")),
                 title: str = "IoU per class (%)") -> Path:
    """Horizontal bars: one row per class, one bar per (key of ``per_class``, label) in ``series``.

    Missing values (a class absent from the labels) are written as "n/a"; the legend carries
    each series' mean over the classes that have a value (its mIoU).
    """
    series = tuple((key, label) for key, label in series if key in per_class)
    classes = list(per_class[series[0][0]])
    colours = [(52, 101, 164), (237, 148, 42), (95, 160, 80), (150, 80, 160)]
    fnt, small, big = font(13), font(11), font(15)
    pad, bar, gap, scale = 8, 9, 6, 4  # scale: pixels per IoU percent
    left = pad + max(_text_width(c, fnt) for c in classes) + pad
    row_h = len(series) * bar + gap
    top = pad + 22 + 20 * len(series) + 6
    width = left + 100 * scale + 60
    img = Image.new("RGB", (width, top + len(classes) * row_h + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill="black", font=big)
    for i, (key, label) in enumerate(series):
        values = [v for v in per_class[key].values() if v is not None]
        mean = f"mIoU {np.mean(values):.1f}" if values else "no labelled class"
        y = pad + 24 + 20 * i
        draw.rectangle([pad, y + 3, pad + 12, y + 13], fill=colours[i % len(colours)])
        draw.text((pad + 18, y + 8), f"{label} ({mean})", fill="black", font=fnt, anchor="lm")
    for t in range(0, 101, 20):
        x = left + t * scale
        draw.line([x, top - 4, x, top + len(classes) * row_h], fill=(225, 225, 225))
        draw.text((x, top + len(classes) * row_h + 4), str(t), fill=(90, 90, 90), font=small, anchor="mt")
    for r, name in enumerate(classes):
        y = top + r * row_h
        draw.text((left - pad, y + row_h // 2 - gap // 2), name, fill="black", font=fnt, anchor="rm")
        for i, (key, _) in enumerate(series):
            v = per_class[key].get(name)
            yb = y + i * bar
            if v is None:
                draw.text((left + 2, yb + bar // 2), "n/a", fill=(120, 120, 120), font=small, anchor="lm")
                continue
            draw.rectangle([left, yb, left + max(1, round(v * scale)), yb + bar - 2], fill=colours[i % len(colours)])
            draw.text((left + round(v * scale) + 3, yb + bar // 2 - 1), f"{v:.0f}", fill=(60, 60, 60), font=small,
                      anchor="lm")
    img.save(path)
    return path


SAMPLE_TITLES = {"label": "ground truth", "cluster_class": "cluster prediction", "linear": "linear prediction",
                 "eicue": "EiCue segments"}


def _tile_size(samples: list[dict], min_tile: int) -> tuple[int, int]:
    """(height, width) of a grid tile: the sample size, enlarged (nearest) to at least `min_tile`."""
    h, w = samples[0]["image"].shape[-2:]
    factor = max(1, -(-min_tile // min(h, w)))
    return h * factor, w * factor


def _grid_with_legend(rows: list[list[np.ndarray]], titles: list[str], names: list[str], caption: str,
                      path: Path) -> Path:
    """Tiles in rows under column titles, then a legend: a swatch of palette colour k and names[k],
    in as many columns as fit the grid's width."""
    th, tw = rows[0][0].shape[:2]
    gap, header = 4, 24
    fnt, big = font(13), font(14)
    grid_w = len(titles) * (tw + gap) - gap
    entry_w = 22 + max(_text_width(c, fnt) for c in names) + 16
    per_row = max(1, grid_w // entry_w)
    legend_h = 30 + 20 * -(-len(names) // per_row)
    img = Image.new("RGB", (grid_w, header + len(rows) * (th + gap) + legend_h), "white")
    draw = ImageDraw.Draw(img)
    for i, title in enumerate(titles):
        draw.text((i * (tw + gap) + tw // 2, header // 2), title, fill="black", font=big, anchor="mm")
    for r, tiles in enumerate(rows):
        for i, tile in enumerate(tiles):
            img.paste(Image.fromarray(tile), (i * (tw + gap), header + r * (th + gap)))
    pal = palette(len(names))
    y0 = header + len(rows) * (th + gap) + 8
    draw.text((2, y0), caption, fill=(60, 60, 60), font=fnt)
    for k, name in enumerate(names):
        x, y = (k % per_row) * entry_w + 2, y0 + 22 + (k // per_row) * 20
        draw.rectangle([x, y, x + 14, y + 14], fill=tuple(int(v) for v in pal[k]), outline=(80, 80, 80))
        draw.text((x + 20, y + 7), name, fill="black", font=fnt, anchor="lm")
    img.save(path)
    return path


def sample_grid_png(samples: list[dict], path: Path, class_names: list[str],
                    columns: tuple[str, ...] | None = None, min_tile: int = 160) -> Path:
    """One row per sample: the image, then the maps in ``columns``, with titles and a class legend.

    Keys: ``label`` (ground truth), ``cluster_class`` (cluster ids mapped to classes, see
    :func:`clusters_to_classes`), ``linear`` and ``eicue``; ``columns`` defaults to those the
    first sample has, in that order.  Class maps share the legend's colours; EiCue ids are
    segments, not classes, so they are drawn over the image in their own colours.  Tiles smaller
    than ``min_tile`` pixels are enlarged (nearest) so the titles fit.
    """
    cols = list(columns) if columns else [k for k in SAMPLE_TITLES if k in samples[0]]
    n = len(class_names)
    th, tw = _tile_size(samples, min_tile)
    up = functools.partial(_resize_nearest, size=(tw, th))
    rows = []
    for s in samples:
        image = up(denormalize(s["image"]))
        tiles = [image]
        for key in cols:
            lab = s[key].numpy()
            if key == "eicue":
                # Blended with the image, segment colours do not read as the legend's classes.
                tiles.append(_eicue_tile(image, lab, int(lab.max()) + 1))
            else:
                tiles.append(up(colorize(lab, n)))
        rows.append(tiles)
    titles = ["image"] + [SAMPLE_TITLES.get(k, k) for k in cols]
    caption = ("classes (ground truth, cluster and linear predictions; black: unlabelled, or a cluster "
               "without a class)")
    return _grid_with_legend(rows, titles, list(class_names), caption, path)


def _resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`arr` (an image or an id map) at `size` = (width, height), nearest neighbour."""
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.NEAREST))


def _eicue_tile(image_HW3: np.ndarray, ids_hw: np.ndarray, n_ids: int) -> np.ndarray:
    """EiCue ids drawn over the image at its size, in their own segment colours."""
    ids = _resize_nearest(ids_hw.astype(np.int32), (image_HW3.shape[1], image_HW3.shape[0]))
    return overlay(image_HW3, ids, n_ids, 0.6)


def _with_header(img: Image.Image, titles: list[str], tile_w: int, height: int = 20) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + height), "white")
    draw = ImageDraw.Draw(out)
    fnt = font(13)
    for i, title in enumerate(titles):
        draw.text((i * tile_w + tile_w // 2, height // 2), title, fill="black", font=fnt, anchor="mm")
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
        image_HW3 = np.asarray(Image.fromarray(image_HW3).resize((w, h), Image.Resampling.NEAREST))

    def up(arr: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.NEAREST))

    tiles = [image_HW3]
    titles = ["image"]
    for k, vec in enumerate(eigvecs_KHW, start=1):
        tiles.append(np.asarray(Image.fromarray(heatmap(vec)).resize((w, h), Image.Resampling.BILINEAR)))
        titles.append(f"eigenvector {k}")
    tiles += [up(colorize(eicue_HW, n_colors)), up(colorize(kmeans_HW, n_colors))]
    titles += ["EiCue", kmeans_title]
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    _with_header(Image.fromarray(row), titles, w + 4).save(path)
    return path


def legend_png(names: list[str], n_colors: int, path: Path, shares: list[float] | None = None,
               title: str | None = None, swatch: int = 16) -> Path:
    """One row per id: its colour (as `colorize` / `overlay` draw id i with `n_colors`), its name
    and, when given, its share of the pixels in percent."""
    pal = palette(n_colors)
    header = 18 if title else 0
    fnt = font(13)
    width = 8 + swatch + 8 + max((_text_width(n, fnt) for n in names), default=60) + (70 if shares is not None else 0)
    img = Image.new("RGB", (max(width, _text_width(title or "", fnt) + 8), header + 4 + len(names) * (swatch + 4)),
                    "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((4, 3), title, fill="black", font=fnt)
    for i, name in enumerate(names):
        y = header + 4 + i * (swatch + 4)
        draw.rectangle([4, y, 4 + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in pal[i]), outline="black")
        text = name if shares is None else f"{name}  {100 * shares[i]:5.1f} %"
        draw.text((4 + swatch + 8, y + swatch // 2), text, fill="black", font=fnt, anchor="lm")
    img.save(path)
    return path


def segment_grid_png(samples: list[dict], path: Path, n_segments: int, min_tile: int = 160) -> Path:
    """The sample grid of a run without labels: one row per sample with the image, its segments
    (``cluster``: cluster-probe ids, palette colours, as ``predict`` draws them) and the EiCue maps
    of both training views (``eicue``, ``eicue_aug``: ids of the second matched to the first, so a
    region that survives the augmentation keeps its colour), blended with the image.  A legend of
    the segment colours ends the figure.
    """
    th, tw = _tile_size(samples, min_tile)
    up = functools.partial(_resize_nearest, size=(tw, th))
    rows = []
    for s in samples:
        image = up(denormalize(s["image"]))
        tiles = [image, up(colorize(s["cluster"].numpy(), n_segments))]
        n_eicue = int(max(s["eicue"].max(), s["eicue_aug"].max())) + 1
        tiles += [_eicue_tile(image, s[key].numpy(), n_eicue) for key in ("eicue", "eicue_aug")]
        rows.append(tiles)
    titles = ["image", "segments", "EiCue", "EiCue (augmented view)"]
    names = [f"segment {k}" for k in range(n_segments)]
    caption = "segments (no labels: ids of the cluster probe, the colours predict uses)"
    return _grid_with_legend(rows, titles, names, caption, path)
