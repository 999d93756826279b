"""The one-pass cluster kernel (``_cluster_kernel.py``, ``csrc/kl_cluster.cu``) and ``grad_in_place``.

CPU (fast): the selection / fallback logic, the shared-memory plan, and ``grad_in_place`` through the
public API on the PyTorch path (and, in Triton's interpreter, the Triton kernels writing in place).
CPU (slow, needs nvcc): the kernel's algorithm run sequentially on the CPU (``emulate``) against
float64. GPU (``gpu``, Hopper): the kernel itself against the float64 references and tolerances of
test_losses_reference.py, and against the Triton fused kernel on larger shapes.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_losses_reference import (  # noqa: E402
    GRAD_TOL_BF16,
    GRAD_TOL_FP32,
    VALUE_ATOL,
    VALUE_RTOL,
    Case,
    grad_error,
    make_inputs,
    reference_cross_entropy,
    reference_loss_and_grad,
    value_error,
)

from megatron_sdzero.losses import (  # noqa: E402
    DistillLossConfig,
    _cluster_kernel,
    distill_loss,
    masked_cross_entropy,
)
from megatron_sdzero.losses._torch_kernels import GradSpec  # noqa: E402
from megatron_sdzero.losses.parallel import VocabShard  # noqa: E402
from megatron_sdzero.losses.reference import fused_rows_reference  # noqa: E402

H100_SMEM_OPTIN = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 / H200 (227 KB)


def _request(**overrides) -> _cluster_kernel.Request:
    fields = {
        "mode": "auto",
        "capability": (9, 0),
        "student_dtype": torch.bfloat16,
        "teacher_dtype": torch.bfloat16,
        "width": 151936,
        "contiguous": True,
        "aligned": True,
        "smem_optin": H100_SMEM_OPTIN,
        "cluster": 8,
    }
    return _cluster_kernel.Request(**{**fields, **overrides})


# ---------------------------------------------------------------- CPU: selection


def test_qualifying_request_has_no_fallback_reason() -> None:
    assert _cluster_kernel.fallback_reason(_request()) is None
    assert (
        _cluster_kernel.fallback_reason(
            _request(width=100278, student_dtype=torch.float16, teacher_dtype=torch.float16)
        )
        is None
    )
    assert (
        _cluster_kernel.fallback_reason(_request(teacher_dtype=None, width=300000)) is None
    )  # CE: one tensor
    assert _cluster_kernel.fallback_reason(_request(mode="1", mixed_kl=True)) is None


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"mode": "0"}, "SDZERO_KL_ONEPASS=0"),
        ({"mixed_kl": True}, "mixed reverse/forward KL stays on Triton"),
        ({"capability": (8, 0)}, "compute capability 9.x"),
        ({"capability": (10, 0)}, "compute capability 9.x"),
        ({"capability": None}, "compute capability 9.x"),
        ({"student_dtype": torch.float32, "teacher_dtype": torch.float32}, "bf16 or fp16"),
        ({"teacher_dtype": torch.float32}, "teacher in the student's dtype"),
        ({"contiguous": False}, "contiguous"),
        ({"aligned": False}, "16-byte aligned"),
        ({"width": 600000}, "does not fit"),
        ({"width": 151936, "cluster": 2}, "does not fit"),
    ],
)
def test_fallback_reasons(overrides: dict, expected: str) -> None:
    reason = _cluster_kernel.fallback_reason(_request(**overrides))
    assert reason is not None and expected in reason, reason


def test_build_error_is_a_fallback_reason() -> None:
    reason = _cluster_kernel.fallback_reason(_request(), build_error="nvcc not found (set CUDA_HOME)")
    assert reason == "the CUDA extension is unavailable: nvcc not found (set CUDA_HOME)"
    # A request that does not qualify reports its own reason first (and never needs the build).
    assert "bf16 or fp16" in _cluster_kernel.fallback_reason(
        _request(student_dtype=torch.float32, teacher_dtype=torch.float32), build_error="boom"
    )


def test_shared_memory_plan() -> None:
    qwen = _cluster_kernel.plan_cluster(151936, True, 8, H100_SMEM_OPTIN)
    assert qwen == _cluster_kernel.Plan(cluster=8, buffers=1, smem_bytes=76576)  # two CTAs per SM
    one_cta = _cluster_kernel.plan_cluster(151936, True, 8, H100_SMEM_OPTIN, smem_per_sm=150_000)
    assert one_cta == _cluster_kernel.Plan(cluster=8, buffers=2, smem_bytes=152576)
    assert _cluster_kernel.plan_cluster(100278, True, 8, H100_SMEM_OPTIN).buffers == 2  # and two CTAs
    assert _cluster_kernel.plan_cluster(151936, False, 8, H100_SMEM_OPTIN).buffers == 2
    assert (
        _cluster_kernel.plan_cluster(151936, True, 16, H100_SMEM_OPTIN).smem_bytes == 2 * 2 * 1188 * 16 + 576
    )
    assert _cluster_kernel.plan_cluster(300000, True, 8, H100_SMEM_OPTIN).buffers == 1
    for has_teacher in (True, False):
        for cluster in (1, 3, 8, 16):
            widest = _cluster_kernel.max_width(has_teacher, cluster, H100_SMEM_OPTIN)
            assert _cluster_kernel.plan_cluster(widest, has_teacher, cluster, H100_SMEM_OPTIN) is not None
            assert _cluster_kernel.plan_cluster(widest + 1, has_teacher, cluster, H100_SMEM_OPTIN) is None
    assert _cluster_kernel.max_width(False, 8, H100_SMEM_OPTIN) > 1.9 * _cluster_kernel.max_width(
        True, 8, H100_SMEM_OPTIN
    )


def test_environment_variables(monkeypatch) -> None:
    monkeypatch.delenv(_cluster_kernel.ONEPASS_ENV, raising=False)
    monkeypatch.delenv(_cluster_kernel.CLUSTER_ENV, raising=False)
    assert _cluster_kernel.onepass_mode() == "auto" and _cluster_kernel.cluster_size() == 8
    monkeypatch.setenv(_cluster_kernel.ONEPASS_ENV, " 1 ")
    monkeypatch.setenv(_cluster_kernel.CLUSTER_ENV, "16")
    assert _cluster_kernel.onepass_mode() == "1" and _cluster_kernel.cluster_size() == 16
    monkeypatch.setenv(_cluster_kernel.ONEPASS_ENV, "yes")
    with pytest.raises(ValueError, match="SDZERO_KL_ONEPASS"):
        _cluster_kernel.onepass_mode()
    monkeypatch.setenv(_cluster_kernel.CLUSTER_ENV, "17")
    with pytest.raises(ValueError, match="SDZERO_KL_CLUSTER"):
        _cluster_kernel.cluster_size()


class _FakeKernels:
    """Stands in for the _triton_kernels module."""

    @staticmethod
    def fused_loss_and_grad(*args, **kwargs):
        raise AssertionError("not called in these tests")


def _select(monkeypatch, request: _cluster_kernel.Request, build: tuple) -> object:
    monkeypatch.setattr(_cluster_kernel, "make_request", lambda student, teacher, spec=None: request)
    monkeypatch.setattr(_cluster_kernel, "build_status", lambda: build)
    monkeypatch.setenv(_cluster_kernel.ONEPASS_ENV, request.mode)
    x = torch.zeros(2, 8)
    return _cluster_kernel.select_fused_kernel(_FakeKernels, x, x)


def test_selection_uses_the_cluster_kernel_when_it_qualifies(monkeypatch) -> None:
    chosen = _select(monkeypatch, _request(), (object(), None))
    assert isinstance(chosen, functools.partial) and chosen.func is _cluster_kernel.fused_loss_and_grad
    assert chosen.keywords["plan"] == _cluster_kernel.Plan(cluster=8, buffers=1, smem_bytes=76576)


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(_cluster_kernel, "_reported", set())
    caplog.set_level(logging.WARNING, logger=_cluster_kernel.__name__)
    for _ in range(3):
        chosen = _select(monkeypatch, _request(), (None, "nvcc failed: error X"))
        assert chosen is _FakeKernels.fused_loss_and_grad
    warnings = [r.getMessage() for r in caplog.records if r.name == _cluster_kernel.__name__]
    assert (
        len(warnings) == 1 and "nvcc failed: error X" in warnings[0] and "Triton fused kernel" in warnings[0]
    )
    caplog.clear()
    for _ in range(2):  # mode 1: every fallback is reported
        _select(monkeypatch, _request(mode="1"), (None, "nvcc failed: error X"))
    assert len([r for r in caplog.records if r.name == _cluster_kernel.__name__]) == 2
    caplog.clear()
    assert _select(monkeypatch, _request(mode="0"), (object(), None)) is _FakeKernels.fused_loss_and_grad
    assert not caplog.records


def test_refused_launch_falls_back_to_triton_and_is_remembered(monkeypatch, caplog) -> None:
    from megatron_sdzero.losses import _triton_kernels

    class RefusingModule:
        @staticmethod
        def loss_and_grad(*args) -> None:
            raise RuntimeError(
                "kl_cluster: no cluster of 8 CTAs with 152576 bytes of shared memory each\nmore"
            )

    monkeypatch.setattr(_cluster_kernel, "_launch_failures", {})
    monkeypatch.setenv(_cluster_kernel.ONEPASS_ENV, "auto")
    monkeypatch.setattr(_cluster_kernel, "_reported", set())
    monkeypatch.setattr(_cluster_kernel, "build_status", lambda: (RefusingModule, None))
    monkeypatch.setattr(_triton_kernels, "fused_loss_and_grad", lambda *args, **kwargs: "triton result")
    caplog.set_level(logging.WARNING, logger=_cluster_kernel.__name__)
    plan = _cluster_kernel.plan_cluster(151936, True, 8, H100_SMEM_OPTIN)
    x, coef = torch.zeros(4, 151936, dtype=torch.bfloat16), torch.ones(4)
    shard = VocabShard(start=0, size=151936, valid_vocab_size=151936, group=None)
    with pytest.raises(RuntimeError, match="no cluster of 8"):
        _cluster_kernel.fused_loss_and_grad(
            x, x, coef, None, shard, 1.0, GradSpec("kl"), plan=plan, strict=True
        )
    result = _cluster_kernel.fused_loss_and_grad(x, x, coef, None, shard, 1.0, GradSpec("kl"), plan=plan)
    assert result == "triton result"
    reason = "launch failed: kl_cluster: no cluster of 8 CTAs with 152576 bytes of shared memory each"
    assert _cluster_kernel._launch_failures == {plan: reason}
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    monkeypatch.setattr(_cluster_kernel, "make_request", lambda student, teacher, spec=None: _request())
    assert _cluster_kernel.onepass_plan(x, x) == (None, reason)  # later calls go straight to Triton


def test_cpu_tensors_fall_back_before_any_build(monkeypatch) -> None:
    monkeypatch.setenv(_cluster_kernel.ONEPASS_ENV, "auto")
    monkeypatch.setattr(_cluster_kernel, "build_status", lambda: pytest.fail("must not build"))
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    plan, reason = _cluster_kernel.onepass_plan(x, x)
    assert plan is None and "compute capability 9.x" in reason


# ---------------------------------------------------------------- CPU: grad_in_place through the API


def _distill(student: torch.Tensor, inputs: dict, config: DistillLossConfig, in_place: bool, upstream: float):
    x = student.clone().requires_grad_()
    loss, metrics = distill_loss(
        x, inputs["teacher"], inputs["loss_mask"], config=config, valid_vocab_size=90,
        sample_weights=inputs["sample_weights"], grad_in_place=in_place,
    )  # fmt: skip
    (loss * upstream).backward()
    return x, loss.detach(), metrics.token_values


@pytest.mark.parametrize("kind", ["reverse", "forward", "mixed", "jsd"])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_grad_in_place_equals_separate_gradient(kind: str, upstream: float) -> None:
    case = Case(name=kind, config=DistillLossConfig(kind=kind, chunk_tokens=4), neg_inf_columns=(7, 40))
    inputs = make_inputs(case)
    config = DistillLossConfig(kind=kind, chunk_tokens=4, temperature=0.7, backend="torch")
    separate, loss, values = _distill(inputs["student"], inputs, config, False, upstream)
    in_place, loss_ip, values_ip = _distill(inputs["student"], inputs, config, True, upstream)
    assert torch.equal(loss, loss_ip) and torch.equal(values, values_ip)
    assert torch.equal(separate.grad, in_place.grad)
    assert torch.equal(in_place.detach(), in_place.grad)  # the logits now hold the gradient
    assert in_place.grad.data_ptr() == in_place.data_ptr()  # and no second buffer was made


def test_cross_entropy_grad_in_place() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 3, 50, generator=gen) * 3
    labels = torch.randint(0, 47, (7, 3), generator=gen)
    mask = (torch.rand(7, 3, generator=gen) > 0.3).float()
    grads = []
    for in_place in (False, True):
        x = logits.clone().requires_grad_()
        loss, _ = masked_cross_entropy(
            x, labels, mask, valid_vocab_size=47, backend="torch", chunk_tokens=4, grad_in_place=in_place
        )
        loss.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_grad_in_place_through_a_linear_layer() -> None:
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(12, 16, generator=gen), torch.randn(16, 50, generator=gen)
    teacher, mask = torch.randn(12, 50, generator=gen), torch.ones(12)
    grads = []
    for in_place in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = distill_loss(h @ w, teacher, mask, grad_in_place=in_place)
        loss.backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_grad_in_place_refuses_logits_saved_by_their_producer() -> None:
    x, teacher, mask = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50), torch.ones(6)
    with pytest.raises(ValueError, match="saved by TanhBackward0"):
        distill_loss(x.tanh(), teacher, mask, grad_in_place=True)
    with pytest.raises(ValueError, match="saved by TanhBackward0"):  # a view of saved logits
        distill_loss(x.tanh().view(2, 3, 50), teacher.view(2, 3, 50), mask.view(2, 3), grad_in_place=True)
    with pytest.raises(ValueError, match="saved by SigmoidBackward0"):
        masked_cross_entropy(x.sigmoid(), torch.zeros(6, dtype=torch.long), mask, grad_in_place=True)


def test_grad_in_place_refusals() -> None:
    x, mask = torch.randn(6, 50, requires_grad=True), torch.ones(6)
    with pytest.raises(ValueError, match="share memory"):
        distill_loss(x, x.detach(), mask, grad_in_place=True)
    with pytest.raises(ValueError, match="full-vocabulary"):
        distill_loss(x, torch.randn(6, 50), mask, config=DistillLossConfig(top_k=5), grad_in_place=True)


def test_grad_in_place_makes_other_saved_uses_fail_at_backward() -> None:
    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(16, 50, requires_grad=True)
    logits = hidden @ weight
    other = logits.pow(2).sum()  # saves the logits themselves
    loss, _ = distill_loss(logits, torch.randn(6, 50), torch.ones(6), grad_in_place=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_grad_in_place_leaves_logits_alone_without_a_gradient() -> None:
    logits = torch.randn(6, 50)
    before = logits.clone()
    distill_loss(logits, torch.randn(6, 50), torch.ones(6), grad_in_place=True)  # no requires_grad
    with torch.no_grad():
        distill_loss(logits.requires_grad_(), torch.randn(6, 50), torch.ones(6), grad_in_place=True)
    assert torch.equal(logits.detach(), before)


def test_grad_in_place_with_non_contiguous_rows_uses_a_separate_buffer() -> None:
    base = torch.randn(50, 6)
    teacher, mask = torch.randn(6, 50), torch.ones(6)
    x = base.t().requires_grad_()  # rows strided: the gradient cannot share them
    loss, _ = distill_loss(x, teacher, mask, grad_in_place=True)
    loss.backward()
    y = base.t().contiguous().requires_grad_()
    reference, _ = distill_loss(y, teacher, mask)
    reference.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert not torch.equal(x.detach(), x.grad)  # the logits were not overwritten


_INTERPRETER_SCRIPT = """
import sys
sys.path.insert(0, {tests_dir!r})
from triton.runtime import interpreter

