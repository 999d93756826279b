"""Seeded integer-answer math problems, so GPU and demo runs need no internet.

Difficulty 0: a sum or difference of numbers up to 20 (the CPU demo's toy task: a tiny model learns
it in a minute). 1: one operation on small numbers. 2: a two-operation expression with parentheses.
3: a short GSM-style word problem (two or three steps). Every answer is an integer, problems are
unique within a call, and the same (n, seed, difficulty) always gives the same list. Each row also
carries a short worked ``solution`` ending in ``\boxed{answer}`` (a demonstration for SDFT); it is
computed from the drawn numbers, so adding it left the problems themselves unchanged.

    python -m megatron_sdzero.data.arithmetic --out problems.jsonl --n 500 --seed 0 --difficulty 2
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

Row = dict[str, str]

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "coins")


def make_arithmetic_problems(n: int, seed: int = 0, difficulty: int = 1) -> list[Row]:
    """``n`` unique rows ``{"problem", "answer", "solution"}`` (answer: an integer in decimal)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if difficulty not in GENERATORS:
        raise ValueError(f"difficulty must be one of {sorted(GENERATORS)}, got {difficulty}")
    rng = random.Random(f"arithmetic:{seed}:{difficulty}")
    generate = GENERATORS[difficulty]
    rows: dict[str, Row] = {}
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot make {n} unique problems at difficulty {difficulty}")
        problem, answer, steps = generate(rng)
        solution = f"{steps} The answer is \\boxed{{{answer}}}."
        rows.setdefault(problem, {"problem": problem, "answer": str(answer), "solution": solution})
    return list(rows.values())


def write_arithmetic_problems(path: str | Path, n: int, seed: int = 0, difficulty: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_arithmetic_problems(n, seed, difficulty)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _small_sum_or_difference(rng: random.Random) -> tuple[str, int, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    answer = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", answer, f"{a} {op} {b} = {answer}."


def _one_operation(rng: random.Random) -> tuple[str, int, str]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    op = rng.choice("+-*")
    if op == "-" and b > a:
        a, b = b, a
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", answer, f"{a} {op} {b} = {answer}."


def _two_operations(rng: random.Random) -> tuple[str, int, str]:
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 12)
    shape = rng.randrange(3)
    if shape == 0:
        return (
            f"Compute ({a} + {b}) * {c}.",
            (a + b) * c,
            f"{a} + {b} = {a + b}, and {a + b} * {c} = {(a + b) * c}.",
        )
    if shape == 1:
        return (
            f"Compute {a} * {c} - {b}.",
            a * c - b,
            f"{a} * {c} = {a * c}, and {a * c} - {b} = {a * c - b}.",
        )
    product = a * c  # exact division
    return f"Compute {product} / {c} + {b}.", a + b, f"{product} / {c} = {a}, and {a} + {b} = {a + b}."


def _word_problem(rng: random.Random) -> tuple[str, int, str]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    start, packs, per_pack = rng.randint(3, 40), rng.randint(2, 6), rng.randint(2, 12)
    shape = rng.randrange(3)
    if shape == 0:
        given = rng.randint(1, start + packs * per_pack - 1)
        total = start + packs * per_pack - given
        return (
            f"{name} has {start} {item}. {name} buys {packs} packs with {per_pack} {item} each, "
            f"then gives {given} {item} to {other}. How many {item} does {name} have now?",
            total,
            f"The packs hold {packs} * {per_pack} = {packs * per_pack} {item}, so {name} has "
            f"{start} + {packs * per_pack} = {start + packs * per_pack}, and after giving {given} away, "
            f"{start + packs * per_pack} - {given} = {total}.",
        )
    if shape == 1:
        friends = rng.randint(2, 6)
        each = rng.randint(2, 15)
        total = friends * each
        return (
            f"{name} shares {total + start} {item} equally among {friends} friends after keeping {start} "
            f"for themself. How many {item} does each friend get?",
            each,
            f"After keeping {start}, {total + start} - {start} = {total} {item} are shared, and "
            f"{total} / {friends} = {each}.",
        )
    price, count, budget_extra = rng.randint(2, 20), rng.randint(2, 9), rng.randint(0, 30)
    budget = price * count + budget_extra
    return (
        f"{name} has {budget} dollars and buys {count} {item} at {price} dollars each. "
        f"How many dollars does {name} have left?",
        budget_extra,
        f"The {item} cost {count} * {price} = {price * count} dollars, and {budget} - {price * count} = "
        f"{budget_extra}.",
    )


GENERATORS: dict[int, Callable[[random.Random], tuple[str, int, str]]] = {
    0: _small_sum_or_difference,
    1: _one_operation,
    2: _two_operations,
    3: _word_problem,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output JSONL path")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=int, default=1, choices=sorted(GENERATORS))
    args = parser.parse_args(argv)
    path = write_arithmetic_problems(args.out, args.n, args.seed, args.difficulty)
    print(f"wrote {args.n} problems to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
