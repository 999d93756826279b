"""GPU rollout engine on vLLM (written against vLLM 0.26's offline ``LLM`` API).

vLLM is imported only when this engine is built, so the CPU path never needs it. Prompts go in as
token ids (``TokensPrompt``), each with its own ``vllm.SamplingParams`` (and so its own seed).

Weight refresh (``reload``) pushes the safetensors of a converted HF checkpoint directory through
the model's own ``load_weights`` on every worker (``LLM.apply_model``), then clears the prefix
cache so no KV block computed with the old weights is reused. The new checkpoint must have the same
architecture and must not be quantized. ``apply_model`` ships a function to the worker processes,
which vLLM allows only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the engine sets it (before vLLM
starts) unless the caller set it.

Placement (``engine_placement``): alone in its job (world size 1), the environment decides (the
sbatch script sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core inside this process, as
measured on one GPU; vLLM's default is a separate process). With more ranks,
an in-process engine core would adopt the trainer's default process group (vLLM 0.26's
``init_distributed_environment`` reuses an initialised one and builds its groups over every rank,
collectively) and pin ``cuda:0`` (its uni-process executor takes the device index from the device
config, not from LOCAL_RANK). So then the engine core runs in its own process, started with
``CUDA_VISIBLE_DEVICES`` set to this rank's GPU: a world of its own, on the rank's device.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
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
        with engine_placement(_world_size(), _current_device_index(), config.tensor_parallel_size):
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

    def load_weights(self, pairs: Iterable[tuple[str, Any]], bucket_mb: int = 1024) -> int:
        """In-memory refresh: HF-named tensors into ``model.load_weights`` in every vLLM worker, in
        buckets of about ``bucket_mb``; the prefix cache is dropped after (its KV came from old weights)."""
        self.wake_up()
        limit, bucket, size, loaded = bucket_mb * 2**20, [], 0, 0
        for name, tensor in pairs:
            bucket.append((name, tensor.detach()))
            size += tensor.numel() * tensor.element_size()
            if size >= limit:
                loaded += self._apply_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            loaded += self._apply_bucket(bucket)
        self._llm.reset_prefix_cache()
        return loaded

    def _apply_bucket(self, bucket: list[tuple[str, Any]]) -> int:
        results = self._llm.apply_model(functools.partial(load_weights_bucket, weights=bucket))
        return len(bucket) if any(results) else 0

    def close(self) -> None:
        self._llm = None


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _current_device_index() -> int:
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def physical_gpu(device_index: int, visible_devices: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's device ``device_index``."""
    if not visible_devices:
        return str(device_index)
    entries = [entry.strip() for entry in visible_devices.split(",") if entry.strip()]
    if device_index >= len(entries):
        raise ValueError(f"device {device_index} is not among CUDA_VISIBLE_DEVICES={visible_devices!r}")
    return entries[device_index]


@contextlib.contextmanager
def engine_placement(
    world_size: int,
    device_index: int,
    tensor_parallel_size: int,
    environ: MutableMapping[str, str] = os.environ,
) -> Iterator[None]:
    """The environment vLLM's engine core starts in (see the module docstring); restored afterwards
    (the engine-core process has inherited it by then)."""
    if world_size == 1:
        yield
        return
    if environ.get(MULTIPROCESSING_ENV) == "0":
        raise ValueError(
            f"{MULTIPROCESSING_ENV}=0 with {world_size} ranks: an in-process vLLM engine would join the "
            "trainer's process group and run on cuda:0; unset it (the engine core then gets its own "
            "process on this rank's GPU)"
        )
    if tensor_parallel_size > 1:
        raise ValueError(
            f"rollout.tensor_parallel_size={tensor_parallel_size} inside a {world_size}-rank job: each "
            "engine gets only its rank's GPU; use tensor_parallel_size 1 (one engine per replica)"
        )
    saved = {key: environ.get(key) for key in (MULTIPROCESSING_ENV, "CUDA_VISIBLE_DEVICES")}
    environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(device_index, saved["CUDA_VISIBLE_DEVICES"])
    environ[MULTIPROCESSING_ENV] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value


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


def load_weights_bucket(model: Any, weights: list[tuple[str, Any]]) -> int:
    """Runs in each vLLM worker (in-process under the external launcher)."""
    device = next(model.parameters()).device
    model.load_weights((name, tensor.to(device, non_blocking=True)) for name, tensor in weights)
    return len(weights)


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
