"""LLaVA / SVIT instruction data re-formatted for Sparkles (optional training sources).

The re-formatted files are JSON lists of ``{"question", "answer", "uniform_question", "tgt_imgs"}`` with one
image per record (``uniform_question`` carries ``IMAGE#<id><Img><ImageHere></Img>``) and no ``instruction``,
so each record is a single-turn sample built from the template around the question — the dialogue parser
handles them; this module only names the upstream files and image folder.
"""

from __future__ import annotations

from pathlib import Path

from .base import RecordSet
from .dialogue import load_dialogue_records

# Upstream file names; images are COCO train2017 files named by their zero-padded id.
LLAVA_FILES = {
    "LLaVA_description": "LLaVA_detail_23k_filtered_for_Sparkles.json",
    "LLaVA_reasoning": "LLaVA_complex_reasoning_77k_filtered_for_Sparkles.json",
}
LLAVA_ROOT = "data/LLaVA"
LLAVA_IMAGES = "coco/train2017"


def load_llava_records(name: str, anno_file: Path, image_dir: Path, *, skip_bad: bool = False) -> RecordSet:
    return load_dialogue_records(name, anno_file, image_dir, skip_bad=skip_bad)
