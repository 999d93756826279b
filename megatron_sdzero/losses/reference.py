"""float64 reference of the per-row kernel contract (``fused_loss_and_grad``), for checks.

Used by tests/test_losses_cluster.py and tools/check_kl_cluster.py to judge the one-pass kernel (and
Triton's fused kernel) row by row; the public API's reference is in tests/test_losses_reference.py.
"""

from __future__ import annotations

import torch

from megatron_sdzero.losses._torch_kernels import GradSpec


def fused_rows_reference(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    coef: torch.Tensor,
    targets: torch.Tensor | None,
    n_valid: int,
    inv_temp: float,
    spec: GradSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 per-row values and coef * d value / d (student / T); rows with coef == 0 give zeros.

    KL family (``spec.forward_weight`` mixes reverse and forward) or cross-entropy against
    ``targets`` (-1: no label, value +inf); columns at or above ``n_valid`` are padding. A row whose
    reverse KL is +inf (the mixed KL's too) has gradient 0: the value is +inf for every finite student.
    """
    s = student[:, :n_valid].double() * inv_temp
    lp = s.log_softmax(-1)
    p = lp.exp()
    if spec.kind == "ce":
        safe = targets.clamp(min=0)
        index = torch.arange(student.shape[0], device=s.device)
        values = torch.where(targets >= 0, -lp[index, safe], torch.inf)
        grad = p.clone()
        grad[index, safe] -= (targets >= 0).double()
    else:
        lq = (teacher[:, :n_valid].double() * inv_temp).log_softmax(-1)
        q = lq.exp()
        reverse = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
        forward = torch.where(q > 0, q * (lq - lp), 0.0).sum(-1)
        w = spec.forward_weight
        values = reverse if w == 0 else forward if w == 1 else (1 - w) * reverse + w * forward
        grad = torch.zeros_like(p)
        if w < 1:
            grad += (1 - w) * torch.where(p > 0, p * (lp - lq - reverse[:, None]), 0.0)
        if w > 0:
            grad += w * (p - q)
        if w < 1:  # +inf reverse KL (student mass where the teacher has none): gradient 0
            grad[reverse == torch.inf] = 0.0
    full = torch.zeros(student.shape, dtype=torch.float64, device=s.device)
    full[:, :n_valid] = grad * coef.double()[:, None]
    active = coef != 0
    full[~active] = 0.0
    return torch.where(active, values, 0.0), full
