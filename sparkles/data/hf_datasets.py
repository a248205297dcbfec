"""The data of a Sparkles root as Hugging Face ``datasets``, and back.

Each annotation file of a root becomes one :class:`datasets.DatasetDict` named after it, with one split
(``train`` for SparklesDialogue, ``test`` for the evaluation sets); where the files lie is
:class:`~sparkles.common.paths.SparklesLayout`'s business:

- ``SparklesDialogueCC`` / ``SparklesDialogueVG``: the full dialogue files (kind ``dialogue``);
- ``SparklesDialogue<CC|VG>_turn<t>_<n>img``: the training split files beside them (kind ``samples``);
- ``SparklesEval``, ``BISON``, ``NLVR2``: the evaluation annotations (kinds ``sparkleseval``, ``bison``, ``nlvr2``).

A row keeps its record's structure: a dialogue is a list of messages ``{role, content, images}``, each image
reference ``{image_id, caption}`` gains an ``image`` (a :class:`datasets.Image` holding the file's bytes as they
are on disk and its file name); a BISON candidate ``{image_id, image_filename}`` gains its ``image`` the same
way, an NLVR2 record gains ``images`` (its pair's two files). Ids are ``int64`` when the file's first one is a
JSON number, else strings. A top-level field whose value its column cannot hold exactly (an unknown key, a null,
an id of the other type) goes verbatim into the row's ``extra`` column (JSON text), so that :func:`to_records`
gives back records equal to the file's; inside messages and image references only the fields above are allowed
(anything else is a :class:`DatasetExportError` naming the record), since their images must be found.

:func:`export_dataset` builds one set, :func:`export_root` saves sets with ``save_to_disk``, :func:`to_records`
turns a loaded set back into the file's records, :func:`import_dataset` writes a set back under a root
(annotation file and image files), :func:`push_to_hub` uploads saved sets as configs of one Hub dataset.
Every image of a set is held in memory while it is built.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..common.io import atomic_write, atomic_write_json, read_json
from ..common.paths import DIALOGUE_SUBSETS, EVAL_DATASETS, MissingPathError, SparklesLayout, image_by_id, nlvr2_pair

# Image files of an id, in the order they are tried; the evaluation reads the same four, training reads .jpg.
EXTRA = "extra"
_SPLIT_FILE = re.compile(r"SparklesDialogue(?P<subset>[A-Z]+)_turn(?P<turn>\d+)_(?P<n>\d+)img")


class DatasetExportError(ValueError):
    """A record that cannot become a row (or a row that cannot become a file); the message names which."""


# ------------------------------------------------------------------------------------------------ schemas
@dataclass(frozen=True)
class _Scalar:
    kind: str  # "str" or "id" (an int or a string; the column's type is the first value's)


@dataclass(frozen=True)
class _Seq:
    item: Any


@dataclass(frozen=True)
class _Struct:
    fields: tuple  # ((name, node), ...)
    required: tuple = ()
    # how the struct's image file is found: "by_id" (<image_id>.<ext>) or "by_filename" (image_filename)
    image: Optional[str] = None


STR, ID = _Scalar("str"), _Scalar("id")
IMAGE_REF = _Struct((("image_id", ID), ("caption", STR)), required=("image_id",), image="by_id")
DIALOGUE = _Seq(_Struct((("role", STR), ("content", STR), ("images", _Seq(IMAGE_REF))), required=("role", "content")))
RAW = _Seq(_Struct((("prompt", STR), ("response", STR))))
CANDIDATE = _Struct((("image_id", ID), ("image_filename", STR)), required=("image_filename",), image="by_filename")


@dataclass(frozen=True)
class Kind:
    """One annotation format: its top-level fields, the split it is published as, and its derived images."""

    name: str
    fields: tuple
    split: str
    pair_images: bool = False  # NLVR2: ``images`` = <identifier without its last 2 characters>-img{0,1}.png

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.fields) + (("images",) if self.pair_images else ()) + (EXTRA,)


KINDS = {k.name: k for k in (
    Kind("dialogue", (("dialogue", DIALOGUE), ("raw", RAW)), "train"),
    Kind("samples", (("uniform_question", STR), ("question", STR), ("instruction", STR), ("answer", STR),
                     ("fix_answer", STR), ("tgt_imgs", _Seq(IMAGE_REF))), "train"),
    Kind("sparkleseval", (("evaluation_id", ID), ("dialogue", DIALOGUE)), "test"),
    Kind("bison", (("evaluation_id", ID), ("caption", STR), ("true_image_id", ID),
                   ("image_candidates", _Seq(CANDIDATE))), "test"),
    Kind("nlvr2", (("evaluation_id", ID), ("identifier", STR), ("sentence", STR), ("label", STR)), "test",
         pair_images=True),
)}


# ------------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class Source:
    """Where one named set lives under a root."""

    name: str
    kind: Kind
    annotation_file: Path
    image_dir: Path


def source(root: str | os.PathLike, name: str) -> Source:
    """The set ``name`` (see the module docstring) under ``root``; the file need not exist yet."""
    layout = SparklesLayout(Path(root))
    if name in EVAL_DATASETS:
        return Source(name, KINDS[name.lower()], layout.eval_annotations(name), layout.eval_images(name))
    for subset in DIALOGUE_SUBSETS:
        if name == f"SparklesDialogue{subset}":
            return Source(name, KINDS["dialogue"], layout.dialogue_file(subset), layout.dialogue_images(subset))
    m = _SPLIT_FILE.fullmatch(name)
    if m and m["subset"] in DIALOGUE_SUBSETS:
        return Source(name, KINDS["samples"], layout.dialogue_split_file(m["subset"], int(m["turn"]), int(m["n"])),
                      layout.dialogue_images(m["subset"]))
    raise ValueError(f"unknown set {name!r}; known: SparklesDialogueCC, SparklesDialogueVG, "
                     f"SparklesDialogue<CC|VG>_turn<t>_<n>img, {', '.join(EVAL_DATASETS)}")


def available(root: str | os.PathLike) -> list[str]:
    """The sets whose annotation file exists under ``root``."""
    layout = SparklesLayout(Path(root))
    names = []
    for subset in DIALOGUE_SUBSETS:
        if layout.dialogue_file(subset).is_file():
            names.append(f"SparklesDialogue{subset}")
        annotations = layout.dialogue_dir(subset) / "annotations"
        splits = sorted(p.stem for p in annotations.glob(f"SparklesDialogue{subset}_turn*_*img.json")
                        if _SPLIT_FILE.fullmatch(p.stem)) if annotations.is_dir() else []
        names += splits
    return names + [d for d in EVAL_DATASETS if layout.eval_annotations(d).is_file()]


# ------------------------------------------------------------------------------------------------ records → rows
class _Misfit(Exception):
    """A top-level value its column cannot hold exactly (it goes to ``extra``)."""


class _Encoder:
    """Records of one set → rows, learning each id column's type from its first value."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self.id_types: dict[str, str] = {}  # dotted field path → "int" | "str"

    def _image(self, path: Path, where: str) -> dict:
        if not path.is_file():
            raise DatasetExportError(f"{where}: image not found: {path}")
        return {"bytes": path.read_bytes(), "path": path.name}

    def _locate(self, how: str, value: dict) -> Path:
        if how == "by_filename":
            return self.src.image_dir / value["image_filename"]
        return image_by_id(self.src.image_dir, value["image_id"])

    def _id(self, value: Any, path: str, where: str, *, top: bool) -> Any:
        kind = "int" if isinstance(value, int) and not isinstance(value, bool) else \
            "str" if isinstance(value, str) else None
        known = self.id_types.setdefault(path, kind) if kind else None
        if kind is None or kind != known:
            if top:
                raise _Misfit
            if kind is None:
                raise DatasetExportError(f"{where}: {path} {value!r} is neither an integer nor a string")
            raise DatasetExportError(f"{where}: {path} {value!r} is a{'n' if kind == 'int' else ''} {kind} but the "
                                     f"file's first one is a{'n' if known == 'int' else ''} {known}; a file's ids "
                                     "must share one type")
        return value

    def encode(self, node: Any, value: Any, path: str, where: str, *, top: bool = False) -> Any:
        if isinstance(node, _Scalar):
            if node.kind == "id":
                return self._id(value, path, where, top=top)
            if isinstance(value, str):
                return value
            if top:
                raise _Misfit
            raise DatasetExportError(f"{where}: {path} must be a string, found {type(value).__name__}")
        if isinstance(node, _Seq):
            if not isinstance(value, list):
                raise DatasetExportError(f"{where}: {path} must be a list, found {type(value).__name__}")
            return [self.encode(node.item, v, path, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            raise DatasetExportError(f"{where}: expected an object, found {type(value).__name__}")
        names = dict(node.fields)
        unknown = sorted(set(value) - set(names))
        missing = [k for k in node.required if k not in value]
        nulls = sorted(k for k, v in value.items() if v is None)
        if unknown or missing or nulls:
            problem = (f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}" if missing
                       else f"null field(s) {nulls}")
            raise DatasetExportError(f"{where}: {problem} (allowed: {', '.join(names)})")
        row = {k: self.encode(n, value[k], f"{path}.{k}", f"{where}.{k}") if k in value else None
               for k, n in node.fields}
        if node.image:
            row["image"] = self._image(self._locate(node.image, value), where)
        return row

    def row(self, record: Any, index: int) -> dict:
        where = f"{self.src.annotation_file}: record {index}"
        if not isinstance(record, dict):
            raise DatasetExportError(f"{where}: expected an object, found {type(record).__name__}")
        kind = self.src.kind
        known = dict(kind.fields)
        row: dict[str, Any] = {name: None for name in known}
        extra = {k: v for k, v in record.items() if k not in known}
        for name, node in kind.fields:
            if name not in record:
                continue
            value = record[name]
            if value is None:
                extra[name] = value  # an explicit null, kept apart from an absent field
                continue
            if isinstance(node, _Scalar):
                try:
                    row[name] = self.encode(node, value, name, where, top=True)
                except _Misfit:
                    extra[name] = value
            else:  # structures carry images: they must fit
                row[name] = self.encode(node, value, name, f"{where} {name}")
        if kind.pair_images:
            identifier = record.get("identifier")
            if not isinstance(identifier, str) or len(identifier) < 3:
                raise DatasetExportError(f"{where}: no 'identifier' to find its image pair by")
            row["images"] = [self._image(path, where) for path in nlvr2_pair(self.src.image_dir, identifier)]
        row[EXTRA] = json.dumps(extra, ensure_ascii=False) if extra else "{}"
        return row

    def features(self):
        import datasets

        def feature(node: Any, path: str):
            if isinstance(node, _Scalar):
                is_int = node.kind == "id" and self.id_types.get(path) == "int"
                return datasets.Value("int64" if is_int else "string")
            if isinstance(node, _Seq):
                return datasets.List(feature(node.item, path))
            out = {k: feature(n, f"{path}.{k}") for k, n in node.fields}
            if node.image:
                out["image"] = datasets.Image()
            return out

        cols = {name: feature(node, name) for name, node in self.src.kind.fields}
        if self.src.kind.pair_images:
            cols["images"] = datasets.List(datasets.Image())
        cols[EXTRA] = datasets.Value("string")
        return datasets.Features(cols)


def export_dataset(root: str | os.PathLike, name: str):
    """The set ``name`` under ``root`` as a ``DatasetDict`` with one split (``train`` or ``test``)."""
    import datasets

    src = source(root, name)
    if not src.annotation_file.is_file():
        raise MissingPathError(f"{name}: annotation file not found: {src.annotation_file}")
    records = read_json(src.annotation_file, what=f"{name} annotation file")
    if not isinstance(records, list):
        raise DatasetExportError(f"{src.annotation_file}: the top level must be a list of records")
    encoder = _Encoder(src)
    rows = [encoder.row(record, i) for i, record in enumerate(records)]
    relative = src.annotation_file.relative_to(Path(root)).as_posix()
    features = encoder.features()
    info = datasets.DatasetInfo(description=f"{name} ({src.kind.name} records of {relative}) with its images",
                                features=features)
    table = datasets.Dataset.from_list(rows, features=features, info=info) if rows else \
        datasets.Dataset.from_dict({c: [] for c in src.kind.columns}, features=features, info=info)
    return datasets.DatasetDict({src.kind.split: table})


def export_root(root: str | os.PathLike, out: str | os.PathLike,
                names: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Save the sets ``names`` (default: every one present) under ``out/<name>`` with ``save_to_disk``."""
    names = list(names) if names else available(root)
    if not names:
        raise MissingPathError(f"no SparklesDialogue or evaluation annotation file under {root}")
    written = {}
    for name in names:
        path = Path(out) / name
        dataset = export_dataset(root, name)
        # an empty split would be saved as no shard at all, which load_from_disk cannot read: ask for one
        empty = {split: 1 for split, table in dataset.items() if table.num_rows == 0}
        dataset.save_to_disk(str(path), num_shards=empty or None)
        written[name] = path
    return written


def load_dataset_dir(path: str | os.PathLike):
    """A set saved by :func:`export_root` (``datasets.load_from_disk``)."""
    import datasets

    if not Path(path).is_dir():
        raise MissingPathError(f"saved dataset not found: {path}")
    return datasets.load_from_disk(str(path))


# ------------------------------------------------------------------------------------------------ rows → records
def kind_of(dataset) -> Kind:
    """The kind of an exported set, told by its columns."""
    columns = tuple(dataset.column_names)
    for kind in KINDS.values():
        if set(columns) == set(kind.columns):
            return kind
    raise DatasetExportError(f"columns {list(columns)} are not those of an exported Sparkles set")


def _single(dataset):
    """The one split of a ``DatasetDict`` (a ``Dataset`` as it is)."""
    if hasattr(dataset, "column_names") and not isinstance(dataset.column_names, dict):
        return dataset
    if len(dataset) != 1:
        raise DatasetExportError(f"expected one split, found {sorted(dataset)}; pass the split to convert")
    return next(iter(dataset.values()))


def _rows(dataset) -> Iterable[dict]:
    """Rows as stored (images as ``{"bytes", "path"}``, not decoded), in order."""
    for table in dataset.with_format("arrow").iter(batch_size=256):
        yield from table.to_pylist()


def _decode(node: Any, value: Any, images: Optional[list]) -> Any:
    if isinstance(node, _Scalar):
        return value
    if isinstance(node, _Seq):
        return [_decode(node.item, v, images) for v in value]
    if node.image and images is not None and value.get("image") is not None:
        images.append(value["image"])
    return {k: _decode(n, value[k], images) for k, n in node.fields if value.get(k) is not None}


def _record(kind: Kind, row: dict, images: Optional[list] = None) -> dict:
    record = {name: _decode(node, row[name], images) for name, node in kind.fields if row.get(name) is not None}
    if kind.pair_images and images is not None:
        images.extend(image for image in row.get("images") or [] if image is not None)
    record.update(json.loads(row.get(EXTRA) or "{}"))
    return record


def to_records(dataset) -> list[dict]:
    """The annotation records of an exported set (a ``Dataset``, or a ``DatasetDict`` of one split): equal to the
    records of the file it came from."""
    table = _single(dataset)
    kind = kind_of(table)
    return [_record(kind, row) for row in _rows(table)]


def import_dataset(dataset, root: str | os.PathLike, name: str, *, overwrite: bool = False) -> Path:
    """Write an exported set back under ``root`` as the set ``name``: its annotation file and its images (the
    stored bytes, under their stored file names). An image file already there with other content is an error;
    an existing annotation file is one unless ``overwrite``. Returns the annotation file."""
    table = _single(dataset)
    kind = kind_of(table)
    src = source(root, name)
    if src.kind != kind:
        raise DatasetExportError(f"{name} holds {src.kind.name} records, but the dataset has {kind.name} columns")
    if src.annotation_file.exists() and not overwrite:
        raise DatasetExportError(f"{src.annotation_file} exists; pass overwrite=True to replace it")
    records, images = [], []
    for row in _rows(table):
        records.append(_record(kind, row, images))
    written: dict[str, bytes] = {}
    for image in images:
        _write_image(src.image_dir, image, written)
    atomic_write_json(src.annotation_file, records)
    return src.annotation_file


def _write_image(image_dir: Path, image: dict, written: dict[str, bytes]) -> None:
    name, data = image.get("path"), image.get("bytes")
    if not name or data is None or Path(name).name != name or name in (".", ".."):
        raise DatasetExportError(f"an image without bytes or with an unusable file name: {name!r}")
    if written.get(name, data) != data:
        raise DatasetExportError(f"two different images are both named {name!r}")
    if name in written:
        return
    path = image_dir / name
    if path.is_file() and path.read_bytes() != data:
        raise DatasetExportError(f"{path} exists with other content; not overwritten")
    if not path.is_file():
        atomic_write(path, data)
    written[name] = data


# ------------------------------------------------------------------------------------------------ the Hub
def push_to_hub(out: str | os.PathLike, repo_id: str, names: Optional[Sequence[str]] = None, *,
                token: Optional[str] = None, private: Optional[bool] = None) -> list[str]:
    """Upload sets saved by :func:`export_root` under ``out`` as configs (one per set) of the Hub dataset
    ``repo_id`` (needs network access and a write token). Returns the names pushed."""
    out = Path(out)
    names = list(names) if names else sorted(p.name for p in out.iterdir() if (p / "dataset_dict.json").is_file())
    if not names:
        raise MissingPathError(f"no saved sets under {out}; run export_root first")
    for name in names:
        load_dataset_dir(out / name).push_to_hub(repo_id, config_name=name, token=token, private=private)
    return names
