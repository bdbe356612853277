"""Parity with the official EAGLE code (MICV-yonsei/EAGLE @ 5f2976c) on recorded fixtures.

Every ``*.npz`` in ``$EAGLE_PARITY_FIXTURES`` (default: ``../shared/fixtures/parity`` next to the
repository) is one test. The file name without its number prefix names the component; an
unknown component fails. Every shape, index list and configuration value is read from the file
(other fixture sets have other seeds, shapes, batch sizes and crop sizes); the tolerances are
those of the fixture README.

    .venv/bin/python -m pytest tests/parity/test_parity.py -rA                 # one line per fixture
    EAGLE_PARITY_REPORT=/tmp/parity.jsonl .venv/bin/python -m pytest tests/parity/test_parity.py
        # also writes every individual check (max error vs tolerance) as JSON lines
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import helpers
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


FIXTURE_DIR = helpers.fixture_dir("EAGLE_PARITY_FIXTURES", "parity")
FIXTURES = sorted(FIXTURE_DIR.glob("*.npz"))


# --------------------------------------------------------------------------- comparison helpers


class Checks:
    """Collects every comparison of one fixture so that a failure lists all mismatches at once."""

    def __init__(self, fixture: str):
        self.fixture = fixture
        self.rows: list[dict] = []

    @staticmethod
    def _np(x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return np.asarray(x)

    def close(self, name: str, ours, ref, atol: float, rtol: float, equal_nan: bool = False) -> None:
        ours, ref = self._np(ours).astype(np.float64), self._np(ref).astype(np.float64)
        row = {"fixture": self.fixture, "check": name, "atol": atol, "rtol": rtol}
        if ours.shape != ref.shape:
            row.update(ok=False, detail=f"shape {list(ours.shape)} != reference {list(ref.shape)}")
            self.rows.append(row)
            return
        nan_ours, nan_ref = np.isnan(ours), np.isnan(ref)
        nan_ok = np.array_equal(nan_ours, nan_ref) if equal_nan else not (nan_ours.any() or nan_ref.any())
        both = ~(nan_ours | nan_ref)
        err = np.abs(ours - ref)[both]
        allowed = (atol + rtol * np.abs(ref))[both]
        excess = err - allowed
        row.update(
            ok=bool(nan_ok and (excess <= 0).all()),
            max_abs_err=float(err.max()) if err.size else 0.0,
            worst_err_over_allowed=float((err / np.maximum(allowed, 1e-300)).max()) if err.size else 0.0,
        )
        if not nan_ok:
            row["detail"] = "NaN pattern differs"
        self.rows.append(row)

    def equal(self, name: str, ours, ref) -> None:
        ours, ref = self._np(ours), self._np(ref)
        ok = ours.shape == ref.shape and np.array_equal(ours, ref)
        row = {"fixture": self.fixture, "check": name, "atol": 0.0, "rtol": 0.0, "ok": bool(ok)}
        if ours.shape != ref.shape:
            row["detail"] = f"shape {list(ours.shape)} != reference {list(ref.shape)}"
        elif ours.dtype.kind in "fiub" and ref.dtype.kind in "fiub":
            diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
            row["max_abs_err"] = float(diff.max()) if ref.size else 0.0
        self.rows.append(row)

    def finish(self) -> None:
        report = os.environ.get("EAGLE_PARITY_REPORT")
        if report:
            with open(report, "a") as fh:
                for row in self.rows:
                    fh.write(json.dumps(row) + "\n")
        for row in self.rows:
            print(_format_row(row))
        failed = [row for row in self.rows if not row["ok"]]
        assert self.rows, f"{self.fixture}: no comparison was made"
        assert not failed, f"{self.fixture}: {len(failed)} of {len(self.rows)} checks failed:\n" + "\n".join(
            _format_row(row) for row in failed)


def _format_row(row: dict) -> str:
    status = "ok  " if row["ok"] else "FAIL"
    err = row.get("max_abs_err")
    err_txt = "" if err is None else f" max|err|={err:.3g}"
    tol = f" (atol={row['atol']:g}, rtol={row['rtol']:g})"
    return f"{status} {row['check']}:{err_txt}{tol} {row.get('detail', '')}".rstrip()


def t32(array) -> torch.Tensor:
    """A float32 tensor; float16 fixture arrays are exact values that the reference received as float32."""
    return torch.from_numpy(np.asarray(array).astype(np.float32))


def cfg_value(z, key):
    value = z[key]
    return value.item() if value.ndim == 0 else value


def align_signs(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per batch item and column, flip our eigenvector to the reference's sign (README rule)."""
    dots = np.einsum("bnk,bnk->bk", ours.astype(np.float64), ref.astype(np.float64))
    signs = np.where(dots < 0, -1.0, 1.0)
    return ours * signs[:, None, :]


