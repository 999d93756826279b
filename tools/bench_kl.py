#!/usr/bin/env python3
"""Benchmark and check the vocab-parallel KL loss on a GPU.

    python3 tools/bench_kl.py bench [--tokens 4096 16384 32768] [--vocab 151936 100278]
                                    [--sweep] [--check] [--kinds] [--peers]
                                    [--json OUT.json] [--markdown OUT.md]
    torchrun --nproc-per-node 2 tools/bench_kl.py tp-check [--tokens 4096] [--vocab 151936]

``bench`` (one GPU, TP = 1, bf16 logits, every token valid) times forward + backward of
``distill_loss`` (reverse KL, full vocabulary) and reports its peak memory next to
(a) a naive PyTorch implementation (float32 log_softmax of both, kl_div, mean) and
(b) the memory-bandwidth floor: the bytes any implementation must move (read student and teacher
    logits once, write the bf16 gradient once: 6 bytes per logit) divided by the device-to-device
    copy bandwidth measured in the same run on a buffer of the logits' size.
It also times the unfused two-kernel variant (used with TP > 1), the other divergence kinds at one
shape, and with ``--sweep`` a few Triton block/warp settings; ``--check`` compares sampled rows
with a float64 reference. ``--peers`` times, at T=16384, V=151936, hidden 2560, ours next to
torch.compile(naive), Liger-Kernel (JSD(beta=1) = reverse KL, cross-entropy, fused-linear JSD and
cross-entropy) and Cut Cross-Entropy, on logits and through the output layer, in the same run; a
peer that is not importable gets a row saying so.

``tp-check`` (two GPUs, NCCL) runs each kind with TP = 2 on vocab shards and compares the loss and
every rank's gradient shard with TP = 1 on the full logits.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sdzero.losses import (  # noqa: E402  # noqa: E402
    DistillLossConfig,
    _triton_kernels,
    distill_loss,
    full_vocab,
    masked_cross_entropy,
)

GIB = 1024**3


# ---------------------------------------------------------------- measurement helpers


def time_calls(fn: Callable[[], None], warmup: int = 2, iters: int = 8) -> tuple[float, float]:
    """(GPU ms, host ms) per call of fn, with the calls queued back to back and one sync at the end.

    GPU ms: the median over CUDA events around each call. As in training, where the GPU runs behind
    the Python, a call's CPU overhead counts only where the GPU has to wait for it (a host sync
    inside fn makes it wait every time). Until 2026-11-23 this synced after every call, which also
    counted the CPU time before the first kernel of each call. Host ms: the Python time per call;
    well below the GPU time, the GPU never waits for the CPU.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) for _ in range(iters)]
    host_start = time.perf_counter()
    for start, end in events:
        start.record()
        fn()
        end.record()
    host_ms = (time.perf_counter() - host_start) / iters * 1e3
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events), host_ms


def time_cuda(fn: Callable[[], None], warmup: int = 2, iters: int = 8) -> float:
    """Median GPU ms per call of fn (see ``time_calls``)."""
    return time_calls(fn, warmup, iters)[0]


def peak_memory(fn: Callable[[], None]) -> tuple[float, float]:
    """(peak allocated GiB during fn, peak minus what was allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / GIB, (peak - before) / GIB


def copy_bandwidth(num_bytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted) on a buffer of num_bytes."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * num_bytes / (ms * 1e-3)


def make_logits(tokens: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    student = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(2.0)
    teacher = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, generator=gen)
    teacher.add_(student, alpha=0.8)
    loss_mask = torch.ones(tokens, device="cuda")
    return student.requires_grad_(), teacher, loss_mask


def naive_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    log_p = student.float().log_softmax(-1)
    log_q = teacher.float().log_softmax(-1)
    per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # sum p (log p - log q)
    return (per_token * loss_mask).sum() / loss_mask.sum()


def fwd_bwd(loss_fn: Callable[[], torch.Tensor], student: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        student.grad = None
        loss_fn().backward()

    return step


def measure(step: Callable[[], None], student: torch.Tensor) -> dict:
    try:
        peak, extra = peak_memory(step)
        ms, host = time_calls(step)
    except torch.OutOfMemoryError:
        student.grad = None
        torch.cuda.empty_cache()
        return {"ms": None, "host_ms": None, "peak_gib": None, "extra_gib": None, "oom": True}
    student.grad = None
    return {"ms": ms, "host_ms": host, "peak_gib": peak, "extra_gib": extra, "oom": False}


class unfused_path:
    """Context: run TP = 1 through the two-kernel path used with TP > 1 (for comparison)."""

    def __enter__(self) -> None:
        self.original = full_vocab._uses_fused_kernel
        full_vocab._uses_fused_kernel = lambda *args: False

    def __exit__(self, *exc) -> None:
        full_vocab._uses_fused_kernel = self.original


# ---------------------------------------------------------------- bench


class onepass_mode:
    """Context: SDZERO_KL_ONEPASS for the calls inside ("0": Triton fused kernel, "1": one-pass)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        self.saved = os.environ.get("SDZERO_KL_ONEPASS")
        os.environ["SDZERO_KL_ONEPASS"] = self.mode

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            del os.environ["SDZERO_KL_ONEPASS"]
        else:
            os.environ["SDZERO_KL_ONEPASS"] = self.saved


