"""``sdzero compare-report``: numbers against a hand-computed results.json, the bootstraps against
known distributions, malformed input as one-line errors, and the plots it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from megatron_sdzero import cli
from megatron_sdzero.errors import USER_ERROR_STATUS
from megatron_sdzero.eval.metrics import bootstrap_interval, paired_bootstrap
from megatron_sdzero.experiment.summary import load_results, parse_results, render_markdown, summarise
from megatron_sdzero.report import PNG_MAGIC

EASY = ["e1", "e2", "e3", "e4"]
HARD = ["h1", "h2", "h3", "h4"]
HARD_BASE = [[1, 1], [1, 1], [1, 1], [1, 0]]  # avg 1, 1, 1, .5 -> 87.5 %; pass 100 %


def _run(
    seed: int,
    easy: list[list[int]],
    hard: list[list[int]],
    *,
    samples: int = 1000,
    seconds: float = 60.0,
    easy_ids: list[str] = EASY,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "seed": seed,
        "status": "done",
        "samples_used": samples,
        "seconds": seconds,
        "selected": {"checkpoint": f"step_{seed}", "step": 4, "validation": 0.5},
        "curve": [],
        "benchmarks": {
            "easy": {"k": 2, "ids": easy_ids, "outcomes": easy},
            "hard": {"k": 2, "ids": HARD, "outcomes": hard},
        },
        **extra,
    }


def _arm(algorithm: str, label: str, *runs: dict[str, Any]) -> dict[str, Any]:
    return {"algorithm": algorithm, "label": label, "runs": list(runs)}


def example() -> dict[str, Any]:
    """Per-problem avg@2 on easy (e1..e4), by hand:
    base .5 0 .5 0 (25 %); sdzero seeds (1 .5 1 .5) and (1 1 1 .5) -> 1 .75 1 .5 (81.25 %);
    rft .5 .5 .5 0 (37.5 %); grpo 0 .5 .5 0 (25 %); sdft .5 0 .5 0 (25 %).
    On hard every arm is base's 1 1 1 .5 (87.5 %) except sdzero: 1 1 1 .75 (93.75 %, +7.14 %)."""
    curve = [{"step": 0, "samples": 0, "validation": 0.2}, {"step": 4, "samples": 1000, "validation": 0.4}]
    evolution = [{"step": 0, "samples": 0, "generation": 0.2, "revision": 0.3},
                 {"step": 4, "samples": 1000, "generation": 0.4, "revision": 0.5}]  # fmt: skip
    sdzero_seed1 = _run(  # problems in another order: reordered by id
        1, [[0, 1], [1, 1], [1, 1], [1, 1]], [[1, 1], [1, 1], [1, 1], [1, 0]],
        easy_ids=list(reversed(EASY)), samples=990, seconds=1200, curve=curve, evolution=evolution,
    )  # fmt: skip
    data = {
        "version": 1,
        "name": "hand example",
        "model": "tiny",
        "budget": {"max_samples": 1000},
        "validation": "val",
        "benchmarks": {
            "easy": {"k": 2, "description": "in distribution"},
            "hard": {"k": 2, "description": ""},
        },
        "reference_arms": ["base", "sdzero_sync"],
        "arms": {
            "base": _arm("base", "base", _run(0, [[1, 0], [0, 0], [1, 0], [0, 0]], HARD_BASE, samples=0)),
            "rft": _arm(
                "rft", "RFT", _run(0, [[1, 0], [1, 0], [1, 0], [0, 0]], HARD_BASE, samples=1200, curve=curve)
            ),
            "grpo": _arm("grpo", "GRPO", _run(0, [[0, 0], [1, 0], [1, 0], [0, 0]], HARD_BASE)),
            "sdft": _arm(
                "sdft",
                "SDFT",
                {"seed": 0, "status": "failed", "seconds": 120},
                _run(1, [[0, 1], [0, 0], [0, 1], [0, 0]], HARD_BASE, seconds=480),
            ),  # fmt: skip
            "sdzero_sync": _arm(
                "sdzero",
                "SD-Zero (sync)",
                _run(0, [[1, 1], [1, 0], [1, 1], [1, 0]], [[1, 1]] * 4, seconds=600, evolution=evolution),
                sdzero_seed1,
            ),  # fmt: skip
            "sdzero_nosync": _arm("sdzero", "SD-Zero (no sync)", {"seed": 0, "status": "pending"}),
        },
        "localization": {
            "wrong": {
                "divergence_share": 0.6,
                "token_share": 0.2,
                "ci95": {"divergence_share": [0.5, 0.7], "token_share": [0.15, 0.25]},
            },
            "correct": {"divergence_share": {"mean": 0.3, "ci95": [0.2, 0.4]}},
        },  # fmt: skip
    }
    return json.loads(json.dumps(data))  # no list shared between runs: a test may change one


