"""GPU check: the TransformerEngine OLMo-3 layer spec matches the local spec and transformers in bf16.

A tiny OLMo-3 checkpoint (3 sliding-window layers + 1 full-attention layer with YaRN RoPE, GQA;
window 32 and YaRN's original context 64, both shorter than the 128 tokens) is made offline and
converted; the same Megatron checkpoint is loaded into a local-spec and a TE-spec model (bf16) and
their logits are compared with each other and with transformers (bf16 weights, computed in bf16
and in fp32). The TE model then runs an FP8 forward and backward for each recipe the installed TE
supports (reported, not required), and two sequences packed as THD must give the logits of each
on its own (error < 2e; on CPU a window reaching across the boundary moved logits by up to 7).

    PYTHONPATH=$PWD python3 tools/check_olmo3_te.py [--out results.json]

Tolerances, on the relative L2 error of the logits, as multiples of e = error of transformers in
bf16 against transformers in fp32 (about 1e-2 here; e itself must be < 5e-2): the local and TE models
in bf16 against fp32 transformers < 2e; TE against the local model and against bf16 transformers
< 3e. Measured on CPU (local spec, bf16): e = 1.1e-2, local vs fp32 1.2e-2; with a window one token
too wide 0.21, without the YaRN layer's frequencies 0.051, without its attention factor 0.039.
Needs a CUDA GPU, megatron-core and transformer-engine. Exits 1 if a check fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tools.check_te import FP8_REL_TOL, fp8_train_step, load, logits, relative_error, run_gpu_checks

SEQ = 128


def build(root: Path) -> tuple[Path, Path]:
    from megatron_sdzero.assets.tiny_olmo3 import make_tiny_olmo3
    from megatron_sdzero.conversion.convert import hf_to_mcore

    hf_dir = make_tiny_olmo3(
        root / "olmo3", hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32, intermediate_size=512,
        sliding_window=32, yarn_original_context=64, initializer_range=0.05, dtype="bfloat16", seed=1,
    )  # fmt: skip
    return hf_dir, hf_to_mcore(hf_dir, root / "olmo3_mcore")


def hf_logits(hf_dir: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).cuda().eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def packed_vs_separate(model, first: torch.Tensor, second: torch.Tensor) -> float:
    """Relative error between two sequences packed as THD (cu_seqlens) and each run on its own."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [len(first), len(second)]
    bounds = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=first.device)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
        max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths),
    )  # fmt: skip
    positions = [torch.arange(n, device=first.device) for n in lengths]
    model.eval()
    with torch.no_grad():
        packed = torch.cat([first, second]).unsqueeze(0)
        together = model(packed, torch.cat(positions).unsqueeze(0), None, packed_seq_params=params)[0]
        alone = [
            model(t.unsqueeze(0), pos.unsqueeze(0), None)[0]
            for t, pos in zip((first, second), positions, strict=True)
        ]
    return relative_error(together.float(), torch.cat(alone).float())


def check(root: Path, results: list[dict]) -> None:
    hf_dir, ckpt = build(root)
    local, meta = load(ckpt, "local")
    te, _ = load(ckpt, "transformer_engine")
    vocab = meta.arch.vocab_size
    tokens = torch.randint(0, vocab, (4, SEQ), generator=torch.Generator().manual_seed(0)).cuda()
    hf_bf16, hf_fp32 = hf_logits(hf_dir, tokens, torch.bfloat16), hf_logits(hf_dir, tokens, torch.float32)
    local_logits, te_logits = logits(local, tokens, vocab), logits(te, tokens, vocab)
    # bf16 itself moves these logits by about 1% (measured on CPU: transformers bf16 vs fp32), so the
    # bounds are multiples of transformers' own bf16 error rather than a fixed number.
    yardstick = relative_error(hf_bf16, hf_fp32)
    results.append(dict(check="HF bf16 vs HF fp32 (yardstick)", rel_error=yardstick, ok=yardstick < 5e-2))
    for name, ours, ref, factor in (
        ("local (bf16) vs HF (fp32)", local_logits, hf_fp32, 2),
        ("TE (bf16) vs HF (fp32)", te_logits, hf_fp32, 2),
        ("TE vs HF (both bf16)", te_logits, hf_bf16, 3),
        ("TE vs local (both bf16)", te_logits, local_logits, 3),
    ):
        error = relative_error(ours, ref)
        results.append(
            dict(check=name, rel_error=error, bound=factor * yardstick, ok=error < factor * yardstick)
        )
    # Packed sequences (SFT packing on TE): 80 + 48 tokens, both longer than the window.
    error = packed_vs_separate(te, tokens[0, :80], tokens[1, :48])
    packed = dict(check="TE packed THD vs separate", rel_error=error, bound=2 * yardstick)
    results.append(dict(**packed, ok=error < 2 * yardstick))
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        try:
            fp8_model, _ = load(ckpt, "transformer_engine", fp8="hybrid", fp8_recipe=recipe)
            error = relative_error(logits(fp8_model, tokens, vocab), te_logits)
            loss, finite = fp8_train_step(fp8_model, tokens)
            row = dict(rel_error=error, loss=loss, finite_grads=finite, within=error < FP8_REL_TOL and finite)
        except Exception as err:  # an FP8 recipe the installed TE or this GPU does not support
            row = dict(unsupported=f"{type(err).__name__}: {err}"[:300])
        results.append(dict(check=f"FP8 {recipe} fwd+bwd", **row))


def main() -> int:
    return run_gpu_checks("check_olmo3_te.py", check)


if __name__ == "__main__":
    sys.exit(main())
