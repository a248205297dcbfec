"""The BLIP-2 Q-Former on ``transformers``' ``Blip2QFormerModel``.

Learned query tokens self-attend, cross-attend to every vision token in every ``cross_attention_freq``-th
layer (0, 2, 4, ...), and use the query feed-forward pair. On SparklesChat's path no text enters, so the
word/position embeddings, the text feed-forward and the LM head of the BLIP-2 checkpoint are not part of this
module. ``text_input=True`` builds the InstructBLIP variant instead: the tokens of an instruction
(:class:`QFormerTextEmbeddings`) join the queries in self-attention, with their own feed-forward pair, and
only the queries cross-attend to the image — so what the queries extract can depend on the question.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def build_qformer(*, hidden: int, layers: int, heads: int, intermediate: int, encoder_width: int,
                  cross_attention_freq: int = 2, dropout: float = 0.1, text_input: bool = False) -> nn.Module:
    """A fresh Q-Former with BERT's initialisation (N(0, 0.02)); ``text_input`` builds InstructBLIP's variant."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        encoder_hidden_size=encoder_width, cross_attention_frequency=cross_attention_freq, layer_norm_eps=1e-12,
        hidden_act="gelu", vocab_size=1, max_position_embeddings=1, use_qformer_text_input=text_input,
        initializer_range=0.02, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    config._attn_implementation = "sdpa"
    return Blip2QFormerModel(config)


class QFormerTextEmbeddings(nn.Module):
    """Word and learned position embeddings of instruction tokens for a ``text_input`` Q-Former.

    The Q-Former's own LayerNorm is applied to queries and text together, as in BLIP-2's embedding layer, so
    this module only sums the two tables. ``init_std`` sets both tables' spread (BERT's 0.02 by default).

    ``position_jitter`` > 0: in training, each text starts at a random position in ``0..position_jitter`` (the
    table holds that many more positions). A Q-Former trained from scratch otherwise finds a short question's
    words by their position, which fails on longer messages where the same words come later; with the start
    jittered, only the words' content and their order tell it where to look. Evaluation starts at 0.
    """

    def __init__(self, vocab_size: int, hidden: int, max_length: int, *, init_std: float = 0.02,
                 position_jitter: int = 0) -> None:
        super().__init__()
        self.max_text = max_length
        self.position_jitter = int(position_jitter)
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_length + self.position_jitter, hidden)
        nn.init.normal_(self.word_embeddings.weight, std=init_std)
        nn.init.normal_(self.position_embeddings.weight, std=init_std)

    @property
    def max_length(self) -> int:
        return self.max_text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, length = input_ids.shape
        if length > self.max_length:
            raise ValueError(f"instruction of {length} tokens; the Q-Former's text takes at most {self.max_length}")
        positions = torch.arange(length, device=input_ids.device).expand(n, -1)
        if self.training and self.position_jitter:
            positions = positions + torch.randint(0, self.position_jitter + 1, (n, 1), device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)


_warned_truncation = False


def _note_truncation(count: int, longest: int, max_length: int) -> None:
    global _warned_truncation
    _warned_truncation = True  # once per process: training cuts the same long prompts every step
    # A note, not a warning: reading a message's first qformer_max_text tokens is how such a model is built and
    # trained (the tiny preset's 64 cover every caption and statement of its ~100-token BISON/NLVR2 prompts), and
    # the decoder reads the whole message, so no answer loses its input.
    log.info("%d instruction(s) of up to %d tokens cut to the Q-Former's first %d (model.qformer_max_text; "
             "the decoder still reads the whole message; said once)", count, longest, max_length)


def tokenize_instructions(tokenizer, texts: Sequence[str], max_length: int,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Instruction texts (without image markup: the Q-Former sees the image itself) → right-padded
    ``(ids [N, T], mask [N, T])`` for :class:`QFormerTextEmbeddings`.

    A text longer than ``max_length`` tokens keeps its first ``max_length`` (InstructBLIP's Q-Former truncates its
    instruction the same way), noted once in the log, so a long chat message still gets an answer. An empty text is one
    padding token that no query attends to.
    """
    rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    long = [len(r) for r in rows if len(r) > max_length]
    if long and not _warned_truncation:
        _note_truncation(len(long), max(long), max_length)
    rows = [r[:max_length] for r in rows]
    width = max([1] + [len(r) for r in rows])
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def run_qformer(qformer: nn.Module, query_tokens: torch.Tensor, vision_tokens: torch.Tensor,
                text_embeds: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Queries ``[1, nq, H]`` attending to ``vision_tokens [N, L, W]`` → ``[N, nq, H]``.

    With ``text_embeds [N, T, H]`` (a ``text_input`` Q-Former) the queries also attend to those instruction
    tokens; ``text_mask [N, T]`` (1 = token, 0 = padding) keeps padding out. Only the queries' outputs return.
    """
    queries = query_tokens.expand(vision_tokens.shape[0], -1, -1)
    if text_embeds is None:
        return qformer(query_embeds=queries, encoder_hidden_states=vision_tokens).last_hidden_state
    nq = queries.shape[1]
    if text_mask is None:
        text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.long, device=text_embeds.device)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=text_mask.dtype, device=text_mask.device), text_mask], 1)
    out = qformer(query_embeds=torch.cat([queries, text_embeds.to(queries.dtype)], 1), query_length=nq,
                  attention_mask=mask, encoder_hidden_states=vision_tokens)
    return out.last_hidden_state[:, :nq]
