"""sdzero localize: D_t against a float64 reference at Phase 2's positions, the share arithmetic, the
alignment of a first answer with its revision, and the command end to end (files, one-line errors)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatron_sdzero import cli
from megatron_sdzero.assets.tiny import IM_END, make_tiny_model
from megatron_sdzero.data.formatting import ChatFormat, build_messages
from megatron_sdzero.errors import USER_ERROR_STATUS
from megatron_sdzero.experiment.localization import (
    LocalizeConfig,
    Localizer,
    Pair,
    Sequenced,
    differing_tokens,
    load_model,
    load_pairs,
    measure_all,
    resolve_localize_phrases,
    sequence_shares,
    summarize_group,
    token_divergence,
)
from megatron_sdzero.losses import DistillLossConfig, distill_loss
from megatron_sdzero.report import PNG_MAGIC
from megatron_sdzero.srt.store import CollectionStore, Counters

WRONG = "Wait, this response is wrong. Let me correct it."
RIGHT = "Let me rephrase the above solution."


@pytest.fixture(autouse=True)
def _no_log_redirect(monkeypatch):
    """The command points SDZERO_LOG_FILE at its output directory: undo that after each test."""
    from megatron_sdzero.runtime import quiet

    for name in (quiet.LOG_FILE_ENV, quiet.VERBOSE_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny llama models with one tokenizer: teacher and a different student."""
    root = tmp_path_factory.mktemp("localize_models")
    common = dict(family="llama", num_layers=2, initializer_range=0.3)
    return {
        "teacher": make_tiny_model(root / "teacher", seed=1, **common),
        "student": make_tiny_model(root / "student", seed=2, **common),
    }


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models["teacher"]))


def _ids(tokenizer, text: str, stop: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.convert_tokens_to_ids(IM_END)] if stop else [])


def _tuple(tokenizer, pid: str, init_index: int, correct: bool, y: str, revised: str, **extra) -> dict:
    problem = f"Problem {pid}: what is 2 + 3?"
    record = {
        "problem_id": pid,
        "mode": "math",
        "problem": problem,
        "answer": "5",
        "messages": build_messages(problem, "math"),
        "init_index": init_index,
        "revision_index": 0,
        "init_correct": correct,
        "init_reward": float(correct),
        "phrase": RIGHT if correct else WRONG,
        "y_init": y,
        "y_init_ids": _ids(tokenizer, y),
        "y_revised": revised,
        "y_revised_ids": _ids(tokenizer, revised),
        "revised_reward": 1.0,
    }
    return {**record, **extra}


def _records(tokenizer) -> list[dict]:
    wrong = "We add the numbers. 2 + 3 = 6, so the answer is \\boxed{6}."
    right = "We add the numbers. 2 + 3 = 5, so the answer is \\boxed{5}."
    return [
        _tuple(tokenizer, "a", 0, False, wrong, right),
        _tuple(tokenizer, "a", 0, False, wrong, "Adding: 5. \\boxed{5}", revision_index=1),  # same y again
        _tuple(
            tokenizer,
            "b",
            1,
            False,
            "First 2 + 3 is 7. Then \\boxed{7}.",
            "First 2 + 3 is 5. Then \\boxed{5}.",
        ),
        _tuple(tokenizer, "c", 0, False, wrong, "nothing good", revised_reward=0.0),  # revision not verified
        _tuple(tokenizer, "d", 0, True, right, "So 2 + 3 = 5, and the answer is \\boxed{5}."),
        _tuple(tokenizer, "e", 2, True, right, right),  # the revision repeats y: no differing token
    ]


def _store(root: Path, records: list[dict]) -> Path:
    with CollectionStore.open(root, {"test": True}) as store:
        store.commit(sorted({r["problem_id"] for r in records}), records, [], Counters())
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer) -> Path:
    return _store(tmp_path_factory.mktemp("localize_store"), _records(tokenizer))


# --- (a) D_t at the right positions, against a float64 reference ------------------------------------


