"""Forward-only passes through a (tensor- and pipeline-parallel) Megatron model."""

from __future__ import annotations

import torch


def forward_logits(model, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, vocab] for ``tokens`` on the last pipeline stage.

    Every rank of the model-parallel group must call this with the same tokens. Other stages
    return None. Logits are gathered across tensor-parallel ranks (fine for probes and tests; the
    training losses work on the vocab shards instead). ``vocab_size`` drops the padding columns.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, step_model):
        output = step_model(tokens, positions, None)

        def collect(out):
            collected.append(out.detach())
            return out.new_zeros(()), {}

        return output, collect

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(collected[0])
    return logits[..., :vocab_size] if vocab_size else logits
