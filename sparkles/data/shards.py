"""webdataset shards of the training datasets: writing them, and streaming them back as training batches.

:func:`write_shards` (run by ``python -m sparkles.data.wds``, :mod:`.wds`) writes
``<out>/<dataset>/<dataset>-000000.tar ...`` plus ``manifest.json`` (sample counts per shard). Each
sample is a validated :class:`~sparkles.data.base.Record` as ``json`` and its image files' original bytes as
``img0.jpg``, ``img1.jpg``, ... (so decoding gives the same pixels as reading the folder). Shards are
tokenizer-independent: rendering happens at training time with the same encoder as the JSON path, so a
dataset trained from shards (``datasets.<name>.shards=<dir>``) yields the same sample ids and labels.

Streaming order (one infinite stream per rank and loader worker, a "slot"): in pass ``p`` the shards are
permuted by (seed, dataset, p); with at least as many shards as slots each slot reads its own shards,
otherwise every slot reads all of them and keeps every ``slots``-th sample. A seeded shuffle buffer mixes
samples. Everything is a function of (seed, pass, slot), so a resumed run skips exactly the batches it
had consumed.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..common.io import atomic_write_json, read_json
from ..common.logging import progress_bar
from .base import BadRecord, DataError, Record, RecordSet, SampleEncoder, collate_samples, image_path, stable_seed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "sparkles-wds-1"


# --------------------------------------------------------------------------------------------- writing
def write_shards(records: RecordSet, out_dir: Path, *, shard_size: int = 1000, image_key_prefix: str = "",
                 skip_bad: bool = False, progress: bool = True) -> dict:
    """Write one dataset's records (with image bytes) to ``out_dir``; returns the manifest.

    ``progress``: a bar over the records on stderr (:func:`sparkles.common.logging.progress_bar`).
    """
    import webdataset as wds

    from ..processors.image import ImageLoadError, check_image

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()  # the manifest marks a finished conversion; remove it while rewriting
    for old in out_dir.glob(f"{records.name}-*.tar"):
        old.unlink()
    counts: dict[str, int] = {}
    skipped = list(records.skipped)
    pattern = str(out_dir / f"{records.name}-%06d.tar")
    bar = progress_bar(records.records, desc=f"shards {records.name}", unit="sample", enabled=progress)
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer, bar:
        for rec in bar:
            where = f"{records.anno_file}: record {rec.index}"
            try:
                sample: dict[str, Any] = {"__key__": f"{rec.index:09d}",
                                          "json": json.dumps(rec.to_json(), ensure_ascii=False).encode("utf-8")}
                for k, image_id in enumerate(rec.image_ids):
                    path = image_path(records.image_dir, image_id)
                    data = path.read_bytes()
                    try:  # fail here, not mid-training, on a file open_image would refuse
                        check_image(data, what=str(path))
                    except ImageLoadError as exc:
                        raise DataError(f"{where}: image {image_id!r}: {exc}") from None
                    sample[f"img{k}.jpg"] = data
            except (DataError, OSError) as exc:
                if not skip_bad:
                    raise DataError(str(exc)) from None
                skipped.append(str(exc))
                continue
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    manifest = {
        "format": FORMAT, "dataset": records.name, "kind": records.records[0].kind if records.records else None,
        "num_samples": sum(counts.values()), "source": str(records.anno_file), "image_dir": str(records.image_dir),
        "image_key_prefix": image_key_prefix, "skipped": skipped,
        "shards": [{"file": f, "num_samples": n} for f, n in sorted(counts.items())],
    }
    atomic_write_json(manifest_path, manifest, indent=1)
    return manifest


def read_manifest(shard_dir: Path, *, expect_dataset: Optional[str] = None) -> dict:
    path = shard_dir / MANIFEST if shard_dir.is_dir() or not shard_dir.name.endswith(".json") else shard_dir
    if not path.is_file():
        raise DataError(f"no webdataset manifest at {path}; convert the dataset with "
                        f"`python -m sparkles.data.wds --cfg-path ... --out DIR`")
    manifest = read_json(path, what="shard manifest", error=DataError)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a Sparkles shard manifest (format {manifest.get('format')!r})")
    if expect_dataset is not None and manifest["dataset"] != expect_dataset:
        raise DataError(f"{path}: shards of dataset {manifest['dataset']!r}, configured for {expect_dataset!r}")
    manifest["_dir"] = str(path.parent)
    return manifest


# --------------------------------------------------------------------------------------------- reading
class ShardDataset:
    """One dataset's shards plus its encoder; :class:`ShardStream` iterates it for one rank."""

    def __init__(self, name: str, manifest: dict, encoder: SampleEncoder, *, skip_bad: bool = False,
                 sample_ratio: float = 1.0, shuffle_buffer: int = 1000) -> None:
        self.name = name
        self.manifest = manifest
        self.encoder = encoder
        self.skip_bad = skip_bad
        self.sample_ratio = sample_ratio
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        shard_dir = Path(manifest["_dir"])
        self.shards = [(str(shard_dir / s["file"]), int(s["num_samples"])) for s in manifest["shards"]]
        self.skipped = list(manifest.get("skipped", []))  # left out by the converter

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def collate(self, items):
        return collate_samples(items, pad_id=self.encoder.renderer.pad_id)


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Seeded shuffle buffer: hold ``size`` items, emit a random one for each new item."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


