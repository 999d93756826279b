"""srt-collect's pipeline with a scripted engine and grader: what is revised, kept, logged, resumed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError, from_dict
from megatron_sdzero.data.formatting import ChatFormat, resolve_phrases
from megatron_sdzero.data.problems import load_problems
from megatron_sdzero.rewards.base import Reward, RewardResult
from megatron_sdzero.rollout.base import Completion, SamplingParams, mix_seed, per_prompt
from megatron_sdzero.srt import store as store_module
from megatron_sdzero.srt.collect import collect, order_problems
from megatron_sdzero.srt.collector import Collector
from megatron_sdzero.srt.config import SRTConfig
from megatron_sdzero.srt.merge import MergeConfig, merge
from megatron_sdzero.srt.store import ATTEMPTS, STATE, TUPLES, CollectionStore

WRONG, REPHRASE = resolve_phrases("qwen3").incorrect, resolve_phrases("qwen3").correct


class ScriptedEngine:
    """Answers "RIGHT"/"WRONG" from a hash of (seed, sample index): 30% right at first, 60% on revision."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eot = ChatFormat(tokenizer).end_of_turn_id
        self.requests: list[tuple[list[int], SamplingParams]] = []

    def generate(self, prompts, params):
        outputs = []
        for prompt, p in zip(prompts, per_prompt(prompts, params), strict=True):
            self.requests.append((list(prompt), p))
            tail = self.tokenizer.decode(prompt[-30:])
            revision = tail.rstrip().endswith((WRONG, REPHRASE))
            outputs.append([self._answer(p.seed, j, 60 if revision else 30) for j in range(p.n)])
        return outputs

    def _answer(self, seed: int, index: int, percent_right: int) -> Completion:
        h = mix_seed(seed, index)
        text = f"attempt {h % 997} {'RIGHT' if h % 100 < percent_right else 'WRONG'}"
        return Completion(
            self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eot], text, "stop"
        )

    def close(self) -> None:
        pass


class ScriptedGrader(Reward):
    mode = "math"

    def __init__(self) -> None:
        self.answers: list = []

    def _grade_all(self, responses, answers):
        self.answers.extend(answers)
        return [RewardResult(float("RIGHT" in r), "scripted", r.split()[-1], 0.0) for r in responses]


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_sdzero.assets.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _config(tmp_path: Path, **collect) -> SRTConfig:
    values = {
        "model": {"path": "unused-model", "family": "qwen3"},  # the scripted engine loads nothing
        "problems": {"arithmetic": {"n": 24, "seed": 0, "difficulty": 1}},
        "sampling": {"max_tokens": 32, "temperature": 1.0, "top_p": 0.9},
        "rollout": {"max_model_len": 4096},
        "collect": {
            "output_dir": str(tmp_path / "run"),
            "target": 1000,
            "batch_size": 5,
            "num_responses": 3,
            "num_revisions": 2,
            "progress": False,
            **collect,
        },
    }
    return from_dict(SRTConfig, values)


def _run(config: SRTConfig, tokenizer) -> dict:
    return collect(config, engine=ScriptedEngine(tokenizer), grader=ScriptedGrader())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_batch_revises_the_wrong_answers_and_keeps_the_right_revisions(tmp_path: Path, tokenizer) -> None:
    config = _config(tmp_path)
    problems, _ = load_problems(config.problems)
    engine, grader = ScriptedEngine(tokenizer), ScriptedGrader()
    collector = Collector(
        engine,
        grader,
        ChatFormat(tokenizer),
        resolve_phrases("qwen3"),
        config.sampling,
        config.collect,
        config.prompt,
        max_model_len=4096,
    )
    out = collector.run_batch(problems[:6])

    inits = [a for a in out.attempts if a["kind"] == "init"]
    revisions = [a for a in out.attempts if a["kind"] == "revision"]
    assert len(inits) == 6 * 3 and out.counters.init_attempts == 18
    wrong = [(a["problem_id"], a["init_index"]) for a in inits if a["reward"] == 0.0]
    assert sorted({(a["problem_id"], a["init_index"]) for a in revisions}) == sorted(wrong)  # only wrong ones
    assert len(revisions) == 2 * len(wrong) and all(a["phrase"] == WRONG for a in revisions)
    kept = [(a["problem_id"], a["init_index"], a["revision_index"]) for a in revisions if a["reward"] == 1.0]
    assert [(t["problem_id"], t["init_index"], t["revision_index"]) for t in out.tuples] == kept and kept
    assert out.counters.tuples_kept == len(kept) and out.counters.revision_correct == len(kept)

    record = out.tuples[0]
    problem = next(p for p in problems if p.id == record["problem_id"])
    assert (
        record["answer"] == problem.answer and record["init_correct"] is False and record["phrase"] == WRONG
    )
    assert record["y_revised"].endswith("RIGHT") and record["y_init"].endswith("WRONG")
    assert record["y_init_ids"][-1] == ChatFormat(tokenizer).end_of_turn_id  # ids kept exactly as sampled
    assert grader.answers[:18] == [p.answer for p in problems[:6] for _ in range(3)]

    fmt = ChatFormat(tokenizer)
    init_prompt, init_params = engine.requests[0]
    assert init_params.seed == mix_seed(0, problems[0].id, "init") and init_params.n == 3
    assert init_params.max_tokens == 32 and fmt.end_of_turn_id in init_params.stop_token_ids
    revision_prompt, revision_params = engine.requests[6]
    k, i = next((k, i) for k, p in enumerate(problems[:6]) for i in range(3) if (p.id, i) in wrong)
    assert revision_params.seed == mix_seed(0, problems[k].id, "revise", i) and revision_params.n == 2
    assert revision_prompt == fmt.revision_prompt(
        engine.requests[k][0], _init_ids(out, problems[k].id, i, tokenizer), WRONG
    )


