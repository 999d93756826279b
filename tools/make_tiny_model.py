#!/usr/bin/env python3
"""Write a tiny random HF checkpoint (Qwen3 or Llama) with a ChatML BPE tokenizer; no network.

python tools/make_tiny_model.py outputs/tiny-qwen3 --family qwen3 --untied
python tools/make_tiny_model.py outputs/tiny-llama --family llama --num-layers 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from megatron_sdzero.assets.tiny import DEFAULT_TOKENIZER_VOCAB, make_tiny_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=("qwen3", "llama"), default="qwen3")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--untied", action="store_true", help="separate lm_head (default: tied embeddings)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer size")
    parser.add_argument("--pad-vocab-to-multiple-of", type=int, default=1)
    parser.add_argument("--tokenizer-vocab-size", type=int, default=DEFAULT_TOKENIZER_VOCAB)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--rope-theta", type=float, default=None, help="default: 1e6 (qwen3), 1e5 (llama)")
    parser.add_argument("--initializer-range", type=float, default=0.02)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = make_tiny_model(
        args.out_dir,
        args.family,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        tie_word_embeddings=not args.untied,
        vocab_size=args.vocab_size,
        pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of,
        tokenizer_vocab_size=args.tokenizer_vocab_size,
        seed=args.seed,
        dtype=args.dtype,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta,
        initializer_range=args.initializer_range,
    )
    print(out)


if __name__ == "__main__":
    main()
