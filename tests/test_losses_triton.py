"""The Triton path of megatron_sdzero.losses against float64 references.

GPU tests (marked ``gpu``) use real vocabulary widths: 151936 (Qwen3, rows 16-byte aligned) and
100278 (OLMo-3, rows not aligned), bf16. The CPU test runs the same kernels in Triton's interpreter
(TRITON_INTERPRET=1, in a subprocess since the flag is read at import) on small shapes, with a
small column block so that every code path (aligned body, masked edges) is taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

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

from megatron_sdzero.losses import DistillLossConfig, distill_loss, masked_cross_entropy  # noqa: E402

CASE_BY_NAME = {case.name: case for case in all_cases()}
KINDS = [
    DistillLossConfig(kind="reverse"),
    DistillLossConfig(kind="forward"),
    DistillLossConfig(kind="mixed"),
    DistillLossConfig(kind="jsd", jsd_beta=0.3),
    DistillLossConfig(kind="mixed", top_k=64),
    DistillLossConfig(kind="reverse", top_k=64, top_k_tail=True),
]


def check_distill(case: Case, device: str, backend: str) -> dict[str, float]:
    inputs = {key: value.to(device) for key, value in make_inputs(case).items()}
    ref_loss, ref_grad, ref_tokens, unit = reference_loss_and_grad(
        inputs["student"], inputs["teacher"], inputs["loss_mask"], inputs["sample_weights"],
        case.config, case.valid_vocab,
    )  # fmt: skip
    config = DistillLossConfig(**{**case.config.__dict__, "backend": backend})
    student = inputs["student"].clone().requires_grad_()
    loss, metrics = distill_loss(
        student, inputs["teacher"], inputs["loss_mask"], config=config, valid_vocab_size=case.valid_vocab,
        sample_weights=inputs["sample_weights"],
    )  # fmt: skip
    loss.backward()
    active = (inputs["loss_mask"] * inputs["sample_weights"]) != 0
    got_tokens, want_tokens = metrics.token_values[active].tolist(), ref_tokens[active].tolist()
    token_errors = [value_error(g, r) for g, r in zip(got_tokens, want_tokens, strict=True)]
    return {
        "value": value_error(loss.item(), ref_loss),
        "tokens": max(token_errors, default=0.0),
        "grad": grad_error(student.grad, ref_grad, case.student_dtype, unit),
        "finite": float(torch.isfinite(student.grad).all()),
    }


def check_cross_entropy(
    vocab: int, valid: int, device: str, backend: str, dtype: torch.dtype
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(24, 3, vocab, generator=gen) * 4).to(dtype).to(device)
    labels = torch.randint(0, valid, (24, 3), generator=gen).to(device)
    loss_mask = (torch.rand(24, 3, generator=gen) > 0.3).float().to(device)
    x = logits.clone().requires_grad_()
    loss, _ = masked_cross_entropy(x, labels, loss_mask, valid_vocab_size=valid, backend=backend)
    loss.backward()
    ref_loss, ref_grad, _ = reference_cross_entropy(logits, labels, loss_mask, valid)
    return {
        "value": value_error(loss.item(), ref_loss),
        "grad": grad_error(x.grad, ref_grad, dtype),
        "finite": 1.0,
    }


def _assert_ok(errors: dict[str, float], label: str) -> None:
    assert errors["finite"] == 1.0, f"{label}: non-finite gradient"
    for key in ("value", "tokens", "grad"):
        if key in errors:
            assert errors[key] <= 1.0, f"{label}: {key} error {errors[key]:.3g} x tolerance"


# ---------------------------------------------------------------- GPU


def _gpu_cases() -> list[Case]:
    cases = []
    for vocab, valid in ((151936, 151669), (100278, 100278)):
        for kind_config in KINDS:
            bf16 = {"student_dtype": torch.bfloat16, "teacher_dtype": torch.bfloat16}
            for tag, extra in (
                ("bf16", bf16),
                ("bf16-extreme", {**bf16, "scale": 1e4}),
                ("bf16-neg-inf-T0.7", {**bf16, "neg_inf_columns": (7, 40, 41, 88), "inf_masked_row": True}),
                # float32 logits near 1e4 (bf16 could not hold their spread): x/T must not be rounded
                ("fp32-offset-T0.7", {"offset": 1e4}),
            ):
                if tag == "fp32-offset-T0.7" and kind_config.top_k is not None:
                    continue  # float32 steps near 1e4 (~0.001) make ties at a top-64 cut of 151936 likely
                temperature = 0.7 if tag.endswith("T0.7") else 1.0
                config = DistillLossConfig(**{**kind_config.__dict__, "temperature": temperature})
                name = f"{config.kind}-top{config.top_k}{'-tail' if config.top_k_tail else ''}-{vocab}-{tag}"
                cases.append(
                    Case(name=name, config=config, seq=16, batch=4, vocab=vocab, valid_vocab=valid, **extra)
                )
    return cases


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", _gpu_cases(), ids=lambda case: case.name)
def test_triton_path_matches_float64_reference_on_gpu(case: Case) -> None:
    _assert_ok(check_distill(case, "cuda", "auto"), case.name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "case", [c for c in _gpu_cases() if c.config.top_k is None], ids=lambda case: case.name
)
def test_two_kernel_path_matches_float64_reference_on_gpu(case: Case, monkeypatch) -> None:
    """The statistics + gradient kernels that TP > 1 uses, forced with TP = 1."""
    from megatron_sdzero.losses import _triton_kernels

    monkeypatch.setattr(_triton_kernels, "FUSE_SINGLE_PROCESS", False)
    _assert_ok(check_distill(case, "cuda", "auto"), case.name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vocab,valid", [(151936, 151669), (100278, 100278)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_cross_entropy_matches_float64_reference_on_gpu(vocab: int, valid: int, dtype) -> None:
    _assert_ok(check_cross_entropy(vocab, valid, "cuda", "auto", dtype), f"ce-{vocab}-{dtype}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_and_torch_paths_agree_on_gpu() -> None:
    case = _gpu_cases()[0]
    inputs = {key: value.cuda() for key, value in make_inputs(case).items()}
    grads = []
    for backend in ("triton", "torch"):
        student = inputs["student"].clone().requires_grad_()
        config = DistillLossConfig(backend=backend)
        loss, _ = distill_loss(student, inputs["teacher"], inputs["loss_mask"], config=config)
        (loss * 3.0).backward()  # an upstream gradient other than 1 takes the rescaling branch
        grads.append(student.grad.float())
    assert torch.allclose(grads[0], grads[1], rtol=2**-6, atol=1e-6 * grads[1].abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["reverse", "mixed", "jsd", "ce"])
def test_full_vocabulary_losses_never_wait_for_the_gpu(kind: str) -> None:
    """Forward and backward (upstream 1 and not) queue work without a host sync, so the GPU never
    idles while Python prepares the next call (the fused, one-pass and two-kernel paths)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 1000, device="cuda", generator=gen, dtype=torch.bfloat16)
    teacher = torch.randn(64, 1000, device="cuda", generator=gen, dtype=torch.bfloat16)
    labels = torch.randint(0, 990, (64,), device="cuda", generator=gen)
    mask = (torch.rand(64, device="cuda", generator=gen) > 0.2).float()

    def step(upstream: float) -> None:
        student = logits.clone().requires_grad_()
        if kind == "ce":
            loss, _ = masked_cross_entropy(student, labels, mask, valid_vocab_size=990)
        else:
            config = DistillLossConfig(kind=kind, temperature=0.7)
            loss, _ = distill_loss(student, teacher, mask, config=config, valid_vocab_size=990)
        (loss * upstream if upstream != 1.0 else loss).backward()

    assert_never_waits_for_the_gpu(step)


