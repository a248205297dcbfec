"""The single-image caption path (``cc_sbu_align``, MiniGPT-4 stage-2 style data).

``filter_cap.json`` holds ``{"annotations": [{"image_id", "caption"}, ...]}``; images are
``<root_dir>/<img_root>/<image_id>.jpg``. Each sample asks for a detailed description with one prompt drawn
(per sample, reproducibly) from an alignment-prompt file — one prompt per line, each containing exactly one
``<Img><ImageHere></Img>`` slot — and trains on the caption as the answer. Unlike upstream's separate
single-image forward, the sample goes through the same renderer and layout as the dialogues.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..conversation.template import count_slots
from .base import DataError, Record, RecordSet, collect_records, read_annotations

DEFAULT_PROMPTS = "prompts/alignment.txt"  # inside this package


def load_prompts(path: Optional[Path] = None) -> list[str]:
    """Non-empty lines of the prompt file (the package's own when ``path`` is None); one slot each."""
    if path is None:
        text = resources.files(__package__).joinpath(DEFAULT_PROMPTS).read_text(encoding="utf-8")
        where = f"sparkles/data/{DEFAULT_PROMPTS}"
    else:
        if not Path(path).is_file():
            raise DataError(f"alignment prompt file not found: {path}")
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{where}: no prompts")
    for i, p in enumerate(prompts):
        if count_slots(p) != 1:
            raise DataError(f"{where}: line {i + 1} must contain exactly one <Img><ImageHere></Img> slot")
    return prompts


def parse_caption_record(item: Any, index: int, where: str, *, name: str) -> Record:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(item).__name__}")
    if "image_id" not in item:
        raise DataError(f"{where}: field 'image_id' missing")
    caption = item.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: field 'caption' missing or empty")
    return Record(id=f"{name}/{index}", index=index, messages=[], target=caption,
                  image_ids=[str(item["image_id"])], kind="caption")


def load_caption_records(name: str, anno_file: Path, image_dir: Path, *, skip_bad: bool = False) -> RecordSet:
    data = read_annotations(anno_file)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{anno_file}: expected an object with an 'annotations' list")

    def parse(item, index, where):
        return parse_caption_record(item, index, where, name=name)

    return collect_records(name, anno_file, image_dir, data["annotations"], parse, skip_bad=skip_bad)