_original = interpreter._patch_lang_tensor


def _patched(tensor, scope):  # Triton 3.6's interpreter vs NumPy >= 2.5 (see test_losses_triton.py)
    _original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patched

import torch
from megatron_sdzero.losses import _triton_kernels as K
from megatron_sdzero.losses._torch_kernels import GradSpec
from megatron_sdzero.losses.parallel import VocabShard

gen = torch.Generator().manual_seed(4)
student = (torch.randn(9, 70, generator=gen) * 3).to(torch.bfloat16)
teacher = (torch.randn(9, 70, generator=gen) * 3).to(torch.bfloat16)
coef = torch.rand(9, generator=gen)
coef[[2, 6]] = 0.0
targets = torch.randint(-1, 61, (9,), generator=gen)
shard = VocabShard(start=0, size=70, valid_vocab_size=61, group=None)
table = torch.randn(9, 8, generator=gen)
for spec in (GradSpec("kl", 0.0), GradSpec("kl", 0.4), GradSpec("ce")):
    t, cols = (None, targets) if spec.kind == "ce" else (teacher, None)
    values, grad = K.fused_loss_and_grad(student, t, coef, cols, shard, 1.3, spec)
    s = student.clone()
    values_ip, grad_ip = K.fused_loss_and_grad(s, t, coef, cols, shard, 1.3, spec, out=s)
    assert grad_ip.data_ptr() == s.data_ptr()
    assert torch.equal(values, values_ip) and torch.equal(grad, s), spec
    grad = K.divergence_grad(student, t, table, coef, cols, shard, 1.3, spec, 4)
    s = student.clone()
    K.divergence_grad(s, t, table, coef, cols, shard, 1.3, spec, 4, out=s)
    assert torch.equal(grad, s), spec
