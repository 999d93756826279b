#!/usr/bin/env python3
"""GPU parity of the SFT step: TP=2, PP=2 and DP=2 follow the 1-GPU losses (and packed THD attention
equals per-sample attention).

    PYTHONPATH=$PWD python3 tools/parity_sft.py [--steps 5] [--workdir DIR] [--transformer-impl local]

Makes a small Qwen3-shaped HF model offline (hidden 512, 8 layers, 8 heads / 4 KV groups, untied
embeddings), converts it, writes demo SFT records, then launches one ``torchrun`` per layout
(1 GPU, then 2 GPUs for tp2 / pp2 / dp2), each running ``--steps`` real optimizer steps on the same
data plan from the same weights (TransformerEngine spec by default, distributed optimizer, clipping):

- float32, unpacked rows (plain causal attention): every layout's loss must match 1 GPU within
  ``--fp32-rtol`` at every step;
- bfloat16, packed rows (THD varlen attention through TE): within ``--bf16-rtol``;
- ``packcheck`` (1 GPU, bf16): the logits of three samples packed into one THD row against each
  sample alone.

``--transformer-impl local`` (a GPU box without TransformerEngine): the float32 layouts on Megatron's
local layer spec; the bfloat16 packed-THD layouts and packcheck need TE and are reported as skipped.

Prints a table, writes ``$OUT/parity_sft.json`` when OUT is set, exits 1 on a mismatch. Needs 2 GPUs
for the 2-GPU layouts (they are skipped, and reported so, with fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2)}
TE_ONLY = "needs TransformerEngine (--transformer-impl local)"


# --- worker (inside torchrun) ---------------------------------------------------------------------


def _train(args) -> dict:
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.config import TrainConfig
    from megatron_sdzero.training.forward import make_sft_forward_step
    from megatron_sdzero.training.packing import attention_format, schedule_shape
    from megatron_sdzero.training.setup import setup_trainable
    from megatron_sdzero.training.sft_data import SFTDataConfig, SFTDataset, collate_rows, make_plan
    from megatron_sdzero.training.step import train_step

    tp, pp, _ = LAYOUTS[args.layout]
    init_model_parallel(ParallelConfig(tp=tp, pp=pp), seed=11)
    work = Path(args.workdir)
    arch = ModelMeta.read(work / f"mc_{args.dtype}").arch
    packing = args.dtype == "bfloat16"
    data = SFTDataConfig(seq_length=512, packing=packing, pad_to_multiple_of=64)
    dataset = SFTDataset.from_jsonl(
        work / "data" / "stage1.jsonl", AutoTokenizer.from_pretrained(work / "hf"), data
    )
    train = TrainConfig(
        lr=1e-4,
        warmup_steps=1,
        train_iters=args.steps,
        epochs=None,
        global_batch_size=8,
        micro_batch_size=2,
        clip_grad=1.0,
        weight_decay=0.01,
    )
    model_cfg = ModelConfig(params_dtype=args.dtype, transformer_impl=args.transformer_impl)  # type: ignore[arg-type]
    overrides = {"variable_seq_lengths": True} if pp > 1 and not packing else {}
    trainable = setup_trainable(arch, model_cfg, train, args.steps, **overrides)
    checkpoint.finetune_from(work / f"mc_{args.dtype}", trainable)
    plan = make_plan(dataset.lengths, data, seed=3, global_batch_size=8, epochs=None, train_iters=args.steps)
    attention = attention_format(packing, transformer_engine=args.transformer_impl == "transformer_engine")
    seq, mbs = schedule_shape(attention, 2, data.seq_length)
    forward_step = make_sft_forward_step(attention, arch.vocab_size)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    losses = []
    for iteration in range(args.steps):
        groups = plan.rank_micro_batches(iteration, dp_rank, dp, 2)
        micro = [collate_rows(dataset.samples, rows, data) for rows in groups]
        result = train_step(
            forward_step,
            iter(micro),
            trainable.model,
            trainable.optimizer,
            trainable.scheduler,
            num_microbatches=len(micro),
            seq_length=seq,
            micro_batch_size=mbs,
        )
        losses.append(result.loss)
    return {"layout": args.layout, "dtype": args.dtype, "loss": losses}


def _packcheck(args) -> dict:
    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.losses import masked_cross_entropy
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.forward import run_model
    from megatron_sdzero.training.packing import collate
    from megatron_sdzero.training.setup import build_frozen

    init_model_parallel(ParallelConfig(), seed=11)
    mcore = Path(args.workdir) / "mc_bfloat16"
    arch = ModelMeta.read(mcore).arch
    (model,) = build_frozen(arch, ModelConfig(params_dtype="bfloat16", transformer_impl="transformer_engine"))
    checkpoint.finetune_from(mcore, [model])
    generator = torch.Generator().manual_seed(0)
    samples = [
        (torch.randint(0, arch.vocab_size, (n + 1,), generator=generator).tolist(), [1] * (n + 1))
        for n in (200, 120, 160)
    ]

    def run(batch, attention):
        with torch.no_grad():
            logits, inputs = run_model(model, batch, attention)
            loss, _ = masked_cross_entropy(
                logits.float(),
                inputs.labels,
                inputs.loss_mask,
                valid_vocab_size=arch.vocab_size,
                reduction="sum",
            )
        return logits.float().reshape(-1, logits.shape[-1]), float(loss)

    packed_logits, packed_loss = run(collate([samples], 512), "thd")
    alone_loss, errors, offset = 0.0, [], 0
    for sample in samples:
        n = len(sample[0]) - 1
        logits, loss = run(collate([[sample]], n), "causal")
        alone_loss += loss
        part = packed_logits[offset : offset + n]
        errors.append(float((part - logits).norm() / logits.norm()))
        offset += n
    return {
        "layout": "packcheck",
        "dtype": "bfloat16",
        "rel_l2_logits": errors,
        "packed_loss": packed_loss,
        "alone_loss": alone_loss,
    }


def worker(args) -> int:
    result = _packcheck(args) if args.layout == "packcheck" else _train(args)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        Path(args.result).write_text(json.dumps(result))
    from megatron_sdzero.runtime.distributed import destroy_model_parallel

    destroy_model_parallel()
    return 0


# --- driver ---------------------------------------------------------------------------------------


def prepare(work: Path, dtypes: tuple[str, ...]) -> None:
    from megatron_sdzero.assets.tiny import make_tiny_model
    from megatron_sdzero.conversion.convert import hf_to_mcore
    from megatron_sdzero.training.demo_data import write_demo_data

    if not (work / "hf").is_dir():
        make_tiny_model(
            work / "hf",
            "qwen3",
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            num_kv_heads=4,
            head_dim=64,
            intermediate_size=1536,
            tie_word_embeddings=False,
            initializer_range=0.05,
            seed=1,
        )
    for dtype in dtypes:
        if not (work / f"mc_{dtype}").is_dir():
            hf_to_mcore(work / "hf", work / f"mc_{dtype}", params_dtype=dtype)
    write_demo_data(work / "hf", work / "data", n=96)


def launch(work: Path, layout: str, dtype: str, steps: int, transformer_impl: str) -> dict:
    gpus = 1 if layout == "packcheck" else LAYOUTS[layout][2]
    result = work / f"result_{layout}_{dtype}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={gpus}",
        __file__,
        "--worker",
        "--layout",
        layout,
        "--dtype",
        dtype,
        "--steps",
        str(steps),
        "--workdir",
        str(work),
        "--result",
        str(result),
        "--transformer-impl",
        transformer_impl,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    log_dir = Path(os.environ.get("OUT") or work)
    (log_dir / f"parity_{layout}_{dtype}.log").write_text(log)
    if done.returncode != 0:
        return {"layout": layout, "dtype": dtype, "error": first_traceback(log)}
    return json.loads(result.read_text())


def first_traceback(log: str, limit: int = 3000) -> str:
    """The first Python traceback of a worker log (torchrun's own summary comes last and says little)."""
    start = log.find("Traceback (most recent call last)")
    if start < 0:
        return log[-limit:]
    end = log.find("\n\n", start)
    return log[start : end if end > 0 else start + limit][:limit]


def compare(rows: list[dict], rtol: dict[str, float]) -> bool:
    ok = True
    reference = {r["dtype"]: r["loss"] for r in rows if r.get("layout") == "tp1" and "loss" in r}
    print(f"{'layout':<10} {'dtype':<9} {'max rel diff vs 1 GPU':>22}  losses")
    for r in rows:
        if "error" in r or "skipped" in r:
            print(
                f"{r['layout']:<10} {r['dtype']:<9} {'-':>22}  {r.get('skipped') or 'FAILED: ' + r['error']}"
            )
            ok = ok and "skipped" in r
            continue
        if r["layout"] == "packcheck":
            worst = max(r["rel_l2_logits"])
            loss_rel = abs(r["packed_loss"] - r["alone_loss"]) / abs(r["alone_loss"])
            good = worst < rtol["packcheck"] and loss_rel < rtol["bfloat16"]
            r["ok"] = good
            print(
                f"{'packcheck':<10} {'bfloat16':<9} {worst:>22.2e}  logits rel-L2 per sample "
                f"{[f'{e:.1e}' for e in r['rel_l2_logits']]}; loss rel diff {loss_rel:.1e}"
            )
            ok = ok and good
            continue
        ref = reference[r["dtype"]]
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["loss"], ref, strict=True))
        r["max_rel_diff"], r["ok"] = diff, diff <= rtol[r["dtype"]]
        ok = ok and r["ok"]
        print(f"{r['layout']:<10} {r['dtype']:<9} {diff:>22.2e}  {[round(x, 5) for x in r['loss']]}")
    return ok


