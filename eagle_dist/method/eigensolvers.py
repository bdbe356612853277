"""A fast solver for the few smallest eigenpairs of batched normalised graph Laplacians.

EiCue needs only the K = 4 smallest eigenpairs of each ``784 x 784`` Laplacian, while the parity
solver (batched ``torch.linalg.eigh``) computes all 784. The eigenvalues of a normalised
Laplacian lie in [0, 2], so its smallest eigenpairs are the largest of the normalised adjacency
``A = I - L = D^-1/2 W D^-1/2`` (eigenvalues in [-1, 1]). :func:`block_krylov_smallest` builds a
block Krylov space ``[X, A X, ..., A^s X]`` with full re-orthogonalisation (block Lanczos) using
one batched matmul with L per step, and extracts Ritz pairs from it (Rayleigh-Ritz on the small
projected matrix). The Krylov space holds the best polynomial filter of its degree, so no spectral
bounds or shifts have to be guessed; on EAGLE's graphs (a dense, nearly constant colour kernel plus
the clamped code Gram) the wanted part of A's spectrum stands far above a bulk squeezed around 0,
which is why a few steps suffice.

Use it through EiCue (``eicue.solver=krylov`` in the config) or directly::

    from eagle_dist.method.eigensolvers import block_krylov_smallest
    vals_BK, vecs_BNK = block_krylov_smallest(lap_BNN, k=4)

Accuracy, speed and EiCue-map agreement against ``eigh`` are measured by
``python -m eagle_dist.bench eigen``; the unit tests are ``tests/unit/test_eigensolvers.py``.

Notes:

* Deterministic: the random start block comes from a private generator seeded with ``seed``;
  the global RNG stream is not touched, so switching solvers does not shift training's draws.
* Eigenvectors are defined up to sign (and, for repeated eigenvalues, up to a rotation inside
  their eigenspace). Like any solver, this one returns its own signs; apply the EAGLE sign rule
  after it, as with ``eigh``.
* Convergence is checked per image from the Ritz residuals ``|A u - mu u|`` (no extra pass over
  L): an image is done once its largest residual is below ``tol`` times the gap between the K-th
  and (K+1)-th Ritz values, or has reached the rounding floor and stopped shrinking. Converged
  images leave the batch; images still unconverged after ``max_steps`` are solved by dense
  ``eigh`` (``fallback``), so a pathological graph costs time, never accuracy.
"""

from __future__ import annotations

import math

import torch

__all__ = ["KrylovInfo", "block_krylov_smallest"]

# Default Krylov shape, tuned with ``python -m eagle_dist.bench eigen`` on EAGLE Laplacians
# (ViT-S/8, 784 tokens): block 4; EAGLE graphs converge after 4-6 steps, random block-model
# graphs with a small eigengap after 12-16; the rest fall back to dense eigh.
DEFAULT_BLOCK = 4
DEFAULT_MIN_STEPS = 4
DEFAULT_MAX_STEPS = 16
# Residual tolerance relative to the K / K+1 Ritz gap: a subspace error of about this size,
# comparable to what float32 eigh itself achieves on these matrices (~1e-4).
DEFAULT_TOL = 1e-4
# Residuals are computed in the working precision: in float32 they bottom out near 5 ulp of |A| = 1
# however converged the vectors are, so a residual within 10 ulp counts as converged (the
# vectors' error is then bounded by that floor over the gap, as for eigh in float32).
_RESIDUAL_FLOOR_ULPS = 10.0


class KrylovInfo(dict):
    """Diagnostics of one solve, per image: ``steps`` ``[B]`` Krylov steps taken, ``converged`` ``[B]``
    whether the tolerance was met, ``fallback`` ``[B]`` whether dense eigh solved it instead (these
    three on the CPU), ``residual`` ``[B, k]`` Ritz residual norms ``|A u - mu u|``, ``gap`` ``[B]``
    the gap between Ritz values k and k+1 of A (unset for dense solves)."""


