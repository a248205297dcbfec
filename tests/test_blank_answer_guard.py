"""The blank-answer guard: which tokens it forbids, for which rows, on a padded vocabulary, and how many
stop-string tables it keeps when every API request brings its own stop strings."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from sparkles.engine.decoding import BlankAnswerGuard, GenerationConfig, blank_answer_guard
from sparkles.testing.tiny import write_tiny_tokenizer


def _tokenizer(tmp_path):
    write_tiny_tokenizer(tmp_path / "tok", texts=["###Human: how many squares? ###Assistant: two red squares ##"])
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def test_only_rows_with_a_blank_answer_lose_the_tokens_that_open_a_stop_string(tmp_path):
    tok = _tokenizer(tmp_path)
    guard = BlankAnswerGuard(tok, ("###",))
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(len(tok))]
    opening = {i for i, t in enumerate(texts)
               if t.strip() and ("###".startswith(t.strip()) or t.strip().startswith("###"))}
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    word = next(i for i, t in enumerate(texts) if t.strip() == "two")
    assert opening and blank

    width = len(tok) + 5  # a model may pad its vocabulary beyond the tokenizer's
    scores = torch.zeros(3, width)
    history = torch.tensor([[blank[0]], [word], [blank[-1]]])  # blank, answered, blank
    out = guard(history, scores)
    forbidden = [set(torch.nonzero(row == float("-inf")).flatten().tolist()) for row in out]
    assert forbidden == [opening, set(), opening]
    assert torch.equal(scores, torch.zeros(3, width))  # the input is not changed in place
    assert torch.isinf(guard(torch.zeros(3, 0, dtype=torch.long), scores)).sum() == 3 * len(opening)  # no tokens yet


def test_request_stop_strings_keep_a_bounded_number_of_tables(tmp_path):
    tok = _tokenizer(tmp_path)
    chat_stops = BlankAnswerGuard(tok, ("###",)).opening
    for k in range(3 * BlankAnswerGuard.MAX_STOP_SETS):
        BlankAnswerGuard(tok, ("###", f"stop{k}"))
        BlankAnswerGuard(tok, ("###",))  # the chat's own stops stay in use, so they stay cached
    tables = BlankAnswerGuard._opening_tables[tok]
    assert len(tables) == BlankAnswerGuard.MAX_STOP_SETS and tables[("###",)] is chat_stops


def test_the_guard_is_made_only_when_asked_for_and_useful(tmp_path):
    tok = _tokenizer(tmp_path)
    assert blank_answer_guard(GenerationConfig(stop_strings=("###",)), tok) is None  # nonblank_answer off
    assert blank_answer_guard(GenerationConfig(stop_strings=("###",), nonblank_answer=True), None) is None
    assert blank_answer_guard(GenerationConfig(stop_strings=("\u2603\u2603",), nonblank_answer=True), tok) is None
    assert isinstance(blank_answer_guard(GenerationConfig(stop_strings=("###",), nonblank_answer=True), tok),
                      BlankAnswerGuard)
