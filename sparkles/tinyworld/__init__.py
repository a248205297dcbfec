"""The CPU world: a procedural multi-image world and the tiny SparklesChat trained on it.

No real weights or images can be downloaded on a laptop CPU, so this room stands in for them: scenes of 1–4
coloured shapes rendered with Pillow and described in a small templated language, written as SparklesDialogue,
SparklesEval, BISON and NLVR2 in the exact upstream formats and layout, so that every other part of the project
runs on them unchanged; and what the tiny model needs to learn from it on a CPU. ``bash run.sh`` uses all of it;
``python -m sparkles.tinyworld --out ROOT --seed S`` writes a world (docs/tinyworld.md).

Importing this package registers, for configs that name it in ``run.imports``: the model preset
``model_type: tiny`` (``configs/sparkleschat_tiny.yaml``), the towers' initialisation ``towers_init: tinyworld``
and the ``tower_pretrain`` task (:mod:`.towers`), the world's datasets (:mod:`.datasets`) and the SparklesEval
judge ``reference`` (:mod:`.judge`).

Modules: ``scenes`` (vocabulary, sampling), ``render`` (images), ``language`` (phrases and parsers), ``tasks``
(questions and reference answers), ``build`` (the datasets in memory), ``writers`` (files, ``load_scenes``,
``iter_world_texts``), ``cli`` (``main``); ``tags`` and ``instruction_tags`` (the towers' targets), ``towers``,
``datasets``, ``judge``; ``report`` and ``towers_report`` (where a trained model's answers and towers go wrong).
"""

from __future__ import annotations

from pathlib import Path

from ..common.registry import MODEL_PRESETS
from . import datasets, towers  # noqa: F401  (register the datasets, the task and the towers' initialisation)
from .build import DEFAULT_MIX, PRESETS, World, WorldConfig, build_world
from .cli import main
from .judge import ReferenceJudge, judge_reference
from .writers import iter_world_texts, load_scenes, write_world

MODEL_PRESETS.register("sparkleschat/tiny")(Path(__file__).resolve().parent / "configs" / "sparkleschat_tiny.yaml")

__all__ = ["DEFAULT_MIX", "PRESETS", "World", "WorldConfig", "build_world", "write_world", "load_scenes",
           "iter_world_texts", "judge_reference", "ReferenceJudge", "main"]
