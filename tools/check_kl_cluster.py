#!/usr/bin/env python3
"""Build the one-pass cluster KL kernel, check it against float64, time it against the Triton kernel.

    python3 tools/check_kl_cluster.py [--tokens 16384] [--vocab 151936 100278] [--json OUT.json] [--verbose]
                                      [--no-checks] [--no-timings] [--prebuilt DIR]

One GPU run answers three questions:
1. Does it build? JIT-compiles csrc/kl_cluster.cu (``--verbose`` shows the compiler) and prints the
   build seconds; a second run finds it cached.
2. Is it right? For both vocabularies (151936 with 151669 valid ids, and 100278 with unaligned
   rows), every kind (reverse, forward, mixed 0.3, cross-entropy), T = 1 and 0.7, with the gradient
   in a new buffer and in place: 512 bf16 rows (some masked, one of them all -inf, -inf columns,
   a block of rows with |x| ~ 1e4), 26 sampled rows against float64 (tolerances of
   tests/test_losses_reference.py) and every row against the Triton fused kernel; the Triton
   kernel's own float64 error is printed alongside, as a control.
3. Is it faster? Kernel time of the Triton fused kernel and of the one-pass kernel (clusters
   of 8 with one or two row buffers, separate and in-place gradient) at --tokens x each --vocab,
   against the memory-bandwidth floor (6 bytes per logit, or 4 for cross-entropy, over the measured
   device copy bandwidth).

``--prebuilt DIR`` imports the extension built elsewhere (same torch and CUDA) from
DIR/<extension name>/<extension name>.so instead of compiling it.

Exit status 1 when the build fails or a check is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kl import copy_bandwidth, time_cuda  # noqa: E402

from megatron_sdzero.losses import _cluster_kernel, _triton_kernels  # noqa: E402
from megatron_sdzero.losses._torch_kernels import GradSpec  # noqa: E402
from megatron_sdzero.losses.parallel import VocabShard  # noqa: E402
from megatron_sdzero.losses.reference import fused_rows_reference  # noqa: E402

VALUE_RTOL, VALUE_ATOL = 2e-5, 1e-6  # as tests/test_losses_reference.py
GRAD_TOL_BF16, GRAD_TOL_FP32 = 2.0**-7, 2e-5
SPECS = {
    "reverse": GradSpec("kl", 0.0),
    "forward": GradSpec("kl", 1.0),
    "mixed(0.3)": GradSpec("kl", 0.3),
    "cross-entropy": GradSpec("ce"),
}


def environment() -> dict:
    from torch.utils import cpp_extension

    nvcc = Path(cpp_extension.CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    version = (
        subprocess.run([str(nvcc), "--version"], capture_output=True, text=True) if nvcc.exists() else None
    )
    return {
        "device": torch.cuda.get_device_name(),
        "capability": torch.cuda.get_device_capability(),
        "torch": torch.__version__,
        "cuda_home": cpp_extension.CUDA_HOME,
        "nvcc": version.stdout.strip().splitlines()[-1] if version and version.returncode == 0 else None,
    }


def import_prebuilt(directory: str, name: str):
    import importlib.util

    path = Path(directory) / name / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool, prebuilt: str | None = None) -> dict:
    name = _cluster_kernel.extension_name()
    start = time.perf_counter()
    try:
        if prebuilt:
            module = import_prebuilt(prebuilt, name)
            _cluster_kernel.build_status = lambda: (module, None)
        else:
            _cluster_kernel.load_extension(verbose=verbose)
    except Exception as error:  # noqa: BLE001 - reported, then exit 1
        return {"ok": False, "seconds": time.perf_counter() - start, "name": name, "error": str(error)}
    return {"ok": True, "seconds": time.perf_counter() - start, "name": name, "prebuilt": bool(prebuilt)}


# ---------------------------------------------------------------- correctness


def make_rows(rows: int, vocab: int, valid: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    student = torch.randn(rows, vocab, device="cuda", generator=gen) * 3
    teacher = 0.6 * student + torch.randn(rows, vocab, device="cuda", generator=gen) * 3
    student[-32:] *= 3000.0  # |x| ~ 1e4
    teacher[-32:] *= 3000.0
    student[:, valid:] = 1e4  # vocabulary padding: garbage that must be excluded
    for tensor in (student, teacher):
        tensor[:, [7, 40, 41, valid // 2]] = float("-inf")
    coef = torch.rand(rows, device="cuda", generator=gen) / rows
    coef[::5] = 0.0
    student[5] = float("-inf")  # an all -inf row, masked
    teacher[5] = float("-inf")
    targets = torch.randint(0, valid, (rows,), device="cuda", generator=gen)
    targets[torch.isin(targets, torch.tensor([7, 40, 41, valid // 2], device="cuda"))] = 0
    targets[3] = -1  # a label owned by no column: CE value +inf
    return {"student": student.bfloat16(), "teacher": teacher.bfloat16(), "coef": coef, "targets": targets}


def value_errors(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.equal(torch.isinf(got), torch.isinf(want)):
        return float("inf")
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    return ((got.double() - want).abs()[finite] / (VALUE_ATOL + VALUE_RTOL * want.abs()[finite])).max().item()


def grad_errors(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    scale = max(want.abs().max().item(), 1e-30)
    allowed = GRAD_TOL_BF16 * want.abs() + GRAD_TOL_FP32 * scale
    return ((got.double() - want).abs() / allowed).max().item()


def check_case(inputs: dict, vocab: int, valid: int, name: str, inv_temp: float, in_place: bool) -> dict:
    spec = SPECS[name]
    shard = VocabShard(start=0, size=vocab, valid_vocab_size=valid, group=None)
    teacher, targets = (None, inputs["targets"]) if spec.kind == "ce" else (inputs["teacher"], None)
    coef = inputs["coef"] * inv_temp
    plan, reason = _cluster_kernel.onepass_plan(inputs["student"], teacher)
    if plan is None:
        return {"ok": False, "error": reason}
    student = inputs["student"].clone()
    values, grad = _cluster_kernel.fused_loss_and_grad(
        student, teacher, coef, targets, shard, inv_temp, spec, out=student if in_place else None, plan=plan,
        strict=True,
    )  # fmt: skip
    triton_values, triton_grad = _triton_kernels.fused_loss_and_grad(
        inputs["student"], teacher, coef, targets, shard, inv_temp, spec
    )
    torch.cuda.synchronize()
    n_rows = inputs["student"].shape[0]
    rows = torch.cat(
        [torch.randperm(n_rows - 32, device="cuda")[:16], torch.arange(n_rows - 8, n_rows, device="cuda")]
    )
    rows = torch.cat([rows, torch.tensor([3, 5], device="cuda")])  # label -1 (CE: inf), all -inf masked
    ref_values, ref_grad = fused_rows_reference(
        inputs["student"][rows],
        inputs["teacher"][rows],
        coef[rows],
        inputs["targets"][rows],
        valid,
        inv_temp,
        spec,
    )
    triton_scale = max(triton_grad.float().abs().max().item(), 1e-30)
    result = {
        "value_err": value_errors(values[rows], ref_values),
        "grad_err": grad_errors(grad[rows], ref_grad),
        "triton_value_err": value_errors(triton_values[rows], ref_values),
        "triton_grad_err": grad_errors(triton_grad[rows], ref_grad),
        "in_place_ok": (grad.data_ptr() == student.data_ptr()) == in_place,
        "vs_triton_value_err": value_errors(values, triton_values.double()),
        "vs_triton_grad_max_abs_over_scale": (grad.float() - triton_grad.float()).abs().max().item()
        / triton_scale,
    }
    result["ok"] = (
        result["value_err"] <= 1.0
        and result["grad_err"] <= 1.0
        and result["in_place_ok"]
        and result["vs_triton_grad_max_abs_over_scale"] <= 2.0**-6
    )
    return result


def run_checks() -> list[dict]:
    results = []
    for vocab, valid in ((151936, 151669), (100278, 100278)):
        inputs = make_rows(512, vocab, valid, seed=vocab)
        for name in SPECS:
            for inv_temp in (1.0, 1 / 0.7):
                for in_place in (False, True):
                    result = check_case(inputs, vocab, valid, name, inv_temp, in_place)
                    label = (
                        f"V={vocab} {name:13s} T={1 / inv_temp:.1f} {'in place' if in_place else 'separate'}"
                    )
                    results.append({"case": label, **result})
                    if "error" in result:
                        print(f"  FAIL {label}: {result['error']}", flush=True)
                        continue
                    status = "ok  " if result["ok"] else "FAIL"
                    print(
                        f"  {status} {label}: value {result['value_err']:.3f} x tol,"
                        f" grad {result['grad_err']:.3f} x tol (Triton: {result['triton_value_err']:.3f},"
                        f" {result['triton_grad_err']:.3f}); vs Triton: value"
                        f" {result['vs_triton_value_err']:.3f} x tol, grad max |diff| / max |grad|"
                        f" {result['vs_triton_grad_max_abs_over_scale']:.2e}",
                        flush=True,
                    )
    return results


# ---------------------------------------------------------------- speed


def time_kernels(tokens: int, vocab: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = (torch.randn(tokens, vocab, device="cuda", generator=gen) * 2).bfloat16()
    teacher = (0.8 * student.float() + torch.randn(tokens, vocab, device="cuda", generator=gen)).bfloat16()
    coef = torch.full((tokens,), 1.0 / tokens, device="cuda")
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    shard = VocabShard(start=0, size=vocab, valid_vocab_size=vocab, group=None)
    bandwidth = copy_bandwidth(tokens * vocab * 2)
    rows = []
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    for name in SPECS:
        spec = SPECS[name]
        teacher_arg, targets_arg = (None, targets) if spec.kind == "ce" else (teacher, None)
        floor_ms = (2 if spec.kind == "ce" else 3) * tokens * vocab * 2 / bandwidth * 1e3
        args = (coef, targets_arg, shard, 1.0, spec)
        variants: dict[str, Callable[[], object]] = {
            "Triton fused (2 reads)": lambda t=teacher_arg, a=args: _triton_kernels.fused_loss_and_grad(
                student, t, *a
            )
        }
        for cluster, buffers in ((8, 1), (8, 2)):
            smem = _cluster_kernel.shared_bytes(vocab, 1 if spec.kind == "ce" else 2, cluster, buffers)
            if smem > optin:
                continue
            plan = _cluster_kernel.Plan(cluster=cluster, buffers=buffers, smem_bytes=smem)
            variants[f"one-pass C={cluster} x{buffers} buf"] = lambda t=teacher_arg, a=args, p=plan: (
                _cluster_kernel.fused_loss_and_grad(student, t, *a, plan=p, strict=True)
            )
            variants[f"one-pass C={cluster} x{buffers} buf, in place"] = (
                lambda t=teacher_arg, a=args, p=plan: _cluster_kernel.fused_loss_and_grad(
                    student, t, *a, out=student, plan=p, strict=True
                )
            )
        for label, fn in variants.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            ms = time_cuda(fn, warmup=3, iters=10)
            extra_gib = (torch.cuda.max_memory_allocated() - before) / 1024**3
            rows.append(
                {
                    "vocab": vocab, "kind": name, "variant": label, "ms": ms, "floor_ms": floor_ms,
                    "extra_gib": extra_gib,
                }
            )  # fmt: skip
            print(
                f"  {name:13s} {label:34s} {ms:8.3f} ms = {ms / floor_ms:5.2f}x floor ({floor_ms:.3f} ms at"
                f" {bandwidth / 1e9:.0f} GB/s), memory above inputs {extra_gib:.2f} GiB",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 100278])
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--verbose", action="store_true", help="show the compiler output")
    parser.add_argument("--prebuilt", help="import the extension from this build directory")
    parser.add_argument("--no-checks", action="store_true", help="skip the correctness checks")
    parser.add_argument("--no-timings", action="store_true", help="skip the timings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("check_kl_cluster.py needs a CUDA GPU")
    os.environ[_cluster_kernel.ONEPASS_ENV] = "1"
    report = {"environment": environment()}
    print(f"environment: {report['environment']}", flush=True)
    report["build"] = build(args.verbose, args.prebuilt)
    print(
        f"build: {'ok' if report['build']['ok'] else 'FAILED'} in {report['build']['seconds']:.1f} s"
        f" ({report['build']['name']})"
        + (f"\n{report['build']['error']}" if not report["build"]["ok"] else ""),
        flush=True,
    )
    ok = report["build"]["ok"]
    if ok and not args.no_checks:
        print("correctness (26 sampled rows vs float64; all 512 rows vs Triton):", flush=True)
        report["checks"] = run_checks()
        ok = all(result.get("ok") for result in report["checks"])
        print(f"correctness: {'all ok' if ok else 'FAILURES above'}", flush=True)
    if report["build"]["ok"] and not args.no_timings:
        report["timings"] = []
        for vocab in args.vocab:
            print(f"speed at {args.tokens} x {vocab} (bf16, kernel only):", flush=True)
            report["timings"] += time_kernels(args.tokens, vocab)
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
