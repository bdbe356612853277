"""EiCue: the spectral pseudo-segmentation of EAGLE (ALGORITHM.md section 4).

Per image, a dense graph W = A_seg + A_color over the N = h*w patch tokens is turned into
a symmetric normalised Laplacian, whose K smallest eigenvectors (after the official sign
rule) are the spectral embedding. Dropping the first (trivial) vector gives the [B, K-1, h, w]
map that the eigen cluster probe clusters into the EiCue segments. Nothing here carries
gradient: the reference detaches the graph before the eigensolver.

Run the parity checks of this module with

    .venv/bin/python -m pytest tests/parity/test_parity.py -k "color_affinity or laplacian_eigen"

Quick use::

    from eagle_dist.method.eicue import EiCue
    spectral_BKhw = EiCue(k=4)(img_B3HW, code_BDhw)        # [B, 3, h, w]
"""

from __future__ import annotations

import contextlib
import typing

import torch
import torch.nn.functional as F
from torch import nn

from eagle_dist import profiling
from eagle_dist.config import ColorMode, EiCueConfig, EigenSolver, SignRule
from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD
from eagle_dist.method.eigensolvers import block_krylov_smallest

__all__ = [
    "COLOR_MODES",
    "EIGEN_SOLVERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SIGN_RULES",
    "EiCue",
    "apply_sign_rule",
    "color_affinity",
    "color_term",
    "eigen_vectors",
    "normalized_laplacian",
    "resize_for_color",
    "semantic_affinity",
    "smallest_eigenpairs",
    "spectral_map",
]


COLOR_MODES = typing.get_args(ColorMode)
EIGEN_SOLVERS = typing.get_args(EigenSolver)
SIGN_RULES = typing.get_args(SignRule)

# The reference divides pixels by 255 (it was written for 0-255 input); with `rgb01` the
# pixels are already in [0, 1], so the kernel must not divide again.
_COLOR_SCALE = {"official": 255.0, "rgb01": 1.0}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {allowed}")


def _grid_size(side) -> tuple[int, int]:
    h, w = (side, side) if isinstance(side, int) else tuple(side)
    if h < 1 or w < 1:
        raise ValueError(f"token grid size must be positive, got {side}")
    return int(h), int(w)


def resize_for_color(img_B3HW: torch.Tensor, side, mode: str = "official") -> torch.Tensor:
    """Resize an ImageNet-normalised batch to the token grid, channel-last, for the colour graph.

    ``side`` is an int (square grid, as in the reference) or ``(h, w)``. Bilinear,
    ``align_corners=False``, no antialiasing (what the reference's ``F.interpolate`` does).
    Returns ``[B, h, w, 3]``.

    Quirk 7 (ALGORITHM.md section 12), selected by ``mode``:

    * ``"official"`` (default, parity): the pixels stay ImageNet-normalised (about -2.1 to 2.6).
      :func:`color_affinity` then divides them by 255 as the reference does, so colour distances
      are tiny and the colour affinity is almost a constant matrix.
    * ``"rgb01"`` (the fixed behaviour): the image is first de-normalised to RGB in [0, 1];
      use ``scale=1`` in :func:`color_affinity` (``eigen_vectors`` does), which makes
      sigma = 0.1 a sharp colour kernel. This changes results; it is an ablation, not parity.
    """
    _check_choice("mode", mode, COLOR_MODES)
    if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3:
        raise ValueError(f"resize_for_color expects an RGB batch [B, 3, H, W], got {tuple(img_B3HW.shape)}")
    img = img_B3HW.float()
    if mode == "rgb01":
        mean = img.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = img.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        img = img * std + mean
    small = F.interpolate(img, size=_grid_size(side), mode="bilinear", align_corners=False, antialias=False)
    return small.permute(0, 2, 3, 1).contiguous()


