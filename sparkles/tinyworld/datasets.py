"""The world's training datasets, registered by name (importing :mod:`sparkles.tinyworld` registers them).

- ``synthetic_perception`` — single-image count and place questions about the training images
  (``data/cc_sbu_align/perception.json``, dialogue split-file format, next to the world's caption set);
- ``synthetic_perception_where`` — their place questions alone (``data/cc_sbu_align/perception_where.json``);
- ``synthetic_reasoning`` — text-only BISON/NLVR2 drills (``data/reasoning/reasoning.json``, no images), the
  decoder's verdict warm-up;
- ``synthetic_caption_checks`` — single-image caption checks (``data/reasoning/caption_checks.json``; written
  when the world's ``--reasoning-mix`` gives them a share);
- ``synthetic_instruction_tags`` — the training images read with a user message, with the targets of the towers'
  read-out heads (:mod:`.instruction_tags`), for the ``tower_pretrain`` task (:mod:`.towers`).
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path

from ..data.base import DataError, build_vis_transform, resolve_under
from ..data.builders import DialogueBuilder, register_dataset
from .instruction_tags import load_instruction_tags
from .tags import TagVocabulary


class InstructionTagBuilder(DialogueBuilder):
    """The world's training images read with a message, for towers whose Q-Former reads the user message."""

    kind = "instruction_tags"
    task = "tower_pretrain"

    @classmethod
    def read_records(cls, name, anno_file, image_dir, cfg, *, skip_bad):
        raise DataError(f"datasets.{name}: tag samples are not text records; only the tower_pretrain task uses them")

    @classmethod
    def build_training_dataset(cls, name: str, cfg, *, root: Path, model_cfg, run_cfg, split: str):
        items = int(model_cfg.num_query_token) - TagVocabulary.of_world().num_query_slots
        return load_instruction_tags(name, resolve_under(root, cfg.root_dir), num_items=items,
                                     image_transform=build_vis_transform(cfg.vis_processor[split],
                                                                         model_cfg.image_size),
                                     caption_variants=float(cfg.caption_variants),
                                     nlvr2_statements=float(cfg.nlvr2_statements),
                                     skip_bad=bool(run_cfg.skip_bad_records), sample_ratio=float(cfg.sample_ratio),
                                     seed=int(run_cfg.seed))


register_dataset("synthetic_perception", root_dir="data/cc_sbu_align", anno_path="perception.json",
                 img_root="image")
# apart from the count questions, so that a mixture can weight the place read-out on its own
register_dataset("synthetic_perception_where", root_dir="data/cc_sbu_align", anno_path="perception_where.json",
                 img_root="image")
register_dataset("synthetic_reasoning", root_dir="data/reasoning", anno_path="reasoning.json", img_root=".")
register_dataset("synthetic_caption_checks", root_dir="data/reasoning", anno_path="caption_checks.json",
                 img_root=".")
# The whole world under the Sparkles root (world/scenes.json, the dialogues, the perception questions);
# caption_variants / nlvr2_statements: the shares of samples that are caption questions about any training image
# / the dialogues' NLVR2 statements read with any training image.
register_dataset("synthetic_instruction_tags", InstructionTagBuilder, root_dir=".", anno_path="world/scenes.json",
                 img_root=".", _extra=[("caption_variants", float, field(default=0.0)),
                                       ("nlvr2_statements", float, field(default=0.0))])