def assert_never_waits_for_the_gpu(step) -> None:
    """step(upstream) with upstream 1 and 2.5 under torch.cuda.set_sync_debug_mode("error"), after
    a first round that compiles the kernels (and may build the extension)."""
    for upstream in (1.0, 2.5):
        step(upstream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for upstream in (1.0, 2.5):
            step(upstream)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "config",
    [
        DistillLossConfig(kind="mixed", top_k=64),
        DistillLossConfig(kind="reverse", top_k=64, top_k_tail=True, temperature=0.7),
        DistillLossConfig(kind="jsd", top_k=5, top_k_tail=True),
    ],
    ids=lambda c: f"{c.kind}-top{c.top_k}-tail{c.top_k_tail}",
)
def test_top_k_losses_never_wait_for_the_gpu(config: DistillLossConfig) -> None:
    """The Triton top-k path, forward and backward, queues work without a host sync, including
    rows whose candidates overflow the scratch list (a row of equal teacher logits) and rows with
    fewer finite teacher logits than k."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 1000, device="cuda", generator=gen, dtype=torch.bfloat16)
    teacher = torch.randn(64, 1000, device="cuda", generator=gen, dtype=torch.bfloat16)
    teacher[3] = 1.0
    teacher[5, 2:] = float("-inf")
    mask = (torch.rand(64, device="cuda", generator=gen) > 0.2).float()
    mask[3] = mask[5] = 1.0

    def step(upstream: float) -> None:
        student = logits.clone().requires_grad_()
        loss, _ = distill_loss(student, teacher, mask, config=config, valid_vocab_size=990)
        (loss * upstream if upstream != 1.0 else loss).backward()

    assert_never_waits_for_the_gpu(step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_top_k_kernels_match_torch_on_gpu() -> None:
    check_top_k_kernels_match_torch("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "case",
    [c for c in _gpu_cases() if c.config.top_k is not None and c.name.endswith("-bf16")],
    ids=lambda case: case.name,
)
def test_top_k_rows_past_the_scratch_list_are_exact_on_gpu(case: Case) -> None:
    """These bf16 teachers have hundreds of tied logits at the top-64 cut: with a 64-key scratch
    list every active row overflows and takes the kernel's exact retry (bisection for the 64th
    key), which must give the float64 reference's answer."""
    with scratch_keys(64):
        _assert_ok(check_distill(case, "cuda", "auto"), case.name)


