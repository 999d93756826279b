"""megatron_sdzero.losses against float64 references: TP = 1 in process, TP = 2 and 4 over gloo.

Every case compares the loss value, the per-token values and the gradient of every rank's shard with
the matching slice of a float64 full-vocabulary reference (tolerances in test_losses_reference.py).
The multi-rank part runs once in 4 spawned processes (TP=2 twice, TP=4, TP=1/2/4 cross-entropy
against Megatron's vocab_parallel_cross_entropy, and Megatron's own parallel_state with TP=2 x DP=2
for the global-batch reduction).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

from test_losses_reference import (  # noqa: E402
    Case,
    all_cases,
    grad_error,
    make_inputs,
    reference_cross_entropy,
    reference_loss_and_grad,
    value_error,
)

from megatron_sdzero.losses import (  # noqa: E402
    DistillLossConfig,
    count_valid_tokens,
    distill_loss,
    masked_cross_entropy,
)

CASES = all_cases()
CASE_BY_NAME = {case.name: case for case in CASES}
WORLD = 4


def _token_error(got: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor) -> float:
    active = weights != 0
    errors = [value_error(g, r) for g, r in zip(got[active].tolist(), ref[active].tolist(), strict=True)]
    return max(errors, default=0.0)


@functools.cache
def _reference(case: Case) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    inputs = make_inputs(case)
    return reference_loss_and_grad(
        inputs["student"], inputs["teacher"], inputs["loss_mask"], inputs["sample_weights"],
        case.config, case.valid_vocab,
    )  # fmt: skip


def run_case(case: Case, tp_size: int = 1, shard_index: int = 0, group=None) -> dict[str, float]:
    """Errors (in units of the tolerance) of one rank's shard against the float64 reference."""
    inputs = make_inputs(case)
    ref_loss, ref_grad, ref_values, unit = _reference(case)
    width = case.vocab // tp_size
    cols = slice(shard_index * width, (shard_index + 1) * width)
    student = inputs["student"][..., cols].clone().requires_grad_()
    loss, metrics = distill_loss(
        student, inputs["teacher"][..., cols].clone(), inputs["loss_mask"], config=case.config,
        valid_vocab_size=case.valid_vocab, sample_weights=inputs["sample_weights"], tp_group=group,
    )  # fmt: skip
    loss.backward()
    weights = inputs["loss_mask"] * inputs["sample_weights"]
    return {
        "value": value_error(loss.item(), ref_loss),
        "tokens": _token_error(metrics.token_values, ref_values, weights),
        "grad": grad_error(student.grad, ref_grad[..., cols], case.student_dtype, unit),
        "finite": float(torch.isfinite(student.grad).all()),
    }


def assert_within_tolerance(errors: dict[str, float], label: str) -> None:
    assert errors["finite"] == 1.0, f"{label}: non-finite gradient"
    for key in ("value", "tokens", "grad"):
        assert errors[key] <= 1.0, f"{label}: {key} error {errors[key]:.3g} x tolerance"


# ---------------------------------------------------------------- single process (TP = 1)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_single_process_matches_float64_reference(case: Case) -> None:
    assert_within_tolerance(run_case(case), case.name)


def test_all_masked_batch_gives_zero_loss_and_gradient() -> None:
    case = CASES[0]
    inputs = make_inputs(case)
    student = inputs["student"].clone().requires_grad_()
    loss, metrics = distill_loss(student, inputs["teacher"], torch.zeros_like(inputs["loss_mask"]))
    loss.backward()
    assert loss.item() == 0.0 and metrics.num_valid_tokens.item() == 0
    assert torch.count_nonzero(student.grad) == 0


def test_teacher_gets_no_gradient_and_inputs_are_untouched() -> None:
    inputs = make_inputs(CASES[0])
    student = inputs["student"].clone().requires_grad_()
    teacher = inputs["teacher"].clone().requires_grad_()
    before = (student.detach().clone(), teacher.detach().clone())
    loss, _ = distill_loss(student, teacher, inputs["loss_mask"], config=DistillLossConfig(kind="mixed"))
    loss.backward()
    assert teacher.grad is None
    assert torch.equal(student.detach(), before[0]) and torch.equal(teacher.detach(), before[1])


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_upstream_gradient_and_no_grad_mode(kind: str) -> None:
    """The gradient is computed in the forward: an upstream gradient != 1 must rescale it, and
    without grad mode none is computed (and the value is unchanged)."""
    inputs = make_inputs(CASES[0])
    config = DistillLossConfig(kind=kind)
    grads = []
    for upstream in (1.0, 2.5):
        student = inputs["student"].clone().requires_grad_()
        loss, _ = distill_loss(student, inputs["teacher"], inputs["loss_mask"], config=config)
        (loss * upstream).backward()
        grads.append(student.grad)
    torch.testing.assert_close(grads[1], 2.5 * grads[0])
    with torch.no_grad():
        student = inputs["student"].clone().requires_grad_()
        value, _ = distill_loss(student, inputs["teacher"], inputs["loss_mask"], config=config)
    assert value.item() == loss.item() and not value.requires_grad


