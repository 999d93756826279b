"""avg@k and the unbiased pass@k estimator, per problem and over a benchmark.

With n samples of a problem of which c are correct:

    avg@k   = c / n                                  (the mean accuracy of the samples; the paper's
                                                      avg@8 draws n = k = 8)
    pass@k  = 1 - C(n - c, k) / C(n, k)              (the chance that k of the n samples, drawn
                                                      without replacement, hold at least one correct)

The binomial ratio overflows floats long before n reaches realistic sizes, so it is computed as the
product 1 - prod_{i = n-c+1}^{n} (1 - k / i) (Chen et al., 2021), which only ever multiplies numbers
in [0, 1]. A benchmark's score is the mean of its problems' scores.
"""

from __future__ import annotations

from collections.abc import Sequence


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
