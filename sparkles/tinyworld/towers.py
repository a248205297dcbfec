"""The world's stand-in for pretrained towers: the ``tower_pretrain`` task and the ``tinyworld`` initialisation.

The paper loads pretrained EVA-ViT and BLIP-2 Q-Former weights. The world has none, so its towers are trained
first, on direct targets (:mod:`.tags`, :mod:`.instruction_tags`): the model is the image side of SparklesChat —
the same modules under the same names, built by :func:`sparkles.models.sparkleschat.build_towers` — plus read-out
heads that train each query token to carry one fact of the image (:class:`TowerTagger`). After training, the
towers are written as a BLIP-2 stage-1 file (``<output_dir>/blip2_towers.pth``), which the chat model loads
through ``model.q_former_model`` exactly as the paper config loads BLIP-2's file; the heads are not part of it.

    python train.py --cfg-path train_configs/sparkleschat_tiny_towers.yaml [--sparkles_root ROOT]

Towers trained from scratch need an initialisation of their own (``model.towers_init: tinyworld``, registered
here): with BERT's 0.02 everywhere a Q-Former learns content-based attention (every query finds the objects) but
never position-based routing (its queries all look at the same patch); distinct query tokens (spread 1.0) and
Xavier-scale cross-attention let each query learn its own routing, and a larger ViT position embedding (0.5)
keeps each patch's place legible after the blocks (docs/research/tinyworld.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ..common.paths import resolve_path
from ..common.registry import TASKS, TOWERS_INITS
from ..common.tensors import IGNORE_INDEX
from ..conversation.template import strip_slots
from ..data import builders
from ..models.loaders import save_blip2
from ..models.qformer import run_qformer, tokenize_instructions
from ..models.sparkleschat import SparklesChatConfig, build_instruction_embeddings, build_towers
from ..models.tokenizer import load_tokenizer
from ..tasks.image_text_pretrain import check_datasets_feed
from .tags import TagVocabulary

log = logging.getLogger(__name__)

TOWERS_FILE = "blip2_towers.pth"
QUERY_TOKEN_STD = 1.0  # distinct query tokens; the message's word and position tables get the same spread
POS_EMBED_STD = 0.5    # timm's 0.02 leaves a patch's place illegible after the blocks


@TOWERS_INITS.register("tinyworld")
def init_towers(visual_encoder: nn.Module, qformer: nn.Module, query_tokens: nn.Parameter) -> None:
    """The world's from-scratch recipe: Xavier cross-attention, query tokens N(0, 1), ViT positions N(0, 0.5)."""
    with torch.no_grad():
        for name, param in qformer.named_parameters():
            if ".crossattention." in name and param.dim() == 2:
                nn.init.xavier_uniform_(param)
    nn.init.normal_(query_tokens, std=QUERY_TOKEN_STD)
    with torch.no_grad():
        nn.init.normal_(visual_encoder.vit.pos_embed, std=POS_EMBED_STD)


