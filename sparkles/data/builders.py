"""Registered dataset builders (names as in the upstream train config) and the train-time dataset factory.

Importing this module registers, in ``sparkles.common.registry.DATASETS``:

- ``SparklesDialogue{CC,VG}_turn{1,2}_{n}img`` — the ten SparklesDialogue training splits; by default under
  ``data/SparklesDialogue{CC,VG}/`` of the Sparkles root (``annotations/<name>.json`` + ``images/``);
- ``cc_sbu_align`` — the single-image caption data (``data/cc_sbu_align/filter_cap.json`` + ``image/``);
- ``LLaVA_description`` / ``LLaVA_reasoning`` — the re-formatted LLaVA files (``data/LLaVA/``).

Each builder has a ``config_class`` (the :class:`~sparkles.data.base.DatasetConfig` schema with that
dataset's default location); a train config only needs to name the dataset and its ``sample_ratio``. Other
modules register further datasets with :func:`register_dataset` (a config lists them in ``run.imports``); a
builder whose samples are not dialogue records names the task that trains on them (``task``) and builds its
dataset itself (``build_training_dataset``).
"""

from __future__ import annotations

import logging
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from ..common.registry import DATASETS
from ..conversation.render import Renderer
from ..conversation.template import DEFAULT_SYSTEM_TEXT, END_SYM, TRAIN_LAYOUT
from ..models.sparkleschat import image_tokens_per_image
from .base import DataError, DatasetConfig, RecordDataset, RecordSet, SampleEncoder, build_text_processor
from .base import build_vis_transform, resolve_under
from .caption import load_caption_records, load_prompts
from .dialogue import load_dialogue_records
from .llava import LLAVA_FILES, LLAVA_IMAGES, LLAVA_ROOT, load_llava_records
from .shards import ShardDataset, read_manifest

log = logging.getLogger(__name__)

DIALOGUE_SPLITS = (
    ("CC", 1, 1), ("CC", 1, 2), ("CC", 1, 3), ("CC", 2, 2), ("CC", 2, 3), ("CC", 2, 4),
    ("VG", 1, 2), ("VG", 1, 3), ("VG", 2, 3), ("VG", 2, 4),
)
DIALOGUE_NAMES = tuple(f"SparklesDialogue{s}_turn{t}_{n}img" for s, t, n in DIALOGUE_SPLITS)


def _config_class(name: str, **defaults: Any) -> type:
    """A subclass of the dataset schema whose path fields default to ``name``'s upstream location."""
    extra = defaults.pop("_extra", [])
    fields = [(k, type(v), field(default=v)) for k, v in defaults.items()] + extra
    return make_dataclass(f"{name}Config", fields, bases=(DatasetConfig,))


class DatasetBuilder:
    """Turns a ``datasets.<name>`` config into records (no tokenizer) or a training dataset."""

    config_class: type = DatasetConfig
    kind = "dialogue"
    task = "image_text_pretrain"  # the run.task that trains on this dataset's samples

    @classmethod
    def read_records(cls, name: str, anno_file: Path, image_dir: Path, cfg, *, skip_bad: bool) -> RecordSet:
        return load_dialogue_records(name, anno_file, image_dir, skip_bad=skip_bad)

    @classmethod
    def prompts(cls, cfg, root: Path) -> Optional[list[str]]:
        return None


class DialogueBuilder(DatasetBuilder):
    pass


class LLaVABuilder(DatasetBuilder):
    @classmethod
    def read_records(cls, name, anno_file, image_dir, cfg, *, skip_bad):
        return load_llava_records(name, anno_file, image_dir, skip_bad=skip_bad)


class CaptionBuilder(DatasetBuilder):
    kind = "caption"

    @classmethod
    def read_records(cls, name, anno_file, image_dir, cfg, *, skip_bad):
        return load_caption_records(name, anno_file, image_dir, skip_bad=skip_bad)

    @classmethod
    def prompts(cls, cfg, root: Path) -> Optional[list[str]]:
        path = cfg.get("prompt_path")
        return load_prompts(resolve_under(root, path) if path else None)


def register_dataset(name: str, base: type = DialogueBuilder, **defaults: Any) -> type:
    """Register ``name`` as a dataset built by ``base``; ``defaults`` are its schema's defaults (``root_dir``,
    ``anno_path``, ``img_root``, ...; ``_extra`` adds fields: ``[(name, type, dataclasses.field(...))]``)."""
    builder = type(f"{name}Builder", (base,), {"config_class": _config_class(name, **defaults)})
    return DATASETS.register(name)(builder)


