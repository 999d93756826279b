"""HF <-> Megatron-Core distributed checkpoints (torch_dist), for any TP/PP.

Layout of a converted checkpoint (the same as a training run's, so either can be loaded)::

    DST/
      latest_checkpointed_iteration.txt   "release" for a conversion, else the last iteration
      release/                            megatron.core.dist_checkpointing (torch_dist) files
      sdzero_model.json                   family, dtype, padded vocab and the HF config
      hf/                                 config, tokenizer, chat template, generation config

The TP/PP given at conversion is only the layout the files are written in: dist checkpoints
reshard on load, so a checkpoint written at TP2 x PP2 loads at TP1, TP4, PP2, ...
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sdzero.conversion.hf_io import CheckpointError, HFWeights, write_safetensors_shards
from megatron_sdzero.conversion.weight_maps import (
    WeightRule,
    expand_layers,
    expected_hf_shapes,
    rules_for,
    to_hf,
    to_mcore,
)
from megatron_sdzero.models.architecture import DecoderArchitecture, architecture_from_hf
from megatron_sdzero.models.builder import DTYPES, ModelConfig, build_gpt_model, padded_vocab_size
from megatron_sdzero.runtime.progress import progress_bar

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_META = "sdzero_model.json"


@dataclass
class ModelMeta:
    hf_config: dict
    params_dtype: str
    make_vocab_size_divisible_by: int = 128
    source: str = ""

    @property
    def arch(self) -> DecoderArchitecture:
        return architecture_from_hf(self.hf_config)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            params_dtype=self.params_dtype,  # type: ignore[arg-type]
            transformer_impl="local",
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
        )

    def write(self, root: Path) -> None:
        meta = dict(
            hf_config=self.hf_config,
            params_dtype=self.params_dtype,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
            source=self.source,
            family=self.arch.family,
            padded_vocab_size=padded_vocab_size(self.arch.vocab_size, self.make_vocab_size_divisible_by, 1),
            written_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        (root / MODEL_META).write_text(json.dumps(meta, indent=2))

    @classmethod
    def read(cls, root: Path) -> ModelMeta:
        path = root / MODEL_META
        if not path.is_file():
            raise CheckpointError(f"{root} has no {MODEL_META}: not a megatron_sdzero checkpoint")
        meta = json.loads(path.read_text())
        return cls(
            meta["hf_config"], meta["params_dtype"], meta["make_vocab_size_divisible_by"], meta["source"]
        )


# --- output directory handling: nothing partial is ever left at DST ------------------------------


def check_destination(dst: Path, overwrite: bool = False) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        if not overwrite:
            raise FileExistsError(
                f"destination {dst} exists and is not empty (pass --overwrite to replace it)"
            )


def staging_dir(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)


# --- locating a Megatron checkpoint ---------------------------------------------------------------


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(root with sdzero_model.json, the dist-checkpoint directory to load)."""
    if (path / TRACKER).is_file():
        tag = (path / TRACKER).read_text().strip()
        name = tag if tag == "release" else f"iter_{int(tag):07d}"
        return path, path / name
    if (path / MODEL_META).is_file():
        raise CheckpointError(f"{path} has {MODEL_META} but no {TRACKER}")
    if (path.parent / MODEL_META).is_file() and (path / "metadata.json").is_file():
        return path.parent, path
    raise CheckpointError(_not_a_checkpoint(path))


def _not_a_checkpoint(path: Path) -> str:
    if not path.exists():
        return f"no Megatron checkpoint at {path}: the path does not exist"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors*")):
        return (
            f"{path} is a Hugging Face model directory, not a Megatron checkpoint: convert it first with "
            f"`sdzero convert hf-to-mcore {path} {path}-mcore` and use {path}-mcore"
        )
    return f"{path} is not a Megatron checkpoint (no {TRACKER}, no metadata.json)"


# --- per-rank work ---------------------------------------------------------------------------------


def global_param_name(local_name: str, model) -> str:
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def rules_by_mcore_name(arch: DecoderArchitecture, pp: int) -> dict[str, WeightRule]:
    rules = {r.mcore: r for r in expand_layers(rules_for(arch), arch.num_layers)}
    if arch.tie_word_embeddings and pp > 1:
        # The last stage holds its own copy of the tied embedding as the output layer.
        rules["output_layer.weight"] = WeightRule(
            "output_layer.weight", ("model.embed_tokens.weight",), "vocab"
        )
    return rules


def _build(meta: ModelMeta):
    from megatron.core import parallel_state

    arch = meta.arch
    model_cfg = meta.model_config()
    from megatron_sdzero.models.builder import transformer_config

    config = transformer_config(
        arch,
        model_cfg,
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        perform_initialization=False,
    )
    return build_gpt_model(arch, model_cfg, config=config)