def not_run(reason: str) -> dict:
    return {"ms": None, "host_ms": None, "peak_gib": None, "extra_gib": None, "oom": False, "skipped": reason}


def bench_onepass(student, teacher, loss_mask, config) -> tuple[dict, dict, str | None]:
    """The one-pass cluster kernel (when it applies here): separate gradient, then grad_in_place. The
    in-place run overwrites the student logits with gradients, so it must come last."""
    from megatron_sdzero.losses import _cluster_kernel

    with onepass_mode("1"):
        reason = _cluster_kernel.onepass_plan(student.detach(), teacher)[1]
        if reason is not None:
            return not_run(reason), not_run(reason), reason
        step = fwd_bwd(lambda: distill_loss(student, teacher, loss_mask, config=config)[0], student)
        separate = measure(step, student)
        in_place_step = fwd_bwd(
            lambda: distill_loss(student, teacher, loss_mask, config=config, grad_in_place=True)[0], student
        )
        in_place = measure(in_place_step, student)
    return separate, in_place, None


def bench_shape(tokens: int, vocab: int) -> dict:
    student, teacher, loss_mask = make_logits(tokens, vocab)
    logit_bytes = tokens * vocab * 2
    bandwidth = copy_bandwidth(logit_bytes)
    floor_ms = 3 * logit_bytes / bandwidth * 1e3
    config = DistillLossConfig()
    ours_step = fwd_bwd(lambda: distill_loss(student, teacher, loss_mask, config=config)[0], student)
    with onepass_mode("0"):  # "ours": the Triton fused kernel (two reads per logit)
        ours = measure(ours_step, student)
        with unfused_path():
            unfused = measure(ours_step, student)
    naive = measure(fwd_bwd(lambda: naive_reverse_kl(student, teacher, loss_mask), student), student)
    onepass, onepass_in_place, onepass_reason = bench_onepass(student, teacher, loss_mask, config)
    row = {
        "tokens": tokens, "vocab": vocab, "copy_gbps": bandwidth / 1e9, "floor_ms": floor_ms,
        "ours": ours, "unfused": unfused, "naive": naive,
        "onepass": onepass, "onepass_in_place": onepass_in_place, "onepass_reason": onepass_reason,
        "ours_over_floor": ours["ms"] / floor_ms,
        "unfused_over_floor": unfused["ms"] / floor_ms if unfused["ms"] else None,
        "onepass_over_floor": onepass["ms"] / floor_ms if onepass["ms"] else None,
        "naive_peak_over_ours": naive["peak_gib"] / ours["peak_gib"] if naive["peak_gib"] else None,
        "naive_ms_over_ours": naive["ms"] / ours["ms"] if naive["ms"] else None,
    }  # fmt: skip
    print_row(row)
    return row


def format_result(result: dict) -> str:
    if result.get("skipped"):
        return f"not run ({result['skipped']})"
    if result["oom"]:
        return "OOM"
    return (
        f"{result['ms']:8.2f} ms (host {result['host_ms']:.2f})"
        f"  peak {result['peak_gib']:6.2f} GiB (+{result['extra_gib']:5.2f})"
    )


