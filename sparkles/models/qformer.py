"""The BLIP-2 Q-Former on ``transformers``' ``Blip2QFormerModel``, used on the query-only path.

Learned query tokens self-attend, cross-attend to every vision token in every ``cross_attention_freq``-th
layer (0, 2, 4, ...), and use the query feed-forward pair; no text enters, so the word/position embeddings,
the text feed-forward and the LM head of the BLIP-2 checkpoint are not part of this module.
"""

from __future__ import annotations

import torch
from torch import nn


def build_qformer(*, hidden: int, layers: int, heads: int, intermediate: int, encoder_width: int,
                  cross_attention_freq: int = 2, init_std: float = 0.02, dropout: float = 0.1,
                  cross_attention_init: str = "normal") -> nn.Module:
    """A fresh Q-Former. ``cross_attention_init="xavier"`` re-draws the cross-attention matrices Xavier-uniform.

    With BERT's 0.02 everywhere, a Q-Former trained from scratch learns content-based attention (every query
    finds the objects) but never position-based routing: its queries all look at the same patch. Xavier-scale
    cross-attention lets each query learn its own routing (docs/notes/tiny_world.md, session 4).
    """
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    if cross_attention_init not in ("normal", "xavier"):
        raise ValueError(f"cross_attention_init must be 'normal' or 'xavier', not {cross_attention_init!r}")

    config = Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        encoder_hidden_size=encoder_width, cross_attention_frequency=cross_attention_freq, layer_norm_eps=1e-12,
        hidden_act="gelu", vocab_size=1, max_position_embeddings=1, use_qformer_text_input=False,
        initializer_range=init_std, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    config._attn_implementation = "sdpa"
    qformer = Blip2QFormerModel(config)
    if cross_attention_init == "xavier":
        with torch.no_grad():
            for name, param in qformer.named_parameters():
                if ".crossattention." in name and param.dim() == 2:
                    nn.init.xavier_uniform_(param)
    return qformer


def run_qformer(qformer: nn.Module, query_tokens: torch.Tensor, vision_tokens: torch.Tensor) -> torch.Tensor:
    """Queries ``[1, nq, H]`` attending to ``vision_tokens [N, L, W]`` → ``[N, nq, H]``."""
    queries = query_tokens.expand(vision_tokens.shape[0], -1, -1)
    out = qformer(query_embeds=queries, encoder_hidden_states=vision_tokens)
    return out.last_hidden_state
