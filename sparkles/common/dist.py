"""Process-group helpers for ``torchrun`` (DDP): init from the environment, rank queries, collectives.

Training and evaluation start one process per device with ``torchrun``; each reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from the environment. NCCL is used on GPUs, gloo on CPU (so two CPU processes can train in the
tests). Without those variables everything runs as a single process and the collectives are no-ops.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` → the local GPU if there is one, else CPU; ``cuda`` → ``cuda:<local_rank>``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device={spec!r} but CUDA is not available; use run.device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto", backend: str = "auto", *, timeout_min: int = 60) -> DistInfo:
    """Join the process group described by the torchrun environment (or stay single-process)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, 1, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_min)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        tdist.init_process_group(**kwargs)
    return DistInfo(rank, world, local_rank, local_world, dev, backend)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when single-process."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sum of a list of floats over ranks (float64 on the collective's device)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or torch.device("cpu"))
    tdist.all_reduce(t)
    return t.tolist()


def cleanup() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def cpu_threads_per_process(local_world_size: int) -> int:
    """A fair share of the machine's cores, so N processes on one host do not oversubscribe it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))
