#!/usr/bin/env python3
"""The Phase 2 train step of a Qwen3-4B-shaped model: BF16 or FP8 teacher, BF16 or FP8 student.

    PYTHONPATH=$PWD python3 tools/bench_distill_step.py [--num-layers auto] [--samples 8]
        [--prompt-tokens 512] [--response-tokens 1536] [--micro-batch-size 1] [--warmup 2] [--steps 5]
        [--variants bf16/bf16 bf16/fp8 fp8/fp8]

Each variant (student precision / teacher precision) builds the student (TransformerEngine spec,
Megatron DDP + distributed optimizer) and a frozen teacher holding the student's initial weights
(``training.setup.build_frozen``, as ``sdzero distill`` does), then runs the real distillation step
(``distill.step.distill_step``: teacher forward without gradients, student forward + backward, the
vocab-parallel reverse KL over the full vocabulary, the AdamW update) on a synthetic batch: every
sample is a prompt x and a response y, the student reads x + y and the teacher x + y + delim + y,
the loss covers the second y. After ``--warmup`` untimed steps, ``--steps`` are timed
(CUDA-synchronised). Reported: step, teacher and student milliseconds, tokens/s, TFLOP/s per GPU
(student forward + backward and teacher forward, Megatron-LM's FLOP count) and peak memory.

Teacher fidelity: for each FP8 teacher recipe, the same weights are run in BF16 and in FP8; printed
are the mean and max per-token KL(teacher_bf16 || teacher_fp8), the relative L2 of the logits and
the top-1 agreement: the error an FP8 teacher adds to the target. Random weights give near-uniform
distributions, so ``--fidelity-checkpoint DIR`` (a converted Megatron checkpoint of a trained model,
e.g. ``sdzero convert hf-to-mcore models/smollm2-135m-instruct models/smollm2-mcore --dtype
bfloat16``) measures it on real weights and real text instead (one process).

Writes ``$OUT/bench_distill_step.json`` when OUT is set (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sft import GIB, auto_layers, environment, qwen3_4b_shape  # noqa: E402

DELIM_TOKENS = 16  # "\n\n" + P_r + "\n\n" is about this long for the paper's phrases


@dataclass(frozen=True)
class Precision:
    fp8: str | None = None
    recipe: str = "delayed"

    @property
    def name(self) -> str:
        return "bf16" if self.fp8 is None else f"fp8-{self.recipe}"


PRECISIONS = {
    "bf16": Precision(),
    "fp8": Precision("hybrid", "delayed"),
    "fp8-tensorwise": Precision("hybrid", "tensorwise"),
    "fp8-blockwise": Precision("hybrid", "blockwise"),
}


def synthetic_batch(args, vocab: int, seed: int):
    """x + y for the student, x + y + delim + y for the teacher, aligned on the second y."""
    from megatron_sdzero.distill.batch import DistillBatch

    generator = torch.Generator().manual_seed(seed)
    n, p, r, d = args.samples, args.prompt_tokens, args.response_tokens, DELIM_TOKENS
    prompt = torch.randint(0, vocab, (n, p), generator=generator)
    response = torch.randint(0, vocab, (n, r), generator=generator)
    delim = torch.randint(0, vocab, (n, d), generator=generator)
    student = torch.cat([prompt, response], 1)
    teacher = torch.cat([prompt, response, delim, response], 1)
    positions = torch.arange(r)
    return DistillBatch(
        student_tokens=student,
        teacher_tokens=teacher,
        student_index=(p - 1 + positions).expand(n, r).clone(),
        teacher_index=(p + r + d - 1 + positions).expand(n, r).clone(),
        targets=response,
        loss_mask=torch.ones(n, r, dtype=torch.bool),
        sample_weights=torch.ones(n),
        rewards=torch.ones(n),
        response_lengths=torch.full((n,), r),
        truncated=torch.zeros(n, dtype=torch.bool),
    )


def model_config(precision: Precision, seq_length: int):
    from megatron_sdzero.models.builder import ModelConfig

    return ModelConfig(
        params_dtype="bfloat16",
        transformer_impl="transformer_engine",
        fp8=precision.fp8,  # type: ignore[arg-type]
        fp8_recipe=precision.recipe,  # type: ignore[arg-type]
        max_sequence_length=seq_length,
    )


@torch.no_grad()
def copy_weights(source_chunks, target_chunks) -> None:
    """Parameter by parameter (TE's FP8 modules carry extra state a state-dict copy would drag along)."""
    from megatron_sdzero.distill.weights import unwrap

    for source, target in zip(unwrap(source_chunks), unwrap(target_chunks), strict=True):
        targets = dict(target.named_parameters())
        for name, param in source.named_parameters():
            targets[name].copy_(param)


def run_variant(student_p: Precision, teacher_p: Precision, args, arch) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_sdzero.distill.step import Stopwatch, distill_step
    from megatron_sdzero.distill.teacher import Teacher, TeacherConfig
    from megatron_sdzero.losses import DistillLossConfig
    from megatron_sdzero.models.builder import padded_vocab_size
    from megatron_sdzero.training.config import TrainConfig
    from megatron_sdzero.training.flops import FlopsModel, tflops_per_gpu
    from megatron_sdzero.training.setup import build_frozen, setup_trainable

    torch.cuda.reset_peak_memory_stats()
    dp = ps.get_data_parallel_world_size()
    steps = args.warmup + args.steps
    seq = args.prompt_tokens + 2 * args.response_tokens + DELIM_TOKENS
    train = TrainConfig(
        lr=1e-6, min_lr=1e-6, lr_schedule="constant", warmup_steps=0, train_iters=steps, epochs=None,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.samples * dp,
    )  # fmt: skip
    student = setup_trainable(arch, model_config(student_p, seq), train, steps)
    teacher = Teacher(build_frozen(arch, model_config(teacher_p, seq)), TeacherConfig())
    copy_weights(student.model, teacher.chunks)
    batch = synthetic_batch(args, arch.vocab_size, seed=100 + ps.get_data_parallel_rank())
    loss_config = DistillLossConfig()

    rows = []
    for _ in range(steps):
        teacher_time = Stopwatch()
        torch.cuda.synchronize()
        began = time.perf_counter()
        result = distill_step(
            student, teacher, batch, loss_config, arch.vocab_size,
            micro_batch_size=args.micro_batch_size, pad_to_multiple_of=16, teacher_time=teacher_time,
        )  # fmt: skip
        torch.cuda.synchronize()
        rows.append((time.perf_counter() - began, teacher_time.seconds, result.loss))
    timed = rows[args.warmup :]
    step_s = sum(r[0] for r in timed) / len(timed)
    teacher_s = sum(r[1] for r in timed) / len(timed)
    world = torch.distributed.get_world_size()
    flops_model = FlopsModel.from_arch(arch, padded_vocab_size(arch.vocab_size, 128, 1))
    student_len = args.prompt_tokens + args.response_tokens
    n = args.samples * dp
    flops = flops_model.step_flops([student_len] * n) + flops_model.step_flops([seq] * n) / 3
    tokens = n * (student_len + seq)
    out = dict(
        student=student_p.name,
        teacher=teacher_p.name,
        step_ms=1000 * step_s,
        teacher_ms=1000 * teacher_s,
        student_ms=1000 * (step_s - teacher_s),
        tokens_per_s=tokens / step_s,
        tflops_per_gpu=tflops_per_gpu(flops, step_s, world),
        peak_memory_gib=torch.cuda.max_memory_allocated() / GIB,
        first_kl=rows[0][2],
        last_kl=rows[-1][2],
    )
    del student, teacher
    gc.collect()
    torch.cuda.empty_cache()
    return out


FIDELITY_TEXT = (
    "Problem: A train travels 180 km in 2 hours and then 240 km in 3 hours. What is its average speed? "
    "Solution: The total distance is 180 + 240 = 420 km and the total time is 2 + 3 = 5 hours, so the "
    "average speed is 420 / 5 = 84 km per hour. The answer is \\boxed{84}. "
)
FIDELITY_PASSES = (1, 3, 10)
# How the frozen teacher's forward runs: the production path (distill.step.frozen_forward), plain
# torch.no_grad(), and no_grad followed by TransformerEngine's forward amax/scale update.
GRAD_MODES = ("production", "no_grad", "no_grad+update")


def _forward_in_mode(mode: str, teacher, run) -> torch.Tensor:
    from megatron_sdzero.distill.step import frozen_forward

    if mode == "production":
        with frozen_forward(teacher):
            return run().detach()
    with torch.no_grad():
        out = run()
    if mode == "no_grad+update":
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

        FP8GlobalStateManager.reduce_and_update_fp8_tensors(forward=True)
    return out


def _fidelity(fp8: Precision, arch, seq: int, load, tokens: torch.Tensor, weights: str) -> list[dict]:
    """KL(bf16 || fp8) per token after 1, 3 and 10 forward passes, for each grad mode."""
    from megatron_sdzero.distill.teacher import Teacher, TeacherConfig
    from megatron_sdzero.distill.weights import unwrap
    from megatron_sdzero.training.setup import build_frozen

    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]

    def logits_of(teacher, mode):
        return _forward_in_mode(mode, teacher, lambda: unwrap(teacher.chunks)[0](tokens, positions, None))

    reference = Teacher(build_frozen(arch, model_config(PRECISIONS["bf16"], seq)), TeacherConfig())
    load(reference.chunks)
    exact = logits_of(reference, "no_grad")[..., : arch.vocab_size].float()
    rows = []
    for mode in GRAD_MODES if fp8.recipe == "delayed" else GRAD_MODES[:1]:
        quantised = Teacher(build_frozen(arch, model_config(fp8, seq)), TeacherConfig())
        copy_weights(reference.chunks, quantised.chunks)
        for n in range(1, max(FIDELITY_PASSES) + 1):
            approx = logits_of(quantised, mode)[..., : arch.vocab_size].float()
            if n in FIDELITY_PASSES:
                rows.append(_compare(fp8, exact, approx) | {"mode": mode, "passes": n, "weights": weights})
        del quantised
    del reference
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def teacher_fidelity(fp8: Precision, args, arch) -> list[dict]:
    """Random weights (the student's initialisation), the first synthetic teacher sequence."""
    seq = args.prompt_tokens + 2 * args.response_tokens + DELIM_TOKENS
    tokens = synthetic_batch(args, arch.vocab_size, seed=7).teacher_tokens[:1].cuda()

    def load(chunks) -> None:  # the seeded initialisation of build_frozen is the weights
        del chunks

    return _fidelity(fp8, arch, seq, load, tokens, "random init")


