"""``sdzero srt-collect``: Phase 1 data collection (Self-Revision Training tuples).

For each batch of problems: sample n initial responses, grade them, revise the incorrect ones (and
the correct ones too with ``collect.revise_correct``) with the outcome's control phrase, sample n
revisions of each, grade them, and keep every verified-correct (x, y_init, P_r, y_revised). Stop
once ``collect.target`` tuples are kept. Killed and restarted with the same command, a run resumes
from its last committed batch (see store.py); ``collect.shard_index/num_shards`` split the problem
set across array jobs, and ``sdzero srt-merge`` combines their outputs.

    sdzero srt-collect --config examples/srt_qwen3_4b_math.yaml collect.output_dir=runs/srt
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from tqdm import tqdm

from megatron_sdzero.checks import check_model_path, check_output_dir
from megatron_sdzero.config import run_config_command
from megatron_sdzero.data.formatting import ChatFormat, resolve_phrases
from megatron_sdzero.data.problems import LoadReport, Problem, load_problems
from megatron_sdzero.rewards import build_reward
from megatron_sdzero.rollout.base import build_engine
from megatron_sdzero.runtime.progress import progress_bar
from megatron_sdzero.srt.collector import CollectConfig, Collector, Grader
from megatron_sdzero.srt.config import SRTConfig, run_identity
from megatron_sdzero.srt.store import CollectionStore, Counters


def collect(config: SRTConfig, engine: Any = None, grader: Grader | None = None) -> dict[str, Any]:
    """Run (or resume) a collection and return its summary. engine/grader: injected by tests."""
    problems, report = load_problems(config.problems)
    problems = order_problems(problems, config.collect)
    check_output_dir(config.collect.output_dir, "collect.output_dir")
    if engine is None:
        check_model_path(config.model.path, "model.path")
    with CollectionStore.open(config.collect.output_dir, run_identity(config)) as store:
        todo = [p for p in problems if p.id not in store.done_ids]
        log(_start_line(config, report, len(problems), len(todo), store))
        if store.counters.tuples_kept < config.collect.target and todo:
            with open_collector(config, engine, grader) as collector:
                run_batches(collector, store, todo, config.collect)
        return store.write_summary(_summary_extra(config, report, len(problems), store))


@contextmanager
def open_collector(config: SRTConfig, engine: Any, grader: Grader | None) -> Iterator[Collector]:
    """A Collector on the given engine and grader, or on ones built from the config (closed after)."""
    with ExitStack() as owned:
        if engine is None:
            engine = build_engine(config.model, config.rollout)
            owned.callback(engine.close)
        if grader is None:
            grader = owned.enter_context(build_reward(config.reward))
        yield Collector(
            engine=engine,
            grader=grader,
            fmt=ChatFormat(engine.tokenizer),
            phrases=resolve_phrases(config.model.family, config.phrases),
            sampling=config.sampling,
            collect=config.collect,
            prompt=config.prompt,
            max_model_len=config.rollout.max_model_len,
        )


def run_batches(
    collector: Collector, store: CollectionStore, todo: list[Problem], cfg: CollectConfig
) -> None:
    bar = progress_bar(
        total=cfg.target,
        initial=store.counters.tuples_kept,
        unit="tuple",
        desc="srt-collect",
        enabled=cfg.progress,
    )
    with bar:
        for batch in batches(todo, cfg.batch_size):
            out = collector.run_batch(batch)
            room = cfg.target - store.counters.tuples_kept
            out.counters.tuples_kept = min(len(out.tuples), room)
            store.commit([p.id for p in batch], out.tuples[:room], out.attempts, out.counters)
            bar.update(out.counters.tuples_kept)
            _report(bar, store.counters, out.counters)
            if store.counters.tuples_kept >= cfg.target:
                break


def order_problems(problems: list[Problem], cfg: CollectConfig) -> list[Problem]:
    """This shard's problems (by stable id), in source order or a seeded shuffle of it."""
    mine = [p for p in problems if int(p.id, 16) % cfg.num_shards == cfg.shard_index]
    if cfg.shuffle:
        random.Random(f"srt-order:{cfg.seed}").shuffle(mine)
    return mine


def batches(items: Sequence[Problem], size: int) -> Iterator[list[Problem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _report(bar: tqdm, total: Counters, batch: Counters) -> None:
    bar.set_postfix(
        problems=total.problems,
        init_acc=f"{total.init_accuracy:.3f}",
        rev_acc=f"{total.revised_accuracy:.3f}",
    )
    tokens_per_s = batch.tokens_generated / batch.generation_s if batch.generation_s else 0.0
    line = (
        f"batch {total.batches} | problems {total.problems} | init acc {total.init_accuracy:.3f} | "
        f"revised acc {total.revised_accuracy:.3f} | kept {total.tuples_kept} | "
        f"generate {batch.generation_s:.1f}s ({tokens_per_s:.0f} tok/s) | grade {batch.grading_s:.1f}s"
    )
    bar.write(line, file=sys.stdout)


def _start_line(
    config: SRTConfig, report: LoadReport, in_shard: int, todo: int, store: CollectionStore
) -> str:
    c, malformed = config.collect, sum(report.skipped.values())
    return (
        f"srt-collect: {report.loaded} problems from {report.source} ({malformed} malformed "
        f"rows skipped, {report.duplicates} duplicates dropped); {in_shard} in shard {c.shard_index}/"
        f"{c.num_shards}, {todo} not done yet; {store.counters.tuples_kept}/{c.target} tuples kept so far"
    )


def _summary_extra(config: SRTConfig, report: LoadReport, shard_size: int, store: CollectionStore) -> dict:
    return {
        "target": config.collect.target,
        "complete": store.counters.tuples_kept >= config.collect.target,
        "problems_in_shard": shard_size,
        "problems_done": len(store.done_ids),
        "shard": [config.collect.shard_index, config.collect.num_shards],
        "source": report.as_dict(),
    }


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: SRTConfig) -> int:
        s = collect(config)
        log(
            f"srt-collect: kept {s['tuples_kept']}/{s['target']} tuples (init acc {s['init_accuracy']:.3f}, "
            f"revised acc {s['revised_accuracy']:.3f}); summary in {config.collect.output_dir}/summary.json"
        )
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero srt-collect", __doc__.split("\n\n")[0], SRTConfig, run, argv)
