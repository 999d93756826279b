"""Malformed inputs through the real CLI: one line on stderr, exit status 2, nothing that blocks a rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from megatron_sdzero import cli
from megatron_sdzero.checks import PHRASES_FILE, write_phrases
from megatron_sdzero.config import load_config
from megatron_sdzero.conversion.megatron_io import MODEL_META, TRACKER
from megatron_sdzero.data.formatting import ControlPhrases
from megatron_sdzero.errors import USER_ERROR_STATUS
from megatron_sdzero.srt.config import SRTConfig, run_identity

ARITHMETIC = ["problems.arithmetic.n=4", "problems.mode=math"]


@pytest.fixture(autouse=True)
def _no_run_log_leaks(monkeypatch):
    """A command that got as far as naming its run directory points SDZERO_LOG_FILE at it: undo that."""
    from megatron_sdzero.runtime import quiet

    for name in (quiet.LOG_FILE_ENV, quiet.VERBOSE_ENV):
        monkeypatch.setenv(name, "")  # recorded, so teardown restores the value before the test
        monkeypatch.delenv(name)


def _fail(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit status 2, no traceback, exactly one stderr line; return it."""
    status = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == USER_ERROR_STATUS, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _collect_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "srt-collect",
        f"model.path={tmp_path / 'no_such_model'}",
        "model.family=qwen3",
        f"collect.output_dir={tmp_path / 'run'}",
        *extra,
    ]


def _fake_mcore(root: Path, model_type: str = "qwen3") -> Path:
    """A directory that passes for a converted Megatron checkpoint (metadata only, no weights)."""
    root.mkdir(parents=True)
    (root / TRACKER).write_text("release")
    meta = dict(
        hf_config={"model_type": model_type}, params_dtype="float32", make_vocab_size_divisible_by=128
    )
    (root / MODEL_META).write_text(json.dumps({**meta, "source": ""}))
    return root


def _distill_args(student: Path, *extra: str) -> list[str]:
    return ["distill", f"student.checkpoint={student}", "checkpoint.save=/tmp/x", *ARITHMETIC, *extra]


# --- problem sources -----------------------------------------------------------------------------------


def test_malformed_problem_row_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer"\n')
    line = _fail(capsys, *_collect_args(tmp_path, f"problems.path={path}"))
    assert f"{path}:2: invalid json" in line and "problems.strict=false" in line
    assert not (tmp_path / "run").exists()


def test_non_utf8_problem_row_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "\xff\xfe", "answer": "1"}\n')
    line = _fail(capsys, *_collect_args(tmp_path, f"problems.path={path}"))
    assert f"{path}:2: not utf-8" in line


def test_non_strict_counts_bad_rows_and_still_needs_one_good_one(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"problem": "\xff"}\nnot json\n{"problem": "x"}\n')
    line = _fail(capsys, *_collect_args(tmp_path, f"problems.path={path}", "problems.strict=false"))
    assert "none of its 3 rows is a valid problem (3 malformed:" in line
    assert "1 not utf-8" in line and "1 invalid json" in line and "1 missing answer" in line


@pytest.mark.parametrize("command", ["srt-collect", "eval"])
def test_empty_problems_file_is_an_error_not_an_empty_run(tmp_path, capsys, command):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    if command == "eval":
        argv = [
            "eval",
            f"model.path={tmp_path}/m",
            f"problems.path={path}",
            f"output.report={tmp_path}/r.json",
        ]
    else:
        argv = _collect_args(tmp_path, f"problems.path={path}")
    line = _fail(capsys, *argv)
    assert f"{path} holds no problems" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()


def test_missing_problems_path(tmp_path, capsys):
    line = _fail(capsys, *_collect_args(tmp_path, f"problems.path={tmp_path}/nope.jsonl"))
    assert f"problems.path: {tmp_path}/nope.jsonl does not exist" in line