TOP_K_AGREEMENT_CONFIGS = [
    DistillLossConfig(kind="mixed", top_k=64),
    DistillLossConfig(kind="reverse", top_k=64, top_k_tail=True),
    DistillLossConfig(kind="forward", top_k=5, top_k_tail=True),
    DistillLossConfig(kind="jsd", top_k=256, top_k_tail=True, temperature=0.7),  # the largest Triton k
]


def check_top_k_paths_agree(config: DistillLossConfig, tokens: int, vocab: int, device: str) -> None:
    """Logits like tools/bench_kl.py's (bf16, teacher = noise + 0.8 student), a quarter of the
    tokens masked, upstream gradient 3: the Triton path's per-token values and gradient against
    the PyTorch path's (ties at the cut go to the lowest id on both)."""
    gen = torch.Generator(device=device).manual_seed(tokens)
    student = torch.randn(tokens, vocab, device=device, generator=gen).mul_(2.0).to(torch.bfloat16)
    teacher = torch.randn(tokens, vocab, device=device, generator=gen).add_(student.float(), alpha=0.8)
    teacher = teacher.to(torch.bfloat16)
    loss_mask = (torch.rand(tokens, device=device, generator=gen) > 0.25).float()
    results = []
    for backend in ("triton", "torch"):
        x = student.clone().requires_grad_()
        settings = DistillLossConfig(**{**config.__dict__, "backend": backend})
        loss, metrics = distill_loss(x, teacher, loss_mask, config=settings)
        (loss * 3.0).backward()
        results.append((loss.item(), metrics.token_values, x.grad.float()))
    (loss, values, grad), (ref_loss, ref_values, ref_grad) = results
    assert value_error(loss, ref_loss) <= 1.0, (loss, ref_loss)
    torch.testing.assert_close(values, ref_values, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=2**-6, atol=1e-6 * ref_grad.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "config", TOP_K_AGREEMENT_CONFIGS, ids=lambda c: f"{c.kind}-top{c.top_k}-tail{c.top_k_tail}"
)
def test_top_k_triton_and_torch_paths_agree_on_gpu(config: DistillLossConfig) -> None:
    check_top_k_paths_agree(config, tokens=4096, vocab=151936, device="cuda")


# ---------------------------------------------------------------- CPU, Triton interpreter


def patch_triton_interpreter() -> None:
    """Triton 3.6's interpreter converts loop bounds with int() of a 1-element array, which NumPy
    >= 2.5 rejects; take the element explicitly. Call it before the first kernel runs."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


_INTERPRETER_SCRIPT = """
import sys
sys.path.insert(0, {tests_dir!r})
import torch
import test_losses_triton as T
T.patch_triton_interpreter()
from test_losses_reference import all_cases
all_cases_by_name = {{case.name: case for case in all_cases()}}
from megatron_sdzero.losses import _torch_kernels, _triton_kernels

