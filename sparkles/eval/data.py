"""Evaluation sets on disk: annotation files, image paths and ground-truth labels (UPSTREAM_FACTS §11–12).

Paths written into result files are relative to the Sparkles root (POSIX separators), so result files never
carry a machine's absolute paths; :meth:`EvalSet.abspath` turns them back into files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..common.paths import MissingPathError, SparklesLayout
from .prompts import BISON_OPTIONS, NLVR2_OPTIONS, bison_prompt, nlvr2_prompt
from .store import eid_key, read_json

DATASETS = ("BISON", "NLVR2", "SparklesEval")
CHOICE_DATASETS = ("BISON", "NLVR2")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class AnnotationError(ValueError):
    """A malformed annotation record; the message names the file, the record and the field."""


@dataclass
class ChoiceQuestion:
    """One BISON / NLVR2 question, ready for the model."""

    evaluation_id: Any
    prompt: str
    img_paths: list[str]  # relative to the root
    label: str
    sentence: str
    options: tuple[str, str]


class EvalSet:
    """One evaluation dataset under a root: its annotations and how to turn them into questions."""

    def __init__(self, root: str | Path, dataset: str) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        self.root = Path(root)
        self.dataset = dataset
        self.layout = SparklesLayout(self.root)
        self.annotation_path = self.layout.eval_annotations(dataset)
        self.image_dir = self.layout.eval_images(dataset)
        self.results_dir = self.layout.eval_results(dataset)
        self._items: Optional[list[dict]] = None

    # ------------------------------------------------------------------ annotations
    @property
    def items(self) -> list[dict]:
        if self._items is None:
            self._items = self._load()
        return self._items

    def _load(self) -> list[dict]:
        path = self.annotation_path
        if not path.is_file():
            raise MissingPathError(f"{self.dataset} annotation file not found: {path} (expected the upstream "
                                   f"layout <root>/evaluation/{self.dataset}/annotations/)")
        data = read_json(path, what=f"{self.dataset} annotation file")
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: the top level must be a list of records")
        seen: dict[Any, int] = {}
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "evaluation_id" not in item:
                raise AnnotationError(f"{path}: record {i} has no 'evaluation_id'")
            key = eid_key(item["evaluation_id"])
            if key in seen:
                raise AnnotationError(f"{path}: records {seen[key]} and {i} share evaluation_id "
                                      f"{item['evaluation_id']!r}")
            seen[key] = i
        return data

    def relpath(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def abspath(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def _where(self, index: int, item: Mapping[str, Any]) -> str:
        return f"{self.annotation_path}: record {index} (evaluation_id {item.get('evaluation_id')!r})"

    def _field(self, index: int, item: Mapping[str, Any], name: str, kind=str) -> Any:
        value = item.get(name)
        if value is None or (kind is not None and not isinstance(value, kind)):
            raise AnnotationError(f"{self._where(index, item)}: field '{name}' is missing or not a {kind.__name__}")
        return value

    # ------------------------------------------------------------------ BISON / NLVR2
    def choice_question(self, index: int) -> ChoiceQuestion:
        item = self.items[index]
        if self.dataset == "BISON":
            caption = self._field(index, item, "caption")
            cands = item.get("image_candidates")
            if not isinstance(cands, list) or len(cands) != 2 or not all(
                    isinstance(c, Mapping) and "image_id" in c and "image_filename" in c for c in cands):
                raise AnnotationError(f"{self._where(index, item)}: field 'image_candidates' must list two "
                                      "{image_id, image_filename}")
            if "true_image_id" not in item:
                raise AnnotationError(f"{self._where(index, item)}: field 'true_image_id' is missing")
            truth = str(item["true_image_id"])
            if truth not in (str(cands[0]["image_id"]), str(cands[1]["image_id"])):
                raise AnnotationError(f"{self._where(index, item)}: true_image_id {truth} is not a candidate")
            label = BISON_OPTIONS[0] if truth == str(cands[0]["image_id"]) else BISON_OPTIONS[1]
            paths = [self.image_dir / str(c["image_filename"]) for c in cands]
            return ChoiceQuestion(item["evaluation_id"], bison_prompt(caption), [self.relpath(p) for p in paths],
                                  label, caption, BISON_OPTIONS)
        if self.dataset == "NLVR2":
            sentence = self._field(index, item, "sentence")
            identifier = self._field(index, item, "identifier")
            label = str(self._field(index, item, "label", kind=None))
            if label.lower() not in ("true", "false"):
                raise AnnotationError(f"{self._where(index, item)}: field 'label' must be True or False, "
                                      f"got {label!r}")
            stem = identifier[:-2]  # "dev-850-0-1" → pair "dev-850-0" (the last 2 chars number the sentence)
            paths = [self.image_dir / f"{stem}-img0.png", self.image_dir / f"{stem}-img1.png"]
            return ChoiceQuestion(item["evaluation_id"], nlvr2_prompt(sentence), [self.relpath(p) for p in paths],
                                  label, sentence, NLVR2_OPTIONS)
        raise ValueError(f"{self.dataset} is not a choice dataset")

    # ------------------------------------------------------------------ SparklesEval
    def image_file(self, image_id: Any) -> Path:
        """``images/<image_id>.jpg`` as upstream; other common extensions are accepted too."""
        for ext in IMAGE_EXTENSIONS:
            path = self.image_dir / f"{image_id}{ext}"
            if path.is_file():
                return path
        return self.image_dir / f"{image_id}.jpg"  # absent: the loader's error names this file

    def image_url(self, image_id: Any, relative_dir: str = "../images") -> str:
        return f"{relative_dir}/{self.image_file(image_id).name}"
