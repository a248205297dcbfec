"""Training checkpoints: atomic writes, weights-only readable, everything needed for an exact resume.

``<output_dir>/checkpoint_<epoch>.pth`` (and ``checkpoint_last.pth``, the same content) holds::

    {"model": trainable parameters only (upstream layout: {"llama_proj.weight", ...}),
     "optimizer": AdamW state, "scaler": GradScaler state or None, "scheduler": {"step", "name"},
     "epoch": int, "global_step": int, "world_size": int, "config": merged config (plain dict),
     "ranks": [{"rng": {...}, "data": mixture state}, ...]}   # one entry per rank

Only plain containers and tensors are stored, so ``torch.load(..., weights_only=True)`` reads it, and
:func:`sparkles.models.loaders.load_sparkles_checkpoint` can load the ``model`` part for inference.

Both files are written through the atomic writer, ``checkpoint_last.pth`` as a copy of the finished
``checkpoint_<epoch>.pth``: a killed run leaves each of them whole (old or new). Reading goes through
:func:`sparkles.models.loaders.read_state_dict`, so an empty or truncated file is an error that names it.
:func:`newest_checkpoint` finds the checkpoint ``run.auto_resume`` continues from.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..common.io import atomic_write

FORMAT = "sparkles-train-1"
LAST = "checkpoint_last.pth"
_EPOCH_FILE = re.compile(r"checkpoint_(\d+)\.pth")

log = logging.getLogger(__name__)


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
    """A training checkpoint (see the module docstring); errors name the file."""
    from ..models.loaders import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume_ckpt_path: checkpoint not found: {path}")
    ckpt = read_state_dict(path)
    if "model" not in ckpt or "epoch" not in ckpt:
        raise ValueError(f"{path}: not a training checkpoint (needs 'model' and 'epoch'); to start from weights "
                         "only, set model.ckpt instead of run.resume_ckpt_path")
    return ckpt


def checkpoint_files(output_dir: Path) -> list[Path]:
    """The run's checkpoints in ``output_dir``: ``checkpoint_last.pth`` first, then by epoch, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    numbered = sorted((p for p in output_dir.iterdir() if _EPOCH_FILE.fullmatch(p.name)),
                      key=lambda p: -int(_EPOCH_FILE.fullmatch(p.name).group(1)))
    last = output_dir / LAST
    return ([last] if last.is_file() else []) + numbered


def newest_checkpoint(output_dir: Path) -> Optional[tuple[Path, dict]]:
    """The complete checkpoint of the latest epoch in ``output_dir`` and its content, or None if there is none.

    A file that cannot be read (empty, truncated, not a training checkpoint) is skipped with a warning that
    names it, so a damaged newest file falls back to the epoch before it.
    """
    from ..models.loaders import CheckpointError

    best: Optional[tuple[Path, dict]] = None
    for path in checkpoint_files(output_dir):
        match = _EPOCH_FILE.fullmatch(path.name)
        if best is not None and match and int(match.group(1)) <= int(best[1]["epoch"]):
            break  # the rest are older than what was found
        try:
            ckpt = load_checkpoint(path)
        except (CheckpointError, ValueError) as exc:
            log.warning("run.auto_resume: skipping %s: %s", path, exc)
            continue
        if best is None or int(ckpt["epoch"]) > int(best[1]["epoch"]):
            best = (path, ckpt)
    return best


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
