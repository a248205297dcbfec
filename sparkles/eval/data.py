"""Evaluation sets on disk: annotation files and image paths under a Sparkles root (the original's layout).

Paths written into result files are relative to the Sparkles root (POSIX separators), so result files never
carry a machine's absolute paths; :meth:`EvalSet.abspath` turns them back into files. What a record means is
each benchmark's business (:mod:`sparkles.eval.benchmarks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..common.io import read_json
from ..common.paths import EVAL_DATASETS, MissingPathError, SparklesLayout, image_by_id
from .store import eid_key



class AnnotationError(ValueError):
    """A malformed annotation record; the message names the file, the record and the field."""


class EvalSet:
    """One evaluation dataset under a root: its annotations and how to turn them into questions."""

    def __init__(self, root: str | Path, dataset: str) -> None:
        if dataset not in EVAL_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(EVAL_DATASETS)}")
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

    def where(self, index: int) -> str:
        """``<annotation file>: record <index> (evaluation_id <id>)``, for error messages."""
        return f"{self.annotation_path}: record {index} (evaluation_id {self.items[index].get('evaluation_id')!r})"

    def field(self, index: int, name: str, kind: Optional[type] = str) -> Any:
        """Field ``name`` of record ``index``; missing (or not a ``kind``) is an :class:`AnnotationError`."""
        value = self.items[index].get(name)
        if value is None or (kind is not None and not isinstance(value, kind)):
            wanted = f" or not a {kind.__name__}" if kind is not None else ""
            raise AnnotationError(f"{self.where(index)}: field '{name}' is missing{wanted}")
        return value

    # ------------------------------------------------------------------ SparklesEval
    def image_file(self, image_id: Any) -> Path:
        """``images/<image_id>.jpg`` as upstream; other common extensions are accepted too."""
        return image_by_id(self.image_dir, image_id)

    def image_url(self, image_id: Any, relative_dir: str = "../images") -> str:
        return f"{relative_dir}/{self.image_file(image_id).name}"