def print_row(row: dict) -> None:
    fmt = format_result
    onepass_ratio = f" = {row['onepass_over_floor']:.2f}x floor" if row["onepass_over_floor"] else ""
    print(
        f"T={row['tokens']:6d} V={row['vocab']:6d} | copy {row['copy_gbps']:6.0f} GB/s"
        f" floor {row['floor_ms']:6.2f} ms"
        f" | ours {fmt(row['ours'])} = {row['ours_over_floor']:.2f}x floor"
        f" | unfused {fmt(row['unfused'])} | naive {fmt(row['naive'])}"
        f" | one-pass {fmt(row['onepass'])}{onepass_ratio}"
        f" | one-pass in place {fmt(row['onepass_in_place'])}",
        flush=True,
    )


def bench_kinds(tokens: int, vocab: int) -> list[dict]:
    """Every divergence kind (and the SFT cross-entropy) at one shape."""
    gc.collect()  # the main table's logits live on in reference cycles until collected
    student, teacher, loss_mask = make_logits(tokens, vocab)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    configs = {
        "reverse": DistillLossConfig(),
        "forward": DistillLossConfig(kind="forward"),
        "mixed": DistillLossConfig(kind="mixed"),
        "jsd(0.5)": DistillLossConfig(kind="jsd"),
        "mixed top-64": DistillLossConfig(kind="mixed", top_k=64),
        "reverse top-64+tail": DistillLossConfig(kind="reverse", top_k=64, top_k_tail=True),
        # the same two on the chunked PyTorch path (the CPU path), for comparison with the Triton path
        "mixed top-64 (torch)": DistillLossConfig(kind="mixed", top_k=64, backend="torch"),
        "reverse top-64+tail (torch)": DistillLossConfig(
            kind="reverse", top_k=64, top_k_tail=True, backend="torch"
        ),
    }
    rows = []
    for name, config in configs.items():
        step = fwd_bwd(
            lambda config=config: distill_loss(student, teacher, loss_mask, config=config)[0], student
        )
        rows.append({"kind": name, **measure(step, student)})
    ce_step = fwd_bwd(lambda: masked_cross_entropy(student, labels, loss_mask)[0], student)
    rows.append({"kind": "cross-entropy (SFT)", **measure(ce_step, student)})
    for row in rows:
        timing = f"{row['ms']:8.2f} ms (host {row['host_ms']:.2f})"
        print(f"  {row['kind']:28s} {timing}  peak {row['peak_gib']:6.2f} GiB", flush=True)
    return rows


# ---------------------------------------------------------------- peers, in the same run

PEERS_SHAPE = {"tokens": 16384, "vocab": 151936, "hidden": 2560}  # Qwen3-4B's output layer
Step = Callable[[], None]


def import_peer(module: str) -> tuple[ModuleType | None, str | None]:
    """(the module, None), or (None, why not) when it cannot be imported."""
    try:
        return importlib.import_module(module), None
    except ImportError as error:
        return None, f"{module} not importable: {error}"


def _step(loss_fn: Callable[[], torch.Tensor], *params: torch.Tensor) -> Step:
    """fwd + bwd of loss_fn with the gradients of ``params`` cleared first."""

    def step() -> None:
        for param in params:
            param.grad = None
        loss_fn().backward()

    return step


def logit_peer_steps(student, teacher, loss_mask, labels) -> dict[str, Step | str]:
    """Row -> fwd + bwd on [tokens, vocab] logits, or why that row is not run. Ours and the peers
    get the same bf16 logits; Liger's JSD takes log-probabilities, so its row includes the two
    log_softmax calls its user must make (beta = 1 is its reverse KL)."""
    liger, liger_missing = import_peer("liger_kernel.transformers")
    rows: dict[str, Step | str] = {
        "reverse KL: ours": _step(lambda: distill_loss(student, teacher, loss_mask)[0], student),
        "reverse KL: torch.compile(naive)": _step(
            lambda: compiled_naive_reverse_kl()(student, teacher, loss_mask), student
        ),
        "reverse KL: naive fp32": _step(lambda: naive_reverse_kl(student, teacher, loss_mask), student),
        "cross-entropy: ours": _step(lambda: masked_cross_entropy(student, labels, loss_mask)[0], student),
    }
    if liger is None:
        rows["reverse KL: Liger JSD(beta=1) on bf16 log-softmax"] = liger_missing
        rows["cross-entropy: Liger"] = liger_missing
        return rows
    jsd, cross_entropy = liger.LigerJSD(beta=1.0), liger.LigerCrossEntropyLoss()
    rows["reverse KL: Liger JSD(beta=1) on bf16 log-softmax"] = _step(
        lambda: jsd(student.log_softmax(-1), teacher.log_softmax(-1)), student
    )
    rows["cross-entropy: Liger"] = _step(lambda: cross_entropy(student, labels), student)
    return rows