def _init_ids(out, problem_id: str, index: int, tokenizer) -> list[int]:
    text = next(a["text"] for a in out.attempts if a["problem_id"] == problem_id and a["init_index"] == index)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [ChatFormat(tokenizer).end_of_turn_id]


def test_revise_correct_uses_the_rephrase_phrase(tmp_path: Path, tokenizer) -> None:
    summary = _run(_config(tmp_path, revise_correct=True), tokenizer)
    revisions = [a for a in _lines(tmp_path / "run" / ATTEMPTS) if a["kind"] == "revision"]
    assert {a["phrase"] for a in revisions if a["init_reward"] == 1.0} == {REPHRASE}
    assert {a["phrase"] for a in revisions if a["init_reward"] == 0.0} == {WRONG}
    assert summary["revision_attempts"] == summary["init_attempts"] * 2
    assert any(t["init_correct"] for t in _lines(tmp_path / "run" / TUPLES))


def test_collection_stops_at_the_target_and_the_summary_adds_up(tmp_path: Path, tokenizer) -> None:
    summary = _run(_config(tmp_path, target=7), tokenizer)
    tuples, attempts = _lines(tmp_path / "run" / TUPLES), _lines(tmp_path / "run" / ATTEMPTS)
    assert len(tuples) == summary["tuples_kept"] == 7 and summary["complete"]
    kinds = Counter(a["kind"] for a in attempts)
    assert kinds["init"] == summary["init_attempts"] < 24 * 3  # stopped before the problems ran out
    assert sum(a["reward"] for a in attempts if a["kind"] == "init") == summary["init_correct"]
    assert kinds["revision"] == summary["revision_attempts"]
    assert summary["init_accuracy"] == pytest.approx(
        summary["init_correct"] / summary["init_attempts"], abs=1e-6
    )
    assert summary["problems_done"] == summary["problems"] == 5 * summary["batches"]
    again = _run(_config(tmp_path, target=7), tokenizer)  # already complete: nothing more is drawn
    assert again["tuples_kept"] == 7 and _lines(tmp_path / "run" / ATTEMPTS) == attempts
    more = _run(_config(tmp_path, target=12), tokenizer)  # a larger target continues the same run
    assert more["tuples_kept"] == 12 and _lines(tmp_path / "run" / TUPLES)[:7] == tuples


class Crash(Exception):
    pass


def _crash_on(monkeypatch, call: int, torn: bool) -> None:
    """Make the call-th file write of the store die midway (a torn line) or right before it."""
    counter = {"n": 0}
    real_append, real_state = store_module.append_jsonl, store_module.write_json_atomic

    def append(path, records):
        counter["n"] += 1
        if counter["n"] == call:
            records = list(records)
            if torn and records:
                with path.open("ab") as f:
                    f.write(json.dumps(records[0]).encode()[:17])
            raise Crash(f"killed while appending to {path.name}")
        return real_append(path, records)

    def state(path, payload):
        counter["n"] += 1
        if counter["n"] == call:
            path.with_name(path.name + ".tmp").write_text("{half a state")
            raise Crash("killed while writing state")
        return real_state(path, payload)

    monkeypatch.setattr(store_module, "append_jsonl", append)
    monkeypatch.setattr(store_module, "write_json_atomic", state)


@pytest.mark.parametrize("call,torn", [(1, True), (2, False), (3, False), (5, True), (7, False), (9, True)])
def test_a_crash_anywhere_loses_and_duplicates_nothing(
    tmp_path: Path, tokenizer, monkeypatch, call, torn
) -> None:
    reference = _run(_config(tmp_path / "ref", target=40), tokenizer)
    with monkeypatch.context() as patch:
        _crash_on(patch, call, torn)
        with pytest.raises(Crash):
            _run(_config(tmp_path / "crashed", target=40), tokenizer)
    resumed = _run(_config(tmp_path / "crashed", target=40), tokenizer)
    for name in (TUPLES, ATTEMPTS):
        assert (tmp_path / "crashed" / "run" / name).read_bytes() == (
            tmp_path / "ref" / "run" / name
        ).read_bytes()
    for key in ("tuples_kept", "init_attempts", "revision_attempts", "problems", "batches"):
        assert resumed[key] == reference[key]


