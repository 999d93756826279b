#!/usr/bin/env python3
"""The Phase 2 train step written as a TRL user would: the peer that tools/bench_distill_step.py is
measured against.

    python3 tools/bench_trl_step.py [--layers 36] [--micro-batches 4] [--micro-batch-size 2]
        [--prompt-tokens 512] [--response-tokens 1536] [--warmup 2] [--steps 5]

transformers' Qwen3ForCausalLM at the Qwen3-4B shape (random init, bf16 parameters, sdpa attention)
as student and a frozen copy as teacher. Per micro-batch the teacher reads x + y + delim + y without
gradients (3600 tokens a sample by default), the student reads x + y (2048), and the loss is TRL's
``GKDTrainer.generalized_jsd_loss`` with beta = 1 (the reverse KL(student || teacher), per token,
TRL's "batchmean") on the logits of the second y, as GKDTrainer computes it: full-sequence logits,
then the response slice. When trl is not importable the same formula is computed here
(``reverse_kl_batchmean``). Gradients accumulate over the micro-batches, then one fused AdamW step on
the bf16 parameters (as a TRL user's bf16 model with optim="adamw_torch_fused" has).

Prints ms per step, tokens/s (teacher + student tokens) and peak GiB; writes
$OUT/bench_trl_step.json when OUT is set (or --json PATH). The same shape as bench_distill_step.py's
defaults (8 samples of 512 + 1536 tokens, delim 16).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

GIB = 1024**3
DELIM_TOKENS = 16  # as tools/bench_distill_step.py
QWEN3_4B = dict(
    hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1_000_000.0,
    max_position_embeddings=40960,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=512, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10_000.0,
    max_position_embeddings=4096,
)  # fmt: skip
SHAPES = {"qwen3-4b": QWEN3_4B, "tiny": TINY}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_trl_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=1536)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/bench_trl_step.json")
    args = parser.parse_args(argv)
    for name in ("layers", "micro_batches", "micro_batch_size", "prompt_tokens", "response_tokens", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def reverse_kl_batchmean(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """generalized_jsd_loss(beta=1, temperature=1, labels=None, reduction="batchmean"):
    sum over the vocabulary of p_s (log p_s - log p_t), summed over all positions, divided by the
    number of positions (batch x sequence)."""
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    per_entry = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    return per_entry.sum() / (per_entry.shape[0] * per_entry.shape[1])


def trl_loss() -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """TRL's own loss when trl is importable (its location moved between releases), else ours."""
    for module in ("trl", "trl.experimental.gkd", "trl.trainer.gkd_trainer"):
        try:
            trainer = __import__(module, fromlist=["GKDTrainer"]).GKDTrainer
        except (ImportError, AttributeError):
            continue
        version = __import__("trl").__version__
        loss = functools.partial(trainer.generalized_jsd_loss, beta=1.0)
        return loss, f"trl {version} {module}.GKDTrainer.generalized_jsd_loss(beta=1)"
    return reverse_kl_batchmean, "reverse_kl_batchmean (trl not importable; the same formula)"


def build_models(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(num_hidden_layers=args.layers, **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(args.device):
        student, teacher = (
            AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
            for _ in range(2)
        )
    teacher.load_state_dict(student.state_dict())  # the frozen teacher starts as the student
    teacher.eval().requires_grad_(False)
    student.train()
    return student, teacher


def synthetic_micro_batches(args: argparse.Namespace, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student x + y, teacher x + y + delim + y) per micro-batch, on the device."""
    generator = torch.Generator().manual_seed(1)
    n, p, r = args.micro_batch_size, args.prompt_tokens, args.response_tokens
    batches = []
    for _ in range(args.micro_batches):
        prompt, response = (torch.randint(0, vocab, (n, k), generator=generator) for k in (p, r))
        delim = torch.randint(0, vocab, (n, DELIM_TOKENS), generator=generator)
        student = torch.cat([prompt, response], 1)
        teacher = torch.cat([prompt, response, delim, response], 1)
        batches.append((student.to(args.device), teacher.to(args.device)))
    return batches


def train_step(student, teacher, optimizer, batches, loss_fn, args) -> float:
    """Gradient accumulation over the micro-batches, then the optimizer step (GKDTrainer's shape)."""
    p, r = args.prompt_tokens, args.response_tokens
    teacher_start = p + r + DELIM_TOKENS - 1  # the logit at position t predicts token t + 1
    total = 0.0
    for student_ids, teacher_ids in batches:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=teacher_ids).logits[:, teacher_start : teacher_start + r]
        student_logits = student(input_ids=student_ids).logits[:, p - 1 : p - 1 + r]
        loss = loss_fn(student_logits, teacher_logits) / len(batches)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    loss_fn, loss_name = trl_loss()
    student, teacher = build_models(args)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    batches = synthetic_micro_batches(args, student.config.vocab_size)
    for _ in range(args.warmup):
        train_step(student, teacher, optimizer, batches, loss_fn, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(args.device)
    start = time.perf_counter()
    losses = [train_step(student, teacher, optimizer, batches, loss_fn, args) for _ in range(args.steps)]
    synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    samples = args.micro_batches * args.micro_batch_size
    student_tokens = samples * (args.prompt_tokens + args.response_tokens)
    teacher_tokens = samples * (args.prompt_tokens + 2 * args.response_tokens + DELIM_TOKENS)
    peak = torch.cuda.max_memory_allocated() / GIB if args.device.startswith("cuda") else None
    return dict(
        shape=args.shape, layers=args.layers, samples=samples, micro_batches=args.micro_batches,
        micro_batch_size=args.micro_batch_size, student_tokens=student_tokens, teacher_tokens=teacher_tokens,
        loss=loss_name, attention=student.config._attn_implementation, ms_per_step=1e3 * seconds,
        tokens_per_s=(student_tokens + teacher_tokens) / seconds, peak_gib=peak, losses=losses,
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        torch=torch.__version__, transformers=__import__("transformers").__version__,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    peak = "n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.1f} GiB"
    print(
        f"TRL-style step, {result['shape']} x {args.layers} layers, {result['samples']} samples "
        f"(teacher {result['teacher_tokens'] // result['samples']} / student "
        f"{result['student_tokens'] // result['samples']} tokens each), loss {result['loss']}: "
        f"{result['ms_per_step']:.1f} ms/step, {result['tokens_per_s']:.0f} tokens/s, peak {peak}"
    )
    out = args.json or (Path(os.environ["OUT"]) / "bench_trl_step.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(map(math.isfinite, result["losses"])) else 1


if __name__ == "__main__":
    sys.exit(main())
