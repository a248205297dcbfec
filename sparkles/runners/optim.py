"""AdamW with the upstream parameter groups.

Weight decay applies to trainable parameters with at least two dimensions whose name contains none of
``bias``, ``ln`` or ``bn`` (so ``llama_proj.weight`` is decayed and ``llama_proj.bias`` is not); every other
trainable parameter gets no decay. Betas are ``(0.9, run.beta2)``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

NO_DECAY_MARKERS = ("bias", "ln", "bn")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, names = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names.append(name)
        if p.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS):
            no_decay.append(p)
        else:
            decay.append(p)
    if not names:
        raise ValueError("the model has no trainable parameters (check model.freeze_* settings)")
    n = sum(p.numel() for p in decay + no_decay)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} tensors)" if len(names) > 8 else "")
    log.info("trainable parameters: %s = %.3fM values", shown, n / 1e6)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, beta2: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, beta2))