def test_scores_differences_and_goal_by_hand() -> None:
    summary = summarise(parse_results(example()))
    easy, hard = summary.scores["easy"], summary.scores["hard"]
    assert set(easy) == {"base", "rft", "grpo", "sdft", "sdzero_sync"}  # the pending arm is not scored
    expected_avg = {"base": 0.25, "rft": 0.375, "grpo": 0.25, "sdft": 0.25, "sdzero_sync": 0.8125}
    expected_pass = {"base": 0.5, "rft": 0.75, "grpo": 0.5, "sdft": 0.5, "sdzero_sync": 1.0}
    for arm in expected_avg:
        assert easy[arm].scores["avg"].mean == pytest.approx(expected_avg[arm])
        assert easy[arm].scores["pass"].mean == pytest.approx(expected_pass[arm])
    assert easy["sdzero_sync"].seeds == 2 and easy["sdft"].seeds == 1
    assert easy["sdzero_sync"].per_problem["avg"].tolist() == [1.0, 0.75, 1.0, 0.5]
    assert easy["sdzero_sync"].scores["avg"].ci == bootstrap_interval([1.0, 0.75, 1.0, 0.5])
    assert hard["sdzero_sync"].scores["avg"].mean == pytest.approx(0.9375)

    vs_base = summary.difference("easy", "sdzero_sync", "base")
    assert vs_base.mean == pytest.approx(0.5625) and vs_base.relative == pytest.approx(225.0)
    assert vs_base.excludes_zero and vs_base.ci[0] > 0  # every per-problem difference is positive
    assert vs_base.ci == paired_bootstrap([1.0, 0.75, 1.0, 0.5], [0.5, 0.0, 0.5, 0.0])
    pass_vs_base = summary.difference("easy", "sdzero_sync", "base", "pass")
    assert pass_vs_base.mean == pytest.approx(0.5) and pass_vs_base.relative == pytest.approx(100.0)
    rft_vs_sdzero = summary.difference("easy", "rft", "sdzero_sync")
    assert rft_vs_sdzero.mean == pytest.approx(-0.4375)
    assert rft_vs_sdzero.relative == pytest.approx(-100 * 0.4375 / 0.8125)
    assert rft_vs_sdzero.ci[1] < 0
    assert summary.difference("easy", "rft", "base").relative == pytest.approx(50.0)
    sdft_vs_base = summary.difference("easy", "sdft", "base")  # the same per-problem scores
    assert sdft_vs_base.mean == 0 and sdft_vs_base.ci == (0.0, 0.0) and not sdft_vs_base.excludes_zero
    assert summary.difference("easy", "base", "base") is None

    hard_gain = summary.difference("hard", "sdzero_sync", "base")
    assert hard_gain.mean == pytest.approx(0.0625) and hard_gain.relative == pytest.approx(100 / 14)
    assert hard_gain.ci[0] == 0  # a third of the resamples miss h4, the only problem that differs

    goals = {goal.benchmark: goal for goal in summary.goals}
    assert goals["easy"].met and not goals["hard"].met
    assert any("+7.1 %" in reason and "below +10 %" in reason for reason in goals["hard"].reasons)
    assert [m.name for m in summary.missing] == ["sdzero_nosync"]


