"""IFEval: the 25 verifiable instructions of Zhou et al. (2023), checked on a response.

No maintained PyPI implementation works offline here: the reference code and its packagings
(``lm-eval``'s ifeval utils, ``if-verifiable``) count words and sentences with NLTK's punkt model,
which is downloaded at run time. This module implements the published instruction list with two
documented departures: words are ``\\w+`` runs (what the reference's word counter uses too, but not
its capital-word counter, which tokenises with punkt) and sentences are split by a regular expression
(:func:`count_sentences`). Language checks use ``langdetect`` (seeded, so deterministic).

A problem's reference is ``{"ifeval": [instruction ids], "kwargs": [dict per instruction],
"prompt": str}``; a response scores 1 when it follows every instruction (the paper's prompt-level
accuracy), strictly, or with ``loose: true`` on any of the paper's relaxed variants of the response
(first line, last line or both removed, asterisks removed).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_sdzero.rewards.base import Reward, RewardResult

IFEVAL_KEY = "ifeval"
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
ABBREVIATIONS = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|Inc|Ltd|Co|U\.S)\.$", re.IGNORECASE
)
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
    """Sentences end at . ! or ? followed by whitespace, except after a common abbreviation or a
    single capital initial ("J. Smith") or inside a number ("3.5")."""
    pieces = [p for p in SENTENCE_END.split(text.strip()) if p.strip()]
    count = 0
    for number, piece in enumerate(pieces):
        last = number == len(pieces) - 1
        if not last and (ABBREVIATIONS.search(piece) or re.search(r"(?:^|\s)[A-Z]\.$", piece)):
            continue  # the sentence goes on
        count += 1
    return count


def _compare(count: int, relation: str, target: int) -> bool:
    if relation == "less than":
        return count < target
    if relation == "at least":
        return count >= target
    raise ValueError(f"unknown relation {relation!r}")


def _language(text: str) -> str | None:
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None  # undecidable (no letters): the reference counts the instruction as followed


def _paragraphs_by_stars(text: str, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def _nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = re.split(r"\n\n", text)
    kept = [p for p in paragraphs if p.strip()]
    if len(kept) != num_paragraphs or nth_paragraph > len(kept):
        return False
    words = kept[nth_paragraph - 1].strip().split()
    word = words[0].strip(".,?!'\"").lower() if words else ""
    return word == first_word.lower()


def _postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip().lower()
    if marker == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    elif marker == "p.p.s":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    else:
        pattern = r"\s*" + re.escape(marker) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def _bullets(text: str, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _highlights(text: str, num_highlights: int) -> bool:
    single = re.findall(r"\*[^\n\*]*\*", text)
    double = re.findall(r"\*\*[^\n\*]*\*\*", text)
    found = sum(bool(h.strip("*").strip()) for h in single) + sum(bool(h.strip("*").strip()) for h in double)
    return found >= num_highlights


def _sections(text: str, section_spliter: str, num_sections: int) -> bool:
    pattern = r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?"
    return len(re.split(pattern, text)) - 1 >= num_sections


def _json(text: str) -> bool:
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _title(text: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def _two_responses(text: str) -> bool:
    parts = text.split("******")
    kept = []
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            kept.append(part.strip())
    return len(kept) == 2 and kept[0] != kept[1]


def _capital_words(text: str, capital_frequency: int, capital_relation: str) -> bool:
    capitals = sum(word.isupper() for word in re.findall(r"\w+", text))
    return _compare(capitals, capital_relation, capital_frequency)


CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": lambda t, keywords: all(re.search(k, t, flags=re.IGNORECASE) for k in keywords),
    "keywords:frequency": lambda t, keyword, frequency, relation: _compare(
        len(re.findall(re.escape(keyword), t, flags=re.IGNORECASE)), relation, frequency
    ),
    "keywords:forbidden_words": lambda t, forbidden_words: (
        not any(re.search(r"\b" + re.escape(w) + r"\b", t, flags=re.IGNORECASE) for w in forbidden_words)
    ),
    "keywords:letter_frequency": lambda t, letter, let_frequency, let_relation: _compare(
        t.lower().count(letter.lower()), let_relation, let_frequency
    ),
    "language:response_language": lambda t, language: _language(t) in (None, language),
    "length_constraints:number_sentences": lambda t, num_sentences, relation: _compare(
        count_sentences(t), relation, num_sentences
    ),
    "length_constraints:number_paragraphs": lambda t, num_paragraphs: _paragraphs_by_stars(t, num_paragraphs),
    "length_constraints:number_words": lambda t, num_words, relation: _compare(
        count_words(t), relation, num_words
    ),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": lambda t, num_placeholders: (
        len(re.findall(r"\[.*?\]", t)) >= num_placeholders
    ),
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:constrained_response": lambda t: any(o in t.strip() for o in CONSTRAINED_RESPONSES),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda t, prompt_to_repeat: (
        t.strip().lower().startswith(prompt_to_repeat.strip().lower())
    ),
    "startend:end_checker": lambda t, end_phrase: (
        t.strip().strip('"').lower().endswith(end_phrase.strip().lower())
    ),
    "change_case:capital_word_frequency": _capital_words,
    "change_case:english_capital": lambda t: t.isupper() and _language(t) in (None, "en"),
    "change_case:english_lowercase": lambda t: t.islower() and _language(t) in (None, "en"),
    "punctuation:no_comma": lambda t: "," not in t,
    "startend:quotation": lambda t: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
}


def loose_variants(response: str) -> list[str]:
    """The paper's relaxed readings of a response: markdown asterisks and a first/last line dropped."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return [v for text in cut for v in (text, text.replace("*", "")) if v.strip()]


