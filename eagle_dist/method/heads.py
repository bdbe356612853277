"""Trainable heads on top of the frozen keys (ALGORITHM.md 3.2-3.3).

SegHead:        S = cluster1(Drop(K)) + cluster2(Drop(K)), two independent Dropout2d masks.
                In training it runs as one autograd function (`_SegHeadFunction`) that keeps
                the keys and the two masks for the backward instead of two dropped copies;
                the training step's three views (``seg_head(kk_img, kk_aug, aug_same)``) run
                on CPU as one function that shares the input layers' products across the
                views reading the same keys (`_SegHeadViewsFunction`, `_SharedInput`).
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


def kept_channels(keep_RC: torch.Tensor, mask_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The channels flagged in ``keep_RC`` (bool ``[R, C]``), per row: ``(index [R, L], scale
    [R, L])``, the indices padded to the longest row and the values of ``mask_RC`` there (0 on
    the padding, which points at unflagged channels); None when no row flags any."""
    counts_R = keep_RC.sum(1)
    length = int(counts_R.max()) if counts_R.numel() else 0
    if length == 0:
        return None
    # A stable descending sort of 0/1 flags: the flagged channels first, in channel order.
    index = torch.sort(keep_RC.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :length]
    valid = torch.arange(length, device=keep_RC.device) < counts_R[:, None]
    return index, mask_RC.gather(1, index) * valid


