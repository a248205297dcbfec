"""Where each part of SparklesChat goes, decided in one pure function from the config and the device asked for.

With ``model.low_resource`` bitsandbytes places the 8-bit decoder while it loads (through a ``device_map``),
before the rest of the model exists; the plan names that map together with every other part's device, so that a
run asked for ``cuda:N`` puts the 8-bit decoder and the towers, query tokens and projection all on GPU N.
:meth:`SparklesChat.from_config` loads and places by it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.config import ConfigError

# The parts a plan places: the model's children and its own parameters (query_tokens), by attribute name.
# SparklesChat.apply_plan refuses a model with a part the plan does not name, so a new part cannot be left behind.
PARTS = ("visual_encoder", "ln_vision", "Qformer", "qformer_text", "query_tokens", "llama_proj",
         "image_ordinal_embed", "llama_model")
# The ``device_map`` bitsandbytes loads the 8-bit decoder with (None: the decoder is loaded, then moved).
DECODER_DEVICE_MAP = "llama_model.device_map"


def device_plan(cfg: Any, device: str | torch.device) -> dict[str, Any]:
    """``{part: torch.device}`` for every name of :data:`PARTS`, plus :data:`DECODER_DEVICE_MAP`.

    Without ``low_resource`` every part goes to ``device`` and the decoder is moved there after loading. With it
    (CUDA only), every part and the 8-bit decoder go to one GPU: the one ``device`` names, else
    ``model.device_8bit``, else GPU 0; an explicit ``model.device_8bit`` naming another GPU than ``device`` is an
    error naming both (:class:`ConfigError`, a ``ValueError``).
    """
    device = torch.device(device)
    if not cfg.low_resource:
        return {**{part: device for part in PARTS}, DECODER_DEVICE_MAP: None}
    if device.type != "cuda":
        raise ConfigError("model.low_resource=True loads the decoder in 8-bit with bitsandbytes, which needs a "
                         f"CUDA device (asked for {device}); set model.low_resource=False to run on the CPU")
    pinned = cfg.device_8bit
    if pinned is not None and device.index is not None and int(pinned) != device.index:
        raise ConfigError(f"model.device_8bit={pinned} but the model was asked for {device}: the 8-bit decoder and "
                         f"the rest of the model share one GPU; leave model.device_8bit unset (or set it to "
                         f"{device.index}) to use {device}")
    index = device.index if device.index is not None else int(pinned if pinned is not None else 0)
    gpu = torch.device("cuda", index)
    return {**{part: gpu for part in PARTS}, DECODER_DEVICE_MAP: {"": index}}
