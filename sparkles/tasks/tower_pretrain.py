"""The ``tower_pretrain`` task: pretrain the tiny model's vision towers on the synthetic world's scene tags.

This is the CPU world's stand-in for the pretrained EVA-ViT and BLIP-2 Q-Former of the paper (see
:mod:`sparkles.data.scene_tags` for why). The model is the image side of SparklesChat — the same modules under
the same names, built by :func:`sparkles.models.sparkleschat.build_towers` — plus a linear read-out of the
Q-Former's query outputs that predicts how many objects of each kind (colour × shape) the image holds. After
training, the towers are written as a BLIP-2 stage-1 file (``<output_dir>/blip2_towers.pth``), which the chat
model loads through ``model.q_former_model`` exactly as the paper config loads BLIP-2's file; the read-out is
not part of it.

    python train.py --cfg-path train_configs/sparkleschat_tiny_stage0.yaml --sparkles_root ROOT
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..common.registry import TASKS

log = logging.getLogger(__name__)

TOWERS_FILE = "blip2_towers.pth"


class TowerTagger(nn.Module):
    """ViT → ln_vision → Q-Former (SparklesChat's names) → a linear read-out of how many of each object kind."""

    def __init__(self, cfg, vocabulary) -> None:
        super().__init__()
        from ..models.sparkleschat import build_towers

        self.cfg, self.vocabulary = cfg, vocabulary
        self.visual_encoder, self.ln_vision, self.Qformer, self.query_tokens = build_towers(cfg)
        self.readout = nn.Linear(cfg.num_query_token * cfg.qformer_hidden,
                                 vocabulary.num_object_kinds * vocabulary.max_count_class)
        self.tokenizer = None  # no text side; train.py passes it to the dataset builders

    @property
    def device(self) -> torch.device:
        return self.readout.weight.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels ``[N, 3, H, W]`` → count logits ``[N, object kinds, max_count_class]``."""
        from ..models.qformer import run_qformer

        vis = self.ln_vision(self.visual_encoder(images))
        queries = run_qformer(self.Qformer, self.query_tokens, vis)
        v = self.vocabulary
        return self.readout(queries.flatten(1)).view(images.shape[0], v.num_object_kinds, v.max_count_class)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, cell_kinds: torch.Tensor) -> dict[str, float]:
        """Fraction of (image, kind) counts right, and of images with every count right."""
        logits = self(images)
        ok = logits.argmax(-1) == kind_counts(cell_kinds, logits.shape[1], logits.shape[2])
        return {"kind_count": ok.float().mean().item(), "image_exact": ok.all(1).float().mean().item()}


def kind_counts(cell_kinds: torch.Tensor, num_object_kinds: int, num_classes: int) -> torch.Tensor:
    """``[N, cells]`` cell classes (0 = empty) → ``[N, num_object_kinds]`` counts, capped at ``num_classes - 1``."""
    onehot = F.one_hot(cell_kinds, num_object_kinds + 1)[..., 1:]
    return onehot.sum(1).clamp(max=num_classes - 1)


@TASKS.register("tower_pretrain")
class TowerPretrainTask:
    """Build the tagger and the scene-tag datasets; one step = cross-entropy of every kind's count."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        for name in cfg.datasets:
            from ..common.registry import DATASETS

            if getattr(DATASETS.get(name), "kind", None) != "scene_tags":
                raise ValueError(f"run.task=tower_pretrain trains on scene tags only; datasets.{name} is not a "
                                 "scene-tag dataset (use synthetic_scene_tags)")

    def build_model(self, *, root: Path, device: torch.device) -> TowerTagger:
        from omegaconf import OmegaConf

        from ..data.scene_tags import TagVocabulary
        from ..models.sparkleschat import SparklesChatConfig

        mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparklesChatConfig), self.cfg.model))
        return TowerTagger(mcfg, TagVocabulary.of_world()).to(device)

    def build_datasets(self, *, root: Path, tokenizer=None) -> dict:
        from ..data import builders

        return builders.build_datasets(self.cfg, root=root, tokenizer=tokenizer, split="train")

    def train_step(self, model, batch: dict, *, device: torch.device) -> dict:
        logits = model(batch["images"].to(device))
        counts = kind_counts(batch["cell_kinds"].to(device), logits.shape[1], logits.shape[2])
        return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), counts.flatten())}

    def after_training(self, model: TowerTagger, output_dir: Path) -> dict:
        """Write the towers (without the read-out) as a BLIP-2 stage-1 file for ``model.q_former_model``."""
        from ..models.loaders import save_blip2

        core = model.module if hasattr(model, "module") else model
        path = save_blip2(core, Path(output_dir) / TOWERS_FILE)
        log.info("towers written to %s (load them with model.q_former_model)", path)
        return {"towers": str(path)}