def _fill_from_hf(model, meta: ModelMeta, weights: HFWeights) -> None:
    from megatron.core import parallel_state

    arch = meta.arch
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    padded = padded_vocab_size(arch.vocab_size, meta.make_vocab_size_divisible_by, tp)
    rules = rules_by_mcore_name(arch, parallel_state.get_pipeline_model_parallel_world_size())
    state = model.state_dict()
    dtype = DTYPES[meta.params_dtype]
    tensors = progress_bar(
        state.items(), rank=torch.distributed.get_rank(), total=len(state), desc="hf-to-mcore", unit="tensor"
    )
    for local_name, target in tensors:
        if local_name.endswith("_extra_state"):
            continue
        name = global_param_name(local_name, model)
        if name not in rules:
            raise CheckpointError(f"Megatron parameter {name} has no HF mapping for family {arch.family}")
        rule = rules[name]
        shard = to_mcore(rule.kind, [weights.get(n) for n in rule.hf], arch, padded, tp_rank, tp)
        if shard.shape != target.shape:
            raise CheckpointError(
                f"{name}: HF tensors {rule.hf} give shape {tuple(shard.shape)}, "
                f"Megatron expects {tuple(target.shape)}"
            )
        target.copy_(shard.to(dtype))


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def hf_to_mcore_rank(src: str, ckpt_dir: str, tp: int, pp: int, meta: ModelMeta) -> tuple[int, float]:
    from megatron.core import dist_checkpointing

    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig(tp=tp, pp=pp))
    with torch.no_grad():
        model = _build(meta)
        _fill_from_hf(model, meta, HFWeights(src))
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return sum(p.numel() for p in model.parameters()), peak_rss_gb()


def load_model_rank(root: str, ckpt_dir: str, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Load a checkpoint at (tp, pp) on this rank; return its local state dict (global layer names)."""
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig(tp=tp, pp=pp))
    meta = ModelMeta.read(Path(root))
    model = _build(meta)
    load_weights(model, Path(ckpt_dir))
    return {
        global_param_name(k, model): v.clone()
        for k, v in model.state_dict().items()
        if "_extra_state" not in k
    }


def load_weights(model, ckpt_dir: Path) -> None:
    """Load only the model weights of a checkpoint (conversion or training) into ``model``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir), strict=StrictHandling.LOG_UNEXPECTED)
        # A training checkpoint's common entries (iteration, scheduler, ...) come back too: keep the weights.
        loaded = {k: v for k, v in loaded.items() if k in sharded}
        missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def mcore_to_hf_rank(
    root: str, ckpt_dir: str, out_dir: str, max_shard_bytes: int, dtype: str | None
) -> tuple[int, float]:
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig(tp=1, pp=1))
    meta = ModelMeta.read(Path(root))
    arch = meta.arch
    with torch.no_grad():
        model = _build(meta)
        load_weights(model, Path(ckpt_dir))
        state = model.state_dict()
        out_dtype = DTYPES[dtype] if dtype else None

        def tensors():
            rules = expand_layers(rules_for(arch), arch.num_layers)
            for rule in progress_bar(rules, rank=0, desc="mcore-to-hf", unit="tensor"):
                for name, tensor in zip(rule.hf, to_hf(rule.kind, state[rule.mcore], arch), strict=True):
                    yield name, tensor.to(out_dtype) if out_dtype else tensor

        write_safetensors_shards(tensors(), Path(out_dir), max_shard_bytes)
    return len(state), peak_rss_gb()


# --- checks before any work ------------------------------------------------------------------------


def validate_hf_checkpoint(src: Path, arch: DecoderArchitecture, weights: HFWeights) -> None:
    shapes = expected_hf_shapes(arch)
    for rule in expand_layers(rules_for(arch), arch.num_layers):
        for name in rule.hf:
            if name not in weights:
                raise CheckpointError(f"tensor {name} is missing from {src}")
            if weights.shape(name) != shapes[name]:
                raise CheckpointError(
                    f"tensor {name} in {src} has shape {weights.shape(name)}, expected {shapes[name]} "
                    "from config.json"
                )


def hf_dtype_name(arch: DecoderArchitecture, weights: HFWeights) -> str:
    dtype = weights.get("model.norm.weight").dtype
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    return arch.torch_dtype if arch.torch_dtype in DTYPES else "float32"


def write_hf_config(config: dict, dst: Path, dtype_name: str) -> None:
    config = dict(config)
    config["torch_dtype"] = dtype_name
    config.pop("dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
