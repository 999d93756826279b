"""``sdzero convert hf-to-mcore SRC DST --tp N --pp M`` and ``sdzero convert mcore-to-hf SRC DST``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from megatron_sdzero.errors import run_reporting_user_errors


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdzero convert", description="HF <-> Megatron-Core checkpoints")
    sub = parser.add_subparsers(dest="direction", required=True)

    to_mcore = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron distributed checkpoint")
    to_mcore.add_argument("src", help="HF checkpoint directory (config.json, *.safetensors, tokenizer)")
    to_mcore.add_argument("dst", help="new Megatron checkpoint directory")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel layout to write (default 1)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel layout to write (default 1)")
    to_mcore.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype (default: the HF weights')",
    )
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_mcore.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    to_hf = sub.add_parser("mcore-to-hf", help="Megatron checkpoint (conversion or training) -> HF directory")
    to_hf.add_argument(
        "src", help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_* dir"
    )
    to_hf.add_argument("dst", help="new HF directory")
    to_hf.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    return parser


def _convert(args: argparse.Namespace) -> int:
    from megatron_sdzero.conversion.convert import hf_to_mcore, mcore_to_hf

    if args.direction == "hf-to-mcore":
        hf_to_mcore(
            args.src,
            args.dst,
            tp=args.tp,
            pp=args.pp,
            params_dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            overwrite=args.overwrite,
        )
    else:
        mcore_to_hf(
            args.src, args.dst, dtype=args.dtype, max_shard_gb=args.max_shard_gb, overwrite=args.overwrite
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_reporting_user_errors("sdzero convert", _convert, args)
