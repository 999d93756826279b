"""The frozen teacher: no grads/DDP, exact copy and EMA sync, checkpoint round trip (TP2 -> TP1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_sdzero.config import ConfigError
from megatron_sdzero.distill.teacher import TeacherConfig
from megatron_sdzero.runtime.launch import run_on_ranks


def _build(hf_dir: str, dtype: str):
    from megatron_sdzero.models.architecture import architecture_from_hf
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.training.setup import build_frozen

    arch = architecture_from_hf(hf_dir)
    return arch, build_frozen(arch, ModelConfig(params_dtype=dtype, transformer_impl="local"))


def _randomise(chunks, seed: int) -> None:
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
            param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))


def _hf_state(chunks, arch) -> dict[str, torch.Tensor] | None:
    from megatron_sdzero.distill import parallel
    from megatron_sdzero.distill.weights import iter_hf_weights

    pairs = {name: tensor.clone() for name, tensor in iter_hf_weights(chunks, arch)}
    return pairs if parallel.is_engine_rank() else None


def _sync_and_save(hf_dir: str, tp: int, ckpt_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_sdzero.distill.teacher import Teacher
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig(tp=tp))
    out: dict = {}
    arch, student = _build(hf_dir, "float32")
    _, teacher_chunks = _build(hf_dir, "bfloat16")
    _randomise(student, seed=1)
    _randomise(teacher_chunks, seed=2)
    chunk = teacher_chunks[0]
    out["frozen"] = (
        not chunk.training
        and all(not p.requires_grad for p in chunk.parameters())
        and type(chunk).__name__ == "GPTModel"
    )
    copy = Teacher(teacher_chunks, TeacherConfig(sync="copy", sync_interval=2))
    out["due"] = [copy.due(step) for step in range(1, 6)]
    copy.sync_from(student)
    out["copy_exact"] = all(
        torch.equal(t, s.to(torch.bfloat16))
        for t, s in zip(chunk.parameters(), student[0].parameters(), strict=True)
    )

    _randomise(teacher_chunks, seed=3)
    ema = Teacher(teacher_chunks, TeacherConfig(sync="ema", sync_interval=1, ema_decay=0.75))
    expected = [p.detach().float().clone() for p in chunk.parameters()]
    for seed in (4, 5):
        _randomise(student, seed=seed)
        ema.sync_from(student)
        expected = [
            0.75 * e + 0.25 * s.detach().float()
            for e, s in zip(expected, student[0].parameters(), strict=True)
        ]
    masters = list(ema.master.values())
    out["ema_master_exact"] = all(torch.equal(m, e) for m, e in zip(masters, expected, strict=True))
    out["ema_params_rounded"] = all(
        torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(chunk.parameters(), masters, strict=True)
    )
    out["ema_is_not_a_copy"] = not torch.equal(masters[0], student[0].embedding.word_embeddings.weight)
    out["syncs"] = ema.syncs
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(ema.sharded_state_dict(), ckpt_dir)
    out["hf"] = _hf_state(teacher_chunks, arch)
    out["master_norm"] = sum(float(m.double().pow(2).sum()) for m in masters)
    return out


def _restore(hf_dir: str, tp: int, ckpt_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_sdzero.distill.teacher import Teacher
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig(tp=tp))
    arch, chunks = _build(hf_dir, "bfloat16")
    teacher = Teacher(chunks, TeacherConfig(sync="ema", sync_interval=1, ema_decay=0.75))
    before = _hf_state(chunks, arch)
    teacher.load_sharded(dist_checkpointing.load(teacher.sharded_state_dict(), ckpt_dir))
    masters = list(teacher.master.values())
    return {
        "hf": _hf_state(chunks, arch),
        "before": before,
        "master_norm": sum(float(m.double().pow(2).sum()) for m in masters),
    }


def test_teacher_is_frozen_syncs_exactly_and_survives_a_checkpoint_at_another_tp(
    tiny_hf_models, tmp_path: Path
) -> None:
    hf = str(tiny_hf_models["qwen3_tied"])
    saved = run_on_ranks(_sync_and_save, 2, hf, 2, str(tmp_path / "ckpt"), timeout_s=300)
    for rank in saved:
        assert rank["frozen"] and rank["copy_exact"] and rank["due"] == [False, True, False, True, False]
        assert rank["ema_master_exact"] and rank["ema_params_rounded"] and rank["ema_is_not_a_copy"]
        assert rank["syncs"] == 2
    restored = run_on_ranks(_restore, 1, hf, 1, str(tmp_path / "ckpt"), timeout_s=300)[0]
    assert restored["hf"].keys() == saved[0]["hf"].keys()
    assert all(torch.equal(restored["hf"][k], saved[0]["hf"][k]) for k in restored["hf"])
    assert not all(torch.equal(restored["before"][k], saved[0]["hf"][k]) for k in restored["hf"])
    master_total = sum(rank["master_norm"] for rank in saved)  # TP shards + replicated norms twice
    assert restored["master_norm"] < master_total and restored["master_norm"] > 0.5 * master_total


def test_teacher_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="sync_interval"):
        TeacherConfig(sync="copy")
    with pytest.raises(ConfigError, match="ema_decay"):
        TeacherConfig(sync="ema", sync_interval=1, ema_decay=1.0)
