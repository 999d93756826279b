"""GPU rollout engine on vLLM (written against vLLM 0.26's offline ``LLM`` API).

vLLM is imported only when this engine is built, so the CPU path never needs it. Prompts go in as
token ids (``TokensPrompt``), each with its own ``vllm.SamplingParams`` (and so its own seed).

Weight refresh (``reload``) pushes the safetensors of a converted HF checkpoint directory through
the model's own ``load_weights`` on every worker (``LLM.apply_model``), then clears the prefix
cache so no KV block computed with the old weights is reused. The new checkpoint must have the same
architecture and must not be quantized. ``apply_model`` ships a function to the worker processes,
which vLLM allows only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the engine sets it (before vLLM
starts) unless the caller set it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_sdzero.rollout.base import Completion, RolloutConfig, SamplingParams, per_prompt

INSTALL_HINT = (
    "the vLLM rollout engine needs vllm: pip install 'megatron_sdzero[gpu]' (vllm==0.26.0, which pins "
    "torch==2.11.0), or set rollout.engine=hf to sample with transformers on CPU"
)


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


class VLLMEngine:
    def __init__(self, model_path: str | Path, config: RolloutConfig) -> None:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.vllm = import_vllm()
        self.config = config
        self.model_path = Path(model_path)
        self._llm = self.vllm.LLM(model=str(model_path), **engine_kwargs(config))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self._sleeping = False

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        self.wake_up()
        requests = [self.vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self.vllm.SamplingParams(**sampling_kwargs(p)) for p in per_prompt(prompts, params)]
        outputs = self._llm.generate(requests, sampling, use_tqdm=False)
        return [
            [to_completion(c, p.logprobs) for c in out.outputs]
            for out, p in zip(outputs, sampling, strict=True)
        ]

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory between rollouts (needs rollout.enable_sleep_mode)."""
        if self.config.enable_sleep_mode and not self._sleeping:
            self._llm.sleep(level=level)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self._llm.wake_up()
            self._sleeping = False

    def reload(self, hf_dir: str | Path) -> None:
        self.wake_up()
        loaded = self._llm.apply_model(functools.partial(load_weights_from_dir, hf_dir=str(hf_dir)))
        if not any(loaded):
            raise RuntimeError(f"vLLM loaded no weights from {hf_dir}")
        self._llm.reset_prefix_cache()
        self.model_path = Path(hf_dir)

    def close(self) -> None:
        self._llm = None


def engine_kwargs(config: RolloutConfig) -> dict[str, Any]:
    return {
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "seed": config.seed,
        "dtype": config.dtype,
        "enable_sleep_mode": config.enable_sleep_mode,
        "enforce_eager": config.enforce_eager,
        "enable_prefix_caching": config.enable_prefix_caching,
        **config.extra,
    }


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop) or None,
        "stop_token_ids": list(params.stop_token_ids) or None,
        "seed": params.seed,
        "logprobs": 0 if params.logprobs else None,  # 0: only the sampled token's log-prob
    }


def to_completion(output: Any, want_logprobs: Any) -> Completion:
    token_ids = list(output.token_ids)
    logprobs = None
    if want_logprobs is not None and output.logprobs is not None:
        logprobs = [step[token].logprob for step, token in zip(output.logprobs, token_ids, strict=True)]
    return Completion(token_ids, output.text, output.finish_reason or "length", logprobs)


def load_weights_from_dir(model: Any, hf_dir: str) -> int:
    """Runs inside each vLLM worker: stream the checkpoint's tensors into ``model.load_weights``."""
    from safetensors import safe_open

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}")

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    yield name, handle.get_tensor(name)

    loaded = model.load_weights(tensors())
    return len(loaded) if loaded is not None else -1  # some models do not report what they loaded
