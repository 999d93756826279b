"""Start-up checks shared by the commands: run before anything is written, each a one-line ConfigError.

* :func:`check_output_dir`: the output directory can be created and written.
* :func:`check_model_path`: a model path that is meant to be local exists.
* :func:`check_family`: ``family`` (which picks the control phrases) matches the checkpoint's model type.
* :func:`phrases_of_records` / :func:`write_phrases` / :func:`check_phrases`: the control phrases Phase 1
  trained with travel with the SRT checkpoint (``phrases.json``) and Phase 2 must use the same ones.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from megatron_sdzero.config import ConfigError
from megatron_sdzero.data.formatting import ControlPhrases

PHRASES_FILE = "phrases.json"


def check_output_dir(path: str | Path, key: str) -> None:
    """``path`` is (or can be made) a writable directory; ``key`` names the setting in the message."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{key}: {path} {what}; choose a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable; choose a writable location for {path}")


def check_model_path(path: str | Path, key: str) -> None:
    """A local model path must exist; ``org/name`` (or a bare name) may be a Hugging Face hub id."""
    text = str(path)
    if Path(text).exists():
        return
    looks_local = Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
    if looks_local:
        raise ConfigError(
            f"{key}: {text} does not exist; give a Hugging Face model directory (or a hub name)"
        )


def _family_base(name: str) -> tuple[str, str]:
    """("qwen", "2") for "qwen2.5", ("olmo", "3") for "olmo3", ("llama", "") for "llama"."""
    match = re.fullmatch(r"([a-z_]+?)(\d*)(?:\.\d+)?", name.lower())
    return (match.group(1), match.group(2)) if match else (name.lower(), "")


def check_family(family: str | None, model_type: str | None, key: str, checkpoint: str | Path) -> None:
    """A family that names another model type than the checkpoint's would pick the wrong phrases."""
    if not family or not model_type:
        return
    want_name, want_version = _family_base(family)
    have_name, have_version = _family_base(model_type)
    if want_name == have_name and (not want_version or want_version == have_version):
        return
    raise ConfigError(
        f"{key}: {family!r} does not match {checkpoint}, whose model type is {model_type!r}; "
        f"set {key}={model_type} (or fix the checkpoint path)"
    )


def checkpoint_model_type(checkpoint: str | Path) -> str | None:
    """The HF ``model_type`` a Megatron checkpoint was converted from; None if it is not one."""
    from megatron_sdzero.conversion.hf_io import CheckpointError
    from megatron_sdzero.conversion.megatron_io import ModelMeta, resolve_checkpoint

    try:
        root, _ = resolve_checkpoint(Path(checkpoint))
        return ModelMeta.read(root).hf_config.get("model_type")
    except CheckpointError:
        return None


def phrases_of_records(records: Iterable[Mapping[str, Any]], source: str) -> ControlPhrases:
    """The (correct, incorrect) phrases SRT records were revised with; each outcome must use one."""
    seen: dict[bool, set[str]] = {True: set(), False: set()}
    for record in records:
        seen[bool(record["init_correct"])].add(record["phrase"])
    for outcome, phrases in seen.items():
        if len(phrases) > 1:
            label = "correct" if outcome else "incorrect"
            raise ConfigError(f"{source}: {label} initial responses use several phrases {sorted(phrases)}")
    correct, incorrect = (next(iter(seen[o]), None) for o in (True, False))
    return ControlPhrases(correct=correct, incorrect=incorrect)


def write_phrases(directory: str | Path, phrases: ControlPhrases) -> Path:
    path = Path(directory) / PHRASES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"correct": phrases.correct, "incorrect": phrases.incorrect}, indent=2) + "\n")
    return path


def read_phrases(directory: str | Path) -> ControlPhrases | None:
    path = Path(directory) / PHRASES_FILE
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    return ControlPhrases(correct=values.get("correct"), incorrect=values.get("incorrect"))


def check_phrases(checkpoint: str | Path, phrases: ControlPhrases) -> None:
    """Phase 2's resolved phrases against the ones the SRT checkpoint was trained with (if recorded)."""
    from megatron_sdzero.conversion.hf_io import CheckpointError
    from megatron_sdzero.conversion.megatron_io import resolve_checkpoint

    try:
        root, _ = resolve_checkpoint(Path(checkpoint))
    except CheckpointError:
        root = Path(checkpoint)
    trained = read_phrases(root)
    if trained is None:
        return
    for label in ("correct", "incorrect"):
        used, learned = getattr(phrases, label), getattr(trained, label)
        if learned is not None and used != learned:
            raise ConfigError(
                f"phrases.{label}: this run uses {used!r} but {root} was trained (Phase 1) with "
                f"{learned!r} ({root / PHRASES_FILE}); set phrases.{label} to the trained phrase or "
                "fix student.family"
            )


def check_student(checkpoint: str | Path, family: str | None, phrases: ControlPhrases) -> None:
    """Phase 2's start: the family matches the checkpoint's model type, the phrases match Phase 1's."""
    check_family(family, checkpoint_model_type(checkpoint), "student.family", checkpoint)
    check_phrases(checkpoint, phrases)