def color_affinity(pix_BSS3: torch.Tensor, sigma: float = 0.1, scale: float = 255.0) -> torch.Tensor:
    """Dense Gaussian colour affinity between all pixel pairs: ``[B, h, w, 3] -> [B, N, N]``, N = h*w.

    ``W[b, i, j] = exp(-||p_i/scale - p_j/scale||^2 / (2 sigma^2))`` with pixel index
    ``row * w + col``. There is no spatial window. The squared distance is summed from exact
    per-channel differences (three passes over [B, N, N]) rather than the reference's matmul
    expansion, so ours is the more accurate of the two; they agree within the fixture
    tolerances in both the normalised and the 0-255 regime.
    """
    if pix_BSS3.ndim != 4 or pix_BSS3.shape[-1] != 3:
        raise ValueError(f"color_affinity expects channel-last pixels [B, h, w, 3], got {tuple(pix_BSS3.shape)}")
    batch = pix_BSS3.shape[0]
    pix_BN3 = pix_BSS3.reshape(batch, -1, 3) / scale
    dist2_BNN: torch.Tensor | None = None
    for channel in range(3):
        col_BN = pix_BN3[:, :, channel]
        diff_BNN = col_BN.unsqueeze(2) - col_BN.unsqueeze(1)
        dist2_BNN = diff_BNN.square_() if dist2_BNN is None else dist2_BNN.add_(diff_BNN.square_())
    assert dist2_BNN is not None
    return dist2_BNN.div_(-2.0 * sigma * sigma).exp_()


def semantic_affinity(code_BND: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) code Gram matrix ``code @ code^T``: ``[B, N, D] -> [B, N, N]``.

    The matrix is symmetric: the first half of its rows and the lower-right block are
    multiplied, and the lower-left block is the upper-right one transposed (3/4 of the
    products; 130 -> 102 ms at batch 32 on the development machine, the same values there).
    """
    if code_BND.ndim != 3:
        raise ValueError(f"semantic_affinity expects codes [B, N, D], got {tuple(code_BND.shape)}")
    b, n, _ = code_BND.shape
    half = n // 2
    if half == 0 or (code_BND.requires_grad and torch.is_grad_enabled()):
        return torch.bmm(code_BND, code_BND.transpose(1, 2))
    out = code_BND.new_empty((b, n, n))
    torch.bmm(code_BND[:, :half], code_BND.transpose(1, 2), out=out[:, :half])
    torch.bmm(code_BND[:, half:], code_BND[:, half:].transpose(1, 2), out=out[:, half:, half:])
    out[:, half:, :half] = out[:, :half, half:].transpose(1, 2)
    return out


def _divide_by_own_max(mat_BNN: torch.Tensor) -> torch.Tensor:
    # The reference divides by the per-image maximum unconditionally (0/0 = NaN for an all-zero
    # matrix). We keep an all-zero matrix at zero instead; that case never occurs with parity
    # inputs (the colour kernel's maximum is ~1 and codes have positive self-similarity).
    peak_B11 = mat_BNN.amax(dim=(1, 2), keepdim=True)
    peak_B11 = torch.where(peak_B11 > 0, peak_B11, torch.ones_like(peak_B11))
    return mat_BNN.div_(peak_B11)


def color_term(img_B3HW: torch.Tensor, n_side, color_mode: str = "official", sigma: float = 0.1) -> torch.Tensor:
    """The colour half of the graph, ready to add: the colour affinity of the image resized to the
    token grid, divided by its own maximum (``[B, N, N]``).  It depends on the image only, so a
    step whose two views take their colours from the same image computes it once
    (`EagleHeads.forward`); :func:`normalized_laplacian` takes it through ``color_term_BNN``."""
    with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
        pix_BSS3 = resize_for_color(img_B3HW, _grid_size(n_side), color_mode)
        return _divide_by_own_max(color_affinity(pix_BSS3, sigma=sigma, scale=_COLOR_SCALE[color_mode]))


def normalized_laplacian(adj_code_BNN: torch.Tensor, color_W_BNN: torch.Tensor | None = None, *,
                         color_term_BNN: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric normalised Laplacian of ``clamp(adj)/max + color_W/max``: ``lap = D^-1/2 (D - W) D^-1/2``.

    Per image: negative entries of ``adj_code`` are set to 0, each matrix is divided by its own
    maximum, the two are added, degrees below 1e-12 become 1, and the scaling by ``1/sqrt(d)``
    is applied elementwise on rows and columns. The reference builds dense diagonal matrices and
    inverts one (quirk 5); this is the same number per entry without any inverse.
    Pass either the colour affinity ``color_W_BNN`` or its :func:`color_term` (already divided
    by its maximum, e.g. shared by two views); the result is the same bit for bit.
    """
    if (color_W_BNN is None) == (color_term_BNN is None):
        raise ValueError("normalized_laplacian needs exactly one of color_W_BNN and color_term_BNN")
    color = color_W_BNN if color_W_BNN is not None else color_term_BNN
    assert color is not None
    if adj_code_BNN.shape != color.shape or adj_code_BNN.ndim != 3:
        raise ValueError(
            "normalized_laplacian needs two [B, N, N] matrices of the same shape, got "
            f"{tuple(adj_code_BNN.shape)} and {tuple(color.shape)}; the colour image must be "
            "resized to the token grid of the codes"
        )
    weights_BNN = _divide_by_own_max(adj_code_BNN.clamp(min=0))
    weights_BNN.add_(_divide_by_own_max(color.clone()) if color_W_BNN is not None else color)
    degree_BN = weights_BNN.sum(dim=-1)
    degree_BN = torch.where(degree_BN < 1e-12, torch.ones_like(degree_BN), degree_BN)
    inv_sqrt_BN = 1.0 / degree_BN.sqrt()
    lap_BNN = weights_BNN.neg_()
    lap_BNN.diagonal(dim1=1, dim2=2).add_(degree_BN)
    # (L_ij * r_i) * r_j: the same rounding order as the reference's D^-1/2 @ L @ D^-1/2.
    return lap_BNN.mul_(inv_sqrt_BN.unsqueeze(2)).mul_(inv_sqrt_BN.unsqueeze(1))


