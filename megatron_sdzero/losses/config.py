"""Configuration of the distillation divergence (Phase 2 loss)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DivergenceKind = Literal["reverse", "forward", "mixed", "jsd"]
Backend = Literal["auto", "triton", "torch"]


@dataclass(frozen=True)
class DistillLossConfig:
    """How student and teacher distributions are compared, per token.

    kind:
        ``reverse``  KL(student || teacher), the paper's loss (default);
        ``forward``  KL(teacher || student);
        ``mixed``    mixed_forward_weight * forward + (1 - mixed_forward_weight) * reverse
                     (the reference code's choice, with weight 0.5);
        ``jsd``      generalised Jensen-Shannon divergence with mixture M = beta * teacher +
                     (1 - beta) * student: beta * KL(teacher || M) + (1 - beta) * KL(student || M)
                     (the GKD / TRL convention; beta must lie strictly between 0 and 1).
    top_k:
        None compares the full vocabulary. An integer k keeps the teacher's k most likely ids
        (chosen across all tensor-parallel shards) and renormalises both distributions over them
        (the reference code's mode, k = 64 there). Ids where the teacher logit is -inf are never
        among the k: a row with fewer finite teacher logits keeps only those.
    top_k_tail:
        With top_k, keep the probability mass outside the top-k ids as one extra bucket instead of
        renormalising: both distributions then have k + 1 outcomes and nothing is discarded.
    temperature:
        Both logits are divided by it before the softmax. No temperature-squared factor is applied.
    chunk_tokens:
        Tokens processed at once by the PyTorch path (and the top-k path); bounds the float32
        working set to a few [chunk_tokens, vocab/TP] buffers.
    backend:
        ``auto`` uses the fused Triton kernels for CUDA tensors when Triton is importable and the
        chunked PyTorch implementation otherwise; ``triton`` / ``torch`` force one.
    """

    kind: DivergenceKind = "reverse"
    mixed_forward_weight: float = 0.5
    jsd_beta: float = 0.5
    top_k: int | None = None
    top_k_tail: bool = False
    temperature: float = 1.0
    chunk_tokens: int = 1024
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("reverse", "forward", "mixed", "jsd"):
            raise ValueError(f"unknown divergence kind {self.kind!r}")
        if not 0.0 <= self.mixed_forward_weight <= 1.0:
            raise ValueError(f"mixed_forward_weight must lie in [0, 1], got {self.mixed_forward_weight}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must lie strictly between 0 and 1, got {self.jsd_beta}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_k_tail and self.top_k is None:
            raise ValueError("top_k_tail needs top_k")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"unknown backend {self.backend!r}")

    @property
    def forward_weight(self) -> float:
        """Weight of KL(teacher || student) for the reverse / forward / mixed family."""
        return {"reverse": 0.0, "forward": 1.0, "mixed": self.mixed_forward_weight}.get(self.kind, 0.0)