def output_layer_peer_steps(hidden, weight, teacher_hidden, teacher_weight, loss_mask, labels):
    """Row -> fwd + bwd from the last hidden states through the output layer (student: gradients
    to hidden states and weight; the frozen teacher without), or why that row is not run."""

    def student_logits() -> torch.Tensor:
        return hidden @ weight.T

    def teacher_logits() -> torch.Tensor:
        with torch.no_grad():
            return teacher_hidden @ teacher_weight.T

    def ours_kl(in_place: bool) -> torch.Tensor:
        return distill_loss(student_logits(), teacher_logits(), loss_mask, grad_in_place=in_place)[0]

    upstream: list[torch.Tensor] = []  # the logits' gradient for the matmuls-only row, made once

    def matmuls() -> None:  # the GEMMs alone: both models' logits, then the student's two gradients
        hidden.grad = weight.grad = None
        teacher_logits()
        logits = student_logits()
        if not upstream:
            upstream.append(torch.full_like(logits, 1e-6))
        logits.backward(upstream[0])

    params = (hidden, weight)
    rows: dict[str, Step | str] = {
        "output layer + reverse KL: ours": _step(lambda: ours_kl(False), *params),
        "output layer + reverse KL: ours, grad_in_place": _step(lambda: ours_kl(True), *params),
        "output layer + cross-entropy: ours, grad_in_place": _step(
            lambda: masked_cross_entropy(student_logits(), labels, loss_mask, grad_in_place=True)[0], *params
        ),
    }
    liger, liger_missing = import_peer("liger_kernel.transformers")
    if liger is None:
        rows["output layer + reverse KL: Liger fused-linear JSD(beta=1)"] = liger_missing
        rows["output layer + cross-entropy: Liger fused-linear"] = liger_missing
    else:
        fused_jsd, fused_ce = (
            liger.LigerFusedLinearJSD(jsd_beta=1.0),
            liger.LigerFusedLinearCrossEntropyLoss(),
        )
        rows["output layer + reverse KL: Liger fused-linear JSD(beta=1)"] = _step(
            lambda: fused_jsd(hidden, weight, teacher_hidden, teacher_weight, None), *params
        )
        rows["output layer + cross-entropy: Liger fused-linear"] = _step(
            lambda: fused_ce(weight, hidden, labels), *params
        )
    cce, cce_missing = import_peer("cut_cross_entropy")
    rows["output layer + cross-entropy: Cut Cross-Entropy"] = (
        cce_missing
        if cce is None
        else _step(lambda: cce.linear_cross_entropy(hidden, weight, labels), *params)
    )
    rows["output layer matmuls alone (the floor; measured last, its gradient buffer stays)"] = matmuls
    return rows


@functools.cache
def compiled_naive_reverse_kl() -> Callable[..., torch.Tensor]:
    return torch.compile(naive_reverse_kl)


def measure_row(name: str, step: Step | str, param: torch.Tensor) -> dict:
    """``measure`` for one row; a row that is not run, or a peer that fails (a compile error, a shape
    it does not take), gives its reason. Our own rows raise."""
    if isinstance(step, str):
        return not_run(step)
    if ": ours" in name:
        return measure(step, param)
    try:
        return measure(step, param)
    except Exception as error:
        param.grad = None
        first_line = next(iter(str(error).splitlines()), "")
        return not_run(f"failed: {type(error).__name__}: {first_line}")


