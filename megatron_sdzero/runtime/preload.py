"""Imported once by the forkserver that CPU ranks are forked from (see launch.py)."""

import megatron.core.dist_checkpointing  # noqa: F401
import megatron.core.models.gpt  # noqa: F401
import megatron.core.pipeline_parallel  # noqa: F401
import torch  # noqa: F401
