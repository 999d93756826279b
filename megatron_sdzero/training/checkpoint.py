"""Training checkpoints through ``megatron.core.dist_checkpointing``, in the converted-checkpoint layout.

    RUN/
      latest_checkpointed_iteration.txt   the last complete iteration (written last, atomically)
      iter_0000100/                       torch_dist files: model, optimizer, RNG, scheduler, data
      sdzero_model.json                   architecture and dtype (as a conversion writes it)
      hf/                                 tokenizer and config of the source model

A save writes ``.iter_0000100.partial`` and renames it, then replaces the tracker: an interrupted
save leaves the previous checkpoint as the latest. Weights are stored under the same keys as a
conversion, so ``sdzero convert mcore-to-hf RUN OUT`` exports the latest iteration and a training
checkpoint is a valid ``finetune`` start (``load_weights`` ignores the optimizer entries).

``load`` resumes everything; ``finetune_from`` loads weights only. Phase 2 adds its own entries
with ``extra_sharded`` (sharded state dicts, e.g. teacher weights or an EMA) and ``extra_common``
(plain picklable values, e.g. its data position).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_sdzero.conversion.hf_io import CheckpointError
from megatron_sdzero.conversion.megatron_io import (
    MODEL_META,
    TRACKER,
    ModelMeta,
    load_weights,
    resolve_checkpoint,
)
from megatron_sdzero.training.config import CheckpointConfig, OptimizerFormat
from megatron_sdzero.training.setup import Trainable, model_parameters_finite, unwrap

FORMAT_VERSION = 1


class CorruptStateError(RuntimeError):
    """The model holds non-finite values: nothing is written."""


@dataclass
class LoadedState:
    iteration: int
    data_state: dict[str, Any]
    extra_common: dict[str, Any] = field(default_factory=dict)
    extra_sharded: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None
    optimizer_loaded: bool = True


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The tracker's iteration (None when there is no complete training checkpoint)."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    tag = tracker.read_text().strip()
    return None if tag == "release" else int(tag)


# --- parallel layout and rank helpers ---------------------------------------------------------------


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(with_context_parallel=True),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# --- the torch-AdamW fallback of the distributed optimizer (no TE / apex: CPU) ---------------------


def _distributed_optimizers(optimizer) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _using_torch_adam() -> bool:
    from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

    return bool(USING_PYTORCH_OPTIMIZER)


def _adam_step(optimizer) -> float | None:
    for part in _distributed_optimizers(optimizer):
        for state in part.optimizer.state.values():
            if "step" in state:
                return float(state["step"])
    return None


def _prepare_torch_adam_for_load(optimizer) -> None:
    """Make Megatron's dist-optimizer load work on torch.optim.AdamW (measured traps, see notes).

    - The inner state must exist before the loading state dict is built (Megatron reads ``step``
      from it); a fresh optimizer gets zero moments and step 0.
    - ``fully_reshardable`` omits torch's per-parameter ``step`` from the loaded tensors and then
      indexes it; keep the current step there (the true step is restored after the load).
    """
    _ensure_torch_adam_state(optimizer)
    for part in _distributed_optimizers(optimizer):
        if not getattr(part, "_sdzero_step_patch", False):
            original = part._set_main_param_and_optimizer_states

            def set_states(model_param, tensors, _part=part, _original=original):
                if "step" not in tensors:
                    group_index, group_order = _part.model_param_group_index_map[model_param]
                    main_param = _part.optimizer.param_groups[group_index]["params"][group_order]
                    step = _part.optimizer.state[main_param].get("step")
                    if step is not None:
                        tensors = {**tensors, "step": step}
                return _original(model_param, tensors)

            part._set_main_param_and_optimizer_states = set_states
            part._sdzero_step_patch = True


def _ensure_torch_adam_state(optimizer) -> None:
    """Zero moments and step 0 for parameters without state: what AdamW starts from anyway, but
    Megatron's state_dict() needs the ``step`` entries (a save before the first step fails without)."""
    for part in _distributed_optimizers(optimizer):
        inner = part.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    state["step"] = torch.zeros((), dtype=torch.float32)


def _restore_adam_step(optimizer, step: float | None) -> None:
    """torch AdamW keeps ``step`` per parameter; Megatron's loaders may leave a stale one behind."""
    if step is None:
        return
    for part in _distributed_optimizers(optimizer):
        for state in part.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step), dtype=torch.float32)


