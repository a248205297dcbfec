"""Token-by-token decoding over ``inputs_embeds`` with a reusable KV cache.

Greedy or sampled decoding (temperature, top-k, top-p, repetition penalty, minimum length), stop strings checked
on decoded text (so they come from the tokenizer, not from hard-coded ids), per-row stopping for left-padded
batches, and a generator interface that yields each new token for streaming. :func:`partial_answer` is what
every stream shows while an answer grows: never a piece of a stop string that the final answer
(:func:`clean_answer`) removes. A cache passed in is extended in place, which is what lets a chat reuse it across
turns; a new one appends without copying what it holds (:mod:`.kv_cache`). Prefill and every decode step
project only the last position onto the vocabulary (:func:`lm_head_logits`, column-wise for a few rows on the
CPU). Beam search goes through ``transformers``' ``generate`` (no streaming, no cache reuse, its own LM head call).

``GenerationConfig.decode_mode`` chooses the loop: "plain" (above), "static" (a cache allocated once for
``max_length`` positions, :mod:`.static_cache`, and one read-back per step: its tokens) or "compiled" ("static"
with the one-token step under ``torch.compile``, CUDA graphs on a GPU; the static path on the CPU, where it was
measured slower). Greedy tokens are the same in all three in float32.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
import logging
import weakref
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..models.hf_compat import cache_kwarg, logits_keep_kwarg
from .kv_cache import new_kv_cache
from .static_cache import make_static, new_static_kv_cache, static_layers

log = logging.getLogger(__name__)


OVERFLOW_POLICIES = ("drop_turns", "truncate_left")
# "plain": the cache grows as it goes, per-step host bookkeeping (the reference path). "static": the cache is
# allocated once for max_length positions and a step reads back only its new tokens. "compiled": "static" with
# the one-token decoder step compiled by torch.compile (CUDA graphs on a GPU); see :func:`_decode_static`.
DECODE_MODES = ("plain", "static", "compiled")


@dataclass
class GenerationConfig:
    """Decoding settings. The defaults are the deterministic evaluation protocol (greedy)."""

    max_new_tokens: int = 300
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # sampling keeps the k most likely tokens (0 = no limit)
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_length: int = 1  # minimum number of new tokens before an end-of-sequence may be chosen
    max_length: int = 2000  # context + new tokens
    seed: Optional[int] = None
    stop_strings: Sequence[str] = field(default_factory=lambda: ("###",))
    stop_on_eos: bool = True
    # A context longer than max_length - max_new_tokens: "drop_turns" leaves out whole earlier turns (and their
    # images); "truncate_left" keeps its last positions whatever they cut through (the original's way).
    overflow: str = "drop_turns"
    decode_mode: str = "plain"  # one of DECODE_MODES; greedy tokens are the same in all three (float32)
    # A chat's answer is never the stop marker alone: while an answer is still blank, the tokens that would begin
    # it with a stop string are forbidden, as min_length forbids end-of-sequence (:class:`BlankAnswerGuard`). Off
    # by default, so evaluation decodes as the original did; the demo and the API turn it on.
    nonblank_answer: bool = False

    def updated(self, **overrides) -> "GenerationConfig":
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        out = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        if out.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {out.overflow!r}")
        if out.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {out.decode_mode!r}")
        return out


def forward_last(llm, *, inputs_embeds, attention_mask, position_ids, cache) -> torch.Tensor:
    """Run the decoder over new positions with a cache; return float32 logits of the last position.

    For a ``*ForCausalLM`` made of a decoder body (``llm.model``) and a linear ``llm.lm_head`` (LLaMA/Vicuna),
    the body runs on its own and the head sees only the last position, through :func:`lm_head_logits`; the
    cache is extended by the body exactly as by the whole model's forward. Other models go through their own
    forward with ``logits_to_keep=1`` (keyword names as the installed transformers spells them).
    """
    body, head = getattr(llm, "model", None), getattr(llm, "lm_head", None)
    kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": True}
    # Some architectures transform the head's output (e.g. Gemma 2's logit soft-capping); leave those to
    # their own forward.
    if isinstance(body, nn.Module) and isinstance(head, nn.Linear) \
            and getattr(getattr(llm, "config", None), "final_logit_softcapping", None) is None:
        kwargs[cache_kwarg(type(body))] = cache
        hidden = body(**kwargs).last_hidden_state[:, -1, :]
        return lm_head_logits(head, hidden).float()
    kwargs[cache_kwarg(type(llm))] = cache
    keep = logits_keep_kwarg(type(llm))
    if keep is not None:
        kwargs[keep] = 1
    return llm(**kwargs).logits[:, -1, :].float()


def lm_head_logits(lm_head: nn.Linear, hidden: torch.Tensor, *, max_rows: int = 64) -> torch.Tensor:
    """``lm_head(hidden)`` for ``hidden [N, H]``, as ``W·hᵀ`` when N is small on the CPU.

    A decode step has one row per sequence against the ``[vocab, H]`` weight. For a few rows, MKL's ``h·Wᵀ``
    packs the whole weight matrix on every call (65 MB for the 32,000 × 512 head of the benchmarks' small
    size), so a batch-8 step's head cost ~1.7× a batch-1 one; ``W·hᵀ`` streams the matrix once (3–5 ms
    instead of 11–13 ms at 8 rows on a 2-core EPYC, ``benchmarks/eval_throughput``). Same weights, same
    logits up to rounding. GPUs, heads with a bias and many rows keep ``lm_head(hidden)``, and so does a head
    whose weight is not where ``hidden`` is (offloaded: its own forward hook brings it).
    """
    weight = lm_head.weight
    if lm_head.bias is None and hidden.ndim == 2 and hidden.shape[0] <= max_rows and hidden.device.type == "cpu" \
            and weight.device == hidden.device:
        return torch.mm(weight, hidden.t()).t()
    return lm_head(hidden)


class BlankAnswerGuard:
    """A logits processor: while a row's answer is blank (only tokens that decode to whitespace so far), the tokens
    whose text would begin it with a stop string ("#", "##", "###", ... for "###") get no probability.

    A model asked something its training never showed (a text-only "Hello" to the tiny model of ``bash run.sh``)
    may open its answer with the stop marker, and the answer is then empty. The vocabulary is decoded once per
    tokenizer; the table of opening tokens is kept for the last few stop-string sets (an API request may bring
    its own); each step is two mask look-ups on the logits' device, with no read-back."""

    MAX_STOP_SETS = 8  # tables kept per tokenizer: the chat's own stops and a few request-specific ones

    _vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _opening_tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        stops = tuple(s for s in stop_strings if s.strip())
        if tokenizer not in self._vocabularies:
            texts = [t.lstrip() for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))],
                                                                skip_special_tokens=True)]
            self._vocabularies[tokenizer] = (texts, torch.tensor([not t.strip() for t in texts], dtype=torch.bool))
        texts, self.blank = self._vocabularies[tokenizer]
        tables = self._opening_tables.setdefault(tokenizer, OrderedDict())
        if stops not in tables:
            tables[stops] = torch.tensor([bool(t.strip()) and any(s.startswith(t) or t.startswith(s) for s in stops)
                                          for t in texts], dtype=torch.bool)
            if len(tables) > self.MAX_STOP_SETS:
                tables.popitem(last=False)
        tables.move_to_end(stops)
        self.opening = tables[stops]
        self._masks: dict = {}

    @property
    def active(self) -> bool:
        """Whether any token could open an answer with a stop string (else the guard has nothing to do)."""
        return bool(self.opening.any())

    def _device_masks(self, device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The blank and opening masks on ``device``, as wide as the logits (a padded vocabulary adds ids)."""
        key = (str(device), width)
        if key not in self._masks:
            def fit(mask: torch.Tensor) -> torch.Tensor:
                out = torch.zeros(width, dtype=torch.bool)
                n = min(width, mask.numel())
                out[:n] = mask[:n]
                return out.to(device)
            self._masks[key] = (fit(self.blank), fit(self.opening))
        return self._masks[key]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        is_blank, is_opening = self._device_masks(scores.device, scores.shape[-1])
        blank_rows = is_blank[input_ids.to(scores.device)].all(dim=-1)  # true for a row with no tokens yet
        return scores.masked_fill(blank_rows[:, None] & is_opening[None, :], float("-inf"))


def blank_answer_guard(gen: GenerationConfig, tokenizer) -> Optional[BlankAnswerGuard]:
    """The :class:`BlankAnswerGuard` ``gen`` asks for (``nonblank_answer`` with stop strings), or None."""
    if not (gen.nonblank_answer and gen.stop_strings and tokenizer is not None):
        return None
    guard = BlankAnswerGuard(tokenizer, gen.stop_strings)
    return guard if guard.active else None


def logits_processors(gen: GenerationConfig, tokenizer=None):
    """The processors applied to one row's logits: the blank-answer guard (``gen.nonblank_answer``, with a
    tokenizer) and repetition penalty; temperature, top-k and top-p when sampling (in the order ``transformers``'
    ``generate`` applies them)."""
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    guard = blank_answer_guard(gen, tokenizer)
    if guard is not None:
        procs.append(guard)
    if gen.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.do_sample:
        if gen.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k > 0:
            procs.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))
    return procs


def _sampling_setup(gen: GenerationConfig, tokenizer, device):
    """What every decode loop needs besides the model: the seeded generator (sampling with a seed), the logits
    processors, the end-of-sequence id, the id that fills finished rows, and the stop checker."""
    generator = None
    if gen.do_sample and gen.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(gen.seed))
    eos_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = eos_id if pad_id is None else pad_id
    pad_id = 0 if pad_id is None else pad_id
    checker = StopChecker(tokenizer, gen.stop_strings if tokenizer is not None else (),
                          eos_id=eos_id if gen.stop_on_eos else None)
    return generator, logits_processors(gen, tokenizer), eos_id, pad_id, checker


class StopChecker:
    """Per-row stop detection on decoded text: a stop string or (optionally) the EOS token."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], *, eos_id: Optional[int], window: int = 12):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.eos_id = eos_id
        self.window = window

    def should_stop(self, generated: list[int]) -> bool:
        if not generated:
            return False
        if self.eos_id is not None and generated[-1] == self.eos_id:
            return True
        if self.stop_strings and self.tokenizer is not None:
            tail = self.tokenizer.decode(generated[-self.window:], skip_special_tokens=False)
            return any(s in tail for s in self.stop_strings)
        return False


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first complete stop string, and whether there was one."""
    found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


ROLE_MARK = "Assistant:"  # a role name the model wrote inside its answer; the answer restarts after it


def _tidy(text: str) -> str:
    """Keep the text after a stray ``Assistant:`` (the model wrote a role name), strip."""
    if ROLE_MARK in text:
        text = text.rsplit(ROLE_MARK, 1)[1]
    return text.strip()


def clean_answer(tokenizer, generated: Sequence[int], stop_strings: Sequence[str] = ("###",)) -> str:
    """Decode, cut at the first stop string, keep the text after a stray ``Assistant:``, strip."""
    text, _ = _cut_at_stop(tokenizer.decode(list(generated), skip_special_tokens=True), stop_strings)
    return _tidy(text)


def stream_safe_text(text: str, stop_strings: Sequence[str], hold: Sequence[str] = ()) -> str:
    """The part of a growing decoded ``text`` that a stream may show now.

    A complete stop string ends the answer there. Otherwise the tail is held back while it could still grow into
    a stop string (the "#" and "##" of "###") or into one of ``hold`` (strings that change the answer without
    ending it), and released as soon as a later token shows it cannot; so is a character whose bytes have not
    all been generated yet (decoded as U+FFFD for now).
    """
    text, stopped = _cut_at_stop(text, stop_strings)
    if stopped:
        return text
    text = text.rstrip("\ufffd")
    held = 0
    for s in (*stop_strings, *hold):
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return text[:len(text) - held]


def partial_answer(tokenizer, generated: Sequence[int], stop_strings: Sequence[str] = ("###",)) -> str:
    """The answer so far while generation goes on: :func:`clean_answer` of :func:`stream_safe_text`. Every such
    snapshot is a prefix of the next one and of the final answer (unless a stray ``Assistant:`` restarts it),
    so a stream never shows a piece of a stop string that the final answer drops."""
    text = tokenizer.decode(list(generated), skip_special_tokens=True)
    return _tidy(stream_safe_text(text, stop_strings, hold=(ROLE_MARK,)))


@torch.no_grad()
def decode_tokens(llm, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationConfig,
                  tokenizer=None, past_key_values=None, past_attention_mask: Optional[torch.Tensor] = None,
                  fed_tokens: Optional[list[list[int]]] = None) -> Iterator[torch.Tensor]:
    """Prefill ``inputs_embeds [B, T, D]`` (after an optional cache) and yield new tokens ``[B]`` per step.

    ``attention_mask [B, T]`` marks real positions of the new part (left padding = 0). ``past_key_values``
    is extended in place. Finished rows keep producing the pad id. ``fed_tokens[b]`` receives the tokens
    that were actually run through the decoder (i.e. are now in the cache) for row ``b``.
    ``gen.decode_mode`` other than "plain" goes through :func:`_decode_static` (same tokens and cache contents).
    """
    if gen.decode_mode != "plain":
        yield from _decode_static(llm, inputs_embeds=inputs_embeds, attention_mask=attention_mask, gen=gen,
                                  tokenizer=tokenizer, past_key_values=past_key_values,
                                  past_attention_mask=past_attention_mask, fed_tokens=fed_tokens)
        return
    device = inputs_embeds.device
    batch = inputs_embeds.shape[0]
    if past_attention_mask is None:
        past_len = 0 if past_key_values is None else past_key_values.get_seq_length()
        past_attention_mask = torch.ones(batch, past_len, dtype=attention_mask.dtype, device=device)
    full_mask = torch.cat([past_attention_mask, attention_mask.to(device)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
    if past_key_values is None:
        past_key_values = new_kv_cache()
    generator, procs, eos_id, pad_id, checker = _sampling_setup(gen, tokenizer, device)
    embed = llm.get_input_embeddings()

    logits = forward_last(llm, inputs_embeds=inputs_embeds, attention_mask=full_mask, position_ids=positions,
                           cache=past_key_values)
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    last_pos = positions[:, -1]
    for step in range(gen.max_new_tokens):
        hist = torch.tensor([g for g in generated], dtype=torch.long, device=device) if step else \
            torch.zeros(batch, 0, dtype=torch.long, device=device)
        scores = procs(hist, logits) if len(procs) else logits
        if eos_id is not None and step < gen.min_length:
            scores = scores.clone()
            scores[:, eos_id] = float("-inf")
        if gen.do_sample:
            probs = torch.softmax(scores, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for b in range(batch):
            if not done[b]:
                generated[b].append(int(nxt[b]))
                if checker.should_stop(generated[b]):
                    done[b] = True
            else:
                generated[b].append(pad_id)  # keeps `hist` rectangular; finished rows are ignored
        yield nxt
        if bool(done.all()) or step == gen.max_new_tokens - 1:
            break
        if fed_tokens is not None:
            for b in range(batch):
                fed_tokens[b].append(int(nxt[b]))
        full_mask = torch.cat([full_mask, torch.ones(batch, 1, dtype=full_mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        logits = forward_last(llm, inputs_embeds=embed(nxt[:, None]), attention_mask=full_mask,
                               position_ids=last_pos[:, None], cache=past_key_values)


# ----------------------------------------------------------------------------------------------- static path
# Whether "compiled" compiles on the CPU. Measured by ``python -m benchmarks.decode_path --size small`` (see
# docs/benchmarks.md): on a 2-core EPYC the compiled fixed-shape step decoded at 0.65x and 0.98x the plain path's
# speed in two runs (its attention spans all max_length positions; inductor's CPU code gains little on a few
# large matmuls), never faster, so "compiled" runs the "static" path on the CPU.
COMPILE_ON_CPU = False
_COMPILED_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _make_step(llm) -> Callable:
    """The one-token decode step of ``llm`` as a function of tensors and the cache: ``(tokens [B, 1],
    position_ids [B, 1], mask [B, 1, 1, capacity], cache) -> float32 logits [B, V]``; what ``torch.compile``
    traces. Keyword names are resolved here, outside the traced code. Same split as :func:`forward_last`."""
    body, head = getattr(llm, "model", None), getattr(llm, "lm_head", None)
    embed = llm.get_input_embeddings()
    split = isinstance(body, nn.Module) and isinstance(head, nn.Linear) \
        and getattr(getattr(llm, "config", None), "final_logit_softcapping", None) is None
    cache_name = cache_kwarg(type(body) if split else type(llm))
    keep = None if split else logits_keep_kwarg(type(llm))

    def step(tokens, position_ids, mask, cache):
        kwargs = {"inputs_embeds": embed(tokens), "attention_mask": mask, "position_ids": position_ids,
                  "use_cache": True, cache_name: cache}
        if split:
            hidden = body(**kwargs).last_hidden_state[:, -1, :]
            return lm_head_logits(head, hidden).float()
        if keep is not None:
            kwargs[keep] = 1
        return llm(**kwargs).logits[:, -1, :].float()

    return step


def _compiled_step(llm, device: torch.device) -> Optional[Callable]:
    """The compiled decode step of ``llm`` (made once per model), or None where "compiled" runs the static path
    (the CPU when :data:`COMPILE_ON_CPU` is off, or after compiling failed once)."""
    if device.type == "cpu" and not COMPILE_ON_CPU:
        return None
    entry = _COMPILED_STEPS.get(llm)
    if entry is None:
        # CUDA graphs remove the launch overhead of a one-token step; they need the fixed shapes and addresses
        # of the pre-allocated cache. On the CPU the default mode fuses the small element-wise operations.
        mode = "reduce-overhead" if device.type == "cuda" else None
        entry = _COMPILED_STEPS[llm] = {"fn": torch.compile(_make_step(llm), mode=mode, dynamic=False),
                                        "ok": True}
    return entry["fn"] if entry["ok"] else None


class _FixedShapeSteps:
    """Decode steps of fixed shapes over a pre-allocated cache: each step writes its position with
    ``index_copy_`` at a device-side index and attends over the whole buffer through an additive mask that
    is updated on the device, so no step reads anything back or changes a shape."""

    def __init__(self, layers, full_mask: torch.Tensor, dtype: torch.dtype, step_fn: Callable) -> None:
        self.layers, self.step_fn = layers, step_fn
        capacity = min(layer.capacity for layer in layers)
        filled = layers[0].filled
        device = full_mask.device
        self.index = torch.full((1,), filled, dtype=torch.long, device=device)
        mask = torch.full((full_mask.shape[0], capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask[:, :filled].masked_fill_(full_mask.bool(), 0.0)
        self.mask = mask[:, None, None, :]
        self.cuda = device.type == "cuda"
        if self.cuda:
            # A CUDA graph may update its inputs in place only at fixed addresses. Unguarded: another cache (a
            # new chat, another batch) re-records the graph instead of recompiling the step.
            for layer in layers:
                torch._dynamo.mark_static_address(layer._key_buffer, guard=False)
                torch._dynamo.mark_static_address(layer._value_buffer, guard=False)
        for layer in layers:
            layer.step_index = self.index

    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        self.mask.index_fill_(-1, self.index, 0.0)  # the new position sees itself
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.step_fn(tokens, position_ids, self.mask, cache)
        self.index.add_(1)
        for layer in self.layers:
            layer.advance(1)
        return logits

    def close(self) -> None:
        for layer in self.layers:
            layer.step_index = None
            layer.refresh_views()


def _decode_static(llm, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationConfig,
                   tokenizer=None, past_key_values=None, past_attention_mask: Optional[torch.Tensor] = None,
                   fed_tokens: Optional[list[list[int]]] = None) -> Iterator[torch.Tensor]:
    """:func:`decode_tokens` for ``decode_mode`` "static" and "compiled": the same tokens, without per-step
    allocation or host synchronisation beyond reading each step's tokens once.

    The cache is pre-allocated for ``max_length`` positions (a passed cache is converted in place, keeping what
    it holds); the attention mask for all new positions is made once; the token history the logits processors
    read is a device buffer; which rows are finished is host state, updated from the tokens read back. "static"
    decodes eagerly over views of the filled part of the cache (the plain path's shapes, hence its logits);
    "compiled" runs fixed-shape steps (:class:`_FixedShapeSteps`) through ``torch.compile``.
    """
    device = inputs_embeds.device
    batch, new = inputs_embeds.shape[:2]
    attention_mask = attention_mask.to(device)
    past_len = 0 if past_key_values is None else past_key_values.get_seq_length()
    if past_attention_mask is None:
        past_attention_mask = torch.ones(batch, past_len, dtype=attention_mask.dtype, device=device)
    full_mask = torch.cat([past_attention_mask, attention_mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]
    capacity = max(gen.max_length, full_mask.shape[1] + gen.max_new_tokens)
    if past_key_values is None:
        past_key_values = new_static_kv_cache(capacity)
    else:
        make_static(past_key_values, capacity)
    # Every position this call can fill is a real one: the masks of all steps are prefixes of this one. With
    # SDPA, transformers reads a 2D mask back (is any position padding?) to choose its kernel, at every step;
    # asked once here, the steps pass no mask (no padding) or the 4D boolean mask it would have built.
    mask_all = torch.cat([full_mask, full_mask.new_ones(batch, gen.max_new_tokens)], dim=1)
    if getattr(getattr(llm, "config", None), "_attn_implementation", None) == "sdpa":
        mask_all = mask_all.bool()[:, None, None, :] if not bool(full_mask.all()) else None
    generator, procs, eos_id, pad_id, checker = _sampling_setup(gen, tokenizer, device)
    hist = torch.zeros(batch, gen.max_new_tokens, dtype=torch.long, device=device) if len(procs) else None
    embed = llm.get_input_embeddings()

    logits = forward_last(llm, inputs_embeds=inputs_embeds, attention_mask=full_mask, position_ids=positions,
                           cache=past_key_values)
    fixed = None
    if gen.decode_mode == "compiled" and gen.max_new_tokens > 1:
        step_fn = _compiled_step(llm, device)
        layers = static_layers(past_key_values)
        if step_fn is not None and layers and len(layers) == len(past_key_values.layers):
            fixed = _FixedShapeSteps(layers, full_mask, inputs_embeds.dtype, step_fn)
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    done_dev = None  # device copy of `done`, remade only when a row finishes
    length = full_mask.shape[1]
    last_pos = positions[:, -1:]
    try:
        for step in range(gen.max_new_tokens):
            if len(procs):
                scores = procs(hist[:, :step], logits)
            else:
                scores = logits
            if eos_id is not None and step < gen.min_length:
                scores = scores.clone()
                scores[:, eos_id] = float("-inf")
            if gen.do_sample:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                nxt = scores.argmax(dim=-1)
            if done_dev is not None:
                nxt = torch.where(done_dev, torch.full_like(nxt, pad_id), nxt)
            if hist is not None:
                hist[:, step] = nxt
            tokens = nxt.tolist()  # the one read-back of the step
            finished = False
            for b, t in enumerate(tokens):
                generated[b].append(t)  # finished rows get the pad id (already in `t`)
                if not done[b] and checker.should_stop(generated[b]):
                    done[b] = finished = True
            if finished:
                done_dev = torch.tensor(done, device=device)
            yield nxt
            if all(done) or step == gen.max_new_tokens - 1:
                break
            if fed_tokens is not None:
                for b in range(batch):
                    fed_tokens[b].append(tokens[b])
            length += 1
            last_pos = last_pos + 1
            if fixed is not None:
                try:
                    logits = fixed(nxt[:, None], last_pos, past_key_values)
                    continue
                except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no C compiler: run eagerly
                    log.warning("torch.compile failed (%s); decoding with the static path", exc)
                    _COMPILED_STEPS[llm]["ok"] = False
                    fixed.close()  # the failed step counted nothing: the eager step below redoes it
                    fixed = None
            step_mask = None if mask_all is None else mask_all[..., :length]
            logits = forward_last(llm, inputs_embeds=embed(nxt[:, None]), attention_mask=step_mask,
                                   position_ids=last_pos, cache=past_key_values)
    finally:
        if fixed is not None:
            fixed.close()


@torch.no_grad()
def beam_search(llm, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationConfig,
                tokenizer) -> list[list[int]]:
    """Beam search through ``transformers``' ``generate`` on embeddings; returns new tokens per row."""
    kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=gen.max_new_tokens,
                  num_beams=gen.num_beams, length_penalty=gen.length_penalty, do_sample=gen.do_sample,
                  repetition_penalty=gen.repetition_penalty, min_new_tokens=gen.min_length,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        if gen.top_k > 0:
            kwargs.update(top_k=gen.top_k)
    if gen.stop_strings:
        kwargs.update(stop_strings=list(gen.stop_strings), tokenizer=tokenizer)
    guard = blank_answer_guard(gen, tokenizer)
    if guard is not None:
        from transformers.generation.logits_process import LogitsProcessorList

        kwargs.update(logits_processor=LogitsProcessorList([guard]))
    out = llm.generate(**kwargs)
    return [row.tolist() for row in out]
