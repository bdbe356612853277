"""The block Krylov eigensolver against float64 eigh, and its wiring into EiCue.

    .venv/bin/python -m pytest tests/unit/test_eigensolvers.py -q
"""

import pytest
import torch

from eagle_dist.method import eicue
from eagle_dist.config import load_config
from eagle_dist.method.eigensolvers import block_krylov_smallest


def subspace_sine(vecs_BNk, ref_BNk):
    """Sine of the largest principal angle between the spans, per image."""
    ours = torch.linalg.qr(vecs_BNk.double()).Q
    ref = torch.linalg.qr(ref_BNk.double()).Q
    return torch.linalg.matrix_norm(ours - ref @ (ref.mT @ ours), ord=2)


def aligned(vecs_BNk, ref_BNk):
    signs = torch.where((vecs_BNk.double() * ref_BNk.double()).sum(1, keepdim=True) < 0, -1.0, 1.0)
    return vecs_BNk.double() * signs


def eagle_like_laplacians(batch=4, side=14, dim=64, regions=4, seed=0):
    """Graphs built as EiCue builds them, from codes with a region structure plus noise."""
    gen = torch.Generator().manual_seed(seed)
    n = side * side
    stripes_N = torch.arange(n) * regions // n
    region_BN = (stripes_N + torch.randint(0, regions, (batch, 1), generator=gen)) % regions
    centres = torch.randn(batch, regions, dim, generator=gen)
    code_BND = torch.gather(centres, 1, region_BN.unsqueeze(2).expand(-1, -1, dim))
    code_BND = code_BND + 0.8 * torch.randn(batch, n, dim, generator=gen)
    img = torch.randn(batch, 3, side * 8, side * 8, generator=gen)
    color = eicue.color_affinity(eicue.resize_for_color(img, side))
    return eicue.normalized_laplacian(eicue.semantic_affinity(code_BND), color)


