"""Shared fixtures: tiny HF checkpoints made offline, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _clear_attention_backend_env():
    # Megatron writes NVTE_*_ATTN into os.environ when it builds a model; a later model with another
    # attention backend in the same process then asserts. Each test starts clean.
    saved = {k: v for k, v in os.environ.items() if k.startswith("NVTE_")}
    yield
    for key in [k for k in os.environ if k.startswith("NVTE_")]:
        del os.environ[key]
    os.environ.update(saved)


def _make(root: Path, name: str, **kwargs) -> Path:
    from megatron_sdzero.assets.tiny import make_tiny_model

    path = make_tiny_model(root / name, **kwargs)
    _perturb_norms(path / "model.safetensors", seed=kwargs.get("seed", 0))
    return path


def _perturb_norms(file: Path, seed: int) -> None:
    """HF initialises norm weights to exactly 1, which would hide a swapped or missing norm mapping."""
    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(file)
    for name, tensor in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = tensor + 0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, Path]:
    """Three families/variants, 4 layers, weights large enough that attention is not uniform."""
    root = tmp_path_factory.mktemp("tiny_hf")
    common = dict(num_layers=4, initializer_range=0.15, seed=3)
    return {
        "qwen3_untied": _make(root, "qwen3_untied", family="qwen3", tie_word_embeddings=False, **common),
        "qwen3_tied": _make(root, "qwen3_tied", family="qwen3", tie_word_embeddings=True, **common),
        "llama_tied": _make(root, "llama_tied", family="llama", tie_word_embeddings=True, **common),
    }


@pytest.fixture(autouse=True)
def _restore_environment():
    """An in-process command sets RANK / MASTER_PORT (init_distributed) and keeps its process group's
    store listening on that port; a later test's subprocess must not inherit that port."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