# --- state dicts --------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return dict(
        random=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        tracker=tensor_parallel.get_cuda_rng_tracker().get_states(),
    )


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict[str, Any] | None = None):
    """One RNG object per (pp, tp) rank, replicated over data parallel (as Megatron-LM stores it)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        state if state is not None else _rng_state(),
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _model_sharded(modules: list[Any]) -> dict[str, Any]:
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": module.sharded_state_dict() for i, module in enumerate(modules)}


def _sharded_state(
    trainable: Trainable,
    *,
    loading: bool,
    optimizer_format: OptimizerFormat,
    include_optimizer: bool = True,
    include_rng: bool = True,
    extra_sharded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state = _model_sharded(trainable.modules)
    if include_optimizer:
        metadata = {"distrib_optim_sharding_type": optimizer_format}
        state["optimizer"] = trainable.optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=metadata
        )
    if include_rng:
        state["rng_state"] = _rng_sharded()
    if extra_sharded:
        state["extra_sharded"] = extra_sharded
    return state


# --- save ---------------------------------------------------------------------------------------------


def _publish_assets(root: Path, meta: ModelMeta, hf_assets: Path | None) -> None:
    if not (root / MODEL_META).is_file():
        meta.write(root)
    if hf_assets is not None and hf_assets.is_dir() and not (root / "hf").exists():
        staging = root / ".hf.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(hf_assets, staging)
        os.replace(staging, root / "hf")


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / f".{TRACKER}.partial"
    tmp.write_text(str(iteration))
    os.replace(tmp, root / TRACKER)


def _prune(root: Path, keep_last: int | None, latest: int) -> None:
    if keep_last is None:
        return
    done = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and p.is_dir())
    for iteration in [i for i in done if i != latest][: max(0, len(done) - max(keep_last, 1))]:
        shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)


def _save_strategy():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy()
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:  # replicas split the writing instead of DP rank 0 doing it all
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def save(
    root: str | Path,
    iteration: int,
    trainable: Trainable,
    *,
    config: CheckpointConfig,
    meta: ModelMeta,
    data_state: dict[str, Any],
    hf_assets: Path | None = None,
    extra_sharded: dict[str, Any] | None = None,
    extra_common: dict[str, Any] | None = None,
) -> Path:
    """Write iteration ``iteration`` of a run (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    if not model_parameters_finite(trainable.model):
        raise CorruptStateError(f"model parameters are not finite at iteration {iteration}: nothing saved")
    final, partial = iteration_dir(root, iteration), root / f".iter_{iteration:07d}.partial"
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    if _using_torch_adam():
        _ensure_torch_adam_state(trainable.optimizer)
    state = _sharded_state(
        trainable, loading=False, optimizer_format=config.optimizer_format, extra_sharded=extra_sharded
    )
    state.update(
        iteration=iteration,
        format_version=FORMAT_VERSION,
        layout=_layout(),
        optimizer_format=config.optimizer_format,
        adam_step=_adam_step(trainable.optimizer),
        scheduler=trainable.scheduler.state_dict(),
        data_state=data_state,
        extra_common=extra_common or {},
    )
    content = {"distrib_optim_sharding_type": config.optimizer_format, "sdzero_format": FORMAT_VERSION}
    dist_checkpointing.save(state, str(partial), sharded_strategy=_save_strategy(), content_metadata=content)
    _barrier()
    if _is_rank0():
        _publish_assets(root, meta, hf_assets)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_tracker(root, iteration)
        _prune(root, config.keep_last, iteration)
    _barrier()
    return final


# --- load ---------------------------------------------------------------------------------------------


def _checkpoint_dir(path: Path) -> Path:
    iteration = latest_iteration(path)
    if iteration is None:
        raise CheckpointError(f"{path} holds no training checkpoint (no iteration in {TRACKER})")
    directory = iteration_dir(path, iteration)
    if not directory.is_dir():
        raise CheckpointError(f"{TRACKER} in {path} names iteration {iteration} but {directory} is missing")
    return directory


def _optimizer_loadable(common: dict[str, Any], config: CheckpointConfig) -> bool:
    if not config.load_optimizer:
        return False
    saved, now = common["layout"], _layout()
    same_model_layout = all(saved[k] == now[k] for k in ("tp", "pp", "vpp"))
    if common["optimizer_format"] == "dp_reshardable" and not same_model_layout:
        raise CheckpointError(
            f"the checkpoint's optimizer state was saved at tp={saved['tp']} pp={saved['pp']} "
            f"vpp={saved['vpp']} in the dp_reshardable format, which reshards over data parallel only; "
            f"this run has tp={now['tp']} pp={now['pp']} vpp={now['vpp']}. Resume at the saved layout, "
            "set checkpoint.load_optimizer=false (fresh Adam moments), or save with "
            "checkpoint.optimizer_format=fully_reshardable"
        )
    return True


def load(
    path: str | Path,
    trainable: Trainable,
    *,
    config: CheckpointConfig,
    extra_sharded: dict[str, Any] | None = None,
) -> LoadedState:
    """Resume from a run directory: weights, optimizer, scheduler, RNG, data position, extras.

    At another TP/PP the weights (and, with ``fully_reshardable``, the optimizer) reshard; the RNG
    state is then not restored. ``extra_sharded`` is the template of the entries Phase 2 saved
    (same keys); their loaded values come back in ``LoadedState.extra_sharded``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = _checkpoint_dir(Path(path))
    common = dist_checkpointing.load_common_state_dict(str(directory))
    with_optimizer = _optimizer_loadable(common, config)
    same_layout = all(common["layout"][k] == _layout()[k] for k in ("tp", "pp"))
    with_rng = config.load_rng and same_layout
    if with_optimizer and _using_torch_adam():
        _prepare_torch_adam_for_load(trainable.optimizer)
    with torch.no_grad():
        state = _sharded_state(
            trainable,
            loading=True,
            optimizer_format=common["optimizer_format"],
            include_optimizer=with_optimizer,
            include_rng=with_rng,
            extra_sharded=extra_sharded,
        )
        loaded = dist_checkpointing.load(state, str(directory), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        _apply_model(trainable.modules, loaded)
        if with_optimizer:
            trainable.optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_step(trainable.optimizer, common.get("adam_step"))
        else:
            trainable.optimizer.reload_model_params()
    trainable.scheduler.load_state_dict(common["scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    _barrier()
    return LoadedState(
        iteration=int(common["iteration"]),
        data_state=dict(common["data_state"]),
        extra_common=dict(common.get("extra_common") or {}),
        extra_sharded=loaded.get("extra_sharded", {}),
        directory=directory,
        optimizer_loaded=with_optimizer,
    )


def _apply_model(modules: list[Any], loaded: dict[str, Any]) -> None:
    keys = ["model"] if len(modules) == 1 else [f"model{i}" for i in range(len(modules))]
    for module, key in zip(modules, keys, strict=True):
        module.load_state_dict(loaded[key], strict=True)


def finetune_from(path: str | Path, trainable_or_chunks: Trainable | list[Any]) -> Path:
    """Load only the weights of a checkpoint (a conversion or a training run) and start fresh.

    With a ``Trainable`` the optimizer's fp32 main parameters are refreshed from the new weights.
    Returns the directory the weights came from.
    """
    _, directory = resolve_checkpoint(Path(path))
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    is_trainable = isinstance(trainable_or_chunks, Trainable)
    modules = unwrap(trainable_or_chunks.model if is_trainable else trainable_or_chunks)
    if len(modules) == 1:
        load_weights(modules[0], directory)
    else:
        _load_chunk_weights(modules, directory)
    if is_trainable:
        trainable_or_chunks.optimizer.reload_model_params()
    _barrier()
    return directory


def _load_chunk_weights(modules: list[Any], directory: Path) -> None:
    """Weights of all virtual-pipeline chunks in one load (the access check needs every layer covered)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state = {
        f"model{i}": {k: v for k, v in module.sharded_state_dict().items() if not k.endswith("_extra_state")}
        for i, module in enumerate(modules)
    }
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, str(directory), strict=StrictHandling.LOG_UNEXPECTED)
        for i, module in enumerate(modules):
            weights = {k: v for k, v in loaded[f"model{i}"].items() if k in state[f"model{i}"]}
            missing, unexpected = module.load_state_dict(weights, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise CheckpointError(
                    f"{directory} does not fit chunk {i}: missing {missing}, unexpected {unexpected}"
                )


def has_checkpoint(path: str | Path | None) -> bool:
    return path is not None and latest_iteration(path) is not None