def bench_peers(tokens: int, vocab: int, hidden_size: int) -> list[dict]:
    """Ours next to Liger-Kernel, Cut Cross-Entropy and torch.compile at one shape, on logits and
    at the output layer; rows of peers that are not installed say so."""
    gc.collect()
    student, teacher, loss_mask = make_logits(tokens, vocab)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    results = [
        {"level": "logits", "name": name, **measure_row(name, step, student)}
        for name, step in logit_peer_steps(student, teacher, loss_mask, labels).items()
    ]
    del student, teacher
    gc.collect()
    torch.cuda.empty_cache()
    gen = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(scale)

    hidden, teacher_hidden = randn(tokens, hidden_size, scale=1.0), randn(tokens, hidden_size, scale=1.0)
    weight, teacher_weight = (randn(vocab, hidden_size, scale=hidden_size**-0.5) for _ in range(2))
    hidden.requires_grad_()
    weight.requires_grad_()
    steps = output_layer_peer_steps(hidden, weight, teacher_hidden, teacher_weight, loss_mask, labels)
    results += [
        {"level": "output layer", "name": name, **measure_row(name, step, hidden)}
        for name, step in steps.items()
    ]
    for row in results:
        print(f"  {row['name']:58s} {format_result(row)}", flush=True)
    return results