def planted(batch, n, eigenvalues_Bn, seed=0):
    """Symmetric matrices with the given spectra and random eigenvectors (float32 and the basis)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64)).Q
    mats = basis @ torch.diag_embed(eigenvalues_Bn.double()) @ basis.mT
    return (0.5 * (mats + mats.mT)).float(), basis


@pytest.fixture(scope="module")
def graphs():
    return eagle_like_laplacians(batch=4, side=16)


def test_matches_float64_eigh_on_eagle_graphs(graphs):
    vals, vecs, info = block_krylov_smallest(graphs, 4, return_info=True)
    ref_vals, ref_vecs = torch.linalg.eigh(graphs.double())
    assert vals.shape == (4, 4) and vecs.shape == (4, 256, 4) and vecs.dtype == torch.float32
    assert bool(info["converged"].all()) and not bool(info["fallback"].any())
    assert torch.allclose(vals.double(), ref_vals[:, :4], atol=2e-6)
    assert float(subspace_sine(vecs, ref_vecs[:, :, :4]).max()) < 1e-3
    # Per vector too (these graphs have separated eigenvalues), after sign alignment.
    assert torch.allclose(aligned(vecs, ref_vecs[:, :, :4]), ref_vecs[:, :, :4], atol=1e-3)
    gram = vecs.double().mT @ vecs.double()
    assert torch.allclose(gram, torch.eye(4, dtype=torch.float64).expand(4, 4, 4), atol=1e-5)


def test_planted_spectrum_values_and_vectors():
    n = 300
    spectrum = torch.linspace(0.9, 2.0, n).repeat(3, 1)
    spectrum[:, :4] = torch.tensor([0.0, 0.2, 0.35, 0.5])
    lap, basis = planted(3, n, spectrum)
    vals, vecs = block_krylov_smallest(lap, 4)
    assert torch.allclose(vals, spectrum[:, :4], atol=1e-5)
    assert torch.allclose(aligned(vecs, basis[:, :, :4]), basis[:, :, :4], atol=1e-4)


def test_hard_images_iterate_longer_and_easy_ones_stop_early():
    n = 300
    easy = torch.linspace(1.2, 2.0, n)
    easy[:4] = torch.tensor([0.0, 0.2, 0.35, 0.5])
    hard = torch.linspace(0.8, 2.0, n)  # the bulk starts closer to the 4th eigenvalue
    hard[:4] = torch.tensor([0.0, 0.3, 0.45, 0.5])
    lap, basis = planted(2, n, torch.stack([easy, hard]))
    vals, vecs, info = block_krylov_smallest(lap, 4, return_info=True)
    assert int(info["steps"][0]) < int(info["steps"][1])
    assert bool(info["converged"].all())
    assert float(subspace_sine(vecs, basis[:, :, :4]).max()) < 1e-3
    # The result of each image does not depend on its batch companions.
    alone_vals, alone_vecs = block_krylov_smallest(lap[:1], 4)
    assert torch.equal(alone_vals, vals[:1]) and torch.equal(alone_vecs, vecs[:1])


def test_unconverged_images_fall_back_to_dense_eigh():
    n = 200
    spectrum = torch.linspace(0.5, 2.0, n).repeat(2, 1)
    spectrum[:, :4] = torch.tensor([0.0, 0.1, 0.2, 0.5])  # lambda_4 == lambda_5: no k / k+1 gap
    lap, _ = planted(2, n, spectrum)
    vals, vecs, info = block_krylov_smallest(lap, 4, max_steps=5, return_info=True)
    assert bool(info["fallback"].all()) and not bool(info["converged"].any())
    dense_vals, dense_vecs = torch.linalg.eigh(lap)
    assert torch.equal(vals, dense_vals[:, :4]) and torch.equal(vecs, dense_vecs[:, :, :4])
    _, _, info = block_krylov_smallest(lap, 4, max_steps=5, fallback=False, return_info=True)
    assert not bool(info["fallback"].any())


def test_exhausted_krylov_space_stays_orthonormal():
    # Three constant blocks: A = D^-1/2 W D^-1/2 has rank 3, so the Krylov space runs out of
    # directions after one step and the remainders are pure rounding noise.
    n = 240
    block_N = torch.arange(n) * 3 // n
    weights = torch.where(block_N[:, None] == block_N[None, :], 1.0, 0.05).unsqueeze(0)
    lap = eicue.normalized_laplacian(weights, torch.zeros_like(weights))
    vals, vecs, info = block_krylov_smallest(lap, 4, return_info=True)
    ref_vals = torch.linalg.eigvalsh(lap.double())
    assert torch.allclose(vals.double(), ref_vals[:, :4], atol=1e-5)
    gram = vecs.double().mT @ vecs.double()
    assert torch.allclose(gram, torch.eye(4, dtype=torch.float64).unsqueeze(0), atol=1e-5)
    residual = (lap.double() @ vecs.double() - vecs.double() * vals.double().unsqueeze(1)).norm(dim=1)
    assert float(residual.max()) < 1e-4


def test_warm_start_with_the_answer_stops_at_the_first_check(graphs):
    _, ref_vecs = torch.linalg.eigh(graphs.double())
    _, vecs, info = block_krylov_smallest(graphs, 4, init=ref_vecs[:, :, :4].float(), min_steps=1,
                                          return_info=True)
    assert info["steps"].tolist() == [1] * graphs.shape[0]
    assert float(subspace_sine(vecs, ref_vecs[:, :, :4]).max()) < 1e-4


def test_deterministic_and_leaves_the_global_rng_alone(graphs):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = block_krylov_smallest(graphs, 4)
    assert torch.equal(torch.get_rng_state(), state)
    second = block_krylov_smallest(graphs, 4)
    assert torch.equal(first[1], second[1])
    other_seed = block_krylov_smallest(graphs, 4, seed=1)
    assert not torch.equal(first[1], other_seed[1])


def test_tiny_matrices_are_solved_densely():
    lap = eagle_like_laplacians(batch=2, side=3)  # N = 9: no room for a Krylov space
    vals, vecs, info = block_krylov_smallest(lap, 4, return_info=True)
    dense_vals, dense_vecs = torch.linalg.eigh(lap)
    assert torch.equal(vals, dense_vals[:, :4]) and torch.equal(vecs, dense_vecs[:, :, :4])
    assert info["steps"].tolist() == [0, 0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lap=torch.zeros(2, 5, 6), k=2), "square"),
        (dict(lap=torch.zeros(1, 50, 50), k=4, block=3), "narrower"),
        (dict(lap=torch.zeros(1, 50, 50), k=0), "k=0"),
        (dict(lap=torch.zeros(1, 50, 50), k=2, min_steps=5, max_steps=2), "min_steps"),
        (dict(lap=torch.zeros(1, 50, 50), k=2, init=torch.zeros(1, 49, 2)), "init"),
        (dict(lap=torch.zeros(1, 50, 50, dtype=torch.long), k=2), "floating-point"),
    ],
)
def test_bad_input_is_refused_with_a_reason(kwargs, message):
    lap = kwargs.pop("lap")
    k = kwargs.pop("k")
    with pytest.raises(ValueError, match=message):
        block_krylov_smallest(lap, k, **kwargs)


def test_eicue_uses_the_solver_from_the_config(graphs):
    cfg = load_config(None, ["eicue.solver=krylov"])
    assert cfg.eicue.solver == "krylov"
    vals_k, vecs_k = eicue.smallest_eigenpairs(graphs, 4, solver="krylov")
    vals_e, vecs_e = eicue.smallest_eigenpairs(graphs, 4, solver="eigh64")
    assert torch.allclose(vals_k, vals_e, atol=2e-6)
    assert torch.allclose(aligned(vecs_k, vecs_e), vecs_e.double(), atol=1e-3)

    gen = torch.Generator().manual_seed(1)
    code = torch.randn(2, 32, 16, 16, generator=gen)
    img = torch.randn(2, 3, 128, 128, generator=gen)
    spectral_k = eicue.EiCue(k=4, solver="krylov")(img, code)
    spectral_e = eicue.EiCue(k=4, solver="eigh64")(img, code)
    assert spectral_k.shape == spectral_e.shape == (2, 3, 16, 16)
    # Same vectors up to each column's sign (the sign rule then acts on the same block).
    flat_k = spectral_k.flatten(2).transpose(1, 2)
    flat_e = spectral_e.flatten(2).transpose(1, 2)
    assert torch.allclose(aligned(flat_k, flat_e), flat_e.double(), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(graphs):
    vals_cpu, vecs_cpu = block_krylov_smallest(graphs, 4)
    vals_gpu, vecs_gpu = block_krylov_smallest(graphs.cuda(), 4)
    assert vals_gpu.device.type == "cuda"
    assert torch.allclose(vals_gpu.cpu(), vals_cpu, atol=2e-6)
    assert float(subspace_sine(vecs_gpu.cpu(), vecs_cpu).max()) < 1e-3