def checkpoint_fidelity(fp8: Precision, checkpoint_dir: str, num_tokens: int) -> list[dict]:
    """A trained model's weights over ``num_tokens`` tokens of real text."""
    from transformers import AutoTokenizer

    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.training import checkpoint

    root = Path(checkpoint_dir)
    arch = ModelMeta.read(root).arch
    tokenizer = AutoTokenizer.from_pretrained(str(root / "hf"))
    ids = tokenizer(FIDELITY_TEXT * (1 + 4 * num_tokens // len(FIDELITY_TEXT)))["input_ids"][:num_tokens]
    tokens = torch.tensor(ids, device="cuda")[None]
    return _fidelity(
        fp8, arch, tokens.shape[1], lambda chunks: checkpoint.finetune_from(root, chunks), tokens, str(root)
    )


def _compare(fp8: Precision, exact: torch.Tensor, approx: torch.Tensor) -> dict:
    log_p, log_q = exact.log_softmax(-1), approx.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return dict(
        teacher=fp8.name,
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        logits_rel_l2=float((approx - exact).norm() / exact.norm()),
        top1_agreement=float((exact.argmax(-1) == approx.argmax(-1)).float().mean()),
    )


def print_tables(rows: list[dict], fidelity: list[dict]) -> None:
    print(f"{'student/teacher':<26} {'step ms':>9} {'teacher ms':>11} {'student ms':>11} {'tokens/s':>10} "
          f"{'TFLOP/s/GPU':>12} {'peak GiB':>9} {'KL first->last':>18}")  # fmt: skip
    for r in rows:
        name = f"{r.get('student')}/{r.get('teacher')}"
        if "error" in r:
            print(f"{name:<26} failed: {r['error']}")
            continue
        print(
            f"{name:<26} {r['step_ms']:>9.1f} {r['teacher_ms']:>11.1f} {r['student_ms']:>11.1f} "
            f"{r['tokens_per_s']:>10.0f} {r['tflops_per_gpu']:>12.1f} {r['peak_memory_gib']:>9.1f} "
            f"{r['first_kl']:>8.4f} -> {r['last_kl']:<8.4f}"
        )
    print()
    weights = fidelity[0].get("weights", "") if fidelity else ""
    print(f"teacher fidelity ({weights}):")
    print(
        f"{'FP8 teacher':<18} {'KL(bf16||fp8) mean':>19} {'max':>9} {'logits rel L2':>14} {'top-1 agree':>12}"
    )
    for f in fidelity:
        if "error" in f:
            print(f"{f['teacher']:<18} failed: {f['error']}")
            continue
        print(
            f"{f['teacher']:<18} {f['kl_mean']:>19.2e} {f['kl_max']:>9.2e} {f['logits_rel_l2']:>14.4f} "
            f"{f['top1_agreement']:>12.4f}"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-layers", default="auto", help="'auto' (36 on >=120 GiB GPUs, else 16) or a number"
    )
    parser.add_argument("--samples", type=int, default=8, help="samples per step and data-parallel rank")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=1536)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["bf16/bf16", "bf16/fp8", "fp8/fp8"])
    parser.add_argument("--fidelity", nargs="*", default=["fp8", "fp8-tensorwise", "fp8-blockwise"])
    parser.add_argument("--fidelity-checkpoint", help="converted Megatron checkpoint of a trained model")
    parser.add_argument("--fidelity-tokens", type=int, default=1024)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--json", help="default: $OUT/bench_distill_step.json when OUT is set")
    args = parser.parse_args(argv)
    for variant in args.variants:
        parts = variant.split("/")
        if len(parts) != 2 or any(p not in PRECISIONS for p in parts):
            parser.error(
                f"--variants: {variant!r} is not STUDENT/TEACHER with each one of {sorted(PRECISIONS)}"
            )
    for name in args.fidelity:
        if name not in PRECISIONS or name == "bf16":
            parser.error(f"--fidelity: {name!r} is not an FP8 precision")
    args.packing = 1  # for bench_sft.environment
    args.seq_length = args.prompt_tokens + 2 * args.response_tokens + DELIM_TOKENS
    args.num_microbatches = args.samples // args.micro_batch_size
    args.recompute = "none"
    args.peak_tflops = 989.0
    return args


