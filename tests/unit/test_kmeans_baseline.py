"""The k-means baseline of the final evaluation (eagle_dist.evaluation.loop._kmeans_baseline).

    .venv/bin/python -m pytest -q tests/unit/test_kmeans_baseline.py   # seconds
"""

from __future__ import annotations

import pytest
import torch

from eagle_dist.evaluation.loop import _kmeans_baseline


@pytest.fixture(scope="module")
def d(solo_dist):
    return solo_dist


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
