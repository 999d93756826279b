"""Put the student's current weights into the rollout engine, then prove they arrived.

Two ways (``refresh.mode``):

- ``disk``: the writer rank (engine rank of data-parallel replica 0) writes the model as a
  versioned HF directory ``<dir>/step_0000042`` (safetensors + config + tokenizer; staged, then
  renamed), every engine reloads it (``engine.reload``), old versions beyond ``keep_versions`` are
  removed. The directories are ordinary HF checkpoints: any of them can be evaluated or served.
- ``memory``: every replica streams its HF tensors straight into its engine
  (:func:`load_in_memory`): parameter copies for the CPU engine, ``model.load_weights`` inside the
  vLLM workers for vLLM. Nothing touches the disk.

After either, the probe: the engine greedily continues a fixed prompt for ``probe.num_tokens``
tokens, returning its log-probs; the trainer scores the same tokens with the Megatron model; the
largest absolute difference must stay within ``probe.atol``, else the refresh failed (stale or
mangled weights) and the run stops (``probe.on_mismatch=raise``) or warns. Everything is
timed; the seconds are logged with every step.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_sdzero.config import ConfigError
from megatron_sdzero.conversion.hf_io import copy_assets, write_safetensors_shards
from megatron_sdzero.conversion.megatron_io import publish, staging_dir, write_hf_config
from megatron_sdzero.distill import parallel
from megatron_sdzero.distill.weights import drain, iter_hf_weights
from megatron_sdzero.models.architecture import DecoderArchitecture
from megatron_sdzero.rollout.base import SamplingParams

logger = logging.getLogger(__name__)


class StaleWeightsError(RuntimeError):
    """The rollout engine's log-probs disagree with the trainer's after a refresh."""


@dataclass
class ProbeConfig:
    enabled: bool = True
    text: str = "Question: what is 17 + 25? Think step by step, then answer."
    num_tokens: int = 16
    # Largest |engine - trainer| log-prob over the probe tokens. 1e-4 holds for the CPU engine in
    # float32; bf16 engines against a bf16 trainer need a looser bound (calibrate with
    # scripts/check_refresh_gpu.py, which prints the measured difference).
    atol: float = 1e-4
    on_mismatch: Literal["raise", "warn"] = "raise"


@dataclass
class RefreshConfig:
    mode: Literal["disk", "memory"] = "disk"
    dir: Path | None = None  # disk: where versions go; default <checkpoint dir>/rollout_weights
    keep_versions: int = 2  # disk: newest versions kept (the engine reads the newest)
    bucket_mb: int = 1024  # memory + vLLM: tensors per load_weights call
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if self.keep_versions < 1:
            raise ConfigError(f"refresh.keep_versions: must be >= 1, got {self.keep_versions}")


@dataclass
class RefreshResult:
    seconds: float  # export/stream + engine load
    probe_seconds: float
    probe_max_diff: float  # nan when the probe is off
    path: Path | None  # disk mode: the version the engines read


# --- disk --------------------------------------------------------------------------------------------


def export_hf(
    chunks: list[Any], arch: DecoderArchitecture, out_dir: Path, assets_dir: Path | None, dtype: str
) -> Path:
    """Write the model as a HF directory (collective over replica 0's model-parallel group)."""
    if parallel.dp_rank_and_size()[0] != 0:
        return out_dir
    pairs = iter_hf_weights(chunks, arch)
    if not parallel.is_writer_rank():
        drain(pairs)
        return out_dir
    tmp = staging_dir(out_dir)
    try:
        write_safetensors_shards(((n, t.to("cpu")) for n, t in pairs), tmp)
        if assets_dir is not None:
            copy_assets(assets_dir, tmp)
        write_hf_config(_hf_config(assets_dir, arch), tmp, dtype)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _hf_config(assets_dir: Path | None, arch: DecoderArchitecture) -> dict:
    from megatron_sdzero.models.architecture import read_hf_config

    if assets_dir is None or not (assets_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {assets_dir} to write with the exported weights")
    return read_hf_config(assets_dir)


def prune_versions(root: Path, keep: int) -> list[Path]:
    versions = sorted(p for p in root.glob("step_*") if p.is_dir())
    removed = versions[:-keep] if keep else versions
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# --- memory ------------------------------------------------------------------------------------------


def load_in_memory(engine: Any, pairs: Iterable[tuple[str, torch.Tensor]], bucket_mb: int = 1024) -> int:
    """Stream HF tensors into a live engine (its ``load_weights``); returns how many were loaded."""
    if not hasattr(engine, "load_weights"):
        raise TypeError(f"{type(engine).__name__} has no in-memory weight loading; use refresh.mode=disk")
    return engine.load_weights(pairs, bucket_mb=bucket_mb)


# --- the probe ---------------------------------------------------------------------------------------


def engine_probe(engine: Any, probe: ProbeConfig) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, greedy continuation ids, the engine's log-probs of them)."""
    prompt = engine.tokenizer(probe.text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0.0, max_tokens=probe.num_tokens, seed=0, logprobs=True)
    completion = engine.generate([prompt], params)[0][0]
    return prompt, list(completion.token_ids), list(completion.logprobs or [])


def trainer_logprobs(chunks: list[Any], prompt: list[int], continuation: list[int], vocab: int):
    """Log-probs of ``continuation`` after ``prompt`` under the Megatron model (last stage; else None)."""
    from megatron_sdzero.models.inference import forward_logits

    if len(chunks) != 1:
        raise ValueError("the refresh probe needs one model chunk per rank (virtual pipelining is off)")
    tokens = torch.tensor([prompt + continuation], dtype=torch.long)
    was_training = chunks[0].training
    chunks[0].eval()
    try:
        with torch.no_grad():
            logits = forward_logits(chunks[0], tokens, vocab)
    finally:
        chunks[0].train(was_training)
    if logits is None:
        return None
    scores = torch.log_softmax(logits[0, len(prompt) - 1 : -1].double(), dim=-1)
    return scores.gather(1, torch.tensor(continuation, device=scores.device)[:, None])[:, 0].cpu()


def check_probe(engine: Any, chunks: list[Any], vocab_size: int, probe: ProbeConfig) -> float:
    """Largest |engine - trainer| log-prob over the probe, the same on every rank; raises on mismatch."""
    from megatron.core import parallel_state

    sample = engine_probe(engine, probe) if parallel.is_engine_rank() else None
    prompt, continuation, engine_lp = parallel.broadcast_in_mp_group(sample)
    diff = 0.0
    ours = trainer_logprobs(chunks, prompt, continuation, vocab_size)
    if ours is not None and parallel_state.is_pipeline_last_stage():
        theirs = torch.tensor(engine_lp, dtype=torch.float64)
        diff = float((ours - theirs).abs().max()) if len(theirs) == len(ours) and len(ours) else float("inf")
    diff = parallel.all_reduce_max(diff)
    if not diff <= probe.atol:
        message = (
            f"rollout engine and trainer disagree after the weight refresh: max |log-prob difference| "
            f"{diff:.3g} over {len(continuation)} probe tokens > refresh.probe.atol={probe.atol:g}"
        )
        if probe.on_mismatch == "raise":
            raise StaleWeightsError(message)
        logger.warning(message)
    return diff


# --- the whole refresh -------------------------------------------------------------------------------


class WeightRefresher:
    """Refreshes this rank's engine (None off the engine ranks) from the student, on every call."""

    def __init__(
        self,
        config: RefreshConfig,
        arch: DecoderArchitecture,
        vocab_size: int,
        root: Path,
        assets_dir: Path | None,
        dtype: str,
    ) -> None:
        self.config, self.arch, self.vocab_size = config, arch, vocab_size
        self.root, self.assets_dir, self.dtype = root, assets_dir, dtype

    def refresh(self, engine: Any, chunks: list[Any], step: int) -> RefreshResult:
        began = time.perf_counter()
        path = self._to_disk(engine, chunks, step) if self.config.mode == "disk" else None
        if self.config.mode == "memory":
            self._in_memory(engine, chunks)
        parallel.barrier()
        seconds = time.perf_counter() - began
        diff, probe_began = float("nan"), time.perf_counter()
        if self.config.probe.enabled:
            diff = check_probe(engine, chunks, self.vocab_size, self.config.probe)
        return RefreshResult(seconds, time.perf_counter() - probe_began, diff, path)

    def _to_disk(self, engine: Any, chunks: list[Any], step: int) -> Path:
        path = self.root / f"step_{step:07d}"
        export_hf(chunks, self.arch, path, self.assets_dir, self.dtype)
        parallel.barrier()
        if parallel.is_engine_rank():
            engine.reload(path)
        parallel.barrier()
        if parallel.is_writer_rank():
            prune_versions(self.root, self.config.keep_versions)
        return path

    def _in_memory(self, engine: Any, chunks: list[Any]) -> None:
        pairs = iter_hf_weights(chunks, self.arch)
        if parallel.is_engine_rank():
            load_in_memory(engine, pairs, self.config.bucket_mb)
        else:
            drain(pairs)
