"""The decode modes ("plain", "static", "compiled") give the same tokens in float32: through the chat engine (one
turn, several turns reusing the cache, modes switched between turns), through batched generation of left-padded
prompts, and through ``decode_tokens`` with every logits option; the pre-allocated cache layer holds what a
dynamic one holds; a static decode step reads nothing back from the device but its tokens."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from sparkles.engine import decoding
from sparkles.engine.batch import generate_batch
from sparkles.engine.chat import Chat
from sparkles.engine.decoding import GenerationConfig, decode_tokens
from sparkles.engine.kv_cache import new_kv_cache
from sparkles.engine.static_cache import PreallocatedLayer, make_static

MODES = ("plain", "static", "compiled")


@pytest.fixture(autouse=True)
def compile_on_cpu(monkeypatch):
    """"compiled" runs the static path on the CPU (measured slower there); these tests compile the step."""
    monkeypatch.setattr(decoding, "COMPILE_ON_CPU", True)


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def chat(tiny_model):
    # a short max_length keeps the compiled step's fixed-shape attention small
    return Chat(tiny_model, generation=GenerationConfig(max_length=400))


def _dialogue(chat, modes, *, new_tokens=10):
    imgs = _images(3)
    s = chat.session()
    questions = ["Compare IMAGE#1✨ with IMAGE#2⭐.", "And IMAGE#3✨ next to IMAGE#1?", "Which is larger?"]
    answers = []
    for t, mode in enumerate(modes):
        if t == 0:
            s.add_image(imgs[0]), s.add_image(imgs[1])
        if t == 1:
            s.add_image(imgs[2])
        s.ask(questions[t])
        answers.append(s.answer(max_new_tokens=new_tokens, decode_mode=mode))
    return answers, list(s._state.keys), s.stats


def test_generation_config_checks_the_decode_mode():
    assert GenerationConfig().decode_mode == "plain"
    assert GenerationConfig().updated(decode_mode="static").decode_mode == "static"
    with pytest.raises(ValueError, match="decode_mode"):
        GenerationConfig().updated(decode_mode="fast")


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_chat_turns_with_cache_reuse_equal_the_plain_path(chat, mode):
    plain, plain_keys, plain_stats = _dialogue(chat, ["plain"] * 3)
    got, keys, stats = _dialogue(chat, [mode] * 3)
    assert got == plain and keys == plain_keys  # same answers, same tokens fed through the decoder
    assert stats == plain_stats and stats["reused_tokens"] > 0
    assert len(set(plain)) > 1  # the answers depend on the conversation: the comparison is not vacuous


def test_modes_can_change_between_turns_of_one_conversation(chat):
    plain, plain_keys, _ = _dialogue(chat, ["plain"] * 3)
    mixed, keys, _ = _dialogue(chat, ["static", "plain", "compiled"])
    assert mixed == plain and keys == plain_keys


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_batched_left_padded_generation_equals_the_plain_path(chat, mode):
    imgs = _images(4, seed=3)
    prompts = [("Describe IMAGE#1✨.", imgs[:1]), ("Compare IMAGE#1✨ and IMAGE#2✨ in detail please.", imgs[1:3]),
               ("What about IMAGE#1⭐?", imgs[3:4])]
    plain = generate_batch(chat, prompts, max_new_tokens=8)
    assert generate_batch(chat, prompts, max_new_tokens=8, decode_mode=mode) == plain
    assert len(set(plain)) > 1


def _left_padded(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    embed = model.llama_model.get_input_embeddings()
    t = max(lengths)
    ids = torch.randint(5, embed.num_embeddings, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, t - n:] = 1
    with torch.no_grad():
        return embed(ids), mask


def _tokens(model, gen, embeds, mask, tokenizer=None):
    fed = [[] for _ in range(embeds.shape[0])]
    steps = list(decode_tokens(model.llama_model, inputs_embeds=embeds, attention_mask=mask, gen=gen,
                               tokenizer=tokenizer, fed_tokens=fed))
    return torch.stack(steps, 1).tolist(), fed


@pytest.mark.parametrize("options", [
    dict(),
    dict(repetition_penalty=1.3, min_length=4),
    dict(do_sample=True, temperature=1.5, top_p=0.95, seed=7),
])
def test_decode_tokens_equal_across_modes(tiny_model, options):
    embeds, mask = _left_padded(tiny_model, [9, 4, 7])
    base = GenerationConfig(max_new_tokens=9, max_length=64, stop_strings=(), stop_on_eos=False, **options)
    want = _tokens(tiny_model, base, embeds, mask)
    for mode in ("static", "compiled"):
        assert _tokens(tiny_model, base.updated(decode_mode=mode), embeds, mask) == want, mode


def test_per_row_stopping_equals_the_plain_path(tiny_model):
    """A stop string ends its row; the other rows go on; finished rows yield the pad id in every mode."""
    tok = tiny_model.tokenizer
    embeds, mask = _left_padded(tiny_model, [6, 3, 5], seed=1)
    free = GenerationConfig(max_new_tokens=12, max_length=64, stop_strings=(), stop_on_eos=False)
    rows, _ = _tokens(tiny_model, free, embeds, mask, tok)
    stop = tok.decode([rows[1][3]], skip_special_tokens=False).strip()  # row 1's fourth token
    assert stop
    gen = free.updated(stop_strings=(stop,))
    want = _tokens(tiny_model, gen, embeds, mask, tok)
    assert any(len(set(r[-3:])) == 1 for r in want[0])  # some row finished early and was padded
    for mode in ("static", "compiled"):
        assert _tokens(tiny_model, gen.updated(decode_mode=mode), embeds, mask, tok) == want, mode


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_a_step_reads_back_only_its_tokens(tiny_model, monkeypatch, mode):
    """No ``.item()`` / ``bool(tensor)`` / ``int(tensor)`` in the loop: one ``tolist`` per step."""
    reads = {"tolist": 0, "item": 0, "bool": 0}
    real_tolist, real_item, real_bool = torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__

    def counting(name, real):
        def f(self, *a, **k):
            reads[name] += 1
            return real(self, *a, **k)
        return f

    embeds, mask = _left_padded(tiny_model, [5, 3])
    gen = GenerationConfig(max_new_tokens=6, max_length=32, stop_strings=(), stop_on_eos=False, decode_mode=mode)
    stream = decode_tokens(tiny_model.llama_model, inputs_embeds=embeds, attention_mask=mask, gen=gen)
    next(stream)  # the prefill (its mask and positions are built on the host side once)
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", real_item))
    monkeypatch.setattr(torch.Tensor, "__bool__", counting("bool", real_bool))
    rest = list(stream)
    assert len(rest) == 5 and reads == {"tolist": 5, "item": 0, "bool": 0}


def test_preallocated_layer_holds_what_a_dynamic_layer_holds():
    g = torch.Generator().manual_seed(0)
    static, plain = PreallocatedLayer(capacity=40), DynamicLayer()
    buffers = set()
    for i, n in enumerate([5] + [1] * 20 + [7] + [1] * 10):
        k, v = torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)
        got, want = static.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert static.get_seq_length() == plain.get_seq_length()
        buffers.add(static._key_buffer.data_ptr())
        if i == 15:
            static.crop(-6), plain.crop(-6)
    assert len(buffers) == 1  # allocated once (36 positions needed, 40 reserved)
    k = torch.randn(2, 3, 20, 4, generator=g)
    static.update(k, k)  # past its capacity: grows, keeping what it holds
    assert static.get_seq_length() == plain.get_seq_length() + 20 and static.capacity >= 56


def test_make_static_keeps_a_plain_turns_positions(tiny_model):
    embeds, mask = _left_padded(tiny_model, [6])
    cache = new_kv_cache()
    gen = GenerationConfig(max_new_tokens=3, max_length=32, stop_strings=(), stop_on_eos=False)
    list(decode_tokens(tiny_model.llama_model, inputs_embeds=embeds, attention_mask=mask, gen=gen,
                       past_key_values=cache))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    make_static(cache, 32)
    assert all(isinstance(layer, PreallocatedLayer) and layer.capacity == 32 for layer in cache.layers)
    for layer, (k, v) in zip(cache.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert cache.get_seq_length() == 8


def test_compiled_mode_falls_back_to_static_where_compiling_is_off(tiny_model, monkeypatch):
    monkeypatch.setattr(decoding, "COMPILE_ON_CPU", False)
    embeds, mask = _left_padded(tiny_model, [4, 6])
    gen = GenerationConfig(max_new_tokens=5, max_length=32, stop_strings=(), stop_on_eos=False)
    assert _tokens(tiny_model, gen.updated(decode_mode="compiled"), embeds, mask) == _tokens(tiny_model, gen,
                                                                                              embeds, mask)


def test_gpu_check_dry_run_passes(tmp_path):
    """The GPU check's steps rehearsed on the CPU at the toy size: every step runs and every check passes."""
    import json

    from benchmarks import gpu_check

    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(doc["benchmarks"]) == set(gpu_check.STEPS)
    assert all("error" not in r for r in doc["benchmarks"].values())
    figures = " ".join(r["figure"] for r in doc["checks"])
    for needed in ("decode tok/s", "bandwidth bound", "greedy-margin agreement", "TTFT reuse / re-prefill",
                   "vs batch-1", "MFU"):
        assert needed in figures
    assert doc["benchmarks"]["decode_path"]["agreement"]["agree"]
    assert "| decode_path |" in (tmp_path / "gpu_check.md").read_text()


def test_bandwidth_table_is_keyed_by_the_nvidia_smi_name():
    from benchmarks.decode_path import bandwidth_of

    assert bandwidth_of("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bandwidth_of("NVIDIA H200") == 4.8e12
    assert bandwidth_of("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert bandwidth_of(None) is None and bandwidth_of("Some CPU") is None