def _reference_rows(
    pair: Pair, phrase: str, tokenizer, teacher, student
) -> tuple[torch.Tensor, torch.Tensor]:
    """Built here from the definition: teacher = prompt + body(y) + delim + y, student = prompt + y."""
    prompt = tokenizer.apply_chat_template(
        pair.messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    prompt = list(prompt["input_ids"])
    y = pair.y_ids
    assert y[-1] == tokenizer.convert_tokens_to_ids(IM_END)
    delim = tokenizer(f"\n\n{phrase}\n\n", add_special_tokens=False)["input_ids"]
    teacher_ids = prompt + y[:-1] + delim + y
    student_ids = prompt + y
    phase2 = ChatFormat(tokenizer).teacher_input(prompt, y, phrase, budget=10_000)
    assert phase2.input_ids.tolist() == teacher_ids  # the project's Phase 2 teacher input
    assert phase2.student_input_ids.tolist() == student_ids
    with torch.no_grad():
        t_logits = teacher(input_ids=torch.tensor([teacher_ids])).logits[0].double()
        s_logits = student(input_ids=torch.tensor([student_ids])).logits[0].double()
    first_t, first_s = len(teacher_ids) - len(y), len(prompt)
    return s_logits[first_s - 1 : first_s - 1 + len(y)], t_logits[first_t - 1 : first_t - 1 + len(y)]


def test_token_divergence_is_phase2s_reverse_kl_at_the_second_copy_of_y(models, tokenizer, store) -> None:
    config = LocalizeConfig(
        teacher=models["teacher"], student=models["student"], records=[store], batch_size=3
    )
    loaded = load_pairs(config.records)
    phrases = resolve_localize_phrases(config.phrases, loaded.phrases)
    assert (phrases.correct, phrases.incorrect) == (RIGHT, WRONG)
    teacher, student = load_model(models["teacher"], config), load_model(models["student"], config)
    localizer = Localizer(teacher, student, tokenizer, phrases, config)
    results = measure_all(localizer, loaded.pairs, config.batch_size)  # padded batches of 3 and 1
    assert [r.pair.problem_id for r in results] == ["a", "b", "d", "e"]
    for result in results:
        s_rows, t_rows = _reference_rows(
            result.pair, phrases.for_reward(result.pair.init_correct), tokenizer, teacher, student
        )
        log_p, log_q = s_rows.log_softmax(-1), t_rows.log_softmax(-1)
        reference = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(student || teacher) per token
        assert len(result.divergences) == len(result.pair.y_ids)
        torch.testing.assert_close(
            torch.tensor(result.divergences, dtype=torch.float64), reference, rtol=1e-5, atol=1e-8
        )
        assert reference.std() > 1e-3  # the tokens differ: a shifted position would not match


def test_the_default_student_is_the_teacher(models, tokenizer, store) -> None:
    config = LocalizeConfig(teacher=models["teacher"], records=[store])
    loaded = load_pairs(config.records)
    phrases = resolve_localize_phrases(config.phrases, loaded.phrases)
    teacher = load_model(models["teacher"], config)
    [result] = Localizer(teacher, teacher, tokenizer, phrases, config).measure(loaded.pairs[:1])
    s_rows, t_rows = _reference_rows(result.pair, WRONG, tokenizer, teacher, teacher)
    log_p, log_q = s_rows.log_softmax(-1), t_rows.log_softmax(-1)
    torch.testing.assert_close(
        torch.tensor(result.divergences, dtype=torch.float64),
        (log_p.exp() * (log_p - log_q)).sum(-1),
        rtol=1e-5,
        atol=1e-8,
    )


KINDS = [
    DistillLossConfig(kind="reverse"),
    DistillLossConfig(kind="forward", temperature=0.7),
    DistillLossConfig(kind="mixed", mixed_forward_weight=0.3),
    DistillLossConfig(kind="jsd", jsd_beta=0.2),
    DistillLossConfig(kind="reverse", top_k=5),
    DistillLossConfig(kind="mixed", top_k=5, top_k_tail=True, temperature=1.3),
    DistillLossConfig(kind="jsd", top_k=7, top_k_tail=True),
]


@pytest.mark.parametrize(
    "config", KINDS, ids=lambda c: f"{c.kind}-k{c.top_k}-tail{c.top_k_tail}-T{c.temperature}"
)
def test_every_loss_kind_matches_the_phase2_loss_per_token(config: DistillLossConfig) -> None:
    gen = torch.Generator().manual_seed(7)
    student, teacher = (3 * torch.randn(2, 6, 50, generator=gen) for _ in range(2))
    mask = torch.ones(2, 6, dtype=torch.bool)
    _, metrics = distill_loss(student, teacher, mask, config=dataclasses.replace(config, backend="torch"))
    ours = token_divergence(student.reshape(-1, 50), teacher.reshape(-1, 50), config)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), metrics.token_values.reshape(-1), rtol=2e-5, atol=2e-6)


# --- (b) the share arithmetic -----------------------------------------------------------------------


def _measured(divergences: list[float], differing: list[bool], correct: bool = False) -> Sequenced:
    pair = Pair("p", 0, correct, [], [1] * len(divergences), [])
    return Sequenced(pair, divergences, differing, truncated=False)


