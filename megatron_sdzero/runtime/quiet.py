"""Silence the warnings every rank prints for choices this project makes knowingly.

Only exact, known messages are filtered; anything else Megatron or torch says still shows.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, message start): deprecation notices for APIs we use on purpose.
_LOG_MESSAGES = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),  # GPTModel still works in 0.19
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),  # we save sync
)

# warnings.warn messages that only say an optional GPU package is absent (the CPU path needs none).
_CPU_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "absl.logging is not installed",
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_known_messages(cpu: bool) -> None:
    for name, prefix in _LOG_MESSAGES:
        logging.getLogger(name).addFilter(_DropMessage(prefix))
    if cpu:
        for prefix in _CPU_WARNINGS:
            warnings.filterwarnings("ignore", message=f"{prefix}.*")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
