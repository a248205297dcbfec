"""The ``image_text_pretrain`` task (upstream name): multi-image dialogue fine-tuning of SparklesChat.

It builds the model and the datasets of a run config and computes one step's loss. With
``run.vision_feature_cache`` the frozen vision tower and Q-Former run once per distinct image (the vision tower
only, when the Q-Former reads each image's message): their outputs are kept (on the training device) and
reused, which removes most of the compute of the paper recipe, where only ``llama_proj`` learns. The cache
needs frozen towers and a deterministic image transform.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from ..common.registry import DATASETS, MODELS, TASKS
from ..data import builders

log = logging.getLogger(__name__)


class VisionFeatureCache:
    """Frozen-tower outputs by image key, computed on first use.

    Q-Former outputs for the paper's towers; for a Q-Former that reads each image's message
    (``model.qformer_text_input``) the outputs depend on the message, so the ViT's tokens are kept instead and
    the (frozen, small) Q-Former runs on every use.
    """

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @torch.no_grad()
    def features(self, model, pixels: torch.Tensor, keys: list[str],
                 messages: Optional[list[str]] = None) -> torch.Tensor:
        per_image = model.vision_tokens if model.reads_messages else model.image_features
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            feats = per_image(pixels[missing])
            for j, i in enumerate(missing):
                self.store[keys[i]] = feats[j].detach()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        cached = torch.stack([self.store[k] for k in keys])
        return model.query_features(cached, messages) if model.reads_messages else cached


def check_feature_cache(cfg) -> None:
    """The cache is only correct when the image → feature map cannot change or vary."""
    problems = []
    if not cfg.model.freeze_vit or not cfg.model.freeze_qformer:
        problems.append("model.freeze_vit and model.freeze_qformer must be True")
    for name, dcfg in cfg.datasets.items():
        if float(dcfg.sample_ratio) > 0 and dcfg.vis_processor.train.name != "blip2_image_eval":
            problems.append(f"datasets.{name}.vis_processor.train.name must be blip2_image_eval (deterministic), "
                            f"not {dcfg.vis_processor.train.name}")
    if problems:
        raise ValueError("run.vision_feature_cache=True: " + "; ".join(problems))


def check_datasets_feed(cfg, task: str) -> None:
    """Every dataset of ``cfg`` makes samples for ``task`` (its builder's ``task``), or a ValueError names it."""
    for name in cfg.datasets:
        wanted = getattr(DATASETS.get(name), "task", "image_text_pretrain")
        if wanted != task:
            raise ValueError(f"datasets.{name} makes samples for the task {wanted!r}, not {task!r}: train it with "
                             f"run.task={wanted}, or leave it out of this config")


@TASKS.register("image_text_pretrain")
class ImageTextPretrainTask:
    """Build model and datasets; one training step = the model's masked next-token loss."""

    name = "image_text_pretrain"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        check_datasets_feed(cfg, self.name)
        self.feature_cache: Optional[VisionFeatureCache] = None
        if cfg.run.vision_feature_cache:
            check_feature_cache(cfg)
            self.feature_cache = VisionFeatureCache()

    def build_model(self, *, root: Path, device: torch.device):
        model_cls = MODELS.get(self.cfg.model.arch)
        model = model_cls.from_config(self.cfg.model, root=root, device=device)
        if self.cfg.model.use_grad_checkpoint:
            self._enable_grad_checkpointing(model)
        return model

    @staticmethod
    def _enable_grad_checkpointing(model) -> None:
        """The ViT honours the flag at construction; trainable HF parts (Q-Former, LLM) switch it on here."""
        for name in ("Qformer", "llama_model"):
            module = getattr(model, name, None)
            trainable = module is not None and any(p.requires_grad for p in module.parameters())
            if trainable and getattr(module, "supports_gradient_checkpointing", False):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                log.info("gradient checkpointing on for %s", name)

    def build_datasets(self, *, root: Path, tokenizer) -> dict:
        return builders.build_datasets(self.cfg, root=root, tokenizer=tokenizer, split="train")

    def train_step(self, model, batch: dict, *, device: torch.device) -> dict:
        """Forward one batch; ``model`` may be DDP-wrapped. Returns the model output (``loss`` etc.)."""
        nb = device.type == "cuda"
        kwargs = {k: batch[k].to(device, non_blocking=nb)
                  for k in ("input_ids", "attention_mask", "image_slot_mask", "labels")}
        images = batch.get("images")
        if images is not None:
            if self.feature_cache is not None:
                core = model.module if hasattr(model, "module") else model
                kwargs["image_features"] = self.feature_cache.features(
                    core, images.to(device, non_blocking=nb), batch["image_keys"], batch.get("image_messages"))
            else:
                kwargs["images"] = images.to(device, non_blocking=nb)
                kwargs["image_messages"] = batch.get("image_messages")
        return model(**kwargs)
