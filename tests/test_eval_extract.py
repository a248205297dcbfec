"""Answer extraction for BISON / NLVR2 (the original implementation's rule, one difference fixed) and the accuracy summary."""

import pytest

from sparkles.eval.benchmarks import bison, nlvr2
from sparkles.eval.benchmarks.choice import choice_summary, extract_choice

BISON_CASES = [
    ("Let's think step by step. The bus is red. Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#2.", "image#2"),
    ("Let's think step by step. Therefore, the answer is IMAGE #1.", "image#1"),
    ("Let's think step by step. Therefore the answer is not IMAGE#1.", "image#2"),
    ("Let's think step by step. Therefore, the answer is not image #2.", "image#1"),
    ("THEREFORE, THE ANSWER IS IMAGE#2, because the dog is brown.", "image#2"),
    ("Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#1", "image#1"),  # no final punctuation
    # the explicit statement wins over an earlier mention (upstream took the first mention)
    ("Therefore, comparing IMAGE#1 with the caption, the answer is IMAGE#2.", "image#2"),
    # only the text after the last "therefore" counts
    ("Therefore IMAGE#2 looks odd. Therefore, the answer is IMAGE#1.", "image#1"),
    ("Therefore, it is IMAGE#2 that matches.", "image#2"),  # one option mentioned, no explicit form
    ("I believe IMAGE#1 matches the caption.", None),  # missing "therefore"
    ("Therefore, IMAGE#1 or IMAGE#2 could both fit.", None),  # ambiguous
    ("Therefore, I cannot decide.", None),  # neither option
    ("Therefore, the answer is IMAGE#12.", None),  # not the option IMAGE#1
    ("", None),
]

NLVR2_CASES = [
    ("Let's think step by step. Two dogs. Therefore, the answer (TRUE or FALSE) is TRUE.", "true"),
    ("Therefore, the answer (true or false) is false.", "false"),
    ("Therefore, the statement is not true.", "false"),
    ("Therefore, the answer is not false.", "true"),
    ("Therefore, the answer is FALSE because there are three dogs.", "false"),
    ("Therefore, the answer is true: both images show dogs, so false would be wrong.", "true"),
    ("Therefore it is untrue.", None),  # "untrue" is not the option "true"
    ("There are two dogs in total, so TRUE.", None),  # missing "therefore"
    ("Therefore, true or false is hard to say.", None),  # ambiguous
]


@pytest.mark.parametrize("response,expected", BISON_CASES)
def test_bison_extraction(response, expected):
    assert extract_choice(response, bison.OPTIONS) == expected


@pytest.mark.parametrize("response,expected", NLVR2_CASES)
def test_nlvr2_extraction(response, expected):
    assert extract_choice(response, nlvr2.OPTIONS) == expected


def test_prompts_end_with_the_phrase_the_extractor_reads():
    # the answer phrase the prompt asks for, completed with a choice, must parse back to that choice
    for prompt, options in ((bison.prompt("a cat"), bison.OPTIONS), (nlvr2.prompt("two cats"), nlvr2.OPTIONS)):
        phrase = prompt.split('finish it with "')[1].split('"')[0]
        for option in options:
            assert extract_choice(f"Let's think step by step. {phrase} {option}.", options) == option.lower()


def test_extract_choice_needs_two_options():
    with pytest.raises(ValueError):
        extract_choice("Therefore, yes.", ("YES",))


def test_choice_summary_counts_unparseable_as_wrong():
    items = [
        {"label": "IMAGE#1", "predict": "image#1"},
        {"label": "IMAGE#2", "predict": "image#1"},
        {"label": "True", "predict": "true", "generations": 3},
        {"label": "False", "predict": None, "generations": 11},
    ]
    s = choice_summary(items)
    assert s["total"] == 4 and s["correct"] == 2 and s["unparseable"] == 1
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["accuracy_parsed"] == pytest.approx(2 / 3)
    assert s["generations"] == 1 + 1 + 3 + 11
