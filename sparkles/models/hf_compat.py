"""Keyword names of ``transformers`` model forwards that differ between its versions.

transformers renamed ``past_key_values`` to ``cache`` and ``num_logits_to_keep`` to ``logits_to_keep``; the model
(its training forward) and the decoding engine ask here which name the installed version accepts.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(cls) -> str:
    """The name under which ``cls.forward`` takes the KV cache: ``cache`` (newer transformers) or
    ``past_key_values``."""
    return "cache" if "cache" in _forward_params(cls) else "past_key_values"


def logits_keep_kwarg(cls) -> Optional[str]:
    """The name under which ``cls.forward`` limits the logits to the last positions (``logits_to_keep``, older
    ``num_logits_to_keep``), or None if it cannot."""
    params = _forward_params(cls)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None