def test_global_divisor_and_sum_reduction() -> None:
    case = CASES[0]
    inputs = make_inputs(case)
    kwargs = {"sample_weights": inputs["sample_weights"], "valid_vocab_size": case.valid_vocab}
    mean, metrics = distill_loss(inputs["student"], inputs["teacher"], inputs["loss_mask"], **kwargs)
    total, _ = distill_loss(
        inputs["student"], inputs["teacher"], inputs["loss_mask"], reduction="sum", **kwargs
    )
    scaled, _ = distill_loss(
        inputs["student"], inputs["teacher"], inputs["loss_mask"], num_valid_tokens_global=40, **kwargs
    )
    count = count_valid_tokens(inputs["loss_mask"], inputs["sample_weights"])
    assert count.item() == metrics.num_valid_tokens.item() == int((inputs["loss_mask"][:, [0, 2]] != 0).sum())
    assert torch.allclose(total, mean * count, rtol=1e-6)
    assert torch.allclose(scaled, total / 40, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_float64_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(6, 2, 96, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, 90, (6, 2), generator=gen)
    loss_mask = (torch.rand(6, 2, generator=gen) > 0.3).float()
    labels[loss_mask == 0] = -100  # ignored labels of masked tokens must not matter
    x = logits.clone().requires_grad_()
    loss, metrics = masked_cross_entropy(x, labels, loss_mask, valid_vocab_size=90, chunk_tokens=5)
    loss.backward()
    ref_loss, ref_grad, ref_tokens = reference_cross_entropy(logits, labels, loss_mask, 90)
    assert value_error(loss.item(), ref_loss) <= 1.0
    assert _token_error(metrics.token_values, ref_tokens, loss_mask) <= 1.0
    assert grad_error(x.grad, ref_grad, dtype) <= 1.0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        DistillLossConfig(kind="tvd")
    with pytest.raises(ValueError):
        DistillLossConfig(kind="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError):
        DistillLossConfig(top_k_tail=True)
    inputs = make_inputs(CASES[0])
    with pytest.raises(ValueError):
        distill_loss(
            inputs["student"], inputs["teacher"], inputs["loss_mask"], config=DistillLossConfig(top_k=97)
        )


# The smallest case of teacher top-k with fewer finite teacher logits than k on a padded shard: 6 valid
# ids of 8, k = 4, two finite teacher logits. Only ids 0 and 1 form buckets: KL(softmax(2, 1) ||
# softmax(1, 2)) = tanh(1 / 2) = 0.4621171573, and only they get a gradient.
_INF = float("inf")
SMALLEST_TOP_K_STUDENT = torch.tensor([[2.0, 1.0, -_INF, -_INF, -_INF, -_INF, 5.0, 5.0]])
SMALLEST_TOP_K_TEACHER = torch.tensor([[1.0, 2.0, -_INF, -_INF, -_INF, -_INF, 7.0, 7.0]])
SMALLEST_TOP_K_VALUE = math.tanh(0.5)


def smallest_top_k_case(tp_size: int = 1, shard_index: int = 0, group=None) -> tuple[float, torch.Tensor]:
    """(loss, this shard's gradient) of the smallest case above on one rank's shard."""
    width = 8 // tp_size
    cols = slice(shard_index * width, (shard_index + 1) * width)
    student = SMALLEST_TOP_K_STUDENT[:, cols].clone().requires_grad_()
    loss, _ = distill_loss(
        student, SMALLEST_TOP_K_TEACHER[:, cols], torch.ones(1), config=DistillLossConfig(top_k=4),
        valid_vocab_size=6, tp_group=group,
    )  # fmt: skip
    loss.backward()
    return loss.item(), student.grad


def smallest_top_k_expected_grad() -> torch.Tensor:
    """d KL / d student: p (log p - log q - KL) at ids 0 and 1, zero elsewhere."""
    p = torch.softmax(torch.tensor([2.0, 1.0], dtype=torch.float64), 0)
    grad = p * (torch.tensor([1.0, -1.0], dtype=torch.float64) - SMALLEST_TOP_K_VALUE)
    return torch.cat([grad, torch.zeros(6, dtype=torch.float64)])[None]


def test_top_k_with_fewer_finite_teacher_logits_than_k() -> None:
    loss, grad = smallest_top_k_case()
    assert abs(loss - 0.4621171573) < 1e-7
    torch.testing.assert_close(grad.double(), smallest_top_k_expected_grad(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- multi-rank (gloo, spawned once)


def _tp_groups(rank: int) -> dict[int, tuple[object, int]]:
    """TP size -> (this rank's group, its shard index). Every rank must create every group."""
    singles = [dist.new_group([r]) for r in range(WORLD)]
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    everyone = dist.new_group(list(range(WORLD)))
    return {1: (singles[rank], 0), 2: (pairs[rank // 2], rank % 2), 4: (everyone, rank)}


def _distill_checks(rank: int, groups: dict) -> dict[str, dict[str, float]]:
    results = {}
    pair_group, pair_index = groups[2]
    for index, case in enumerate(CASES):
        if index % 2 == rank // 2:  # the two TP=2 pairs split the cases between them
            results[f"tp2/{case.name}"] = run_case(case, 2, pair_index, pair_group)
        results[f"tp4/{case.name}"] = run_case(case, 4, groups[4][1], groups[4][0])
    return results


def _smallest_top_k_checks(groups: dict) -> dict[str, dict[str, float]]:
    """The smallest top-k case at TP = 2 (the second shard: 2 valid ids and 2 padding) and TP = 4
    (the last shard holds only padding)."""
    results = {}
    for tp_size in (2, 4):
        group, shard_index = groups[tp_size]
        loss, grad = smallest_top_k_case(tp_size, shard_index, group)
        width = 8 // tp_size
        want = smallest_top_k_expected_grad()[:, shard_index * width : (shard_index + 1) * width]
        results[f"smallest-top-k-tp{tp_size}"] = {
            "value": abs(loss - SMALLEST_TOP_K_VALUE),
            "grad": (grad.double() - want).abs().max().item(),
        }
    return results


def _megatron_ce_checks(groups: dict) -> dict[str, dict[str, float]]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    results = {}
    for tp_size, (group, shard_index) in groups.items():
        for valid, scale in ((96, 3.0), (90, 3.0), (96, 1e4)):
            gen = torch.Generator().manual_seed(int(scale) + valid)
            logits = torch.randn(5, 3, 96, generator=gen) * scale
            logits[..., valid:] = float("-inf")  # Megatron has no padding notion: -inf makes both agree
            labels = torch.randint(0, valid, (5, 3), generator=gen)
            loss_mask = (torch.rand(5, 3, generator=gen) > 0.3).float()
            width = 96 // tp_size
            cols = slice(shard_index * width, (shard_index + 1) * width)
            ours = logits[..., cols].clone().requires_grad_()
            loss, metrics = masked_cross_entropy(
                ours, labels, loss_mask, valid_vocab_size=valid, tp_group=group
            )
            loss.backward()
            theirs = logits[..., cols].clone().requires_grad_()
            per_token = vocab_parallel_cross_entropy(
                theirs.clone(), labels, tp_group=group
            )  # it writes in place
            (per_token * loss_mask).sum().div(loss_mask.sum()).backward()
            ref_loss, ref_grad, _ = reference_cross_entropy(logits, labels, loss_mask, valid)
            active = loss_mask != 0
            results[f"ce-tp{tp_size}-valid{valid}-scale{scale:g}"] = {
                "vs_megatron_tokens": (metrics.token_values[active] - per_token[active]).abs().max().item(),
                "vs_megatron_grad": (ours.grad - theirs.grad).abs().max().item(),
                "value": value_error(loss.item(), ref_loss),
                "grad": grad_error(ours.grad, ref_grad[..., cols], torch.float32),
            }
    return results


def _global_batch(seed: int) -> tuple[Case, list[dict[str, torch.Tensor]]]:
    """4 micro-batches (2 per DP rank) with different masks; the reference sees them side by side."""
    case = Case(name="dp", config=DistillLossConfig(kind="mixed", chunk_tokens=4), seed=seed)
    return case, [make_inputs(Case(name="dp", config=case.config, seed=seed + m)) for m in range(4)]


def _data_parallel_checks() -> dict[str, dict[str, float]]:
    """Megatron's parallel_state (TP=2 x DP=2): default TP group, DP token count, global reduction."""
    from megatron.core import parallel_state

    from megatron_sdzero.runtime.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    case, micro_batches = _global_batch(seed=11)
    mine = micro_batches[2 * dp_rank : 2 * dp_rank + 2]
    stacked_mask = torch.cat([mb["loss_mask"] for mb in mine], dim=1)
    stacked_weights = torch.cat([mb["sample_weights"] for mb in mine], dim=1)
    n_global = count_valid_tokens(
        stacked_mask, stacked_weights, group=parallel_state.get_data_parallel_group()
    )
    cat = {key: torch.cat([mb[key] for mb in micro_batches], dim=1) for key in micro_batches[0]}
    ref_loss, ref_grad, _, unit = reference_loss_and_grad(
        cat["student"], cat["teacher"], cat["loss_mask"], cat["sample_weights"], case.config, case.valid_vocab
    )
    width = case.vocab // 2
    cols = slice(tp_rank * width, (tp_rank + 1) * width)
    local_loss, grad_errors = torch.zeros(()), []
    for index, mb in enumerate(mine):
        student = mb["student"][..., cols].clone().requires_grad_()
        loss, _ = distill_loss(
            student, mb["teacher"][..., cols], mb["loss_mask"], config=case.config,
            valid_vocab_size=case.valid_vocab, sample_weights=mb["sample_weights"],
            num_valid_tokens_global=n_global,
        )  # fmt: skip
        loss.backward()
        local_loss += loss.detach()
        batch_cols = slice(3 * (2 * dp_rank + index), 3 * (2 * dp_rank + index + 1))
        grad_errors.append(grad_error(student.grad, ref_grad[:, batch_cols, cols], torch.float32, unit))
    global_loss = local_loss.clone()
    dist.all_reduce(global_loss, group=parallel_state.get_data_parallel_group())
    expected_count = int(((cat["loss_mask"] != 0) & (cat["sample_weights"] != 0)).sum())
    parallel_state.destroy_model_parallel()
    return {
        "dp-global-mean": {
            "value": value_error(global_loss.item(), ref_loss),
            "grad": max(grad_errors),
            "count_mismatch": float(n_global.item() != expected_count),
        }
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        groups = _tp_groups(rank)
        results = _distill_checks(rank, groups)
        results.update(_smallest_top_k_checks(groups))
        results.update(_megatron_ce_checks(groups))
        results.update(_data_parallel_checks())
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def multi_rank_results(tmp_path_factory) -> list[dict[str, dict[str, float]]]:
    out_dir = tmp_path_factory.mktemp("losses_tp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD)]


def _rank_results(results: list[dict], key: str) -> list[dict[str, float]]:
    found = [per_rank[key] for per_rank in results if key in per_rank]
    assert found, f"no rank reported {key}"
    return found


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("case_name", [case.name for case in CASES])
def test_tensor_parallel_matches_float64_reference(multi_rank_results, tp_size: int, case_name: str) -> None:
    for errors in _rank_results(multi_rank_results, f"tp{tp_size}/{case_name}"):
        assert_within_tolerance(errors, f"tp{tp_size}/{case_name}")


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("variant", ["valid96-scale3", "valid90-scale3", "valid96-scale10000"])
def test_cross_entropy_equals_megatron_vocab_parallel_cross_entropy(
    multi_rank_results, tp_size, variant
) -> None:
    for errors in _rank_results(multi_rank_results, f"ce-tp{tp_size}-{variant}"):
        scale = 1e4 if "10000" in variant else 1.0
        assert errors["vs_megatron_tokens"] <= 1e-5 * scale and errors["vs_megatron_grad"] <= 1e-6
        assert errors["value"] <= 1.0 and errors["grad"] <= 1.0


@pytest.mark.parametrize("tp_size", [2, 4])
def test_top_k_with_fewer_finite_teacher_logits_than_k_tensor_parallel(multi_rank_results, tp_size) -> None:
    for errors in _rank_results(multi_rank_results, f"smallest-top-k-tp{tp_size}"):
        assert errors["value"] < 1e-7 and errors["grad"] < 1e-7, errors


def test_data_parallel_global_token_mean(multi_rank_results) -> None:
    for errors in _rank_results(multi_rank_results, "dp-global-mean"):
        assert errors["count_mismatch"] == 0.0
        assert errors["value"] <= 1.0 and errors["grad"] <= 1.0, errors


def test_reference_cases_cover_the_issue() -> None:
    """Guard against the case list silently shrinking."""
    names = set(CASE_BY_NAME)
    for kind in ("reverse", "forward", "mixed", "jsd"):
        for mode in ("full", "top5", "top56", "top5-tail", "top56-tail"):
            tags = ("fp32", "bf16-T0.7", "extreme-1e4", "neg-inf", "few-finite-teacher", "teacher-rules-out")
            for tag in tags:
                assert f"{kind}-{mode}/{tag}" in names
