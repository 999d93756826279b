"""Typed configs, dotted overrides, --dry-run, and the sdzero entry point."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from megatron_sdzero.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    run_config_command,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Run:
    name: str
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    path: Path | None = None


def test_nested_build_with_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "a", "optim": {"lr": "5e-6"}}))
    config = load_config(
        Run, recipe, ["steps=3", "optim.schedule=constant", "optim.betas=[0.9, 0.999]", "path=/x"]
    )
    assert config == Run("a", 3, Optim(5e-6, [0.9, 0.999], "constant"), Path("/x"))
    assert to_dict(config)["path"] == "/x"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"name": "a", "stepz": 1}, r"unknown key\(s\) \['stepz'\] in Run"),
        ({"name": "a", "optim": {"lrr": 1}}, r"unknown key\(s\) \['lrr'\] in optim"),
        ({"name": "a", "steps": "ten"}, "steps: expected an integer"),
        ({"name": "a", "steps": True}, "steps: expected an integer"),
        ({"name": "a", "optim": {"schedule": "linear"}}, r"optim.schedule: 'linear' is not one of"),
        ({"name": "a", "optim": {"betas": 0.9}}, "optim.betas: expected a list"),
        ({"steps": 1}, "name"),
    ],
)
def test_bad_values_name_the_dotted_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Run, values)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"steps": 1}, ["steps.x=2"])


def test_dry_run_prints_the_resolved_config(capsys):
    ran = []
    code = run_config_command("t", "test", Run, ran.append, ["name=x", "optim.lr=2e-5", "--dry-run"])
    assert code == 0 and ran == []
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 2e-5 and printed["name"] == "x"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_sdzero.cli", *args], capture_output=True, text=True
    )


def test_help_lists_every_command():
    done = _cli("--help")
    assert done.returncode == 0
    for command in ("convert", "srt-collect", "srt-prepare", "sft", "distill", "eval", "demo"):
        assert f"  {command}" in done.stdout


def test_unknown_command_is_an_error():
    done = _cli("train")
    assert done.returncode == 2 and "unknown command 'train'" in done.stderr


def test_every_recipe_in_examples_is_valid_yaml():
    for recipe in Path(__file__).parents[1].glob("examples/*.yaml"):
        assert isinstance(yaml.safe_load(recipe.read_text()), dict), recipe


@dataclass
class WithSectionDefault:
    optim: Optim = field(default_factory=lambda: Optim(lr=3e-4, schedule="constant"))


def test_a_section_override_keeps_the_fields_own_default():
    config = from_dict(WithSectionDefault, {"optim": {"betas": [0.8, 0.9]}})
    assert config.optim == Optim(lr=3e-4, betas=[0.8, 0.9], schedule="constant")


@dataclass
class Checked:
    n: int = 1

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class HoldsChecked:
    part: Checked = field(default_factory=Checked)


def test_a_components_own_value_error_becomes_a_config_error_naming_the_section():
    with pytest.raises(ConfigError, match=r"^part: n must be >= 1, got 0$"):
        from_dict(HoldsChecked, {"part": {"n": 0}})


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: a\noptim: {lr: 1\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}:3:1: YAML syntax error"):
        load_config(Run, recipe)
