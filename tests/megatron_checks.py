"""Shared by the model tests: converted checkpoints loaded at a TP x PP layout on gloo ranks.

``logits_loss_and_grads`` runs on every rank (through ``run_on_ranks``): one forward for the logits
and one forward/backward of a next-token cross-entropy through Megatron's schedule, then
``grads_of(model, arch)`` picks what to compare. ``merge_ranks`` folds the ranks' partial results
(logits and loss live on the last stage, gradients on the stage that owns each parameter).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def logits_loss_and_grads(
    checkpoints: dict[str, str],
    tp: int,
    pp: int,
    tokens: torch.Tensor,
    grads_of: Callable[[Any, Any], dict[str, Any]],
) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sdzero.conversion.megatron_io import ModelMeta, _build, load_weights, resolve_checkpoint
    from megatron_sdzero.models.inference import forward_logits
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig(tp=tp, pp=pp))
    labels = tokens.roll(-1, dims=1)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = {}
    for name, path in checkpoints.items():
        root, ckpt = resolve_checkpoint(Path(path))
        meta = ModelMeta.read(root)
        model = _build(meta)
        load_weights(model, ckpt)
        with torch.no_grad():
            logits = forward_logits(model, tokens, meta.arch.vocab_size)

        def step(_, m):
            per_token = m(tokens, positions, None, labels=labels)
            return per_token, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

        losses = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
        )
        out[name] = dict(logits=logits, loss=[x["loss"] for x in losses], **grads_of(model, meta.arch))
    return out


def merge_ranks(rank_results: list[dict]) -> dict:
    merged: dict[str, dict] = {}
    for result in rank_results:
        for name, values in result.items():
            entry = merged.setdefault(name, {"logits": None, "loss": None, "grads": {}})
            for key, value in values.items():
                if key == "grads":
                    entry["grads"].update(value)
                elif key == "loss":
                    entry["loss"] = value[0] if value else entry["loss"]
                elif key == "logits":
                    entry["logits"] = value if value is not None else entry["logits"]
                else:
                    entry[key] = value
    return merged
