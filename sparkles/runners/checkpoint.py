"""Training checkpoints: atomic writes, weights-only readable, everything needed for an exact resume.

``<output_dir>/checkpoint_<epoch>.pth`` (and ``checkpoint_last.pth``, the same content) holds::

    {"model": trainable parameters only (upstream layout: {"llama_proj.weight", ...}),
     "optimizer": AdamW state, "scaler": GradScaler state or None, "scheduler": {"step", "name"},
     "epoch": int, "global_step": int, "world_size": int, "config": merged config (plain dict),
     "ranks": [{"rng": {...}, "data": mixture state}, ...]}   # one entry per rank

Only plain containers and tensors are stored, so ``torch.load(..., weights_only=True)`` reads it, and
:func:`sparkles.models.loaders.load_sparkles_checkpoint` can load the ``model`` part for inference.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..common.io import atomic_write

FORMAT = "sparkles-train-1"


def rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states as plain data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj: Any, path: Path) -> Path:
    """``torch.save`` through the project's atomic writer: a killed run leaves the previous checkpoint whole."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume_ckpt_path: checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise ValueError(f"{path}: not a training checkpoint (needs 'model' and 'epoch'); to start from weights "
                         "only, set model.ckpt instead of run.resume_ckpt_path")
    return ckpt


def cpu_state(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def optimizer_state_to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: optimizer_state_to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(optimizer_state_to_cpu(v) for v in state)
    return state