def followed(response: str, instruction: str, kwargs: Mapping[str, Any], loose: bool = False) -> bool:
    """Whether ``response`` follows one instruction (kwargs: the dataset's, None values ignored)."""
    check = CHECKS.get(instruction)
    if check is None:
        raise ValueError(f"unknown IFEval instruction {instruction!r}")
    arguments = {k: v for k, v in kwargs.items() if v is not None}
    if "prompt_to_repeat" in arguments and instruction != "combination:repeat_prompt":
        arguments.pop("prompt_to_repeat")
    texts = loose_variants(response) if loose else [response]
    return any(response.strip() and check(text, **arguments) for text in texts)


def is_ifeval_reference(reference: Any) -> bool:
    return isinstance(reference, Mapping) and IFEVAL_KEY in reference


@dataclass
class IFEvalConfig:
    loose: bool = False  # the paper's loose accuracy instead of strict


class IFEvalReward(Reward):
    """r = 1[the response follows every instruction of its prompt]."""

    mode = "instruct"

    def __init__(self, config: IFEvalConfig | None = None) -> None:
        self.config = config or IFEvalConfig()

    def _grade_all(self, responses: list[str], answers: list[Any]) -> list[RewardResult]:
        return [self._grade(response, answer) for response, answer in zip(responses, answers, strict=True)]

    def _grade(self, response: str, reference: Mapping[str, Any]) -> RewardResult:
        started = time.monotonic()
        missed = [
            instruction
            for instruction, kwargs in zip(reference[IFEVAL_KEY], reference["kwargs"], strict=True)
            if not followed(response, instruction, kwargs or {}, self.config.loose)
        ]
        score = 0.0 if missed else 1.0
        reason = "followed" if not missed else "missed"
        return RewardResult(score, reason, "", time.monotonic() - started, ", ".join(missed))


def ifeval_reference(instructions: Sequence[str], kwargs: Sequence[Mapping[str, Any]], prompt: str) -> dict:
    unknown = [i for i in instructions if i not in CHECKS]
    if unknown:
        raise ValueError(f"unknown IFEval instruction(s) {unknown}")
    cleaned = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
    return {IFEVAL_KEY: list(instructions), "kwargs": cleaned, "prompt": prompt}