def smallest_eigenpairs(lap_BNN: torch.Tensor, k: int, solver: str = "eigh") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest eigenpairs of a batch of symmetric matrices: ``(vals [B,k], vecs [B,N,k])``.

    Autocast is switched off so the decomposition always runs in float32, whatever the caller's
    mixed-precision context. ``solver="eigh"`` is the reference's float32 ``torch.linalg.eigh``
    (upper triangle); ``"eigh64"`` decomposes in float64 and casts back to float32 (more accurate;
    column signs may differ from float32, which the sign rule and parity alignment absorb).
    ``"krylov"`` is the fast float32 block Krylov solver of :mod:`eagle_dist.method.eigensolvers`, which
    computes only the ``k`` wanted pairs (accuracy and speed: ``python -m eagle_dist.bench eigen``).
    The signs of the columns are whatever the solver returns; apply :func:`apply_sign_rule` next.
    """
    _check_choice("solver", solver, EIGEN_SOLVERS)
    if lap_BNN.ndim != 3 or lap_BNN.shape[1] != lap_BNN.shape[2]:
        raise ValueError(f"smallest_eigenpairs expects square matrices [B, N, N], got {tuple(lap_BNN.shape)}")
    if not 1 <= k <= lap_BNN.shape[1]:
        raise ValueError(f"k={k} eigenpairs requested from {lap_BNN.shape[1]}x{lap_BNN.shape[1]} matrices")
    if solver == "krylov":
        with torch.autocast(device_type=lap_BNN.device.type, enabled=False):
            return block_krylov_smallest(lap_BNN.float(), k)
    work_dtype = torch.float64 if solver == "eigh64" else torch.float32
    with torch.autocast(device_type=lap_BNN.device.type, enabled=False):
        vals_BN, vecs_BNN = torch.linalg.eigh(lap_BNN.to(work_dtype), UPLO="U")
    vals_Bk = vals_BN[:, :k].to(torch.float32).contiguous()
    vecs_BNk = vecs_BNN[:, :, :k].to(torch.float32).contiguous()
    return vals_Bk, vecs_BNk


def apply_sign_rule(V_BNK: torch.Tensor, rule: str = "official") -> torch.Tensor:
    """Fix the signs of eigenvectors ``[B, N, K]`` (an eigensolver returns each column up to sign).

    ``"official"`` (EAGLE's convention, ``eicue.sign_rule``): negate the whole ``[N, K]`` block of
    an image when ``0.5 < fraction of strictly positive entries < 1``.  Strict inequalities: a
    block with exactly half positive entries, or all positive, is left as it is.  The fraction is
    compared with integer counts, which is exact (the reference's float mean gives the same
    decisions for any N*K below 2^23).  One decision for the block means a column keeps the sign
    the solver gave it relative to the others, so two solvers can disagree on a column's sign.

    ``"per_vector"``: each column is negated where its largest-magnitude entry is negative, which
    fixes every eigenvector's sign independently of the solver (ties of magnitude go to the first
    row; eigenvectors of a repeated eigenvalue are not unique, no sign rule can align those).
    """
    _check_choice("sign_rule", rule, SIGN_RULES)
    if V_BNK.ndim != 3:
        raise ValueError(f"apply_sign_rule expects eigenvectors [B, N, K], got {tuple(V_BNK.shape)}")
    if rule == "per_vector":
        peak_B1K = V_BNK.gather(1, V_BNK.abs().argmax(dim=1, keepdim=True))
        return torch.where(peak_B1K < 0, -V_BNK, V_BNK)
    total = V_BNK.shape[1] * V_BNK.shape[2]
    positive_B = (V_BNK > 0).sum(dim=(1, 2))
    flip_B = (2 * positive_B > total) & (positive_B < total)
    return torch.where(flip_B.view(-1, 1, 1), -V_BNK, V_BNK)


@torch.no_grad()
def eigen_vectors(
    img_B3HW: torch.Tensor,
    code_BND: torch.Tensor,
    n_side,
    k: int,
    color_mode: str = "official",
    solver: str = "eigh",
    sigma: float = 0.1,
    return_eigenvalues: bool = False,
    sign_rule: str = "official",
    color_term_BNN: torch.Tensor | None = None,
):
    """The reference's ``EigenLoss.forward``: spectral embedding ``V [B, N, K]`` of each image's graph.

    ``img_B3HW`` is the ImageNet-normalised image used for colour (the reference always passes
    ``img``, also for the augmented view: quirk 8), ``code_BND`` the head output with tokens in
    row-major order. ``n_side`` is the token grid: an int for the reference's square grid
    (N = n_side^2) or ``(h, w)`` (N = h*w); the colour image is resized to it.
    Everything runs in float32 without gradient and without autocast.
    With ``return_eigenvalues`` it returns ``(V, eigenvalues [B, K])``.  ``sign_rule``: see
    :func:`apply_sign_rule`.  ``color_term_BNN``: the image's :func:`color_term` when the caller
    already has it (``img_B3HW`` is then only checked, not used).
    """
    _check_choice("color_mode", color_mode, COLOR_MODES)
    _check_choice("sign_rule", sign_rule, SIGN_RULES)
    h, w = _grid_size(n_side)
    if code_BND.ndim != 3 or code_BND.shape[1] != h * w:
        raise ValueError(
            f"codes must be [B, h*w, D] for a {h}x{w} token grid, got {tuple(code_BND.shape)}; "
            "flatten the [B, D, h, w] head output with permute(0, 2, 3, 1).reshape(B, h*w, D)"
        )
    if img_B3HW.shape[0] != code_BND.shape[0]:
        raise ValueError(f"batch mismatch: {img_B3HW.shape[0]} images for {code_BND.shape[0]} code maps")
    # profiling.section: timing for `python -m eagle_dist.bench step`; no-ops otherwise.
    with torch.autocast(device_type=code_BND.device.type, enabled=False):
        with profiling.section("eicue.affinities"):
            if color_term_BNN is None:
                color_term_BNN = color_term(img_B3HW, (h, w), color_mode, sigma)
            adj_BNN = semantic_affinity(code_BND.float())
        with profiling.section("eicue.laplacian"):
            lap_BNN = normalized_laplacian(adj_BNN, color_term_BNN=color_term_BNN)
            del adj_BNN
        with profiling.section("eicue.eigensolver"):
            vals_BK, vecs_BNK = smallest_eigenpairs(lap_BNN, k, solver)
            vecs_BNK = apply_sign_rule(vecs_BNK, sign_rule)
    return (vecs_BNK, vals_BK) if return_eigenvalues else vecs_BNK


def spectral_map(V_BNK: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Drop the first (trivial) eigenvector and lay the rest out as a map: ``[B, N, K] -> [B, K-1, h, w]``."""
    batch, n_tokens, k = V_BNK.shape
    if n_tokens != h * w:
        raise ValueError(f"{n_tokens} eigenvector rows cannot be laid out as a {h}x{w} map")
    return V_BNK[:, :, 1:].reshape(batch, h, w, k - 1).permute(0, 3, 1, 2)