def _error(err: Exception) -> str:
    gc.collect()
    torch.cuda.empty_cache()
    return f"{type(err).__name__}: {err}"[:400]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_distill_step.py needs a CUDA GPU and TransformerEngine", file=sys.stderr)
        return 2
    from megatron_sdzero.runtime.distributed import (
        ParallelConfig,
        destroy_model_parallel,
        init_model_parallel,
    )

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    init_model_parallel(ParallelConfig(tp=args.tp), seed=1234)
    arch = qwen3_4b_shape(auto_layers() if args.num_layers == "auto" else int(args.num_layers))
    env = environment(args, arch)
    last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    if last:
        print(json.dumps(env), flush=True)
    rows, fidelity = [], []
    for variant in args.variants:
        student_name, teacher_name = variant.split("/")
        try:
            rows.append(run_variant(PRECISIONS[student_name], PRECISIONS[teacher_name], args, arch))
        except Exception as err:  # a recipe this TE or GPU does not support: report, go on
            rows.append(dict(student=student_name, teacher=teacher_name, error=_error(err)))
        if last:
            print(json.dumps(rows[-1]), flush=True)
    for name in args.fidelity:
        try:
            if args.fidelity_checkpoint:
                found = checkpoint_fidelity(PRECISIONS[name], args.fidelity_checkpoint, args.fidelity_tokens)
            else:
                found = teacher_fidelity(PRECISIONS[name], args, arch)
        except Exception as err:
            found = [dict(teacher=name, error=_error(err))]
        fidelity += found
        if last:
            for row in found:
                print(json.dumps(row), flush=True)
    if last:
        print()
        print_tables(rows, fidelity)
        target = args.json or (
            os.path.join(os.environ["OUT"], "bench_distill_step.json") if os.environ.get("OUT") else None
        )
        if target:
            Path(target).write_text(json.dumps({"env": env, "results": rows, "fidelity": fidelity}, indent=2))
    destroy_model_parallel()
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
