"""Reading and writing HF safetensors checkpoints one tensor at a time."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from megatron_sdzero.errors import UserError

# Files that travel with the weights: config, tokenizer and chat template, generation defaults.
HF_ASSET_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory is missing, of the wrong kind, or unreadable."""


class HFWeights:
    """Lazy access to the tensors of a HF checkpoint directory (single file or sharded index)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file_of = self._index()
        self._handles = {}
        for file in sorted(set(self._file_of.values())):
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as err:  # truncated or corrupt files fail here, with the file named
                raise CheckpointError(f"cannot read safetensors file {self.path / file}: {err}") from err

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        from safetensors import safe_open

        names = {}
        for file in files:
            try:
                with safe_open(str(self.path / file), framework="pt") as handle:
                    names.update({key: file for key in handle.keys()})
            except Exception as err:
                raise CheckpointError(f"cannot read safetensors file {self.path / file}: {err}") from err
        return names

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"cannot read tensor {name} from {self.path / self._file_of[name]}: {err}"
            ) from err

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name} is missing from the HF checkpoint {self.path}")
        return self._handles[self._file_of[name]]


def write_safetensors_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write tensors as they come, closing a shard once it reaches ``max_shard_bytes``."""
    from safetensors.torch import save_file

    current: dict[str, torch.Tensor] = {}
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal current, size
        if not current:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(current, str(out_dir / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({key: name for key in current})
        current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        (out_dir / files[0]).rename(out_dir / "model.safetensors")
        return
    count = len(files)
    renamed = {}
    for i, name in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        (out_dir / name).rename(out_dir / final)
        renamed[name] = final
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_assets(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in HF_ASSET_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def iter_named(names: Iterable[str], weights: HFWeights) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, weights.get(name)
