"""The evaluation figures: sizes that fit their labels, row-normalised confusion, titled sample grid."""

import numpy as np
import torch
from PIL import Image

from eagle_dist.evaluation import figures


def _names(n):
    return [f"class number {i}" if i % 2 else f"c{i}" for i in range(n)]


def test_confusion_rows_are_normalised_and_labels_fit(tmp_path):
    n = 27
    counts_PC = np.zeros((n + 2, n))
    counts_PC[np.arange(n), np.arange(n)] = 90
    counts_PC[n, :] = 10  # an extra cluster takes 10 % of every class
    path = figures.confusion_png(counts_PC, _names(n), tmp_path / "c.png",
                                 pred_names=_names(n) + ["x (unmatched)", "y (unmatched)"], cell=28)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    widest = max(figures._text_width(t, figures.font(13)) for t in _names(n))
    assert rgb.shape[1] > (n + 2) * 28 + widest and rgb.shape[0] > n * 28 + widest
    # Every diagonal cell is 90 % of its row: all equally dark; an empty cell is white.
    dark = (rgb.sum(axis=2) < 500).sum()
    assert dark >= n * 28 * 28 * 0.5


def test_sample_grid_has_titles_and_a_legend(tmp_path):
    n = 6
    label = torch.arange(16 * 16).reshape(16, 16) % n
    samples = [{"image": torch.zeros(3, 16, 16), "label": label, "cluster_class": label, "linear": label,
                "eicue": label % 3} for _ in range(2)]
    path = figures.sample_grid_png(samples, tmp_path / "s.png", _names(n), min_tile=64)
    with Image.open(path) as im:
        assert im.width == 5 * 64 + 4 * 4
        assert im.height > 24 + 2 * 68 + 20  # title strip, two rows of tiles, the legend
        rgb = np.asarray(im.convert("RGB"))
    legend = rgb[24 + 2 * 68:]
    colours = {tuple(c) for c in figures.palette(n)[:n]}
    assert all((legend == np.array(c)).all(axis=2).any() for c in colours), "a class colour is not in the legend"


def test_clusters_map_to_classes_and_unmatched_to_minus_one():
    strict = [2, -1, 0, 1]
    out = figures.clusters_to_classes(torch.tensor([[0, 1, 2, 3, 7]]), strict)
    assert out.tolist() == [[2, -1, 0, 1, -1]]
    order, names = figures.cluster_order(strict, ["a", "b", "c"])
    assert order == [2, 3, 0, 1] and names[0] == "a (c2)" and names[-1] == "c1 (unmatched)"


def test_iou_bars_are_proportional_to_the_iou(tmp_path):
    per_class = {"cluster_strict": {"a": 50.0, "b": None}, "cluster_official": {"a": 100.0, "b": 0.0}}
    path = figures.iou_bars_png(per_class, tmp_path / "iou.png")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))

    def widest_run(colour):
        hit = (rgb == np.array(colour)).all(axis=2)
        return int(hit.sum(axis=1).max())

    strict, official = widest_run((52, 101, 164)), widest_run((237, 148, 42))
    assert abs(official - 2 * strict) <= 2 and official >= 300
