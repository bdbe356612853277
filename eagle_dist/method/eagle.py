"""EAGLE's trainable part and its training objective (ALGORITHM.md sections 3-8).

    backbone, heads = build_model(cfg)        # seeded: every rank and every tool draws the same init
    optimizer = build_optimizer(heads, cfg.optim, global_batch=4)
    precision = resolve_precision(cfg.dist.mixed_precision, "cpu")   # or Dist.precision in a run
    u = momentum(cfg.loss, step=0, step_unit=cfg.train.step_unit)
    out = training_step_losses(backbone, heads, batch, u, precision=precision)
    out["loss"].backward(); optimizer.step()

Each component takes its own config section: ``EagleHeads`` the ``model``, ``eicue`` and
``loss`` sections, the optimizer ``optim``, the u schedule ``loss`` (and the step unit);
``build_model`` is the one place that hands them out.

The frozen backbone is not part of ``EagleHeads``: it stays outside DDP / the DeepSpeed engine
and runs once per distinct image.  ``img`` and ``img_pos`` of the official code are the same
pixels (quirk 1), so the backbone runs on ``img`` and ``img_aug`` only, and the x- and P-branch
heads see the same keys under independent dropout masks (the same distribution as the
official third backbone pass).  The blur of ``img_aug`` is applied with p = 0.5, so about half
of its images are ``img``'s pixels: the backbone runs only on the blurred ones and the others
reuse ``img``'s keys (about 1.5 passes per step instead of 2; see ``augmented_indices``).
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from eagle_dist import profiling
from eagle_dist.config import Config, EiCueConfig, LossConfig, ModelConfig, OptimConfig, StepUnit, step_batches
from eagle_dist.distributed import Precision
from eagle_dist.method import eicue, losses
from eagle_dist.method.backbone import FrozenViT
from eagle_dist.method.heads import ProjectionHead, SegHead
from eagle_dist.method.official import OfficialCheckpoint, load_official_checkpoint
from eagle_dist.method.probes import ClusterLookup, LinearProbe

# The scalars EagleHeads.forward returns in logging order; training_step_losses adds the last one,
# backbone_passes (the backbone's work in full-batch passes), logged with the losses.
# The per-view / per-direction terms and the cd means are the other values the official step
# logs (tests/parity/test_step_parity.py compares them); loss_nce_p/_a are 0 before the u switch, where
# the InfoNCE is skipped.
LOSS_NAMES = ("loss", "loss_eigen", "loss_corr", "loss_pos_inter", "loss_neg_inter", "loss_nce", "loss_linear",
              "loss_cluster", "loss_eigen_p", "loss_eigen_a", "loss_nce_p", "loss_nce_a", "cd_pos_inter",
              "cd_neg_inter", "u", "backbone_passes")


def loss_names(model: ModelConfig) -> tuple[str, ...]:
    """LOSS_NAMES of this model: without labels there is no linear probe, hence no loss_linear."""
    return tuple(n for n in LOSS_NAMES if n != "loss_linear") if model.unlabeled else LOSS_NAMES


class EagleHeads(nn.Module):
    """Every trainable module; ``forward`` returns all losses of one training batch."""

    def __init__(self, model: ModelConfig, eicue_cfg: EiCueConfig, loss: LossConfig, in_channels: int):
        super().__init__()
        m = model
        self.model_cfg = model
        self.loss_cfg = loss
        # The graph, the Laplacian and the eigensolver (no parameters: nothing in the state dict).
        self.spectral = eicue.EiCue.from_config(eicue_cfg, k=m.eigen_k)
        self.color_from_aug_view = eicue_cfg.color_from_aug_view  # quirk 8
        self.seg_head = SegHead(in_channels, m.dim, m.dropout)
        self.projection = ProjectionHead(m.dim)
        self.cluster_probe = ClusterLookup(m.dim, m.cluster_count)
        # Unlabeled mode has nothing to train a linear probe on: no module, no optimizer group,
        # no checkpoint entry.
        self.linear_probe = None if m.unlabeled else LinearProbe(m.dim, m.n_classes)
        # One eigen probe per view, each with its own optimizer state (official: probe A, A').
        self.eigen_probe = ClusterLookup(m.eigen_k - 1, m.eigen_clusters)
        self.eigen_probe_aug = ClusterLookup(m.eigen_k - 1, m.eigen_clusters)

    # ------------------------------------------------------------------ pieces

    def eicue(self, code_BDHW: torch.Tensor, color_img: torch.Tensor, probe: ClusterLookup,
              color_term: torch.Tensor | None = None):
        """Spectral map of one view, its EiCue map (argmax cluster ids) and the probe loss.
        ``color_term``: the colour half of the graph of ``color_img`` when already computed."""
        b, d, h, w = code_BDHW.shape
        with torch.no_grad(), losses.no_autocast(code_BDHW):
            code_BND = code_BDHW.detach().float().flatten(2).transpose(1, 2)
            vecs_BNK = self.spectral.vectors(color_img.float(), code_BND, (h, w), color_term)
            spectral_BKHW = vecs_BNK[..., 1:].transpose(1, 2).reshape(b, -1, h, w)
        loss, probs = probe(spectral_BKHW, alpha=1.0)
        return spectral_BKHW, probs.argmax(1), loss

    def _nce_labels(self, eicue_map_BHW: torch.Tensor) -> torch.Tensor:
        labels = eicue_map_BHW.reshape(eicue_map_BHW.shape[0], -1)
        if self.loss_cfg.prototype_scope == "image":
            # Offsetting ids per image gives each image its own prototypes with the same
            # batch-wide medoid machinery.
            offsets = torch.arange(labels.shape[0], device=labels.device)[:, None] * self.model_cfg.eigen_clusters
            labels = labels + offsets
        return labels.reshape(-1)

    def _nce(self, z_anchor, z_other, eicue_map, kappa):
        lc = self.loss_cfg
        return losses.object_centric_nce(
            z_anchor, z_other, self._nce_labels(eicue_map), kappa,
            tau=lc.contrastive_temp, global_weight=lc.global_loss_weight,
            centroid_mode=lc.centroid_mode, variant=lc.nce_variant,
        )

    def _correspondence(self, kk_img, kk_aug, drops, code_x, code_p, code_a):
        """The correspondence loss terms and L_corr (weighted positive + negative).  K-hat of the
        views x, P, A is ``kk_img``, ``kk_img``, ``kk_aug`` times ``drops`` (their masks)."""
        lc = self.loss_cfg
        corr = losses.correspondence_loss(
            kk_img, kk_img, kk_aug, code_x, code_p, code_a, feature_masks=drops,
            feature_samples=lc.feature_samples, neg_samples=lc.neg_samples,
            pointwise=lc.pointwise, zero_clamp=lc.zero_clamp, stabalize=lc.stabalize,
            shift_value=lc.shift_value, shift_bias=lc.shift_bias, detach_shift=lc.detach_shift,
        )
        loss_corr = lc.correspondence_weight * (
            lc.pos_inter_weight * corr["pos_inter_loss"] + lc.neg_inter_weight * corr["neg_inter_loss"]
        )
        return corr, loss_corr

    def _kappas(self, kk_img, kk_aug, drop_p, drop_a, aug_same):
        """kappa of K-hat for P and A (`losses.key_similarity_weights`)."""
        if drop_p is not None and drop_a is not None:
            return losses.key_similarity_weights_pair(kk_img, drop_p, kk_aug, drop_a, aug_same)
        return losses.key_similarity_weights(kk_img, drop_p), losses.key_similarity_weights(kk_aug, drop_a)

    def _nce_both_ways(self, code_p, code_a, kk_img, kk_aug, drops, aug_same, map_p, map_a, u: float):
        """L_nce (P against A and A against P, weighted) and the two unweighted directions."""
        lc = self.loss_cfg
        if u > 0:
            with profiling.section("heads"):
                z_p = self.projection(code_p)
                z_a = self.projection(code_a)
            with profiling.section("nce"):
                with profiling.section("nce.kappa"):
                    kappa_p, kappa_a = self._kappas(kk_img, kk_aug, drops[1], drops[2], aug_same)
                nce_p = self._nce(z_p, z_a, map_p, kappa_p)
                nce_a = self._nce(z_a, z_p, map_a, kappa_a)
                loss_nce = lc.local_pos_weight * nce_p + lc.local_pos_aug_weight * nce_a
            # The two directions before their weights (official: loss/local_pos(_aug)_loss).
            return loss_nce, {"loss_nce_p": nce_p.detach(), "loss_nce_a": nce_a.detach()}
        # Before the switch the official loss multiplies L_nce by 0: its gradients are exact
        # zeros.  Skipping it is the same update; touching the projection keeps every
        # parameter in the graph, as DDP requires, with the same zero gradients.
        loss_nce = cast(torch.Tensor, sum(p.sum() for p in self.projection.parameters())) * 0.0
        return loss_nce, {"loss_nce_p": loss_nce.detach(), "loss_nce_a": loss_nce.detach()}  # 0: not computed

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        kk_img: torch.Tensor,
        kk_aug: torch.Tensor,
        img: torch.Tensor,
        img_aug: torch.Tensor,
        label: torch.Tensor,
        u: float,
        aug_same: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All losses of one batch.  ``aug_same`` (bool ``[B]``, optional): the rows of
        ``kk_aug`` that are ``kk_img``'s keys (unblurred images), which lets the seg head share
        their products across views; the losses agree either way, to float rounding."""
        # profiling.section: named parts for `python -m eagle_dist.bench step`; no-ops otherwise.
        with profiling.section("heads"):
            # x ("img") and P ("img_pos"): the same keys under new dropout masks; A ("img_pos_aug").
            code_x, code_p, code_a = self.seg_head(kk_img, kk_aug, aug_same)
            # K-hat, the keys the losses read, under a third mask per view (x, P, A, drawn in
            # that order): kept as masks, which the losses apply where they read the keys
            # (sampled points, kept channels) instead of to whole maps.
            drops = tuple(self.seg_head.dropped_mask(kk) for kk in (kk_img, kk_img, kk_aug))

        color_aug = img_aug if self.color_from_aug_view else img  # quirk 8
        with profiling.section("eicue"):
            # Officially both views take their colours from img (quirk 8): one colour graph for both.
            with profiling.section("eicue.affinities"):
                color_p = self.spectral.color_term(img, code_p.shape[-2:])
                color_a = color_p if color_aug is img else None
            _, map_p, loss_eig_p = self.eicue(code_p, img, self.eigen_probe, color_p)
            _, map_a, loss_eig_a = self.eicue(code_a, color_aug, self.eigen_probe_aug, color_a)

        with profiling.section("corr"):
            corr, loss_corr = self._correspondence(kk_img, kk_aug, drops, code_x, code_p, code_a)
        loss_nce, nce_terms = self._nce_both_ways(code_p, code_a, kk_img, kk_aug, drops, aug_same, map_p, map_a, u)

        with profiling.section("probes"):
            feats_x = code_x.detach()
            loss_linear = self.linear_probe.loss(feats_x, label) if self.linear_probe is not None else None
            loss_cluster, _ = self.cluster_probe(feats_x, alpha=None)

        loss_eig = 0.5 * (loss_eig_p + loss_eig_a)
        total = loss_eig + (1.0 - u) * loss_corr + u * loss_nce
        if loss_linear is not None:  # summed in the official order: identical totals with labels
            total = total + loss_linear
        total = total + loss_cluster
        out = {
            "loss": total,
            "loss_eigen": loss_eig.detach(),
            "loss_corr": loss_corr.detach(),
            "loss_pos_inter": corr["pos_inter_loss"].detach(),
            "loss_neg_inter": corr["neg_inter_loss"].detach(),
            "loss_nce": loss_nce.detach(),
            "loss_cluster": loss_cluster.detach(),
            # Every value the official step logs has a counterpart (LOSS_NAMES).
            "loss_eigen_p": loss_eig_p.detach(),
            "loss_eigen_a": loss_eig_a.detach(),
            "cd_pos_inter": corr["pos_inter_cd"].detach().mean(),
            "cd_neg_inter": (corr["neg_inter_cd"].detach().mean() if corr["neg_inter_cd"].numel()
                             else loss_corr.new_zeros(())),
            **nce_terms,
            "u": torch.tensor(float(u)),
        }
        if loss_linear is not None:
            out["loss_linear"] = loss_linear.detach()
        return out

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, kk: torch.Tensor, out_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Head output and probe predictions (eval mode: no dropout)."""
        code = self.seg_head(kk)
        if out_size is not None:
            code = F.interpolate(code, size=out_size, mode="bilinear", align_corners=False)
        _, cluster_probs = self.cluster_probe(code, alpha=None)
        out = {"code": code, "cluster": cluster_probs.argmax(1)}
        if self.linear_probe is not None:
            out["linear"] = self.linear_probe(code).argmax(1)
        return out


def momentum(loss: LossConfig, step: int, step_unit: StepUnit = "batch") -> float:
    """u of section 8: 0 up to and including `step_schedulers` (counted in `step_unit`, the
    ``train.step_unit``), then `momentum_limit`."""
    return loss.momentum_limit if step > step_batches(step_unit, loss.step_schedulers) else 0.0


def lr_scale(optim: OptimConfig, global_batch: int) -> float:
    ratio = global_batch / optim.reference_global_batch
    return {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[optim.lr_scaling]


def param_groups(heads: EagleHeads, optim: OptimConfig, global_batch: int) -> list[dict]:
    """Named groups with the official learning rates (one Adam == the official seven)."""
    o = optim
    scale = lr_scale(optim, global_batch)
    groups = [
        ("seg_head", heads.seg_head, o.lr * scale),
        ("projection", heads.projection, o.lr_proj * scale),
        ("linear_probe", heads.linear_probe, o.lr_linear),
        ("cluster_probe", heads.cluster_probe, o.lr_cluster),
        ("eigen_probes", nn.ModuleList([heads.eigen_probe, heads.eigen_probe_aug]), o.lr_eigen),
    ]
    # no linear probe without labels
    out: list[dict[str, Any]] = [{"name": name, "params": list(mod.parameters()), "lr": lr}
                                 for name, mod, lr in groups if mod is not None]
    covered = sum(len(g["params"]) for g in out)
    if covered != len(list(heads.parameters())):
        raise RuntimeError("a trainable parameter is in no optimizer group")
    return out


def build_model(cfg: Config, device: torch.device | str = "cpu", quiet: bool = False,
                say=None, official: OfficialCheckpoint | None = None) -> tuple[FrozenViT, EagleHeads]:
    """(frozen backbone, heads) of `cfg` on `device`; training, evaluation, predict and bench use it.

    The one function that reads several sections: the backbone takes ``model``, the heads
    ``model``, ``eicue`` and ``loss``, the seed comes from ``train``.

    Seeded with ``train.seed`` first, so a random backbone and the heads' initialisation are the
    same on every rank and in every tool that rebuilds the model of a checkpoint (the backbone is
    not in checkpoints).  ``model.init_from`` (an official EAGLE checkpoint) then overwrites the
    backbone and every head.  quiet: hide the random-weights warning (ranks other than 0);
    say: where to report the official initialisation (e.g. ``dist.print``).
    official: an official checkpoint already read (`load_official_checkpoint`) whose weights the
    model takes, backbone and heads, instead of ``model.weights`` / ``model.init_from``; missing
    or mis-shaped weights are one OfficialCheckpointError naming every such key.
    """
    torch.manual_seed(cfg.train.seed)
    given = official is not None
    with warnings.catch_warnings():
        if quiet or given or cfg.model.init_from:  # the official backbone comes next, not at random
            warnings.simplefilter("ignore")
        backbone = FrozenViT(cfg.model.backbone, None if given else cfg.model.weights,
                             fused_attn=cfg.model.fused_attn)
    heads = EagleHeads(cfg.model, cfg.eicue, cfg.loss, backbone.out_channels)
    if official is None and cfg.model.init_from:
        official = load_official_checkpoint(cfg.model.init_from)
    if official is not None:
        official.load_into(backbone, heads)
        if say is not None and not given:
            say(f"initialised the backbone and all heads from {cfg.model.init_from} (official step {official.global_step})")
    return backbone.to(device), heads.to(device)


def build_optimizer(heads: EagleHeads, optim: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups(heads, optim, global_batch))


def augmented_indices(batch: dict) -> torch.Tensor:
    """Indices of the images of ``img_aug`` whose pixels differ from ``img`` (int64 ``[n]``).

    The data stream says which images it blurred (``aug_mask``, bool ``[B]``); a batch without
    the mask (older callers, replayed official steps) is compared pixel by pixel instead.  The
    comparison is exact (an image is reused only when every pixel is bit-identical, NaN counts
    as changed) and costs one elementwise pass over the batch, far below one ViT pass, so such
    callers get the same saving without being trusted to describe their own augmentation.
    """
    img, img_aug = batch["img"], batch["img_aug"]
    if img.shape != img_aug.shape:
        raise ValueError(f"img {tuple(img.shape)} and img_aug {tuple(img_aug.shape)} differ in shape")
    mask = batch.get("aug_mask")
    if mask is None:
        mask = (img_aug != img).flatten(1).any(dim=1)
    elif mask.shape != (img.shape[0],) or mask.dtype != torch.bool:
        raise ValueError(f"aug_mask must be bool [{img.shape[0]}], got {mask.dtype} {tuple(mask.shape)}")
    return mask.nonzero().squeeze(1).to(img.device)


def backbone_keys(backbone, img: torch.Tensor, img_aug: torch.Tensor, changed: torch.Tensor):
    """Keys of both views, running the backbone on ``img`` and only the ``changed`` rows of
    ``img_aug``; the other rows of the augmented view are ``img``'s keys (same pixels, same keys).
    Returns ``(kk_img, kk_aug)``."""
    kk_img = backbone(img)
    n_changed = changed.shape[0]
    if n_changed == img.shape[0]:
        return kk_img, backbone(img_aug)
    if n_changed == 0:
        return kk_img, kk_img
    return kk_img, kk_img.index_copy(0, changed, backbone(img_aug.index_select(0, changed)))


def training_step_losses(backbone, heads, batch: dict, u: float, *,
                         precision: Precision) -> dict[str, torch.Tensor]:
    """Backbone on img and on the changed images of img_aug, then every head and loss, inside
    `precision`'s autocast.  `u` is the step's InfoNCE weight (:func:`momentum`).

    `precision` is the resolved value (`Dist.precision`, or `distributed.resolve_precision`
    outside a run): the model never decides mixed precision itself.

    ``out["backbone_passes"]`` counts the backbone's work in full-batch passes (1 + the changed
    fraction of img_aug; 2 when every image was blurred).  Which images run through the backbone
    changes no random draw: the backbone is deterministic (eval mode) and the heads see key
    tensors of the same shape as before.
    """
    img, img_aug = batch["img"], batch["img_aug"]
    changed = augmented_indices(batch)
    with precision.context():
        with profiling.section("backbone"):
            kk_img, kk_aug = backbone_keys(backbone, img, img_aug, changed)
        same = torch.ones(img.shape[0], dtype=torch.bool, device=img.device)
        same[changed] = False
        out = heads(kk_img.float(), kk_aug.float(), img, img_aug, batch["label"], u, aug_same=same)
    out["backbone_passes"] = torch.tensor(1.0 + changed.shape[0] / img.shape[0])
    return out
