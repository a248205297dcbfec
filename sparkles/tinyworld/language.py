"""The small, regular language of the synthetic world: phrases for counts, objects and scenes, and their parsers.

Every sentence the generator writes comes from the functions here, and the reference judge reads answers back
with the parsers here, so the two cannot drift apart. The grammar is deliberately tiny (one phrasing per fact)
so that a small model trained for minutes can learn it:

- scene description:  ``two red circles and a blue square`` (kinds in vocabulary order; ``a`` for one)
- focused count:      ``no red circles`` / ``one circle`` / ``three red objects`` / ``two objects``
- position:           ``on the left``, ``at the top right``, ``in the centre`` (3×3 grid)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .scenes import ALL_COLOURS, ALL_SHAPES, POSITION_PHRASES, Scene

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
WORD_VALUES = {w: i for i, w in enumerate(NUMBER_WORDS)}
WORD_VALUES.update({"a": 1, "an": 1, "zero": 0})
PHRASE_POSITIONS = {phrase: name for name, phrase in POSITION_PHRASES.items()}

COLOUR_RE = "|".join(ALL_COLOURS)
SHAPE_RE = "|".join(ALL_SHAPES)
POS_RE = "|".join(sorted((re.escape(p) for p in PHRASE_POSITIONS), key=len, reverse=True))
COUNT_RE = "|".join(sorted(WORD_VALUES, key=len, reverse=True))


def number_word(n: int) -> str:
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"count {n} is outside the world's number words (0..{len(NUMBER_WORDS) - 1})")
    return NUMBER_WORDS[n]


@dataclass(frozen=True)
class Qual:
    """What is being counted: a colour, a shape, both, or (neither) all objects."""

    colour: str | None = None
    shape: str | None = None

    def noun(self, n: int) -> str:
        base = self.shape or "object"
        word = base if n == 1 else base + "s"
        return f"{self.colour} {word}" if self.colour else word

    @property
    def plural(self) -> str:
        return self.noun(2)

    def count(self, scene: Scene) -> int:
        return scene.count(self.colour, self.shape)


QUAL_RE = rf"(?:(?:{COLOUR_RE}) )?(?:{SHAPE_RE}|object)s?"


def parse_qual(text: str) -> Qual:
    m = re.fullmatch(rf"(?:(?P<c>{COLOUR_RE}) )?(?P<s>{SHAPE_RE}|object)s?", text.strip())
    if not m:
        raise ValueError(f"not a countable noun of the world: {text!r}")
    shape = None if m["s"] == "object" else m["s"]
    return Qual(m["c"], shape)


def count_phrase(n: int, qual: Qual) -> str:
    """Focused count: ``no red circles``, ``one circle``, ``two objects``."""
    return f"{number_word(n)} {qual.noun(n)}"


def item_phrase(n: int, colour: str, shape: str, position: str | None = None) -> str:
    """One kind of object in a description: ``a red circle``, ``two blue squares``, ``a red circle on the left``."""
    head = f"a {colour} {shape}" if n == 1 else f"{number_word(n)} {colour} {shape}s"
    return f"{head} {POSITION_PHRASES[position]}" if position else head


def join_items(items: list[str]) -> str:
    if not items:
        raise ValueError("nothing to join")
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe(scene: Scene, position_of: tuple[str, str] | None = None) -> str:
    """Templated description of a scene.

    With ``position_of`` = (colour, shape) of a kind present exactly once, that object is moved to the end of the
    list and given its position (``two red circles and a blue square on the left``): the form BISON position
    pairs need, kept short by positioning only the object that matters.
    """
    groups = scene.groups()
    items = []
    last = None
    for c, s, n in groups:
        if position_of == (c, s):
            objs = scene.find(c, s)
            if len(objs) != 1:
                raise ValueError(f"cannot give the position of {c} {s}: the scene has {len(objs)} of them")
            last = item_phrase(1, c, s, objs[0].position)
        else:
            items.append(item_phrase(n, c, s))
    if position_of is not None:
        if last is None:
            raise ValueError(f"cannot give the position of {position_of}: not in the scene")
        items.append(last)
    return join_items(items)


def caption(scene: Scene) -> str:
    """Detailed caption (the 'image description' of the dialogue files): summary, every object, background."""
    summary = describe(scene)
    parts = [summary[0].upper() + summary[1:] + "."]
    for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        parts.append(f"A {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}.")
    parts.append(f"The background is {scene.background.phrase()}.")
    return " ".join(parts)


@dataclass(frozen=True)
class Item:
    """One parsed description item: a count of a (colour?, shape?) kind, optionally at a position."""

    count: int
    colour: str | None
    shape: str | None
    position: str | None = None


_ITEM_RE = re.compile(
    rf"(?P<n>{COUNT_RE}) (?:(?P<c>{COLOUR_RE}) )?(?P<s>{SHAPE_RE}|object)s?(?: (?P<p>{POS_RE}))?")


def parse_items(text: str) -> list[Item]:
    """Parse a description or focused count (``two red circles and a blue square on the left``)."""
    parts = re.split(r", | and ", text.strip())
    items = []
    for part in parts:
        m = _ITEM_RE.fullmatch(part.strip())
        if not m:
            raise ValueError(f"not a description item of the world: {part!r}")
        shape = None if m["s"] == "object" else m["s"]
        pos = PHRASE_POSITIONS[m["p"]] if m["p"] else None
        items.append(Item(WORD_VALUES[m["n"]], m["c"], shape, pos))
    return items


def word_count(text: str) -> int:
    return len(text.split())


def sentences(text: str) -> list[str]:
    """Split an answer into sentences (IMAGE#ids contain no full stops, so a simple split suffices)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