def test_markdown_states_the_numbers_and_the_verdict() -> None:
    text = render_markdown(summarise(parse_results(example())))
    assert "| SD-Zero (sync) | 2 | 990–1,000 | 81.2 [" in text
    assert "| RFT | 1 | 1,200 (over budget 1,000) | 37.5 [" in text
    assert "| SDFT | 1 (1 failed) | 1,000 | 25.0 [0.0, 50.0] | 50.0 [" in text
    assert "+56.2 pp [" in text and "+225.0 % *" in text
    assert "Δ avg@2 vs base [CI]" in text and "Δ pass@2 vs SD-Zero (sync) [CI]" in text
    assert "Missing (no done run, not scored): SD-Zero (no sync) (1 pending)." in text
    assert "| SD-Zero (sync) | 2 done | 30.0 | 15.0 |" in text  # 600 s + 1200 s
    assert "| SDFT | 1 done, 1 failed | 10.0 | 8.0 |" in text  # 120 s failed + 480 s done
    assert "- easy: **yes**." in text and "- hard: **no**." in text
    assert "Overall: **no** (met on 1 of 2 benchmarks)." in text
    assert "| wrong | 60.0 [50.0, 70.0] | 20.0 [15.0, 25.0] |" in text
    assert "| correct | 30.0 [20.0, 40.0] | — |" in text
    assert "## val" not in text  # the validation set selects checkpoints; it is never reported


def test_goal_is_no_when_a_baseline_is_missing_or_not_beaten() -> None:
    data = example()
    data["arms"]["grpo"]["runs"][0]["status"] = "failed"
    goals = {g.benchmark: g for g in summarise(parse_results(data)).goals}
    assert not goals["easy"].met and "no done grpo run to compare with" in goals["easy"].reasons

    data = example()  # rft equal to sdzero on e2: the interval of sdzero - rft reaches 0
    data["arms"]["rft"]["runs"][0]["benchmarks"]["easy"]["outcomes"] = [[1, 1], [1, 1], [1, 1], [1, 0]]
    goal = summarise(parse_results(data)).goals[0]
    assert not goal.met and any(r.startswith("vs rft:") and "does not lie above 0" in r for r in goal.reasons)


def test_localization_is_optional_and_rendered_only_where_it_parses() -> None:
    data = example()
    data["localization"] = {"wrong": 3, "correct": {"something": "else"}}
    assert "self-localization" not in render_markdown(summarise(parse_results(data)))
    del data["localization"]
    assert "self-localization" not in render_markdown(summarise(parse_results(data)))


# --- the bootstraps against known distributions ------------------------------------------------------


def test_bootstrap_interval_of_a_normal_mean_matches_the_analytic_interval() -> None:
    values = np.random.default_rng(7).normal(3.0, 2.0, size=5000)
    low, high = bootstrap_interval(values.tolist(), seed=1)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_bootstrap_interval_covers_the_true_mean_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(11)
    trials, covered = 300, 0
    for trial in range(trials):
        values = (rng.random(200) < 0.3).astype(float).tolist()
        low, high = bootstrap_interval(values, resamples=400, seed=trial)
        covered += low <= 0.3 <= high
    assert 0.91 <= covered / trials <= 0.98


