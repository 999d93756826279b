"""HF -> Megatron (TP2 x PP2) -> HF is bit-exact; bad input fails clearly and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_sdzero.conversion.convert import ConversionError, hf_to_mcore, mcore_to_hf
from megatron_sdzero.conversion.hf_io import CheckpointError
from megatron_sdzero.models.architecture import UnsupportedModelError


def _sdzero(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_sdzero.cli", *args], capture_output=True, text=True, timeout=600
    )


def _assert_bit_exact(a_dir: Path, b_dir: Path) -> int:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    return len(a)


@pytest.mark.parametrize("name", ["qwen3_untied", "llama_tied"])
def test_round_trip_tp2_pp2_is_bit_exact_via_cli(name, tiny_hf_models, tmp_path):
    src = tiny_hf_models[name]
    done = _sdzero("convert", "hf-to-mcore", str(src), str(tmp_path / "mc"), "--tp", "2", "--pp", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text() == "release"
    done = _sdzero("convert", "mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _assert_bit_exact(src, tmp_path / "hf") > 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_round_trip_bf16_and_export_loads_in_transformers(tiny_hf_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_hf_models["qwen3_tied"]
    bf16 = tmp_path / "bf16"
    shutil.copytree(src, bf16)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, bf16 / "model.safetensors", metadata={"format": "pt"})

    hf_to_mcore(bf16, tmp_path / "mc", tp=2, pp=1)
    phrases = '{"correct": "Rephrase.", "incorrect": "Wrong."}\n'
    (tmp_path / "mc" / "phrases.json").write_text(phrases)  # as sdzero sft records them for an SRT model
    mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    assert (tmp_path / "back" / "phrases.json").read_text() == phrases  # they travel with the export
    _assert_bit_exact(bf16, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=False
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] > 5
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def broken_copy(tiny_hf_models, tmp_path):
    def make(edit) -> Path:
        path = tmp_path / "src"
        shutil.copytree(tiny_hf_models["qwen3_untied"], path)
        edit(path)
        return path

    return make


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, path / "model.safetensors")


def _reshape_tensor(path: Path, name: str) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors[name] = tensors[name][:-1]
    save_file(tensors, path / "model.safetensors")


def _truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


BAD_INPUTS = {
    "missing_key": (
        lambda p: _edit_config(p, num_hidden_layers=None),
        UnsupportedModelError,
        "num_hidden_layers",
    ),
    "unknown_arch": (lambda p: _edit_config(p, model_type="mamba"), UnsupportedModelError, "mamba"),
    "missing_tensor": (
        lambda p: _drop_tensor(p, "model.layers.1.self_attn.k_norm.weight"),
        CheckpointError,
        "model.layers.1.self_attn.k_norm.weight",
    ),
    "shape_mismatch": (
        lambda p: _reshape_tensor(p, "model.layers.2.mlp.up_proj.weight"),
        CheckpointError,
        "model.layers.2.mlp.up_proj.weight",
    ),
    "truncated": (_truncate, CheckpointError, "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_hf_input_names_the_problem_and_leaves_nothing(case, broken_copy, tmp_path):
    edit, error, needle = BAD_INPUTS[case]
    src = broken_copy(edit)
    with pytest.raises(error, match=needle.replace(".", r"\.")):
        hf_to_mcore(src, tmp_path / "out", tp=1, pp=1)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_non_empty_destination_is_refused(tiny_hf_models, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    done = _sdzero("convert", "hf-to-mcore", str(tiny_hf_models["llama_tied"]), str(dst))
    assert done.returncode == 2
    assert "exists and is not empty" in done.stderr and "Traceback" not in done.stderr
    assert (dst / "keep.txt").read_text() == "user data"


def test_mcore_to_hf_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Megatron checkpoint"):
        mcore_to_hf(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tp_that_does_not_divide_query_groups_fails_before_writing(tiny_hf_models, tmp_path):
    with pytest.raises(
        ConversionError, match=r"--tp 4 does not divide the model's 2 KV heads; use one of \[1, 2\]"
    ):
        hf_to_mcore(tiny_hf_models["llama_tied"], tmp_path / "out", tp=4)
    assert not (tmp_path / "out").exists()
