"""Statistics over seeds: what `eagle-dist sweep report` computes from the runs of a sweep.

    from eagle_dist.evaluation import seedstats
    s = seedstats.summarize([24.1, 25.3, 23.8])            # n, mean, sd, min, max, 95 % interval
    d = seedstats.difference([24.1, 25.3, 23.8], [26.0, 27.1, 26.4])
    d.verdict                                              # "B higher than A"
    evals = seedstats.run_evaluations(run_dir)             # {step: {metric: value}} of metrics.jsonl

Methods (stated in every report):
* the interval of an arm's mean is Student's t: mean +- t(0.975, n-1) * sd / sqrt(n), with the
  sample standard deviation (n - 1 in the denominator);
* the interval of a difference of two arms' means (B - A) is Welch's t: the standard error
  sqrt(sd_A^2/n_A + sd_B^2/n_B) and Welch-Satterthwaite degrees of freedom, so the arms need
  not share a variance.  The verdict reads the interval: it contains 0 -> "within the seed
  spread", it lies below 0 -> "B lower than A", above -> "B higher than A".
With 5 seeds per arm these intervals are wide (t(0.975, 4) = 2.78): a gap they call "within the
seed spread" may still be real, only not shown by these seeds.  An arm with fewer than 2 seeds
has no interval.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LEVEL = 0.95
INTERVAL_METHOD = ("95 % intervals: Student's t for an arm's mean (sample sd, n - 1 degrees of freedom); "
                   "Welch's t for a difference of two arms' means (Welch-Satterthwaite degrees of freedom)")
# What the evaluation logs (evaluation/loop.py: `eval/<probe>_<protocol>_<mIoU|acc>`), in report order.
METRICS = tuple(f"{probe}_{protocol}_{score}" for probe in ("cluster", "linear")
                for protocol in ("official", "strict") for score in ("mIoU", "acc"))
_EVAL_KEY = re.compile(r"^eval/((?:cluster|linear)_(?:official|strict)_(?:mIoU|acc))$")
WITHIN, LOWER, HIGHER = "within the seed spread", "B lower than A", "B higher than A"


@dataclass(frozen=True)
class Summary:
    """One arm's values of one metric over its seeds."""

    n: int
    mean: float
    sd: float  # sample standard deviation; NaN for n < 2
    min: float
    max: float
    low: float  # 95 % interval of the mean (Student's t); NaN for n < 2
    high: float

    def contains(self, value: float) -> bool:
        return math.isfinite(self.low) and self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """mean(B) - mean(A) with Welch's 95 % interval, and what the interval says."""

    diff: float
    low: float
    high: float
    df: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _t_quantile(df: float, level: float = LEVEL) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


def summarize(values: list[float], level: float = LEVEL) -> Summary:
    """n, mean, sample sd, min, max and the t interval of the mean (NaN where n < 2)."""
    xs = [float(v) for v in values]
    if not xs:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan, nan)
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Summary(n, mean, float("nan"), xs[0], xs[0], float("nan"), float("nan"))
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t_quantile(n - 1, level) * sd / math.sqrt(n)
    return Summary(n, mean, sd, min(xs), max(xs), mean - half, mean + half)


def verdict(low: float, high: float) -> str:
    """What an interval of B - A says: contains 0, below it or above it."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval (fewer than 2 seeds in an arm)"
    if high < 0:
        return LOWER
    if low > 0:
        return HIGHER
    return WITHIN


def difference(a: list[float], b: list[float], level: float = LEVEL) -> Difference:
    """mean(b) - mean(a) with Welch's t interval (unequal variances)."""
    sa, sb = summarize(a, level), summarize(b, level)
    diff = sb.mean - sa.mean
    if sa.n < 2 or sb.n < 2:
        nan = float("nan")
        return Difference(diff, nan, nan, nan, verdict(nan, nan))
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0.0:  # every seed of both arms gave the same number: the interval is the point
        return Difference(diff, diff, diff, float("inf"), verdict(diff, diff))
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = _t_quantile(df, level) * se
    return Difference(diff, diff - half, diff + half, df, verdict(diff - half, diff + half))


# ----------------------------------------------------------------------------- run folders


def run_evaluations(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """Every evaluation a run logged: {step: {metric: value}} from its metrics.jsonl.

    A resumed run logs the steps after its checkpoint again; the later record of a step wins
    (it belongs to the run that went on).  Only the metrics of METRICS are kept.
    """
    path = Path(run_dir) / "metrics.jsonl"
    found: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: the metrics before it stand
        values = {m.group(1): float(v) for k, v in record.get("metrics", {}).items() if (m := _EVAL_KEY.match(k))}
        if values:
            found[int(record["step"])] = values
    return found


def final_and_best(evaluations: dict[int, dict[str, float]], final_step: int) -> tuple[dict, dict]:
    """The metrics of the evaluation at `final_step`, and per metric the best value of any
    evaluation up to it (optimistic: chosen on the evaluation split)."""
    final = dict(evaluations.get(final_step, {}))
    best: dict[str, float] = {}
    for step, values in evaluations.items():
        if step > final_step:
            continue
        for metric, value in values.items():
            if math.isfinite(value) and (metric not in best or value > best[metric]):
                best[metric] = value
    return final, best


# ----------------------------------------------------------------------------- published numbers


def load_published(path: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """configs/published.yaml: {dataset: {backbone: {cluster_mIoU: ..., linear_acc: ...}}}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {str(ds): {str(bb): {str(k): float(v) for k, v in nums.items()} for bb, nums in by_bb.items()}
            for ds, by_bb in data.items()}


def published_for(table: dict, dataset: str, backbone: str) -> dict[str, float]:
    """The published numbers of a config (matched by dataset and backbone) as metric names of
    the official protocol: {'cluster_official_mIoU': 27.2, ...}; {} when the paper has none."""
    nums = table.get(dataset, {}).get(backbone, {})
    out = {}
    for key, value in nums.items():
        probe, score = key.split("_", 1)
        out[f"{probe}_official_{score}"] = value
    return out
