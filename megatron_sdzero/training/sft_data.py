"""SFT data: stage JSONL -> token samples -> a deterministic plan of global batches.

The plan is a pure function of the sample lengths and the settings (seed, epochs, packing, batch
size): every rank computes the same plan, takes its data-parallel slice, and resuming at iteration
k just starts reading at global batch k. Epochs are concatenated into one stream of rows (each epoch
reshuffled with its own seed) before it is cut into global batches, so no rows are dropped at epoch
ends; only the tail after the last full global batch is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from megatron_sdzero.config import ConfigError
from megatron_sdzero.training.packing import MicroBatch, collate, first_fit

Sample = tuple[list[int], list[int]]  # (input_ids, loss_mask)


@dataclass
class SFTDataConfig:
    """Where the two SFT stages' data live and how sequences become rows."""

    stage1: str = ""  # stage1.jsonl from `sdzero srt-prepare` (generation data); "" skips stage 1
    stage2: str = ""  # stage2.jsonl (revision data); "" skips stage 2
    seq_length: int = 32768  # inputs per row (a sample of n ids gives n - 1 inputs)
    packing: bool = False  # several samples per row, attention kept within each sample
    pad_to_multiple_of: int = 128  # unpacked rows are padded to the micro-batch's longest, rounded up
    overlong: Literal["truncate", "drop"] = "truncate"  # samples longer than a row
    shuffle: bool = True
    pack_window: int = 64  # open rows searched by first-fit packing

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length must be >= 2, got {self.seq_length}")


@dataclass
class DatasetStats:
    records: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0


class SFTDataset:
    """Token samples of one stage file, each at most ``seq_length + 1`` ids."""

    def __init__(self, samples: list[Sample], stats: DatasetStats, source: str = "") -> None:
        self.samples = samples
        self.stats = stats
        self.source = source

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Any, data: SFTDataConfig) -> SFTDataset:
        from megatron_sdzero.data.formatting import build_sft_sample, chat_format

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"SFT data file {path} does not exist; check data.stage1/data.stage2")
        fmt = chat_format(tokenizer)
        samples, stats = [], DatasetStats()
        with path.open() as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({err}); fix that line") from err
                stats.records += 1
                sample = _fit(*build_sft_sample(record, tokenizer, fmt), data, stats)
                if sample is not None:
                    samples.append(sample)
        if not samples:
            raise ConfigError(
                f"{path} holds no usable SFT sample ({stats}); check the file and data.seq_length"
            )
        return cls(samples, stats, str(path))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Inputs per sample (ids - 1)."""
        return [len(ids) - 1 for ids, _ in self.samples]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for ids, mask in self.samples:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(np.asarray(mask, dtype=np.int8).tobytes())
        return digest.hexdigest()[:16]


def _fit(ids: list[int], mask: list[int], data: SFTDataConfig, stats: DatasetStats) -> Sample | None:
    if len(ids) > data.seq_length + 1:
        if data.overlong == "drop":
            stats.dropped_overlong += 1
            return None
        ids, mask = ids[: data.seq_length + 1], mask[: data.seq_length + 1]
        stats.truncated += 1
    if len(ids) < 2 or not any(mask[1:]):
        stats.dropped_no_target += 1
        return None
    return ids, mask


@dataclass
class DataPlan:
    """Rows (lists of sample indices) in training order, cut into global batches."""

    rows: list[list[int]]
    global_batch_size: int
    train_iters: int
    epochs: int

    def global_batch(self, iteration: int) -> list[list[int]]:
        if not 0 <= iteration < self.train_iters:
            raise IndexError(f"iteration {iteration} outside the plan (0..{self.train_iters - 1})")
        start = iteration * self.global_batch_size
        return self.rows[start : start + self.global_batch_size]

    def rank_micro_batches(
        self, iteration: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[list[list[int]]]:
        """This data-parallel rank's micro-batches of one iteration (contiguous slices, Megatron's order)."""
        rows = self.global_batch(iteration)
        per_rank = len(rows) // dp_size
        mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]

    def consumed_samples(self, iteration: int) -> int:
        """Samples (not rows) in the first ``iteration`` global batches."""
        end = iteration * self.global_batch_size
        return sum(len(row) for row in self.rows[:end])


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_samples))
    return np.random.default_rng([seed, epoch]).permutation(num_samples).tolist()


def epoch_rows(lengths: Sequence[int], data: SFTDataConfig, seed: int, epoch: int) -> list[list[int]]:
    order = epoch_order(len(lengths), seed, epoch, data.shuffle)
    if data.packing:
        return first_fit(lengths, order, data.seq_length, data.pack_window)
    return [[index] for index in order]


def make_plan(
    lengths: Sequence[int],
    data: SFTDataConfig,
    *,
    seed: int,
    global_batch_size: int,
    epochs: int | None,
    train_iters: int | None,
) -> DataPlan:
    """Epochs of (packed) rows until ``epochs`` are done or ``train_iters`` batches exist."""
    if train_iters is None and epochs is None:
        raise ValueError("give epochs or train_iters")
    rows: list[list[int]] = []
    epoch = 0
    while (epochs is not None and train_iters is None and epoch < epochs) or (
        train_iters is not None and len(rows) < train_iters * global_batch_size
    ):
        rows.extend(epoch_rows(lengths, data, seed, epoch))
        epoch += 1
    iters = len(rows) // global_batch_size if train_iters is None else train_iters
    if iters < 1:  # a user's data/config mismatch (e.g. a stage file with fewer samples than a batch)
        raise ConfigError(
            f"{len(rows)} rows make no global batch of {global_batch_size}: lower train.global_batch_size"
            " or give more data"
        )
    return DataPlan(
        rows=rows[: iters * global_batch_size],
        global_batch_size=global_batch_size,
        train_iters=iters,
        epochs=epoch,
    )


def _row_length(samples: Sequence[Sample], row: Sequence[int]) -> int:
    return sum(len(samples[i][0]) - 1 for i in row)


def collate_rows(
    samples: Sequence[Sample], rows: Sequence[Sequence[int]], data: SFTDataConfig, pad_id: int = 0
) -> MicroBatch:
    """A micro-batch: packed rows are ``seq_length`` long; unpacked ones are padded to their longest."""
    if data.packing:
        length = data.seq_length
    else:
        longest = max(_row_length(samples, row) for row in rows)
        multiple = max(data.pad_to_multiple_of, 1)
        length = min(-(-longest // multiple) * multiple, data.seq_length)
    return collate([[samples[i] for i in row] for row in rows], length, pad_id)


def plan_identity(dataset: SFTDataset, data: SFTDataConfig, seed: int, global_batch_size: int) -> dict:
    """What must not change between a run and its resume (else the data position means nothing)."""
    return dict(
        fingerprint=dataset.fingerprint(),
        samples=len(dataset),
        seed=seed,
        global_batch_size=global_batch_size,
        seq_length=data.seq_length,
        packing=data.packing,
        shuffle=data.shuffle,
    )
