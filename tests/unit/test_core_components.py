"""Unit tests of the numerical core beyond the recorded fixtures: edge cases, equivalence of our
vectorised forms with plain brute-force versions, and the strict metric protocol.

    .venv/bin/python -m pytest tests/unit/test_core_components.py -q
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eagle_dist.method import eicue

from eagle_dist.method import losses

from eagle_dist.evaluation import metrics
from eagle_dist.method.heads import SegHead
from eagle_dist.method.probes import ClusterLookup, LinearProbe


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _brute_force_medoids(z: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    z64 = z.double()
    rows = []
    for g in range(n_groups):
        members = torch.nonzero(groups == g).flatten()
        dist = torch.cdist(z64[members], z64[members]).sum(0)
        rows.append(members[torch.argmin(dist)])  # argmin returns the first minimum
    return torch.stack(rows)


# --------------------------------------------------------------------------- medoids


@pytest.mark.parametrize("chunk_elems", [1, 37, 500, 97 * 13, 1 << 20])
def test_medoid_chunks_match_brute_force(chunk_elems):
    # Uneven groups interleaved in row order, one singleton group; chunk sizes from one row per
    # chunk to everything at once, so chunks start and end inside and across groups.
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 6, (97,), generator=g)
    groups[groups == 5] = 4
    groups[13] = 5
    z = _unit_rows(97, 16, seed=2)
    rows = losses.medoid_rows(z, groups, 6, max_chunk_elems=chunk_elems)
    assert torch.equal(rows, _brute_force_medoids(z, groups, 6))


@pytest.mark.parametrize("chunk_elems", [1, 2 * 11, 5 * 11, 1 << 20])
def test_medoid_ties_pick_the_first_row(chunk_elems):
    # Exactly representable vectors: every member of group 0 has the same distance sum (exact
    # ties), and the group is interleaved with group 1 so that sorting by group reorders rows.
    e0, e1, e2 = torch.eye(3)
    z = torch.stack([e2, e0, e2, e1, e0, e1, e2, e0, e1, e2, e2])
    groups = torch.tensor([1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1])
    rows = losses.medoid_rows(z, groups, 2, max_chunk_elems=chunk_elems)
    # Group 0 = {1: e0, 3: e1, 4: e0, 5: e1, 7: e0, 8: e1}: all sums 3*sqrt(2): first row wins.
    # Group 1 = all e2: all sums 0: first row wins.
    assert rows.tolist() == [1, 0]


def test_medoid_rows_never_build_the_full_distance_matrix(monkeypatch):
    seen = []
    real_addmm = torch.addmm

    def recording_addmm(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    n = 400
    groups = torch.arange(n) % 8
    z = _unit_rows(n, 8, seed=3)
    rows = losses.medoid_rows(z, groups, 8, max_chunk_elems=4000)
    assert seen and max(seen) <= 4000 < n * n
    assert rows.shape == (8,)
    # Only same-group distances are computed: 8 groups of 50 -> 8 blocks of 50 x 50.
    assert sum(seen) == 8 * 50 * 50
    seen.clear()
    one_group = torch.zeros(n, dtype=torch.long)  # 400 rows in 7 tiles of <= 63: tile pairs i <= j
    assert torch.equal(losses.medoid_rows(z, one_group, 1, max_chunk_elems=4000),
                       _brute_force_medoids(z, one_group, 1))
    assert max(seen) <= 4000 and len(seen) == 7 * 8 // 2 and sum(seen) < 0.6 * n * n


def test_small_medoid_groups_share_blocks_and_still_match_brute_force():
    # Many small groups (the per-image prototype scope): neighbours are merged into one masked block.
    g = torch.Generator().manual_seed(7)
    groups = torch.randint(0, 40, (600,), generator=g)
    counts = torch.bincount(groups, minlength=40).tolist()
    blocks = losses._medoid_blocks(counts, 1 << 20, tile_rows=256)
    assert any(b[4] for b in blocks) and len(blocks) < 40
    assert blocks[0][0] == 0 and all(x[1] == y[0] for x, y in zip(blocks, blocks[1:])) and blocks[-1][1] == 600
    z = _unit_rows(600, 16, seed=8)
    assert torch.equal(losses.medoid_rows(z, groups, 40), _brute_force_medoids(z, groups, 40))


# --------------------------------------------------------------------------- object-centric NCE


def _reference_style_nce(S1, S2, labels, sim, tau, g, mode, cityscapes):
    """A literal per-id loop version of the reference loss (independent of our vectorisation)."""
    labels = labels.reshape(-1)
    ids = torch.unique(labels)
    cents = []
    for i in ids:
        f = S1[labels == i]
        cents.append(f.mean(0) if mode == "mean" else f[torch.argmin(torch.cdist(f, f).sum(0))])
    C = torch.stack(cents)
    target = (labels[:, None] == ids[None, :]).float().argmax(1)
    w = sim.mean(2).reshape(-1)

    def ce(logits):
        if not cityscapes:
            return F.cross_entropy(logits, target, reduction="none")
        logp = F.log_softmax(logits, -1)
        weight = torch.ones_like(logp) * 0.1 / (logp.shape[1] - 1)
        weight.scatter_(-1, target[:, None], 0.9)
        return (-weight * logp).sum(-1).mean()

    local = (ce(S1 @ C.T / tau) * w).mean()
    glob = (ce(S2 @ C.T / tau) * w).mean()
    return ((1 - g) * local + g * glob) / 2


@pytest.mark.parametrize("mode", ["prototype", "medoid", "mean"])
@pytest.mark.parametrize("cityscapes", [False, True])
def test_object_centric_nce_matches_a_loop_implementation(mode, cityscapes):
    B, h, w, D = 3, 5, 4, 12
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 7, (B, h, w), generator=g) * 3  # sparse, unsorted ids
    sim = torch.randn(B, h * w, h * w, generator=g)
    S1 = _unit_rows(B * h * w, D, seed=5).requires_grad_(True)
    S2 = _unit_rows(B * h * w, D, seed=6).requires_grad_(True)
    ours = losses.object_centric_nce(S1, S2, labels, sim, 0.07, 0.7, centroid_mode=mode,
                                     variant="cityscapes" if cityscapes else "per_pixel")
    ours_grads = torch.autograd.grad(ours, (S1, S2))
    ref = _reference_style_nce(S1, S2, labels, sim, 0.07, 0.7, "mean" if mode == "mean" else "medoid", cityscapes)
    ref_grads = torch.autograd.grad(ref, (S1, S2))
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-4)


def test_nce_weights_can_be_given_per_pixel_and_the_medoid_keeps_its_gradient():
    B, N, D = 2, 9, 6
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2] * B)
    sim = torch.rand(B, N, N)
    S1 = _unit_rows(B * N, D, seed=7).requires_grad_(True)
    S2 = _unit_rows(B * N, D, seed=8)
    from_matrix, cents = losses.object_centric_nce(S1, S2, labels, sim, 0.1, 0.5, return_centroids=True)
    from_vector = losses.object_centric_nce(S1, S2, labels, sim.mean(2).reshape(-1), 0.1, 0.5)
    torch.testing.assert_close(from_matrix, from_vector)
    assert cents.ids.tolist() == [0, 1, 2] and cents.rows is not None
    # Only the global term touches S2; the medoid rows of S1 get gradient through the centroids too.
    (grad,) = torch.autograd.grad(from_matrix, S1)
    assert torch.all(grad[cents.rows].abs().sum(1) > 0)


def test_cityscapes_variant_with_a_single_id_is_finite():
    S = _unit_rows(10, 4, seed=9).requires_grad_(True)
    loss = losses.object_centric_nce(S, S, torch.zeros(10, dtype=torch.long), torch.rand(10), 0.07, 0.7,
                                     variant="cityscapes")
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_nce_rejects_unknown_modes_and_wrong_shapes():
    S = _unit_rows(6, 4, seed=10)
    with pytest.raises(ValueError, match="learned"):
        losses.object_centric_nce(S, S, torch.zeros(6, dtype=torch.long), torch.ones(6), 0.07, 0.7,
                                  centroid_mode="learned")
    with pytest.raises(ValueError, match="labels"):
        losses.object_centric_nce(S, S, torch.zeros(5, dtype=torch.long), torch.ones(6), 0.07, 0.7)


@pytest.mark.parametrize("shape", [(2, 24, 5, 6), (2, 8, 3), (1, 16, 1)])  # uneven tiles; fewer tokens than tiles
def test_key_similarity_weights_equal_the_reference_formula(shape):
    keys = torch.randn(*shape)
    flat = keys.flatten(2)
    expected = F.normalize(flat.transpose(1, 2) @ flat, dim=1).mean(2).reshape(-1)
    torch.testing.assert_close(losses.key_similarity_weights(keys), expected, atol=1e-6, rtol=1e-5)


def _drop_masks(rows: int, channels: int, p: float, generator) -> torch.Tensor:
    return (torch.rand(rows, channels, 1, 1, generator=generator) >= p).float() / (1 - p)


@pytest.mark.parametrize("shape", [(3, 40, 5, 6), (2, 16, 3)])
def test_key_similarity_weights_of_masked_keys_multiply_only_the_kept_channels(shape):
    g = torch.Generator().manual_seed(15)
    keys = torch.randn(*shape, generator=g)
    mask = _drop_masks(shape[0], shape[1], 0.3, g)
    mask[1] = 0.0  # an image with every channel dropped: G = 0 (the dense path gives 0 too)
    dense = losses.key_similarity_weights(keys * mask.view(shape[0], shape[1], *[1] * (len(shape) - 2)))
    torch.testing.assert_close(losses.key_similarity_weights(keys, mask), dense, atol=1e-6, rtol=1e-5)  # fp32 sums in another order
    assert losses.key_similarity_weights(keys, torch.zeros_like(mask)).abs().max() == 0


@pytest.mark.parametrize("same", [[True, False, True, True], [True] * 4, [False] * 4, None])
def test_key_similarity_weights_pair_share_the_common_channels(same):
    g = torch.Generator().manual_seed(16)
    keys = torch.randn(4, 48, 5, 7, generator=g)
    aug = torch.randn(4, 48, 5, 7, generator=g)
    same_B = None if same is None else torch.tensor(same)
    if same_B is not None:
        aug[same_B] = keys[same_B]
    mask, aug_mask = _drop_masks(4, 48, 0.25, g), _drop_masks(4, 48, 0.25, g)
    aug_mask[0, :5] = 2.0 * mask[0, :5]  # kept by both with different factors: not common
    kappa, aug_kappa = losses.key_similarity_weights_pair(keys, mask, aug, aug_mask, same_B)
    torch.testing.assert_close(kappa, losses.key_similarity_weights(keys * mask), atol=1e-6, rtol=1e-5)  # fp32 sums in another order
    torch.testing.assert_close(aug_kappa, losses.key_similarity_weights(aug * aug_mask), atol=1e-6, rtol=1e-5)  # fp32 sums in another order


# --------------------------------------------------------------------------- correspondence


def test_sample_points_equals_grid_sample_with_the_transpose_and_border():
    g = torch.Generator().manual_seed(11)
    t = torch.randn(4, 5, 7, 9, generator=g, requires_grad=True)
    coords = torch.rand(5, 6, 6, 2, generator=g) * 2.6 - 1.3  # includes points beyond the border
    coords[0, 0, 0] = torch.tensor([1.0, -1.0])
    source = torch.tensor([2, 0, 2, 1, 2])  # image 2 three times, image 3 never
    ours = losses.sample_points(t, coords, source)
    ref = F.grid_sample(t[source], coords.permute(0, 2, 1, 3), mode="bilinear", padding_mode="border",
                        align_corners=True)
    assert torch.equal(ours, ref)  # grid_sample's arithmetic, bit for bit (CPU: row gathers + its FMAs)
    assert torch.equal(losses.sample_points(t, coords[:4]), F.grid_sample(
        t, coords[:4].permute(0, 2, 1, 3), mode="bilinear", padding_mode="border", align_corners=True))
    weights = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), t)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), t)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 16, 37])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sample_points_match_grid_sample_bit_for_bit_in_every_layout(channels, channels_last):
    # The CPU path gathers rows of the channels-last pixels: vectorised channel loops (16), their
    # scalar tails (1, 37) and both layouts must give grid_sample's values exactly.
    g = torch.Generator().manual_seed(14)
    t = torch.randn(3, channels, 6, 11, generator=g)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    coords = torch.rand(4, 5, 5, 2, generator=g) * 2.4 - 1.2
    coords[1, 2, 3] = torch.tensor([1.0, 1.0])  # the last pixel: both far taps clamped, weight 0
    source = torch.tensor([1, 1, 0, 2])
    ref = F.grid_sample(t[source], coords.permute(0, 2, 1, 3), mode="bilinear", padding_mode="border",
                        align_corners=True)
    assert torch.equal(losses.sample_points(t, coords, source), ref)


def test_correspondence_feature_masks_equal_masked_feature_maps():
    g = torch.Generator().manual_seed(17)
    B, S = 3, 4
    feats = [torch.randn(B, 10, 6, 6, generator=g) for _ in range(3)]
    codes = [torch.randn(B, 6, 6, 6, generator=g) for _ in range(3)]
    masks = [_drop_masks(B, 10, 0.3, g) for _ in range(3)]
    draws = losses.draw_correspondence_randomness(B, S, 3, generator=g)
    kw = dict(feature_samples=S, neg_samples=3, coords=draws[0], perms=draws[1])
    ours = losses.correspondence_loss(*feats, *codes, feature_masks=(masks[0], None, masks[2]), **kw)
    dense = losses.correspondence_loss(feats[0] * masks[0], feats[1], feats[2] * masks[2], *codes, **kw)
    for key in ("pos_inter_loss_map", "neg_inter_loss_map", "pos_inter_cd", "neg_inter_cd"):
        torch.testing.assert_close(ours[key], dense[key], atol=1e-6, rtol=1e-5)


def test_dropped_mask_is_the_factor_dropout2d_draws():
    head = SegHead(12, dim=4, dropout=0.4).train()
    keys = torch.randn(3, 12, 2, 2)
    torch.manual_seed(3)
    dropped = head.drop(keys)  # what the losses' keys were before: Dropout2d on the whole maps
    torch.manual_seed(3)
    mask = head.dropped_mask(keys)
    assert mask is not None and mask.shape == (3, 12, 1, 1)
    assert torch.equal(keys * mask, dropped)
    assert head.eval().dropped_mask(keys) is None and SegHead(12, dim=4, dropout=0.0).train().dropped_mask(keys) is None


@pytest.mark.parametrize("tokens", [1, 2, 49, 784])
def test_semantic_affinity_is_the_code_gram_built_from_its_upper_half(tokens):
    code = torch.randn(3, tokens, 16, generator=torch.Generator().manual_seed(18))
    adj = eicue.semantic_affinity(code)
    assert torch.equal(adj, adj.transpose(1, 2))  # the mirrored block is exact
    torch.testing.assert_close(adj, torch.bmm(code, code.transpose(1, 2)), atol=1e-5, rtol=1e-6)
    grad_code = code.clone().requires_grad_()
    eicue.semantic_affinity(grad_code).sum().backward()  # with autograd: the plain product
    assert grad_code.grad is not None


def test_grouped_negatives_equal_one_helper_call_per_negative():
    g = torch.Generator().manual_seed(12)
    B, S = 3, 5
    feats = [torch.randn(B, 10, 8, 8, generator=g) for _ in range(3)]
    codes = [torch.randn(B, 6, 8, 8, generator=g, requires_grad=True) for _ in range(3)]
    (c1, c2, c3), perms = losses.draw_correspondence_randomness(B, S, 4, generator=g)
    perms[1] = torch.tensor([1, 2, 1])  # a near-derangement with a repeated index
    cfg = dict(pointwise=True, zero_clamp=True, stabalize=True, shift_value=3.5, shift_bias=0.11)
    out = losses.correspondence_loss(*feats, *codes, feature_samples=S, neg_samples=4, coords=(c1, c2, c3),
                                     perms=perms, **cfg)

    def sample(t, c):
        return F.grid_sample(t, c.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)

    loops = [losses.correspondence_helper(sample(feats[0], c1), sample(feats[0][p], c2),
                                          sample(codes[0], c1), sample(codes[0][p], c2), False, **cfg)
             for p in perms]
    ref_loss = torch.cat([loss for loss, _ in loops])
    torch.testing.assert_close(out["neg_inter_loss_map"], ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["neg_inter_cd"], torch.cat([cd for _, cd in loops]), atol=1e-6, rtol=1e-5)
    ours_grad = torch.autograd.grad(out["neg_inter_loss"], codes[0])[0]
    ref_grad = torch.autograd.grad(ref_loss.mean(), codes[0])[0]
    torch.testing.assert_close(ours_grad, ref_grad, atol=1e-8, rtol=1e-4)
    assert out["pos_inter_loss_map"].shape == (B, S, S, S, S)


def test_detached_shift_changes_only_the_gradient():
    g = torch.Generator().manual_seed(13)
    f1, f2 = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    c1 = torch.randn(2, 5, 4, 4, generator=g, requires_grad=True)
    c2 = torch.randn(2, 5, 4, 4, generator=g)
    live, _ = losses.correspondence_helper(f1, f2, c1, c2, pos=False)
    detached, _ = losses.correspondence_helper(f1, f2, c1, c2, pos=False, detach_shift=True)
    torch.testing.assert_close(live, detached)
    g_live = torch.autograd.grad(live.mean(), c1)[0]
    g_detached = torch.autograd.grad(detached.mean(), c1)[0]
    assert not torch.allclose(g_live, g_detached)


def test_near_derangement_has_no_fixed_points():
    for perm in itertools.permutations(range(4)):
        out = losses.near_derangement(torch.tensor(perm))
        assert not torch.any(out == torch.arange(4))


# --------------------------------------------------------------------------- EiCue


@pytest.mark.parametrize("positive, total, flipped", [(200, 400, False), (201, 400, True), (400, 400, False),
                                                      (399, 400, True), (0, 400, False), (150, 400, False)])
def test_sign_rule_edges(positive, total, flipped):
    values = torch.full((total,), -1.0)
    values[:positive] = 1.0
    V = values[torch.randperm(total)].view(1, total // 4, 4)
    out = eicue.apply_sign_rule(V)
    assert torch.equal(out, -V if flipped else V)


def test_sign_rule_counts_zeros_as_not_positive_and_acts_per_image():
    V = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])  # 3/4 positive, 4/4 positive
    out = eicue.apply_sign_rule(V)
    assert torch.equal(out[0], -V[0]) and torch.equal(out[1], V[1])


def _dense_laplacian64(adj, color_W):
    adj = adj.double().clamp(min=0)
    adj = adj / adj.amax((1, 2), keepdim=True)
    W = adj + color_W.double() / color_W.double().amax((1, 2), keepdim=True)
    d = W.sum(-1)
    d = torch.where(d < 1e-12, torch.ones_like(d), d)
    D_inv_sqrt = torch.diag_embed(d.rsqrt())
    return D_inv_sqrt @ (torch.diag_embed(d) - W) @ D_inv_sqrt


def test_laplacian_uses_no_inverse_is_symmetric_and_matches_the_dense_formula(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a dense inverse/solve was called")

    for name in ("inverse", "pinverse"):
        monkeypatch.setattr(torch, name, forbidden)
    for name in ("inv", "inv_ex", "solve", "pinv"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    g = torch.Generator().manual_seed(14)
    code = torch.randn(2, 36, 8, generator=g)
    img = torch.randn(2, 3, 24, 24, generator=g)
    color_W = eicue.color_affinity(eicue.resize_for_color(img, 6))
    adj = eicue.semantic_affinity(code)
    inputs_before = (adj.clone(), color_W.clone())
    lap = eicue.normalized_laplacian(adj, color_W)
    assert adj.min() < 0 and torch.equal(adj, inputs_before[0]) and torch.equal(color_W, inputs_before[1])
    torch.testing.assert_close(lap, lap.transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(lap.double(), _dense_laplacian64(adj, color_W), atol=1e-6, rtol=0)
    V = eicue.eigen_vectors(img, code, 6, 4)  # the whole forward, still without any inverse
    assert V.shape == (2, 36, 4)


def test_a_shared_colour_term_gives_the_same_graph_and_vectors_bit_for_bit():
    """Both views of the step take their colours from img (quirk 8): EagleHeads computes the
    colour half once (color_term) and passes it to both; nothing may change."""
    g = torch.Generator().manual_seed(16)
    code = torch.randn(2, 36, 8, generator=g)
    img = torch.randn(2, 3, 24, 24, generator=g)
    color_W = eicue.color_affinity(eicue.resize_for_color(img, 6))
    term = eicue.color_term(img, 6)
    adj = eicue.semantic_affinity(code)
    assert torch.equal(eicue.normalized_laplacian(adj, color_W), eicue.normalized_laplacian(adj, color_term_BNN=term))
    assert torch.equal(eicue.eigen_vectors(img, code, 6, 4, solver="krylov"),
                       eicue.eigen_vectors(img, code, 6, 4, solver="krylov", color_term_BNN=term))
    with pytest.raises(ValueError, match="exactly one"):
        eicue.normalized_laplacian(adj, color_W, color_term_BNN=term)


def test_laplacian_isolated_node_gets_degree_one():
    adj = torch.ones(1, 3, 3)
    color_W = torch.ones(1, 3, 3)
    adj[0, 2, :] = adj[0, :, 2] = 0
    color_W[0, 2, :] = color_W[0, :, 2] = 0
    lap = eicue.normalized_laplacian(adj, color_W)
    assert lap[0, 2, 2].item() == 1.0 and torch.all(lap[0, 2, :2] == 0)
    assert torch.isfinite(lap).all()


def test_eigenpairs_are_fp32_under_autocast_and_both_solvers_agree():
    g = torch.Generator().manual_seed(15)
    code = torch.randn(2, 49, 8, generator=g)
    img = torch.randn(2, 3, 28, 28, generator=g)
    color_W = eicue.color_affinity(eicue.resize_for_color(img, 7))
    lap = eicue.normalized_laplacian(eicue.semantic_affinity(code), color_W)
    plain = eicue.smallest_eigenpairs(lap, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = eicue.smallest_eigenpairs(lap, 3)
        V_autocast = eicue.eigen_vectors(img, code.bfloat16(), 7, 3)
    assert under_autocast[0].dtype == torch.float32 and V_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast[0], plain[0])
    vals64, vecs64 = eicue.smallest_eigenpairs(lap, 3, solver="eigh64")
    torch.testing.assert_close(vals64, plain[0], atol=1e-5, rtol=0)
    dots = (vecs64 * plain[1]).sum(1).abs()
    torch.testing.assert_close(dots, torch.ones_like(dots), atol=1e-4, rtol=0)


def test_eicue_map_layout_and_non_square_grids():
    g = torch.Generator().manual_seed(16)
    code = torch.randn(2, 8, 4, 6, generator=g)
    img = torch.randn(2, 3, 32, 48, generator=g)
    spectral = eicue.EiCue(k=4, solver="eigh")(img, code)  # the solver eigen_vectors defaults to
    V = eicue.eigen_vectors(img, code.permute(0, 2, 3, 1).reshape(2, 24, 8), (4, 6), 4)
    assert spectral.shape == (2, 3, 4, 6)
    # Channel c at (row, col) is eigenvector c+1 at token row*w + col.
    assert torch.equal(spectral[1, 2, 3, 5], V[1, 3 * 6 + 5, 3])
    assert torch.equal(spectral[0, 0, 2, 1], V[0, 2 * 6 + 1, 1])


def test_color_modes():
    img01 = torch.rand(1, 3, 16, 16)
    mean = torch.tensor(eicue.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(eicue.IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (img01 - mean) / std
    rgb = eicue.resize_for_color(normalised, 4, "rgb01")
    torch.testing.assert_close(rgb, F.interpolate(img01, size=(4, 4), mode="bilinear").permute(0, 2, 3, 1),
                               atol=1e-6, rtol=0)
    official_W = eicue.color_affinity(eicue.resize_for_color(normalised, 4, "official"))
    fixed_W = eicue.color_affinity(rgb, scale=1.0)
    p = rgb.reshape(1, 16, 3).double()
    expected = torch.exp(-torch.cdist(p, p).square() / 0.02)
    torch.testing.assert_close(fixed_W.double(), expected, atol=1e-6, rtol=0)
    assert official_W.min() > 0.9 and fixed_W.min() < official_W.min()  # quirk 7: near-constant kernel
    with pytest.raises(ValueError, match="mode"):
        eicue.resize_for_color(normalised, 4, "srgb")


# --------------------------------------------------------------------------- probes


def test_cluster_lookup_hard_assignment_and_log_probs_guard():
    lookup = ClusterLookup(4, 5)
    x = torch.randn(2, 4, 3, 3)
    loss, probs = lookup(x)
    assert torch.equal(probs.sum(1), torch.ones(2, 3, 3)) and set(probs.unique().tolist()) <= {0.0, 1.0}
    inner = lookup.inner_products(x)
    torch.testing.assert_close(loss, -inner.max(1).values.mean())
    with pytest.raises(ValueError, match="alpha"):
        lookup(x, alpha=None, log_probs=True)


def test_linear_probe_loss_ignores_unlabelled_pixels():
    probe = LinearProbe(6, 4)
    feats = torch.randn(2, 6, 3, 3)
    label = torch.randint(-1, 6, (2, 12, 12))
    label[0, 0, 0] = 255
    logits = F.interpolate(probe(feats), size=(12, 12), mode="bilinear", align_corners=False)
    flat_logits, flat = logits.permute(0, 2, 3, 1).reshape(-1, 4), label.reshape(-1)
    keep = (flat >= 0) & (flat < 4)
    torch.testing.assert_close(probe.loss(feats, label), F.cross_entropy(flat_logits[keep], flat[keep]))
    empty = probe.loss(feats, torch.full((2, 12, 12), -1))
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_seg_head_training_function_matches_the_module_path_bit_for_bit(memory_format):
    """The training path (`_SegHeadFunction`: masks kept instead of dropped copies) draws the same
    Dropout2d masks, returns the same codes and accumulates the same gradients as the plain
    modules, and leaves the random stream where Dropout2d would."""
    import copy

    torch.manual_seed(0)
    head = SegHead(24, 8, dropout=0.25).to(memory_format=memory_format)
    plain = copy.deepcopy(head)
    keys = torch.randn(3, 24, 5, 5).contiguous(memory_format=memory_format)
    results = []
    for module, use_function in ((head, True), (plain, False)):
        torch.manual_seed(5)
        if use_function:
            codes = [module(keys), module(keys)]  # two views on the same keys, as in the step
        else:
            codes = [module.cluster1(module.drop(keys)) + module.cluster2(module.drop(keys)) for _ in range(2)]
        weight = torch.randn_like(codes[0])
        ((codes[0] * weight).sum() + codes[1].square().sum()).backward()
        results.append((codes, [p.grad.clone() for p in module.parameters()], torch.rand(3)))
    (codes_f, grads_f, next_f), (codes_p, grads_p, next_p) = results
    assert all(torch.equal(a, b) for a, b in zip(codes_f, codes_p))
    assert all(torch.equal(a, b) for a, b in zip(grads_f, grads_p))
    assert torch.equal(next_f, next_p)
    assert not torch.equal(codes_f[0], codes_f[1])  # each call drew its own masks
    # eval mode and no-grad calls take the module path: no dropout, no function
    head.eval()
    with torch.no_grad():
        expected = head.cluster1(keys) + head.cluster2(keys)
    assert torch.equal(head(keys), expected)


@pytest.mark.parametrize("same", [[True, False, True, False], [True] * 4, [False] * 4, None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_seg_head_three_views_match_the_module_path(same, memory_format):
    """The step's three views in one function (`_SegHeadViewsFunction`: the input layers' products
    shared across views, matrix products instead of convolutions) draw the same masks in the same
    order, leave the random stream where three module calls would, and give the module path's
    codes and gradients up to float rounding: no further from float64 than the module path is."""
    import copy

    torch.manual_seed(0)
    head = SegHead(40, 8, dropout=0.25)
    plain, exact = copy.deepcopy(head), copy.deepcopy(head).double()
    keys = torch.randn(4, 40, 5, 6).contiguous(memory_format=memory_format)
    same_B = None if same is None else torch.tensor(same)
    aug = keys.clone()
    changed = torch.ones(4, dtype=torch.bool) if same_B is None else ~same_B
    aug[changed] = torch.randn(int(changed.sum()), 40, 5, 6)
    aug = aug.contiguous(memory_format=memory_format)
    weights = [torch.randn(4, 8, 5, 6) for _ in range(3)]

    def run(module, views, dtype):
        module.zero_grad()
        torch.manual_seed(5)
        codes = views(module, keys.to(dtype), aug.to(dtype))
        next_draw = torch.rand(3)
        sum((c * w.to(dtype)).sum() for c, w in zip(codes, weights)).backward()
        return [c.detach().double() for c in codes], [p.grad.double() for p in module.parameters()], next_draw

    def modules(m, k, a):
        return [m.cluster1(m.drop(t)) + m.cluster2(m.drop(t)) for t in (k, k, a)]

    shared = run(head, lambda m, k, a: m(k, a, same_B), torch.float32)
    module_path = run(plain, modules, torch.float32)
    reference = run(exact, modules, torch.float64)
    assert torch.equal(shared[2], module_path[2]) and torch.equal(shared[2], reference[2])

    def worst(got, want):
        return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))

    for part in (0, 1):  # codes, then gradients
        assert worst(shared[part], reference[part]) < 1e-5
        assert worst(shared[part], reference[part]) <= 4 * worst(module_path[part], reference[part]) + 1e-7
    assert not torch.equal(shared[0][0], shared[0][1])  # x and P: same keys, their own masks
    # Without training (or under no_grad) it is three plain calls: no dropout, the same code thrice.
    head.eval()
    with torch.no_grad():
        codes = head(keys, aug, same_B)
        assert all(torch.equal(c, head.cluster1(k) + head.cluster2(k)) for c, k in zip(codes, (keys, keys, aug)))


# --------------------------------------------------------------------------- metrics


def test_confusion_matrix_official_and_strict_protocols_by_hand():
    # n = 2 classes, e = 1 extra cluster.
    target = torch.tensor([0, 0, 0, 1, 1, 1, -1, 2, 255])
    preds = torch.tensor([1, 1, 2, 0, 0, 1, 0, 0, 1])
    cm = metrics.ConfusionMatrix(2, 1)
    cm.update(preds, target)
    assert cm.labelled_pixels == 6 and cm.dropped_official == 1
    assert cm.official_stats().tolist() == [[0, 2], [2, 1], [0, 0]]
    res = cm.compute("cluster")
    # Official: cluster 1 -> class 0 (2 px), cluster 0 -> class 1 (2 px); the extra-cluster pixel is gone.
    official = res["official"]
    assert official["histogram"].tolist() == [[2, 1, 0], [0, 2, 0], [0, 0, 0]]  # row k: cluster matched to class k
    np.testing.assert_allclose(official["iou"][:2], [2 / 3, 2 / 3])
    assert np.isnan(official["iou"][2])
    assert official["Accuracy"] == pytest.approx(100 * 4 / 5)
    # Strict: the same matching, but the pixel on the extra cluster is a miss of class 0.
    strict = res["strict"]
    np.testing.assert_allclose(strict["iou"], [2 / 4, 2 / 3])
    assert strict["Accuracy"] == pytest.approx(100 * 4 / 6)
    assert strict["mIoU"] < official["mIoU"]
    assert strict["cluster_to_class"].tolist() == [1, 0, -1]


def test_predictions_outside_the_cluster_range_are_errors_only_in_strict():
    cm = metrics.ConfusionMatrix(3, 0)
    target = torch.tensor([0, 1, 2, 2])
    cm.update(torch.tensor([0, 1, 2, 7]), target)  # 7: e.g. a cluster id fed to the linear metric
    assert cm.overflow.tolist() == [0, 0, 1] and cm.dropped_official == 1
    res = cm.compute("linear")
    assert res["official"]["Accuracy"] == pytest.approx(100.0)
    assert res["strict"]["Accuracy"] == pytest.approx(75.0)
    np.testing.assert_allclose(res["strict"]["iou"], [1.0, 1.0, 0.5])


def test_merged_and_split_updates_give_the_same_table():
    g = torch.Generator().manual_seed(17)
    target = torch.randint(-1, 6, (4, 9, 9), generator=g)
    preds = torch.randint(0, 8, (4, 9, 9), generator=g)
    whole = metrics.ConfusionMatrix(5, 3)
    whole.update(preds, target)
    halves = [metrics.ConfusionMatrix(5, 3) for _ in range(2)]
    halves[0].update(preds[:1], target[:1])
    halves[1].update(preds[1:], target[1:])
    assert torch.equal(halves[0].merge_(halves[1]).table, whole.table)
    assert whole.all_reduce_() is whole  # no process group: a no-op


def _brute_force_assignment(stats: np.ndarray):
    n_clusters, n_classes = stats.shape
    best, best_map = -1, None
    for clusters in itertools.permutations(range(n_clusters), n_classes):
        total = sum(stats[c, k] for k, c in enumerate(clusters))
        if total > best:
            best, best_map, n_best = total, clusters, 1
        elif total == best:
            n_best += 1
    return best, best_map, n_best


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matches_brute_force_over_permutations(seed):
    rng = np.random.default_rng(seed)
    n, e = 4, 2
    counts = rng.integers(0, 1000, size=(n + e, n))
    best, best_map, n_best = _brute_force_assignment(counts)
    assert n_best == 1  # random counts in [0, 1000): a unique optimum, so assignments must agree
    strict = metrics.strict_hungarian_metrics(counts, n)
    rows, cols = strict["assignments"]
    assert counts[rows, cols].sum() == best
    assert all(strict["cluster_to_class"][c] == k for k, c in enumerate(best_map))
    # Official protocol on the same matrix restricted to the first n rows (extras dropped).
    official_stats = counts.copy()
    official_stats[n:] = 0
    best_o, map_o, _ = _brute_force_assignment(official_stats)
    res = metrics.hungarian_metrics(official_stats, n, e)
    assert res["histogram"][:n, :n].trace() == best_o
    expected_tp = np.array([official_stats[c, k] for k, c in enumerate(map_o)], dtype=float)
    np.testing.assert_array_equal(np.diag(res["histogram"])[:n], expected_tp)


def test_classes_absent_from_ground_truth():
    # Class 2 never occurs. Official: its matched cluster is empty -> IoU NaN, skipped.
    stats = np.array([[5, 0, 0], [0, 4, 0], [0, 0, 0], [0, 0, 0]])
    res = metrics.hungarian_metrics(stats, 3, 1)
    assert np.isnan(res["iou"][2]) and np.isnan(res["iou"][3])
    assert res["mIoU"] == pytest.approx(100.0)
    # Now the cluster matched to the absent class predicts pixels of class 0: IoU 0, counted.
    stats_fp = np.array([[5, 0, 0], [0, 4, 0], [2, 0, 0], [0, 0, 0]])
    res_fp = metrics.hungarian_metrics(stats_fp, 3, 1)
    assert res_fp["iou"][2] == 0.0
    assert res_fp["mIoU"] == pytest.approx(100 * (5 / 7 + 1 + 0) / 3)
    strict = metrics.strict_hungarian_metrics(stats, 3)
    assert np.isnan(strict["iou"][2]) and strict["mIoU"] == pytest.approx(100.0)


def test_map_clusters_reproduces_the_insert_at_m_plus_one_quirk():
    # Cluster 0 unmatched, clusters 1 and 2 matched to classes 0 and 1.
    table = metrics.map_clusters([1, 2], [0, 1], n_classes=2, extra_clusters=1)
    assert table.tolist() == [0, -1, 1]  # the correct table would be [-1, 0, 1]
    assert metrics.map_clusters([0, 1], [1, 0], n_classes=2, extra_clusters=1).tolist() == [1, 0, -1]


def test_hungarian_without_extra_clusters_permutes_rows():
    stats = np.array([[0, 7], [6, 1]])
    res = metrics.hungarian_metrics(stats, 2, 0)
    assert res["histogram"].tolist() == [[6, 1], [0, 7]]
    assert res["Accuracy"] == pytest.approx(100 * 13 / 14)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_core_on_cuda_under_bf16_autocast_matches_cpu_fp32():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(18)
    B, h, D = 2, 14, 32
    img = torch.randn(B, 3, 8 * h, 8 * h, generator=g)
    code = torch.randn(B, D, h, h, generator=g)
    V_cpu, vals_cpu = eicue.eigen_vectors(img, code.permute(0, 2, 3, 1).reshape(B, h * h, D), h, 4,
                                          return_eigenvalues=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        V_gpu, vals_gpu = eicue.eigen_vectors(img.to(dev), code.to(dev).permute(0, 2, 3, 1).reshape(B, h * h, D),
                                              h, 4, return_eigenvalues=True)
        labels = torch.randint(0, 5, (B * h * h,), generator=g)
        S1, S2 = _unit_rows(B * h * h, D, seed=19), _unit_rows(B * h * h, D, seed=20)
        weights = torch.rand(B * h * h, generator=g)
        nce_gpu = losses.object_centric_nce(S1.to(dev), S2.to(dev), labels.to(dev), weights.to(dev), 0.07, 0.7)
        rows_gpu = losses.medoid_rows(S1.to(dev), labels.to(dev), 5, max_chunk_elems=5000)
    assert V_gpu.dtype == torch.float32
    torch.testing.assert_close(vals_gpu.cpu(), vals_cpu, atol=1e-5, rtol=0)
    dots = (V_gpu.cpu() * V_cpu).sum(1).abs()
    torch.testing.assert_close(dots, torch.ones_like(dots), atol=1e-4, rtol=0)
    torch.testing.assert_close(nce_gpu.cpu(), losses.object_centric_nce(S1, S2, labels, weights, 0.07, 0.7),
                               atol=1e-6, rtol=1e-5)
    assert torch.equal(rows_gpu.cpu(), losses.medoid_rows(S1, labels, 5))

    feats = [torch.randn(B, 12, h, h, generator=g) for _ in range(3)]
    codes = [torch.randn(B, 8, h, h, generator=g) for _ in range(3)]
    coords, perms = losses.draw_correspondence_randomness(B, 7, 3, generator=g)
    cpu = losses.correspondence_loss(*feats, *codes, feature_samples=7, neg_samples=3, coords=coords, perms=perms)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = losses.correspondence_loss(*(t.to(dev) for t in feats + codes), feature_samples=7, neg_samples=3,
                                         coords=coords, perms=perms)
    for key in ("pos_inter_loss", "neg_inter_loss", "neg_inter_cd"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-5, rtol=1e-4)

    cm_cpu, cm_gpu = metrics.ConfusionMatrix(5, 2), metrics.ConfusionMatrix(5, 2, device=dev)
    target = torch.randint(-1, 6, (3, 10, 10), generator=g)
    preds = torch.randint(0, 7, (3, 10, 10), generator=g)
    cm_cpu.update(preds, target)
    cm_gpu.update(preds.to(dev), target.to(dev))
    assert torch.equal(cm_gpu.table.cpu(), cm_cpu.table)
