"""Imported once by the forkserver that CPU ranks are forked from (see launch.py)."""

import torch

from megatron_sdzero.runtime.quiet import quiet_known_messages

quiet_known_messages(cpu=not torch.cuda.is_available())

import megatron.core.dist_checkpointing  # noqa: E402, F401
import megatron.core.models.gpt  # noqa: E402, F401
import megatron.core.pipeline_parallel  # noqa: E402, F401
