"""Run Megatron-Core on a machine without CUDA (CPU CI, the demo, laptops).

Megatron-Core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` as a device,
``device="cuda"`` / ``.cuda()`` in the pipeline schedules, the CUDA RNG state tracker,
``torch.cuda.synchronize()`` around p2p and checkpoint saves, and ``param.type() ==
'torch.cuda.FloatTensor'`` asserts in DDP, the optimizers and gradient clipping.

``enable_cpu_compat()`` maps all of them onto the CPU, in one place:
- a process-wide TorchFunctionMode rewrites CUDA devices in factory calls, ``.to()`` and
  ``.cuda()`` to the CPU;
- the "CUDA" RNG is the CPU generator (Megatron's tracker forks and restores it as it would on GPU);
- synchronisation, stream and event calls become no-ops;
- ``Tensor.type()`` reports CPU float tensors under their CUDA names for those asserts.

It does nothing when CUDA is available: on a GPU, Megatron runs untouched.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an ordinal means a CUDA device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments to the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda, torch.Tensor.cpu):
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return _CUDA_TYPE_NAMES.get(name, name)

    torch.Tensor.type = tensor_type  # type: ignore[method-assign]


class _NullStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any) -> _NullEvent:
        return _NullEvent()


class _NullEvent(_NullStream):
    def record(self, *args: Any) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it: the CPU seed is set already
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, clone=False, **k: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    class _QuietCpuRngWarning(logging.Filter):
        # On CPU the "CUDA" RNG *is* the CPU RNG, so Megatron's fork() sees it change by design.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mcore_random.__name__).addFilter(_QuietCpuRngWarning())


def enable_cpu_compat() -> bool:
    """Switch the compatibility layer on if CUDA is absent. Returns whether it is active."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_tensor_type()
    _patch_megatron_rng()
    _CudaToCpuMode().__enter__()  # process-wide: stays pushed for the life of the process
    _ENABLED = True
    return True


def cpu_compat_enabled() -> bool:
    return _ENABLED