class EiCue(nn.Module):
    """Turns a view's head output into its spectral map ``[B, K-1, h, w]`` (no parameters, no gradient).

    ``k`` is the number of eigenvectors kept before dropping the trivial one (``eigen_cluster``,
    4 in the official configs). ``color_mode`` selects quirk 7 (see :func:`resize_for_color`),
    ``solver`` the eigensolver (see :func:`smallest_eigenpairs`), ``sign_rule`` how the
    eigenvectors' signs are fixed (see :func:`apply_sign_rule`). The eigen cluster probe
    (:class:`eagle_dist.method.probes.ClusterLookup`) then turns the map into EiCue segment ids.
    """

    def __init__(self, k: int = 4, color_mode: str = "official", solver: str = EiCueConfig.solver, sigma: float = 0.1,
                 sign_rule: str = EiCueConfig.sign_rule):
        super().__init__()
        _check_choice("color_mode", color_mode, COLOR_MODES)
        _check_choice("solver", solver, EIGEN_SOLVERS)
        _check_choice("sign_rule", sign_rule, SIGN_RULES)
        if k < 2:
            raise ValueError(f"EiCue needs k >= 2 eigenvectors (the first one is dropped), got k={k}")
        self.k = k
        self.color_mode = color_mode
        self.solver = solver
        self.sigma = sigma
        self.sign_rule = sign_rule

    @classmethod
    def from_config(cls, section: EiCueConfig, k: int) -> EiCue:
        """The EiCue of a config's ``eicue`` section; ``k`` is ``model.eigen_k``."""
        return cls(k=k, color_mode=section.color_mode, solver=section.solver, sigma=section.color_sigma,
                   sign_rule=section.sign_rule)

    def vectors(self, img_B3HW: torch.Tensor, code_BND: torch.Tensor, grid: tuple[int, int],
                color_term_BNN: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`eigen_vectors` with this module's settings: ``V [B, N, k]``."""
        return eigen_vectors(img_B3HW, code_BND, grid, self.k, self.color_mode, self.solver, self.sigma,
                             sign_rule=self.sign_rule, color_term_BNN=color_term_BNN)

    @torch.no_grad()
    def color_term(self, img_B3HW: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """:func:`color_term` with this module's settings (to share between views of one image)."""
        return color_term(img_B3HW.float(), grid, self.color_mode, self.sigma)

    @contextlib.contextmanager
    def using_solver(self, solver: str):
        """Solve with `solver` inside the block, the configured one again after it (the trainer's
        float64 retry of a failed decomposition)."""
        _check_choice("solver", solver, EIGEN_SOLVERS)
        before, self.solver = self.solver, solver
        try:
            yield
        finally:
            self.solver = before

    def extra_repr(self) -> str:
        return (f"k={self.k}, color_mode={self.color_mode!r}, solver={self.solver!r}, sigma={self.sigma}, "
                f"sign_rule={self.sign_rule!r}")

    @torch.no_grad()
    def forward(self, img_B3HW: torch.Tensor, code_BDhw: torch.Tensor) -> torch.Tensor:
        batch, _, h, w = code_BDhw.shape
        code_BND = code_BDhw.detach().permute(0, 2, 3, 1).reshape(batch, h * w, -1)
        return spectral_map(self.vectors(img_B3HW, code_BND, (h, w)), h, w)