def test_paired_bootstrap_matches_the_analytic_interval_of_the_mean_difference() -> None:
    rng = np.random.default_rng(3)
    first = rng.normal(0.5, 1.0, size=4000)
    second = first - rng.normal(0.1, 0.3, size=4000)
    differences = first - second
    low, high = paired_bootstrap(first.tolist(), second.tolist(), seed=2)
    half = 1.96 * differences.std(ddof=1) / math.sqrt(len(differences))
    assert low == pytest.approx(differences.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(differences.mean() + half, abs=0.1 * half)
    assert paired_bootstrap(first.tolist(), second.tolist(), seed=2) == (low, high)  # seeded


def test_paired_bootstrap_of_identical_arms_is_zero_and_pairing_narrows_correlated_arms() -> None:
    rng = np.random.default_rng(5)
    difficulty = rng.random(500)  # shared by both arms: what pairing cancels
    first = (rng.random((500, 8)) < difficulty[:, None]).mean(axis=1)
    second = np.clip(first + rng.normal(0.05, 0.05, size=500), 0, 1)
    assert paired_bootstrap(first.tolist(), first.tolist()) == (0.0, 0.0)
    paired_low, paired_high = paired_bootstrap(second.tolist(), first.tolist())
    width_first = np.subtract(*bootstrap_interval(first.tolist(), seed=1)[::-1])
    width_second = np.subtract(*bootstrap_interval(second.tolist(), seed=2)[::-1])
    unpaired_width = math.hypot(width_first, width_second)  # independent resamples: widths add in quadrature
    assert paired_low > 0
    assert paired_high - paired_low < 0.25 * unpaired_width
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([1.0, 2.0], [1.0])


# --- the command: malformed input, plots -------------------------------------------------------------


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "results.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _broken(change) -> dict[str, Any]:
    data = example()
    change(data)
    return data


MALFORMED = {
    "not json": ("{not json", "is not JSON"),
    "wrong version": (_broken(lambda d: d.update(version=2)), "schema version 2"),
    "missing arms": (_broken(lambda d: d.pop("arms")), "has no 'arms'"),
    "missing k": (_broken(lambda d: d["benchmarks"]["easy"].pop("k")), "benchmarks.easy has no 'k'"),
    "not an object": ("[1, 2]", "must be an object"),
    "ids differ": (
        _broken(
            lambda d: d["arms"]["rft"]["runs"][0]["benchmarks"]["easy"].update(ids=["e1", "e2", "e3", "x"])
        ),
        "benchmark 'easy': arm 'rft' seed 0 holds other problems",
    ),
    "short outcome row": (
        _broken(lambda d: d["arms"]["grpo"]["runs"][0]["benchmarks"]["hard"]["outcomes"].__setitem__(0, [1])),
        "arms.grpo.runs[0].benchmarks.hard.outcomes[0] must be 2 values",
    ),
    "unknown reference": (
        _broken(lambda d: d.update(reference_arms=["base", "sdzero"])),
        "reference arm 'sdzero'",
    ),
    "validation reported": (_broken(lambda d: d.update(validation="easy")), "validation benchmark 'easy'"),
    "done without outcomes": (
        _broken(lambda d: d["arms"]["base"]["runs"][0]["benchmarks"].pop("hard")),
        "no outcomes for benchmark 'hard'",
    ),
    "bad status": (
        _broken(lambda d: d["arms"]["sdzero_nosync"]["runs"][0].update(status="queued")),
        "status must",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_results_is_one_line_and_status_2(tmp_path: Path, capsys, case: str) -> None:
    data, expected = MALFORMED[case]
    status = cli.main(["compare-report", str(_write(tmp_path, data))])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == USER_ERROR_STATUS and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sdzero compare-report: error:") and expected in lines[0], lines[0]
    assert not (tmp_path / "summary.md").exists()


def test_missing_file_is_one_line(tmp_path: Path, capsys) -> None:
    assert cli.main(["compare-report", str(tmp_path / "nope.json")]) == USER_ERROR_STATUS
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_writes_summary_and_pngs_beside_the_results(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, example())
    assert cli.main(["compare-report", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Overall: **no** (met on 1 of 2 benchmarks)." in printed
    for name in ("accuracy.png", "samples.png", "evolution.png"):
        png = tmp_path / name
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC, name
    markdown = (tmp_path / "summary.md").read_text()
    assert "![accuracy](accuracy.png)" in markdown and "- easy: **yes**." in markdown
    assert load_results(path).arms["sdzero_sync"].runs[1].evolution  # the input is left as it was


def test_without_curves_the_optional_plots_are_skipped(tmp_path: Path, capsys) -> None:
    data = example()
    for arm in data["arms"].values():
        for run in arm["runs"]:
            run.pop("evolution", None)
            run["curve"] = []
    out = tmp_path / "report"
    assert cli.main(["compare-report", str(_write(tmp_path, data)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: samples.png skipped" in printed and "note: evolution.png skipped" in printed
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "summary.md"]
