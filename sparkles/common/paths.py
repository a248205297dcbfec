"""The on-disk layout under a Sparkles root (data, evaluation sets, results, statistics).

Every path the project reads or writes is resolved here against one root directory, given by
``--sparkles_root`` or the ``SPARKLES_ROOT`` environment variable. Nothing here is absolute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ENV_VAR = "SPARKLES_ROOT"
EVAL_DATASETS = ("SparklesEval", "BISON", "NLVR2")
DIALOGUE_SUBSETS = ("CC", "VG")


class MissingPathError(FileNotFoundError):
    """A required file or directory is absent; the message says which and how to provide it."""


def repository_root() -> Optional[Path]:
    """The checkout this package runs from (a source or editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "run.sh").is_file() else None


def project_path(path: str | os.PathLike) -> Path:
    """A relative path the project's own files name (a config file, a config's ``run.sparkles_root``): from the
    current folder when it exists there, else from the repository, where ``run.sh`` writes; so
    ``python ../Sparkles/demo.py`` finds the tiny model from any folder. Absolute paths are kept."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    repo = repository_root()
    return repo / p if repo is not None else p


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The Sparkles root: the explicit argument, else ``$SPARKLES_ROOT``, else an error."""
    value = root if root not in (None, "") else os.environ.get(ENV_VAR)
    if not value:
        raise MissingPathError(f"no Sparkles root given: pass --sparkles_root DIR or set {ENV_VAR}")
    return Path(value).expanduser()


def resolve_path(path: str | os.PathLike, root: str | os.PathLike | None = None, *, what: str = "file",
                 must_exist: bool = True) -> Path:
    """Resolve ``path`` against the root unless it is absolute; optionally require it to exist."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = resolve_root(root) / p
    if must_exist and not p.exists():
        raise MissingPathError(f"{what} not found: {p}")
    return p


# A generated synthetic world lists every file it wrote in its manifest and its settings in its report; the
# world's writer and the pages that say who wrote a file both read these names, so they live with the layout.
WORLD_MANIFEST = "world/manifest.json"
WORLD_MANIFEST_FORMAT = "sparkles-synthetic-world-files"
WORLD_REPORT = "world/generation_report.json"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # the image files an evaluation set may hold


def image_by_id(folder: Path, image_id: Any) -> Path:
    """``<folder>/<image_id>.jpg`` as upstream names images by id; other common extensions count too (the ``.jpg``
    path when none exists, so that the error names it)."""
    for ext in IMAGE_EXTENSIONS:
        path = folder / f"{image_id}{ext}"
        if path.is_file():
            return path
    return folder / f"{image_id}{IMAGE_EXTENSIONS[0]}"


def nlvr2_pair(folder: Path, identifier: str) -> list[Path]:
    """:meth:`SparklesLayout.nlvr2_pair` in ``folder``."""
    stem = identifier[:-2]
    return [folder / f"{stem}-img{k}.png" for k in (0, 1)]


@dataclass(frozen=True)
class SparklesLayout:
    """Named locations inside one Sparkles root (the upstream directory layout)."""

    root: Path

    @classmethod
    def from_root(cls, root: str | os.PathLike | None = None) -> "SparklesLayout":
        return cls(resolve_root(root))

    # --- SparklesDialogue ---------------------------------------------------------------
    def dialogue_dir(self, subset: str) -> Path:
        _check_subset(subset)
        return self.root / "data" / f"SparklesDialogue{subset}"

    def dialogue_file(self, subset: str) -> Path:
        return self.dialogue_dir(subset) / "annotations" / f"SparklesDialogue{subset}.json"

    def dialogue_split_file(self, subset: str, turn: int, num_images: int) -> Path:
        return self.dialogue_dir(subset) / "annotations" / f"SparklesDialogue{subset}_turn{turn}_{num_images}img.json"

    def dialogue_images(self, subset: str) -> Path:
        return self.dialogue_dir(subset) / "images"

    # --- evaluation ---------------------------------------------------------------------
    def eval_dir(self, dataset: str) -> Path:
        if dataset not in EVAL_DATASETS:
            raise ValueError(f"unknown evaluation dataset {dataset!r}; known: {', '.join(EVAL_DATASETS)}")
        return self.root / "evaluation" / dataset

    def eval_annotations(self, dataset: str) -> Path:
        return self.eval_dir(dataset) / "annotations" / f"sparkles_evaluation_{dataset.lower()}_annotations.json"

    def eval_images(self, dataset: str) -> Path:
        return self.eval_dir(dataset) / "images"

    def eval_results(self, dataset: str) -> Path:
        return self.eval_dir(dataset) / "results"

    def nlvr2_pair(self, identifier: str) -> list[Path]:
        """The left and right image of an NLVR2 statement: ``<identifier minus its last 2 characters>-img0.png``
        and ``-img1.png`` (the last two characters number the statement of a pair, e.g. "dev-850-0-1")."""
        return nlvr2_pair(self.eval_images("NLVR2"), identifier)

    # --- sources for generation and statistics ------------------------------------------
    @property
    def cc_sbu_align(self) -> Path:
        return self.root / "data" / "cc_sbu_align"

    @property
    def svit_descriptions(self) -> Path:
        return self.root / "data" / "SVIT" / "detail_description.json"

    @property
    def vg_image_data(self) -> Path:
        return self.root / "data" / "VisualGenome" / "image_data.json"

    @property
    def llava_dir(self) -> Path:
        return self.root / "data" / "LLaVA"

    @property
    def statistics_dir(self) -> Path:
        return self.root / "assets" / "statistics"


def _check_subset(subset: str) -> None:
    if subset not in DIALOGUE_SUBSETS:
        raise ValueError(f"unknown SparklesDialogue subset {subset!r}; known: {', '.join(DIALOGUE_SUBSETS)}")