# Tolerances of the fixture README (last table).
TOL_W = {"normalized": 1e-6, "0_255": 1e-4}
TOL_RESIZE = 1e-6
TOL_ADJ = (1e-4, 1e-6)
TOL_LAP = 1e-5
TOL_SUM = (1e-4, 1e-5)
TOL_EIGVAL = 1e-5
TOL_EIGVEC = 1e-4


def _regime(name: str) -> str:
    return "0_255" if "0_255" in name else "normalized"


# --------------------------------------------------------------------------- 01 colour affinity


def check_color_affinity(z, ck: Checks) -> None:
    from eagle_dist.method.eicue import color_affinity, resize_for_color

    sigma = float(cfg_value(z, "cfg__sigma"))
    img224 = t32(z["in__img224_normalized"])
    inputs = sorted(k for k in z.files
                    if re.fullmatch(r"in__img\d+_(normalized|0_255)", k) and k != "in__img224_normalized")
    assert inputs, "no in__img{S}_<regime> inputs in the file"
    for key in inputs:
        side, regime = re.fullmatch(r"in__img(\d+)_(.+)", key).groups()
        side = int(side)
        pix = t32(z[key])
        # The resize from the 224 image: normalised values as they are; 0-255 via our rgb01 mode.
        if regime == "normalized":
            ck.close(f"resize {key}", resize_for_color(img224, side, "official"), pix, TOL_RESIZE, 0)
        else:
            ck.close(f"resize {key} (rgb01, [0,1] scale)", resize_for_color(img224, side, "rgb01"), pix / 255.0,
                     TOL_RESIZE, 0)
        W = color_affinity(pix, sigma=sigma, scale=255.0).numpy()
        atol = TOL_W[_regime(regime)]
        full_key = f"out__W{side}_{regime}"
        if full_key in z.files:
            ck.close(full_key, W, z[full_key], atol, 0)
        rows_key = f"out__W{side}_{regime}_rows"
        if rows_key in z.files:
            index = z[f"aux__W{side}_rows_index"]
            ck.close(rows_key, W[:, index, :], z[rows_key], atol, 0)
        sum_key = f"out__W{side}_{regime}_rowsum"
        if sum_key in z.files:
            ck.close(sum_key, W.astype(np.float64).sum(-1), z[sum_key], W.shape[-1] * atol, 0)
        assert full_key in z.files or rows_key in z.files, f"no reference W for {key}"


# --------------------------------------------------------------------------- 02 Laplacian / eigen


def _check_eigvecs(ck: Checks, name: str, ours, ref) -> None:
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else ours
    ck.close(f"{name} (sign-aligned)", align_signs(ours, np.asarray(ref)), ref, TOL_EIGVEC, 0)


