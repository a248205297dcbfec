"""Answering many independent single-turn prompts at once: left-padded into one batch, one vision pass.

With greedy decoding the answers equal those of one-by-one generation through :class:`~.chat.ChatSession`
(tested), which is what batched evaluation relies on.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..conversation.render import Message, collate
from ..conversation.template import USER, count_slots, replace_glyphs
from .chat import Chat, ChatError, Context
from .decoding import StopChecker, beam_search, clean_answer, decode_tokens


@torch.no_grad()
def as_messages(prompt: str | Sequence[Message]) -> list[Message]:
    """A user text, or a whole conversation ending with a user message, as messages (✨/⭐ become slots)."""
    if isinstance(prompt, str):
        return [Message(USER, replace_glyphs(prompt))]
    return [Message(m.role, replace_glyphs(m.content)) if m.role == USER else m for m in prompt]


def generate_batch(chat: Chat, prompts: Sequence[tuple[str | Sequence[Message], Sequence]], *,
                   contexts: Optional[Sequence[Context]] = None, **options) -> list[str]:
    """Answer independent prompts together. Each item is ``(user_text or messages, images)``: the images fill the
    slots of the conversation in order (those of turns dropped to fit go unused).

    Prompts are left-padded into one batch; all their images are encoded in one vision pass. With greedy
    decoding the answers equal those of one-by-one generation. ``contexts``: the prompts already rendered by
    :meth:`Chat.context` with the same options (a caller that checked them first need not render them twice).
    """
    gen = chat.generation.updated(**options)
    renderer, model, tok = chat.renderer, chat.model, chat.tokenizer
    rendered, all_images, all_messages = [], [], []
    for i, (prompt, images) in enumerate(prompts):
        messages = as_messages(prompt)
        slots = sum(count_slots(m.content) for m in messages)
        if slots != len(images):
            raise ChatError(f"prompt {i}: {slots} image slot(s) but {len(images)} image(s)")
        try:
            context = contexts[i] if contexts is not None else chat.context(messages, gen)
        except ChatError as exc:
            raise type(exc)(f"prompt {i}: {exc}") from None
        if context.cut:
            raise ChatError(f"prompt {i}: {context.warning} Cut contexts are answered one at a time (ChatSession).")
        r = context.rendered
        rendered.append(r)
        all_images.extend(images[j] for j in r.image_indices)
        all_messages.extend(r.image_messages)
    if not rendered:
        return []
    image_embeds = chat.encode_images(all_images, all_messages) if all_images else None
    batch = collate(rendered, pad_id=renderer.pad_id, padding_side="left")
    embeds = model.embed_inputs(batch["input_ids"].to(model.device), batch["image_slot_mask"].to(model.device),
                                image_embeds)
    mask = batch["attention_mask"].to(model.device)
    if gen.num_beams > 1:
        rows = beam_search(model.llama_model, inputs_embeds=embeds, attention_mask=mask, gen=gen, tokenizer=tok)
    else:
        rows = [[] for _ in rendered]
        finished = [False] * len(rendered)
        checker = StopChecker(tok, gen.stop_strings, eos_id=tok.eos_token_id if gen.stop_on_eos else None)
        for step_tokens in decode_tokens(model.llama_model, inputs_embeds=embeds, attention_mask=mask, gen=gen,
                                         tokenizer=tok):
            for b, t in enumerate(step_tokens.tolist()):
                if not finished[b]:
                    rows[b].append(t)
                    finished[b] = checker.should_stop(rows[b])
    return [clean_answer(tok, row, gen.stop_strings) for row in rows]
