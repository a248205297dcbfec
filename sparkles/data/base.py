"""What every training dataset shares: its config schema, the record form, sample encoding and collation.

A dataset is read in two stages so that the JSON files and the webdataset shards give identical samples:

1. *records* — an annotation file is parsed and validated into :class:`Record` objects (messages before the
   target, the target text, the image ids in slot order). Nothing here needs a tokenizer; the webdataset
   converter stores records (plus the image files' bytes) as they are.
2. *encoding* — :class:`SampleEncoder` renders a record with the one conversation renderer (loss only on the
   target answer and the end symbol) and loads/transforms the images that survive truncation.

All randomness of one sample (random crop, which alignment prompt a caption gets) comes from a per-sample seed
derived from (run seed, dataset, pass, record index), never from a worker's RNG, so results do not depend on
the number of loader workers and a resumed run sees exactly the samples an uninterrupted one would.

Bad input (malformed JSON, a missing or unreadable image, a record whose image count differs from its slots,
an over-long sample) is a :class:`DataError` naming the file, the record index and the field. With
``run.skip_bad_records`` such records are counted and skipped instead — never silently resampled.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import MISSING

from ..common.io import read_json
from ..common.tensors import IGNORE_INDEX
from ..conversation.render import Message, Rendered, Renderer, SampleTooLong, collate
from ..conversation.template import ASSISTANT, USER, Layout, count_slots


class DataError(ValueError):
    """A problem with one annotation file or record; the message names the file, record and field."""


# --------------------------------------------------------------------------------------------- config schema
@dataclass
class VisProcessorSpec:
    name: str = "blip2_image_train"
    image_size: Optional[int] = None  # None = the model's image_size
    min_scale: float = 0.5  # blip2_image_train only
    max_scale: float = 1.0


@dataclass
class VisProcessors:
    """Upstream layout: ``vis_processor.train`` for training, ``vis_processor.eval`` for inference."""

    train: VisProcessorSpec = field(default_factory=VisProcessorSpec)
    eval: VisProcessorSpec = field(default_factory=lambda: VisProcessorSpec(name="blip2_image_eval"))


@dataclass
class TextProcessorSpec:
    # None = keep captions as written. Upstream configs name ``blip_caption`` (lower-case, no punctuation,
    # 50 words), which would turn detailed descriptions into clipped lower-case targets; opt in explicitly.
    name: Optional[str] = None
    max_words: int = 50
    prompt: str = ""


@dataclass
class TextProcessors:
    train: TextProcessorSpec = field(default_factory=TextProcessorSpec)
    eval: TextProcessorSpec = field(default_factory=TextProcessorSpec)


@dataclass
class DatasetConfig:
    """Schema of one ``datasets.<name>`` entry. Paths: ``root_dir`` is relative to the Sparkles root,
    ``anno_path`` and ``img_root`` to ``root_dir``; images are ``<root_dir>/<img_root>/<image_id>.jpg``."""

    root_dir: str = MISSING
    anno_path: str = MISSING
    img_root: str = "images"
    sample_ratio: float = 1.0  # drawn with probability ∝ sample_ratio; 0 = not used (not even loaded)
    vis_processor: VisProcessors = field(default_factory=VisProcessors)
    text_processor: TextProcessors = field(default_factory=TextProcessors)
    max_length: Optional[int] = None  # tokens per sample; None = run.max_length
    # A directory written by `python -m sparkles.data.wds` (relative to the Sparkles root): stream the same
    # samples from .tar shards instead of reading the JSON file and image folder.
    shards: Optional[str] = None
    shuffle_buffer: int = 1000  # samples held for shuffling when streaming from shards


# --------------------------------------------------------------------------------------------- records
@dataclass
class Record:
    """One training sample before tokenisation.

    ``messages``: (role, content) pairs before the target, ending with a user message; empty for a caption
    record, whose user message (an alignment prompt) is chosen at encoding time. ``image_ids`` fill the
    slots in reading order.
    """

    id: str
    index: int
    messages: list[tuple[str, str]]
    target: str
    image_ids: list[str]
    kind: str = "dialogue"  # "dialogue" | "caption"
    # [start, end) character spans of ``target`` that carry no loss (a text-only drill's facts)
    unsupervised: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"id": self.id, "index": self.index, "kind": self.kind, "messages": [list(m) for m in self.messages],
               "target": self.target, "image_ids": list(self.image_ids)}
        if self.unsupervised:
            out["unsupervised"] = [list(span) for span in self.unsupervised]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "Record":
        return cls(id=obj["id"], index=int(obj["index"]), messages=[(r, c) for r, c in obj["messages"]],
                   target=obj["target"], image_ids=[str(i) for i in obj["image_ids"]], kind=obj.get("kind", "dialogue"),
                   unsupervised=[(int(a), int(b)) for a, b in obj.get("unsupervised", [])])


@dataclass
class BadRecord:
    """Placeholder for a sample that failed to load while ``skip_bad_records`` is on."""

    id: str
    reason: str


@dataclass
class RecordSet:
    """The validated records of one dataset plus where its images live."""

    name: str
    anno_file: Path
    image_dir: Path
    records: list[Record]
    skipped: list[str] = field(default_factory=list)  # reasons of records dropped at load time


def read_annotations(path: Path) -> Any:
    """The parsed annotation file; a missing or malformed one is a :class:`DataError` naming it."""
    return read_json(path, what="annotation file", error=DataError)


def image_path(image_dir: Path, image_id: str) -> Path:
    return image_dir / f"{image_id}.jpg"


def check_messages(messages: Sequence[tuple[str, str]], n_images: int, where: str) -> None:
    """Roles alternate from the user and end with the user; slots match the images."""
    if not messages:
        raise DataError(f"{where}: no user message")
    for i, (role, _) in enumerate(messages):
        want = USER if i % 2 == 0 else ASSISTANT
        if role != want:
            raise DataError(f"{where}: message {i} has role {role!r}, expected {want!r}")
    if messages[-1][0] != USER:
        raise DataError(f"{where}: the conversation must end with a user message before the answer")
    slots = sum(count_slots(c) for _, c in messages)
    if slots != n_images:
        raise DataError(f"{where}: {slots} image slot(s) in the text but {n_images} image(s) in tgt_imgs")


def collect_records(name: str, anno_file: Path, image_dir: Path, items: Sequence[Any],
                    parse: Callable[[Any, int, str], Record], *, skip_bad: bool) -> RecordSet:
    """Parse every item; check its images exist. Errors name the file and record (or are counted)."""
    records, skipped = [], []
    for index, item in enumerate(items):
        where = f"{anno_file}: record {index}"
        try:
            rec = parse(item, index, where)
            for image_id in rec.image_ids:
                p = image_path(image_dir, image_id)
                if not p.is_file():
                    raise DataError(f"{where}: image {image_id!r} not found: {p}")
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        records.append(rec)
    return RecordSet(name, anno_file, image_dir, records, skipped)


# --------------------------------------------------------------------------------------------- encoding
def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts' text, identical across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def build_vis_transform(spec: Any, model_image_size: int):
    """The image processor of a ``VisProcessorSpec`` (only the options its class accepts are passed)."""
    from ..processors.image import build_processor

    spec = dict(spec)
    if spec.get("image_size") is None:
        spec["image_size"] = model_image_size
    if spec["image_size"] != model_image_size:
        raise DataError(f"vis_processor image_size {spec['image_size']} differs from model.image_size "
                        f"{model_image_size}")
    return _build_with_accepted_kwargs(spec, build_processor)


def build_text_processor(spec: Any):
    from ..processors.image import build_processor

    spec = dict(spec)
    if not spec.get("name"):
        return None
    return _build_with_accepted_kwargs(spec, build_processor)


def _build_with_accepted_kwargs(spec: dict, build: Callable):
    from ..common.registry import PROCESSORS

    cls = PROCESSORS.get(spec["name"])
    accepted = set(inspect.signature(cls).parameters)
    return build({"name": spec["name"], **{k: v for k, v in spec.items() if k in accepted}})


@dataclass
class EncodedSample:
    id: str
    rendered: Rendered
    pixels: Optional[torch.Tensor]  # [n_images, 3, H, W] in slot order, or None without images
    image_keys: list[str]  # identity of each image (for the frozen-tower feature cache)


class SampleEncoder:
    """Record → :class:`EncodedSample` for one dataset (renderer, layout, transforms, prompts)."""

    def __init__(self, *, renderer: Renderer, layout: Layout, image_transform: Callable, max_length: int,
                 image_key_prefix: str, prompts: Optional[Sequence[str]] = None,
                 text_processor: Optional[Callable[[str], str]] = None) -> None:
        self.renderer = renderer
        self.layout = layout
        self.image_transform = image_transform
        self.max_length = max_length
        self.image_key_prefix = image_key_prefix
        self.prompts = list(prompts or [])
        self.text_processor = text_processor

    def messages_for(self, record: Record, rng: random.Random) -> tuple[list[Message], str]:
        if record.kind == "caption":
            if not self.prompts:
                raise DataError(f"{record.id}: caption record but no alignment prompts configured")
            prompt = rng.choice(self.prompts)
            target = self.text_processor(record.target) if self.text_processor else record.target
            return [Message(USER, prompt)], target
        return [Message(r, c) for r, c in record.messages], record.target

    def encode(self, record: Record, sample_seed: int, open_image: Callable[[str], Any], where: str) -> EncodedSample:
        rng = random.Random(sample_seed)
        messages, target = self.messages_for(record, rng)
        try:
            # a caption's target may be rewritten by the text processor; spans belong to dialogue targets only
            spans = record.unsupervised if record.kind != "caption" else ()
            rendered = self.renderer.render(messages, self.layout, target=target, max_length=self.max_length,
                                            unsupervised=spans)
        except SampleTooLong as exc:
            raise DataError(f"{where}: too long: {exc}") from None
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if not any(lab != IGNORE_INDEX for lab in rendered.labels):
            raise DataError(f"{where}: no target tokens after rendering")
        ids = [record.image_ids[k] for k in rendered.image_indices]
        pixels = None
        if ids:
            # Seed the global torch RNG that torchvision's random transforms draw from, and restore it after,
            # so augmentation is a function of the sample alone and the training RNG stream is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                tensors = []
                for image_id in ids:
                    try:
                        image = open_image(image_id)
                    except Exception as exc:  # ImageLoadError, PIL decode errors on shard bytes, ...
                        raise DataError(f"{where}: image {image_id!r}: {exc}") from None
                    tensors.append(self.image_transform(image))
            pixels = torch.stack(tensors)
        keys = [f"{self.image_key_prefix}:{i}" for i in ids]
        return EncodedSample(record.id, rendered, pixels, keys)


def collate_samples(items: Sequence[EncodedSample | BadRecord], *, pad_id: int) -> dict:
    """Pad a batch; images of all samples are concatenated in slot reading order (``[N, 3, H, W]``).

    ``bad`` lists (id, reason) of samples skipped under ``skip_bad_records``; the runner counts them.
    """
    good = [s for s in items if isinstance(s, EncodedSample)]
    bad = [(s.id, s.reason) for s in items if isinstance(s, BadRecord)]
    batch: dict[str, Any] = {"ids": [s.id for s in good], "bad": bad, "num_samples": len(good)}
    if not good:
        return batch
    batch.update(collate([s.rendered for s in good], pad_id=pad_id, padding_side="right"))
    pix = [s.pixels for s in good if s.pixels is not None]
    batch["images"] = torch.cat(pix) if pix else None
    batch["image_keys"] = [k for s in good for k in s.image_keys]
    batch["image_messages"] = [m for s in good for m in s.rendered.image_messages]
    return batch


def resolve_under(root: Path, *parts: str) -> Path:
    """``root / part / ...`` where absolute parts win (a user may point a dataset anywhere)."""
    p = Path(root)
    for part in parts:
        p = p / os.path.expanduser(part)
    return p


class RecordDataset(torch.utils.data.Dataset):
    """Map-style dataset over a :class:`RecordSet`; items are ``(record_position, sample_seed)`` keys.

    The sampler (:mod:`sparkles.data.mixture`) supplies the seed, so a sample's augmentation does not depend
    on which worker loads it.
    """

    def __init__(self, records: RecordSet, encoder: SampleEncoder, *, skip_bad: bool = False,
                 sample_ratio: float = 1.0) -> None:
        self.name = records.name
        self.records = records
        self.encoder = encoder
        self.skip_bad = skip_bad
        self.sample_ratio = sample_ratio

    def __len__(self) -> int:
        return len(self.records.records)

    @property
    def skipped(self) -> list[str]:
        """Reasons of the records left out when the annotations were read (``skip_bad_records``)."""
        return self.records.skipped

    def open_image(self, image_id: str):
        from ..processors.image import open_image

        return open_image(image_path(self.records.image_dir, image_id))

    def get(self, position: int, sample_seed: int) -> EncodedSample:
        record = self.records.records[position]
        where = f"{self.records.anno_file}: record {record.index}"
        return self.encoder.encode(record, sample_seed, self.open_image, where)

    def __getitem__(self, key: tuple[int, int]) -> EncodedSample | BadRecord:
        position, sample_seed = key
        try:
            return self.get(position, sample_seed)
        except DataError as exc:
            if not self.skip_bad:
                raise
            return BadRecord(self.records.records[position].id, str(exc))

    def collate(self, items):
        return collate_samples(items, pad_id=self.encoder.renderer.pad_id)
