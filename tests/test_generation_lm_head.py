"""The decode path's LM head: ``lm_head_logits`` (column-wise ``W·hᵀ`` for a few CPU rows) gives the logits
of ``lm_head(h)``, and greedy decoding through the decoder body + that head yields the tokens of a plain,
cache-free reference that calls the whole HF model and reads its full logits at every step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparkles.engine.decoding import GenerationConfig, decode_tokens, lm_head_logits
from sparkles.testing.tiny import build_tiny_model

GREEDY = GenerationConfig(max_new_tokens=12, stop_strings=(), stop_on_eos=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("lm_head"), seed=0, init_std=0.3).eval()


@pytest.mark.parametrize("rows", [1, 8, 100])  # 100 > 64 rows: the plain `lm_head(h)` branch
def test_lm_head_logits_equal_the_linear_layer(rows):
    torch.manual_seed(0)
    head = nn.Linear(512, 3000, bias=False)
    hidden = torch.randn(rows, 512)
    with torch.no_grad():
        torch.testing.assert_close(lm_head_logits(head, hidden), head(hidden))


def test_lm_head_logits_with_bias_uses_the_layer():
    head = nn.Linear(16, 40, bias=True)
    hidden = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(lm_head_logits(head, hidden), head(hidden))


def _prompts(model, texts):
    """Left-padded embeddings ``[B, T, D]`` and mask ``[B, T]`` of ``texts``, plus each row's unpadded embeds."""
    embed = model.llama_model.get_input_embeddings()
    rows = [embed(torch.tensor([model.tokenizer(t)["input_ids"]]))[0] for t in texts]
    length = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        embeds[b, length - r.shape[0]:] = r
        mask[b, length - r.shape[0]:] = 1
    return embeds, mask, rows


def _reference_greedy(llm, row_embeds: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through ``llm(...)``, full logits, every step."""
    embed = llm.get_input_embeddings()
    seq, out = row_embeds[None], []
    for _ in range(steps):
        logits = llm(inputs_embeds=seq, attention_mask=torch.ones(1, seq.shape[1], dtype=torch.long),
                     use_cache=False).logits
        assert logits.shape[1] == seq.shape[1]  # every position, not only the last
        out.append(int(logits[0, -1].argmax()))
        seq = torch.cat([seq, embed(torch.tensor([[out[-1]]]))], dim=1)
    return out


def _decode(llm, embeds, mask, cache=None) -> list[list[int]]:
    steps = list(decode_tokens(llm, inputs_embeds=embeds, attention_mask=mask, gen=GREEDY, past_key_values=cache))
    return torch.stack(steps, dim=1).tolist()


class _WholeModelOnly(nn.Module):
    """The same decoder seen only through its forward (no ``.model``/``.lm_head``): the fallback path."""

    def __init__(self, llm):
        super().__init__()
        self.inner = llm

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, *, cache=None, logits_to_keep=0, **kwargs):  # the HF names, so forward_last passes them
        return self.inner(cache=cache, logits_to_keep=logits_to_keep, **kwargs)


@torch.no_grad()
def test_greedy_decoding_equals_full_logits_reference(model):
    llm = model.llama_model
    texts = ["What is in IMAGE#1?", "Compare IMAGE#12 with IMAGE#7 please.", "Let's think step by step."]
    embeds, mask, rows = _prompts(model, texts)
    calls = []
    hook = llm.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        batched = _decode(llm, embeds, mask)
    finally:
        hook.remove()
    assert not calls  # the decode path computed the logits column-wise, not through lm_head(...)
    reference = [_reference_greedy(llm, r, GREEDY.max_new_tokens) for r in rows]
    assert batched == reference
    assert len({tuple(r) for r in reference}) > 1  # the rows differ: the comparison is not vacuous
    assert _decode(llm, embeds[:1, -rows[0].shape[0]:], mask[:1, -rows[0].shape[0]:]) == reference[:1]


@torch.no_grad()
def test_kv_cache_matches_the_whole_model_forward(model):
    """Running the body on its own extends the cache exactly as the whole model's forward does."""
    from transformers import DynamicCache

    llm = model.llama_model
    embeds, mask, _ = _prompts(model, ["Compare IMAGE#12 with IMAGE#7.", "IMAGE#1 shows"])
    body_cache, whole_cache = DynamicCache(), DynamicCache()
    body_tokens = _decode(llm, embeds, mask, body_cache)
    whole_tokens = _decode(_WholeModelOnly(llm), embeds, mask, whole_cache)
    assert body_tokens == whole_tokens
    # The last token is yielded but not fed back, hence one position fewer than prompt + new tokens.
    assert body_cache.get_seq_length() == whole_cache.get_seq_length() == embeds.shape[1] + GREEDY.max_new_tokens - 1
    for a, b in zip(body_cache.layers, whole_cache.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