def test_shares_and_group_means_by_hand() -> None:
    first = _measured([0.5, 1.5, 2.0, 0.0], [False, True, True, False])  # 3.5 / 4 of D on 2 of 4 tokens
    second = _measured([1.0, 1.0, 1.0, 1.0], [True, False, False, False])  # 1 / 4 on 1 of 4
    assert sequence_shares(first.divergences, first.differing) == (0.875, 0.5)
    assert sequence_shares(second.divergences, second.differing) == (0.25, 0.25)
    skipped = [
        _measured([1.0, 2.0], [False, False]),  # no differing token
        _measured([0.0, 0.0], [True, False]),  # zero divergence
        _measured([], []),  # nothing of y fits the budgets
    ]
    summary = summarize_group([first, *skipped, second])
    assert summary["first_answers"] == 5 and summary["sequences"] == 2
    assert summary["skipped"] == {"no_differing_tokens": 1, "zero_divergence": 1, "nothing_fits": 1}
    expected = {"divergence_share": 0.5625, "token_share": 0.375, "ratio": 1.375, "excess": 0.1875}
    for name, mean in expected.items():
        assert summary[name]["mean"] == pytest.approx(mean, abs=1e-15)
        low, high = summary[name]["ci95"]
        assert low <= mean <= high
    assert summary["divergence_share"]["ci95"][0] >= 0.25 and summary["divergence_share"]["ci95"][1] <= 0.875
    assert summary["ratio_of_means"] == pytest.approx(1.5, abs=1e-15)
    assert summary["pooled_divergence_share"] == pytest.approx(4.5 / 8, abs=1e-15)
    assert summary["pooled_token_share"] == pytest.approx(3 / 8, abs=1e-15)
    assert summarize_group(skipped)["sequences"] == 0 and "divergence_share" not in summarize_group(skipped)


# --- (c) alignment -----------------------------------------------------------------------------------


def test_alignment_marks_exactly_the_changed_tokens() -> None:
    y = [1, 2, 3, 4, 5, 6, 7, 8]
    revised = [1, 2, 9, 4, 5, 6, 8, 10]  # 3 replaced by 9, 7 deleted, 10 appended
    assert differing_tokens(y, revised) == [False, False, True, False, False, False, True, False]
    assert differing_tokens(y, [0, *y[:4], 11, 12, *y[4:]]) == [False] * 8  # insertions change no token of y
    assert differing_tokens(y, y) == [False] * 8
    assert differing_tokens(y, []) == [True] * 8
    # Long answers with frequent tokens: difflib's autojunk would drop 5 and 6 from the match.
    long_y, long_revised = [5, 6] * 120 + [1], [5, 6] * 120 + [2]
    assert differing_tokens(long_y, long_revised) == [False] * 240 + [True]


def test_alignment_of_a_real_pair_marks_the_wrong_numbers(tokenizer) -> None:
    y = _ids(tokenizer, "so 2 + 3 = 6 and the answer is 6.")
    revised = _ids(tokenizer, "so 2 + 3 = 5 and the answer is 5.")
    flagged = [tokenizer.decode([t]) for t, f in zip(y, differing_tokens(y, revised), strict=True) if f]
    assert "".join(flagged).replace(" ", "") == "66"


# --- (d) the command ---------------------------------------------------------------------------------