def peers_markdown(shape: dict, rows: list[dict]) -> list[str]:
    lines = [
        "",
        f"Ours and peers at T={shape['tokens']}, V={shape['vocab']}, hidden {shape['hidden']} (forward +"
        " backward, bf16):",
        "",
        "| level | implementation | ms | peak GiB | extra GiB |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        if row.get("skipped"):
            cells = f"not run ({row['skipped']}) | - | -"
        elif row["oom"]:
            cells = "OOM | - | -"
        else:
            cells = f"{row['ms']:.2f} | {row['peak_gib']:.2f} | {row['extra_gib']:.2f}"
        lines.append(f"| {row['level']} | {row['name']} | {cells} |")
    return lines


SWEEP_KNOBS = ("FUSE_SINGLE_PROCESS", "BLOCK_COLUMNS", "NUM_WARPS", "NUM_STAGES")


def _set_knobs(settings: dict) -> None:
    for name, value in settings.items():
        setattr(_triton_kernels, name, value)


def _sweep_one_vocab(tokens: int, vocab: int, candidates: list[dict]) -> list[dict]:
    student, teacher, loss_mask = make_logits(tokens, vocab)
    step = fwd_bwd(lambda: distill_loss(student, teacher, loss_mask)[0], student)
    rows = []
    for settings in candidates:
        _set_knobs(settings)
        rows.append({**settings, "vocab": vocab, "ms": time_cuda(step, warmup=2, iters=5)})
        print(f"  sweep V={vocab} {settings}: {rows[-1]['ms']:8.2f} ms", flush=True)
    return rows


def sweep(tokens: int, vocabs: list[int]) -> list[dict]:
    """Time the default loss under launch settings (fused or two kernels, block, warps, pipeline
    stages) for every vocabulary; keep the settings with the smallest total time."""
    candidates = [
        {"FUSE_SINGLE_PROCESS": fused, "BLOCK_COLUMNS": block, "NUM_WARPS": warps, "NUM_STAGES": stages}
        for fused in (True, False)
        for block in (2048, 4096, 8192)
        for warps in (4, 8)
        for stages in (3, 4)
    ]
    rows = [row for vocab in vocabs for row in _sweep_one_vocab(tokens, vocab, candidates)]
    totals = {}
    for row in rows:
        key = tuple(row[name] for name in SWEEP_KNOBS)
        totals[key] = totals.get(key, 0.0) + row["ms"]
    best = dict(zip(SWEEP_KNOBS, min(totals, key=totals.get), strict=True))
    _set_knobs(best)
    print(f"  sweep best over {vocabs}: {best}", flush=True)
    return rows


def check_rows(tokens: int, vocab: int, kinds=("reverse", "forward", "mixed", "jsd")) -> list[dict]:
    """Sampled rows of the full-size run against float64 (token values and gradient rows)."""
    student, teacher, loss_mask = make_logits(tokens, vocab, seed=1)
    rows = torch.randperm(tokens, device="cuda")[:16]
    results = []
    for kind in kinds:
        config = DistillLossConfig(kind=kind)
        student.grad = None
        loss, metrics = distill_loss(student, teacher, loss_mask, config=config)
        loss.backward()
        s64 = student.detach()[rows].double().requires_grad_()
        lp, lq = s64.log_softmax(-1), teacher[rows].double().log_softmax(-1)
        p, q = lp.exp(), lq.exp()
        reverse, forward = (p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1)
        lm = torch.logaddexp(lq + torch.log(torch.tensor(0.5)), lp + torch.log(torch.tensor(0.5)))
        jsd = 0.5 * (q * (lq - lm)).sum(-1) + 0.5 * (p * (lp - lm)).sum(-1)
        ref = {"reverse": reverse, "forward": forward, "mixed": 0.5 * (reverse + forward), "jsd": jsd}[kind]
        (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
        got_grad = student.grad[rows].double() * tokens  # the loss is a mean over all tokens
        value_rel = (
            ((metrics.token_values[rows].double() - ref.detach()).abs() / ref.detach().abs()).max().item()
        )
        scale = ref_grad.abs().max().item()
        grad_err = ((got_grad - ref_grad).abs() / (2**-7 * ref_grad.abs() + 2e-5 * scale)).max().item()
        results.append(
            {"kind": kind, "max_rel_value_err": value_rel, "grad_err_in_tolerance_units": grad_err}
        )
        print(f"  check {kind:8s}: value rel err {value_rel:.2e}, grad err {grad_err:.3f} x tol", flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}; {report['date']}.",
        f"Triton launch settings: {report['launch_settings']}.",
        f"Command: `{report['command']}`",
        "",
        "| tokens | vocab | copy GB/s | floor ms | ours ms | ours / floor | ours peak GiB | unfused ms"
        " | naive ms | naive peak GiB | naive peak / ours | one-pass ms | one-pass / floor"
        " | one-pass in-place peak GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["shapes"]:
        ours, unfused, naive = row["ours"], row["unfused"], row["naive"]
        onepass, in_place = row["onepass"], row["onepass_in_place"]
        if row["onepass_reason"] is not None:
            onepass_cells = f"n/a ({row['onepass_reason']}) | - | -"
        else:
            in_place_peak = "OOM" if in_place["oom"] else f"{in_place['peak_gib']:.2f}"
            ms_cells = (
                "OOM | -" if onepass["oom"] else f"{onepass['ms']:.2f} | {row['onepass_over_floor']:.2f}"
            )
            onepass_cells = f"{ms_cells} | {in_place_peak}"
        naive_ms = "OOM" if naive["oom"] else f"{naive['ms']:.2f}"
        naive_peak = "OOM" if naive["oom"] else f"{naive['peak_gib']:.2f}"
        ratio = (
            "n/a (naive OOM)"
            if row["naive_peak_over_ours"] is None
            else f"{row['naive_peak_over_ours']:.2f}x"
        )
        lines.append(
            f"| {row['tokens']} | {row['vocab']} | {row['copy_gbps']:.0f} | {row['floor_ms']:.2f}"
            f" | {ours['ms']:.2f}"
            f" | {row['ours_over_floor']:.2f} | {ours['peak_gib']:.2f} | {unfused['ms']:.2f} | {naive_ms}"
            f" | {naive_peak} | {ratio} | {onepass_cells} |"
        )
    if report.get("kinds"):
        lines += [
            "",
            f"Other kinds at {report['kinds_shape']}:",
            "",
            "| kind | ms | peak GiB |",
            "|---|---:|---:|",
        ]
        lines += [f"| {row['kind']} | {row['ms']:.2f} | {row['peak_gib']:.2f} |" for row in report["kinds"]]
    if report.get("peers"):
        lines += peers_markdown(report["peers_shape"], report["peers"])
    return "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace) -> None:
    import triton

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 " + " ".join(sys.argv),
    }
    if args.sweep:
        report["sweep"] = sweep(16384, args.vocab)
    report["launch_settings"] = {name: getattr(_triton_kernels, name) for name in SWEEP_KNOBS}
    if args.check:
        report["check"] = check_rows(4096, 151936) + check_rows(4096, 100278, kinds=("reverse",))
    report["shapes"] = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            report["shapes"].append(bench_shape(tokens, vocab))
            torch.cuda.empty_cache()
    if args.kinds:
        report["kinds_shape"] = "T=16384, V=151936"
        report["kinds"] = bench_kinds(16384, 151936)
    if args.peers:
        report["peers_shape"] = PEERS_SHAPE
        report["peers"] = bench_peers(PEERS_SHAPE["tokens"], PEERS_SHAPE["vocab"], PEERS_SHAPE["hidden"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(markdown(report))


# ---------------------------------------------------------------- TP = 2 vs TP = 1


def _tp_timings(student, teacher, loss_mask, cols, group) -> dict[str, float]:
    """fwd+bwd of the default loss on the full logits (TP=1) and on this rank's shard (TP=2)."""
    full = student.detach().clone().requires_grad_()
    shard = student.detach()[:, cols].contiguous().requires_grad_()
    shard_teacher = teacher[:, cols].contiguous()
    tp1 = fwd_bwd(lambda: distill_loss(full, teacher, loss_mask)[0], full)
    tp2 = fwd_bwd(lambda: distill_loss(shard, shard_teacher, loss_mask, tp_group=group)[0], shard)
    return {"tp1_ms": time_cuda(tp1), "tp2_ms": time_cuda(tp2)}


def run_tp_check(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    group = dist.new_group(list(range(world)))
    student, teacher, loss_mask = make_logits(args.tokens[0], args.vocab[0], seed=5)
    for tensor in (student.detach(), teacher):
        dist.broadcast(tensor, src=0)  # identical full logits on both ranks, whatever the RNG does
    loss_mask[::7] = 0.0
    width = args.vocab[0] // world
    cols = slice(rank * width, (rank + 1) * width)
    labels = torch.randint(0, args.vocab[0], (args.tokens[0],), device="cuda")
    dist.broadcast(labels, src=0)
    configs = {
        "reverse": DistillLossConfig(),
        "forward": DistillLossConfig(kind="forward"),
        "mixed": DistillLossConfig(kind="mixed"),
        "jsd": DistillLossConfig(kind="jsd"),
        "mixed top-64": DistillLossConfig(kind="mixed", top_k=64),
        "reverse top-64+tail": DistillLossConfig(kind="reverse", top_k=64, top_k_tail=True),
        "cross-entropy": None,
    }
    results = []
    for name, config in configs.items():
        outputs = []
        for logits, tp_group in ((student, None), (student[:, cols], group)):
            x = logits.detach().clone().requires_grad_()
            if config is None:
                loss, _ = masked_cross_entropy(x, labels, loss_mask, tp_group=tp_group)
            else:
                shard_teacher = teacher[:, cols] if tp_group else teacher
                loss, _ = distill_loss(x, shard_teacher, loss_mask, config=config, tp_group=tp_group)
            loss.backward()
            outputs.append((loss.item(), x.grad))
        (loss1, grad1), (loss2, grad2) = outputs
        grad_ref = grad1[:, cols].float()
        scale = grad_ref.abs().max().item()
        grad_err = ((grad2.float() - grad_ref).abs() / (2**-7 * grad_ref.abs() + 1e-5 * scale)).max().item()
        result = {
            "kind": name,
            "loss_tp1": loss1,
            "loss_tp2": loss2,
            "rel_loss_diff": abs(loss2 - loss1) / abs(loss1),
            "grad_err_in_tolerance_units": grad_err,
        }
        all_results = [None] * world
        dist.all_gather_object(all_results, result)
        if rank == 0:
            worst = max(r["grad_err_in_tolerance_units"] for r in all_results)
            print(
                f"  TP2 vs TP1 {name:20s}: loss {loss1:.6f} vs {loss2:.6f}"
                f" (rel {result['rel_loss_diff']:.1e}), worst rank grad err {worst:.3f} x tol",
                flush=True,
            )
            results.append({**result, "grad_err_in_tolerance_units": worst})
    timings = _tp_timings(student, teacher, loss_mask, cols, group)
    if rank == 0:
        print(
            f"  reverse KL fwd+bwd: TP=1 {timings['tp1_ms']:.2f} ms, TP=2 {timings['tp2_ms']:.2f} ms",
            flush=True,
        )
    if rank == 0 and args.json:
        report = {
            "timings": timings,
            "device": torch.cuda.get_device_name(),
            "world": world,
            "tokens": args.tokens[0],
            "vocab": args.vocab[0],
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["bench", "tp-check"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 100278])
    parser.add_argument("--sweep", action="store_true", help="try Triton block/warp settings first")
    parser.add_argument("--check", action="store_true", help="compare sampled rows with float64")
    parser.add_argument("--kinds", action="store_true", help="also time every kind at T=16384, V=151936")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also time Liger-Kernel, Cut Cross-Entropy and torch.compile(naive) next to ours (rows of"
        " peers that are not installed say so)",
    )
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kl.py needs a CUDA GPU")
    run_bench(args) if args.mode == "bench" else run_tp_check(args)


if __name__ == "__main__":
    main()
