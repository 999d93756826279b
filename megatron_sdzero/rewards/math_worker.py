"""One math-verify worker process (run as a script by ``MathReward``, not imported).

Protocol, one JSON object per line: the worker first writes ``{"ready": true}`` (or
``{"error": "..."}`` if it cannot start), then answers each request
``{"id": n, "response": str, "gold": str}`` with ``{"id": n, "score": 0|1, "extracted": str,
"reason": str}``. It grades in its main thread, so math-verify's own signal-based timeouts work; the
parent adds a hard deadline on top and SIGKILLs a worker that is stuck anyway.

Only the standard library and math-verify are imported: this file runs by path, without the package.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import traceback
from typing import TextIO

EXTRACTED_CHARS = 200
GOLD_CACHE_SIZE = 4096


def _protocol_stream() -> TextIO:
    """Keeps the protocol on a private copy of stdout; fd 1 goes to stderr, so stray prints are harmless."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(protocol_fd, "w", buffering=1, encoding="utf-8")


def _send(stream: TextIO, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")


def main() -> None:
    internal_timeout_s, memory_mb = int(sys.argv[1]), int(sys.argv[2])
    protocol = _protocol_stream()
    if memory_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    # math-verify logs every timed-out input in full (a 1 MB response becomes a 1 MB log line)
    logging.disable(logging.CRITICAL)
    try:
        from math_verify import parse, verify
    except BaseException:  # report any import failure to the parent
        _send(protocol, {"error": traceback.format_exc()})
        return

    gold_cache: dict[str, list] = {}

    def parse_gold(gold: str) -> list:
        if gold not in gold_cache:
            parsed = parse(gold, parsing_timeout=internal_timeout_s)
            if not parsed:
                return parsed  # may be a timeout on a busy node: do not remember it
            if len(gold_cache) >= GOLD_CACHE_SIZE:
                gold_cache.pop(next(iter(gold_cache)))
            gold_cache[gold] = parsed
        return gold_cache[gold]

    def grade(response: str, gold: str) -> tuple[int, str, str]:
        gold_parsed = parse_gold(gold)
        if not gold_parsed:
            return 0, "", "gold_unparseable"
        predicted = parse(response, parsing_timeout=internal_timeout_s)
        if not predicted:
            return 0, "", "no_answer"
        # parse() returns [sympy value, raw string]; str() of a huge sympy value can hang, the raw cannot
        extracted = next((item for item in reversed(predicted) if isinstance(item, str)), "")
        correct = verify(gold_parsed, predicted, timeout_seconds=internal_timeout_s)
        return int(correct), extracted[:EXTRACTED_CHARS], "correct" if correct else "wrong_answer"

    grade("\\boxed{1}", "\\boxed{1}")  # warm up lazy imports so the first real item is not slow
    _send(protocol, {"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            score, extracted, reason = grade(request["response"], request["gold"])
        except BaseException as error:  # math-verify's TimeoutException is a BaseException
            score, extracted, reason = 0, "", f"error: {type(error).__name__}"
        _send(protocol, {"id": request["id"], "score": score, "extracted": extracted, "reason": reason})


if __name__ == "__main__":
    main()
