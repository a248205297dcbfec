"""SparklesChat forward/backward, freezing, the image splice, and the chat engine's generation paths."""

from __future__ import annotations

import pytest
import torch

from sparkles.engine.batch import generate_batch
from sparkles.engine.chat import Chat, ChatError
from sparkles.conversation.render import Message, Renderer, collate
from sparkles.conversation.template import TRAIN_LAYOUT
from sparkles.testing.tiny import build_tiny_model


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=g) for _ in range(n)]


def test_frozen_parts_get_no_gradient_and_stay_in_eval_mode(tmp_path):
    model = build_tiny_model(tmp_path, freeze_vit=True, freeze_qformer=True, freeze_llm=True)
    model.train()
    assert not model.visual_encoder.training and not model.Qformer.training and not model.llama_model.training
    assert sorted(model.trainable_state_dict()) == ["llama_proj.bias", "llama_proj.weight"]
    renderer = Renderer(model.tokenizer, model.num_query_token)
    r = renderer.render([Message("user", "See IMAGE#1<Img><ImageHere></Img>.")], TRAIN_LAYOUT, target="a red circle")
    batch = collate([r], pad_id=renderer.pad_id)
    out = model(**batch, images=torch.stack(_images(1)))
    out["loss"].backward()
    assert model.llama_proj.weight.grad is not None and model.llama_proj.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if not name.startswith("llama_proj."):
            assert p.grad is None, name


def test_batch_images_encoded_in_one_pass_match_one_by_one(tiny_model):
    imgs = torch.stack(_images(3))
    with torch.no_grad():
        together = tiny_model.encode_images(imgs)
        alone = torch.cat([tiny_model.encode_images(imgs[i:i + 1]) for i in range(3)])
    assert together.shape == (3, tiny_model.num_query_token, tiny_model.llama_model.config.hidden_size)
    assert torch.allclose(together, alone, atol=1e-5)


def test_slot_and_image_count_mismatch_is_an_error(tiny_model):
    renderer = Renderer(tiny_model.tokenizer, tiny_model.num_query_token)
    r = renderer.render([Message("user", "IMAGE#1<Img><ImageHere></Img> and IMAGE#2<Img><ImageHere></Img>")],
                        TRAIN_LAYOUT, target="x")
    batch = collate([r], pad_id=renderer.pad_id)
    with pytest.raises(ValueError, match="2 images of .* but 1 image"):
        tiny_model(**batch, images=torch.stack(_images(1)))


def test_image_content_changes_the_loss(tiny_model):
    renderer = Renderer(tiny_model.tokenizer, tiny_model.num_query_token)
    r = renderer.render([Message("user", "IMAGE#1<Img><ImageHere></Img>")], TRAIN_LAYOUT, target="two red circles")
    batch = collate([r], pad_id=renderer.pad_id)
    with torch.no_grad():
        a = tiny_model(**batch, images=torch.stack(_images(1, seed=1)))["loss"]
        b = tiny_model(**batch, images=torch.stack(_images(1, seed=2)))["loss"]
    assert abs(float(a) - float(b)) > 1e-4


def test_decoder_image_tokens_hands_the_decoder_the_last_query_outputs(tmp_path):
    everything = build_tiny_model(tmp_path, seed=0, init_std=0.3).eval()
    last_two = build_tiny_model(tmp_path, seed=0, init_std=0.3, decoder_image_tokens=2).eval()
    assert everything.image_tokens == everything.num_query_token == 4 and last_two.image_tokens == 2
    imgs = torch.stack(_images(2))
    with torch.no_grad():
        full, cut = everything.encode_images(imgs), last_two.encode_images(imgs)
    assert cut.shape == (2, 2, last_two.llama_model.config.hidden_size)
    assert torch.allclose(cut, full[:, -2:], atol=1e-6) and not torch.allclose(cut, full[:, :2], atol=1e-3)
    # the chat reserves two slots per image, and the answer depends on what those two tokens carry
    chat = Chat(last_two)
    rendered = chat.renderer.render([Message("user", "See IMAGE#1<Img><ImageHere></Img>.")], TRAIN_LAYOUT)
    assert sum(rendered.image_slot_mask) == 2
    answers = []
    for image in imgs:
        session = chat.session()
        session.add_image(image)
        session.ask("What is in IMAGE#1✨?")
        answers.append(session.answer(max_new_tokens=6))
    assert answers[0] != answers[1]
    with pytest.raises(ValueError, match="decoder_image_tokens must be in 0..num_query_token"):
        build_tiny_model(tmp_path, decoder_image_tokens=5)


