"""Tensor conventions every room shares: the label that carries no loss, dtype names, and seeding every RNG."""

from __future__ import annotations

import random

import torch

IGNORE_INDEX = -100  # a label position that carries no loss (PyTorch's cross-entropy default)

# The dtype names configs may use (model.dtype, run.amp_dtype).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str, *, what: str = "model.dtype") -> torch.dtype:
    """A dtype name of :data:`DTYPES`, or ``auto``: bfloat16 (float16 without bf16 support) on CUDA, float32 on a
    CPU, where half precision runs several times slower on the machines this project targets."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (CPU and every GPU)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
