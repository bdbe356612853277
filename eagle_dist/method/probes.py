"""Evaluation probes trained next to EAGLE (ALGORITHM.md sections 4.4 and 7).

* :class:`ClusterLookup`: cosine k-means-like centroids. Used three times: the cluster probe
  (C + extra centroids over 512-d codes, hard assignment) and the two eigen cluster probes
  (32 centroids over the 3-d spectral map, soft assignment with alpha = 1).
* :class:`LinearProbe`: a 1x1 conv trained with ground truth on detached codes.

Parity check: ``.venv/bin/python -m pytest tests/parity/test_parity.py -k cluster_lookup``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ClusterLookup", "LinearProbe"]


class ClusterLookup(nn.Module):
    """Centroids ``clusters [n_clusters, dim]`` (initialised N(0, 1)) scored by cosine similarity.

    ``forward(x [B, dim, H, W], alpha=None, log_probs=False) -> (loss, probs [B, n_clusters, H, W])``:

    * ``inner = <x / |x|, c / |c|>`` (L2 over channels, eps 1e-12);
    * ``probs = softmax(alpha * inner)`` over clusters, or the one-hot argmax when ``alpha`` is None;
    * ``loss = -mean over pixels of sum_n probs * inner`` (a hard or soft k-means objective);
    * with ``log_probs=True`` the second value is ``log_softmax(alpha * inner)``, while the loss
      is still the softmax one (as in the reference). ``alpha`` is then required.
    """

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.dim = dim
        self.n_clusters = n_clusters
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_clusters={self.n_clusters}"

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.clusters.normal_()

    def inner_products(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every pixel with every centroid: ``[B, n_clusters, H, W]``."""
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != self.dim:
            raise ValueError(f"ClusterLookup({self.dim}, ...) expects features [B, {self.dim}, H, W], "
                             f"got {tuple(x_BCHW.shape)}")
        unit_clusters = F.normalize(self.clusters, dim=1)
        unit_x = F.normalize(x_BCHW, dim=1)
        # [n, C] @ [B, C, H*W]: a batched product on the channels-first layout, without the
        # transposed copies an einsum over "bchw,nc" makes.
        b, c, h, w = unit_x.shape
        return torch.matmul(unit_clusters, unit_x.reshape(b, c, h * w)).view(b, self.n_clusters, h, w)

    def forward(self, x_BCHW: torch.Tensor, alpha: float | None = None, log_probs: bool = False):
        if log_probs and alpha is None:
            raise ValueError("log_probs=True needs a temperature alpha "
                             "(the one-hot assignment has no log-probabilities)")
        inner_BnHW = self.inner_products(x_BCHW)
        if alpha is None:
            # sum(one_hot(argmax) * inner) is the winning score itself (the zeros add nothing):
            # the same loss and gradient, read from max() without the one-hot product.
            best_BHW, winner_BHW = inner_BnHW.max(dim=1)
            loss = -best_BHW.mean()
            probs_BnHW = F.one_hot(winner_BHW, self.n_clusters).permute(0, 3, 1, 2).to(inner_BnHW.dtype)
        else:
            probs_BnHW = F.softmax(inner_BnHW * alpha, dim=1)
            loss = -(probs_BnHW * inner_BnHW).sum(dim=1).mean()
        if log_probs:
            assert alpha is not None  # checked above
            return loss, F.log_softmax(inner_BnHW * alpha, dim=1)
        return loss, probs_BnHW


class LinearProbe(nn.Conv2d):
    """1x1 conv from codes to class logits (state-dict keys ``weight``/``bias``, as the reference's bare conv).

    ``loss(feats, label)``: logits are bilinearly upsampled (``align_corners=False``) to the label
    size and scored with cross-entropy over pixels whose label is in ``[0, n_classes)``; other
    values (-1, 255, ...) are ignored.
    """

    def __init__(self, dim: int, n_classes: int):
        super().__init__(dim, n_classes, kernel_size=1)
        self.n_classes = n_classes

    def loss(self, feats_BDHW: torch.Tensor, label_BHW: torch.Tensor) -> torch.Tensor:
        if label_BHW.ndim != 3 or label_BHW.shape[0] != feats_BDHW.shape[0]:
            raise ValueError(f"labels must be [B, H, W] for {feats_BDHW.shape[0]} images, got {tuple(label_BHW.shape)}")
        logits = F.interpolate(self(feats_BDHW), size=label_BHW.shape[-2:], mode="bilinear", align_corners=False)
        logits_PC = logits.permute(0, 2, 3, 1).reshape(-1, self.n_classes)
        label_P = label_BHW.reshape(-1).long()
        keep_P = (label_P >= 0) & (label_P < self.n_classes)
        # Sum over the kept pixels divided by their count is the reference's masked mean, without
        # a host sync; a batch without labelled pixels gives 0 (the reference: NaN) and still
        # touches every parameter, as DDP requires.  The per-pixel [P, C] layout costs a copy of
        # the upsampled logits but makes the cross-entropy's backward contiguous: in the training
        # step it is the faster of the two (docs/performance.md, "The probes' in-step time").
        total = F.cross_entropy(logits_PC, torch.where(keep_P, label_P, -100), ignore_index=-100, reduction="sum")
        return total / keep_P.sum().clamp_min(1)
