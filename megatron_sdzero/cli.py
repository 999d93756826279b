"""The one entry point: ``sdzero <command> ...``.

Each command lives in its own module with a ``main(argv) -> int``; importing is deferred until
the command runs, so ``sdzero --help`` is instant and needs none of the heavy packages.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    target: str  # "module:function" taking argv and returning an exit code
    summary: str


COMMANDS: dict[str, Command] = {
    "convert": Command("megatron_sdzero.conversion.cli:main", "HF <-> Megatron checkpoint conversion"),
    "srt-collect": Command("megatron_sdzero.srt.collect:main", "Phase 1: sample, grade, revise, keep"),
    "srt-merge": Command("megatron_sdzero.srt.merge:main", "Phase 1: merge sharded srt-collect runs"),
    "srt-prepare": Command("megatron_sdzero.srt.prepare:main", "Phase 1: clean, dedupe, split SFT stages"),
    "sft": Command("megatron_sdzero.training.sft:main", "Phase 1: two-stage SFT on Megatron (SRT model)"),
    "distill": Command("megatron_sdzero.distill.loop:main", "Phase 2: on-policy self-distillation"),
    "sdft": Command("megatron_sdzero.distill.loop:sdft_main", "baseline: SDFT (demonstration teacher)"),
    "grpo": Command("megatron_sdzero.distill.loop:grpo_main", "baseline: GRPO (group policy gradient)"),
    "rft": Command("megatron_sdzero.algorithms.rft:main", "baseline: rejection-sampling fine-tuning"),
    "eval": Command("megatron_sdzero.eval.run:main", "avg@k / pass@k evaluation over a list of benchmarks"),
    "split-openr1": Command(
        "megatron_sdzero.data.split:main", "a held-out OpenR1-Math split, disjoint from training"
    ),
    "localize": Command(
        "megatron_sdzero.experiment.localization:main",
        "where the Phase 2 divergence sits on a first answer (changed tokens vs the rest)",
    ),
    "report": Command("megatron_sdzero.report:main", "PNG plots of a run (loss, reward, eval, time, tokens)"),
    "compare": Command(
        "megatron_sdzero.experiment.compare:main", "train, select and evaluate every arm of a comparison"
    ),
    "compare-report": Command(
        "megatron_sdzero.experiment.summary:main", "table and plots of a `sdzero compare` results.json"
    ),
    "demo": Command("megatron_sdzero.demo:main", "both phases end to end on a tiny model (CPU)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: sdzero <command> [options]",
        "",
        "SD-Zero (Self-Distillation Zero) on Megatron-Core.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run `sdzero <command> --help` for a command's options."]
    return "\n".join(lines)


def _resolve(command: Command):
    module_name, _, function_name = command.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("megatron_sdzero"):
            return None
        raise
    return getattr(module, function_name, None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from megatron_sdzero import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sdzero: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from megatron_sdzero.runtime import quiet

    quiet.configure(None, verbose="--verbose" in rest)
    quiet.quiet_known_messages(cpu=False)  # before the command's imports warn
    entry = _resolve(COMMANDS[name])
    if entry is None:
        print(f"sdzero {name}: not available in this version yet", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
