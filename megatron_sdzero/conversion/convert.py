"""The two conversions as functions: ``hf_to_mcore`` and ``mcore_to_hf``.

Both check their input before doing any work, write into a staging directory beside the
destination and rename it into place at the end: a failure leaves nothing at DST.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from megatron_sdzero.checks import PHRASES_FILE
from megatron_sdzero.conversion.hf_io import HFWeights, copy_assets
from megatron_sdzero.conversion.megatron_io import (
    TRACKER,
    ModelMeta,
    check_destination,
    hf_dtype_name,
    hf_to_mcore_rank,
    mcore_to_hf_rank,
    publish,
    resolve_checkpoint,
    staging_dir,
    validate_hf_checkpoint,
    write_hf_config,
)
from megatron_sdzero.errors import UserError
from megatron_sdzero.models.architecture import architecture_from_hf, read_hf_config
from megatron_sdzero.models.builder import DTYPES, padded_vocab_size
from megatron_sdzero.runtime.launch import run_on_ranks


class ConversionError(UserError, ValueError):
    """A conversion's options do not fit the checkpoint (the message says which and why)."""


def check_layout(arch, tp: int, pp: int) -> None:
    """The tensor/pipeline split must cut heads, query groups and layers evenly."""
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    if arch.num_layers < pp:
        raise ConversionError(f"--pp {pp} is larger than the number of layers ({arch.num_layers})")
    for name, count in (("attention heads", arch.num_attention_heads), ("KV heads", arch.num_query_groups)):
        if count % tp:
            divisors = [d for d in range(1, count + 1) if count % d == 0]
            raise ConversionError(
                f"--tp {tp} does not divide the model's {count} {name}; use one of {divisors}"
            )


def hf_to_mcore(
    src: str | Path,
    dst: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> Path:
    src, dst = Path(src), Path(dst)
    check_destination(dst, overwrite)
    hf_config = read_hf_config(src)
    arch = architecture_from_hf(hf_config)
    check_layout(arch, tp, pp)
    padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tp)  # fails early on a bad tp
    weights = HFWeights(src)
    validate_hf_checkpoint(src, arch, weights)
    dtype = params_dtype or hf_dtype_name(arch, weights)
    if dtype not in DTYPES:
        raise ConversionError(f"params_dtype {dtype!r} is not one of {sorted(DTYPES)}")
    meta = ModelMeta(hf_config, dtype, make_vocab_size_divisible_by, source=str(src.resolve()))
    tmp = staging_dir(dst)
    try:
        start = time.perf_counter()
        (tmp / "release").mkdir()
        ranks = run_on_ranks(hf_to_mcore_rank, tp * pp, str(src), str(tmp / "release"), tp, pp, meta)
        (tmp / TRACKER).write_text("release")
        meta.write(tmp)
        (tmp / "hf").mkdir()
        copy_assets(src, tmp / "hf")
        write_hf_config(hf_config, tmp / "hf", dtype)
        publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params, peak = sum(r[0] for r in ranks), max(r[1] for r in ranks)
    print(
        f"converted {src} -> {dst} ({arch.family}, {dtype}, tp={tp}, pp={pp}, {params:,} parameters over "
        f"{tp * pp} ranks, {time.perf_counter() - start:.1f}s, peak RSS per rank {peak:.2f} GB)"
    )
    return dst


def mcore_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    max_shard_gb: float = 5.0,
    overwrite: bool = False,
) -> Path:
    src, dst = Path(src), Path(dst)
    check_destination(dst, overwrite)
    root, ckpt_dir = resolve_checkpoint(src)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    meta = ModelMeta.read(root)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    tmp = staging_dir(dst)
    try:
        start = time.perf_counter()
        [(_, peak)] = run_on_ranks(
            mcore_to_hf_rank, 1, str(root), str(ckpt_dir), str(tmp), int(max_shard_gb * 2**30), dtype
        )
        if (root / "hf").is_dir():
            copy_assets(root / "hf", tmp)
        if (root / PHRASES_FILE).is_file():  # the SRT model's control phrases travel with its export
            shutil.copy2(root / PHRASES_FILE, tmp / PHRASES_FILE)
        write_hf_config(meta.hf_config, tmp, dtype or meta.params_dtype)
        publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"exported {ckpt_dir} -> {dst} ({meta.arch.family}, {time.perf_counter() - start:.1f}s, "
        f"peak RSS {peak:.2f} GB)"
    )
    return dst
