"""GPU check: the TransformerEngine layer spec matches the local spec, and FP8 trains.

For each family (Qwen3 with QK-norm, Llama), a tiny HF checkpoint is made offline and converted;
the same Megatron checkpoint is loaded into a local-spec model and a TE-spec model (bf16), and
their logits are compared with each other and with transformers. Then the TE model runs an FP8
forward and backward for each recipe the installed TE supports.

    PYTHONPATH=$PWD python3 tools/check_te.py [--out results.json]

Needs a CUDA GPU, megatron-core and transformer-engine. Prints one line per check and exits 1 if
any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

BF16_REL_TOL = 2e-2  # bf16 operands: relative L2 error of the logits between 1e-3 and 1e-2 is normal
# FP8 against the bf16 TE model: e4m3 keeps 3 mantissa bits (up to 2^-4 relative rounding per operand);
# over 4 layers and the output layer of a random tiny model the logits moved by 0.146-0.167 on an H100.
FP8_REL_TOL = 0.25


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


def build_pair(root: Path, family: str):
    from megatron_sdzero.assets.tiny import make_tiny_model
    from megatron_sdzero.conversion.convert import hf_to_mcore

    hf_dir = make_tiny_model(
        root / family, family=family, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
        intermediate_size=512, initializer_range=0.05, dtype="bfloat16", seed=1,
    )  # fmt: skip
    return hf_dir, hf_to_mcore(hf_dir, root / f"{family}_mcore")


def load(ckpt: Path, impl: str, fp8: str | None = None, fp8_recipe: str = "delayed"):
    from megatron_sdzero.conversion.megatron_io import ModelMeta, load_weights, resolve_checkpoint
    from megatron_sdzero.models.builder import build_gpt_model

    root, ckpt_dir = resolve_checkpoint(ckpt)
    meta = ModelMeta.read(root)
    model_cfg = meta.model_config()
    model_cfg.transformer_impl = impl
    model_cfg.fp8, model_cfg.fp8_recipe = fp8, fp8_recipe
    model = build_gpt_model(meta.arch, model_cfg)
    load_weights(model, ckpt_dir)
    return model, meta


def logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    from megatron_sdzero.models.inference import forward_logits

    model.eval()
    with torch.no_grad():
        return forward_logits(model, tokens, vocab).float()


def fp8_train_step(model, tokens: torch.Tensor) -> tuple[float, bool]:
    model.train()
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    labels = tokens.roll(-1, dims=1)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return float(loss), bool(grads_finite)


def check_family(root: Path, family: str, results: list[dict]) -> None:
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = build_pair(root, family)
    local, meta = load(ckpt, "local")
    te, _ = load(ckpt, "transformer_engine")
    vocab = meta.arch.vocab_size
    tokens = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0)).cuda()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        reference = hf(tokens).logits.float()
    local_logits, te_logits = logits(local, tokens, vocab), logits(te, tokens, vocab)
    for name, ours, ref in (
        ("local vs HF (bf16)", local_logits, reference),
        ("TE vs HF (bf16)", te_logits, reference),
        ("TE vs local (bf16)", te_logits, local_logits),
    ):
        error = relative_error(ours, ref)
        results.append(dict(family=family, check=name, rel_error=error, ok=error < BF16_REL_TOL))
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        try:
            fp8_model, _ = load(ckpt, "transformer_engine", fp8="hybrid", fp8_recipe=recipe)
            error = relative_error(logits(fp8_model, tokens, vocab), te_logits)
            loss, finite = fp8_train_step(fp8_model, tokens)
            ok = error < FP8_REL_TOL and finite
            row = dict(rel_error=error, loss=loss, ok=ok)
        except Exception as err:  # an FP8 recipe the installed TE or this GPU does not support
            row = dict(unsupported=f"{type(err).__name__}: {err}"[:300])
        results.append(dict(family=family, check=f"FP8 {recipe} fwd+bwd", **row))


def run_gpu_checks(script: str, checks) -> int:
    """The shared frame of the GPU check scripts: args, process group, results, JSON, exit code."""
    parser = argparse.ArgumentParser(prog=script)
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformer_engine

    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig())
    results: list[dict] = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        checks(Path(tmp), results)
    env = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, te=transformer_engine.__version__,
        seconds=round(time.time() - start, 1),
    )  # fmt: skip
    for row in results:
        print(json.dumps(row))
    print(json.dumps(env))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 1 if any(r.get("ok") is False for r in results) else 0


def check_both_families(root: Path, results: list[dict]) -> None:
    for family in ("qwen3", "llama"):
        check_family(root, family, results)


def main() -> int:
    return run_gpu_checks("check_te.py", check_both_families)


if __name__ == "__main__":
    sys.exit(main())
