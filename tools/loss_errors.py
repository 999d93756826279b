"""Worst error of ``distill_loss`` against the float64 reference, over the test cases of one input.

Runs tests/test_losses.py's TP = 1 comparison (CPU, PyTorch path) for every case whose name ends
with the given input tag, and prints the worst value, per-token value and gradient errors in units
of the tolerance (<= 1 passes; tolerances in tests/test_losses_reference.py):

    python tools/loss_errors.py offset-1e4-T0.7

The library is imported as usual, so PYTHONPATH=<another checkout> measures that checkout's losses
on today's cases (how the before/after figures in docs/benchmarks.md were taken).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_losses import CASES, run_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag", help="input tag, e.g. offset-1e4-T0.7 (see test_losses_reference._variants)")
    tag = parser.parse_args().tag
    cases = [case for case in CASES if case.name.endswith("/" + tag)]
    if not cases:
        sys.exit(f"no test case has the input tag {tag!r}")
    worst = {"value": 0.0, "tokens": 0.0, "grad": 0.0}
    for case in cases:
        errors = run_case(case)
        worst = {key: max(value, errors[key]) for key, value in worst.items()}
    print(
        f"{len(cases)} cases ({tag}), worst error x tolerance: "
        + ", ".join(f"{k} {v:.3g}" for k, v in worst.items())
    )


if __name__ == "__main__":
    main()
