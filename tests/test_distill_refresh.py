"""Weight refresh into the CPU rollout engine, from disk and in memory, at TP=2 and PP=2.

The probe compares the engine's log-probs with the Megatron model's: after a refresh they agree to
1e-4 (float32); a stale engine or a mangled export makes the check fire.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_sdzero.conversion.convert import hf_to_mcore
from megatron_sdzero.distill.weights import merge_tp
from megatron_sdzero.runtime.launch import run_on_ranks


@pytest.fixture(scope="module")
def student(tiny_hf_models, tmp_path_factory) -> tuple[Path, Path]:
    hf = tiny_hf_models["qwen3_untied"]
    return hf, hf_to_mcore(hf, tmp_path_factory.mktemp("refresh") / "mcore", tp=1, pp=1)


def _perturb(model, seed: int) -> None:
    """A stand-in for an optimizer step: every parameter moves (the same noise on every TP rank)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _refresh_scenarios(hf_dir: str, mcore_dir: str, tp: int, pp: int, out_dir: str) -> dict:
    from safetensors.torch import load_file, save_file

    from megatron_sdzero.conversion.megatron_io import ModelMeta, _build, load_weights, resolve_checkpoint
    from megatron_sdzero.distill import parallel
    from megatron_sdzero.distill.refresh import (
        ProbeConfig,
        RefreshConfig,
        StaleWeightsError,
        WeightRefresher,
        check_probe,
    )
    from megatron_sdzero.rollout.base import RolloutConfig
    from megatron_sdzero.rollout.hf_engine import HFEngine
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig(tp=tp, pp=pp))
    root, ckpt = resolve_checkpoint(Path(mcore_dir))
    meta = ModelMeta.read(root)
    model = _build(meta)
    load_weights(model, ckpt)
    engine = (
        HFEngine(hf_dir, RolloutConfig(max_model_len=256, threads=1)) if parallel.is_engine_rank() else None
    )
    probe = ProbeConfig(num_tokens=12, atol=1e-4)
    vocab = meta.arch.vocab_size
    out: dict = {}

    def refresher(mode: str) -> WeightRefresher:
        config = RefreshConfig(mode=mode, keep_versions=1, probe=probe)
        return WeightRefresher(config, meta.arch, vocab, Path(out_dir), root / "hf", "float32")

    _perturb(model, seed=1)
    result = refresher("disk").refresh(engine, [model], step=1)
    out["disk"] = result.probe_max_diff
    out["disk_seconds"] = result.seconds
    _perturb(model, seed=2)
    out["memory"] = refresher("memory").refresh(engine, [model], step=2).probe_max_diff
    _perturb(model, seed=3)  # a training step without a refresh: the engine is stale
    try:
        check_probe(engine, [model], vocab, probe)
        out["stale"] = "not detected"
    except StaleWeightsError as err:
        out["stale"] = str(err)
    result = refresher("disk").refresh(engine, [model], step=3)
    out["after_stale"] = result.probe_max_diff
    out["versions"] = sorted(p.name for p in Path(out_dir).glob("step_*"))
    if parallel.is_writer_rank():  # a mangled export: k and v of layer 1 swapped
        file = result.path / "model.safetensors"
        tensors = load_file(file)
        out["names"] = sorted(tensors)
        k, v = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"
        tensors[k], tensors[v] = tensors[v], tensors[k]
        save_file(tensors, file, metadata={"format": "pt"})
        engine.reload(result.path)
    parallel.barrier()
    try:
        check_probe(engine, [model], vocab, probe)
        out["mangled"] = "not detected"
    except StaleWeightsError as err:
        out["mangled"] = str(err)
    return out


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_refresh_matches_the_trainer_and_the_probe_catches_stale_or_mangled_weights(
    layout, student, tmp_path: Path
) -> None:
    from safetensors import safe_open

    hf, mcore = student
    tp, pp = layout
    results = run_on_ranks(
        _refresh_scenarios, tp * pp, str(hf), str(mcore), tp, pp, str(tmp_path), timeout_s=300
    )
    first = results[0]
    for rank in results:
        assert rank["disk"] < 1e-4 and rank["memory"] < 1e-4 and rank["after_stale"] < 1e-4
        assert "disagree" in rank["stale"] and "disagree" in rank["mangled"]
    assert first["versions"] == ["step_0000003"]  # keep_versions=1 pruned the older export
    with safe_open(str(hf / "model.safetensors"), framework="pt") as handle:
        assert first["names"] == sorted(handle.keys())


def test_merge_tp_inverts_the_conversion_split(tiny_hf_models) -> None:
    from megatron_sdzero.conversion.weight_maps import to_mcore
    from megatron_sdzero.models.architecture import architecture_from_hf

    arch = architecture_from_hf(tiny_hf_models["qwen3_untied"])
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(arch.num_attention_heads * arch.head_dim, arch.hidden_size, generator=generator)
    k = torch.randn(arch.num_query_groups * arch.head_dim, arch.hidden_size, generator=generator)
    v = torch.randn_like(k)
    gate, up = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    row = torch.randn(4, 8, generator=generator)
    cases = {"qkv": [q, k, v], "gated": [gate, up], "row": [row], "column": [gate], "copy": [up]}
    for kind, hf in cases.items():
        full = to_mcore(kind, hf, arch, 0, 0, 1)
        shards = [to_mcore(kind, hf, arch, 0, rank, 2) for rank in range(2)]
        assert torch.equal(merge_tp(kind, shards), full), kind
