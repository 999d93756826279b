"""Model FLOPs of a training step and MFU, as Megatron-LM counts them.

Megatron-LM's ``num_floating_point_operations`` for a dense decoder with GQA and SwiGLU, per token
(forward + backward = 3 GEMM passes, 2 FLOPs per multiply-add):

    12 * L * h^2 * [ (1 + g/n + s/h) * (n*d)/h  +  (f/h) * 3/2  +  V / (2*L*h) ]

    L layers, h hidden, n query heads, g KV groups, d head dim, f FFN hidden, V padded vocabulary,
    s the token's sequence length. The terms: Q/O and K/V projections; QK^T and AV (counted
    without the causal halving, as Megatron-LM does); the three SwiGLU GEMMs; the output layer.

The only generalisation: with packing, a token's ``s`` is the length of its own sample (packed
samples do not attend to each other), so the attention term of a step is sum_i s_i^2 over its
samples instead of (tokens * seq_length). Padding tokens are not counted: MFU is useful work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from megatron_sdzero.models.architecture import DecoderArchitecture


@dataclass(frozen=True)
class FlopsModel:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    padded_vocab_size: int

    @classmethod
    def from_arch(cls, arch: DecoderArchitecture, padded_vocab_size: int) -> FlopsModel:
        return cls(
            num_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            ffn_hidden_size=arch.ffn_hidden_size,
            num_attention_heads=arch.num_attention_heads,
            num_query_groups=arch.num_query_groups,
            head_dim=arch.head_dim,
            padded_vocab_size=padded_vocab_size,
        )

    def _per_token_dense(self) -> float:
        """FLOPs per token of everything but the sequence-length-dependent attention term."""
        L, h = self.num_layers, self.hidden_size  # noqa: N806
        q_ratio = self.num_attention_heads * self.head_dim / h
        attention_projections = (1 + self.num_query_groups / self.num_attention_heads) * q_ratio
        mlp = self.ffn_hidden_size / h * 1.5
        logits = self.padded_vocab_size / (2 * L * h)
        return 12 * L * h * h * (attention_projections + mlp + logits)

    def _attention_coefficient(self) -> float:
        """FLOPs per (token x sequence length) of QK^T and AV: 12 * L * n * d."""
        return 12 * self.num_layers * self.num_attention_heads * self.head_dim

    def step_flops(self, sample_lengths: Iterable[int]) -> float:
        """Training FLOPs (fwd + bwd) of one step over samples of these lengths (tokens)."""
        lengths = list(sample_lengths)
        tokens = sum(lengths)
        squares = sum(s * s for s in lengths)
        return tokens * self._per_token_dense() + squares * self._attention_coefficient()

    def flops_per_token(self, seq_length: int) -> float:
        return self._per_token_dense() + seq_length * self._attention_coefficient()


def mfu(flops: float, seconds: float, num_gpus: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s per GPU over the dense peak (989 TFLOP/s BF16 H100)."""
    if seconds <= 0 or num_gpus <= 0:
        return float("nan")
    return flops / seconds / num_gpus / (peak_tflops * 1e12)


def tflops_per_gpu(flops: float, seconds: float, num_gpus: int) -> float:
    if seconds <= 0 or num_gpus <= 0:
        return float("nan")
    return flops / seconds / num_gpus / 1e12