print("IN_PLACE_OK")
"""


def test_triton_kernels_write_in_place_in_interpreter() -> None:
    pytest.importorskip("triton")
    script = _INTERPRETER_SCRIPT.format(tests_dir=str(Path(__file__).parent))
    env = {**os.environ, "TRITON_INTERPRET": "1", "SDZERO_KL_BLOCK": "32", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "IN_PLACE_OK" in result.stdout, result.stdout + result.stderr[-4000:]


# ---------------------------------------------------------------- CPU (slow): the kernel's algorithm


def _kernel_inputs(rows: int, cols: int, n_valid: int, dtype: torch.dtype, seed: int, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, cols, generator=gen) * scale
    teacher = 0.6 * student + torch.randn(rows, cols, generator=gen) * scale
    student[:, n_valid:] = 1e4  # vocabulary padding: finite garbage, must be excluded
    for tensor in (student, teacher):
        tensor[:, [3 % n_valid, (n_valid // 2)]] = float("-inf")
    teacher[2, n_valid - 1] = float("-inf")  # an active row of +inf reverse KL: gradient 0
    coef = torch.rand(rows, generator=gen) * 0.1
    coef[[1, rows // 2]] = 0.0
    student[rows // 2] = float("-inf")  # an all -inf row, masked
    teacher[rows // 2] = float("-inf")
    targets = torch.randint(-1, n_valid, (rows,), generator=gen)
    targets[(targets == 3 % n_valid) | (targets == n_valid // 2)] = 0
    return student.to(dtype), teacher.to(dtype), coef, targets


def _assert_close_to_reference(values, grad, ref_values, ref_grad, dtype, label: str) -> None:
    assert torch.equal(torch.isinf(values), torch.isinf(ref_values)), label
    finite = torch.isfinite(ref_values)
    value_err = (values.double() - ref_values).abs()[finite] / (
        VALUE_ATOL + VALUE_RTOL * ref_values.abs()[finite]
    )
    assert value_err.max().item() <= 1.0, f"{label}: value error {value_err.max().item():.3g} x tolerance"
    assert torch.isfinite(grad).all(), label
    scale = max(ref_grad.abs().max().item(), 1e-30)
    allowed = GRAD_TOL_BF16 * ref_grad.abs() + GRAD_TOL_FP32 * scale
    grad_err = ((grad.double() - ref_grad).abs() / allowed).max().item()
    assert grad_err <= 1.0, f"{label}: gradient error {grad_err:.3g} x tolerance ({dtype})"


_SPECS = [GradSpec("kl", 0.0), GradSpec("kl", 1.0), GradSpec("kl", 0.3), GradSpec("ce")]


@pytest.mark.slow
@pytest.mark.skipif(_cluster_kernel.missing_toolchain() is not None, reason="needs nvcc and the CUDA headers")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_algorithm_emulated_on_cpu_matches_float64(dtype: torch.dtype) -> None:
    """Rows of 5..200 columns (16-byte misaligned row starts), clusters of 1..16 ranks with a few
    threads each, so that every edge case of the slicing runs: empty ranks, chunks straddling the
    row start, the padding boundary and the row end."""
    module, error = _cluster_kernel.build_status()
    assert module is not None, error
    for cols, n_valid in ((70, 61), (64, 64), (13, 13), (200, 197), (5, 5)):
        for cluster, threads in ((1, 1), (3, 5), (16, 3)):
            for spec in _SPECS:
                for in_place in (False, True):
                    student, teacher, coef, targets = _kernel_inputs(9, cols, n_valid, dtype, seed=cols)
                    shard = VocabShard(start=0, size=cols, valid_vocab_size=n_valid, group=None)
                    ref = fused_rows_reference(student, teacher, coef, targets, n_valid, 1 / 0.7, spec)
                    s = student.clone()
                    t, cols_ = (None, targets) if spec.kind == "ce" else (teacher, None)
                    values, grad = _cluster_kernel.emulate_loss_and_grad(
                        s, t, coef, cols_, shard, 1 / 0.7, spec, cluster=cluster, threads=threads,
                        out=s if in_place else None,
                    )  # fmt: skip
                    assert not in_place or grad.data_ptr() == s.data_ptr()
                    label = f"{cols}/{n_valid} cluster {cluster} x {threads} {spec} in_place={in_place}"
                    _assert_close_to_reference(values, grad, *ref, dtype, label)


# ---------------------------------------------------------------- GPU (Hopper)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a compute capability 9.x GPU")


@pytest.fixture
def onepass_calls(monkeypatch) -> Iterator[list]:
    """Forces the one-pass kernel and records its calls (so a silent fallback fails the test)."""
    monkeypatch.setenv(_cluster_kernel.ONEPASS_ENV, "1")
    calls = []
    original = _cluster_kernel.fused_loss_and_grad

    def spy(*args, **kwargs):
        calls.append(kwargs.get("plan"))
        return original(*args, **kwargs)

    monkeypatch.setattr(_cluster_kernel, "fused_loss_and_grad", spy)
    yield calls
    assert not _cluster_kernel._launch_failures, _cluster_kernel._launch_failures


def _gpu_distill_cases() -> list[Case]:
    from test_losses_triton import _gpu_cases

    return [c for c in _gpu_cases() if c.config.top_k is None and c.config.kind != "jsd"]


@gpu
@needs_hopper
@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "in_place"])
@pytest.mark.parametrize("case", _gpu_distill_cases(), ids=lambda case: case.name)
def test_onepass_matches_float64_reference_on_gpu(
    case: Case, in_place: bool, onepass_calls: list, caplog
) -> None:
    """16-bit logits run the one-pass kernel; float32 ones (fp32-offset-T0.7) take its documented
    fallback to the Triton fused kernel, with the reason logged. Both must match the reference."""
    caplog.set_level(logging.WARNING, logger=_cluster_kernel.__name__)
    inputs = {key: value.cuda() for key, value in make_inputs(case).items()}
    ref_loss, ref_grad, ref_tokens, unit = reference_loss_and_grad(
        inputs["student"], inputs["teacher"], inputs["loss_mask"], inputs["sample_weights"],
        case.config, case.valid_vocab,
    )  # fmt: skip
    student = inputs["student"].clone().requires_grad_()
    loss, metrics = distill_loss(
        student, inputs["teacher"], inputs["loss_mask"], config=case.config,
        valid_vocab_size=case.valid_vocab, sample_weights=inputs["sample_weights"], grad_in_place=in_place,
    )  # fmt: skip
    loss.backward()
    if case.student_dtype == case.teacher_dtype and case.student_dtype in (torch.bfloat16, torch.float16):
        assert len(onepass_calls) == 1 and onepass_calls[0] is not None
    else:
        assert not onepass_calls
        assert any("bf16 or fp16" in record.getMessage() for record in caplog.records)
    active = (inputs["loss_mask"] * inputs["sample_weights"]) != 0
    assert value_error(loss.item(), ref_loss) <= 1.0
    token_errors = [
        value_error(g, r)
        for g, r in zip(metrics.token_values[active].tolist(), ref_tokens[active].tolist(), strict=True)
    ]
    assert max(token_errors, default=0.0) <= 1.0, max(token_errors)
    assert torch.isfinite(student.grad).all()
    assert grad_error(student.grad, ref_grad, case.student_dtype, unit) <= 1.0
    if in_place:
        assert student.grad.data_ptr() == student.data_ptr()


@gpu
@needs_hopper
@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "in_place"])
@pytest.mark.parametrize("vocab,valid", [(151936, 151669), (100278, 100278)])
def test_onepass_cross_entropy_matches_float64_reference_on_gpu(
    vocab: int, valid: int, in_place: bool, onepass_calls: list
) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(24, 3, vocab, generator=gen) * 4).to(torch.bfloat16).cuda()
    labels = torch.randint(0, valid, (24, 3), generator=gen).cuda()
    loss_mask = (torch.rand(24, 3, generator=gen) > 0.3).float().cuda()
    x = logits.clone().requires_grad_()
    loss, _ = masked_cross_entropy(x, labels, loss_mask, valid_vocab_size=valid, grad_in_place=in_place)
    loss.backward()
    assert len(onepass_calls) == 1
    ref_loss, ref_grad, _ = reference_cross_entropy(logits, labels, loss_mask, valid)
    assert value_error(loss.item(), ref_loss) <= 1.0
    assert grad_error(x.grad, ref_grad, torch.bfloat16) <= 1.0


def _big_inputs(rows: int, vocab: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(vocab + rows)
    student = (torch.randn(rows, vocab, device="cuda", generator=gen) * 2).to(dtype)
    teacher = (0.8 * student.float() + torch.randn(rows, vocab, device="cuda", generator=gen)).to(dtype)
    coef = torch.rand(rows, device="cuda", generator=gen) / rows
    coef[::7] = 0.0
    targets = torch.randint(0, vocab - 300, (rows,), device="cuda", generator=gen)
    return student, teacher, coef, targets


@gpu
@needs_hopper
@pytest.mark.parametrize("cluster,buffers", [(8, 2), (8, 1), (16, 2), (4, 1)])
@pytest.mark.parametrize("vocab", [151936, 100278])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_onepass_agrees_with_triton_fused_on_gpu(cluster: int, buffers: int, vocab: int, dtype) -> None:
    """Many rows per cluster (persistent loop, both buffers, masked rows), every launch variant."""
    from megatron_sdzero.losses import _triton_kernels

    student, teacher, coef, targets = _big_inputs(1500, vocab, dtype)
    shard = VocabShard(start=0, size=vocab, valid_vocab_size=vocab - 267, group=None)
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    smem = _cluster_kernel.shared_bytes(vocab, 2, cluster, buffers)
    if smem > optin:
        pytest.skip(f"{cluster} CTAs x {buffers} buffers need {smem} bytes of shared memory")
    plan = _cluster_kernel.Plan(cluster=cluster, buffers=buffers, smem_bytes=smem)
    for spec in (GradSpec("kl", 0.0), GradSpec("kl", 0.5), GradSpec("ce")):
        t, cols = (None, targets) if spec.kind == "ce" else (teacher, None)
        want_values, want_grad = _triton_kernels.fused_loss_and_grad(student, t, coef, cols, shard, 1.0, spec)
        values, grad = _cluster_kernel.fused_loss_and_grad(
            student, t, coef, cols, shard, 1.0, spec, plan=plan, strict=True
        )
        torch.testing.assert_close(values, want_values, rtol=2e-5, atol=1e-6)
        scale = want_grad.abs().max().item()
        # fp16 gradients of ~1e-8 are subnormal (steps of 2**-24): a last-bit difference in float32
        # may round them one step apart, a large relative difference.
        subnormal_step = 2.0**-24 if dtype == torch.float16 else 0.0
        torch.testing.assert_close(
            grad.float(), want_grad.float(), rtol=2**-6, atol=1e-6 * scale + subnormal_step
        )
        s = student.clone()
        values_ip, grad_ip = _cluster_kernel.fused_loss_and_grad(
            s, t, coef, cols, shard, 1.0, spec, out=s, plan=plan, strict=True
        )
        assert grad_ip.data_ptr() == s.data_ptr()
        assert torch.equal(values_ip, values) and torch.equal(s, grad)  # deterministic, in place or not


@gpu
@needs_hopper
def test_fp32_logits_fall_back_to_triton_on_gpu(monkeypatch, caplog) -> None:
    monkeypatch.setenv(_cluster_kernel.ONEPASS_ENV, "1")
    caplog.set_level(logging.WARNING, logger=_cluster_kernel.__name__)
    student = torch.randn(8, 1000, device="cuda", requires_grad=True)
    loss, _ = distill_loss(student, torch.randn(8, 1000, device="cuda"), torch.ones(8, device="cuda"))
    loss.backward()
    assert any("bf16 or fp16" in r.getMessage() for r in caplog.records)
