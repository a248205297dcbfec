"""A KV cache allocated once for a whole sequence, for decoding without per-token allocation or recompilation.

:class:`PreallocatedLayer` holds each layer's keys and values in buffers of ``capacity`` positions (the
generation's ``max_length``) made at the first write and kept for the life of the cache, across chat turns.
It works in two ways:

* eager (the default): a write of ``n`` positions goes into the buffer at the host-side fill count and the
  attention reads a view of the filled part, exactly as :class:`~.kv_cache.GrowingLayer` does — same values,
  same shapes, hence the same logits as the plain path;
* fixed shape (``step_index`` set, during a compiled decode step): the one new position is written with
  ``index_copy_`` at a position held in a device tensor and the attention reads the *whole* buffer, the unused
  positions hidden by a 4D additive mask. Every step then has the same shapes and addresses, which is what
  ``torch.compile`` needs to trace the step once and what CUDA graphs need to replay it.

Cropping (a chat turn that reuses part of its cache) only lowers the fill count: the stale positions are
overwritten by the next write. A cache of :class:`~.kv_cache.GrowingLayer` (what the chat engine makes) is
converted in place by :func:`make_static`, so the caller's cache object stays the one it keeps.

``transformers``' ``StaticCache`` does not fit here: its length is a device tensor read back on the host by
``get_seq_length`` (a synchronisation that cache reuse across turns and masks need), and its attention always
spans the whole buffer, also in eager decoding, where it only costs time.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

from .kv_cache import new_kv_cache


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose buffers hold ``capacity`` positions from the first write on."""

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.capacity = int(capacity)
        self.filled = 0  # positions holding keys/values (host-side: never read back from the device)
        self.step_index: Optional[torch.Tensor] = None  # [1] long on the device: fixed-shape write position
        self._key_buffer: Optional[torch.Tensor] = None
        self._value_buffer: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------------- storage
    def _allocate(self, capacity: int, like: torch.Tensor) -> None:
        """(Re)allocate buffers of ``capacity`` positions keeping the filled part (only when it would not fit:
        a larger ``max_length`` on a later turn, or a batch of another shape)."""
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        keys, values = like.new_zeros(shape), like.new_zeros(shape)
        if self.filled and self._key_buffer is not None:
            keys[..., :self.filled, :] = self._key_buffer[..., :self.filled, :]
            values[..., :self.filled, :] = self._value_buffer[..., :self.filled, :]
        self._key_buffer, self._value_buffer = keys, values
        self.capacity = capacity
        self._sync_views()

    def refresh_views(self) -> None:
        """Point ``keys``/``values`` at the filled part again (after fixed-shape steps, which only count)."""
        if self._key_buffer is not None:
            self._sync_views()

    def _sync_views(self) -> None:
        self.keys = self._key_buffer[..., :self.filled, :]
        self.values = self._value_buffer[..., :self.filled, :]

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take over the filled part of another layer (a plain turn's cache converted for a static one)."""
        self.dtype, self.device = keys.dtype, keys.device
        self.filled = keys.shape[-2]
        shape = (*keys.shape[:-2], max(self.capacity, self.filled), keys.shape[-1])
        self._key_buffer, self._value_buffer = keys.new_zeros(shape), values.new_zeros(shape)
        self._key_buffer[..., :self.filled, :] = keys
        self._value_buffer[..., :self.filled, :] = values
        self.capacity = shape[-2]
        self.is_initialized = True
        self._sync_views()

    def reserve(self, needed: int, like: Optional[torch.Tensor] = None) -> None:
        """Make room for ``needed`` positions (no-op when the buffers already have it)."""
        if self._key_buffer is not None and self._key_buffer.shape[-2] >= needed \
                and (like is None or self._key_buffer.shape[:-2] == like.shape[:-2]):
            return
        if like is None and self._key_buffer is None:
            return  # nothing written yet: the first write allocates
        if like is not None and self._key_buffer is not None and self._key_buffer.shape[:-2] != like.shape[:-2]:
            self.filled = 0  # another batch shape: what was held belongs to other sequences
            self._key_buffer = None
        self._allocate(max(needed, self.capacity), like if like is not None else self._key_buffer)

    # ------------------------------------------------------------------------------------------- cache API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step_index is not None:  # a fixed-shape decode step: no host-side state read or written
            self._key_buffer.index_copy_(2, self.step_index, key_states)
            self._value_buffer.index_copy_(2, self.step_index, value_states)
            return self._key_buffer, self._value_buffer
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.filled
        end = start + key_states.shape[-2]
        if self._key_buffer is None or self._key_buffer.shape[-2] < end \
                or self._key_buffer.shape[:-2] != key_states.shape[:-2]:
            self.reserve(end, key_states)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self.filled = end
        self._sync_views()
        return self.keys, self.values

    def advance(self, n: int = 1) -> None:
        """Count ``n`` positions written by fixed-shape steps (their ``update`` left the host count alone)."""
        self.filled += n

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.filled

    def get_max_cache_shape(self) -> int:
        return -1  # grows when needed, like a dynamic layer (masks are built from the filled length)

    def crop(self, max_length: int) -> None:
        # negative: drop that many positions (newer transformers); otherwise the length to keep (older ones)
        keep = self.filled + max_length if max_length < 0 else max_length
        if self.filled <= keep:
            return
        self.filled = max(0, keep)
        if self._key_buffer is not None:
            self._sync_views()

    def reset(self) -> None:
        self.filled = 0
        self.step_index = None
        self._key_buffer = self._value_buffer = None
        super().reset()


def make_static(cache, capacity: int):
    """Turn ``cache`` (a ``DynamicCache``, possibly holding a plain turn's positions) into one whose layers are
    :class:`PreallocatedLayer` of at least ``capacity`` positions, in place; returns its layers."""
    cache.layer_class_to_replicate = functools.partial(PreallocatedLayer, capacity)
    layers = cache.layers
    for i, layer in enumerate(layers):
        if isinstance(layer, PreallocatedLayer):
            layer.step_index = None
            layer.reserve(capacity)
            continue
        static = PreallocatedLayer(capacity)
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            static.adopt(layer.keys, layer.values)
        layers[i] = static
    return layers


def new_static_kv_cache(capacity: int):
    """An empty ``DynamicCache`` whose layers are :class:`PreallocatedLayer` of ``capacity`` positions."""
    cache = new_kv_cache()
    make_static(cache, capacity)
    return cache


def static_layers(cache) -> list[PreallocatedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, PreallocatedLayer)]
