"""GPU checks of the weight refresh into vLLM (on the GPU box: pytest -m gpu tests/test_distill_gpu.py -s).

They print the measured probe difference (engine vs trainer log-probs, bf16) and refresh seconds for
both refresh modes, which is what refresh.probe.atol of the GPU recipes must be calibrated against.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_sdzero.conversion.convert import hf_to_mcore
from megatron_sdzero.runtime.launch import run_on_ranks

pytestmark = pytest.mark.gpu


def _refresh_into_vllm(hf_dir: str, mcore_dir: str, out_dir: str) -> dict:
    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.distill.refresh import ProbeConfig, RefreshConfig, WeightRefresher, check_probe
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.rollout.base import RolloutConfig
    from megatron_sdzero.rollout.vllm_engine import VLLMEngine
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.setup import build_frozen

    init_model_parallel(ParallelConfig())
    meta = ModelMeta.read(Path(mcore_dir))
    chunks = build_frozen(meta.arch, ModelConfig(params_dtype="bfloat16"))  # TransformerEngine spec
    checkpoint.finetune_from(mcore_dir, chunks)
    engine = VLLMEngine(hf_dir, RolloutConfig(engine="vllm", gpu_memory_utilization=0.3, max_model_len=512))
    loose = ProbeConfig(num_tokens=32, atol=float("inf"))
    out = {"before": check_probe(engine, chunks, meta.arch.vocab_size, loose)}
    with torch.no_grad():
        for param in chunks[0].parameters():
            param.add_(0.02 * torch.randn_like(param))
    for mode in ("disk", "memory"):
        refresher = WeightRefresher(
            RefreshConfig(mode=mode, probe=loose), meta.arch, meta.arch.vocab_size, Path(out_dir),
            Path(mcore_dir) / "hf", "bfloat16",
        )  # fmt: skip
        result = refresher.refresh(engine, chunks, step=1)
        out[mode] = (result.probe_max_diff, result.seconds)
    with torch.no_grad():
        for param in chunks[0].parameters():
            param.add_(0.02 * torch.randn_like(param))
    out["stale"] = check_probe(engine, chunks, meta.arch.vocab_size, loose)
    return out


def test_vllm_refresh_from_disk_and_memory_matches_the_trainer(tiny_hf_models, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    hf = tiny_hf_models["qwen3_untied"]
    mcore = hf_to_mcore(hf, tmp_path / "mcore", params_dtype="bfloat16")
    out = run_on_ranks(_refresh_into_vllm, 1, str(hf), str(mcore), str(tmp_path / "weights"), timeout_s=900)[
        0
    ]
    print(f"probe max |log-prob diff|: {out}")
    assert out["disk"][0] < out["stale"] and out["memory"][0] < out["stale"]
    assert abs(out["disk"][0] - out["memory"][0]) < 1e-6  # the same weights by either route
