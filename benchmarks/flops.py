"""Analytic FLOP counts of SparklesChat's work, the numerator of model FLOP utilisation (MFU).

Conventions (those of the MFU literature, e.g. PaLM appendix B):

* A matrix product of ``[m, k] @ [k, n]`` costs ``2·m·k·n`` FLOPs (one multiply and one add per MAC).
  Only matrix products are counted; norms, activations, softmax, rotary embeddings, the loss and the
  optimizer are not (they are the "overhead" that utilisation measures).
* Linear layers count the tokens that are actually run, i.e. the padded batch ``B·T``.
* Attention counts ``Q·Kᵀ`` and ``P·V``: ``4·d·(query, key) pairs``. Causal self-attention counts only the
  pairs a query may see (``T(T+1)/2``), the work a causal kernel has to do; ``causal=False`` counts the full
  square (what ``torch.utils.flop_counter`` reports, used to cross-check this module).
* Training step with frozen towers and a frozen decoder, trainable projection only:

  - vision tower + Q-Former: forward only (no tensor there requires grad, autograd records nothing);
  - projection: forward ``2·N·H·D`` + weight gradient ``2·N·H·D`` (its input, the features, needs no grad);
  - decoder: forward (linears + attention + LM head) plus the backward pass for *activation* gradients only —
    ``1×`` the forward linear/LM-head FLOPs (``dX = dY·W``; no ``dW`` because the weights are frozen) and
    ``2×`` the forward attention FLOPs (``dQ, dK, dV, dP``: four products against two forward).

  So ``train = vision_fwd + 2·proj_fwd + 2·dec_linear_fwd + 2·lm_head_fwd + 3·dec_attn_fwd``.
  (``torch.utils.flop_counter`` books the attention backward at 2.5× because the kernel recomputes the
  scores; recomputation is hardware work, not model work, so it is not in the MFU numerator.)
"""

from __future__ import annotations

from typing import Callable, Optional


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention(q_len: int, kv_len: int, dim: int, *, causal: bool) -> int:
    """``Q·Kᵀ`` and ``P·V`` of one sequence over all heads (``dim`` = heads × head_dim)."""
    if causal:
        past = kv_len - q_len  # queries also see a cached prefix of this length
        pairs = q_len * past + q_len * (q_len + 1) // 2
    else:
        pairs = q_len * kv_len
    return 4 * pairs * dim


def vision_forward(size, n_images: int, *, causal: bool = True) -> dict[str, int]:
    """EVA-ViT (patch embedding + blocks) and the query-only Q-Former for ``n_images`` images."""
    del causal  # both towers attend bidirectionally
    patches = (size.image_size // size.patch) ** 2
    L, W = patches + 1, size.vit_width
    vit_linear = linear(patches, 3 * size.patch * size.patch, W)  # patch embedding (a strided conv)
    vit_linear += size.vit_depth * (linear(L, W, 3 * W) + linear(L, W, W) + linear(L, W, size.vit_mlp)
                                    + linear(L, size.vit_mlp, W))
    vit_attn = size.vit_depth * attention(L, L, W, causal=False)
    nq, H = size.nq, size.q_hidden
    q_linear = q_attn = 0
    for layer in range(size.q_layers):
        q_linear += 4 * linear(nq, H, H) + linear(nq, H, size.q_intermediate) + linear(nq, size.q_intermediate, H)
        q_attn += attention(nq, nq, H, causal=False)
        if layer % size.q_cross_freq == 0:
            q_linear += 2 * linear(nq, H, H) + 2 * linear(L, W, H)  # cross-attention q, o and k, v (ViT width in)
            q_attn += attention(nq, L, H, causal=False)
    return {k: v * n_images for k, v in
            dict(vit_linear=vit_linear, vit_attn=vit_attn, qformer_linear=q_linear, qformer_attn=q_attn).items()}


def decoder_forward(size, *, batch: int, seq_len: int, logits_positions: int, past: int = 0,
                    causal: bool = True) -> dict[str, int]:
    """LLaMA forward over ``batch × seq_len`` new tokens (after ``past`` cached ones), LM head on
    ``logits_positions`` positions per row."""
    D, I = size.llm_hidden, size.llm_intermediate
    tokens = batch * seq_len
    lin = size.llm_layers * (4 * linear(tokens, D, D) + 3 * linear(tokens, D, I))
    attn = size.llm_layers * batch * attention(seq_len, past + seq_len, D, causal=causal)
    head = linear(batch * logits_positions, D, size.vocab)
    return dict(decoder_linear=lin, decoder_attn=attn, lm_head=head)


def train_step(size, *, batch: int, seq_len: int, n_images: int, logits_positions: Optional[int] = None,
               cached_features: bool = False, causal: bool = True) -> dict[str, int]:
    """Forward + backward FLOPs of one training step (see the module docstring); ``total`` included."""
    out: dict[str, int] = {}
    if not cached_features:
        out.update(vision_forward(size, n_images))
    proj = linear(n_images * size.nq, size.q_hidden, size.llm_hidden)
    out["projection_fwd_bwd"] = 2 * proj
    dec = decoder_forward(size, batch=batch, seq_len=seq_len,
                          logits_positions=seq_len if logits_positions is None else logits_positions, causal=causal)
    out["decoder_fwd"] = dec["decoder_linear"] + dec["decoder_attn"]
    out["lm_head_fwd"] = dec["lm_head"]
    out["decoder_bwd"] = dec["decoder_linear"] + 2 * dec["decoder_attn"] + dec["lm_head"]
    out["total"] = sum(out.values())
    return out


def parameter_counts(model) -> dict[str, int]:
    def count(mod) -> int:
        return sum(p.numel() for p in mod.parameters())

    return dict(vision=count(model.visual_encoder) + count(model.ln_vision), qformer=count(model.Qformer)
                + model.query_tokens.numel(), projection=count(model.llama_proj), decoder=count(model.llama_model),
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


def torch_flop_counter():
    """A ``FlopCounterMode`` that also counts CPU flash attention (not in torch's table), full-square."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping: dict = {}
    fwd: Callable = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)  # noqa: E731
    bwd: Callable = lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)  # noqa: E731
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return FlopCounterMode(display=False, custom_mapping=mapping)
