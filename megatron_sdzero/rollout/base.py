"""The rollout interface shared by the vLLM (GPU) and transformers (CPU) engines.

An engine loads a Hugging Face checkpoint directory (for us: a converted checkpoint) and samples
completions of token-id prompts::

    engine = build_engine(ModelSource(path=...), RolloutConfig(engine="hf"))
    outputs = engine.generate([prompt_ids, ...], SamplingParams(n=3, temperature=1.0, seed=7))
    outputs[i][j].token_ids   # j-th sample of prompt i, stop token included when it stopped

Token ids are the truth; ``text`` is their decoding without special tokens (for grading). With stop
strings the text ends before the stop string while the ids run to the token that completed it
(vLLM's behaviour). Log-probs, when asked for, are the model's raw log-probs of the sampled tokens
(before temperature and top-p), like vLLM's default ``logprobs_mode="raw_logprobs"``.

Seeds: a prompt with ``seed`` set gets the same samples whatever else is in the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from megatron_sdzero.config import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16384
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"sampling.n: must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p: must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ConfigError(f"sampling.max_tokens: must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length"
    logprobs: list[float] | None = None


@dataclass
class ModelSource:
    """A Hugging Face checkpoint directory (or hub name) and the model family it belongs to.

    The family picks default control phrases (see data/formatting.py); it is never guessed from
    the path.
    """

    path: Path
    family: str | None = None


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    max_model_len: int = 32768  # prompt + completion
    seed: int = 0
    dtype: str = "auto"  # hf: auto -> float32 on CPU; vllm: auto -> the checkpoint's dtype
    # vLLM
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_sleep_mode: bool = False
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    # transformers engine
    batch_size: int = 16  # sequences decoded together
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (process-wide); tiny models decode fastest on 1
    extra: dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM as is


class RolloutEngine(Protocol):
    tokenizer: Any

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """For each prompt, ``params.n`` completions (params: one for all, or one per prompt)."""
        ...

    def reload(self, hf_dir: str | Path) -> None:
        """Load new weights (same architecture) from a HF checkpoint directory."""
        ...

    def close(self) -> None: ...


def per_prompt(prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list:
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    return list(params)


def mix_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across runs and machines, unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def build_engine(model: ModelSource, config: RolloutConfig) -> RolloutEngine:
    if config.engine == "hf":
        from megatron_sdzero.rollout.hf_engine import HFEngine

        return HFEngine(model.path, config)
    from megatron_sdzero.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model.path, config)
