"""The vLLM engine's adapter code, against a stand-in ``vllm`` module (vLLM needs a GPU).

What this checks: the arguments our engine hands to vllm.LLM / vllm.SamplingParams / TokensPrompt,
the conversion of vLLM's outputs, sleep/wake bookkeeping, and the weight-reload path. Whether vLLM
0.26 itself behaves as assumed is for the GPU box (tests marked gpu).
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from megatron_sdzero.rollout.base import RolloutConfig, SamplingParams
from megatron_sdzero.rollout.vllm_engine import INSTALL_HINT, VLLMEngine, load_weights_from_dir


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Output:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[dict] | None


@dataclass
class _FakeLLM:
    model: str
    kwargs: dict
    calls: list = field(default_factory=list)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        outputs = []
        for prompt, sp in zip(prompts, sampling_params, strict=True):
            completions = []
            for j in range(sp.kwargs["n"]):
                ids = [prompt["prompt_token_ids"][-1] + j, 7]
                logprobs = [{t: _Logprob(-0.5 * (k + 1)), 999: _Logprob(-9.0)} for k, t in enumerate(ids)]
                completions.append(
                    _Output(ids, f"text{j}", "stop", logprobs if sp.kwargs["logprobs"] == 0 else None)
                )
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up",))

    def apply_model(self, func):
        self.calls.append(("apply_model", func.keywords))
        return [3, 3]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.logprobs = kwargs["logprobs"]


@pytest.fixture
def fake_vllm(monkeypatch, tiny_hf_models):
    module = types.ModuleType("vllm")
    module.LLM = lambda model, **kwargs: _FakeLLM(model, kwargs)
    module.SamplingParams = _FakeSamplingParams
    module.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)  # restored after the test
    return module


def test_engine_passes_config_and_per_prompt_sampling(fake_vllm, tiny_hf_models) -> None:
    config = RolloutConfig(
        engine="vllm",
        tensor_parallel_size=4,
        gpu_memory_utilization=0.8,
        max_model_len=4096,
        seed=3,
        enable_sleep_mode=True,
        extra={"swap_space": 0},
    )
    engine = VLLMEngine(tiny_hf_models["qwen3_tied"], config)
    llm = engine._llm
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"  # reload ships a function to workers
    assert llm.model == str(tiny_hf_models["qwen3_tied"])
    assert llm.kwargs == {
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 4096,
        "seed": 3,
        "dtype": "auto",
        "enable_sleep_mode": True,
        "enforce_eager": False,
        "enable_prefix_caching": True,
        "swap_space": 0,
    }
    params = [
        SamplingParams(
            n=2, temperature=1.0, top_p=0.9, max_tokens=10, seed=1, logprobs=True, stop_token_ids=(5,)
        ),
        SamplingParams(n=1, temperature=0.5, max_tokens=4, stop=("\n\n",)),
    ]
    out = engine.generate([[10, 11], [20]], params)
    _, prompts, sampling, use_tqdm = llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [10, 11]}, {"prompt_token_ids": [20]}] and use_tqdm is False
    assert sampling[0].kwargs == {
        "n": 2,
        "temperature": 1.0,
        "top_p": 0.9,
        "max_tokens": 10,
        "stop": None,
        "stop_token_ids": [5],
        "seed": 1,
        "logprobs": 0,
    }
    assert sampling[1].kwargs["stop"] == ["\n\n"] and sampling[1].kwargs["logprobs"] is None
    assert [[c.token_ids for c in cs] for cs in out] == [[[11, 7], [12, 7]], [[20, 7]]]
    assert out[0][1].logprobs == [-0.5, -1.0] and out[1][0].logprobs is None
    assert out[0][0].text == "text0" and out[0][0].finish_reason == "stop"


def test_sleep_wake_and_reload(fake_vllm, tiny_hf_models) -> None:
    engine = VLLMEngine(tiny_hf_models["qwen3_tied"], RolloutConfig(engine="vllm", enable_sleep_mode=True))
    engine.sleep()
    engine.sleep()  # already asleep: no second call
    engine.generate([[1]], SamplingParams(max_tokens=2))  # wakes up first
    engine.reload(tiny_hf_models["qwen3_untied"])
    names = [call[0] for call in engine._llm.calls]
    assert names == ["sleep", "wake_up", "generate", "apply_model", "reset_prefix_cache"]
    assert engine._llm.calls[3][1] == {"hf_dir": str(tiny_hf_models["qwen3_untied"])}
    assert engine.model_path == tiny_hf_models["qwen3_untied"]
    without_sleep = VLLMEngine(tiny_hf_models["qwen3_tied"], RolloutConfig(engine="vllm"))
    without_sleep.sleep()
    assert without_sleep._llm.calls == []


def test_load_weights_from_dir_streams_every_tensor(tiny_hf_models) -> None:
    from safetensors import safe_open

    seen = []

    class Model:
        def load_weights(self, weights):
            seen.extend(name for name, _ in weights)
            return set(seen)

    directory = tiny_hf_models["qwen3_untied"]
    assert load_weights_from_dir(Model(), str(directory)) == len(seen) > 0
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        assert sorted(seen) == sorted(handle.keys())
    with pytest.raises(FileNotFoundError):
        load_weights_from_dir(Model(), str(Path(directory).parent))


def test_missing_vllm_says_what_to_install(monkeypatch, tiny_hf_models) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError) as info:
        VLLMEngine(tiny_hf_models["qwen3_tied"], RolloutConfig(engine="vllm"))
    assert str(info.value) == INSTALL_HINT and "rollout.engine=hf" in INSTALL_HINT


@pytest.mark.gpu
def test_real_vllm_matches_the_cpu_engine(tiny_hf_models) -> None:
    """On a GPU box with vLLM: greedy ids, raw log-probs and a weight reload agree with HFEngine."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'megatron_sdzero[gpu]')")
    import torch

    from megatron_sdzero.rollout.hf_engine import HFEngine

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tied, untied = tiny_hf_models["qwen3_tied"], tiny_hf_models["qwen3_untied"]
    config = RolloutConfig(
        engine="vllm", dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True
    )
    engine = VLLMEngine(tied, config)
    prompt = engine.tokenizer("Ben has 4 apples and buys 3 more.", add_special_tokens=False)["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True)
    for path in (tied, untied):
        if path is untied:
            engine.reload(untied)
        got = engine.generate([prompt], greedy)[0][0]
        want = HFEngine(path, RolloutConfig(threads=1)).generate([prompt], greedy)[0][0]
        assert got.token_ids == want.token_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-3)
    seeded = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=7)
    assert (
        engine.generate([prompt], seeded)[0][0].token_ids == engine.generate([prompt], seeded)[0][0].token_ids
    )


