"""``sdzero distill`` (SD-Zero Phase 2), ``sdzero sdft`` and ``sdzero grpo``: one on-policy trainer.

    sdzero distill --config examples/distill_qwen3_4b_math.yaml
    sdzero grpo --config examples/grpo_qwen3_4b_math.yaml           (= sdzero distill ... algorithm=grpo)
    torchrun --nproc-per-node 8 -m megatron_sdzero.cli distill --config ...    (see slurm/distill.sbatch)

The step cycle is the shared Trainer's (training/trainer.py), the on-policy step the
OnPolicyModule's (algorithms/onpolicy.py), and the part that differs per algorithm its batch
builder and loss (algorithms/sdzero.py, sdft.py, grpo.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_sdzero.algorithms.onpolicy import OnPolicyModule, check_start, close, prune_checkpoints, setup
from megatron_sdzero.config import run_config_command
from megatron_sdzero.distill.config import DistillConfig
from megatron_sdzero.report import write_run_report
from megatron_sdzero.training.trainer import Hooks, LoopResult, Schedule, Trainer, exit_request_for

__all__ = ["Hooks", "check_start", "distill", "main", "prune_checkpoints"]

FINISHED = "finished.json"  # written when a run reached its last step or its budget


def distill(config: DistillConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) an on-policy algorithm to its last step or its budget; the last step's numbers."""
    run, skipped = setup(config)
    try:
        run.exit_request = exit_request_for(config.train, config.run_dir)
        schedule = Schedule(
            run.total_steps,
            save_interval=config.checkpoint.interval,
            eval_interval=config.eval.interval if run.eval_problems else None,
            eval_at_start=config.eval.at_start and bool(run.eval_problems),
        )
        trainer = Trainer(
            OnPolicyModule(run), schedule, config.train, run.step_logger, run.exit_request, hooks
        )
        result = trainer.fit(run.step, skipped)
        if dist.get_rank() == 0:
            run.ledger.write(config.run_dir, config.budget)
            write_run_report(config.run_dir)
            if result.finished:
                write_finished(config.run_dir, result)
        return result.last
    finally:
        close(run)


def write_finished(run_dir: Path, result: LoopResult) -> None:
    """``RUN_DIR/finished.json``: the run reached its last step or its budget (not a stop request),
    so a pipeline can tell a finished run from one that is only checkpointed."""
    from megatron_sdzero.eval.report import write_atomically

    record = {"iteration": result.iteration, "exit_reason": result.exit_reason, "last": result.last}
    write_atomically(run_dir / FINISHED, json.dumps(record, indent=2, default=str) + "\n")


def command(algorithm: str | None) -> Any:
    """The ``main(argv)`` of ``sdzero distill`` (None: the recipe's algorithm) or ``sdzero <algorithm>``."""

    def main(argv: Sequence[str] | None = None) -> int:
        from megatron_sdzero.runtime.distributed import destroy_model_parallel

        def run(config: DistillConfig) -> int:
            try:
                last = distill(config)
            finally:
                destroy_model_parallel()
            if dist.is_initialized() and dist.get_rank() == 0:
                print(f"sdzero {config.algorithm}: done; last step {json.dumps(last)}", flush=True)
            return 0

        argv = sys.argv[1:] if argv is None else argv
        preset = [f"algorithm={algorithm}"] if algorithm else []
        prog = f"sdzero {algorithm or 'distill'}"
        return run_config_command(prog, __doc__.split("\n\n")[0], DistillConfig, run, argv, preset=preset)

    return main


main = command(None)
grpo_main = command("grpo")
sdft_main = command("sdft")
