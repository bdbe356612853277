"""EAGLE's training losses: the object-centric InfoNCE and the STEGO-style correspondence loss.

* :func:`object_centric_nce` is the reference's ``newLocalGlobalInfoNCE`` (ALGORITHM.md section 5):
  one centroid per EiCue id pooled over the whole batch (medoid by default), a "local" InfoNCE
  of the anchor view and a "global" (crosswise) one of the other view against the same centroids,
  weighted per pixel by the key-similarity weights of :func:`key_similarity_weights`.
* :func:`correspondence_loss` is the reference's ``CorrespondenceLoss.forward`` (section 6) with the
  helper :func:`correspondence_helper`; its random draws can be injected to replay a recording.

Both run in float32 with autocast switched off: they are cheap next to the backbone, and the
contrastive logits (divided by 0.07) and the shifted correlations are sensitive to bf16 rounding.

Parity checks: ``.venv/bin/python -m pytest tests/parity/test_parity.py -k "infonce or correspondence"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eagle_dist import profiling
from eagle_dist.config import LossConfig
from eagle_dist.method.heads import kept_channels, kept_keys

__all__ = [
    "CENTROID_MODES",
    "NCE_VARIANTS",
    "NCECentroids",
    "correspondence_helper",
    "correspondence_loss",
    "draw_correspondence_randomness",
    "key_similarity_weights",
    "medoid_rows",
    "near_derangement",
    "no_autocast",
    "object_centric_nce",
    "sample_points",
]

CENTROID_MODES = ("prototype", "medoid", "mean")
NCE_VARIANTS = ("per_pixel", "cityscapes")

# Elements of one [chunk, span] distance block in the medoid search (32 MiB in float32). Bounds
# the memory of the search whatever the batch size; the number of chunks only costs launches.
DEFAULT_MEDOID_CHUNK_ELEMS = 1 << 23


def no_autocast(t: torch.Tensor):
    """Autocast off on ``t``'s device: the parts of the step that stay in float32 under any
    mixed-precision setting (eigensolver inputs, contrastive logits, shifted correlations)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


# The correspondence loss's defaults are the config's (LossConfig, the COCO config): one place.
_LOSS = LossConfig()


# --------------------------------------------------------------------------- object-centric NCE


# Column tiles of the key Gram matrix in key_similarity_weights: only the tile pairs i <= j are
# multiplied (G is symmetric), (T + 1) / (2 T) of the full product: 62.5 % for T = 4.
KAPPA_TILES = 4