def test_command_writes_numbers_and_figure(models, store, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    status = cli.main([
        "localize", f"teacher={models['teacher']}", f"records=[{store}]", f"output_dir={out}",
        "examples=1", "batch_size=2", "progress=false",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0, printed
    result = json.loads((out / "localization.json").read_text())
    assert result["records"] == {
        "read": 6, "revision_not_verified": 1, "further_revisions_dropped": 1, "first_answers_measured": 4,
    }  # fmt: skip
    wrong, correct = result["groups"]["wrong"], result["groups"]["correct"]
    assert wrong["sequences"] == 2 and correct["sequences"] == 1
    assert correct["skipped"]["no_differing_tokens"] == 1
    assert 0 < wrong["divergence_share"]["mean"] < 1 and 0 < wrong["token_share"]["mean"] < 1
    assert [e["group"] for e in result["examples"]] == ["wrong", "correct"]
    example = result["examples"][0]
    assert len(example["tokens"]) == len(example["divergence"]) == len(example["differing"])
    assert (example["divergence_share"], example["token_share"]) == sequence_shares(
        example["divergence"], example["differing"]
    )
    assert (out / "localization.png").read_bytes().startswith(PNG_MAGIC)
    assert "wrong first answers: 2 sequences" in printed and "localization.json" in printed


def _fail(capsys, *argv: str) -> str:
    status = cli.main(["localize", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == USER_ERROR_STATUS, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sdzero localize: error:")
    return lines[0]


def test_bad_inputs_are_one_line_errors(models, store, tokenizer, tmp_path, capsys) -> None:
    teacher, out = f"teacher={models['teacher']}", f"output_dir={tmp_path / 'out'}"
    assert "does not exist" in _fail(capsys, teacher, f"records=[{tmp_path / 'nowhere'}]", out)
    assert "not a directory" in _fail(capsys, f"teacher={tmp_path / 'no_model'}", f"records=[{store}]", out)
    (tmp_path / "not_a_model").mkdir()
    assert "config.json" in _fail(capsys, f"teacher={tmp_path / 'not_a_model'}", f"records=[{store}]", out)
    empty = _store(tmp_path / "empty", [])
    assert "hold no records" in _fail(capsys, teacher, f"records=[{empty}]", out)
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(_records(tokenizer)[0]) + '\n{"problem_id": \n')
    assert "torn or corrupt line" in _fail(capsys, teacher, f"records=[{torn}]", out)
    rft = tmp_path / "rft.jsonl"
    rft.write_text(json.dumps({"problem_id": "a", "y_ids": [1, 2], "reward": 1.0}) + "\n")
    assert "lacks" in _fail(capsys, teacher, f"records=[{rft}]", out)
    unverified = [{**r, "revised_reward": 0.0} for r in _records(tokenizer)]
    assert "verified correct" in _fail(
        capsys, teacher, f"records=[{_store(tmp_path / 'bad', unverified)}]", out
    )
    assert "max_records" in _fail(capsys, teacher, f"records=[{store}]", "max_records=0")
    foreign = [{**r, "y_init_ids": [10**6, *r["y_init_ids"]]} for r in _records(tokenizer)]
    assert "another model" in _fail(
        capsys, teacher, f"records=[{_store(tmp_path / 'foreign', foreign)}]", out
    )


@pytest.mark.slow
def test_a_megatron_teacher_is_exported_and_measures_the_same(models, store, tmp_path, capsys) -> None:
    from megatron_sdzero.conversion.convert import hf_to_mcore

    megatron = hf_to_mcore(models["teacher"], tmp_path / "mcore", tp=1, pp=1)
    runs = {}
    for name, teacher in (("hf", models["teacher"]), ("megatron", megatron)):
        args = [f"teacher={teacher}", f"records=[{store}]", f"output_dir={tmp_path / name}", "progress=false"]
        assert cli.main(["localize", *args]) == 0, capsys.readouterr().err
        runs[name] = json.loads((tmp_path / name / "localization.json").read_text())
    assert (tmp_path / "megatron" / "hf_teacher" / "model.safetensors").is_file()
    for got, want in zip(runs["megatron"]["examples"], runs["hf"]["examples"], strict=True):
        assert got["tokens"] == want["tokens"] and got["differing"] == want["differing"]
        torch.testing.assert_close(torch.tensor(got["divergence"]), torch.tensor(want["divergence"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_measures_what_the_cpu_does(models, store, tmp_path, capsys) -> None:
    runs = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        out = tmp_path / f"{device}_{dtype}"
        args = [f"teacher={models['teacher']}", f"student={models['student']}", f"records=[{store}]"]
        args += [f"output_dir={out}", f"device={device}", f"dtype={dtype}", "progress=false"]
        assert cli.main(["localize", *args]) == 0, capsys.readouterr().err
        runs[device, dtype] = json.loads((out / "localization.json").read_text())
    cpu, fp32, bf16 = runs["cpu", "float32"], runs["cuda", "float32"], runs["cuda", "bfloat16"]
    for key in ("wrong", "correct"):
        assert (
            fp32["groups"][key]["sequences"]
            == bf16["groups"][key]["sequences"]
            == cpu["groups"][key]["sequences"]
        )
    for want, got32, got16 in zip(cpu["examples"], fp32["examples"], bf16["examples"], strict=True):
        reference = torch.tensor(want["divergence"], dtype=torch.float64)
        torch.testing.assert_close(
            torch.tensor(got32["divergence"], dtype=torch.float64), reference, rtol=1e-4, atol=1e-5
        )
        low_precision = torch.tensor(got16["divergence"], dtype=torch.float64)
        assert torch.isfinite(low_precision).all() and (low_precision >= -1e-12).all()
        assert (
            torch.corrcoef(torch.stack([low_precision, reference]))[0, 1] > 0.9
        )  # bf16 logits: close, not equal