# --- configs -------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: m\n  family: [qwen3\nproblems: {}\n")
    line = _fail(capsys, "srt-collect", "--config", str(recipe))
    assert line.startswith(f"sdzero srt-collect: error: {recipe}:4:") and "YAML syntax error" in line
    assert "<unicode string>" not in line


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["sft", "init=x", "data.stage1=a", "data.stage2=b", "train.micro_batch_size=-1"],
            "micro_batch_size",
        ),
        (
            ["sft", "init=x", "data.stage1=a", "data.stage2=b", "train.global_batch_size=0"],
            "global_batch_size",
        ),
        (
            ["srt-collect", "model.path=m", "model.family=qwen3", *ARITHMETIC, "collect.batch_size=0"],
            "batch_size",
        ),
        (
            ["distill", "student.checkpoint=s", "checkpoint.save=o", *ARITHMETIC, "loss.temperature=0"],
            "loss:",
        ),
        (["distill", *ARITHMETIC, "checkpoint.save=o"], "student: required"),
        (["eval", "model.path=m", *ARITHMETIC, "eval.k=[1"], "not valid YAML"),
    ],
)
def test_bad_values_are_one_line(capsys, argv, needle):
    assert needle in _fail(capsys, *argv)


# --- output directories, resumes, stores ----------------------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    line = _fail(
        capsys, "sft", f"init={tmp_path}/x", "data.stage1=a", "data.stage2=b", f"output_dir={tmp_path}/out"
    )
    assert f"output_dir: {tmp_path}/out is a file" in line
    line = _fail(capsys, *_collect_args(tmp_path, *ARITHMETIC, f"collect.output_dir={tmp_path}/out/run"))
    assert "cannot be created" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    line = _fail(capsys, *_collect_args(tmp_path, *ARITHMETIC, f"collect.output_dir={parent}/run"))
    assert "is not writable" in line


def test_missing_model_leaves_nothing_that_refuses_the_corrected_rerun(tmp_path, capsys):
    line = _fail(capsys, *_collect_args(tmp_path, *ARITHMETIC))
    assert f"model.path: {tmp_path}/no_such_model does not exist" in line
    assert not (tmp_path / "run" / "config.yaml").exists()
    # The rerun with another model path (and seed) gets past the directory's identity check.
    line = _fail(
        capsys, *_collect_args(tmp_path, *ARITHMETIC, f"model.path={tmp_path}/other", "collect.seed=5")
    )
    assert "does not exist" in line and "different config" not in line


def test_resume_with_a_changed_seed(tmp_path, capsys):
    argv = _collect_args(tmp_path, *ARITHMETIC, f"model.path={tmp_path}")  # an existing "model" path
    config = load_config(SRTConfig, None, argv[1:])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_identity(config), sort_keys=False))
    line = _fail(capsys, *argv, "collect.seed=1")
    assert "different config (collect.seed)" in line


def test_torn_line_in_a_tuple_store(tmp_path, capsys):
    tuples = tmp_path / "tuples.jsonl"
    tuples.write_text('{"x": 1}\n{"x": 2, "y_in')
    argv = ["srt-prepare", "model.path=m", "model.family=qwen3", *ARITHMETIC, f"prepare.inputs=[{tuples}]"]
    line = _fail(capsys, *argv)
    assert f"{tuples}:2: a torn or corrupt line" in line


# --- checkpoints ---------------------------------------------------------------------------------------


def test_hf_directory_where_a_megatron_checkpoint_belongs(tmp_path, capsys):
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    for data in ("a", "b"):
        (tmp_path / f"{data}.jsonl").write_text("{}\n")
    argv = ["sft", f"init={hf}", f"data.stage1={tmp_path}/a.jsonl", f"data.stage2={tmp_path}/b.jsonl"]
    line = _fail(capsys, *argv, f"output_dir={tmp_path}/out")
    assert "is a Hugging Face model directory" in line and f"sdzero convert hf-to-mcore {hf}" in line
    assert not (tmp_path / "out").exists()
    line = _fail(
        capsys,
        "distill",
        f"student.checkpoint={hf}",
        "student.family=qwen3",
        "checkpoint.save=o",
        *ARITHMETIC,
    )
    assert "sdzero convert hf-to-mcore" in line