def check_laplacian_eigen(z, ck: Checks) -> None:
    from eagle_dist.method.eicue import (apply_sign_rule, color_affinity, eigen_vectors, normalized_laplacian,
                                  resize_for_color, semantic_affinity, smallest_eigenpairs)

    K = int(cfg_value(z, "cfg__K"))

    # (a) components on full matrices, one case per recorded regime.
    cases = sorted(m.group(1) for k in z.files if (m := re.fullmatch(r"out__(.+)__lap", k)))
    assert cases, "no out__<case>__lap arrays in the file"
    for case in cases:
        grid = case.split("_")[0]  # "N196"
        code = t32(z[f"in__{grid}_code_fp16"])
        adj_ref = t32(z[f"in__{grid}_adj_code"])
        ck.close(f"in__{grid}_adj_code from fp16 code", semantic_affinity(code), adj_ref, *TOL_ADJ)
        img_keys = [k for k in z.files if re.fullmatch(rf"in__{re.escape(case)}__img\d+", k)]
        assert len(img_keys) == 1, f"expected one in__{case}__img<S> array, found {img_keys}"
        color_W_ref = t32(z[f"in__{case}__color_W"])
        ck.close(f"in__{case}__color_W from {img_keys[0]}",
                 color_affinity(t32(z[img_keys[0]])), color_W_ref, TOL_W[_regime(case)], 0)
        lap = normalized_laplacian(adj_ref, color_W_ref)
        ck.close(f"out__{case}__lap", lap, z[f"out__{case}__lap"], TOL_LAP, 0)
        ck.close(f"{case} lap symmetric", lap, lap.transpose(1, 2), 1e-6, 0)
        for solver in ("eigh", "eigh64"):
            vals, vecs = smallest_eigenpairs(lap, K, solver=solver)
            ck.close(f"out__{case}__eigvals [{solver}]", vals, z[f"out__{case}__eigvals"], TOL_EIGVAL, 0)
            _check_eigvecs(ck, f"out__{case}__eigvecs [{solver}]", apply_sign_rule(vecs), z[f"out__{case}__eigvecs"])
        raw = t32(z[f"aux__{case}__eigvecs_raw_eigh"])
        ck.equal(f"sign rule on aux__{case}__eigvecs_raw_eigh", apply_sign_rule(raw), z[f"out__{case}__eigvecs"])
        flipped = (apply_sign_rule(raw) != raw).any(dim=2).any(dim=1)
        ck.equal(f"aux__{case}__sign_flipped", flipped, z[f"aux__{case}__sign_flipped"])

    # (b) the sign rule on chosen vectors, exactly.
    ref_rule = z["out__signrule_vectors"]
    ck.equal("out__signrule_vectors",
             apply_sign_rule(t32(z["in__signrule_vectors"])[:, :, : ref_rule.shape[2]]), ref_rule)

    # (c) the full forward on the 224 image with its intermediates.
    img = t32(z["in__N784_img224"])
    code = t32(z["in__N784_code_fp16"])
    n_tokens = z["in__N784_feat"].shape[1]  # the reference reads only feat.shape[1]
    side = math.isqrt(n_tokens)
    assert side * side == n_tokens == code.shape[1], f"{n_tokens} tokens do not form the code's square grid"
    V, vals = eigen_vectors(img, code, side, K, return_eigenvalues=True)
    _check_eigvecs(ck, "out__N784_eigvecs", V, z["out__N784_eigvecs"])
    ck.close("out__N784_eigvals", vals, z["out__N784_eigvals"], TOL_EIGVAL, 0)
    V64 = eigen_vectors(img, code, side, K, solver="eigh64")
    _check_eigvecs(ck, "out__N784_eigvecs [eigh64]", V64, z["out__N784_eigvecs"])
    pix = resize_for_color(img, side)
    ck.close("out__N784_img28", pix, z["out__N784_img28"], TOL_RESIZE, 0)
    color_W = color_affinity(pix)
    lap = normalized_laplacian(semantic_affinity(code), color_W)
    lap_rows, W_rows = z["aux__N784_lap_rows_index"], z["aux__N784_lap_rows_index"]
    ck.close("out__N784_lap_rows", lap[:, lap_rows, :], z["out__N784_lap_rows"], TOL_LAP, 0)
    ck.close("out__N784_color_W_rows", color_W[:, W_rows, :], z["out__N784_color_W_rows"], TOL_W["normalized"], 0)
    ck.close("out__N784_lap_diag", torch.diagonal(lap, dim1=1, dim2=2), z["out__N784_lap_diag"], TOL_LAP, 0)
    lap64, W64 = lap.double(), color_W.double()
    ck.close("out__N784_lap_rowsum", lap64.sum(-1), z["out__N784_lap_rowsum"], *TOL_SUM)
    ck.close("out__N784_color_W_rowsum", W64.sum(-1), z["out__N784_color_W_rowsum"], *TOL_SUM)
    ck.close("out__N784_lap_sum", lap64.sum((1, 2)), z["out__N784_lap_sum"], *TOL_SUM)
    ck.close("out__N784_color_W_sum", W64.sum((1, 2)), z["out__N784_color_W_sum"], *TOL_SUM)
    ck.close("out__N784_lap_sqsum", lap64.square().sum((1, 2)), z["out__N784_lap_sqsum"], *TOL_SUM)
    ck.equal("sign rule on aux__N784_eigvecs_raw_eigh",
             apply_sign_rule(t32(z["aux__N784_eigvecs_raw_eigh"])), z["out__N784_eigvecs"])

    # (d) the forward on the small grid (the same image, resized to the codes' grid).
    code_small = t32(z["in__N196fwd_code_fp16"])
    n_small = z["in__N196fwd_feat"].shape[1]
    side_small = math.isqrt(n_small)
    assert side_small * side_small == n_small == code_small.shape[1]
    V_small, vals_small = eigen_vectors(img, code_small, side_small, K, return_eigenvalues=True)
    _check_eigvecs(ck, "out__N196fwd_eigvecs", V_small, z["out__N196fwd_eigvecs"])
    ck.close("aux__N196fwd_eigvals_first8[:K]", vals_small, z["aux__N196fwd_eigvals_first8"][:, :K], TOL_EIGVAL, 0)