worst = 0.0
# Every kind with the bf16/temperature, -inf and offset/temperature inputs, plus the extreme logits
# for the default kind.
picked = [
    case for case in all_cases()
    if case.config.top_k is None
    and (
        case.name.endswith(("bf16-T0.7", "neg-inf", "offset-1e4-T0.7"))
        or case.name == "reverse-full/extreme-1e4"
    )
]
assert len(picked) == 13, [case.name for case in picked]
# rows of +inf reverse (and mixed) KL: gradient 0
picked += [all_cases_by_name[f"{{kind}}-full/teacher-rules-out"] for kind in ("reverse", "mixed")]
for case in picked:
    errors = T.check_distill(case, "cpu", "triton")
    worst = max(worst, errors["value"], errors["tokens"], errors["grad"])
    assert errors["finite"] == 1.0 and worst <= 1.0, (case.name, errors)
for dtype in (torch.float32, torch.bfloat16):
    errors = T.check_cross_entropy(90, 85, "cpu", "triton", dtype)
    assert errors["value"] <= 1.0 and errors["grad"] <= 1.0, errors
T.check_unfused_kernels_match_torch(_torch_kernels, _triton_kernels)
T.check_scale_unless_one(_triton_kernels)
print("INTERPRETER_OK worst", worst)
"""


def check_unfused_kernels_match_torch(torch_kernels, triton_kernels) -> None:
    """The kernels used with TP > 1 (stats pass, gradient pass) against their PyTorch mirrors."""
    from megatron_sdzero.losses._torch_kernels import GradSpec
    from megatron_sdzero.losses.parallel import VocabShard

    gen = torch.Generator().manual_seed(3)
    student = (torch.randn(9, 70, generator=gen) * 3).to(torch.bfloat16)
    teacher = (torch.randn(9, 70, generator=gen) * 3).to(torch.bfloat16)
    active = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    shard = VocabShard(start=70, size=70, valid_vocab_size=131, group=None)  # 61 valid columns here
    stats = [
        k.local_softmax_stats(student, teacher, active, shard, 1.3, True, True, 4)
        for k in (torch_kernels, triton_kernels)
    ]
    torch.testing.assert_close(stats[1], stats[0], rtol=1e-5, atol=1e-5)
    table = torch.randn(9, 8, generator=gen)  # maxima in logit units, log-sums of exp((x - max) / T)
    table[:, 1] = torch.logsumexp(student[:, :61].float() * 1.3, dim=-1) - table[:, 0] * 1.3
    table[:, 3] = torch.logsumexp(teacher[:, :61].float() * 1.3, dim=-1) - table[:, 2] * 1.3
    coef = torch.where(active, torch.rand(9, generator=gen), 0.0)
    targets = torch.randint(-1, 61, (9,), generator=gen)
    for spec in (GradSpec("kl", 0.0), GradSpec("kl", 0.4), GradSpec("jsd", jsd_beta=0.3), GradSpec("ce")):
        target_cols = targets if spec.kind == "ce" else None
        teacher_arg = None if spec.kind == "ce" else teacher
        spec_table = table.clone()
        if spec.kind == "kl":  # an active row of +inf reverse KL: gradient 0 on both
            spec_table[1, 4] = float("inf")
        grads = [
            k.divergence_grad(
                student, teacher_arg, spec_table, coef, target_cols, shard, 1.3, spec, 4
            ).float()
            for k in (torch_kernels, triton_kernels)
        ]
        assert spec.kind != "kl" or (grads[1][1] == 0).all()
        torch.testing.assert_close(grads[1].float(), grads[0].float(), rtol=2**-7, atol=1e-6)
    sums = [
        k.jsd_local_sums(student, teacher, active, table, shard, 1.3, 0.3, 4)
        for k in (torch_kernels, triton_kernels)
    ]
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-5, atol=1e-6)


def check_scale_unless_one(triton_kernels) -> None:
    """The backward's upstream scaling: untouched (bit for bit) when the upstream gradient is 1,
    else the float32 product rounded to bf16 once (within one bf16 ulp: the interpreter truncates);
    more elements than the grid covers in one sweep."""
    gen = torch.Generator().manual_seed(4)
    grad = (torch.randn(33, 1000, generator=gen) * 3).to(torch.bfloat16)
    for upstream in (3.0, -0.37):
        got = triton_kernels.scale_unless_one_(grad.clone(), torch.tensor(upstream))
        want = grad.double() * upstream
        assert ((got.double() - want).abs() <= 2.0**-7 * want.abs()).all(), upstream
    unchanged = grad.clone()
    assert triton_kernels.scale_unless_one_(unchanged, torch.tensor(1.0)) is unchanged
    assert torch.equal(unchanged, grad)


def _run_in_interpreter(script: str, **env: str) -> None:
    """Run a script with TRITON_INTERPRET=1 (read at import, hence the subprocess); it prints
    INTERPRETER_OK when every check passed."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(
        [sys.executable, "-c", script.format(tests_dir=str(Path(__file__).parent))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "INTERPRETER_OK" in result.stdout, result.stdout + result.stderr[-4000:]


def test_triton_kernels_in_interpreter_match_float64_reference() -> None:
    _run_in_interpreter(_INTERPRETER_SCRIPT, SDZERO_KL_BLOCK="32")


# ---------------------------------------------------------------- teacher top-k kernels

# (case, MIN_CANDIDATES): with SDZERO_TOPK_BLOCK=32 a block has 32 lane groups, so k = 5 takes the
# threshold pass and k = 56 (padded to 64) collects every valid column; a scratch list of 16 keys for
# k = 56 (64 keys) is too small for the 90 valid columns, so that case runs the kernel's exact retry.
TOP_K_INTERPRETER_CASES = [
    ("reverse-top5-tail/bf16-T0.7", 16),
    ("mixed-top5-tail/offset-1e4-T0.7", 16),
    ("jsd-top5-tail/extreme-1e4", 16),
    ("mixed-top5/neg-inf", 16),
    ("forward-top56-tail/fp32-student-bf16-teacher", 128),
    ("reverse-top56-tail/extreme-1e4", 16),
    # rows with fewer finite teacher logits than k: the kernel's columns include -inf ones
    ("mixed-top5-tail/few-finite-teacher", 128),
    ("jsd-top56/few-finite-teacher", 128),
    ("reverse-top5-tail/teacher-rules-out", 128),  # the tail holds student mass only: +inf, gradient 0
]
# TP = 2: k = 56 is larger than a shard (48 columns); the candidates the global pick leaves out join
# the tail; with few finite teacher logits the cut falls among -inf ties and empty slots.
TOP_K_INTERPRETER_TP2_CASES = [
    ("reverse-top56-tail/bf16-T0.7", 128),
    ("forward-top56-tail/few-finite-teacher", 128),
    ("mixed-top56/few-finite-teacher", 128),
]


@contextlib.contextmanager
def scratch_keys(min_candidates: int) -> Iterator[None]:
    """Run with the top-k kernel's scratch list sized max(min_candidates, padded k)."""
    from megatron_sdzero.losses import _triton_topk

    original, _triton_topk.MIN_CANDIDATES = _triton_topk.MIN_CANDIDATES, min_candidates
    try:
        yield
    finally:
        _triton_topk.MIN_CANDIDATES = original


def with_backend(case: Case, backend: str) -> Case:
    return dataclasses.replace(case, config=DistillLossConfig(**{**case.config.__dict__, "backend": backend}))


def _tail_lse(
    x64: torch.Tensor, columns: torch.Tensor, tail: torch.Tensor, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp of x / T from a kernel's [max x, sum exp((x - max) / T)] tail, float64
    log-sum-exp of x / T outside ``columns``)."""
    got = tail[:, 0].double() * inv_temp + tail[:, 1].double().log()
    return got, torch.logsumexp(x64.scatter(1, columns, float("-inf")) * inv_temp, dim=-1)


def _check_local_top_k(
    teacher: torch.Tensor, student: torch.Tensor, active: torch.Tensor, k: int, cap: int, tied_row: int
) -> None:
    """local_top_k with the tails, scratch list of max(cap, padded k)."""
    from megatron_sdzero.losses import _triton_topk
    from megatron_sdzero.losses.parallel import VocabShard

    shard = VocabShard(start=70, size=70, valid_vocab_size=131, group=None)  # 61 valid columns here
    with scratch_keys(cap):
        found = _triton_topk.local_top_k(teacher, student, active, k, shard, 1.3)
    # The row of equal teacher logits has more candidates (all 61) than a small scratch list holds:
    # the kernel finds its exact k-th key and collects again.
    done = active
    columns = found.columns[done]
    assert (found.columns[~active] == 0).all()
    assert (columns.sort(dim=-1).values.diff(dim=-1) > 0).all()
    t64, s64 = (x[:, :61].double() for x in (teacher, student))
    top_values = t64.topk(k, dim=-1).values.sort(dim=-1).values[done]
    assert torch.equal(t64[done].gather(1, columns).sort(dim=-1).values, top_values)
    # every teacher logit of this row is equal: ties go to the lowest columns
    assert torch.equal(found.columns[tied_row].sort().values.cpu(), torch.arange(k))
    for half, x64 in enumerate((t64, s64)):
        got, want = _tail_lse(x64[done], columns, found.tail[done][:, 2 * half :], 1.3)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def check_top_k_kernels_match_torch(device: str) -> None:
    """The top-k kernels alone, on 9 rows of 70 bf16 columns, 61 of them valid: rows are not 16-byte
    aligned, so the masked head and tail blocks move from row to row. Selected columns and both
    tails against float64, with and without the threshold pass; a row of equal teacher logits
    overflows a small scratch list (the kernel's exact retry); the tail gradient against PyTorch."""
    from megatron_sdzero.losses import _torch_kernels, _triton_topk, topk
    from megatron_sdzero.losses.full_vocab import PassSettings
    from megatron_sdzero.losses.parallel import VocabShard

    gen = torch.Generator().manual_seed(5)
    teacher = torch.argsort(torch.rand(9, 70, generator=gen), dim=-1) * 0.08 - 2.8  # distinct in bf16
    teacher[5] = 1.0
    teacher = teacher.to(torch.bfloat16).to(device)
    student = (torch.randn(9, 70, generator=gen) * 3).to(torch.bfloat16).to(device)
    student[4, 3] = float("-inf")
    active = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool, device=device)
    for k, cap in ((5, 16), (40, 16)):
        _check_local_top_k(teacher, student, active, k, cap, tied_row=5)
    shard = VocabShard(start=70, size=70, valid_vocab_size=131, group=None)
    s64 = student[:, :61].double()
    s_max = s64.amax(dim=-1)
    tail = torch.stack([s_max, torch.logsumexp((s64 - s_max[:, None]) * 1.3, dim=-1)], dim=1).float()
    coef = torch.where(active, torch.randn(9, generator=gen).to(device), 0.0)
    got = _triton_topk.tail_grad(student, tail, coef, shard, 1.3)
    want = torch.zeros_like(student)
    topk._write_tail_grad(want, student, tail, coef, PassSettings(shard, 1.3, 4, _torch_kernels))
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-6)


