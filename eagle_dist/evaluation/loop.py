"""Distributed evaluation of the cluster and linear probes on a validation shard stream.

Every rank evaluates its share of the stream (each sample exactly once across ranks), the
confusion matrices are all-reduced, and every rank can then score them (rank 0 reports).  The
matrices count *all* labelled pixels, so both protocols come from the same numbers:

* ``official``: the reference's metric, which drops pixels predicted as extra clusters;
* ``strict``: every labelled pixel counts and extra clusters are errors.

Used by the trainer (validation during training: no flip, no CRF, hard assignment) and by
``python -m eagle_dist.evaluate`` (the final protocol).

Without labels (``model.n_classes = 0``) the trainer calls :func:`evaluate_unlabeled` instead:
each segment's share of the pixels and of the images, and the EiCue agreement between the two
training views, plus the sample grid and EiCue figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from eagle_dist.config import DataConfig, EvalConfig
from eagle_dist.evaluation import metrics


@torch.no_grad()
def head_code(backbone, heads, img: torch.Tensor, flip: bool) -> torch.Tensor:
    """Head output S in eval mode; with flip TTA, the mean with the flipped image's S."""
    code = heads.seg_head(backbone(img))
    if flip:
        code = 0.5 * (code + heads.seg_head(backbone(img.flip(-1))).flip(-1))
    return code


@torch.no_grad()
def probe_predictions(heads, code: torch.Tensor, size: tuple[int, int], chunk: int = 2):
    """Cluster-probe cosine scores and linear-probe logits at label resolution.

    The official code upsamples S bilinearly to the label size before both probes.  At 320x320
    and D=512 that is 50 M floats per image, so images go through in small chunks.
    """
    cluster_scores, linear_logits = [], []
    for part in code.split(chunk):
        up = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        cluster_scores.append(heads.cluster_probe.inner_products(up))
        linear_logits.append(heads.linear_probe(up))
    return torch.cat(cluster_scores), torch.cat(linear_logits)


