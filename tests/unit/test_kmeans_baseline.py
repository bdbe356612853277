"""The k-means baseline of the final evaluation (eagle_dist.evaluation.loop._kmeans_baseline).

    .venv/bin/python -m pytest -q tests/unit/test_kmeans_baseline.py   # seconds
"""

from __future__ import annotations

import os

import pytest
import torch

from eagle_dist import distributed as dist_mod
from eagle_dist.evaluation.loop import _kmeans_baseline


@pytest.fixture(scope="module")
def d():
    threads = torch.get_num_threads()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU"):
        assert key not in os.environ, f"{key} leaked into the test process"
    state = dist_mod.setup(strategy="ddp", cpu_threads=1)
    yield state
    state.cleanup()
    torch.set_num_threads(threads)


def test_scores_every_labelled_pixel_of_the_kept_images(d):
    gen = torch.Generator().manual_seed(0)
    kept = [(torch.randn(2, 8, 4, 4, generator=gen), torch.randint(0, 3, (2, 8, 8), generator=gen))
            for _ in range(2)]
    cm = _kmeans_baseline(kept, n=3, e=1, dist=d, seed=0)
    assert cm is not None
    assert int(cm.table.sum()) == 2 * 2 * 8 * 8


def test_rank_zero_without_images_gives_no_baseline_instead_of_crashing(d):
    # Rank 0's share of the validation set can be empty (or every image skipped as corrupt); it
    # used to call len(None) on its missing tokens and end the final evaluation with a TypeError.
    assert _kmeans_baseline([], n=3, e=1, dist=d, seed=0) is None