# --------------------------------------------------------------------------- 03 ClusterLookup


def _parse_lookup_tag(tag: str):
    match = re.fullmatch(r"alpha(None|[0-9.]+)(?:_(probs|logprobs))?", tag)
    assert match, f"unknown ClusterLookup case tag {tag!r}"
    alpha = None if match.group(1) == "None" else float(match.group(1))
    return alpha, match.group(2) == "logprobs"


def check_cluster_lookup(z, ck: Checks) -> None:
    from eagle_dist.method.probes import ClusterLookup

    probes = sorted(m.group(1) for k in z.files if (m := re.fullmatch(r"in__(.+)_clusters", k)))
    assert probes, "no in__<probe>_clusters arrays in the file"
    for probe in probes:
        clusters, x_ref = t32(z[f"in__{probe}_clusters"]), t32(z[f"in__{probe}_x"])
        tags = sorted(m.group(1) for k in z.files if (m := re.fullmatch(rf"out__{re.escape(probe)}_(.+)_loss", k)))
        assert tags, f"no cases recorded for {probe}"
        for tag in tags:
            alpha, log_probs = _parse_lookup_tag(tag)
            lookup = ClusterLookup(clusters.shape[1], clusters.shape[0])
            with torch.no_grad():
                lookup.clusters.copy_(clusters)
            x = x_ref.clone().requires_grad_(True)
            loss, probs = lookup(x, alpha=alpha, log_probs=log_probs)
            loss.backward()
            prefix = f"out__{probe}_{tag}"
            ck.close(f"{prefix}_loss", loss, z[f"{prefix}_loss"], 1e-6, 1e-5)
            ck.close(f"{prefix}_probs", probs, z[f"{prefix}_probs"], 1e-5, 1e-5)
            ck.close(f"{prefix}_grad_clusters", lookup.clusters.grad, z[f"{prefix}_grad_clusters"], 1e-6, 1e-4)
            ck.close(f"{prefix}_grad_x", x.grad, z[f"{prefix}_grad_x"], 1e-7, 1e-4)


# --------------------------------------------------------------------------- 04 InfoNCE