def run_or_skip(work: Path, layout: str, dtype: str, args: argparse.Namespace, gpus: int) -> dict:
    """One layout's result, or a row saying why it was not run."""
    need = 1 if layout == "packcheck" else LAYOUTS[layout][2]
    if dtype == "bfloat16" and args.transformer_impl != "transformer_engine":
        return {"layout": layout, "dtype": dtype, "skipped": TE_ONLY}
    if need > gpus:
        return {"layout": layout, "dtype": dtype, "skipped": f"needs {need} GPUs, have {gpus}"}
    return launch(work, layout, dtype, args.steps, args.transformer_impl)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir")
    parser.add_argument("--fp32-rtol", type=float, default=1e-4)
    parser.add_argument("--bf16-rtol", type=float, default=2e-2)
    parser.add_argument("--packcheck-rtol", type=float, default=2e-2)
    parser.add_argument(
        "--transformer-impl",
        choices=("transformer_engine", "local"),
        default="transformer_engine",
        help="local: float32 layouts only (no TransformerEngine needed)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=[*LAYOUTS, "packcheck"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not torch.cuda.is_available():
        print("parity_sft.py needs CUDA GPUs", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    te = args.transformer_impl == "transformer_engine"
    if not te:
        print("--transformer-impl local: float32 layouts only; bfloat16 packed THD and packcheck need TE")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepare(work, ("float32", "bfloat16") if te else ("float32",))
        rows = [run_or_skip(work, "packcheck", "bfloat16", args, gpus)]
        for dtype in ("float32", "bfloat16"):
            rows += [run_or_skip(work, layout, dtype, args, gpus) for layout in LAYOUTS]
        ok = compare(
            rows, {"float32": args.fp32_rtol, "bfloat16": args.bf16_rtol, "packcheck": args.packcheck_rtol}
        )
        env = dict(
            device=torch.cuda.get_device_name(),
            gpus=gpus,
            torch=torch.__version__,
            steps=args.steps,
            transformer_impl=args.transformer_impl,
        )
        print(json.dumps(env))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "parity_sft.json").write_text(
                json.dumps({"env": env, "rows": rows}, indent=2)
            )
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
