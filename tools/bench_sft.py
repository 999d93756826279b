#!/usr/bin/env python3
"""Training throughput of a Qwen3-4B-shaped model: BF16 and FP8 side by side, one run.

    PYTHONPATH=$PWD python3 tools/bench_sft.py [--num-layers auto] [--seq-length 4096]
        [--micro-batch-size 2] [--num-microbatches 4] [--warmup 3] [--steps 10]
        [--variants bf16 fp8-delayed fp8-tensorwise fp8-blockwise] [--packing 1] [--recompute none]

Each variant builds the model (TransformerEngine spec, random init from the same seed), wraps it in
Megatron DDP with the distributed optimizer (bf16 params, fp32 main params and grads) and runs the
real SFT step: micro-batches through ``get_forward_backward_func``, the masked vocab-parallel
cross-entropy (every target counted), gradient clipping and the AdamW update. After ``--warmup``
untimed steps, ``--steps`` steps are timed (CUDA-synchronised wall clock). Reported per variant:
tokens/s, TFLOP/s per GPU and MFU (Megatron-LM's FLOP count, training/flops.py, over the 989 TFLOP/s
dense BF16 peak of an H100/H200), peak memory, mean step time, first/last loss, and the speed-up
against the first variant.

Shape: hidden 2560, FFN 9728, 32 heads, 8 KV groups, head dim 128, QK-norm, vocab 151936, tied
embeddings (Qwen3-4B has 36 layers). ``--num-layers auto`` takes 36 when the GPU has >= 120 GiB and
16 otherwise (36 layers need ~64 GB of weights, gradients and Adam state before activations: they
do not fit an 80 GB H100 without sharding). ``--packing K`` puts K samples of seq_length/K tokens
into each row (THD varlen attention through TE) instead of one full-length sample.

Prints a table; writes ``$OUT/bench_sft.json`` when ``OUT`` is set (or ``--json PATH``). Runs under
torchrun too (``--tp/--pp``; data parallel over the remaining ranks).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


@dataclass(frozen=True)
class Variant:
    name: str
    fp8: str | None = None
    recipe: str = "delayed"


VARIANTS = {
    "bf16": Variant("bf16"),
    "fp8-delayed": Variant("fp8-delayed", "hybrid", "delayed"),
    "fp8-tensorwise": Variant("fp8-tensorwise", "hybrid", "tensorwise"),
    "fp8-blockwise": Variant("fp8-blockwise", "hybrid", "blockwise"),
    "fp8-mxfp8": Variant("fp8-mxfp8", "hybrid", "mxfp8"),
}


def qwen3_4b_shape(num_layers: int):
    from megatron_sdzero.models.architecture import DecoderArchitecture

    return DecoderArchitecture(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        num_layers=num_layers,
        hidden_size=2560,
        ffn_hidden_size=9728,
        num_attention_heads=32,
        num_query_groups=8,
        head_dim=128,
        vocab_size=151936,
        norm_epsilon=1e-6,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        qk_norm="per_head",
    )


def auto_layers() -> int:
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return 36 if total >= 120 * GIB else 16


def micro_batches(args, vocab: int, seed: int):
    """The same random micro-batches every step: K samples of seq/K tokens per row, all targets."""
    from megatron_sdzero.training.packing import collate

    generator = torch.Generator().manual_seed(seed)
    per_sample = args.seq_length // args.packing
    batches = []
    for _ in range(args.num_microbatches):
        rows = []
        for _ in range(args.micro_batch_size):
            samples = []
            for _ in range(args.packing):
                ids = torch.randint(0, vocab, (per_sample + 1,), generator=generator).tolist()
                samples.append((ids, [1] * (per_sample + 1)))
            rows.append(samples)
        batches.append(collate(rows, args.seq_length))
    return batches


def run_variant(variant: Variant, args, arch) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_sdzero.models.builder import ModelConfig, padded_vocab_size
    from megatron_sdzero.training.config import TrainConfig
    from megatron_sdzero.training.flops import FlopsModel, mfu, tflops_per_gpu
    from megatron_sdzero.training.forward import make_sft_forward_step
    from megatron_sdzero.training.packing import attention_format, schedule_shape
    from megatron_sdzero.training.setup import setup_trainable
    from megatron_sdzero.training.step import train_step

    torch.cuda.reset_peak_memory_stats()
    dp = ps.get_data_parallel_world_size()
    steps = args.warmup + args.steps
    model_cfg = ModelConfig(
        params_dtype="bfloat16",
        transformer_impl="transformer_engine",
        fp8=variant.fp8,  # type: ignore[arg-type]
        fp8_recipe=variant.recipe,  # type: ignore[arg-type]
        recompute=args.recompute,
        max_sequence_length=args.seq_length,
    )
    train = TrainConfig(
        lr=1e-5,
        min_lr=1e-5,
        lr_schedule="constant",
        warmup_steps=0,
        train_iters=steps,
        epochs=None,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.micro_batch_size * args.num_microbatches * dp,
        overlap_grad_reduce=dp > 1,
    )
    overrides = {"gradient_accumulation_fusion": True} if args.grad_accum_fusion else {}
    trainable = setup_trainable(arch, model_cfg, train, steps, **overrides)
    attention = attention_format(args.packing > 1, transformer_engine=True)
    seq, mbs = schedule_shape(attention, args.micro_batch_size, args.seq_length)
    forward_step = make_sft_forward_step(attention, arch.vocab_size)
    batches = micro_batches(args, arch.vocab_size, seed=1000 + ps.get_data_parallel_rank())

    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        data = iter(batches) if len(trainable.model) == 1 else [iter(batches) for _ in trainable.model]
        result = train_step(
            forward_step,
            data,
            trainable.model,
            trainable.optimizer,
            trainable.scheduler,
            num_microbatches=len(batches),
            seq_length=seq,
            micro_batch_size=mbs,
        )
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(result.loss)

    timed = times[args.warmup :]
    seconds = sum(timed) / len(timed)
    world = torch.distributed.get_world_size()
    per_sample = args.seq_length // args.packing
    lengths = [per_sample] * (args.packing * args.micro_batch_size * args.num_microbatches * dp)
    flops = FlopsModel.from_arch(arch, padded_vocab_size(arch.vocab_size, 128, 1)).step_flops(lengths)
    tokens = sum(lengths)
    row = dict(
        variant=variant.name,
        fp8=variant.fp8,
        fp8_recipe=variant.recipe if variant.fp8 else None,
        step_ms=1000 * seconds,
        step_ms_min=1000 * min(timed),
        tokens_per_step=tokens,
        tokens_per_s=tokens / seconds,
        tokens_per_s_per_gpu=tokens / seconds / world,
        tflops_per_gpu=tflops_per_gpu(flops, seconds, world),
        mfu=mfu(flops, seconds, world, args.peak_tflops),
        peak_memory_gib=torch.cuda.max_memory_allocated() / GIB,
        first_loss=losses[0],
        last_loss=losses[-1],
        skipped_steps=0,
    )
    del trainable, batches
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _failed(variant: Variant, err: Exception) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    return dict(variant=variant.name, fp8=variant.fp8, error=f"{type(err).__name__}: {err}"[:400])


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if "error" not in r), None)
    header = (
        f"{'variant':<16} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s/GPU':>12} {'MFU':>7} "
        f"{'peak GiB':>9} {'vs ' + (base['variant'] if base else '-'):>10} {'loss first->last':>18}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<16} unsupported/failed: {r['error']}")
            continue
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['variant']:<16} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11.0f} "
            f"{r['tflops_per_gpu']:>12.1f} {100 * r['mfu']:>6.1f}% {r['peak_memory_gib']:>9.1f} "
            f"{speedup:>9.2f}x "
            f"{r['first_loss']:>8.3f} -> {r['last_loss']:<7.3f}"
        )


def environment(args, arch) -> dict:
    import megatron.core

    try:
        import transformer_engine

        te = transformer_engine.__version__
    except ImportError:
        te = None
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        device=torch.cuda.get_device_name(),
        gpus=torch.distributed.get_world_size(),
        torch=torch.__version__,
        transformer_engine=te,
        megatron_core=megatron.core.__version__,
        num_layers=arch.num_layers,
        params=arch.num_params,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        packing=args.packing,
        recompute=args.recompute,
        peak_tflops=args.peak_tflops,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-layers", default="auto", help="'auto' (36 on >=120 GiB GPUs, else 16) or a number"
    )
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--packing", type=int, default=1, help="samples per row (>1: THD varlen attention)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["bf16", "fp8-delayed", "fp8-tensorwise", "fp8-blockwise"],
        choices=sorted(VARIANTS),
    )
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument(
        "--grad-accum-fusion", action="store_true", help="fuse wgrad accumulation (needs TE/apex)"
    )
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak per GPU")
    parser.add_argument("--json", help="write results here (default: $OUT/bench_sft.json when OUT is set)")
    args = parser.parse_args(argv)
    if args.seq_length % args.packing:
        parser.error("--seq-length must be divisible by --packing")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_sft.py needs a CUDA GPU (FP8 needs TransformerEngine on Hopper or newer)", file=sys.stderr
        )
        return 2
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    init_model_parallel(ParallelConfig(tp=args.tp, pp=args.pp), seed=1234)
    arch = qwen3_4b_shape(auto_layers() if args.num_layers == "auto" else int(args.num_layers))
    env = environment(args, arch)
    last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    if last:
        print(json.dumps(env))
    rows = []
    for name in args.variants:
        variant = VARIANTS[name]
        try:
            rows.append(run_variant(variant, args, arch))
        except Exception as err:  # an FP8 recipe this TE or GPU does not support: report, go on
            rows.append(_failed(variant, err))
        if last:
            print(json.dumps(rows[-1]), flush=True)
    if last:
        print()
        print_table(rows)
        target = args.json or (
            os.path.join(os.environ["OUT"], "bench_sft.json") if os.environ.get("OUT") else None
        )
        if target:
            Path(target).write_text(json.dumps({"env": env, "results": rows}, indent=2))
    from megatron_sdzero.runtime.distributed import destroy_model_parallel

    destroy_model_parallel()
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