def check_infonce(z, ck: Checks) -> None:
    from eagle_dist.method.losses import object_centric_nce

    datasets = sorted(m.group(1) for k in z.files if (m := re.fullmatch(r"cfg__(.+)_dataset_name", k)))
    assert datasets, "no cfg__<ds>_dataset_name in the file"
    similarity = t32(z["in__similarity_matrix"])
    for ds in datasets:
        name = str(cfg_value(z, f"cfg__{ds}_dataset_name"))
        # The reference switches on dataset_name == 'cityscapes'; the README pairs the maps likewise.
        is_cityscapes = name == "cityscapes"
        map_name = "cityscapes" if is_cityscapes else "cocostuff"
        seg_map = torch.from_numpy(z[f"in__segmentation_map_{map_name}"])
        tau = float(cfg_value(z, f"cfg__{ds}_contrastive_temp"))
        g = float(cfg_value(z, f"cfg__{ds}_global_loss_weight"))
        modes = sorted(m.group(1) for k in z.files if (m := re.fullmatch(rf"out__{re.escape(ds)}_(.+)_loss", k)))
        assert modes, f"no modes recorded for {ds}"
        for mode in modes:
            S1 = t32(z["in__S1"]).requires_grad_(True)
            S2 = t32(z["in__S2"]).requires_grad_(True)
            loss, cents = object_centric_nce(
                S1, S2, seg_map, similarity, tau=tau, global_weight=g, centroid_mode=mode,
                variant="cityscapes" if is_cityscapes else "per_pixel", return_centroids=True)
            loss.backward()
            prefix = f"out__{ds}_{mode}"
            ck.close(f"{prefix}_loss", loss, z[f"{prefix}_loss"], 1e-7, 1e-5)
            ck.close(f"{prefix}_grad_S1", S1.grad, z[f"{prefix}_grad_S1"], 1e-8, 1e-4)
            ck.close(f"{prefix}_grad_S2", S2.grad, z[f"{prefix}_grad_S2"], 1e-8, 1e-4)
            unique_key = f"aux__unique_labels_{map_name}"
            if unique_key in z.files:
                ck.equal(f"{unique_key} ({ds} {mode})", cents.ids, z[unique_key])
            before_key = f"in__{ds}_{mode}_prototypes_before"
            if before_key in z.files:
                table = t32(z[before_key]).clone()
                table[cents.ids] = S1.detach()[cents.rows]
                ck.equal(f"{prefix}_prototypes_after", table, z[f"{prefix}_prototypes_after"])
                changed = np.flatnonzero((table.numpy() != z[before_key]).any(axis=1))
                ck.equal(f"aux__{ds}_{mode}_prototype_rows_changed", changed,
                         z[f"aux__{ds}_{mode}_prototype_rows_changed"])


# --------------------------------------------------------------------------- 05 correspondence


def _corr_flags(z, ds: str) -> dict:
    return {
        "pointwise": bool(cfg_value(z, f"cfg__{ds}_pointwise")),
        "zero_clamp": bool(cfg_value(z, f"cfg__{ds}_zero_clamp")),
        "stabalize": bool(cfg_value(z, f"cfg__{ds}_stabalize")),
        "shift_value": float(cfg_value(z, f"cfg__{ds}_shift_value")),
        "shift_bias": float(cfg_value(z, f"cfg__{ds}_shift_bias")),
    }


