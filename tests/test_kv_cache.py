"""The growing KV cache holds exactly what ``DynamicCache`` holds (appends, crops, growth past its spare room),
without reallocating every step, and greedy decoding through it yields the tokens of a ``DynamicCache``."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sparkles.engine import kv_cache
from sparkles.engine.decoding import GenerationConfig, decode_tokens
from sparkles.engine.kv_cache import GrowingLayer, new_kv_cache
from sparkles.testing.tiny import build_tiny_model


def _step(gen: torch.Generator, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 2, positions, 4)  # [batch, heads, positions, head_dim]
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_growing_layer_holds_what_dynamic_layer_holds_and_rarely_reallocates(monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_GROWTH", 8)  # cross several growths in a short test
    gen = torch.Generator().manual_seed(0)
    growing, plain = GrowingLayer(), DynamicLayer()
    buffers = set()
    lengths = [5] + [1] * 60 + [7] + [1] * 30  # a prefill, decode steps, a second turn's prefill, more steps
    for i, n in enumerate(lengths):
        k, v = _step(gen, n)
        got_k, got_v = growing.update(k, v)
        want_k, want_v = plain.update(k, v)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        buffers.add(growing._key_buffer.data_ptr())
        if i == 40:  # a chat turn that reuses only part of the cache drops the rest
            growing.crop(-9)
            plain.crop(-9)
            assert growing.get_seq_length() == plain.get_seq_length() == sum(lengths[:41]) - 9
    assert growing.get_seq_length() == plain.get_seq_length() == sum(lengths) - 9
    # 94 updates; each growth adds at least a quarter of the length, so only a handful of buffers were made
    assert 2 <= len(buffers) <= 12


def test_growing_layer_starts_a_new_buffer_after_an_outside_change():
    """An operation that replaces ``keys`` (e.g. a reorder) leaves the old buffer behind; the next update
    must build on the new ``keys``, not write into the stale buffer."""
    gen = torch.Generator().manual_seed(1)
    layer = GrowingLayer()
    layer.update(*_step(gen, 6))
    layer.keys, layer.values = layer.keys[[2, 0, 1]].clone(), layer.values[[2, 0, 1]].clone()
    before_k = layer.keys.clone()
    k, v = _step(gen, 1)
    got_k, _ = layer.update(k, v)
    assert torch.equal(got_k, torch.cat([before_k, k], dim=-2))


@torch.no_grad()
def test_greedy_decoding_through_the_growing_cache_equals_dynamic_cache(tmp_path):
    model = build_tiny_model(tmp_path, seed=0, init_std=0.3).eval()
    llm = model.llama_model
    embed = llm.get_input_embeddings()
    ids = torch.tensor([model.tokenizer("Compare IMAGE#12 with IMAGE#7 please.")["input_ids"]] * 2)
    embeds, mask = embed(ids), torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    gen = GenerationConfig(max_new_tokens=20, stop_strings=(), stop_on_eos=False)

    def run(cache):
        steps = list(decode_tokens(llm, inputs_embeds=embeds, attention_mask=mask, gen=gen, past_key_values=cache))
        return torch.stack(steps, dim=1).tolist()

    growing, plain = new_kv_cache(), DynamicCache()
    assert run(growing) == run(plain)
    assert all(isinstance(layer, GrowingLayer) for layer in growing.layers)
    for a, b in zip(growing.layers, plain.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