def _raw_samples(urls: Sequence[str]) -> Iterator[dict]:
    from webdataset.tariterators import tarfile_samples

    return tarfile_samples([{"url": u} for u in urls])


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches of one dataset for one rank (split further across workers).

    ``start`` = batches this rank already consumed from the loader. DataLoader hands out worker batches
    round-robin starting with worker 0, so on resume worker ``w`` of ``W`` continues the stream of the
    worker that was due, ``(w + start) % W``, skipping the batches that stream had already produced.
    """

    def __init__(self, ds: ShardDataset, *, batch_size: int, rank: int, world: int, seed: int, start: int = 0) -> None:
        super().__init__()
        self.ds = ds
        self.batch_size = batch_size
        self.rank, self.world, self.seed, self.start = rank, world, seed, start

    # -- the per-slot sample order --------------------------------------------------------------
    def _plan(self, p: int, slot: int, units: int) -> tuple[list[str], Optional[int], int]:
        """Shards to read in pass ``p``, the modulus filter (None = own shards) and the sample count."""
        order = list(range(len(self.ds.shards)))
        random.Random(stable_seed(self.seed, self.ds.name, "shards", p)).shuffle(order)
        if len(order) >= units:
            mine = order[slot::units]
            return [self.ds.shards[i][0] for i in mine], None, sum(self.ds.shards[i][1] for i in mine)
        n = len(self.ds) // units
        return [self.ds.shards[i][0] for i in order], units, n

    def _pass_samples(self, p: int, slot: int, units: int) -> Iterator[dict]:
        urls, modulus, count = self._plan(p, slot, units)
        if modulus is None:
            rng = random.Random(stable_seed(self.seed, self.ds.name, "buffer", p, slot))
            yield from _shuffled(_raw_samples(urls), self.ds.shuffle_buffer, rng)
            return
        rng = random.Random(stable_seed(self.seed, self.ds.name, "buffer", p))
        for pos, sample in enumerate(_shuffled(_raw_samples(urls), self.ds.shuffle_buffer, rng)):
            if pos >= count * units:
                break
            if pos % units == slot:
                yield sample

    def _batches_in_pass(self, p: int, slot: int, units: int) -> int:
        return self._plan(p, slot, units)[2] // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # A fresh DataLoader asks worker 0 first; after `start` batches the next one was due from worker
        # start % W, so worker w takes over the stream that worker (w + start) % W had.
        logical = (worker + self.start) % n_workers
        units, slot = self.world * n_workers, self.rank * n_workers + logical
        skip = max(0, -(-(self.start - logical) // n_workers))
        p, empty_passes = 0, 0
        while True:
            nb = self._batches_in_pass(p, slot, units)
            if nb == 0:
                empty_passes += 1
                if empty_passes > 2 * units + 2:
                    raise DataError(f"dataset {self.ds.name}: {len(self.ds)} samples cannot fill a batch of "
                                    f"{self.batch_size} for each of {units} rank×worker streams")
                p += 1
                continue
            empty_passes = 0
            if skip >= nb:  # whole pass already consumed: no need to read it
                skip -= nb
                p += 1
                continue
            yield from self._emit_pass(p, slot, units, nb, skip)
            skip = 0
            p += 1

    def _emit_pass(self, p: int, slot: int, units: int, nb: int, skip: int) -> Iterator[dict]:
        batch: list = []
        done = 0
        for sample in self._pass_samples(p, slot, units):
            if done >= nb:
                break
            if done < skip:  # only the batch grouping matters while skipping: do not decode
                batch.append(None)
            else:
                batch.append(self._encode(sample, p))
            if len(batch) == self.batch_size:
                if done >= skip:
                    yield self.ds.collate(batch)
                batch = []
                done += 1

    def _encode(self, sample: dict, p: int):
        from ..processors.image import open_image as decode

        rec = Record.from_json(json.loads(sample["json"]))
        where = f"{sample.get('__url__', '?')}: record {rec.index}"
        images = {image_id: sample.get(f"img{k}.jpg") for k, image_id in enumerate(rec.image_ids)}

        def open_image(image_id: str):
            data = images.get(image_id)
            if data is None:
                raise DataError(f"image bytes missing in shard for {image_id!r}")
            return decode(data, what=f"{image_id!r} (shard bytes)")

        try:
            return self.ds.encoder.encode(rec, stable_seed(self.seed, self.ds.name, p, rec.index), open_image, where)
        except DataError as exc:
            if not self.ds.skip_bad:
                raise
            return BadRecord(rec.id, str(exc))
