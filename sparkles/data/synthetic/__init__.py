"""The procedural multi-image world: the CPU stand-in for real images, SparklesDialogue and the benchmarks.

Scenes of 1–4 coloured shapes are rendered with Pillow and described in a small templated language; from them
the generator writes training dialogues (SparklesDialogueCC/VG, with turn-split files), SparklesEval, BISON and
NLVR2 in the exact upstream formats and directory layout, so that every part of the system runs unchanged on
them. Modules: ``scenes`` (vocabulary, sampling), ``render`` (images), ``language`` (phrases and parsers),
``tasks`` (questions and reference answers), ``build`` (the datasets), ``writers`` (files, ``load_scenes``,
``iter_world_texts``), ``judge`` (the reference SparklesEval judge), ``cli`` (``main``).
"""

from __future__ import annotations

from .build import DEFAULT_MIX, PRESETS, World, WorldConfig, build_world
from .cli import main
from .judge import judge_reference
from .writers import iter_world_texts, load_scenes, write_world

__all__ = ["DEFAULT_MIX", "PRESETS", "World", "WorldConfig", "build_world", "write_world", "load_scenes",
           "iter_world_texts", "judge_reference", "main"]
