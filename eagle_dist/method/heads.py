"""Trainable heads on top of the frozen keys (ALGORITHM.md 3.2-3.3).

SegHead:        S = cluster1(Drop(K)) + cluster2(Drop(K)), two independent Dropout2d masks.
                In training it runs as one autograd function (`_SegHeadFunction`) that keeps
                the keys and the two masks for the backward instead of two dropped copies.
ProjectionHead: Z = L2-normalise(Linear(S)) per pixel, flattened to [(B*N), D] in (b, row, col)
                order, as the object-centric loss expects.

Parameter names follow the official checkpoint (``cluster1.0.*``, ``cluster2.0.*``,
``cluster2.2.*``) so that official head weights load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV_BACKWARD_ARGS = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1], transposed=False,
                           output_padding=[0, 0], groups=1)


def _conv1x1_backward(grad, inputs, weight, input_grad: bool):
    """(input grad or None, weight grad, bias grad) of a 1x1 ``conv2d``: the call autograd
    makes for it, so the gradients are the ones ``nn.Conv2d`` gets, bit for bit."""
    return torch.ops.aten.convolution_backward(grad, inputs, weight, [weight.shape[0]],
                                               output_mask=[input_grad, True, True], **_CONV_BACKWARD_ARGS)


class _SegHeadFunction(torch.autograd.Function):
    """``conv1(K * m1) + conv2b(relu(conv2a(K * m2)))`` with the ops of the module path.

    Autograd would keep both dropped copies ``K * m1`` and ``K * m2`` (each as large as the
    keys) for the weight gradients, per call; the training step makes three calls, two on the
    same keys.  Here the backward recomputes them from the keys, which the step holds anyway,
    and the ``[B, C, 1, 1]`` masks: about a third less activation memory in the heads.  The
    forward and the backward run the same kernels as ``nn.Conv2d`` / ``nn.ReLU`` under autograd,
    so values and gradients are identical (tests/unit/test_core_components.py checks both).
    """

    @staticmethod
    def forward(ctx, keys, mask1, mask2, w1, b1, w2a, b2a, w2b, b2b):
        y1 = F.conv2d(keys * mask1, w1, b1)
        hidden = F.relu(F.conv2d(keys * mask2, w2a, b2a))
        ctx.save_for_backward(keys, mask1, mask2, hidden, w1, w2a, w2b)
        return y1 + F.conv2d(hidden, w2b, b2b)

    @staticmethod
    def backward(ctx, grad):
        keys, mask1, mask2, hidden, w1, w2a, w2b = ctx.saved_tensors
        grad_hidden, gw2b, gb2b = _conv1x1_backward(grad, hidden, w2b, input_grad=True)
        grad_pre = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0)
        _, gw2a, gb2a = _conv1x1_backward(grad_pre, keys * mask2, w2a, input_grad=False)
        _, gw1, gb1 = _conv1x1_backward(grad, keys * mask1, w1, input_grad=False)
        return None, None, None, gw1, gb1, gw2a, gb2a, gw2b, gb2b


class SegHead(nn.Module):
    def __init__(self, in_channels: int, dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.cluster1 = nn.Sequential(nn.Conv2d(in_channels, dim, 1))
        self.cluster2 = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(), nn.Conv2d(in_channels, dim, 1)
        )
        # One module, called once per mask: every call draws a fresh whole-channel mask.
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, feats_BCHW: torch.Tensor) -> torch.Tensor:
        # The function is the fp32 training path; under autocast the modules run (autograd then
        # keeps the low-precision copies autocast made, which a recomputing backward would not see).
        if not (self.training and torch.is_grad_enabled() and not feats_BCHW.requires_grad
                and isinstance(self.drop, nn.Dropout2d) and 0.0 < self.drop.p < 1.0 and feats_BCHW.ndim == 4
                and not torch.is_autocast_enabled(feats_BCHW.device.type)):
            return self.cluster1(self.drop(feats_BCHW)) + self.cluster2(self.drop(feats_BCHW))
        # The masks Dropout2d would draw, in its order (first cluster1's, then cluster2's).
        mask1, mask2 = self.dropout_mask(feats_BCHW), self.dropout_mask(feats_BCHW)
        conv1, conv2a, conv2b = self.cluster1[0], self.cluster2[0], self.cluster2[2]
        return _SegHeadFunction.apply(feats_BCHW, mask1, mask2, conv1.weight, conv1.bias,
                                      conv2a.weight, conv2a.bias, conv2b.weight, conv2b.bias)

    def dropout_mask(self, feats_BCHW: torch.Tensor) -> torch.Tensor:
        """The ``[B, C, 1, 1]`` factor (0 or 1 / (1 - p)) that ``self.drop`` multiplies the
        features by, drawn with the same random calls (Dropout2d's ``bernoulli_`` then ``div_``)."""
        keep = 1.0 - float(self.drop.p)  # type: ignore[arg-type]  # a Dropout2d here (forward checks)
        b, c = feats_BCHW.shape[:2]
        return feats_BCHW.new_empty((b, c, 1, 1)).bernoulli_(keep).div_(keep)

    def dropped(self, feats_BCHW: torch.Tensor) -> torch.Tensor:
        """K-hat: the features the losses see, under a third independent mask (no gradient)."""
        with torch.no_grad():
            return self.drop(feats_BCHW)


class ProjectionHead(nn.Module):
    def __init__(self, dim: int = 512):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, code_BDHW: torch.Tensor) -> torch.Tensor:
        pixels = code_BDHW.permute(0, 2, 3, 1).reshape(-1, code_BDHW.shape[1])
        return F.normalize(self.linear(pixels), dim=1)
