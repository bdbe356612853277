"""Segmentation metrics: confusion counts that can be all-reduced, Hungarian matching, mIoU/accuracy.

Two protocols are derived from the same counts (ALGORITHM.md section 9 and quirk 15):

* ``official``: the reference's ``UnsupervisedMetrics``. Only pixels with ``0 <= target < n`` **and**
  ``0 <= pred < n`` count. Pixels predicted as one of the extra clusters (ids ``>= n``) are dropped:
  neither right nor wrong. The Hungarian histogram gets a "missing clusters" row and a zero column.
* ``strict``: every labelled pixel (``0 <= target < n``) counts. After matching, pixels of
  unmatched clusters (including the extra ones) and predictions outside the cluster range are
  errors (false negatives of their class). No artificial row or column.

Usage::

    cm = ConfusionMatrix(n_classes=27, extra_clusters=5)
    cm.update(preds_BHW, target_BHW)          # any number of times, on any device
    cm.all_reduce_()                           # sum over ranks (one int64 tensor)
    report = cm.compute("cluster")             # {"official": {...}, "strict": {...}, ...}

Parity check: ``.venv/bin/python -m pytest tests/parity/test_parity.py -k metrics``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "ConfusionMatrix",
    "hungarian_metrics",
    "linear_metrics",
    "map_clusters",
    "strict_hungarian_metrics",
    "strict_linear_metrics",
]


def _as_numpy_int(stats) -> np.ndarray:
    if isinstance(stats, torch.Tensor):
        stats = stats.detach().cpu().numpy()
    return np.asarray(stats, dtype=np.int64)


def _iou_scores(histogram: np.ndarray) -> dict:
    """IoU per row/column pair, mIoU over the defined IoUs and accuracy, both in percent."""
    hist = histogram.astype(np.float64)
    return _scores(np.diag(hist), predicted=hist.sum(axis=0), labelled=hist.sum(axis=1))


def map_clusters(assignment_rows, assignment_cols, n_classes: int, extra_clusters: int) -> np.ndarray:
    """Cluster id -> class id table ``[n + e]`` exactly as the reference's ``map_clusters`` builds it.

    Quirk: it starts from the matched classes in cluster order and, for each unmatched cluster m in
    increasing order, appends -1 when m equals the current length and otherwise inserts -1 at
    position **m + 1** (not m), which misaligns the table whenever an unmatched cluster is not
    at the end. With the official protocol the extra clusters have no pixels, so they are the
    unmatched ones and only the append branch runs. Index the result with cluster ids.
    """
    rows = np.asarray(assignment_rows)
    table = np.asarray(assignment_cols, dtype=np.int64)
    if extra_clusters == 0:
        return table
    matched = set(rows.tolist())
    for missing in sorted(set(range(n_classes + extra_clusters)) - matched):
        if missing == table.shape[0]:
            table = np.append(table, -1)
        else:
            table = np.insert(table, missing + 1, -1)
    return table


def hungarian_metrics(stats, n_classes: int, extra: int) -> dict:
    """The reference's Hungarian (cluster) metric on official counts ``stats [n + e, n]`` (rows = clusters).

    ``assignments = linear_sum_assignment(stats, maximize=True)`` and ``assignments_t`` on the
    transpose; histogram row k = the cluster matched to class k (from ``assignments_t``). With
    extra clusters, one row summing the clusters missing from ``assignments`` and one zero column
    are appended (``[n+1, n+1]``); its IoU is NaN (skipped) when those clusters are empty, else 0.
    mIoU averages the defined IoUs; mIoU and Accuracy are percentages.

    Not replicated (reporting bugs of the reference, documented for comparison):
    ``compute(training=False)`` multiplies every value by 100, including the assignment list,
    which Python then repeats 100 times; and ``compute()`` results are cached until the next
    update, so a second call with other arguments returns the first result.

    Returns a dict with ``mIoU``, ``Accuracy``, ``iou`` (per histogram row; the last entry is the
    missing-clusters row when ``extra > 0``), ``histogram``, ``assignments`` / ``assignments_t``
    (row and column index arrays) and ``cluster_to_class`` (:func:`map_clusters`).
    """
    stats = _as_numpy_int(stats)
    if stats.shape != (n_classes + extra, n_classes):
        raise ValueError(f"stats must be [n_classes + extra, n_classes] = [{n_classes + extra}, {n_classes}], "
                         f"got {list(stats.shape)}")
    rows, cols = linear_sum_assignment(stats, maximize=True)
    if extra == 0:
        rows_t, cols_t = rows, cols
        histogram = stats[np.argsort(cols), :]
    else:
        rows_t, cols_t = linear_sum_assignment(stats.T, maximize=True)
        missing = sorted(set(range(n_classes + extra)) - set(rows.tolist()))
        matched_rows = stats[cols_t, :]
        missing_row = stats[missing, :].sum(axis=0, keepdims=True)
        histogram = np.concatenate([matched_rows, missing_row], axis=0)
        histogram = np.concatenate([histogram, np.zeros((n_classes + 1, 1), dtype=np.int64)], axis=1)
        histogram = histogram.astype(np.float32)
    out = _iou_scores(histogram)
    out.update(
        histogram=histogram,
        assignments=(rows, cols),
        assignments_t=(rows_t, cols_t),
        cluster_to_class=map_clusters(rows, cols, n_classes, extra),
    )
    return out


def linear_metrics(stats) -> dict:
    """The reference's linear-probe metric: identity assignment, histogram = ``stats [n, n]``.

    ``stats`` may also be official cluster-shaped counts ``[n + e, n]``: the rows of predictions
    ``>= n`` hold no pixels under the official protocol and are dropped.
    """
    stats = _as_numpy_int(stats)
    n_classes = stats.shape[1]
    if stats.ndim != 2 or stats.shape[0] < n_classes:
        raise ValueError(f"stats must be [n (+ e), n] with rows = predictions, got {list(stats.shape)}")
    histogram = stats[:n_classes]
    out = _iou_scores(histogram)
    out["histogram"] = histogram
    return out


def _scores(tp: np.ndarray, predicted: np.ndarray, labelled: np.ndarray) -> dict:
    """The one IoU / mIoU / accuracy computation: per class, true positives, predicted pixels
    and labelled pixels; mIoU averages the defined (non-NaN) IoUs; percentages."""
    tp, predicted, labelled = (np.asarray(a, dtype=np.float64) for a in (tp, predicted, labelled))
    fp = predicted - tp
    fn = labelled - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (tp + fp + fn)
        accuracy = tp.sum() / labelled.sum()
    defined = iou[~np.isnan(iou)]
    return {
        "mIoU": float(100.0 * defined.mean()) if defined.size else float("nan"),
        "Accuracy": float(100.0 * accuracy),
        "iou": iou,
    }


def strict_hungarian_metrics(counts, n_classes: int, overflow=None) -> dict:
    """Strict Hungarian metric: every labelled pixel counts and unmatched clusters are errors.

    ``counts [n + e, n]`` holds *all* labelled pixels by predicted cluster (the official protocol
    would zero the rows ``>= n``); ``overflow [n]`` the labelled pixels whose prediction was outside
    ``[0, n + e)``. Clusters are matched to classes by ``linear_sum_assignment(counts, maximize)``
    over all clusters. Per class k with matched cluster m: ``tp = counts[m, k]``,
    ``fp = pixels predicted m - tp``, ``fn = pixels of class k - tp`` (pixels of unmatched clusters
    and overflow are in fn). IoU is NaN only when class k is absent and m predicts nothing;
    mIoU averages the defined IoUs, Accuracy = sum(tp) / labelled pixels (both in percent).
    """
    counts = _as_numpy_int(counts)
    if counts.ndim != 2 or counts.shape[1] != n_classes or counts.shape[0] < n_classes:
        raise ValueError(f"counts must be [n_classes + extra, n_classes] with n_classes={n_classes}, "
                         f"got {list(counts.shape)}")
    overflow = np.zeros(n_classes, dtype=np.int64) if overflow is None else _as_numpy_int(overflow)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    cluster_of_class = np.empty(n_classes, dtype=np.int64)
    cluster_of_class[cols] = rows
    tp = counts[cluster_of_class, np.arange(n_classes)]
    predicted = counts.sum(axis=1)[cluster_of_class]
    labelled = counts.sum(axis=0) + overflow
    out = _scores(tp, predicted, labelled)
    cluster_to_class = np.full(counts.shape[0], -1, dtype=np.int64)
    cluster_to_class[rows] = cols
    out.update(assignments=(rows, cols), cluster_to_class=cluster_to_class)
    return out


def strict_linear_metrics(counts, n_classes: int, overflow=None) -> dict:
    """Strict linear metric: identity assignment; predictions ``>= n`` (and overflow) are errors."""
    counts = _as_numpy_int(counts)
    if counts.ndim != 2 or counts.shape[1] != n_classes or counts.shape[0] < n_classes:
        raise ValueError(f"counts must be [n_classes (+ extra), n_classes] with n_classes={n_classes}, "
                         f"got {list(counts.shape)}")
    overflow = np.zeros(n_classes, dtype=np.int64) if overflow is None else _as_numpy_int(overflow)
    tp = np.diag(counts[:n_classes])
    predicted = counts[:n_classes].sum(axis=1)
    labelled = counts.sum(axis=0) + overflow
    return _scores(tp, predicted, labelled)


class ConfusionMatrix:
    """Counts of labelled pixels by (prediction, class), enough for both protocols.

    The state is one int64 tensor ``table [n + e + 1, n]`` so that a single ``all_reduce(SUM)``
    merges ranks: rows ``0..n+e-1`` are predictions (clusters or classes), the last row counts
    labelled pixels whose prediction is outside ``[0, n + e)``. Pixels whose target is not in
    ``[0, n)`` (ignore values -1, 255, ...) are not counted.
    """

    def __init__(self, n_classes: int, extra_clusters: int = 0, device=None):
        if n_classes < 1 or extra_clusters < 0:
            raise ValueError(f"need n_classes >= 1 and extra_clusters >= 0, got {n_classes}, {extra_clusters}")
        self.n_classes = n_classes
        self.extra_clusters = extra_clusters
        self.table = torch.zeros(n_classes + extra_clusters + 1, n_classes, dtype=torch.int64, device=device)

    @property
    def n_predictions(self) -> int:
        return self.n_classes + self.extra_clusters

    @property
    def counts(self) -> torch.Tensor:
        """``[n + e, n]``: all labelled pixels with a prediction in range (strict protocol input)."""
        return self.table[:-1]

    @property
    def overflow(self) -> torch.Tensor:
        """``[n]``: labelled pixels with a prediction outside ``[0, n + e)``, per class."""
        return self.table[-1]

    def reset(self) -> None:
        self.table.zero_()

    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and targets {tuple(target.shape)} differ in shape; "
                             "upsample the predictions to the label size first")
        n, m = self.n_classes, self.n_predictions
        target = target.reshape(-1).to(self.table.device).long()
        preds = preds.reshape(-1).to(self.table.device).long()
        labelled = (target >= 0) & (target < n)
        target, preds = target[labelled], preds[labelled]
        row = torch.where((preds >= 0) & (preds < m), preds, torch.full_like(preds, m))
        self.table += torch.bincount(row * n + target, minlength=(m + 1) * n).view(m + 1, n)

    def merge_(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.table.shape != self.table.shape:
            raise ValueError("cannot merge confusion matrices of different sizes")
        self.table += other.table.to(self.table.device)
        return self

    def all_reduce_(self, group=None) -> "ConfusionMatrix":
        """Sum the counts over the ranks of ``group`` (no-op without an initialised process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.table, op=dist.ReduceOp.SUM, group=group)
        return self

    def official_stats(self) -> torch.Tensor:
        """The reference's ``stats [n + e, n]``: predictions ``>= n`` dropped (their rows zero)."""
        stats = self.counts.clone()
        stats[self.n_classes:] = 0
        return stats

    @property
    def labelled_pixels(self) -> int:
        return int(self.table.sum())

    @property
    def dropped_official(self) -> int:
        """Labelled pixels the official protocol ignores (predicted as an extra cluster or out of range)."""
        return int(self.table[self.n_classes:].sum())

    def compute(self, kind: str = "cluster") -> dict:
        """Both protocols: ``{"official": ..., "strict": ..., "labelled_pixels", "dropped_official"}``.

        ``kind="cluster"``: Hungarian matching (:func:`hungarian_metrics`, :func:`strict_hungarian_metrics`);
        ``kind="linear"``: identity (:func:`linear_metrics`, :func:`strict_linear_metrics`).
        """
        if kind not in ("cluster", "linear"):
            raise ValueError(f"kind={kind!r}: use 'cluster' (Hungarian) or 'linear' (identity)")
        counts = self.counts.cpu()
        overflow = self.overflow.cpu()
        if kind == "cluster":
            official = hungarian_metrics(self.official_stats().cpu(), self.n_classes, self.extra_clusters)
            strict = strict_hungarian_metrics(counts, self.n_classes, overflow)
        else:
            official = linear_metrics(self.official_stats().cpu())
            strict = strict_linear_metrics(counts, self.n_classes, overflow)
        return {
            "official": official,
            "strict": strict,
            "labelled_pixels": self.labelled_pixels,
            "dropped_official": self.dropped_official,
        }