def check_correspondence(z, ck: Checks) -> None:
    from eagle_dist.method.losses import (correspondence_helper, correspondence_loss, draw_correspondence_randomness,
                                   near_derangement)

    datasets = sorted(m.group(1) for k in z.files if (m := re.fullmatch(r"cfg__(.+)_pointwise", k)))
    assert datasets, "no cfg__<ds>_pointwise in the file"
    for ds in datasets:
        for pos in (True, False):
            prefix = f"out__helper_{ds}_POS{pos}"
            if f"{prefix}_loss" not in z.files:
                continue
            c1 = t32(z["in__helper_c1"]).requires_grad_(True)
            c2 = t32(z["in__helper_c2"]).requires_grad_(True)
            loss, cd = correspondence_helper(t32(z["in__helper_f1"]), t32(z["in__helper_f2"]), c1, c2, pos,
                                             **_corr_flags(z, ds))
            loss.mean().backward()
            ck.close(f"{prefix}_loss", loss, z[f"{prefix}_loss"], 1e-6, 1e-5)
            ck.close(f"out__helper_cd ({ds} POS{pos})", cd, z["out__helper_cd"], 1e-6, 0)
            ck.close(f"{prefix}_grad_c1", c1.grad, z[f"{prefix}_grad_c1"], 1e-9, 1e-4)
            ck.close(f"{prefix}_grad_c2", c2.grad, z[f"{prefix}_grad_c2"], 1e-9, 1e-4)

    # Forward with the recorded draws (always the cocostuff27 config, per the README).
    ds = "cocostuff27"
    samples = int(cfg_value(z, f"cfg__{ds}_feature_samples"))
    coords = tuple(t32(z[f"aux__fwd_coords{i}"]) for i in (1, 2, 3))
    perms = torch.from_numpy(z["aux__fwd_perm_neg"])
    views = [t32(z[f"in__fwd_orig_{name}"]) for name in ("feats", "feats_pos", "feats_pos_aug")]
    codes = [t32(z[f"in__fwd_orig_{name}"]) for name in ("code", "code_pos", "code_pos_aug")]
    out = correspondence_loss(*views, *codes, feature_samples=samples, neg_samples=perms.shape[0],
                              coords=coords, perms=perms, **_corr_flags(z, ds))
    ck.close("out__fwd_pos_inter_loss_mean", out["pos_inter_loss"], z["out__fwd_pos_inter_loss_mean"], 1e-7, 1e-5)
    ck.close("out__fwd_pos_inter_cd", out["pos_inter_cd"], z["out__fwd_pos_inter_cd"], 1e-6, 0)
    ck.close("out__fwd_neg_inter_loss", out["neg_inter_loss_map"], z["out__fwd_neg_inter_loss"], 1e-6, 0)
    ck.close("out__fwd_neg_inter_cd", out["neg_inter_cd"], z["out__fwd_neg_inter_cd"], 1e-6, 0)
    ck.close("out__fwd_neg_inter_loss_mean", out["neg_inter_loss"], z["out__fwd_neg_inter_loss_mean"], 1e-7, 1e-5)

    # Our own draws follow the reference's RNG order: a generator seeded like the recording
    # reproduces the recorded coordinates and permutations.
    batch = views[0].shape[0]
    gen = torch.Generator().manual_seed(int(cfg_value(z, "cfg__fwd_seed")))
    drawn_coords, drawn_perms = draw_correspondence_randomness(batch, samples, perms.shape[0], generator=gen)
    for i, c in enumerate(drawn_coords, start=1):
        ck.equal(f"aux__fwd_coords{i} redrawn from cfg__fwd_seed", c, z[f"aux__fwd_coords{i}"])
    ck.equal("aux__fwd_perm_neg redrawn from cfg__fwd_seed", drawn_perms, z["aux__fwd_perm_neg"])
    ck.equal("aux__super_perm_dup_output", near_derangement(torch.from_numpy(z["aux__super_perm_dup_randperm"])),
             z["aux__super_perm_dup_output"])


# --------------------------------------------------------------------------- 06 metrics


def _check_hungarian(ck: Checks, z, prefix: str, preds: np.ndarray, n: int, e: int, with_t: bool) -> None:
    from eagle_dist.evaluation.metrics import ConfusionMatrix, hungarian_metrics

    target = torch.from_numpy(z["in__target"])
    cm = ConfusionMatrix(n, e)
    # Two updates (first item, then the rest) as the recording did: accumulation is additive.
    cm.update(torch.from_numpy(preds[:1]), target[:1])
    cm.update(torch.from_numpy(preds[1:]), target[1:])
    stats = cm.official_stats()
    ck.equal(f"{prefix}_stats", stats, z[f"{prefix}_stats"])
    res = hungarian_metrics(stats, n, e)
    ck.equal(f"{prefix}_assignments_rows", res["assignments"][0], z[f"{prefix}_assignments_rows"])
    ck.equal(f"{prefix}_assignments_cols", res["assignments"][1], z[f"{prefix}_assignments_cols"])
    if with_t:
        ck.equal(f"{prefix}_assignments_t_rows", res["assignments_t"][0], z[f"{prefix}_assignments_t_rows"])
        ck.equal(f"{prefix}_assignments_t_cols", res["assignments_t"][1], z[f"{prefix}_assignments_t_cols"])
    ck.equal(f"{prefix}_histogram", res["histogram"], z[f"{prefix}_histogram"])
    if f"{prefix}_iou" in z.files:
        ck.close(f"{prefix}_iou", res["iou"], z[f"{prefix}_iou"], 1e-6, 0, equal_nan=True)
    ck.close(f"{prefix}_mIoU", res["mIoU"], z[f"{prefix}_mIoU"], 1e-4, 0)
    ck.close(f"{prefix}_Accuracy", res["Accuracy"], z[f"{prefix}_Accuracy"], 1e-4, 0)
    ck.equal(f"{prefix}_map_clusters_arange", res["cluster_to_class"][np.arange(n + e)],
             z[f"{prefix}_map_clusters_arange"])


