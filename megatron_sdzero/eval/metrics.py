"""avg@k and the unbiased pass@k estimator, per problem and over a benchmark.

With n samples of a problem of which c are correct:

    avg@k   = c / n                                  (the mean accuracy of the samples; the paper's
                                                      avg@8 draws n = k = 8)
    pass@k  = 1 - C(n - c, k) / C(n, k)              (the chance that k of the n samples, drawn
                                                      without replacement, hold at least one correct)

The binomial ratio overflows floats long before n reaches realistic sizes, so it is computed as the
product 1 - prod_{i = n-c+1}^{n} (1 - k / i) (Chen et al., 2021), which only ever multiplies numbers
in [0, 1]. A benchmark's score is the mean of its problems' scores.

Its 95 % interval is a percentile bootstrap over problems (:func:`bootstrap_interval`): resample the
problems with replacement, take the mean of each resample, and report the 2.5th and 97.5th
percentiles. It reflects which problems the benchmark happens to hold, not only the sampling noise
of the k draws, and it is seeded, so the same per-problem scores always give the same interval.

Two arms scored on the same problems are compared with :func:`paired_bootstrap`: each resample draws
the same problems for both arms, so what the arms share (a problem's difficulty) cancels in the
difference and the interval of the mean difference is narrower than two independent intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct (needs k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def avg_at_k(n: int, c: int) -> float:
    """Mean accuracy of one problem's n samples."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    return c / n


def benchmark_scores(correct: Sequence[int], n: int, ks: Sequence[int]) -> dict[str, float]:
    """avg@n and pass@k for each k, averaged over problems (``correct[i]``: problem i's correct count)."""
    if not correct:
        raise ValueError("no problems to score")
    scores = {f"avg@{n}": sum(avg_at_k(n, c) for c in correct) / len(correct)}
    for k in ks:
        scores[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
    return scores


def per_problem_scores(correct: Sequence[int], n: int, ks: Sequence[int]) -> dict[str, list[float]]:
    """Each problem's avg@n and pass@k (what :func:`benchmark_scores` averages)."""
    scores = {f"avg@{n}": [avg_at_k(n, c) for c in correct]}
    for k in ks:
        scores[f"pass@{k}"] = [pass_at_k(n, c, k) for c in correct]
    return scores


def bootstrap_interval(
    values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampling them with replacement)."""
    if not values:
        raise ValueError("bootstrap_interval: no values")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(
            f"bootstrap_interval: need 0 < level < 1 and resamples >= 1, got {level}, {resamples}"
        )
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, (1 << 22) // len(data))  # bounds memory: at most ~4M indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = data[rng.integers(0, len(data), size=(stop - start, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    first: Sequence[float],
    second: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(first) - mean(second)`` over paired items.

    ``first[i]`` and ``second[i]`` are one problem's scores under two arms. A resample that draws
    problem i draws it for both, which is resampling the per-problem differences, so this is
    :func:`bootstrap_interval` of those differences (same seeding, same chunking).
    """
    if len(first) != len(second):
        raise ValueError(f"paired_bootstrap: need paired values, got {len(first)} and {len(second)}")
    differences = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    return bootstrap_interval(differences.tolist(), level=level, resamples=resamples, seed=seed)