def test_family_is_checked_against_the_checkpoint(tmp_path, capsys):
    student = _fake_mcore(tmp_path / "srt", model_type="olmo3")
    line = _fail(capsys, *_distill_args(student, "student.family=qwen3", "--dry-run"))
    assert "student.family: 'qwen3' does not match" in line and "'olmo3'" in line


def test_phase2_phrases_must_match_the_ones_phase1_trained(tmp_path, capsys):
    student = _fake_mcore(tmp_path / "srt")
    write_phrases(student, ControlPhrases(correct="Rephrase.", incorrect="Wrong, redo."))
    line = _fail(capsys, *_distill_args(student, "student.family=qwen3", "--dry-run"))
    assert "phrases.correct" in line and "'Rephrase.'" in line and str(student / PHRASES_FILE) in line
    argv = _distill_args(
        student,
        "student.family=qwen3",
        "phrases.correct=Rephrase.",
        "phrases.incorrect=Wrong, redo.",
        "--dry-run",
    )
    assert cli.main(argv) == 0


def test_convert_tp_that_does_not_divide_the_heads(tmp_path, capsys):
    from megatron_sdzero.assets.tiny import make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", family="qwen3", num_layers=2)
    heads = json.loads((hf / "config.json").read_text())["num_attention_heads"]
    capsys.readouterr()
    line = _fail(capsys, "convert", "hf-to-mcore", str(hf), str(tmp_path / "mcore"), "--tp", str(heads + 1))
    assert f"--tp {heads + 1} does not divide the model's {heads} attention heads" in line
    assert not (tmp_path / "mcore").exists()


def test_only_rank_zero_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    status = cli.main(_collect_args(tmp_path, f"problems.path={tmp_path}/nope.jsonl"))
    assert status == USER_ERROR_STATUS and capsys.readouterr().err == ""


def test_read_only_directory_is_refused_even_when_the_check_runs_as_root(tmp_path, monkeypatch):
    from megatron_sdzero import checks
    from megatron_sdzero.config import ConfigError

    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=f"out: {tmp_path} is not writable"):
        checks.check_output_dir(tmp_path / "new", "out")


@pytest.mark.parametrize(
    "family, model_type, ok",
    [
        ("qwen3", "qwen3", True),
        ("qwen", "qwen3", True),
        ("qwen2.5", "qwen2", True),
        ("Qwen3", "qwen3", True),
        ("olmo3", "olmo3", True),
        ("qwen3", "qwen2", False),
        ("olmo3", "llama", False),
        ("qwen", "llama", False),
    ],
)
def test_family_matches_model_type(family, model_type, ok):
    from megatron_sdzero.checks import check_family
    from megatron_sdzero.config import ConfigError

    if ok:
        check_family(family, model_type, "student.family", "ckpt")
    else:
        with pytest.raises(ConfigError, match=f"student.family: '{family}' does not match ckpt"):
            check_family(family, model_type, "student.family", "ckpt")


def test_phrases_of_srt_records():
    from megatron_sdzero.checks import phrases_of_records
    from megatron_sdzero.config import ConfigError

    records = [
        {"init_correct": True, "phrase": "Rephrase."},
        {"init_correct": False, "phrase": "Wrong."},
        {"init_correct": False, "phrase": "Wrong."},
    ]
    assert phrases_of_records(records, "s2") == ControlPhrases(correct="Rephrase.", incorrect="Wrong.")
    assert phrases_of_records(records[1:], "s2") == ControlPhrases(correct=None, incorrect="Wrong.")
    with pytest.raises(ConfigError, match=r"s2: incorrect initial responses use several phrases"):
        phrases_of_records([*records, {"init_correct": False, "phrase": "Nope."}], "s2")