def check_top_k_cases(names: list[tuple[str, int]]) -> float:
    """TP = 1 top-k cases through the Triton path against float64; the worst error (x tolerance)."""
    worst = 0.0
    for name, cap in names:
        with scratch_keys(cap):
            errors = check_distill(CASE_BY_NAME[name], "cpu", "triton")
        worst = max(worst, errors["value"], errors["tokens"], errors["grad"])
        assert errors["finite"] == 1.0 and worst <= 1.0, (name, errors)
    return worst


def top_k_tp2_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks running TOP_K_INTERPRETER_TP2_CASES on its vocab shard."""
    import torch.distributed as dist
    from test_losses import run_case

    patch_triton_interpreter()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for name, cap in TOP_K_INTERPRETER_TP2_CASES:
            with scratch_keys(cap):
                results[name] = run_case(
                    with_backend(CASE_BY_NAME[name], "triton"), 2, rank, dist.group.WORLD
                )
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


_TOP_K_INTERPRETER_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests_dir!r})
import torch
import torch.multiprocessing as mp
import test_losses_triton as T
from test_losses import _free_port, assert_within_tolerance
T.patch_triton_interpreter()
T.check_top_k_kernels_match_torch("cpu")
worst = T.check_top_k_cases(T.TOP_K_INTERPRETER_CASES)
with tempfile.TemporaryDirectory() as out_dir:
    mp.start_processes(T.top_k_tp2_worker, args=(_free_port(), out_dir), nprocs=2, start_method="spawn")
    for rank in range(2):
        for name, errors in json.loads(Path(out_dir, f"rank{{rank}}.json").read_text()).items():
            assert_within_tolerance(errors, f"tp2/rank{{rank}}/{{name}}")
            worst = max(worst, errors["value"], errors["tokens"], errors["grad"])
print("INTERPRETER_OK worst", worst)
"""


def test_top_k_kernels_in_interpreter_match_float64_reference() -> None:
    _run_in_interpreter(_TOP_K_INTERPRETER_SCRIPT, SDZERO_TOPK_BLOCK="32", SDZERO_TOPK_GRAD_BLOCK="32")