def kept_keys(keys_RNC: torch.Tensor, kept: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[R, N, L]``: each row's channels of `kept_channels` (``(index, scale)``) taken from the
    keys ``[R, N, C]`` and times their mask values (0 on the padding)."""
    index, scale = kept
    r, n, _ = keys_RNC.shape
    return torch.gather(keys_RNC, 2, index[:, None, :].expand(r, n, index.shape[1])).mul_(scale[:, None, :])


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


class _SharedInput:
    """How one input layer (cluster1, or cluster2's first conv) of the three training views
    regroups over channels, for `_SegHeadViewsFunction`.

    Each view multiplies the keys by its own whole-channel mask (0 or s = 1 / (1 - p)).  x and P
    read img's keys; A reads img's keys too where its image was not blurred (``same``).  A
    channel kept by every view of an image contributes the same product to each of them, so it
    is multiplied once (the common product); each view then adds its own extra channels (kept
    by it, not by all), about 9 % of the channels where two views share keys and 17 % where
    three do, at p = 0.1.  A's blurred images are a product of their own.  Every term is a kept
    key times a weight, added: nothing is subtracted, so the rounding is that of the same sum in
    another order.

    Tensors are token-major (``[images, tokens, channels]``), the keys' own layout.
    mask_img: [B, C] the common product's mask per img row; mask_aug: [R, C] A's blurred rows'.
    kept_img: (index [B, L], scale [B, L]) the channels mask_img keeps per row and their mask
              values (0 on the padding); kept_aug: the same for mask_aug.
    extras:   per view (x, P, A), groups of img rows with extra channels: (rows [R], index
              [R, L], scale [R, L]): the channel indices padded to the group's longest row and
              the mask values there (0 on the padding).  Rows where two views share keys and
              rows where three do are separate groups (about 100 against 200 channels).
    """

    def __init__(self, mask_x: torch.Tensor, mask_p: torch.Tensor, mask_a: torch.Tensor,
                 same: torch.Tensor, changed: torch.Tensor, same_rows: torch.Tensor):
        keep_x, keep_p, keep_a = mask_x > 0, mask_p > 0, mask_a > 0
        common = keep_x & keep_p & (keep_a | ~same[:, None])
        # The common products multiply only the channels they keep (72-90 % of them), each
        # image its own, padded to the longest: (index [R, L], scale [R, L]) as for the extras.
        self.mask_img, self.mask_aug = mask_x * common, mask_a.index_select(0, changed)
        self.kept_img = kept_channels(common, mask_x)
        self.kept_aug = kept_channels(keep_a.index_select(0, changed), self.mask_aug)
        self.changed, self.same_rows = changed, same_rows
        self.extras = [[g for g in (self._extra(keep & ~common, mask, rows) for rows in (same_rows, changed))
                        if g is not None] for keep, mask in ((keep_x, mask_x), (keep_p, mask_p))]
        self.extras.append([g for g in [self._extra(keep_a & ~common, mask_a, same_rows)] if g is not None])

    @staticmethod
    def _extra(extra_BC: torch.Tensor, mask_BC: torch.Tensor, rows: torch.Tensor):
        kept = kept_channels(extra_BC.index_select(0, rows), mask_BC.index_select(0, rows))
        return None if kept is None else (rows, *kept)

    @staticmethod
    def _common_product(keys_RNC: torch.Tensor, kept, weight_CO: torch.Tensor,
                        bias_O: torch.Tensor) -> torch.Tensor:
        """``bias + (keys * mask) @ weight`` over the kept channels only: ``[R, N, O]``."""
        r, n, _ = keys_RNC.shape
        out = keys_RNC.new_empty((r, n, weight_CO.shape[1]))
        if kept is None:  # every channel dropped
            return out.copy_(bias_O.expand(r, n, -1))
        # Image by image: each has its own rows of the weight (a [R, L, O] gather would be as
        # large as the keys again).
        for i, keys_NL in enumerate(kept_keys(keys_RNC, kept)):
            torch.addmm(bias_O, keys_NL, weight_CO.index_select(0, kept[0][i]), out=out[i])
        return out

    @staticmethod
    def _common_grad(grad_CO: torch.Tensor, keys_RNC: torch.Tensor, mask_RC: torch.Tensor, g_RNO: torch.Tensor) -> None:
        """Adds ``(keys * mask)^T g`` to ``grad_CO``: one product over all rows' tokens, dropped
        channels included (a product per image over its kept channels measured slower: its
        inner products run over 784 tokens).  The masked copy is made again here rather than
        kept from the forward: it is as large as the keys."""
        masked = keys_RNC.new_empty(keys_RNC.shape)
        torch.mul(keys_RNC, mask_RC[:, None], out=masked)
        grad_CO.addmm_(masked.view(-1, keys_RNC.shape[2]).t(), g_RNO.reshape(-1, g_RNO.shape[2]))

    @staticmethod
    def _gathered(keys_BNC: torch.Tensor, extra) -> torch.Tensor:
        """[R, N, L]: each row's extra channels of the keys, times their mask (0 on the padding)."""
        rows, index, scale = extra
        _, n, c = keys_BNC.shape
        at_RNL = (rows[:, None, None] * (n * c) + torch.arange(0, n * c, c, device=rows.device)[None, :, None]
                  + index[:, None, :])
        return keys_BNC.reshape(-1).take(at_RNL).mul_(scale[:, None, :])

    def forward(self, weight_OC: torch.Tensor, bias_O: torch.Tensor, keys_BNC: torch.Tensor,
                changed_RNC: torch.Tensor) -> list[torch.Tensor]:
        """The layer's output for x, P and A, each [B, N, O]; x's is the common product itself."""
        b, n, _ = keys_BNC.shape
        o = weight_OC.shape[0]
        weight_CO = weight_OC.t().contiguous()  # the extra channels' weights are rows of it
        common = self._common_product(keys_BNC, self.kept_img, weight_CO, bias_O)
        out_a = common.new_empty((b, n, o))
        out_a.index_copy_(0, self.same_rows, common.index_select(0, self.same_rows))
        if self.changed.numel():
            out_a.index_copy_(0, self.changed, self._common_product(changed_RNC, self.kept_aug, weight_CO, bias_O))
        outs = [common, common.clone(), out_a]  # x last in place: P and A copy first
        for out, groups in zip(outs[::-1], self.extras[::-1]):
            for extra in groups:
                out.index_add_(0, extra[0], torch.bmm(self._gathered(keys_BNC, extra), weight_CO[extra[1]]))
        return outs

    def _extra_grads(self, grad_CO: torch.Tensor, g_BNO: torch.Tensor, groups, keys_BNC: torch.Tensor) -> None:
        for extra in groups:
            rows, index, _ = extra
            part_RLO = torch.bmm(self._gathered(keys_BNC, extra).transpose(1, 2), g_BNO.index_select(0, rows))
            grad_CO.index_add_(0, index.reshape(-1), part_RLO.reshape(-1, g_BNO.shape[2]))

    def weight_grad(self, grads_BNO, keys_BNC: torch.Tensor, changed_RNC: torch.Tensor,
                    owned: bool = False) -> torch.Tensor:
        """d loss / d weight [O, C] from the views' output gradients ``[B, N, O]``, given one at a
        time (x, P, A; an iterable), so that only one is alive besides their sum.  owned: the
        gradients are this call's to overwrite (x's becomes the sum)."""
        views = iter(grads_BNO)
        g = next(views)  # x
        # Channels first, so that each extra channel's gradient row is contiguous to add to.
        grad_CO = g.new_zeros((keys_BNC.shape[2], g.shape[2]))
        self._extra_grads(grad_CO, g, self.extras[0], keys_BNC)
        g_img = g if owned else g.clone()
        g = next(views)  # P
        self._extra_grads(grad_CO, g, self.extras[1], keys_BNC)
        g_img.add_(g)
        g = next(views)  # A
        self._extra_grads(grad_CO, g, self.extras[2], keys_BNC)
        g_img.index_add_(0, self.same_rows, g.index_select(0, self.same_rows))
        if self.changed.numel():
            self._common_grad(grad_CO, changed_RNC, self.mask_aug, g.index_select(0, self.changed))
        del g
        self._common_grad(grad_CO, keys_BNC, self.mask_img, g_img)
        return grad_CO.t()


class _SegHeadViewsFunction(torch.autograd.Function):
    """The step's three views x, P, A of the seg head in one function (CPU, fp32 training).

    Against three `_SegHeadFunction` calls: (1) the input layers share their products across
    views (`_SharedInput`): x and P read the same keys, and so does A where its image was not
    blurred, so about a quarter of the seg head's multiply-adds go; (2) the products run as
    matrix products over tokens x channels (the keys' layout), which MKL runs faster than the 1x1
    convolutions' forward and backward on this CPU.  The masks are the same draws and the sums
    the same terms in another order: codes and gradients agree with the module path to float
    rounding (tests/unit/test_core_components.py, against float64 too).  The codes come back in
    the layout the convolutions gave for these keys (channels-last).
    """

    @staticmethod
    def forward(ctx, keys, aug_keys, same, masks, w1, b1, w2a, b2a, w2b, b2b):
        b, c, h, w = keys.shape
        # The backbone's keys are channels-last: this is a view of them.
        keys_BNC = keys.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
        changed, same_rows = (~same).nonzero().squeeze(1), same.nonzero().squeeze(1)
        changed_RNC = aug_keys.index_select(0, changed).permute(0, 2, 3, 1).reshape(-1, h * w, c)
        m1x, m2x, m1p, m2p, m1a, m2a = (m.view(b, c) for m in masks)
        layer1 = _SharedInput(m1x, m1p, m1a, same, changed, same_rows)
        layer2 = _SharedInput(m2x, m2p, m2a, same, changed, same_rows)
        # cluster1's and cluster2's output biases both add to every code: one add.
        y1 = layer1.forward(w1.flatten(1), b1 + b2b, keys_BNC, changed_RNC)
        hidden = [pre.relu_() for pre in layer2.forward(w2a.flatten(1), b2a, keys_BNC, changed_RNC)]
        w2b_t = w2b.flatten(1).t()
        # Each view's cluster1 output is its own buffer: the code accumulates into it.
        codes = [y.view(b * h * w, -1).addmm_(hid.view(b * h * w, -1), w2b_t).view(b, h, w, -1).permute(0, 3, 1, 2)
                 for y, hid in zip(y1, hidden)]
        ctx.layers = (layer1, layer2)
        ctx.save_for_backward(keys_BNC, changed_RNC, *hidden, w1, w2a, w2b)
        return tuple(codes)

    @staticmethod
    def backward(ctx, *grads):
        keys_BNC, changed_RNC, *hidden, w1, w2a, w2b = ctx.saved_tensors
        layer1, layer2 = ctx.layers
        b, n, _ = keys_BNC.shape
        g_BNO = [g.permute(0, 2, 3, 1).reshape(b, n, -1).contiguous() for g in grads]
        flat = [g.view(b * n, -1) for g in g_BNO]
        flat_hidden = [hid.view(b * n, -1) for hid in hidden]
        gw2b = flat[0].t() @ flat_hidden[0]
        gb = flat[0].sum(0)
        for g, hid in zip(flat[1:], flat_hidden[1:]):
            gw2b.addmm_(g.t(), hid)
            gb += g.sum(0)
        w2b_OC = w2b.flatten(1)
        gb2a = w2a.new_zeros(w2a.shape[0])

        def pre_grads():  # one view's at a time
            for g, hid in zip(flat, flat_hidden):
                # ReLU's backward (autograd's threshold_backward), written over its input.
                pre = g @ w2b_OC
                torch.ops.aten.threshold_backward.grad_input(pre, hid, 0, grad_input=pre)
                gb2a.add_(pre.sum(0))
                yield pre.view(b, n, -1)

        gw2a = layer2.weight_grad(pre_grads(), keys_BNC, changed_RNC, owned=True)
        gw1 = layer1.weight_grad(g_BNO, keys_BNC, changed_RNC)
        return (None, None, None, None, gw1.reshape(w1.shape), gb, gw2a.reshape(w2a.shape), gb2a,
                gw2b.view_as(w2b), gb.clone())


class SegHead(nn.Module):
    def __init__(self, in_channels: int, dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.cluster1 = nn.Sequential(nn.Conv2d(in_channels, dim, 1))
        self.cluster2 = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(), nn.Conv2d(in_channels, dim, 1)
        )
        # One module, called once per mask: every call draws a fresh whole-channel mask.
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def _trains_with_masks(self, feats_BCHW: torch.Tensor) -> bool:
        # The functions are the fp32 training path; under autocast the modules run (autograd then
        # keeps the low-precision copies autocast made, which a recomputing backward would not see).
        return (self.training and torch.is_grad_enabled() and not feats_BCHW.requires_grad
                and isinstance(self.drop, nn.Dropout2d) and 0.0 < self.drop.p < 1.0 and feats_BCHW.ndim == 4
                and not torch.is_autocast_enabled(feats_BCHW.device.type))

    def forward(self, feats_BCHW: torch.Tensor, aug_feats_BCHW: torch.Tensor | None = None,
                aug_same_B: torch.Tensor | None = None):
        """The code of `feats_BCHW`; given the augmented view's keys too, the training step's
        three codes ``(x, P, A)``: x and P on `feats_BCHW` and A on `aug_feats_BCHW`, each under
        its own masks.  `aug_same_B` (bool ``[B]``): the rows of `aug_feats_BCHW` that are
        `feats_BCHW`'s keys (images the augmentation left as they were); None: none is."""
        if aug_feats_BCHW is not None:
            return self._three_views(feats_BCHW, aug_feats_BCHW, aug_same_B)
        if not self._trains_with_masks(feats_BCHW):
            return self.cluster1(self.drop(feats_BCHW)) + self.cluster2(self.drop(feats_BCHW))
        # The masks Dropout2d would draw, in its order (first cluster1's, then cluster2's).
        mask1, mask2 = self.dropout_mask(feats_BCHW), self.dropout_mask(feats_BCHW)
        conv1, conv2a, conv2b = self.cluster1[0], self.cluster2[0], self.cluster2[2]
        return _SegHeadFunction.apply(feats_BCHW, mask1, mask2, conv1.weight, conv1.bias,
                                      conv2a.weight, conv2a.bias, conv2b.weight, conv2b.bias)

    def _three_views(self, keys: torch.Tensor, aug_keys: torch.Tensor, same: torch.Tensor | None):
        if same is None:
            same = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
        shared = (self._trains_with_masks(keys) and keys.device.type == "cpu" and keys.dtype == torch.float32
                  and aug_keys.shape == keys.shape and aug_keys.dtype == keys.dtype and not aug_keys.requires_grad
                  and same.shape == keys.shape[:1] and same.dtype == torch.bool)
        if not shared:
            # Modules or the per-view function: the same masks in the same order.
            return self(keys), self(keys), self(aug_keys)
        # The masks the three calls would draw, in their order (x, P, A; cluster1's first).
        masks = [self.dropout_mask(k) for k in (keys, keys, keys, keys, aug_keys, aug_keys)]
        conv1, conv2a, conv2b = self.cluster1[0], self.cluster2[0], self.cluster2[2]
        return _SegHeadViewsFunction.apply(keys, aug_keys, same, masks, conv1.weight, conv1.bias,
                                           conv2a.weight, conv2a.bias, conv2b.weight, conv2b.bias)

    def dropout_mask(self, feats_BCHW: torch.Tensor) -> torch.Tensor:
        """The ``[B, C, 1, 1]`` factor (0 or 1 / (1 - p)) that ``self.drop`` multiplies the
        features by, drawn with the same random calls (Dropout2d's ``bernoulli_`` then ``div_``)."""
        keep = 1.0 - float(self.drop.p)  # type: ignore[arg-type]  # a Dropout2d here (forward checks)
        b, c = feats_BCHW.shape[:2]
        return feats_BCHW.new_empty((b, c, 1, 1)).bernoulli_(keep).div_(keep)

    def dropped_mask(self, feats_BCHW: torch.Tensor) -> torch.Tensor | None:
        """K-hat's mask: the factor ``self.drop`` would multiply the features by (a third
        independent mask the losses read them under), ``[B, C, 1, 1]``, drawn with its random
        calls; None where it multiplies by nothing (eval mode, no dropout).  The losses apply it
        where they read the features instead of to the whole maps."""
        drop = self.drop
        if not (self.training and isinstance(drop, nn.Dropout2d) and drop.p > 0 and feats_BCHW.ndim == 4):
            return None
        if drop.p >= 1:  # Dropout2d zeroes everything without a draw
            return feats_BCHW.new_zeros((*feats_BCHW.shape[:2], 1, 1))
        with torch.no_grad():
            return self.dropout_mask(feats_BCHW)


class ProjectionHead(nn.Module):
    def __init__(self, dim: int = 512):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, code_BDHW: torch.Tensor) -> torch.Tensor:
        pixels = code_BDHW.permute(0, 2, 3, 1).reshape(-1, code_BDHW.shape[1])
        return F.normalize(self.linear(pixels), dim=1)
