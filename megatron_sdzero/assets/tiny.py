"""Tiny random Hugging Face checkpoints (Qwen3, Llama) with a real byte-level BPE chat tokenizer.

Everything is built locally: the tokenizer is trained with `tokenizers` on a deterministic corpus
generated here (word problems, LaTeX answers, English, digits, code), and the weights come from the
transformers model classes initialised under a fixed torch seed. No network is touched.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

Family = Literal["qwen3", "llama"]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_TOKENIZER_VOCAB = 768

# ChatML, as Qwen and SmolLM2 use it; no default system prompt is injected.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FAMILY_ROPE_THETA = {"qwen3": 1_000_000.0, "llama": 100_000.0}


# ---------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ---------------------------------------------------------------------------------------------

_NAMES = ("Ava", "Ben", "Chen", "Dina", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jade")
_ITEMS = ("apples", "marbles", "books", "coins", "pencils", "stickers", "cookies", "cards")
_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "Let us think step by step before we answer.",
    "First, we add the two numbers. Then we check the result.",
    "The answer is correct because both sides are equal.",
    "Wait, that is not right. Let me recompute the sum carefully.",
    "A careful reader verifies each step of the argument.",
    "You are a helpful assistant. Please reason about the problem.",
    "Here is the revised solution with the mistake fixed.",
)
_WORDS = (
    "the a an of to and in is it that for on with as was at by this from or be are which but not have "
    "one all can if there their what so up out about who get when make like time just him know take "
    "people into year your good some could them see other than then now look only come its over think "
    "also back after use two how our work first well way even new want because any these give day most "
    "number answer problem solution step check result equal total each more less sum product difference "
    "divide multiply subtract add half twice three four five ten hundred percent price cost left right "
    "question correct wrong error revise review teacher student model reason explain proof therefore"
).split()
_ROLES = ("system", "user", "assistant")


def _english_line(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(_ENGLISH)
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + rng.choice((".", "?", "!", ","))


def _chat_turn(rng: random.Random) -> str:
    return f"{rng.choice(_ROLES)}\n{_english_line(rng)}"


_CODE = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import math\nprint(math.sqrt(16))\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n",
    "if x > 0:\n    y = x // 2\nelse:\n    y = -x\n",
    "numbers = [1, 2, 3]\ntotal = sum(numbers)\n",
)


def _word_problem(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if rng.random() < 0.5:
        return (
            f"{name} has {a} {item} and {other} gives {name} {b} more. How many {item} does {name} have?\n"
            f"{name} has {a} + {b} = {a + b} {item}. The answer is $\\boxed{{{a + b}}}$."
        )
    return (
        f"{name} buys {a} boxes with {b} {item} in each box. How many {item} are there in total?\n"
        f"We compute $ {a} \\times {b} = {a * b} $, so the answer is \\boxed{{{a * b}}}."
    )


def _latex_line(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
    return rng.choice(
        (
            f"\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{b}}} = \\frac{{{a + c}}}{{{b}}}",
            f"x^{c} - {a} = 0 \\implies x = \\sqrt[{c}]{{{a}}}",
            f"\\sum_{{i=1}}^{{{a}}} i = {a * (a + 1) // 2}",
            f"\\boxed{{{a * c}}}",
        )
    )


def tiny_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """A deterministic mixed corpus: word problems, LaTeX, English, bare digits and code."""
    rng = random.Random(seed)
    makers = (
        lambda: _word_problem(rng),
        lambda: _latex_line(rng),
        lambda: _english_line(rng),
        lambda: _chat_turn(rng),
        lambda: " ".join(str(rng.randint(0, 10_000)) for _ in range(6)),
        lambda: rng.choice(_CODE),
    )
    return [rng.choice(makers)() for _ in range(num_lines)]


def _train_bpe(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Qwen-style: every digit is its own pre-token, then GPT-2 byte-level splitting.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    return _train_bpe(vocab_size).to_str()


def build_tiny_tokenizer(vocab_size: int = DEFAULT_TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """The ChatML byte-level BPE tokenizer; trained once per process and vocab size, then reused."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],
        unk_token=None,
        bos_token=None,
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _model_config(
    family: Family,
    shape: TinyShape,
    *,
    vocab_size: int,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
    rope_theta: float,
    initializer_range: float,
    tokenizer: PreTrainedTokenizerFast,
) -> PretrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "qwen3":
        return Qwen3Config(rms_norm_eps=1e-6, **common)
    if family == "llama":
        return LlamaConfig(rms_norm_eps=1e-5, **common)
    raise ValueError(f"unknown family {family!r}; expected 'qwen3' or 'llama'")


def _init_model(config: PretrainedConfig, seed: int, dtype: str) -> PreTrainedModel:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    model_class = Qwen3ForCausalLM if isinstance(config, Qwen3Config) else LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_class(config)  # weights initialised on CPU in float32 from the seed
    return model.to(_DTYPES[dtype]).eval()


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def make_tiny_model(
    out_dir: str | Path,
    family: Family = "qwen3",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
    pad_vocab_to_multiple_of: int = 1,
    tokenizer_vocab_size: int = DEFAULT_TOKENIZER_VOCAB,
    seed: int = 0,
    dtype: str = "float32",
    max_position_embeddings: int = 2048,
    rope_theta: float | None = None,
    initializer_range: float = 0.02,
) -> Path:
    """Write a tiny random HF checkpoint (config, safetensors, tokenizer, generation config) to out_dir.

    family="qwen3" gives Qwen3ForCausalLM (QK-norm, GQA); family="llama" gives a SmolLM2-like
    LlamaForCausalLM. vocab_size=None uses the tokenizer size, rounded up to pad_vocab_to_multiple_of.
    rope_theta=None uses the family default (Qwen3: 1e6, SmolLM2: 1e5). Same arguments, same files.
    """
    tokenizer = build_tiny_tokenizer(tokenizer_vocab_size)
    if vocab_size is None:
        vocab_size = _padded(len(tokenizer), pad_vocab_to_multiple_of)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    shape = TinyShape(hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size)
    config = _model_config(
        family,
        shape,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_theta=_FAMILY_ROPE_THETA[family] if rope_theta is None else rope_theta,
        initializer_range=initializer_range,
        tokenizer=tokenizer,
    )
    model = _init_model(config, seed, dtype)
    model.generation_config = _generation_config(tokenizer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_provenance(out, family=family, seed=seed, dtype=dtype)
    return out


def _write_provenance(out: Path, **fields: object) -> None:
    record = {"generator": "megatron_sdzero.assets.tiny.make_tiny_model", **fields}
    (out / "sdzero_tiny.json").write_text(json.dumps(record, indent=2) + "\n")
