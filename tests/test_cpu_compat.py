"""The CPU compatibility layer: what it maps, checked in a fresh process (it patches process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent(
    """
    import torch
    from megatron_sdzero.runtime.cpu_compat import enable_cpu_compat
    assert enable_cpu_compat()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pass
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core import parallel_state
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside_before = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        forked_a = torch.rand(3)
    outside_after = torch.rand(3)
    # The forked draw comes from the tracker's own state and leaves the default stream untouched.
    assert torch.equal(outside_before, outside_after)
    assert not torch.equal(forked_a, outside_before)
    with tracker.fork():
        forked_b = torch.rand(3)
    assert not torch.equal(forked_a, forked_b)  # the tracker's state advances between forks
    print("OK")
    """
)


def test_cpu_compat_maps_cuda_calls_to_the_cpu():
    from megatron_sdzero.runtime.distributed import free_port

    assert not torch.cuda.is_available()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("{port}", str(free_port()))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