for _s, _t, _n in DIALOGUE_SPLITS:
    _name = f"SparklesDialogue{_s}_turn{_t}_{_n}img"
    register_dataset(_name, DialogueBuilder, root_dir=f"data/SparklesDialogue{_s}",
                     anno_path=f"annotations/{_name}.json")
for _name, _file in LLAVA_FILES.items():
    register_dataset(_name, LLaVABuilder, root_dir=LLAVA_ROOT, anno_path=_file, img_root=LLAVA_IMAGES)
# prompt_path: alignment prompts (one per line, relative to the Sparkles root); None = the package's own.
register_dataset("cc_sbu_align", CaptionBuilder, root_dir="data/cc_sbu_align", anno_path="filter_cap.json",
                 img_root="image", _extra=[("prompt_path", Optional[str], field(default=None))])


# --------------------------------------------------------------------------------------------- factories
def image_key_prefix(cfg) -> str:
    return f"{cfg.root_dir}/{cfg.img_root}"


def load_records(name: str, cfg, *, root: Path, skip_bad: bool = False) -> RecordSet:
    """Validated records of one configured dataset (what the webdataset converter writes)."""
    builder = DATASETS.get(name)
    base = resolve_under(root, cfg.root_dir)
    anno_file = resolve_under(base, cfg.anno_path)
    image_dir = resolve_under(base, cfg.img_root)
    if not image_dir.is_dir():
        raise DataError(f"datasets.{name}: image folder not found: {image_dir}")
    records = builder.read_records(name, anno_file, image_dir, cfg, skip_bad=skip_bad)
    if not records.records:
        raise DataError(f"datasets.{name}: {anno_file} holds no usable records")
    return records


def training_layout(model_cfg):
    if model_cfg.get("train_with_system", False):
        system = model_cfg.get("system_text")
        return TRAIN_LAYOUT.with_system(system if system is not None else DEFAULT_SYSTEM_TEXT)
    return TRAIN_LAYOUT


def build_dataset(name: str, cfg, *, root: Path, tokenizer, model_cfg, run_cfg, split: str = "train"):
    """A training dataset for ``datasets.<name>``: a :class:`RecordDataset` over the JSON file, or a
    :class:`~sparkles.data.shards.ShardDataset` when ``shards`` is set."""
    builder = DATASETS.get(name)
    custom = getattr(builder, "build_training_dataset", None)
    if custom is not None:
        return custom(name, cfg, root=root, model_cfg=model_cfg, run_cfg=run_cfg, split=split)
    skip_bad = bool(run_cfg.skip_bad_records)
    max_length = cfg.max_length if cfg.max_length is not None else run_cfg.max_length
    encoder = SampleEncoder(
        renderer=Renderer(tokenizer, image_tokens_per_image(model_cfg), end_sym=END_SYM),
        layout=training_layout(model_cfg),
        image_transform=build_vis_transform(cfg.vis_processor[split], model_cfg.image_size),
        max_length=int(max_length),
        image_key_prefix=image_key_prefix(cfg),
        prompts=builder.prompts(cfg, root),
        text_processor=build_text_processor(cfg.text_processor[split]),
    )
    if cfg.shards:
        manifest = read_manifest(resolve_under(root, cfg.shards), expect_dataset=name)
        if manifest.get("kind") not in (None, builder.kind):
            raise DataError(f"datasets.{name}.shards: holds {manifest['kind']} records, expected {builder.kind}")
        return ShardDataset(name, manifest, encoder, skip_bad=skip_bad, sample_ratio=float(cfg.sample_ratio),
                            shuffle_buffer=cfg.shuffle_buffer)
    records = load_records(name, cfg, root=root, skip_bad=skip_bad)
    return RecordDataset(records, encoder, skip_bad=skip_bad, sample_ratio=float(cfg.sample_ratio))


def build_datasets(cfg, *, root: Path, tokenizer, split: str = "train") -> dict:
    """Every dataset of a loaded config with ``sample_ratio > 0``, by name (config order)."""
    out = {}
    for name, dcfg in cfg.datasets.items():
        if float(dcfg.sample_ratio) <= 0:
            log.info("datasets.%s: sample_ratio 0, not used", name)
            continue
        out[name] = build_dataset(name, dcfg, root=root, tokenizer=tokenizer, model_cfg=cfg.model, run_cfg=cfg.run,
                                  split=split)
        n_skip = len(out[name].skipped)
        log.info("datasets.%s: %d samples%s (ratio %g)", name, len(out[name]),
                 f", {n_skip} bad record(s) skipped" if n_skip else "", dcfg.sample_ratio)
    if not out:
        raise DataError("no training dataset: every datasets.*.sample_ratio is 0 (or no datasets configured)")
    return out