def test_placement_alone_leaves_the_environment_alone() -> None:
    from megatron_sdzero.rollout.vllm_engine import engine_placement

    environ = {"CUDA_VISIBLE_DEVICES": "3"}
    with engine_placement(1, 0, 1, environ):
        assert environ == {"CUDA_VISIBLE_DEVICES": "3"}
    assert environ == {"CUDA_VISIBLE_DEVICES": "3"}


@pytest.mark.parametrize(
    ("visible", "index", "expected"), [(None, 5, "5"), ("4,5,6,7", 2, "6"), ("GPU-a, GPU-b", 1, "GPU-b")]
)
def test_placement_with_many_ranks_gives_the_engine_process_this_ranks_gpu(visible, index, expected) -> None:
    from megatron_sdzero.rollout.vllm_engine import MULTIPROCESSING_ENV, engine_placement

    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    before = dict(environ)
    with engine_placement(8, index, 1, environ):
        assert environ["CUDA_VISIBLE_DEVICES"] == expected
        assert environ[MULTIPROCESSING_ENV] == "1"
    assert environ == before  # restored once the engine process has started


def test_placement_refuses_what_cannot_work_with_many_ranks() -> None:
    from megatron_sdzero.rollout.vllm_engine import MULTIPROCESSING_ENV, engine_placement

    with pytest.raises(ValueError, match="join the trainer's process group"):
        with engine_placement(2, 0, 1, {MULTIPROCESSING_ENV: "0"}):
            pass
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        with engine_placement(2, 0, 2, {}):
            pass
    with pytest.raises(ValueError, match="not among CUDA_VISIBLE_DEVICES"):
        with engine_placement(2, 3, 1, {"CUDA_VISIBLE_DEVICES": "0,1"}):
            pass