def test_image_ordinal_embeddings_mark_each_image_by_its_place_in_the_row(tmp_path):
    model = build_tiny_model(tmp_path, seed=0, init_std=0.3, image_ordinal_embeddings=2,
                             freeze_vit=True, freeze_qformer=True, freeze_llm=True).eval()
    renderer = Renderer(model.tokenizer, model.num_query_token)
    slot = "<Img><ImageHere></Img>"
    rows = [renderer.render([Message("user", f"IMAGE#1{slot} IMAGE#2{slot} IMAGE#3{slot}")], TRAIN_LAYOUT,
                            target="x"),
            renderer.render([Message("user", f"IMAGE#1{slot}")], TRAIN_LAYOUT, target="x")]
    batch = collate(rows, pad_id=renderer.pad_id)
    same = _images(1) * 4  # one picture four times: only the ordinals can tell the copies apart
    with torch.no_grad():
        tokens = model.encode_images(torch.stack(same))
        embeds = model.embed_inputs(batch["input_ids"], batch["image_slot_mask"], tokens)
    first, second, third = embeds[0][batch["image_slot_mask"][0]].split(model.image_tokens)
    (alone,) = embeds[1][batch["image_slot_mask"][1]].split(model.image_tokens)
    marks = model.image_ordinal_embed.weight
    assert torch.allclose(first, tokens[0] + marks[0], atol=1e-6) and torch.allclose(alone, first, atol=1e-6)
    assert torch.allclose(second, tokens[0] + marks[1], atol=1e-6)
    assert torch.allclose(third, second, atol=1e-6)  # past the last ordinal: the last one's mark
    assert not torch.allclose(first, second, atol=1e-3)
    # trained with the projection (frozen towers and decoder), and saved with it
    model.train()
    model(**batch, images=torch.stack(same))["loss"].backward()
    assert marks.grad is not None and marks.grad[0].abs().sum() > 0 and marks.grad[1].abs().sum() > 0
    assert "image_ordinal_embed.weight" in model.trainable_state_dict()
    # a batch answers as the prompts one by one (left padding does not move the ordinals)
    model.eval()
    chat = Chat(model)
    imgs = _images(3, seed=5)
    prompts = [("Compare IMAGE#1✨ and IMAGE#2✨ in detail please.", imgs[:2]), ("What about IMAGE#1⭐?", imgs[2:])]
    assert generate_batch(chat, prompts, max_new_tokens=6) == [generate_batch(chat, [p], max_new_tokens=6)[0]
                                                              for p in prompts]
    with pytest.raises(ValueError, match="image_ordinal_embeddings must be >= 0"):
        build_tiny_model(tmp_path, image_ordinal_embeddings=-1)


@pytest.fixture(scope="module")
def chat(tiny_model):
    return Chat(tiny_model)


def _dialogue(chat, imgs, *, reuse: bool, turns: int = 3):
    s = chat.session()
    answers = []
    questions = ["Compare IMAGE#1✨ with IMAGE#2⭐.", "And IMAGE#3✨ next to IMAGE#1?", "Which is larger?"]
    for t in range(turns):
        if t == 0:
            s.add_image(imgs[0]), s.add_image(imgs[1])
        if t == 1:
            s.add_image(imgs[2])
        s.ask(questions[t])
        if not reuse:
            s._state = None  # force a full re-prefill of the whole history
        answers.append(s.answer(max_new_tokens=10))
    return answers, s.stats


def test_kv_cache_reuse_across_turns_equals_full_reprefill(chat):
    imgs = _images(3)
    reused, stats = _dialogue(chat, imgs, reuse=True)
    full, full_stats = _dialogue(chat, imgs, reuse=False)
    assert reused == full
    assert len(set(reused)) > 1  # the answers differ between turns: the comparison is not vacuous
    assert stats["reused_tokens"] > 0
    assert stats["prefill_tokens"] < full_stats["prefill_tokens"]


def test_batched_generation_equals_one_by_one(chat):
    imgs = _images(4, seed=3)
    prompts = [("Describe IMAGE#1✨.", imgs[:1]), ("Compare IMAGE#1✨ and IMAGE#2✨ in detail please.", imgs[1:3]),
               ("What about IMAGE#1⭐?", imgs[3:4])]
    batched = generate_batch(chat, prompts, max_new_tokens=8)
    single = [generate_batch(chat, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1


def test_streaming_yields_growing_text_and_stores_the_answer(chat):
    s = chat.session()
    s.add_image(_images(1)[0])
    s.ask("What is in IMAGE#1✨?")
    chunks = list(s.stream(max_new_tokens=6))
    assert 1 <= len(chunks) <= 6
    assert chunks[-1] == s.messages[-1].content
    assert all(chunks[i + 1].startswith(chunks[i].rstrip()) or not chunks[i].strip() for i in range(len(chunks) - 1))


def test_slot_mismatch_in_chat_is_explained(chat):
    s = chat.session()
    s.add_image(_images(1)[0])
    s.ask("Compare ✨ with ⭐")
    with pytest.raises(ChatError, match="2 image slot"):
        s.answer(max_new_tokens=2)


def test_context_overflow_drops_old_turns_with_a_warning(chat):
    s = chat.session()
    s.add_image(_images(1)[0])
    s.ask("Look at IMAGE#1✨ " + "and tell me more " * 20)
    s.answer(max_new_tokens=4)
    s.ask("short follow-up")
    s.answer(max_new_tokens=4, max_length=80)
    assert s.last_warning and "oldest 1 turn" in s.last_warning


def test_sampling_is_reproducible_with_a_seed(chat):
    prompts = [("Describe IMAGE#1✨.", _images(1))]
    a = generate_batch(chat, prompts, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    b = generate_batch(chat, prompts, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    assert a == b


def test_beam_search_runs_through_transformers(chat):
    out = generate_batch(chat, [("Describe IMAGE#1✨.", _images(1))], max_new_tokens=5, num_beams=2)
    assert isinstance(out[0], str)


def test_an_8bit_placement_moves_every_part_but_the_decoder(tmp_path):
    """With model.low_resource the decoder sits where bitsandbytes put it and place() moves every other part (the
    ordinal marks and the query tokens included); the meta device stands in for a GPU."""
    model = build_tiny_model(tmp_path, seed=0, image_ordinal_embeddings=2)
    model.cfg.low_resource = True
    model.place("meta")
    for name, param in model.named_parameters():
        assert param.device.type == ("cpu" if name.startswith("llama_model.") else "meta"), name
