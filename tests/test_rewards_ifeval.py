"""IFEval: every one of the 25 instruction checks on a response that follows it and one that does not;
the loader on rows shaped like the published release; strict vs loose prompt-level grading."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sdzero.data.problems import ProblemSource, load_problems
from megatron_sdzero.rewards import RewardConfig, build_reward
from megatron_sdzero.rewards.ifeval import CHECKS, count_sentences, followed

WORDS_300 = " ".join(["word"] * 300)

# instruction id, kwargs, a response that follows it, one that does not
CASES = [
    ("keywords:existence", {"keywords": ["coffee", "tea"]}, "I like Coffee and tea.", "I like coffee."),
    ("keywords:frequency", {"keyword": "lake", "frequency": 3, "relation": "at least"},
     "lake lake Lake", "lake"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A badger is fine.", "This is Bad."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "zoo", "zzz"),
    ("language:response_language", {"language": "de"}, "Das ist ein kurzer deutscher Satz über das Wetter.",
     "This is a short English sentence about the weather."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith came. He left.", "One. Two. Three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First.\n***\nSecond.", "First.\n***\n\n***\nB"),
    ("length_constraints:number_words", {"num_words": 300, "relation": "at least"}, WORDS_300, "too short"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "Start here.\n\n\"Then, go on.", "Start here.\n\nNow go on."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name] only"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Body.\nP.S. see you", "Body. PS see you"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", "* one\n* two\n* three"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "Perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* and **"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nA\nSection 2\nB", "Section 1\nA"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<Poem of Joy>>\ntext", "<<>> text"),
    ("combination:two_responses", {}, "first\n******\nsecond", "same\n******\nsame"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?\"", "Done."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THE quick BROWN fox", "The Quick fox"),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER.", "This is mixed."),
    ("change_case:english_lowercase", {}, "this is an english sentence about the weather.", "This is Mixed."),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
    ("startend:quotation", {}, '"Wrapped in quotes."', 'Not "wrapped".'),
]  # fmt: skip


def test_the_cases_cover_all_25_instructions() -> None:
    assert len(CHECKS) == 25 and {c[0] for c in CASES} == set(CHECKS)


@pytest.mark.parametrize(("instruction", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_each_instruction(instruction: str, kwargs: dict, good: str, bad: str) -> None:
    assert followed(good, instruction, kwargs)
    assert not followed(bad, instruction, kwargs)
    assert not followed("", instruction, kwargs)  # an empty response follows nothing


def test_sentence_counting() -> None:
    assert count_sentences("Mr. J. Smith paid 3.5 dollars. Then he left! Why?") == 3
    assert count_sentences("One sentence without an end") == 1


def _published_rows() -> list[dict]:
    """Three rows of google/IFEval (keys 1000, 1001, 1005) as its Parquet release stores them: one
    kwargs struct with every field, null where the instruction does not use it."""
    fields = ["num_highlights", "relation", "num_words", "num_placeholders", "prompt_to_repeat", "keywords"]

    def kwargs(**given):
        return {name: given.get(name) for name in fields}

    return [
        {
            "key": 1000,
            "prompt": 'Write a 300+ word summary of the wikipedia page "https://en.wikipedia.org/wiki/Raymond_III,'
            '_Count_of_Tripoli". Do not use any commas and highlight at least 3 sections that has titles in '
            "markdown format, for example *highlighted section part 1*, *highlighted section part 2*, "
            "*highlighted section part 3*.",
            "instruction_id_list": [
                "punctuation:no_comma", "detectable_format:number_highlighted_sections",
                "length_constraints:number_words",
            ],
            "kwargs": [kwargs(), kwargs(num_highlights=3), kwargs(relation="at least", num_words=300)],
        },
        {
            "key": 1001,
            "prompt": "I am planning a trip to Japan, and I would like thee to write an itinerary for my "
            "journey in a Shakespearean style. You are not allowed to use any commas in your response.",
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [kwargs()],
        },
        {
            "key": 1005,
            "prompt": "Write a resume for a fresh high school graduate who is seeking their first job. "
            "Make sure to include at least 12 placeholder represented by square brackets, such as [address], "
            "[name].",
            "instruction_id_list": ["detectable_content:number_placeholders"],
            "kwargs": [kwargs(num_placeholders=12)],
        },
    ]  # fmt: skip


def test_published_rows_load_and_grade(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ifeval.parquet"
    pq.write_table(pa.Table.from_pylist(_published_rows()), path)
    problems, report = load_problems(ProblemSource(path=path, format="ifeval", mode="instruct"))
    assert report.loaded == 3 and problems[0].text.startswith("Write a 300+ word summary")
    assert problems[0].reference["kwargs"][1] == {"num_highlights": 3}  # nulls dropped
    summary = "*Early life* *Regency* *Legacy* " + WORDS_300
    responses = [
        summary,  # follows all three
        summary.replace("Legacy*", "Legacy, end*"),  # a comma
        "**Act I**\nThou shalt see Kyoto",
        "**Act I**\nThou shalt see Kyoto, and Nara",
        " ".join(f"[field{i}]" for i in range(12)),
        "[name] [address]",
    ]
    references = [p.reference for p in problems for _ in range(2)]
    with build_reward(RewardConfig(mode="instruct")) as grader:
        graded = grader.grade_batch(responses, references)
    assert graded.scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert graded.results[1].detail == "punctuation:no_comma"


def test_loose_grading_forgives_a_preamble_and_markdown() -> None:
    kwargs = {"end_phrase": "Is there anything else?"}
    response = "**Is there anything else?**"
    assert not followed(response, "startend:end_checker", kwargs)
    assert followed(response, "startend:end_checker", kwargs, loose=True)
    preamble = "Sure, here it is:\nno commas at all"
    assert not followed(preamble, "punctuation:no_comma", {}) and followed(
        preamble, "punctuation:no_comma", {}, True
    )