class TowerTagger(nn.Module):
    """ViT → ln_vision → Q-Former reading the message (SparklesChat's names) → read-outs that make each query
    token legible.

    The query tokens form three groups, each with heads shared by its queries, so that every token of a group
    speaks the same code (which the decoder later reads through one projection):

    - one query per *qual* of the world (each colour × shape, each colour, each shape, all objects): how many
      the image holds and, when it holds exactly one, that object's cell and size;
    - one query per grid cell: which kind of object is there (or none) and its size;
    - the *item queries* (:mod:`.instruction_tags`): the count and the single object's cell of the message's
      *i*-th item, and — from the text alone — the colour and shape it names.

    A head shared by the queries of a group can only be satisfied by each query's own token, so the count of
    "red circles" is readable from one token and a cell's content from another, instead of being spread over
    the concatenation of all queries (which the decoder's attention cannot read).
    """

    ITEM_TARGETS = ("item_count", "item_place", "item_colour", "item_shape")

    def __init__(self, cfg, vocabulary: TagVocabulary, tokenizer) -> None:
        super().__init__()
        slots = vocabulary.num_query_slots
        self.num_items = cfg.num_query_token - slots
        if not cfg.qformer_text_input or self.num_items < 1 or tokenizer is None:
            raise ValueError(f"tower_pretrain trains towers that read the message: it needs "
                             f"model.qformer_text_input, a tokenizer and item queries after the {slots} slots "
                             f"(model.num_query_token > {slots}; got {cfg.num_query_token})")
        self.cfg, self.vocabulary = cfg, vocabulary
        self.visual_encoder, self.ln_vision, self.Qformer, self.query_tokens = build_towers(cfg)
        self.qformer_text = build_instruction_embeddings(cfg, len(tokenizer), init_std=QUERY_TOKEN_STD)
        hidden, sizes = cfg.qformer_hidden, len(vocabulary.sizes)
        self.count_head = nn.Linear(hidden, vocabulary.max_count_class)
        self.place_head = nn.Linear(hidden, vocabulary.num_cells + 1)  # the single object's cell, or "not one"
        self.qual_size_head = nn.Linear(hidden, sizes)
        self.cell_kind_head = nn.Linear(hidden, vocabulary.num_kinds)
        self.cell_size_head = nn.Linear(hidden, sizes)
        self.item_count_head = nn.Linear(hidden, vocabulary.max_count_class)
        self.item_place_head = nn.Linear(hidden, vocabulary.num_cells + 1)
        # what the item names, read from the text alone (one class past the last for "any")
        self.item_colour_head = nn.Linear(hidden, len(vocabulary.colours) + 1)
        self.item_shape_head = nn.Linear(hidden, len(vocabulary.shapes) + 1)
        self.register_buffer("qual_matrix", vocabulary.qual_matrix(), persistent=False)
        self.tokenizer = tokenizer  # the chat model's, which it will read the messages with

    @property
    def device(self) -> torch.device:
        return self.count_head.weight.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def forward(self, images: torch.Tensor, messages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pixels ``[N, 3, H, W]`` and one user message per image, as written (the Q-Former reads it without its
        image markup, as the chat model's renderer hands it over) → the logits of every head,
        ``[N, queries of the head's group, classes]``."""
        if messages is None or len(messages) != images.shape[0]:
            raise ValueError("towers that read the message need one message per image: train them on "
                             "synthetic_instruction_tags (train_configs/sparkleschat_tiny_towers.yaml)")
        vision = self.ln_vision(self.visual_encoder(images))
        ids, mask = tokenize_instructions(self.tokenizer, [strip_slots(m) for m in messages],
                                          self.cfg.qformer_max_text, images.device)
        queries = run_qformer(self.Qformer, self.query_tokens, vision, self.qformer_text(ids), mask)
        n_quals, n_slots = len(self.vocabulary.quals), self.vocabulary.num_query_slots
        quals, cells, items = queries[:, :n_quals], queries[:, n_quals:n_slots], queries[:, n_slots:]
        return {"count": self.count_head(quals), "place": self.place_head(quals),
                "qual_size": self.qual_size_head(quals),
                "cell_kind": self.cell_kind_head(cells), "cell_size": self.cell_size_head(cells),
                "item_count": self.item_count_head(items), "item_place": self.item_place_head(items),
                "item_colour": self.item_colour_head(items), "item_shape": self.item_shape_head(items)}

    def targets(self, cell_kinds: torch.Tensor, cell_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The slot heads' classes from the cell labels (``IGNORE_INDEX`` where a head has nothing to say)."""
        v = self.vocabulary
        counted = self.qual_matrix[cell_kinds]                  # [N, cells, quals]: does the cell count?
        counts = counted.sum(1).long()                          # [N, quals]
        single = counts == 1
        first_cell = counted.argmax(1)                          # the counted cell, when there is only one
        place = torch.where(single, first_cell, torch.full_like(counts, v.num_cells))
        size = torch.where(single, cell_sizes.gather(1, first_cell), torch.full_like(counts, IGNORE_INDEX))
        return {"count": counts.clamp(max=v.max_count_class - 1), "place": place, "qual_size": size,
                "cell_kind": cell_kinds, "cell_size": cell_sizes}

    def loss(self, logits: dict[str, torch.Tensor], cell_kinds: torch.Tensor, cell_sizes: torch.Tensor,
             items: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of every head's cross-entropy; ``logits`` is what :meth:`forward` returned and ``items`` the item
        targets (:func:`~.instruction_tags.item_targets`: ``[N, items]`` each), which count where they are set."""
        if items is None or any(k not in items for k in self.ITEM_TARGETS):
            raise ValueError(f"towers with item queries need the item targets {', '.join(self.ITEM_TARGETS)}")
        targets = {**self.targets(cell_kinds, cell_sizes), **{k: items[k] for k in self.ITEM_TARGETS}}
        # a head without targets in this batch still joins the graph (at weight zero): DistributedDataParallel
        # expects a gradient for every parameter on every rank
        return sum(F.cross_entropy(logits[k].flatten(0, 1).float(), targets[k].flatten(), ignore_index=IGNORE_INDEX)
                   if (targets[k] != IGNORE_INDEX).any() else 0.0 * logits[k].sum() for k in logits)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, cell_kinds: torch.Tensor, cell_sizes: torch.Tensor,
                 messages: Sequence[str]) -> dict[str, float]:
        """Counts right (per qual, and images with every count right), single objects' cells, occupied cells."""
        logits, targets = self(images, messages), self.targets(cell_kinds, cell_sizes)
        count_ok = logits["count"].argmax(-1) == targets["count"]
        single = targets["place"] < self.vocabulary.num_cells
        place_ok = logits["place"].argmax(-1) == targets["place"]
        occupied = cell_kinds > 0
        return {"count": count_ok.float().mean().item(), "image_counts_exact": count_ok.all(1).float().mean().item(),
                "single_place": place_ok[single].float().mean().item(),
                "occupied_cell_kind": (logits["cell_kind"].argmax(-1) == cell_kinds)[occupied].float().mean().item()}


@TASKS.register("tower_pretrain")
class TowerPretrainTask:
    """Build the tagger and the world's tag datasets; one step = every head's cross-entropy."""

    name = "tower_pretrain"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        check_datasets_feed(cfg, self.name)

    def build_model(self, *, root: Path, device: torch.device) -> TowerTagger:
        mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparklesChatConfig), self.cfg.model))
        # the chat model's tokenizer, which it will read the messages with
        tokenizer = load_tokenizer(resolve_path(mcfg.tokenizer_path or mcfg.llama_model, root,
                                                what="model.tokenizer_path / model.llama_model"))
        return TowerTagger(mcfg, TagVocabulary.of_world(), tokenizer).to(device)

    def build_datasets(self, *, root: Path, tokenizer=None) -> dict:
        return builders.build_datasets(self.cfg, root=root, tokenizer=tokenizer, split="train")

    def train_step(self, model, batch: dict, *, device: torch.device) -> dict:
        # through the DDP wrapper, so that gradients are reduced
        logits = model(batch["images"].to(device), batch["messages"])
        core = model.module if hasattr(model, "module") else model
        items = {k: batch[k].to(device) for k in TowerTagger.ITEM_TARGETS}
        return {"loss": core.loss(logits, batch["cell_kinds"].to(device), batch["cell_sizes"].to(device), items)}

    def after_training(self, model: TowerTagger, output_dir: Path) -> dict:
        """Write the towers (without the read-out) as a BLIP-2 stage-1 file for ``model.q_former_model``."""
        core = model.module if hasattr(model, "module") else model
        path = save_blip2(core, Path(output_dir) / TOWERS_FILE)
        log.info("towers written to %s (load them with model.q_former_model)", path)
        return {"towers": str(path)}

