"""Logging setup for multi-process jobs, the progress bar of long steps, and running-average meters for training.

Rank 0 logs at INFO to stderr (and optionally to a file); other ranks only log warnings, so a job launched
with ``torchrun`` prints one readable stream. :func:`progress_bar` is the one bar every long step shows
(evaluation, dialogue generation, statistics, shard writing). Meters keep a window for the log line and a
global average for the per-epoch summary.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Optional

FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and tqdm swap it), not to the one seen at setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(rank: int = 0, log_file: Optional[str | Path] = None, *, level: int = logging.INFO) -> None:
    """Configure the ``sparkles`` logger hierarchy once per process."""
    root = logging.getLogger("sparkles")
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False
    for handler in list(root.handlers):  # re-entrant: tests call main() several times in one process
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(FORMAT if rank == 0 else f"[rank {rank}] " + FORMAT, datefmt="%H:%M:%S")
    stream = _StderrHandler()
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: Optional[str] = None,
                 unit: str = "it", enabled: bool = True, **kwargs: Any):
    """A tqdm bar on stderr for a long step (``kwargs`` go to tqdm, e.g. ``initial`` or ``leave``).

    ``enabled=False`` (a ``--no-progress`` flag) shows nothing. Otherwise the bar shows whenever stderr is a
    terminal and switches itself off when it is not (log files, batch jobs), as the training loop's bar does:
    redrawn lines would only fill a log. The bar is always a working tqdm object (``update``/``close``).
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True,
                **kwargs)


class Meter:
    """A scalar with a moving window (for log lines) and a global mean (for epoch summaries)."""

    def __init__(self, window: int = 20) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def recent(self) -> float:
        return sum(self.window) / len(self.window) if self.window else float("nan")

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


class MeterGroup:
    """Named meters created on first use."""

    def __init__(self, window: int = 20) -> None:
        self._window = window
        self.meters: dict[str, Meter] = {}

    def update(self, n: int = 1, **values: float) -> None:
        for key, value in values.items():
            self.meters.setdefault(key, Meter(self._window)).update(value, n)

    def __getitem__(self, key: str) -> Meter:
        return self.meters[key]

    def __contains__(self, key: str) -> bool:
        return key in self.meters
