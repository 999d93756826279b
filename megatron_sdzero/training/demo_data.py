"""Stage 1 / stage 2 SFT files for a tiny CPU run, without collecting anything.

Each record is what ``sdzero srt-prepare`` writes (docs/phase1.md): an arithmetic problem, a wrong
first answer y_init, the family's "wrong" control phrase and a correct revision y_revised. The
answers follow a fixed template, so a tiny model's loss drops quickly: a check that the loop
learns, not a result.

    python -m megatron_sdzero.training.demo_data --model outputs/tiny/qwen3 --out outputs/sft_data --n 64
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_sdzero.data.arithmetic import make_arithmetic_problems
from megatron_sdzero.data.formatting import build_messages, chat_format

PHRASE = "Wait, this response is wrong. Let me correct it."


def _answer_ids(tokenizer: Any, text: str, end_of_turn: int) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn]


def make_records(tokenizer: Any, n: int, stage: int, seed: int = 0) -> list[dict[str, Any]]:
    fmt = chat_format(tokenizer)
    rng = random.Random(f"sft-demo:{seed}:{stage}")
    records = []
    for row in make_arithmetic_problems(n, seed=seed + stage, difficulty=1):
        answer = int(row["answer"])
        wrong = answer + rng.choice((-3, -2, -1, 1, 2, 3))
        y_init = f"Let me compute. The answer is \\boxed{{{wrong}}}."
        y_revised = f"Checking again step by step. The answer is \\boxed{{{answer}}}."
        records.append(
            dict(
                stage=stage,
                problem_id=f"demo-{stage}-{len(records)}",
                mode="math",
                messages=build_messages(row["problem"], "math"),
                phrase=PHRASE,
                init_correct=False,
                y_init=y_init,
                y_init_ids=_answer_ids(tokenizer, y_init, fmt.end_of_turn_id),
                y_revised=y_revised,
                y_revised_ids=_answer_ids(tokenizer, y_revised, fmt.end_of_turn_id),
            )
        )
    return records


def write_demo_data(
    model_dir: str | Path, out_dir: str | Path, n: int = 64, seed: int = 0
) -> dict[int, Path]:
    """Write ``stage1.jsonl`` and ``stage2.jsonl`` (n records each) for the tokenizer in model_dir."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stage in (1, 2):
        path = out / f"stage{stage}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_records(tokenizer, n, stage, seed)))
        paths[stage] = path
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory (its tokenizer is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for stage, path in write_demo_data(args.model, args.out, args.n, args.seed).items():
        print(f"stage {stage}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