def _check_linear(ck: Checks, z, prefix: str, preds: np.ndarray, n: int) -> None:
    from eagle_dist.evaluation.metrics import ConfusionMatrix, linear_metrics

    cm = ConfusionMatrix(n, 0)
    cm.update(torch.from_numpy(preds), torch.from_numpy(z["in__target"]))
    stats = cm.official_stats()
    ck.equal(f"{prefix}_stats", stats, z[f"{prefix}_stats"])
    res = linear_metrics(stats)
    if f"{prefix}_histogram" in z.files:
        ck.equal(f"{prefix}_histogram", res["histogram"], z[f"{prefix}_histogram"])
    if f"{prefix}_iou" in z.files:
        ck.close(f"{prefix}_iou", res["iou"], z[f"{prefix}_iou"], 1e-6, 0, equal_nan=True)
    ck.close(f"{prefix}_mIoU", res["mIoU"], z[f"{prefix}_mIoU"], 1e-4, 0)
    ck.close(f"{prefix}_Accuracy", res["Accuracy"], z[f"{prefix}_Accuracy"], 1e-4, 0)


def check_metrics(z, ck: Checks) -> None:
    n = int(cfg_value(z, "cfg__n_classes"))
    e = int(cfg_value(z, "cfg__extra_clusters"))
    _check_hungarian(ck, z, "out__cluster", z["in__preds"], n, e, with_t="out__cluster_assignments_t_rows" in z.files)
    _check_linear(ck, z, "out__linear", z["in__preds"], n)
    _check_linear(ck, z, "out__linear2", z["in__preds_linear"], n)
    _check_hungarian(ck, z, "out__B_cluster", z["in__preds_B"], n, e,
                     with_t="out__B_cluster_assignments_t_rows" in z.files)


# --------------------------------------------------------------------------- 07 DINO featurizer


def _dequantised(z, group: str, keys) -> dict:
    return {
        str(k): torch.from_numpy(
            (z[f"in__{group}_offset__{k}"] + z[f"in__{group}_q__{k}"].astype(np.float32) * z[f"in__{group}_scale__{k}"])
            .astype(np.float32))
        for k in keys
    }


def _official_featurizer(vit_sd: dict, head_sd: dict, arch: str):
    """The official ``DinoFeaturizer`` in eval mode, from in-memory state dicts (official key
    names): img -> image_kk (keys), image_feat (normed block outputs) and the head applied to
    both (``code_kk`` is what training uses; ``code`` feeds the official dead branch)."""
    import warnings

    from eagle_dist.method.backbone import FrozenViT
    from eagle_dist.method.heads import SegHead

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no file on purpose: the weights come next
        vit = FrozenViT(arch, weights=None)
    vit.vit.load_state_dict({k: torch.as_tensor(v) for k, v in vit_sd.items()}, strict=True)
    dim, in_ch = head_sd["cluster1.0.weight"].shape[:2]
    head = SegHead(in_ch, dim).eval()
    head.load_state_dict({k: torch.as_tensor(v) for k, v in head_sd.items()}, strict=True)

    @torch.no_grad()
    def forward(img: torch.Tensor) -> dict[str, torch.Tensor]:
        image_kk, image_feat = vit.forward_with_tokens(img)
        return {"image_kk": image_kk, "image_feat": image_feat, "code_kk": head(image_kk), "code": head(image_feat)}

    return forward


