"""The statistics of `eagle-dist sweep report` on numbers worked out by hand.

    .venv/bin/python -m pytest tests/unit/test_seedstats.py -q
"""

import json
import math

import pytest

from eagle_dist.evaluation import seedstats


def test_summary_of_an_arm():
    s = seedstats.summarize([1.0, 2.0, 3.0])
    # mean 2, sample sd sqrt((1 + 0 + 1) / 2) = 1, t(0.975, 2) = 4.3027 (any t table)
    assert (s.n, s.mean, s.sd, s.min, s.max) == (3, 2.0, 1.0, 1.0, 3.0)
    assert s.low == pytest.approx(2.0 - 4.3027 / math.sqrt(3), abs=1e-4)
    assert s.high == pytest.approx(2.0 + 4.3027 / math.sqrt(3), abs=1e-4)
    assert s.contains(0.0) and not s.contains(4.5)
    five = seedstats.summarize([24.0, 25.0, 26.0, 27.0, 28.0])  # sd sqrt(10 / 4), t(0.975, 4) = 2.7764
    assert five.sd == pytest.approx(math.sqrt(2.5))
    assert five.high - five.mean == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), abs=1e-4)
    one = seedstats.summarize([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.sd) and not one.contains(5.0)


def test_welch_difference_and_verdicts():
    a, b = [1.0, 2.0, 3.0], [7.0, 9.0, 11.0]
    d = seedstats.difference(a, b)
    # var/n: 1/3 and 4/3; se = sqrt(5/3); Welch-Satterthwaite df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    assert d.diff == 7.0 and d.df == pytest.approx(50 / 17)
    from scipy import stats

    # The interval's half width is the 97.5 % point of t(50/17) times the standard error.
    assert stats.t.cdf((d.high - d.diff) / math.sqrt(5 / 3), 50 / 17) == pytest.approx(0.975, abs=1e-9)
    assert d.low == pytest.approx(d.diff - (d.high - d.diff))
    assert d.high - d.diff == pytest.approx(3.2 * math.sqrt(5 / 3), abs=0.03)  # t(0.975, 2.94) ~ 3.2
    assert 0 < d.low and d.verdict == "B higher than A"
    # B = [4, 6, 8]: the same spread, a difference of 4 < 4.16 = half the interval
    assert seedstats.difference(a, [4.0, 6.0, 8.0]).verdict == "within the seed spread"
    assert seedstats.difference(b, a).verdict == "B lower than A"
    assert seedstats.difference(a, [1.5, 2.5, 3.0]).verdict == "within the seed spread"
    same = seedstats.difference([2.0, 2.0], [3.0, 3.0])  # no spread at all: the interval is the point
    assert (same.low, same.high, same.verdict) == (1.0, 1.0, "B higher than A")
    assert seedstats.difference([1.0], [2.0, 3.0]).verdict.startswith("no interval")


def test_evaluations_of_a_resumed_run_and_published_numbers(tmp_path):
    rows = [(2, {"eval/cluster_official_mIoU": 10.0, "loss": 1.0}), (4, {"eval/cluster_official_mIoU": 30.0}),
            (4, {"eval/cluster_official_mIoU": 20.0}),  # the resumed run's evaluation of step 4 wins
            (6, {"eval/cluster_official_mIoU": 15.0, "eval/linear_strict_acc": 50.0, "eval/labelled_pixels": 9.0})]
    lines = [json.dumps({"step": s, "time": 0, "metrics": m}) for s, m in rows] + ['{"step": 7, "ti']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    evals = seedstats.run_evaluations(tmp_path)
    assert evals == {2: {"cluster_official_mIoU": 10.0}, 4: {"cluster_official_mIoU": 20.0},
                     6: {"cluster_official_mIoU": 15.0, "linear_strict_acc": 50.0}}
    final, best = seedstats.final_and_best(evals, 6)
    assert final == {"cluster_official_mIoU": 15.0, "linear_strict_acc": 50.0}
    assert best == {"cluster_official_mIoU": 20.0, "linear_strict_acc": 50.0}

    from helpers import REPO

    table = seedstats.load_published(REPO / "configs" / "published.yaml")
    coco = seedstats.published_for(table, "cocostuff27", "vit_small_patch8_224")
    assert coco == {"cluster_official_acc": 64.2, "cluster_official_mIoU": 27.2,
                    "linear_official_acc": 76.8, "linear_official_mIoU": 43.9}
    assert seedstats.published_for(table, "potsdam3", "vit_base_patch8_224") == {
        "cluster_official_acc": 83.3, "cluster_official_mIoU": 71.1}
    assert seedstats.published_for(table, "synthetic", "vit_small_patch16_224") == {}
