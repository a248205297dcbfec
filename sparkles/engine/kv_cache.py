"""A KV cache that appends in amortised constant time, for token-by-token decoding.

``transformers``' ``DynamicCache`` appends a decode step's keys and values with ``torch.cat``, which copies the
whole cache every step: for a batch of 8 left-padded evaluation prompts (~450 positions, 4 layers of the
benchmarks' small decoder) that is ~50 MB of copying per new token, a cost that grows with the batch and made a
batch-8 decode step markedly dearer per row than a batch-1 one. :class:`GrowingLayer` keeps each layer's keys
and values in a buffer with spare room and writes new positions into it; the attention reads a view of the
filled part. When the room runs out the buffer grows by a quarter (at least ``MIN_GROWTH`` positions), so the
copying is amortised over many steps and the spare memory stays bounded.

Everything else is ``DynamicCache``'s: cropping (used when a chat reuses its cache across turns), reordering,
lengths and masks work on ``keys`` / ``values``, which are always the filled part. After such an operation the
layer notices that ``keys`` is no longer a view of its buffer and starts a new buffer from it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_GROWTH = 256  # positions of spare room added at least when a buffer grows


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` whose ``update`` writes into a buffer with spare room instead of concatenating."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def _holds_in_buffer(self) -> bool:
        """True when ``keys``/``values`` are still the leading part of this layer's buffers."""
        buf = self._key_buffer
        return (buf is not None and self.keys.data_ptr() == buf.data_ptr() and self.keys.stride() == buf.stride()
                and self.values.data_ptr() == self._value_buffer.data_ptr()
                and self.keys.shape[:2] == buf.shape[:2] and self.keys.dtype == buf.dtype)

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        """Buffers of at least ``needed`` positions holding the current ``keys``/``values`` at their start."""
        if self._holds_in_buffer() and self._key_buffer.shape[-2] >= needed:
            return
        capacity = needed + max(MIN_GROWTH, needed // 4)
        filled = self.get_seq_length()
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        key_buffer = like.new_empty(shape)
        value_buffer = like.new_empty(shape)
        if filled:
            key_buffer[..., :filled, :] = self.keys
            value_buffer[..., :filled, :] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[..., :filled, :], value_buffer[..., :filled, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        self._reserve(end, key_states)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def new_kv_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers are :class:`GrowingLayer`."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache
