"""AdamW with the upstream parameter groups.

Weight decay applies to trainable parameters with at least two dimensions whose name contains none of
``bias``, ``ln`` or ``bn`` (so ``llama_proj.weight`` is decayed and ``llama_proj.bias`` is not); every other
trainable parameter gets no decay. Betas are ``(0.9, run.beta2)``. ``lr_scale`` (``run.lr_scale``) splits off the
parameters under a name prefix into groups whose ``lr_scale`` the runner multiplies the scheduled rate by.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

NO_DECAY_MARKERS = ("bias", "ln", "bn")


def param_groups(model: nn.Module, weight_decay: float, lr_scale: Mapping[str, float] | None = None) -> list[dict]:
    """AdamW groups: (decayed, not decayed) × (one per ``lr_scale`` prefix, and the rest at scale 1)."""
    lr_scale = {str(k): float(v) for k, v in (lr_scale or {}).items()}
    for prefix, scale in lr_scale.items():
        if scale <= 0:
            raise ValueError(f"run.lr_scale.{prefix}: the multiplier must be positive, got {scale}")
    groups: dict[tuple[float, bool], list] = {}
    names, matched = [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names.append(name)
        # the longest matching prefix wins, so a part can be scaled apart from its parent
        prefix = max((k for k in lr_scale if name == k or name.startswith(k + ".")), key=len, default=None)
        matched.add(prefix)
        decayed = not (p.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS))
        groups.setdefault((lr_scale.get(prefix, 1.0), decayed), []).append(p)
    if not names:
        raise ValueError("the model has no trainable parameters (check model.freeze_* settings)")
    unused = sorted(set(lr_scale) - matched)
    if unused:
        raise ValueError(f"run.lr_scale: no trainable parameter under {', '.join(unused)}")
    n = sum(p.numel() for ps in groups.values() for p in ps)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} tensors)" if len(names) > 8 else "")
    log.info("trainable parameters: %s = %.3fM values", shown, n / 1e6)
    # the unscaled (decayed, not decayed) pair first, as without lr_scale, so that optimizer states line up
    order = [(1.0, True), (1.0, False)] + sorted(k for k in groups if k[0] != 1.0)
    return [{"params": groups.get(key, []), "weight_decay": weight_decay if key[1] else 0.0, "lr_scale": key[0]}
            for key in order]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, beta2: float,
                    lr_scale: Mapping[str, float] | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, lr_scale)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2))
