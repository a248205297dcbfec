"""Protocol files: every text an evaluation protocol depends on, as data (YAML), never as code.

A protocol file may give any of these keys; a key it leaves out keeps the project's own wording:

- ``system_text`` — the chat's system text (inference layout);
- ``bison_template`` / ``nlvr2_template`` — the question asked for one BISON caption / NLVR2 statement, with
  ``{caption}`` / ``{statement}`` where it goes and two image slots (``<Img><ImageHere></Img>``);
- ``judge_system`` and ``judge_template`` — the SparklesEval judge's system message and prompt, the prompt with
  ``{images}``, ``{q1}``, ``{a1}``, ``{q2}``, ``{a2}``; ``judge_images_format`` says how ``{images}`` is written
  (``json``: a JSON array; ``python_repr``: the Python ``repr`` of the list, as the original did);
- ``extraction`` — how a BISON/NLVR2 answer is read: ``sparkles`` or ``upstream`` (the original's rule);
- ``source`` — free text saying where the texts came from (recorded in results).

Templates are filled by :func:`fill`, which replaces only the named placeholders, so any other braces in a
text stay as written. ``python -m sparkles.tools.import_protocol`` writes such a file from a checkout of the
original repository; ``--protocol-file F`` hands one to ``evaluate.py``, ``evaluate.sh``, ``demo.py`` and
``python -m sparkles.serve``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from .template import IMAGE_MARKER

PLACEHOLDERS = {  # text key → placeholders its template must contain
    "system_text": (),
    "bison_template": ("caption",),
    "nlvr2_template": ("statement",),
    "judge_system": (),
    "judge_template": ("images", "q1", "a1", "q2", "a2"),
}
TEXT_KEYS = tuple(PLACEHOLDERS)
IMAGE_SLOTS = {"bison_template": 2, "nlvr2_template": 2}  # the two candidate images
EXTRACTION_RULES = ("sparkles", "upstream")
IMAGES_FORMATS = ("json", "python_repr")


class ProtocolFileError(ValueError):
    """A protocol file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ProtocolTexts:
    """The texts of one protocol; ``None`` = the project's own wording for that part."""

    system_text: Optional[str] = None
    bison_template: Optional[str] = None
    nlvr2_template: Optional[str] = None
    judge_system: Optional[str] = None
    judge_template: Optional[str] = None
    judge_images_format: Optional[str] = None
    extraction: Optional[str] = None
    source: Optional[str] = None

    def given(self) -> list[str]:
        """The text keys this protocol sets (the rest are the project's wording)."""
        return [k for k in TEXT_KEYS if getattr(self, k) is not None]

    def missing(self) -> list[str]:
        return [k for k in TEXT_KEYS if getattr(self, k) is None]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def fingerprint(self) -> str:
        """A short hash of everything that changes answers or judgements (not ``source``)."""
        data = {k: v for k, v in self.to_dict().items() if k != "source"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """What a run records about its texts: which keys the file set, their hash, where they came from."""
        return {"given": self.given(), "fingerprint": self.fingerprint(), "source": self.source,
                "extraction": self.extraction, "judge_images_format": self.judge_images_format}


_PLACEHOLDER_RE = {}


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` of ``values`` replaced in one pass (inserted text is never re-scanned)."""
    names = tuple(sorted(values))
    pattern = _PLACEHOLDER_RE.get(names)
    if pattern is None:
        pattern = _PLACEHOLDER_RE[names] = re.compile(r"\{(" + "|".join(map(re.escape, names)) + r")\}")
    return pattern.sub(lambda m: str(values[m.group(1)]), template)


def check_texts(texts: ProtocolTexts, where: str = "protocol") -> ProtocolTexts:
    """Raise :class:`ProtocolFileError` if a template lacks a placeholder or an image slot, or a choice is unknown."""
    for key, needed in PLACEHOLDERS.items():
        value = getattr(texts, key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ProtocolFileError(f"{where}: {key} must be a string, got {type(value).__name__}")
        absent = [p for p in needed if "{" + p + "}" not in value]
        if absent:
            raise ProtocolFileError(f"{where}: {key} lacks the placeholder(s) "
                                    + ", ".join("{" + p + "}" for p in absent))
        slots = IMAGE_SLOTS.get(key)
        if slots is not None and value.count(IMAGE_MARKER) != slots:
            raise ProtocolFileError(f"{where}: {key} must show {slots} image slots ({IMAGE_MARKER}); it has "
                                    f"{value.count(IMAGE_MARKER)}")
    if texts.extraction is not None and texts.extraction not in EXTRACTION_RULES:
        raise ProtocolFileError(f"{where}: extraction must be one of {', '.join(EXTRACTION_RULES)}, "
                                f"got {texts.extraction!r}")
    if texts.judge_images_format is not None and texts.judge_images_format not in IMAGES_FORMATS:
        raise ProtocolFileError(f"{where}: judge_images_format must be one of {', '.join(IMAGES_FORMATS)}, "
                                f"got {texts.judge_images_format!r}")
    return texts


def texts_from_mapping(data: Mapping[str, Any], where: str = "protocol") -> ProtocolTexts:
    known = {f.name for f in fields(ProtocolTexts)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProtocolFileError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return check_texts(ProtocolTexts(**{k: v for k, v in data.items() if v is not None}), where)


def load_protocol_file(path: str | os.PathLike | None) -> ProtocolTexts:
    """The texts of a protocol file (``None`` → no texts: the project's wording everywhere)."""
    if path is None:
        return ProtocolTexts()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ProtocolFileError(f"protocol file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProtocolFileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ProtocolFileError(f"{path}: the top level must be a mapping of protocol keys")
    texts = texts_from_mapping(data, str(path))
    return texts if texts.source is not None else replace(texts, source=str(path))


def dump_protocol(texts: ProtocolTexts, header: str = "") -> str:
    """YAML for a protocol file (texts round-trip exactly through :func:`load_protocol_file`)."""
    import yaml

    check_texts(texts)
    body = yaml.safe_dump(texts.to_dict(), sort_keys=False, allow_unicode=True, width=1 << 20)
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + body