def test_a_restart_with_other_sampling_settings_is_refused(tmp_path: Path, tokenizer) -> None:
    _run(_config(tmp_path, target=3), tokenizer)
    with pytest.raises(ConfigError, match="collect.num_responses"):
        _run(_config(tmp_path, target=3, num_responses=2), tokenizer)
    state = json.loads((tmp_path / "run" / STATE).read_text())
    (tmp_path / "run" / TUPLES).write_bytes(b"")  # someone truncated the output: refuse, do not guess
    with pytest.raises(RuntimeError, match="were committed"):
        _run(_config(tmp_path, target=3), tokenizer)
    assert state["tuples_bytes"] > 0


def test_shards_partition_the_problems_and_merge_without_duplicates(tmp_path: Path, tokenizer) -> None:
    whole = _config(tmp_path / "whole")
    _run(whole, tokenizer)
    shard_dirs = []
    for index in range(3):
        config = _config(tmp_path / f"shard{index}", shard_index=index, num_shards=3)
        _run(config, tokenizer)
        shard_dirs.append(config.collect.output_dir)
    problems, _ = load_problems(whole.problems)
    ids = [
        {p.id for p in order_problems(problems, _config(tmp_path, shard_index=i, num_shards=3).collect)}
        for i in range(3)
    ]
    assert set().union(*ids) == {p.id for p in problems} and sum(map(len, ids)) == len(problems)

    summary = merge(MergeConfig(inputs=[*shard_dirs, shard_dirs[0]], output_dir=tmp_path / "merged"))
    merged = _lines(tmp_path / "merged" / TUPLES)
    expected = _lines(whole.collect.output_dir / TUPLES)
    key = lambda t: (t["problem_id"], t["init_index"], t["revision_index"])  # noqa: E731
    assert sorted(merged, key=key) == sorted(expected, key=key)
    assert summary["tuples_kept"] == len(expected) and summary["problems_done"] == len(problems)
    assert (
        summary["init_attempts"] == _run(whole, tokenizer)["init_attempts"]
    )  # the repeated shard counts once
    store = CollectionStore.open(tmp_path / "merged", json.loads(json.dumps(_identity(tmp_path / "merged"))))
    assert list(store.tuples()) == merged  # the merged directory is a valid collection directory

    capped = merge(MergeConfig(inputs=shard_dirs, output_dir=tmp_path / "capped", target=5))
    assert capped["tuples_kept"] == 5 == len(_lines(tmp_path / "capped" / TUPLES))
    with pytest.raises(ConfigError, match="one of the inputs"):
        merge(MergeConfig(inputs=shard_dirs, output_dir=shard_dirs[0]))
    other = _config(tmp_path / "other", num_revisions=1, shard_index=1, num_shards=3)
    _run(other, tokenizer)
    with pytest.raises(ConfigError, match="different recipe"):
        merge(MergeConfig(inputs=[shard_dirs[0], other.collect.output_dir], output_dir=tmp_path / "bad"))


def _identity(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_prompts_without_room_are_skipped_and_counted(tmp_path: Path, tokenizer) -> None:
    config = _config(tmp_path, target=1000)
    config.rollout.max_model_len = 40  # the chat prompt alone is longer
    summary = _run(config, tokenizer)
    assert summary["skipped_prompts"] == 24 and summary["init_attempts"] == 0
    assert Counter(a["kind"] for a in _lines(tmp_path / "run" / ATTEMPTS)) == {"skipped": 24}


def test_recipe_errors_are_caught_before_any_work(tmp_path: Path) -> None:
    values = {"model": {"path": "m", "family": "llama"}, "problems": {"arithmetic": {"n": 2}}}
    with pytest.raises(ConfigError, match="no default control phrase"):
        from_dict(SRTConfig, values)
    with pytest.raises(ConfigError, match="does not grade"):
        from_dict(
            SRTConfig, {**values, "model": {"path": "m", "family": "qwen3"}, "reward": {"mode": "code"}}
        )
    with pytest.raises(ConfigError, match="shard_index"):
        from_dict(
            SRTConfig,
            {
                **values,
                "model": {"path": "m", "family": "qwen3"},
                "collect": {"shard_index": 3, "num_shards": 3},
            },
        )
    # The family decides the phrases, never the path: an "olmo" directory with family qwen3 gets Qwen's.
    config = from_dict(SRTConfig, {**values, "model": {"path": "/ckpt/olmo-sft", "family": "qwen3"}})
    assert resolve_phrases(config.model.family, config.phrases).for_reward(0) == WRONG


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    first = CollectionStore.open(tmp_path / "run", {"a": 1})
    with pytest.raises(RuntimeError, match="another process is writing"):
        CollectionStore.open(tmp_path / "run", {"a": 1})
    first.close()
    with CollectionStore.open(tmp_path / "run", {"a": 1}) as again:
        assert again.counters.batches == 0
