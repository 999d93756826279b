"""Process-group and Megatron model-parallel setup, the same on a GPU cluster and a CPU box.

torchrun / srun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a single process
with none of them set runs as a world of one. NCCL is used when CUDA is present, gloo otherwise
(CPU CI, the demo), in which case the CPU compatibility layer is switched on first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor model parallel size
    pp: int = 1  # pipeline model parallel size
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False  # needs TransformerEngine (or apex); GPU only
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from the environment (idempotent)."""
    from megatron_sdzero.runtime.quiet import quiet_known_messages

    quiet_known_messages(cpu=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        from megatron_sdzero.runtime.cpu_compat import enable_cpu_compat

        enable_cpu_compat()
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with torchrun or srun")
        os.environ["MASTER_PORT"] = str(free_port())
    device_for_rank()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def init_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """torch.distributed + Megatron's parallel state + its RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    init_distributed(parallel.timeout_minutes)
    world = dist.get_world_size()
    if world % (parallel.tp * parallel.pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {parallel.tp * parallel.pp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
