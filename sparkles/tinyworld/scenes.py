"""Scenes of the synthetic world: vocabulary, scene objects, random scene sampling and JSON scene records.

A scene is a light background with 1–4 flat shapes placed in distinct cells of a 3×3 grid. Everything the
language, the tasks, the renderer and the reference judge know about an image comes from its ``Scene``; the
JSON form of a scene (``Scene.to_record``) is what ``world/scenes.json`` stores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable

# Clearly distinct, saturated hues: they must stay separable after JPEG and a resize to 64×64.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 195, 0),
    "purple": (150, 60, 200),
}
ALL_COLOURS = tuple(COLOUR_RGB)
ALL_SHAPES = ("circle", "square", "triangle")
DEFAULT_COLOURS = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES = ALL_SHAPES
SIZES = ("small", "large")
GRID = 3
MAX_OBJECTS = 4

# Cell (row, col) -> position name; the phrase used in sentences is POSITION_PHRASES[name].
POSITION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
CELL_OF_POSITION = {name: cell for cell, name in POSITION_NAMES.items()}

# Light, weakly saturated backgrounds so that every object colour contrasts with every background.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 246),
    "light grey": (226, 226, 226),
    "cream": (246, 238, 218),
    "light blue": (222, 234, 246),
    "light pink": (246, 228, 232),
    "mint": (224, 242, 230),
}
BACKGROUND_STYLES = ("plain", "vertical", "horizontal", "diagonal")


@dataclass(frozen=True)
class Obj:
    """One shape in one grid cell; ``jitter`` moves its centre by up to ±1 jitter unit (render-only)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def position(self) -> str:
        return POSITION_NAMES[(self.row, self.col)]

    @property
    def key(self) -> tuple[str, str, str, int, int]:
        return (self.shape, self.colour, self.size, self.row, self.col)


@dataclass(frozen=True)
class Background:
    style: str
    colours: tuple[str, ...]  # one name for "plain", two for a gradient

    def phrase(self) -> str:
        if self.style == "plain":
            return f"plain {self.colours[0]}"
        return f"a {self.colours[0]} to {self.colours[1]} {self.style} gradient"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: Background = field(default_factory=lambda: Background("plain", ("white",)))

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum(1 for o in self.objects
                   if (colour is None or o.colour == colour) and (shape is None or o.shape == shape))

    def find(self, colour: str, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.colour == colour and o.shape == shape]

    def groups(self) -> list[tuple[str, str, int]]:
        """(colour, shape, count) per kind of object, in the canonical order of the vocabulary."""
        counts: dict[tuple[str, str], int] = {}
        for o in self.objects:
            counts[(o.colour, o.shape)] = counts.get((o.colour, o.shape), 0) + 1
        order = sorted(counts, key=lambda cs: (ALL_COLOURS.index(cs[0]), ALL_SHAPES.index(cs[1])))
        return [(c, s, counts[(c, s)]) for c, s in order]

    def unique_kinds(self) -> list[tuple[str, str]]:
        return [(c, s) for c, s, n in self.groups() if n == 1]

    def colours(self) -> set[str]:
        return {o.colour for o in self.objects}

    def signature(self) -> tuple:
        """Sorted object tuple: what makes two scenes 'the same picture' for train/eval disjointness."""
        return tuple(sorted(o.key for o in self.objects))

    def free_cells(self) -> list[tuple[int, int]]:
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

    # --- JSON form -----------------------------------------------------------------------
    def to_record(self) -> dict:
        return {
            "background": {"style": self.background.style, "colours": list(self.background.colours)},
            "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "row": o.row, "col": o.col,
                         "position": o.position, "jitter": [round(o.jitter[0], 4), round(o.jitter[1], 4)]}
                        for o in self.objects],
        }

    @classmethod
    def from_record(cls, record: dict, *, where: str = "scene record") -> "Scene":
        try:
            bg = record["background"]
            objects = tuple(
                Obj(shape=o["shape"], colour=o["colour"], size=o["size"], row=int(o["row"]), col=int(o["col"]),
                    jitter=(float(o["jitter"][0]), float(o["jitter"][1])))
                for o in record["objects"])
            background = Background(bg["style"], tuple(bg["colours"]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"{where}: malformed scene record ({type(exc).__name__}: {exc})") from exc
        for i, o in enumerate(objects):
            if o.shape not in ALL_SHAPES or o.colour not in COLOUR_RGB or o.size not in SIZES \
                    or (o.row, o.col) not in POSITION_NAMES:
                raise ValueError(f"{where}: objects[{i}] has an unknown shape/colour/size/cell: {o}")
        return cls(objects, background)


def as_scene(value, *, where: str = "scene") -> Scene:
    """Accept a ``Scene`` or its record (as stored in ``world/scenes.json``)."""
    return value if isinstance(value, Scene) else Scene.from_record(value, where=where)


class SceneSampler:
    """Draws random scenes from the configured vocabulary, never returning a forbidden signature.

    ``forbidden`` is shared and read live: the training sampler gets the signatures of every evaluation scene.
    """

    def __init__(self, rng: random.Random, *, colours: Iterable[str] = DEFAULT_COLOURS,
                 shapes: Iterable[str] = DEFAULT_SHAPES, forbidden: set | None = None, repeat_prob: float = 0.4):
        self.rng = rng
        self.colours = tuple(colours)
        self.shapes = tuple(shapes)
        self.forbidden = forbidden if forbidden is not None else set()
        # Probability that a further object repeats an existing kind: makes counts of 2 and 3 common.
        self.repeat_prob = repeat_prob

    def background(self) -> Background:
        rng = self.rng
        style = rng.choice(BACKGROUND_STYLES)
        names = list(BACKGROUND_RGB)
        if style == "plain":
            return Background(style, (rng.choice(names),))
        a, b = rng.sample(names, 2)
        return Background(style, (a, b))

    def new_object(self, colour: str, shape: str, cell: tuple[int, int]) -> Obj:
        rng = self.rng
        return Obj(shape=shape, colour=colour, size=rng.choice(SIZES), row=cell[0], col=cell[1],
                   jitter=(rng.uniform(-1, 1), rng.uniform(-1, 1)))

    def sample(self, min_objects: int = 1, max_objects: int = MAX_OBJECTS, *, unique_kinds: bool = False,
               max_tries: int = 10_000) -> Scene:
        rng = self.rng
        for _ in range(max_tries):
            n = rng.randint(min_objects, max_objects)
            cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
            kinds: list[tuple[str, str]] = []
            for _i in range(n):
                if kinds and not unique_kinds and rng.random() < self.repeat_prob:
                    kinds.append(rng.choice(kinds))
                else:
                    kinds.append((rng.choice(self.colours), rng.choice(self.shapes)))
            if unique_kinds and len(set(kinds)) != n:
                continue
            scene = Scene(tuple(self.new_object(c, s, cell) for (c, s), cell in zip(kinds, cells)),
                          self.background())
            if scene.signature() not in self.forbidden:
                return scene
        raise RuntimeError(f"could not sample a scene with {min_objects}-{max_objects} objects outside the "
                           f"{len(self.forbidden)} forbidden signatures in {max_tries} tries")

    def allowed(self, scene: Scene) -> bool:
        return scene.signature() not in self.forbidden