def _kappa_tiled(n: int, tile_grams) -> list[torch.Tensor]:
    """``kappa [R, n]`` of one or more ``[R, n, n]`` Gram matrices given tile by tile.

    ``tile_grams(rows, cols)`` returns each matrix's ``[R, |rows|, |cols|]`` tile for the
    KAPPA_TILES column tiles ``rows <= cols``: G is symmetric, so each off-diagonal tile serves as
    its own transpose, and the row averages are matrix-vector products instead of a materialised
    normalised matrix."""
    tiles = max(1, min(KAPPA_TILES, n))
    edges = [n * t // tiles for t in range(tiles + 1)]
    cols = [slice(edges[t], edges[t + 1]) for t in range(tiles)]
    blocks, sq_cols = [], None
    for i in range(tiles):
        for j in range(i, tiles):
            grams = tile_grams(cols[i], cols[j])
            if sq_cols is None:
                sq_cols = [g.new_zeros(g.shape[0], n) for g in grams]
            for gram_Rij, sq_RN in zip(grams, sq_cols):
                squares = gram_Rij.square()
                sq_RN[:, cols[j]] += squares.sum(dim=1)
                if j > i:  # the same tile transposed: rows of tile j, columns of tile i
                    sq_RN[:, cols[i]] += squares.sum(dim=2)
            blocks.append((i, j, grams))
    assert sq_cols is not None  # n >= 1: at least one tile
    kappas = []
    for k, sq_RN in enumerate(sq_cols):
        inv_col_norm_RN1 = (1.0 / sq_RN.sqrt().clamp_min(1e-12)).unsqueeze(2)
        kappa_RN = sq_RN.new_zeros(sq_RN.shape)
        for i, j, grams in blocks:
            kappa_RN[:, cols[i]] += torch.bmm(grams[k], inv_col_norm_RN1[:, cols[j]]).squeeze(2)
            if j > i:
                kappa_RN[:, cols[j]] += torch.bmm(grams[k].transpose(1, 2), inv_col_norm_RN1[:, cols[i]]).squeeze(2)
        kappas.append(kappa_RN / n)
    return kappas


def _tile_gram(keys_RNC: torch.Tensor):
    """One tile of ``G = K K^T`` per call, ``gram(rows, cols) -> [R, |rows|, |cols|]``."""
    def gram(rows: slice, cols: slice) -> torch.Tensor:
        return torch.bmm(keys_RNC[:, rows], keys_RNC[:, cols].transpose(1, 2))
    return gram


def _as_BNC(keys: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` or ``[B, C, N]`` keys as ``[B, N, C]`` fp32 (a view of channels-last maps)."""
    if keys.ndim not in (3, 4):
        raise ValueError(f"key_similarity_weights expects keys [B, C, H, W] or [B, C, N], got {tuple(keys.shape)}")
    return keys.detach().flatten(2).float().transpose(1, 2)


@torch.no_grad()
def key_similarity_weights(keys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel weights kappa of the object-centric loss: ``[B, C, H, W]`` (or ``[B, C, N]``) -> ``[B*N]``.

    ``G = K^T K`` per image (raw dot products of the dropout keys), every column of G scaled to
    unit L2 norm, then each row averaged: ``kappa_i = (1/N) sum_j G_ij / |G_:j|`` (computed
    tile by tile, `_kappa_tiled`).  ``mask`` (``[B, C]`` or ``[B, C, 1, 1]``, a whole-channel
    dropout factor): the keys are ``keys * mask``, and only the kept channels are multiplied
    (the same dot products without their zero terms).  No gradient.  The weights can be negative.
    """
    with no_autocast(keys):
        keys_BNC = _as_BNC(keys)
        b, n, c = keys_BNC.shape
        if mask is not None:
            mask_BC = mask.detach().reshape(b, c).float()
            kept = kept_channels(mask_BC != 0, mask_BC)
            if kept is None:  # every channel dropped: G = 0, and so is kappa
                return keys_BNC.new_zeros(b * n)
            keys_BNC = kept_keys(keys_BNC, kept)
        gram = _tile_gram(keys_BNC)
        (kappa_BN,) = _kappa_tiled(n, lambda rows, cols: [gram(rows, cols)])
    return kappa_BN.reshape(-1)


@torch.no_grad()
def key_similarity_weights_pair(keys: torch.Tensor, mask: torch.Tensor, aug_keys: torch.Tensor,
                                aug_mask: torch.Tensor, same: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`key_similarity_weights` of ``keys * mask`` and of ``aug_keys * aug_mask`` (``[B*N]`` each).

    ``same`` (bool ``[B]``): the rows where ``aug_keys`` are ``keys`` (unblurred images).  There the
    channels both masks keep give both Gram matrices the same products: they are multiplied
    once, and each matrix adds its own channels' (about 10 % each at p = 0.1).  Nothing is
    subtracted: the same sums in another order.
    """
    with no_autocast(keys):
        keys_BNC, aug_BNC = _as_BNC(keys), _as_BNC(aug_keys)
        b, n, c = keys_BNC.shape
        if aug_BNC.shape != keys_BNC.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and aug_keys {tuple(aug_keys.shape)} differ in shape")
        mask_BC, aug_mask_BC = mask.detach().reshape(b, c).float(), aug_mask.detach().reshape(b, c).float()
        if same is None or not bool(same.any()):
            return key_similarity_weights(keys, mask_BC), key_similarity_weights(aug_keys, aug_mask_BC)
        same_rows, changed = same.nonzero().squeeze(1), (~same).nonzero().squeeze(1)
        kappa_BN, aug_kappa_BN = keys_BNC.new_empty(b, n), keys_BNC.new_empty(b, n)
        if changed.numel():
            kappa_BN[changed] = key_similarity_weights(keys_BNC.index_select(0, changed).transpose(1, 2),
                                                       mask_BC.index_select(0, changed)).view(-1, n)
            aug_kappa_BN[changed] = key_similarity_weights(aug_BNC.index_select(0, changed).transpose(1, 2),
                                                           aug_mask_BC.index_select(0, changed)).view(-1, n)
        keys_RNC = keys_BNC.index_select(0, same_rows)
        m_RC, a_RC = mask_BC.index_select(0, same_rows), aug_mask_BC.index_select(0, same_rows)
        both_RC = (m_RC != 0) & (m_RC == a_RC)  # kept by both, with the same factor
        parts = [kept_channels(keep & (mask != 0), mask)
                 for keep, mask in ((both_RC, m_RC), (~both_RC, m_RC), (~both_RC, a_RC))]
        common, own, aug_own = (None if kept is None else _tile_gram(kept_keys(keys_RNC, kept)) for kept in parts)

        def tile_grams(rows: slice, cols: slice) -> list[torch.Tensor]:
            shared = common(rows, cols) if common is not None else keys_RNC.new_zeros(
                keys_RNC.shape[0], rows.stop - rows.start, cols.stop - cols.start)
            return [shared + own(rows, cols) if own is not None else shared,
                    shared + aug_own(rows, cols) if aug_own is not None else shared]

        kappa_BN[same_rows], aug_kappa_BN[same_rows] = _kappa_tiled(n, tile_grams)
    return kappa_BN.reshape(-1), aug_kappa_BN.reshape(-1)


def _medoid_blocks(counts_G: list[int], max_chunk_elems: int,
                   tile_rows: int) -> list[tuple[int, int, int, int, bool, bool]]:
    """Distance blocks of the medoid search over rows sorted by group (sizes ``counts_G``).

    Each block is ``(row_lo, row_hi, col_lo, col_hi, mixed, mirror)``: rows ``row_lo:row_hi``
    against columns ``col_lo:col_hi``.  No distance between different groups is computed, except
    inside ``mixed`` blocks (masked out there):

    * a group larger than one tile is cut into near-equal tiles of at most ``tile_rows`` rows
      (and at most ``max_chunk_elems`` distances per tile pair); only the pairs of tiles
      ``i <= j`` are computed, and an off-diagonal block (``mirror``) adds its column sums to
      the column rows too, since ``d(a, b) = d(b, a)``: about half the work of the full square;
    * a group that fits one tile is one square block;
    * consecutive small groups share one square block while it has at most MEDOID_MERGE_ROWS
      rows or holds at most MEDOID_MERGE_WASTE times the groups' own distances (``mixed``).
    """
    tile_rows = max(1, min(tile_rows, math.isqrt(max(1, max_chunk_elems))))
    blocks = []
    g, n_groups, row = 0, len(counts_G), 0
    while g < n_groups:
        n = counts_G[g]
        if n == 0:
            g += 1
            continue
        rows, own, last = n, n * n, g + 1
        while n <= tile_rows and last < n_groups:
            m = counts_G[last]
            merged = rows + m
            if merged > tile_rows or (merged > MEDOID_MERGE_ROWS and merged * merged > MEDOID_MERGE_WASTE * (own + m * m)):
                break
            rows, own, last = merged, own + m * m, last + 1
        if last > g + 1:
            blocks.append((row, row + rows, row, row + rows, True, False))
        else:
            n_tiles = -(-n // tile_rows)
            edges = [row + n * t // n_tiles for t in range(n_tiles + 1)]
            for i in range(n_tiles):
                for j in range(i, n_tiles):
                    blocks.append((edges[i], edges[i + 1], edges[j], edges[j + 1], False, j > i))
        row += rows
        g = last
    return blocks


# Consecutive groups are searched in one square block while it has at most this many rows (tiny
# matrix products are dominated by per-call overhead) ...
MEDOID_MERGE_ROWS = 128
# ... or while it holds at most this factor more distances than the groups' own blocks.
MEDOID_MERGE_WASTE = 1.5
# Tile side of the medoid search: smaller tiles skip more of the symmetric half but cost more
# calls; a GPU runs a whole 784-row group as one product faster than as tiles.
MEDOID_TILE_ROWS = {"cpu": 256, "cuda": 2048}


@torch.no_grad()
def medoid_rows(
    z_PD: torch.Tensor,
    group_P: torch.Tensor,
    n_groups: int,
    max_chunk_elems: int = DEFAULT_MEDOID_CHUNK_ELEMS,
) -> torch.Tensor:
    """Row index of each group's medoid: the member with the smallest sum of Euclidean distances
    to the other members of its group (ties: the smallest row index, as the reference's argmin).

    ``group_P`` holds ids in ``[0, n_groups)``, every group non-empty. The rows are sorted by group
    so that each group is a contiguous block; each group's rows are then compared with that
    group's rows only, one tile pair at a time, using the symmetry of the distances (see
    :func:`_medoid_blocks`; one block holds at most ``max_chunk_elems`` distances). Work is about
    half the reference's per-group ``cdist`` (``sum_g n_g^2 * D / 2``), memory one block: the
    ``(B*N)^2`` matrix of all pairs is never formed. Distances use ``|a|^2 + |b|^2 - 2 a.b``
    (clamped at 0) like the reference's ``cdist``; a row's distance to itself is exactly 0.
    """
    n_rows = z_PD.shape[0]
    if group_P.shape != (n_rows,):
        raise ValueError(f"medoid_rows: {group_P.shape} group ids for {n_rows} rows")
    device = z_PD.device
    with no_autocast(z_PD):
        order_P = torch.argsort(group_P, stable=True)
        z_sorted = z_PD.detach().float()[order_P]
        g_sorted = group_P[order_P]
        sqnorm = z_sorted.square().sum(dim=1)
        counts_G = torch.bincount(g_sorted, minlength=n_groups).tolist()  # one host sync
        tile_rows = MEDOID_TILE_ROWS.get(device.type, MEDOID_TILE_ROWS["cuda"])

        dist_sum = torch.zeros(n_rows, dtype=torch.float32, device=device)
        for a, b, lo, hi, mixed, mirror in _medoid_blocks(counts_G, max_chunk_elems, tile_rows):
            # |b|^2 - 2 a.b in one matrix product, then + |a|^2 (the reference's cdist arithmetic).
            d2 = torch.addmm(sqnorm[None, lo:hi], z_sorted[a:b], z_sorted[lo:hi].T, alpha=-2.0)
            dist = d2.add_(sqnorm[a:b, None]).clamp_min_(0.0).sqrt_()
            if mirror:
                dist_sum[lo:hi] += dist.sum(dim=0)
            else:
                dist.diagonal().zero_()  # the row itself: exactly 0
            if mixed:
                dist.masked_fill_(g_sorted[a:b, None] != g_sorted[None, lo:hi], 0.0)
            dist_sum[a:b] += dist.sum(dim=1)

        best = torch.full((n_groups,), float("inf"), device=device)
        best = best.scatter_reduce(0, g_sorted, dist_sum, reduce="amin", include_self=True)
        is_best = dist_sum == best[g_sorted]
        candidates = torch.where(is_best, order_P, torch.full_like(order_P, n_rows))
        rows_G = torch.full((n_groups,), n_rows, dtype=order_P.dtype, device=device)
        rows_G = rows_G.scatter_reduce(0, g_sorted, candidates, reduce="amin", include_self=True)
    return rows_G


@dataclass(frozen=True)
class NCECentroids:
    """Which centroids :func:`object_centric_nce` used.

    ``ids``: the sorted unique EiCue ids of the batch ``[U]`` (a pixel's target is the position of
    its id here). ``rows``: the row of ``S1`` chosen as each id's medoid ``[U]`` (None in ``mean``
    mode). The reference's prototype mode also wrote these rows into a prototype table that
    nothing reads (quirk 10); ``table[ids] = S1[rows]`` reproduces that table if needed.
    """

    ids: torch.Tensor
    rows: torch.Tensor | None


def _label_smoothed_ce(logits_PU: torch.Tensor, target_P: torch.Tensor, smoothing: float) -> torch.Tensor:
    # Reference: weight (1 - eps) on the target and eps / (U - 1) on every other id, then the mean
    # over pixels (a scalar). With U = 1 the reference divides by zero and returns NaN; here
    # there is no other id to spread mass to, and log_softmax of one logit is 0, so the loss is 0.
    n_ids = logits_PU.shape[1]
    log_prob = F.log_softmax(logits_PU, dim=1)
    off_target = smoothing / (n_ids - 1) if n_ids > 1 else 0.0
    weight = torch.full_like(log_prob, off_target)
    weight.scatter_(1, target_P.unsqueeze(1), 1.0 - smoothing)
    return (-weight * log_prob).sum(dim=1).mean()


def object_centric_nce(
    S1: torch.Tensor,
    S2: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    tau: float,
    global_weight: float,
    centroid_mode: str = "prototype",
    variant: str = "per_pixel",
    label_smoothing: float = 0.1,
    medoid_chunk_elems: int = DEFAULT_MEDOID_CHUNK_ELEMS,
    return_centroids: bool = False,
):
    """The reference's ``newLocalGlobalInfoNCE(S1, S2, segmentation_map, similarity_matrix)``.

    Args:
        S1: anchor-view embeddings ``[P, D]`` (P = B*N, unit rows, pixel order b*N + row*w + col).
        S2: the other view's embeddings ``[P, D]``, pixel-aligned with S1 (crosswise term).
        labels: the anchor view's EiCue ids, any shape with P elements (e.g. ``[B, h, w]``).
        weights: per-pixel weights, either ``[P]`` / ``[B, N]`` (e.g. :func:`key_similarity_weights`)
            or a ``[B, N, N]`` similarity matrix whose row means are the weights (the reference's
            input). Treated as constants (no gradient).
        tau: temperature (``contrastive_temp``, 0.07). global_weight: g (``global_loss_weight``, 0.7).
        centroid_mode: ``"prototype"`` (official default) and ``"medoid"`` both use the batch-wide
            medoid of each id's S1 rows (the chosen row keeps its gradient); ``"mean"`` the id mean.
        variant: ``"per_pixel"``: per-pixel cross-entropy times the weight, averaged (COCO).
            ``"cityscapes"``: label-smoothed cross-entropy (target ``1 - label_smoothing``, every other
            id ``label_smoothing/(U-1)``) averaged to a scalar *before* weighting, then times
            ``mean(weights)``: quirk 12, the per-pixel weighting collapses to a global factor.
        return_centroids: also return :class:`NCECentroids`.

    Returns ``((1-g) * L_local + g * L_global) / 2`` (and the centroids when asked).
    Centroids are pooled over the whole batch by id (quirk 11), the targets are the positions of
    the ids in the sorted unique list.
    """
    if centroid_mode not in CENTROID_MODES:
        raise ValueError(f"centroid_mode={centroid_mode!r} is not supported; use one of {CENTROID_MODES} "
                         "(the reference's 'learned' mode is dead code and overflows its table)")
    if variant not in NCE_VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; use one of {NCE_VARIANTS}")
    if S1.ndim != 2 or S1.shape != S2.shape:
        raise ValueError(f"S1 and S2 must both be [B*N, D], got {tuple(S1.shape)} and {tuple(S2.shape)}")
    n_pix = S1.shape[0]
    labels_P = labels.reshape(-1)
    if labels_P.numel() != n_pix:
        raise ValueError(f"{labels_P.numel()} labels for {n_pix} embedding rows")
    if weights.ndim == 3:
        weights = weights.mean(dim=2)
    weights_P = weights.detach().reshape(-1).float()
    if weights_P.numel() != n_pix:
        raise ValueError(f"{weights_P.numel()} weights for {n_pix} embedding rows; pass [B*N] weights "
                         "or the [B, N, N] similarity matrix")

    with no_autocast(S1):
        S1f, S2f = S1.float(), S2.float()
        ids_U, target_P = torch.unique(labels_P, sorted=True, return_inverse=True)
        n_ids = ids_U.shape[0]
        rows_U = None
        if centroid_mode == "mean":
            sums_UD = S1f.new_zeros(n_ids, S1f.shape[1]).index_add(0, target_P, S1f)
            counts_U = torch.bincount(target_P, minlength=n_ids).to(S1f.dtype)
            centroids_UD = sums_UD / counts_U.unsqueeze(1)
        else:
            with profiling.section("nce.medoid"):
                rows_U = medoid_rows(S1f, target_P, n_ids, medoid_chunk_elems)
            centroids_UD = S1f[rows_U]

        local_PU = torch.mm(S1f, centroids_UD.t()) / tau
        global_PU = torch.mm(S2f, centroids_UD.t()) / tau
        if variant == "cityscapes":
            local_loss = (_label_smoothed_ce(local_PU, target_P, label_smoothing) * weights_P).mean()
            global_loss = (_label_smoothed_ce(global_PU, target_P, label_smoothing) * weights_P).mean()
        else:
            local_loss = (F.cross_entropy(local_PU, target_P, reduction="none") * weights_P).mean()
            global_loss = (F.cross_entropy(global_PU, target_P, reduction="none") * weights_P).mean()
        total = ((1.0 - global_weight) * local_loss + global_weight * global_loss) / 2.0
    if return_centroids:
        return total, NCECentroids(ids=ids_U, rows=rows_U)
    return total


# --------------------------------------------------------------------------- correspondence


def _unit_channels(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-3, eps=1e-10)


def _correspondence_terms(f1, f2, c1, c2, pos, pointwise, zero_clamp, stabalize, shift_value, shift_bias,
                          detach_shift):
    """The helper on a leading group axis: tensors ``[G or 1, B, C, S, S]``, statistics per group.

    Each group is one reference helper call (the negatives are G calls done at once); all means
    (pointwise centring, shifts) are taken within a group, as the separate calls would.
    """
    with torch.no_grad():
        fd = torch.einsum("...chw,...cij->...hwij", _unit_channels(f1), _unit_channels(f2))
        groups = fd.shape[0]
        if pointwise:
            old_mean = fd.reshape(groups, -1).mean(dim=1)
            fd = fd - fd.mean(dim=(-2, -1), keepdim=True)
            new_mean = fd.reshape(groups, -1).mean(dim=1)
            fd = fd - new_mean.view(-1, 1, 1, 1, 1, 1) + old_mean.view(-1, 1, 1, 1, 1, 1)
        fd_mean = fd.reshape(groups, -1).mean(dim=1)
    cd = torch.einsum("...chw,...cij->...hwij", _unit_channels(c1), _unit_channels(c2))
    cd_mean = cd.reshape(cd.shape[0], -1).mean(dim=1)
    if detach_shift:
        cd_mean = cd_mean.detach()
    if pos:
        shift = (fd_mean - cd_mean - shift_bias).abs()
    else:
        shift = (fd_mean + cd_mean - shift_bias) * shift_value
    low = 0.0 if zero_clamp else -9999.0
    clamped = cd.clamp(low, 0.8) if stabalize else cd.clamp(min=low)
    loss = -clamped * (fd - shift.view(-1, 1, 1, 1, 1, 1))
    return loss, cd


def correspondence_helper(
    f1: torch.Tensor,
    f2: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    pos: bool,
    pointwise: bool = _LOSS.pointwise,
    zero_clamp: bool = _LOSS.zero_clamp,
    stabalize: bool = _LOSS.stabalize,
    shift_value: float = _LOSS.shift_value,
    shift_bias: float = _LOSS.shift_bias,
    detach_shift: bool = _LOSS.detach_shift,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``CorrespondenceLoss.helper``: ``(loss, cd)``, both ``[B, h, w, i, j]``.

    ``fd`` = correlation of the channel-normalised features (eps 1e-10), without gradient, centred
    per source point when ``pointwise`` (then shifted back to its global mean). ``cd`` = the same
    for the codes, with gradient. Shift: positive pair ``|mean fd - mean cd - bias|``, negative
    ``(mean fd + mean cd - bias) * shift_value``; quirk 13: the shift is *not* detached, so gradient
    also flows through ``mean cd`` (``detach_shift=True`` is the fixed option).
    ``loss = -clamp(cd, 0 if zero_clamp else -9999, 0.8 if stabalize else none) * (fd - shift)``.
    """
    for name, t in (("f1", f1), ("f2", f2), ("c1", c1), ("c2", c2)):
        if t.ndim != 4:
            raise ValueError(f"correspondence_helper: {name} must be [B, C, S, S], got {tuple(t.shape)}")
    with no_autocast(c1):
        loss, cd = _correspondence_terms(
            f1.float().unsqueeze(0), f2.float().unsqueeze(0), c1.float().unsqueeze(0), c2.float().unsqueeze(0),
            pos, pointwise, zero_clamp, stabalize, shift_value, shift_bias, detach_shift,
        )
    return loss.squeeze(0), cd.squeeze(0)


def sample_points(
    t_BCHW: torch.Tensor, coords_GSS2: torch.Tensor, source_G: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference's ``sample``: ``grid_sample(t[source], coords.permute(0, 2, 1, 3))`` with
    bilinear interpolation, border padding and ``align_corners=True``; returns ``[G, C, S, S]``.

    Note the transpose (quirk of the reference): output position (p, q) reads ``coords[g, q, p]``.
    The last axis of ``coords`` is (x along the width, y along the height) in [-1, 1].
    ``source_G`` picks the image of each coordinate set (default: image g for set g).

    With a source (the negatives), ``t[source]`` would copy a whole feature map per draw.  On CPU
    each point's four pixels are gathered from ``t`` itself (`_gathered_points`, grid_sample's
    values bit for bit); elsewhere every coordinate set is placed side by side in the grid of its
    source image (an image used m times gets m slots; unused slots sample the centre and are
    discarded), so one ``grid_sample`` on ``t`` computes each point with the reference's arithmetic.
    """
    if coords_GSS2.ndim != 4 or coords_GSS2.shape[-1] != 2:
        raise ValueError(f"coordinates must be [G, S, S, 2], got {tuple(coords_GSS2.shape)}")
    batch = t_BCHW.shape[0]
    n_sets = coords_GSS2.shape[0]
    grid = coords_GSS2.permute(0, 2, 1, 3).to(t_BCHW.dtype)
    if source_G is None:
        if n_sets != batch:
            raise ValueError(f"{n_sets} coordinate sets for {batch} images: pass source_G")
    else:
        source_G = source_G.to(t_BCHW.device).long()
        if source_G.shape != (n_sets,):
            raise ValueError(f"source_G must hold one image index per coordinate set ({n_sets}), "
                             f"got {tuple(source_G.shape)}")
    if t_BCHW.requires_grad and torch.is_grad_enabled() and t_BCHW.device.type == "cpu":
        return _SampledPoints.apply(t_BCHW, grid, source_G)
    return _grid_sample_points(t_BCHW, grid, source_G)


def _grid_sample_points(t_BCHW: torch.Tensor, grid: torch.Tensor, source_G: torch.Tensor | None) -> torch.Tensor:
    """`sample_points` after its checks, on the transposed ``grid`` ``[G, S, S, 2]``."""
    if t_BCHW.device.type == "cpu":
        return _gathered_points(t_BCHW, grid, source_G)
    if source_G is None:
        return F.grid_sample(t_BCHW, grid, mode="bilinear", padding_mode="border", align_corners=True)
    batch, n_sets = t_BCHW.shape[0], grid.shape[0]
    # slot[g] = how many earlier sets use the same image.
    order = torch.argsort(source_G, stable=True)
    uses = torch.bincount(source_G, minlength=batch)
    first_use = torch.cumsum(uses, 0) - uses
    slot = torch.empty_like(source_G)
    slot[order] = torch.arange(n_sets, device=source_G.device) - first_use[source_G[order]]
    n_slots = int(uses.max())
    side_a, side_b = grid.shape[1], grid.shape[2]
    packed = grid.new_zeros(batch, side_a, n_slots, side_b, 2)
    packed[source_G, :, slot] = grid
    sampled = F.grid_sample(t_BCHW, packed.view(batch, side_a, n_slots * side_b, 2), mode="bilinear",
                            padding_mode="border", align_corners=True)
    return sampled.view(batch, -1, side_a, n_slots, side_b)[source_G, :, :, slot]


def _bilinear_taps(grid: torch.Tensor, source_G: torch.Tensor | None, h: int, w: int):
    """grid_sample's four bilinear taps (``align_corners=True``, border padding) of every point of
    ``grid [G, S, S, 2]``, in its order (north-west, north-east, south-west, south-east), with its
    arithmetic: ``(pixel row of the batch's [B*h*w] pixels [G*S*S], weight [G*S*S, 1])`` each.
    A corner clamped at the border has weight 0."""
    ix = ((grid[..., 0] + 1) * ((w - 1) / 2)).clamp(0, w - 1)
    iy = ((grid[..., 1] + 1) * ((h - 1) / 2)).clamp(0, h - 1)
    x0, y0 = ix.floor(), iy.floor()
    east, south = ix - x0, iy - y0
    west, north = 1 - east, 1 - south
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp_max(w - 1), (y0 + 1).clamp_max(h - 1)
    image = torch.arange(grid.shape[0], device=grid.device) if source_G is None else source_G
    base = (image * (h * w)).view(-1, 1, 1)
    return [((base + rows).reshape(-1), weight.reshape(-1, 1))
            for rows, weight in ((y0 * w + x0, north * west), (y0 * w + x1, north * east),
                                 (y1 * w + x0, south * west), (y1 * w + x1, south * east))]


def _gathered_points(t_BCHW: torch.Tensor, grid: torch.Tensor, source_G: torch.Tensor | None) -> torch.Tensor:
    """grid_sample's bilinear points as row gathers on the channels-last pixels: the same
    values bit for bit (its weights, and its sum as fused multiply-adds in its order, which
    ``addcmul_`` runs), without its per-channel loop over a CPU feature map (1.2-6 ms per call for
    the batch-4 keys, channels-last or not, against 0.9).  ``[G, C, S, S]``, channels-last."""
    b, c, h, w = t_BCHW.shape
    pixels_NC = t_BCHW.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view of channels-last maps
    (rows, weight), *taps = _bilinear_taps(grid, source_G, h, w)
    out = pixels_NC.index_select(0, rows).mul_(weight)
    for rows, weight in taps:
        out.addcmul_(pixels_NC.index_select(0, rows), weight)
    n_sets, side_a, side_b = grid.shape[:3]
    return out.view(n_sets, side_a, side_b, c).permute(0, 3, 1, 2)


class _SampledPoints(torch.autograd.Function):
    """`sample_points` with a backward that adds each point's four weighted gradient rows into a
    channels-last gradient (``index_add_``): on CPU, grid_sample's own backward scatters channel
    by channel and took 17 ms for the batch-4 negatives' codes, this about 2 ms.  The terms are
    grid_sample's bilinear weights (`_bilinear_taps`); their sum runs in another order, so the
    gradient agrees to float rounding (tests/unit/test_core_components.py)."""

    @staticmethod
    def forward(ctx, t_BCHW, grid, source_G):
        ctx.save_for_backward(grid, source_G)
        ctx.shape = t_BCHW.shape
        return _grid_sample_points(t_BCHW, grid, source_G)

    @staticmethod
    def backward(ctx, grad_GCSS):
        grid, source_G = ctx.saved_tensors
        b, c, h, w = ctx.shape
        grad_PC = grad_GCSS.permute(0, 2, 3, 1).reshape(-1, c)
        grad_NC = grad_PC.new_zeros((b * h * w, c))
        for rows, weight in _bilinear_taps(grid, source_G, h, w):
            grad_NC.index_add_(0, rows, grad_PC * weight)
        return grad_NC.view(b, h, w, c).permute(0, 3, 1, 2), None, None


def near_derangement(perm: torch.Tensor) -> torch.Tensor:
    """The reference's ``super_perm`` applied to a drawn permutation: fixed points move to the
    next index, mod B. No index maps to itself, but indices can repeat (``[0,2,1] -> [1,2,1]``)."""
    size = perm.shape[0]
    out = perm.clone()
    out[out == torch.arange(size, device=perm.device)] += 1
    return out % size


def draw_correspondence_randomness(batch: int, samples: int, neg_samples: int, device=None,
                                   generator: torch.Generator | None = None):
    """The reference's draws, in its order: coords1, coords2, coords3 (each ``[B, S, S, 2]``,
    uniform in [-1, 1)), then one ``randperm`` per negative turned into a near-derangement.
    Returns ``((c1, c2, c3), perms [neg_samples, B])``."""
    shape = (batch, samples, samples, 2)
    coords = tuple(torch.rand(shape, device=device, generator=generator) * 2 - 1 for _ in range(3))
    perms = [near_derangement(torch.randperm(batch, device=device, generator=generator)) for _ in range(neg_samples)]
    perms_NB = torch.stack(perms) if perms else torch.zeros(0, batch, dtype=torch.long, device=device)
    return coords, perms_NB


def _correspondence_draws(batch: int, feature_samples: int, neg_samples: int, device: torch.device,
                          coords, perms: torch.Tensor | None, generator: torch.Generator | None):
    """The coordinates ``(c1, c2, c3)`` and ``perms [n_neg, B]`` to use: the given ones, else drawn
    (all of them, in the reference's order, even when only some are missing)."""
    if coords is None or (perms is None and neg_samples > 0):
        drawn_coords, drawn_perms = draw_correspondence_randomness(
            batch, feature_samples, neg_samples, device=device, generator=generator)
        coords = drawn_coords if coords is None else coords
        perms = drawn_perms if perms is None else perms
    coords = tuple(c.to(device) for c in coords)
    if perms is None:
        perms = torch.zeros(0, batch, dtype=torch.long, device=device)
    return coords, perms.to(device).long()


def _sampled_feats(feats_BCHW: torch.Tensor, mask_BC11: torch.Tensor | None, coords_GSS2: torch.Tensor,
                   source_G: torch.Tensor | None = None) -> torch.Tensor:
    """``sample_points(feats * mask, ...)``, the mask applied to the sampled points instead of the
    whole maps (interpolation is linear: the same values up to rounding)."""
    sampled = sample_points(feats_BCHW, coords_GSS2, source_G)
    if mask_BC11 is None:
        return sampled
    return sampled * (mask_BC11 if source_G is None else mask_BC11.index_select(0, source_G.to(mask_BC11.device)))


def _negative_terms(feats_BCHW: torch.Tensor, code_BCHW: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                    perms_NB: torch.Tensor, flags: dict,
                    feats_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and cd of every negative n (x at coords1 against ``x[perm_n]`` at coords2):
    ``[n_neg, B, S, S, S, S]`` each."""
    n_neg, batch = perms_NB.shape
    c2_all = c2.repeat(n_neg, 1, 1, 1)
    source = perms_NB.reshape(-1)

    def negatives(sampled):  # x[perm_n] at coords2 for every n: [n_neg, B, C, S, S]
        return sampled.view(n_neg, batch, *sampled.shape[1:])

    return _correspondence_terms(
        _sampled_feats(feats_BCHW, feats_mask, c1).unsqueeze(0),
        negatives(_sampled_feats(feats_BCHW, feats_mask, c2_all, source)),
        sample_points(code_BCHW, c1).unsqueeze(0), negatives(sample_points(code_BCHW, c2_all, source)),
        False, **flags,
    )


def correspondence_loss(
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    feats_pos_aug: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    code_pos_aug: torch.Tensor,
    *,
    feature_samples: int = _LOSS.feature_samples,
    neg_samples: int = _LOSS.neg_samples,
    pointwise: bool = _LOSS.pointwise,
    zero_clamp: bool = _LOSS.zero_clamp,
    stabalize: bool = _LOSS.stabalize,
    shift_value: float = _LOSS.shift_value,
    shift_bias: float = _LOSS.shift_bias,
    detach_shift: bool = _LOSS.detach_shift,
    coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    perms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    feature_masks: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
) -> dict:
    """The reference's ``CorrespondenceLoss.forward`` on the three views x (``feats``/``code``),
    P (``*_pos``) and A (``*_pos_aug``); features ``[B, Cf, H, W]`` (no gradient), codes ``[B, Cc, H, W]``.

    * positive: A sampled at coords3 against P sampled at coords2 (shift rule POS);
    * negative n: x at coords1 against ``x[perm_n]`` at coords2 (shift rule NEG), ``neg_samples`` times.

    ``coords = (c1, c2, c3)`` and ``perms [neg_samples, B]`` replay recorded draws; otherwise they
    are drawn with ``generator`` in the reference's order (:func:`draw_correspondence_randomness`).
    Views that share pixels (our P is x) may be passed as different tensors: each carries its own
    dropout mask. ``feature_masks``: per view (x, P, A) a ``[B, Cf, 1, 1]`` factor (or None) that
    the features are taken times (K-hat = keys * mask), applied to the sampled points only, so
    that views sharing keys can pass the same tensor.  Defaults are the COCO config; see
    :func:`correspondence_helper` for the flags.

    Returns a dict: ``pos_inter_loss``, ``neg_inter_loss`` (scalar means, what training weights),
    ``pos_inter_loss_map [B,S,S,S,S]``, ``neg_inter_loss_map [neg_samples*B,S,S,S,S]`` (negatives
    concatenated along the batch axis, negative-major), ``pos_inter_cd``, ``neg_inter_cd`` (same
    shapes), and the ``coords`` and ``perms`` used.
    """
    batch = feats.shape[0]
    for name, t in (("feats_pos", feats_pos), ("feats_pos_aug", feats_pos_aug), ("code", code),
                    ("code_pos", code_pos), ("code_pos_aug", code_pos_aug)):
        if t.ndim != 4 or t.shape[0] != batch:
            raise ValueError(f"correspondence_loss: {name} must be [{batch}, C, H, W], got {tuple(t.shape)}")
    (c1, c2, c3), perms = _correspondence_draws(batch, feature_samples, neg_samples, feats.device,
                                                coords, perms, generator)
    flags = dict(pointwise=pointwise, zero_clamp=zero_clamp, stabalize=stabalize, shift_value=shift_value,
                 shift_bias=shift_bias, detach_shift=detach_shift)

    mask_x, mask_p, mask_a = feature_masks if feature_masks is not None else (None, None, None)
    with no_autocast(code):
        feats, feats_pos, feats_pos_aug = (f.detach().float() for f in (feats, feats_pos, feats_pos_aug))
        mask_x, mask_p, mask_a = (None if m is None else m.detach().float().reshape(batch, -1, 1, 1)
                                  for m in (mask_x, mask_p, mask_a))
        code, code_pos, code_pos_aug = (c.float() for c in (code, code_pos, code_pos_aug))
        pos_loss, pos_cd = _correspondence_terms(
            _sampled_feats(feats_pos_aug, mask_a, c3).unsqueeze(0), _sampled_feats(feats_pos, mask_p, c2).unsqueeze(0),
            sample_points(code_pos_aug, c3).unsqueeze(0), sample_points(code_pos, c2).unsqueeze(0),
            True, **flags,
        )
        side = pos_loss.shape[2:]
        n_neg = perms.shape[0]
        if n_neg > 0:
            neg_loss, neg_cd = _negative_terms(feats, code, c1, c2, perms, flags, mask_x)
            neg_loss, neg_cd = neg_loss.reshape(n_neg * batch, *side), neg_cd.reshape(n_neg * batch, *side)
            neg_mean = neg_loss.mean()
        else:
            neg_loss = neg_cd = pos_loss.new_zeros(0, *side)
            neg_mean = pos_loss.new_zeros(())
    pos_loss, pos_cd = pos_loss.squeeze(0), pos_cd.squeeze(0)
    return {
        "pos_inter_loss": pos_loss.mean(),
        "neg_inter_loss": neg_mean,
        "pos_inter_loss_map": pos_loss,
        "neg_inter_loss_map": neg_loss,
        "pos_inter_cd": pos_cd,
        "neg_inter_cd": neg_cd,
        "coords": (c1, c2, c3),
        "perms": perms,
    }