def cosine_kmeans(x_ND: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (the cluster probe's geometry) with k-means++ seeding; returns [k, D]."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(x_ND.float(), dim=1)
    first = torch.randint(len(x), (1,), generator=gen)
    centers = [x[first]]
    dist = 1 - (x @ centers[0].T).squeeze(1)
    for _ in range(1, k):
        probs = dist.clamp(min=0) + 1e-12
        nxt = torch.multinomial(probs / probs.sum(), 1, generator=gen)
        centers.append(x[nxt])
        dist = torch.minimum(dist, 1 - (x @ x[nxt].T).squeeze(1))
    c = torch.cat(centers)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        c = torch.where(empty[:, None], c, F.normalize(sums, dim=1))
    return c


class AgreedBatches:
    """A loader's batches (at most `max_batches`); with `stop_flags`, the ranks also vote after each.

    stop_flags() returns this rank's flags (the trainer's stop signals).  Before each batch every
    rank adds its flags and whether it still has a batch to one all-reduce: a flag set on any rank
    ends the loop on all of them (`stopped_by` then holds the agreed flags), and a rank that ran out
    keeps voting until all have (ranks may hold a batch more or less).  Without `stop_flags` it
    is the plain loop, with no collective.
    """

    def __init__(self, loader, dist, max_batches: int | None,
                 stop_flags: Callable[[], Mapping[str, bool]] | None = None):
        self.loader, self.dist, self.max_batches, self.stop_flags = loader, dist, max_batches, stop_flags
        self.stopped_by: dict[str, bool] = {}

    def __iter__(self) -> Iterator[Any]:
        batches, taken = iter(self.loader), 0
        try:
            while True:
                batch = None
                if batches is not None and (self.max_batches is None or taken < self.max_batches):
                    batch = next(batches, None)
                if batch is None:
                    batches = None  # finished: its workers leave now
                if self.stop_flags is None:
                    if batch is None:
                        return
                else:
                    flags = dict(self.stop_flags())
                    votes = torch.tensor([float(batch is not None), *(float(bool(v)) for v in flags.values())],
                                         dtype=torch.float64, device=self.dist.device)
                    agreed = self.dist.all_reduce_sum(votes).tolist()
                    if any(v > 0 for v in agreed[1:]):
                        self.stopped_by = {name: agreed[1 + i] > 0 for i, name in enumerate(flags)}
                        return
                    if agreed[0] == 0:
                        return
                    if batch is None:
                        continue  # other ranks still evaluate
                yield batch
                taken += 1
        finally:
            del batches  # a loop left early stops its loader's workers here


@dataclass
class EvalResult:
    class_names: list[str]
    cluster: metrics.ConfusionMatrix  # [n + extra] clusters x n classes, all labelled pixels
    linear: metrics.ConfusionMatrix
    kmeans: metrics.ConfusionMatrix | None = None  # k-means on the raw backbone keys
    samples: list[dict] = field(default_factory=list)  # a few images for the figure (rank 0)
    n_images: int = 0  # images evaluated, summed over ranks
    stopped_by: dict[str, bool] = field(default_factory=dict)  # the agreed stop flags, if one ended it early

    def per_class_iou(self) -> dict[str, dict[str, float | None]]:
        """IoU in percent per class name for every probe and protocol (None where undefined).

        Official cluster: row k of the Hungarian histogram is the cluster matched to class k (its
        extra "missing clusters" row is not a class and is left out).
        """
        out = {}
        for name, score in self.scores().items():
            iou = score["iou"][: len(self.class_names)]
            out[name] = {cls: (None if np.isnan(v) else float(100.0 * v)) for cls, v in zip(self.class_names, iou)}
        return out

    def assignment(self) -> dict:
        """Cluster id -> class id under both protocols' Hungarian matching (-1: no class).

        ``strict`` matches over all labelled pixels (every cluster may win a class); ``official``
        is the reference's table, where extra clusters hold no pixels and stay unmatched.
        """
        report = self.cluster.compute("cluster")
        return {
            "n_classes": self.cluster.n_classes,
            "extra_clusters": self.cluster.extra_clusters,
            "class_names": list(self.class_names),
            "strict": [int(c) for c in report["strict"]["cluster_to_class"]],
            "official": [int(c) for c in report["official"]["cluster_to_class"]],
        }

    def scores(self) -> dict[str, dict]:
        out = {}
        for name, cm, kind in (("cluster", self.cluster, "cluster"), ("linear", self.linear, "linear"),
                               ("kmeans_raw", self.kmeans, "cluster")):
            if cm is None:
                continue
            report = cm.compute(kind)
            out[f"{name}_official"] = report["official"]
            out[f"{name}_strict"] = report["strict"]
        return out

    def scalars(self) -> dict[str, float]:
        flat = {}
        for name, score in self.scores().items():
            flat[f"{name}_mIoU"] = float(score["mIoU"])
            flat[f"{name}_acc"] = float(score["Accuracy"])
        flat["official_dropped_pixels"] = float(self.cluster.dropped_official)
        flat["labelled_pixels"] = float(self.cluster.labelled_pixels)
        return flat

    def table(self, title: str = "evaluation") -> str:
        lines = [title, f"{'probe / protocol':<22}{'mIoU':>8}{'acc':>8}"]
        for name, score in self.scores().items():
            lines.append(f"{name:<22}{score['mIoU']:>8.2f}{score['Accuracy']:>8.2f}")
        total, dropped = self.cluster.labelled_pixels, self.cluster.dropped_official
        lines.append(
            f"official protocol dropped {dropped} of {total} labelled pixels "
            f"({100.0 * dropped / max(total, 1):.1f} %, predicted as extra clusters)"
        )
        return "\n".join(lines)

    def write_figures(self, folder: Path) -> list[Path]:
        """Confusion matrices, per-class IoU bars and the sample grid (clusters as their strict class)."""
        from eagle_dist.evaluation import figures

        folder.mkdir(parents=True, exist_ok=True)
        names = list(self.class_names)
        strict_map = self.assignment()["strict"]
        order, pred_names = figures.cluster_order(strict_map, names)
        written = [
            figures.confusion_png(self.cluster.counts.cpu().numpy()[order], names, folder / "confusion_cluster.png",
                                  pred_names=pred_names, title="cluster probe (clusters matched to classes, strict)"),
            figures.confusion_png(self.linear.counts.cpu().numpy(), names, folder / "confusion_linear.png",
                                  title="linear probe"),
            figures.iou_bars_png(self.per_class_iou(), folder / "iou_per_class.png"),
        ]
        if self.samples:
            samples = [dict(s, cluster_class=figures.clusters_to_classes(s["cluster"], strict_map)) for s in self.samples]
            written.append(figures.sample_grid_png(samples, folder / "samples.png", names))
        return written


@torch.no_grad()
def _predictions(heads, code, img, size, crf_pool, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cluster, linear) label maps of one batch: argmax, or DenseCRF on the log-softmaxes."""
    scores, logits = probe_predictions(heads, code, size)
    if crf_pool is None:
        return scores.argmax(1), logits.argmax(1)
    from eagle_dist.evaluation.crf import to_uint8

    linear_pred, cluster_pred = crf_pool.refine(
        to_uint8(img), F.log_softmax(logits, dim=1), F.log_softmax(alpha * scores, dim=1)
    )
    return cluster_pred, linear_pred


def evaluate_stream(
    backbone,
    heads,
    dist,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    *,
    kmeans_baseline: bool = False,
    n_samples: int = 4,
    shards: str | None = None,
    crf_pool=None,
    seed: int = 0,
    eicue_samples: bool = True,
    stop_flags: Callable[[], Mapping[str, bool]] | None = None,
) -> EvalResult:
    """Evaluate `heads` on the validation shards; collective: every rank must call it.

    The loader follows the ``data`` section (``val_*``, ``num_workers``; `shards` replaces
    ``val_shards``), the protocol the ``eval`` section (``max_batches``, ``flip``,
    ``cluster_alpha``), the class counts the heads' own ``model`` section.
    With ``crf_pool`` (an :class:`eagle_dist.evaluation.crf.CRFPool`) both probes go through DenseCRF: the
    linear probe as log-softmax of its logits, the cluster probe as log-softmax of
    ``cluster_alpha`` x cosine (the official final protocol; the temperature changes nothing
    without the CRF, since the argmax is the same).  ``eicue_samples`` adds the EiCue map of
    the first images to ``samples`` (the trainer's figure); `seed` seeds the k-means baseline.
    ``stop_flags``: the ranks vote on them after each batch (:class:`AgreedBatches`); a flag
    set on any rank ends the evaluation early with ``stopped_by`` set (and no k-means baseline).
    """
    from eagle_dist.data import stream as data

    shards = shards or data_cfg.val_shards
    manifest = data.read_manifest(shards)
    n, e = heads.model_cfg.n_classes, heads.model_cfg.extra_clusters
    max_batches, flip = eval_cfg.max_batches, eval_cfg.flip
    device = dist.device
    was_training = heads.training
    heads.eval()
    loader = data.val_loader(data_cfg, shards, rank=dist.rank, world_size=dist.world_size, pin_memory=dist.pin_memory)
    cluster = metrics.ConfusionMatrix(n, e, device=device)
    linear = metrics.ConfusionMatrix(n, 0, device=device)
    kept_images: list[tuple[torch.Tensor, torch.Tensor]] = []
    samples: list[dict] = []
    n_images = 0
    batches = AgreedBatches(loader, dist, max_batches, stop_flags)
    for batch in batches:
        img = batch["img"].to(device, non_blocking=dist.pin_memory)
        label = batch["label"].to(device, non_blocking=dist.pin_memory)
        code = head_code(backbone, heads, img, flip)
        cluster_pred, linear_pred = _predictions(heads, code, img, label.shape[-2:], crf_pool, eval_cfg.cluster_alpha)
        n_images += img.shape[0]
        cluster.update(cluster_pred, label)
        linear.update(linear_pred, label)
        if kmeans_baseline:
            kept_images.append((backbone(img).cpu(), label.cpu()))
        if dist.is_main and len(samples) < n_samples:
            eicue_map = heads.eicue(code, img, heads.eigen_probe)[1] if eicue_samples else None
            for j in range(min(n_samples - len(samples), img.shape[0])):
                sample = {"image": img[j].cpu(), "label": label[j].cpu(),
                          "cluster": cluster_pred[j].cpu(), "linear": linear_pred[j].cpu()}
                if eicue_map is not None:
                    sample["eicue"] = eicue_map[j].cpu()
                samples.append(sample)
    for cm in (cluster, linear):
        dist.all_reduce_sum(cm.table)
    n_images = int(dist.all_reduce_sum(torch.tensor([n_images], dtype=torch.int64, device=device)).item())
    kmeans = None
    if kmeans_baseline and not batches.stopped_by:
        kmeans = _kmeans_baseline(kept_images, n, e, dist, seed)
    if was_training:
        heads.train()
    names = [c["name"] if isinstance(c, dict) else str(c) for c in manifest["classes"]]
    return EvalResult(names, cluster, linear, kmeans, samples, n_images, stopped_by=batches.stopped_by)


def _kmeans_baseline(kept, n, e, dist, seed, max_points: int = 20000) -> metrics.ConfusionMatrix | None:
    """k-means (n + e clusters) on the raw backbone keys of the same images, Hungarian-scored.

    Centres are fit on rank 0's tokens and broadcast; every rank assigns its own pixels.  The
    cosine scores are upsampled bilinearly to label size, like the probe's inputs.  When rank 0
    evaluated no image (its share of the validation set was empty or all skipped) there is
    nothing to fit on: every rank returns None, and the table shows no k-means row.
    """
    centers = None
    if dist.is_main and kept:
        tokens = torch.cat([kk.flatten(2).transpose(1, 2).reshape(-1, kk.shape[1]) for kk, _ in kept])
        gen = torch.Generator().manual_seed(seed)
        if len(tokens) > max_points:
            tokens = tokens[torch.randperm(len(tokens), generator=gen)[:max_points]]
        centers = cosine_kmeans(tokens, n + e, seed=seed)
    centers = dist.broadcast_object(centers)
    if centers is None:  # the same answer on every rank, so no rank waits in all_reduce below
        return None
    cm = metrics.ConfusionMatrix(n, e, device=dist.device)
    for kk, label in kept:
        sim = torch.einsum("bchw,kc->bkhw", F.normalize(kk, dim=1), centers)
        sim = F.interpolate(sim, size=label.shape[-2:], mode="bilinear", align_corners=False)
        cm.update(sim.argmax(1), label)
    dist.all_reduce_sum(cm.table)
    return cm


# ----------------------------------------------------------------------------- without labels


def _matched_agreement(a_BN: torch.Tensor, b_BN: torch.Tensor, n_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the share of pixels on which two id maps agree under the best one-to-one
    matching of their ids (Hungarian on the overlap counts): ``[B]`` in [0, 1], and the matching
    as a table ``[B, n_ids]`` from `b`'s ids to `a`'s (for drawing both in the same colours).

    The two views' EiCue ids come from two different eigen probes, so equal ids mean nothing;
    the matching makes the score blind to how the ids are named.
    """
    from scipy.optimize import linear_sum_assignment

    b, n = a_BN.shape
    offsets = torch.arange(b, device=a_BN.device)[:, None] * n_ids * n_ids
    joint = (offsets + a_BN * n_ids + b_BN).reshape(-1)
    overlap_BKK = torch.bincount(joint, minlength=b * n_ids * n_ids).reshape(b, n_ids, n_ids).cpu().numpy()
    matched, tables = [], np.tile(np.arange(n_ids), (b, 1))
    for i, overlap in enumerate(overlap_BKK):  # scipy solves one assignment at a time (32 x 32: microseconds)
        rows, cols = linear_sum_assignment(overlap, maximize=True)
        matched.append(overlap[rows, cols].sum())
        tables[i, cols] = rows
    return torch.tensor(matched, dtype=torch.float64) / n, torch.from_numpy(tables)


@dataclass
class UnlabeledEvalResult:
    """What evaluation can measure without labels (``model.n_classes = 0``), summed over ranks.

    * ``pixels``: pixels per segment (cluster-probe id), ``images``: images in which the segment
      covers at least one pixel (its usage);
    * ``eicue_agreement``: mean over images of the matched share of pixels on which the EiCue maps
      of the two training views (the image and its photometric augmentation, each through its own
      eigen probe, as in training) agree.  It says how stable the object cues the loss pulls
      towards are; near 1/eigen_clusters means noise.
    """

    n_segments: int
    pixels: np.ndarray
    images: np.ndarray
    eicue_agreement: float
    n_images: int
    samples: list[dict] = field(default_factory=list)  # rank 0: image, segments, both EiCue maps
    eigen: dict | None = None  # rank 0, first image: eigenvectors and both EiCue maps
    eigen_clusters: int = 0
    stopped_by: dict[str, bool] = field(default_factory=dict)  # the agreed stop flags, if one ended it early

    def pixel_share(self) -> np.ndarray:
        return self.pixels / max(int(self.pixels.sum()), 1)

    def effective_segments(self) -> float:
        """exp(entropy of the pixel shares): K when all K segments are equally used, 1 for one."""
        share = self.pixel_share()
        share = share[share > 0]
        return float(np.exp(-(share * np.log(share)).sum())) if len(share) else 0.0

    def scalars(self) -> dict[str, float]:
        flat = {
            "segments_used": float((self.pixels > 0).sum()),
            "effective_segments": self.effective_segments(),
            "eicue_agreement": float(self.eicue_agreement),
            "images": float(self.n_images),
            "segments": float(self.n_segments),
        }
        share, usage = self.pixel_share(), self.images / max(self.n_images, 1)
        for k in range(self.n_segments):
            flat[f"segment_{k:02d}_pixel_share"] = float(share[k])
            flat[f"segment_{k:02d}_image_share"] = float(usage[k])
        return flat

    def table(self, title: str = "evaluation") -> str:
        share, usage = 100 * self.pixel_share(), 100 * self.images / max(self.n_images, 1)
        width = 6
        lines = [
            f"{title} (no labels: {self.n_images} images)",
            f"segments used {int((self.pixels > 0).sum())} of {self.n_segments} (effective "
            f"{self.effective_segments():.1f}); EiCue agreement between the two views "
            f"{100 * self.eicue_agreement:.1f} %",
            f"{'segment':<10}" + "".join(f"{k:>{width}}" for k in range(self.n_segments)),
            f"{'pixels %':<10}" + "".join(f"{v:>{width}.1f}" for v in share),
            f"{'images %':<10}" + "".join(f"{v:>{width}.0f}" for v in usage),
        ]
        return "\n".join(lines)

    def write_figures(self, folder: Path) -> list[Path]:
        """``samples.png`` (image, segments, EiCue of both views) and ``eicue.png`` (first image)."""
        from eagle_dist.evaluation import figures

        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if self.samples:
            written.append(figures.segment_grid_png(self.samples, folder / "samples.png", self.n_segments))
        if self.eigen is not None:
            written.append(figures.eigen_png(
                self.eigen["image"], self.eigen["eigenvectors"], self.eigen["eicue"], self.eigen["eicue_aug"],
                folder / "eicue.png", n_colors=self.eigen_clusters, kmeans_title="EiCue (aug. view)"))
        return written


@torch.no_grad()
def evaluate_unlabeled(backbone, heads, dist, data_cfg: DataConfig, shards: str, max_batches: int | None = None,
                       n_samples: int = 4, seed: int = 0,
                       stop_flags: Callable[[], Mapping[str, bool]] | None = None) -> UnlabeledEvalResult:
    """Label-free evaluation on `shards` (their labels, if any, are not read); collective.

    The loader and the augmentation follow the ``data`` section (``val_*``, ``num_workers``,
    ``blur_p``).  The augmented view is drawn from a generator seeded with `seed` (the run's
    ``train.seed``) and the rank, so two evaluations of the same weights give the same numbers.
    ``stop_flags``: as for :func:`evaluate_stream`.
    """
    from eagle_dist.data import stream as data
    from eagle_dist.evaluation import figures

    device = dist.device
    k_seg, k_eig = heads.model_cfg.cluster_count, heads.model_cfg.eigen_clusters
    was_training = heads.training
    heads.eval()
    loader = data.val_loader(data_cfg, shards, rank=dist.rank, world_size=dist.world_size)
    generator = torch.Generator().manual_seed(seed * 1009 + dist.rank)
    pixels = torch.zeros(k_seg, dtype=torch.float64, device=device)
    images = torch.zeros(k_seg, dtype=torch.float64, device=device)
    agreement = torch.zeros(2, dtype=torch.float64, device=device)  # sum over images, image count
    samples: list[dict] = []
    eigen = None
    batches = AgreedBatches(loader, dist, max_batches, stop_flags)
    for batch in batches:
        img = batch["img"].to(device)
        img_aug = data.photometric_aug(batch["img"], data_cfg.blur_p, generator).to(device)
        code = heads.seg_head(backbone(img))
        code_aug = heads.seg_head(backbone(img_aug))
        b = img.shape[0]
        # Segments at pixel resolution, as predict writes them; chunks bound the upsampled codes.
        seg_BHW = torch.cat([
            heads.cluster_probe.inner_products(
                F.interpolate(part, size=img.shape[-2:], mode="bilinear", align_corners=False)).argmax(1)
            for part in code.split(2)])
        onehot_BK = F.one_hot(seg_BHW.reshape(b, -1), k_seg).sum(1).to(torch.float64)
        pixels += onehot_BK.sum(0)
        images += (onehot_BK > 0).to(torch.float64).sum(0)
        spectral, eicue_BHW, _ = heads.eicue(code, img, heads.eigen_probe)
        color_aug = img_aug if heads.color_from_aug_view else img  # as in training (quirk 8)
        _, eicue_aug_BHW, _ = heads.eicue(code_aug, color_aug, heads.eigen_probe_aug)
        agree_B, table_BK = _matched_agreement(eicue_BHW.reshape(b, -1), eicue_aug_BHW.reshape(b, -1), k_eig)
        agreement += torch.tensor([float(agree_B.sum()), b], dtype=torch.float64, device=device)
        # The augmented view's ids renamed to their matches in the first view: same colours.
        eicue_aug_BHW = torch.gather(table_BK.to(device), 1, eicue_aug_BHW.reshape(b, -1)).reshape(eicue_aug_BHW.shape)
        if dist.is_main and len(samples) < n_samples:
            for j in range(min(n_samples - len(samples), b)):
                samples.append({"image": img[j].cpu(), "cluster": seg_BHW[j].cpu(),
                                "eicue": eicue_BHW[j].cpu(), "eicue_aug": eicue_aug_BHW[j].cpu()})
        if dist.is_main and eigen is None:
            eigen = {"image": figures.denormalize(img[0]), "eigenvectors": spectral[0].cpu().numpy(),
                     "eicue": eicue_BHW[0].cpu().numpy(), "eicue_aug": eicue_aug_BHW[0].cpu().numpy()}
    for t in (pixels, images, agreement):
        dist.all_reduce_sum(t)
    if was_training:
        heads.train()
    n_images = int(agreement[1].item())
    return UnlabeledEvalResult(
        n_segments=k_seg, pixels=pixels.cpu().numpy().astype(np.int64), images=images.cpu().numpy().astype(np.int64),
        eicue_agreement=float(agreement[0].item()) / max(n_images, 1), n_images=n_images,
        samples=samples, eigen=eigen, eigen_clusters=k_eig, stopped_by=batches.stopped_by,
    )