def check_dino_featurizer(z, ck: Checks) -> None:
    vit_sd = _dequantised(z, "vit", z["aux__vit_keys"])
    head_sd = _dequantised(z, "head", z["aux__head_keys"])
    forward_parity = _official_featurizer(vit_sd, head_sd, arch="vit_small_patch8_224")
    tol = (1e-4, 1e-4)
    with torch.no_grad():
        out = forward_parity(t32(z["in__img224"]))
        ck.close("out__image_kk", out["image_kk"], z["out__image_kk"], *tol)
        ck.close("out__code_kk", out["code_kk"], z["out__code_kk"], *tol)
        for key in z.files:
            match = re.fullmatch(r"out__(image_feat|code)_sub(\d+)", key)
            if match:
                step = int(match.group(2))
                ck.close(key, out[match.group(1)][:, :, ::step, ::step], z[key], *tol)
        feat = out["image_feat"]
        n_patches = feat.shape[2] * feat.shape[3]
        ck.close("out__image_feat_sum_hw", feat.double().sum(dim=(2, 3)), z["out__image_feat_sum_hw"],
                 n_patches * tol[0], tol[1])
        # Optional extras, checked when the featurizer reports them.
        for name in ("cls_token_final", "attn_last_cls_row"):
            if name in out and f"out__{name}" in z.files:
                ck.close(f"out__{name}", out[name], z[f"out__{name}"], *tol)
        small = forward_parity(t32(z["in__img48x64"]))
        for name in ("image_feat", "image_kk", "code_kk", "code"):
            if f"out__small_{name}" in z.files:
                ck.close(f"out__small_{name}", small[name], z[f"out__small_{name}"], *tol)


# --------------------------------------------------------------------------- 08 five-crop


def check_five_crop(z, ck: Checks) -> None:
    from eagle_dist.data.sources import five_crop_boxes

    # Stored as float32; the reference used the YAML's decimal (0.5, 0.6, ...): take the shortest
    # decimal that rounds to the stored value so that int(H * ratio) truncates like the reference.
    ratio = float(str(np.float32(cfg_value(z, "cfg__crop_ratio"))))
    sizes = [m.groups() for k in z.files if (m := re.fullmatch(r"out__boxes_(\d+)x(\d+)", k))]
    assert sizes, "no out__boxes_{H}x{W} arrays in the file"
    for h_txt, w_txt in sizes:
        H, W = int(h_txt), int(w_txt)
        boxes = np.asarray(five_crop_boxes(H, W, ratio), dtype=np.int64)
        ck.equal(f"out__boxes_{H}x{W}", boxes, z[f"out__boxes_{H}x{W}"])
        ck.equal(f"out__size_{H}x{W} (height, width of the boxes)", boxes[:, 2:],
                 np.tile(z[f"out__size_{H}x{W}"], (5, 1)))


# --------------------------------------------------------------------------- dispatch

CHECKERS = {
    "color_affinity": check_color_affinity,
    "laplacian_eigen": check_laplacian_eigen,
    "cluster_lookup": check_cluster_lookup,
    "infonce": check_infonce,
    "correspondence": check_correspondence,
    "metrics": check_metrics,
    "dino_featurizer": check_dino_featurizer,
    "five_crop": check_five_crop,
}


def component_of(path: Path) -> str:
    return re.sub(r"^\d+_", "", path.stem)


def test_fixture_folder_has_fixtures():
    assert FIXTURE_DIR.is_dir(), (f"parity fixture folder {FIXTURE_DIR} does not exist; set EAGLE_PARITY_FIXTURES "
                                  "to the folder holding the *.npz fixtures")
    assert FIXTURES, f"no *.npz fixtures in {FIXTURE_DIR}"


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_parity(path: Path):
    component = component_of(path)
    checker = CHECKERS.get(component)
    if checker is None:
        pytest.fail(f"{path.name}: no parity checker for component {component!r} (known: {sorted(CHECKERS)})")
    torch.manual_seed(0)  # nothing should depend on it; keeps stray initialisations reproducible
    with np.load(path, allow_pickle=False) as z:
        ck = Checks(path.name)
        checker(z, ck)
        ck.finish()
