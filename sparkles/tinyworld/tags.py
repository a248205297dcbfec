"""What the world's images hold, as class labels for the towers' read-out heads (:mod:`.towers`).

The paper's vision towers arrive pretrained (EVA-CLIP, BLIP-2). The CPU world has no such weights, and towers
trained from scratch through the decoder's next-token loss learn to see far too slowly for a laptop (the decoder
learns the text prior first and the image gradient stays tiny). The world therefore pretrains its towers on direct
targets read from its scene records (``world/scenes.json``): for every cell of the 3×3 grid, which object kind
is there (or none) and its size, and for every thing the world counts, how many the image holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.tensors import IGNORE_INDEX as IGNORE
from ..data.base import DataError
from .scenes import ALL_COLOURS, ALL_SHAPES, GRID, MAX_OBJECTS, SIZES

@dataclass(frozen=True)
class TagVocabulary:
    """Cell classes (``empty`` + every colour × shape) and object sizes, in a fixed order."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...]
    grid: int

    @classmethod
    def of_world(cls) -> "TagVocabulary":
        return cls(tuple(ALL_COLOURS), tuple(ALL_SHAPES), tuple(SIZES), GRID)

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid

    @property
    def max_count_class(self) -> int:
        """Count classes of one object kind: 0 .. the world's most objects in a scene."""
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
