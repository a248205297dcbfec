"""Scene tags of the synthetic world: what is in each grid cell of a training image, as class labels.

The paper's vision towers arrive pretrained (EVA-CLIP, BLIP-2). The CPU world has no such weights, and a tower
trained from scratch through the decoder's next-token loss learns to see far too slowly for a laptop (the decoder
learns the text prior first and the image gradient stays tiny). The tiny world therefore pretrains its towers on a
direct signal: for every cell of the 3×3 grid, which object kind is there (or none) and its size, read from the
scene records that ``python -m sparkles.data.synthetic`` writes (``world/scenes.json``). Only the training images
(the SparklesDialogue CC/VG images) are used; evaluation scenes never are.

Registered as the dataset ``synthetic_scene_tags``; ``sparkles.tasks.tower_pretrain`` trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .base import BadRecord, DataError, Record, RecordDataset, RecordSet, read_json

IGNORE = -100


@dataclass(frozen=True)
class TagVocabulary:
    """Cell classes (``empty`` + every colour × shape) and object sizes, in a fixed order."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...]
    grid: int

    @classmethod
    def of_world(cls) -> "TagVocabulary":
        from .synthetic.scenes import ALL_COLOURS, ALL_SHAPES, GRID, SIZES

        return cls(tuple(ALL_COLOURS), tuple(ALL_SHAPES), tuple(SIZES), GRID)

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid

    @property
    def max_count_class(self) -> int:
        """Count classes of one object kind: 0 .. the world's most objects in a scene."""
        from .synthetic.scenes import MAX_OBJECTS

        return MAX_OBJECTS + 1

    @property
    def num_object_kinds(self) -> int:
        return len(self.colours) * len(self.shapes)

    @property
    def num_kinds(self) -> int:
        return 1 + len(self.colours) * len(self.shapes)  # class 0 = empty cell

    @property
    def quals(self) -> tuple[tuple[str | None, str | None], ...]:
        """What the world's questions count: every colour × shape, every colour, every shape, all objects."""
        return (tuple((c, s) for c in self.colours for s in self.shapes) + tuple((c, None) for c in self.colours)
                + tuple((None, s) for s in self.shapes) + ((None, None),))

    @property
    def num_query_slots(self) -> int:
        """Query tokens of legible towers: one per countable thing (``quals``), then one per grid cell."""
        return len(self.quals) + self.num_cells

    def qual_matrix(self) -> torch.Tensor:
        """``[num_kinds, quals]`` 0/1: which cell classes (0 = empty) each qual counts."""
        m = torch.zeros(self.num_kinds, len(self.quals))
        for q, (colour, shape) in enumerate(self.quals):
            for c in self.colours:
                for s in self.shapes:
                    if colour in (None, c) and shape in (None, s):
                        m[self.kind_index(c, s), q] = 1.0
        return m

    def kind_index(self, colour: str, shape: str) -> int:
        return 1 + self.colours.index(colour) * len(self.shapes) + self.shapes.index(shape)

    def labels(self, record: dict, where: str) -> tuple[list[int], list[int]]:
        """Per-cell kind classes and size classes (``IGNORE`` for empty cells) of one scene record."""
        kinds = [0] * self.num_cells
        sizes = [IGNORE] * self.num_cells
        try:
            for obj in record["objects"]:
                cell = int(obj["row"]) * self.grid + int(obj["col"])
                if not 0 <= cell < self.num_cells or kinds[cell]:
                    raise DataError(f"{where}: object outside the grid or sharing a cell: {obj}")
                kinds[cell] = self.kind_index(obj["colour"], obj["shape"])
                sizes[cell] = self.sizes.index(obj["size"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{where}: malformed scene record ({type(exc).__name__}: {exc})") from None
        return kinds, sizes


class SceneTagDataset(RecordDataset):
    """Training images of the world with their cell labels; items are ``(position, seed)`` like every dataset."""

    def __init__(self, records: RecordSet, files: Sequence[Path], labels: Sequence[tuple[list[int], list[int]]],
                 image_transform, *, skip_bad: bool = False, sample_ratio: float = 1.0) -> None:
        super().__init__(records, encoder=None, skip_bad=skip_bad, sample_ratio=sample_ratio)
        self.files, self.labels, self.image_transform = list(files), list(labels), image_transform

    def get(self, position: int, sample_seed: int):
        from ..processors.image import load_rgb

        record = self.records.records[position]
        try:
            image = load_rgb(self.files[position])
        except Exception as exc:
            raise DataError(f"{self.records.anno_file}: {record.id}: image {self.files[position]}: {exc}") from None
        with torch.random.fork_rng(devices=[]):  # augmentation depends on the sample only (as in SampleEncoder)
            torch.manual_seed(sample_seed)
            pixels = self.image_transform(image)
        kinds, sizes = self.labels[position]
        return record.id, pixels, kinds, sizes

    def collate(self, items):
        good = [it for it in items if not isinstance(it, BadRecord)]
        batch = {"ids": [it[0] for it in good], "bad": [(b.id, b.reason) for b in items if isinstance(b, BadRecord)],
                 "num_samples": len(good)}
        if good:
            batch["images"] = torch.stack([it[1] for it in good])
            batch["cell_kinds"] = torch.tensor([it[2] for it in good], dtype=torch.long)
            batch["cell_sizes"] = torch.tensor([it[3] for it in good], dtype=torch.long)
        return batch


def load_scene_tags(name: str, scenes_file: Path, root: Path, *, splits: Sequence[str], image_transform,
                    skip_bad: bool = False, sample_ratio: float = 1.0,
                    vocabulary: TagVocabulary | None = None) -> SceneTagDataset:
    """The scene records of ``splits`` (world dataset names, e.g. CC and VG) as a :class:`SceneTagDataset`."""
    vocabulary = vocabulary or TagVocabulary.of_world()
    data = read_json(scenes_file)
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
        raise DataError(f"{scenes_file}: expected the world's scene file (an object with a 'scenes' list); "
                        "generate it with `python -m sparkles.data.synthetic --out ROOT`")
    wanted = set(splits)
    records, files, labels, skipped = [], [], [], []
    for i, rec in enumerate(data["scenes"]):
        if not isinstance(rec, dict) or rec.get("dataset") not in wanted:
            continue
        where = f"{scenes_file}: scenes[{i}]"
        try:
            if "file" not in rec or "image_id" not in rec:
                raise DataError(f"{where}: fields 'file' and 'image_id' are required")
            tags = vocabulary.labels(rec, where)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        records.append(Record(id=f"{name}/{rec['image_id']}", index=i, messages=[], target="",
                              image_ids=[str(rec["image_id"])], kind="scene_tags"))
        files.append(root / rec["file"])
        labels.append(tags)
    if not records:
        raise DataError(f"{scenes_file}: no scenes of the splits {sorted(wanted)}")
    record_set = RecordSet(name, scenes_file, root, records, skipped)
    return SceneTagDataset(record_set, files, labels, image_transform, skip_bad=skip_bad, sample_ratio=sample_ratio)
