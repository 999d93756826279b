"""Run a function on N local ranks (gloo on CPU, NCCL on GPU) and collect each rank's result.

Used by the tests (multi-rank checks on one machine) and by tools that need a small local world,
such as ``sdzero convert hf-to-mcore --tp 2 --pp 2`` on a login node.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from megatron_sdzero.runtime.distributed import free_port


class RankFailed(RuntimeError):
    pass


def _rank_entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(*args))
    except BaseException as err:  # report every failure to the parent, with its traceback
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        from megatron_sdzero.runtime.distributed import destroy_model_parallel

        try:
            destroy_model_parallel()
        except Exception:
            pass
    with open(path, "wb") as f:
        pickle.dump(result, f)


def _start_method() -> str:
    """How ranks are started; SDZERO_START_METHOD overrides.

    CPU: a forkserver that has imported Megatron once, so ranks start in about a second instead of
    paying ~8 s of imports each; unlike plain fork, it carries no OpenMP or tokenizer thread state of
    the caller (forking those deadlocks the child's first parallel op). GPU: spawn, since a CUDA
    context survives neither.
    """
    import torch

    method = os.environ.get("SDZERO_START_METHOD") or ("spawn" if torch.cuda.is_available() else "forkserver")
    if method == "forkserver":
        mp.set_forkserver_preload(["megatron_sdzero.runtime.preload"])
    return method


def _join(context, timeout_s: float | None) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if deadline is not None and time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise RankFailed(f"ranks did not finish within {timeout_s:.0f} s; killed them")


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float | None = None
) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; return their results in rank order.

    ``fn`` must be importable (a module-level function). Each rank has RANK, WORLD_SIZE and
    MASTER_* set and must initialise its own process group (``init_model_parallel``).
    """
    start_method = _start_method()
    with tempfile.TemporaryDirectory(prefix="sdzero-ranks-") as out_dir:
        port = free_port()
        context = mp.start_processes(
            _rank_entry,
            args=(world_size, port, out_dir, fn, args),
            nprocs=world_size,
            start_method=start_method,
            join=False,
        )
        _join(context, timeout_s)
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                raise RankFailed(f"rank {rank} wrote no result")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise RankFailed(f"rank {rank} failed: {value}")
            results.append(value)
        return results