def _orthonormalize_against(rows_BbN: torch.Tensor, basis_BmN: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal rows spanning ``rows`` minus its part in the span of ``basis`` (both row blocks).

    Classical Gram-Schmidt twice, a QR, then one more projection and QR: the second round makes
    the new block orthogonal to the basis to working precision even when the first projection
    left mostly rounding noise (an exhausted Krylov space, e.g. a graph of a few constant
    blocks), where a single QR of the remainder would not be orthogonal to the basis.
    """
    def qr_rows(z_BbN):
        return torch.linalg.qr(z_BbN.mT).Q.mT.contiguous()

    if basis_BmN is None:
        return qr_rows(rows_BbN)
    z_BbN = rows_BbN
    for _ in range(2):
        z_BbN = z_BbN - (z_BbN @ basis_BmN.mT) @ basis_BmN
    q_BbN = qr_rows(z_BbN)
    q_BbN = q_BbN - (q_BbN @ basis_BmN.mT) @ basis_BmN
    return qr_rows(q_BbN)


def _start_block(lap_BNN: torch.Tensor, width: int, init_BNj: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Random start rows ``[B, width, N]``: the constant vector, then Gaussian rows (or ``init``)."""
    batch, n, _ = lap_BNN.shape
    gen = torch.Generator(device=lap_BNN.device).manual_seed(seed)
    start_BbN = torch.randn(batch, width, n, generator=gen, device=lap_BNN.device, dtype=lap_BNN.dtype)
    # The constant vector is the trivial eigenvector D^1/2 1 up to the spread of the degrees:
    # seeding it saves the steps the Krylov space would spend finding that vector.
    start_BbN[:, 0, :] = 1.0 / math.sqrt(n)
    if init_BNj is not None:
        used = min(init_BNj.shape[2], width)
        start_BbN[:, :used, :] = init_BNj[:, :, :used].mT.to(start_BbN.dtype)
    return start_BbN


@torch.no_grad()
def block_krylov_smallest(
    lap_BNN: torch.Tensor,
    k: int,
    *,
    block: int = DEFAULT_BLOCK,
    min_steps: int = DEFAULT_MIN_STEPS,
    max_steps: int = DEFAULT_MAX_STEPS,
    tol: float = DEFAULT_TOL,
    fallback: bool = True,
    init: torch.Tensor | None = None,
    seed: int = 0,
    return_info: bool = False,
):
    """The ``k`` smallest eigenpairs of symmetric matrices with spectrum in [0, 2] (normalised
    Laplacians): ``(vals [B, k] ascending, vecs [B, N, k])``, in the dtype of ``lap_BNN``.

    Args:
        lap_BNN: ``[B, N, N]`` symmetric. Only products ``L @ X`` are used, so the solver reads the
            whole matrix (not a triangle); the Laplacians EiCue builds are symmetric to rounding.
        k: number of eigenpairs; ``block`` must be at least ``k``.
        block: Krylov block width (vectors per step). The Krylov space of step s has
            ``block * (s + 1)`` vectors; steps are capped so that it stays below N.
        min_steps: steps taken before the first convergence check.
        max_steps: step cap. Images still unconverged there are solved by dense ``eigh`` when
            ``fallback`` (so a pathological graph costs time, not accuracy), else returned as they are.
        tol: an image has converged once its largest Ritz residual of the ``k`` pairs is at most
            ``tol`` times the gap between Ritz values ``k`` and ``k + 1`` of A, or once the
            residual is down at the rounding floor (10 ulp) and stopped shrinking. ``tol=0``
            runs ``max_steps`` for every image, without fallback.
        init: optional warm start ``[B, N, j]`` (e.g. the eigenvectors of a similar graph); its
            columns replace the first ``min(j, block)`` random start columns.
        seed: seed of the private generator of the random start block.
        return_info: also return a :class:`KrylovInfo`.
    """
    _check_args(lap_BNN, k, block, min_steps, max_steps, init)
    batch, n, _ = lap_BNN.shape
    device = lap_BNN.device
    info = KrylovInfo(
        steps=torch.zeros(batch, dtype=torch.long), converged=torch.zeros(batch, dtype=torch.bool),
        fallback=torch.zeros(batch, dtype=torch.bool),
        residual=torch.zeros(batch, k, dtype=lap_BNN.dtype, device=device),
        gap=torch.full((batch,), float("inf"), dtype=lap_BNN.dtype, device=device),
    )
    # The Krylov space must leave room for an unwanted direction (the k / k+1 gap); on tiny
    # matrices a dense solve is the cheaper and exact choice anyway.
    max_steps = min(max_steps, n // block - 2)
    if max_steps < 1:
        vals_BN, vecs_BNN = torch.linalg.eigh(lap_BNN)
        info["converged"][:] = True
        out = (vals_BN[:, :k].contiguous(), vecs_BNN[:, :, :k].contiguous())
        return (*out, info) if return_info else out
    min_steps = min(min_steps, max_steps)

    vals_Bk, vecs_BkN = _krylov_iterations(lap_BNN, k, block, min_steps, max_steps, tol, init, seed, info)
    if fallback and tol > 0:
        _dense_fallback(lap_BNN, k, vals_Bk, vecs_BkN, info)
    out = (vals_Bk, vecs_BkN.mT.contiguous())
    return (*out, info) if return_info else out


def _check_args(lap_BNN: torch.Tensor, k: int, block: int, min_steps: int, max_steps: int,
                init: torch.Tensor | None) -> None:
    if lap_BNN.ndim != 3 or lap_BNN.shape[1] != lap_BNN.shape[2]:
        raise ValueError(f"block_krylov_smallest expects square matrices [B, N, N], got {tuple(lap_BNN.shape)}")
    batch, n, _ = lap_BNN.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} eigenpairs requested from {n}x{n} matrices")
    if block < k:
        raise ValueError(f"block={block} is narrower than k={k}; the block must hold the wanted vectors")
    if not 0 <= min_steps <= max_steps:
        raise ValueError(f"need 0 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    if init is not None and (init.ndim != 3 or init.shape[:2] != (batch, n)):
        raise ValueError(f"init must be [B={batch}, N={n}, j] start vectors, got {tuple(init.shape)}")
    if not lap_BNN.dtype.is_floating_point:
        raise ValueError(f"block_krylov_smallest needs a floating-point matrix, got {lap_BNN.dtype}")


def _krylov_iterations(
    lap_BNN: torch.Tensor, k: int, block: int, min_steps: int, max_steps: int, tol: float,
    init: torch.Tensor | None, seed: int, info: KrylovInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block Lanczos with Rayleigh-Ritz until every image converged or ran ``max_steps``:
    ``(vals [B, k] ascending, vecs [B, k, N] as rows)``; fills ``info`` per image."""
    batch, n, _ = lap_BNN.shape
    device = lap_BNN.device
    # Blocks are kept as rows [B, b, N] and multiplied as (X^T L)^T = L X: L is symmetric, and
    # the thin-left-operand product streams L row-major, faster than L @ X on CPU BLAS.
    width = block * (max_steps + 1)
    Q_AmN = lap_BNN.new_empty(batch, width, n)
    AQ_AmN = lap_BNN.new_empty(batch, width, n)  # A @ basis rows: Rayleigh-Ritz needs no extra pass
    Q_AmN[:, :block] = _orthonormalize_against(_start_block(lap_BNN, block, init, seed), None)
    vals_Bk = lap_BNN.new_empty(batch, k)
    vecs_BkN = lap_BNN.new_empty(batch, k, n)
    floor = _RESIDUAL_FLOOR_ULPS * torch.finfo(lap_BNN.dtype).eps

    # "A" indexes the images still in the batch; `finished_A` marks those already written out.
    # Finished images leave the batch once they are at least half of it: copying the remaining
    # Laplacians costs about as much as one step over the finished ones, so later steps only
    # stream the hard images without paying a copy for every straggler.
    active_A = torch.arange(batch, device=device)
    finished_A = torch.zeros(batch, dtype=torch.bool, device=device)
    lap_ANN = lap_BNN
    prev_res_A = torch.full((batch,), float("inf"), dtype=lap_BNN.dtype, device=device)
    for step in range(max_steps + 1):
        lo, hi = step * block, (step + 1) * block
        AQ_AmN[:, lo:hi] = Q_AmN[:, lo:hi] - torch.bmm(Q_AmN[:, lo:hi], lap_ANN)
        if step >= min_steps:
            mu_Ak, vecs_AkN, residual_Ak, gap_A = _rayleigh_ritz(Q_AmN[:, :hi], AQ_AmN[:, :hi], k)
            res_A = residual_Ak.amax(dim=1)
            met_A = (res_A <= tol * gap_A) | ((res_A <= floor) & (res_A >= 0.5 * prev_res_A))
            last = step == max_steps or tol <= 0
            new_A = ~finished_A if last else met_A & ~finished_A
            if bool(new_A.any()):
                rows = active_A[new_A]
                rows_cpu = rows.cpu()
                vals_Bk[rows] = 1.0 - mu_Ak[new_A]
                vecs_BkN[rows] = vecs_AkN[new_A]
                info["residual"][rows] = residual_Ak[new_A]
                info["gap"][rows] = gap_A[new_A]
                info["steps"][rows_cpu] = step
                info["converged"][rows_cpu] = met_A[new_A].cpu()
                finished_A = finished_A | new_A
                n_finished = int(finished_A.sum())
                if n_finished == finished_A.shape[0]:
                    break
                if 2 * n_finished >= finished_A.shape[0]:
                    keep_A = ~finished_A
                    active_A, lap_ANN, res_A = active_A[keep_A], lap_ANN[keep_A], res_A[keep_A]
                    Q_AmN, AQ_AmN = _keep_filled(Q_AmN, keep_A, hi), _keep_filled(AQ_AmN, keep_A, hi)
                    finished_A = finished_A[keep_A]
            prev_res_A = res_A
        Q_AmN[:, hi:hi + block] = _orthonormalize_against(AQ_AmN[:, lo:hi], Q_AmN[:, :hi])
    return vals_Bk, vecs_BkN


def _dense_fallback(lap_BNN: torch.Tensor, k: int, vals_Bk: torch.Tensor, vecs_BkN: torch.Tensor,
                    info: KrylovInfo) -> None:
    """Overwrite the unconverged images' pairs with dense ``eigh`` ones, in place."""
    stuck_B = ~info["converged"]
    if bool(stuck_B.any()):
        rows = stuck_B.nonzero().squeeze(1).to(lap_BNN.device)
        dense_vals, dense_vecs = torch.linalg.eigh(lap_BNN[rows])
        vals_Bk[rows] = dense_vals[:, :k]
        vecs_BkN[rows] = dense_vecs[:, :, :k].mT
        info["fallback"][stuck_B] = True


def _keep_filled(buf_AmN: torch.Tensor, keep_A: torch.Tensor, filled: int) -> torch.Tensor:
    """The rows ``keep_A`` of a basis buffer, copying only its first ``filled`` vectors."""
    out = buf_AmN.new_empty(int(keep_A.sum()), *buf_AmN.shape[1:])
    out[:, :filled] = buf_AmN[keep_A, :filled]
    return out


def _rayleigh_ritz(Q_BmN: torch.Tensor, AQ_BmN: torch.Tensor, k: int):
    """Top-``k`` Ritz pairs of A on the row space of ``Q``: ``(mu [B,k] descending, vectors [B,k,N],
    residual norms |A u - mu u| [B,k], gap [B] between Ritz values k and k+1)``."""
    proj_Bmm = AQ_BmN @ Q_BmN.mT
    proj_Bmm = 0.5 * (proj_Bmm + proj_Bmm.mT)
    mu_Bm, ritz_Bmm = torch.linalg.eigh(proj_Bmm)
    # eigh sorts ascending: the largest of A (the smallest of L) are the last columns.
    mu_Bk = mu_Bm[:, -k:].flip(-1)
    coef_Bkm = ritz_Bmm[:, :, -k:].flip(-1).mT
    vecs_BkN = coef_Bkm @ Q_BmN
    residual_Bk = (coef_Bkm @ AQ_BmN - vecs_BkN * mu_Bk.unsqueeze(2)).norm(dim=2)
    if mu_Bm.shape[1] > k:
        gap_B = mu_Bk[:, -1] - mu_Bm[:, -k - 1]
    else:
        gap_B = torch.full_like(mu_Bk[:, -1], float("inf"))
    return mu_Bk, vecs_BkN, residual_Bk, gap_B
