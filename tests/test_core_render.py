"""The one conversation renderer: upstream text layouts, slots, labels and truncation."""

from __future__ import annotations

import pytest

from sparkles.conversation.render import IGNORE_INDEX, Message, Renderer, SampleTooLong, collate, render_text
from sparkles.conversation.template import (INFER_LAYOUT, TRAIN_LAYOUT, parse_upstream_instruction,
                                            replace_glyphs)
from sparkles.testing.tiny import write_tiny_tokenizer

NQ = 4


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    from sparkles.models.tokenizer import load_tokenizer

    tok = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    return Renderer(tok, NQ)


Q1 = "Could IMAGE#12<Img><ImageHere></Img> and IMAGE#7<Img><ImageHere></Img> be compared?"
A1 = "IMAGE#12 shows two red circles."
Q2 = "Now add IMAGE#3<Img><ImageHere></Img> to IMAGE#12."


def conv():
    return [Message("user", Q1), Message("assistant", A1), Message("user", Q2)]


def test_train_layout_reproduces_upstream_instruction_string():
    instruction = f"###Human: {Q1}###Assistant: {A1}###Human: {Q2}###Assistant: "
    assert render_text(conv(), TRAIN_LAYOUT) == instruction
    roles = parse_upstream_instruction(instruction)
    assert [Message(r, c) for r, c in roles] == conv()


def test_infer_layout_has_system_text_and_no_trailing_space():
    text = render_text(conv(), INFER_LAYOUT)
    assert text.startswith(INFER_LAYOUT.system + "###Human: " + Q1)
    assert text.endswith(f"###Human: {Q2}###Assistant:")
    assert render_text(conv()[:1], INFER_LAYOUT) == f"{INFER_LAYOUT.system}###Human: {Q1}###Assistant:"


def test_labels_cover_exactly_the_answer_and_end_symbol(renderer):
    r = renderer.render(conv(), TRAIN_LAYOUT, target="IMAGE#3 has a blue square.")
    target_ids = renderer.encode("IMAGE#3 has a blue square.###")
    loss_positions = [i for i, l in enumerate(r.labels) if l != IGNORE_INDEX]
    assert [r.labels[i] for i in loss_positions] == target_ids
    assert loss_positions == list(range(len(r) - len(target_ids), len(r)))  # the tail, nothing else
    assert r.input_ids[0] == renderer.bos_id and r.labels[0] == IGNORE_INDEX
    assert r.text.endswith("###Assistant: IMAGE#3 has a blue square.###")


def test_slots_are_nq_positions_per_image_in_order(renderer):
    r = renderer.render(conv(), TRAIN_LAYOUT, target="ok")
    assert sum(r.image_slot_mask) == 3 * NQ
    assert r.image_indices == [0, 1, 2]
    # slot positions hold a valid id (never an out-of-vocabulary placeholder)
    vocab = len(renderer.tokenizer)
    assert all(0 <= t < vocab for t in r.input_ids)
    runs, run = [], 0
    for m in r.image_slot_mask + [False]:
        if m:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert runs == [NQ, NQ, NQ]


def test_glyphs_become_slots():
    text = replace_glyphs("Compare IMAGE#1✨ with IMAGE#2⭐")
    assert text == "Compare IMAGE#1<Img><ImageHere></Img> with IMAGE#2<Img><ImageHere></Img>"


def test_truncation_drops_whole_earlier_turns_never_part_of_a_slot(renderer):
    full = renderer.render(conv(), TRAIN_LAYOUT, target="fine")
    last_turn_only = renderer.render(conv()[2:], TRAIN_LAYOUT, target="fine")
    r = renderer.render(conv(), TRAIN_LAYOUT, target="fine", max_length=len(full) - 1)
    assert r.dropped_turns == 1
    assert r.image_indices == [2]  # the dropped turn's two images went with it
    assert sum(r.image_slot_mask) == NQ
    assert r.input_ids == last_turn_only.input_ids
    with pytest.raises(SampleTooLong):
        renderer.render(conv(), TRAIN_LAYOUT, target="fine", max_length=len(last_turn_only) - 1)


def test_inference_render_ends_with_assistant_header_and_has_no_labels(renderer):
    r = renderer.render(conv(), INFER_LAYOUT)
    assert all(l == IGNORE_INDEX for l in r.labels)
    assert renderer.tokenizer.decode(r.input_ids[-3:]).endswith("Assistant:")


def test_train_and_infer_prompts_tokenise_the_answer_boundary_alike(renderer):
    # Upstream trains on "...###Assistant: answer" and infers from "...###Assistant:". The answer's leading
    # space belongs to its first token, so both prompts end in the same tokens.
    train = renderer.render(conv()[:1], TRAIN_LAYOUT, target="yes")
    infer = renderer.render(conv()[:1], INFER_LAYOUT.with_system(None))
    n_target = len(renderer.encode("yes###"))
    assert train.input_ids[:-n_target] == infer.input_ids


def test_roles_must_alternate(renderer):
    with pytest.raises(ValueError, match="alternate"):
        renderer.render([Message("user", "a"), Message("user", "b")], TRAIN_LAYOUT)


def test_collate_pads_left_or_right(renderer):
    a = renderer.render(conv()[:1], TRAIN_LAYOUT, target="yes")
    b = renderer.render(conv(), TRAIN_LAYOUT, target="yes")
    right = collate([a, b], pad_id=renderer.pad_id)
    left = collate([a, b], pad_id=renderer.pad_id, padding_side="left")
    pad = len(b) - len(a)
    assert right["attention_mask"][0].tolist() == [1] * len(a) + [0] * pad
    assert left["attention_mask"][0].tolist() == [0] * pad + [1] * len(a)
    assert right["labels"][0, len(a):].eq(IGNORE_INDEX).all()
    assert int(right["image_slot_mask"].sum()) == (2 + 3) * NQ


def test_unsupervised_spans_take_the_loss_off_their_tokens_only(renderer):
    target = "IMAGE#3: a red square: two, no; a blue circle: one, yes."
    spans = [(target.index("two"), target.index("two") + 3), (target.index("one"), target.index("one") + 3)]
    plain = renderer.render(conv(), TRAIN_LAYOUT, target=target)
    masked = renderer.render(conv(), TRAIN_LAYOUT, target=target, unsupervised=spans)
    assert masked.input_ids == plain.input_ids  # the same tokens, fed as input
    dropped = [t for t, a, b in zip(plain.input_ids, plain.labels, masked.labels) if a != b]
    assert all(b == IGNORE_INDEX for a, b in zip(plain.labels, masked.labels) if a != b)
    assert "".join(renderer.tokenizer.decode([t]).strip() for t in dropped) == "twoone"  # "one" is 3 tokens here
    kept = renderer.tokenizer.decode([t for t in masked.labels if t != IGNORE_INDEX])
    assert "no;" in kept and "yes." in kept and "square:" in kept and "two" not in kept


@pytest.mark.parametrize("span", [(5, 5), (-1, 3), (0, 10_000)])
def test_unsupervised_span_outside_the_target_is_an_error(renderer, span):
    with pytest.raises(ValueError, match="not inside"):
        renderer.render(conv(), TRAIN_LAYOUT, target="IMAGE#3 has a blue square.", unsupervised=[span])
