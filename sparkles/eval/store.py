"""Result storage for evaluation runs: atomic JSON files, shard files and the run manifest.

One run (a dataset × model name) owns a directory ``<root>/evaluation/<dataset>/results/<dataset>_<model>/``:

- ``<dataset>_<model>_<from>to<to>.json`` — one shard: a JSON list of finished result items in the upstream
  schema, rewritten atomically (temporary file + rename) after every finished item, so a crash loses at
  most the item in progress;
- ``manifest.json`` — the run's identity (dataset, model name, settings) and every shard with its range,
  status and counts. Several shard processes update it, serialised by an advisory lock on
  ``manifest.lock``.

Nothing here deletes a file; merged outputs are written next to the run directory by :mod:`.merge`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from ..common.io import atomic_write_json, read_json


class ManifestError(RuntimeError):
    """The run directory belongs to a different configuration, or its manifest is unreadable."""


def eid_key(value: Any) -> Any:
    """A sortable, comparable form of an ``evaluation_id`` (int when numeric, as upstream's ``int()``)."""
    try:
        return (0, int(value), "")
    except (TypeError, ValueError):
        return (1, 0, str(value))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: single-process use only
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class RunDir:
    """The directory of one evaluation run and its manifest (see the module docstring)."""

    MANIFEST = "manifest.json"
    LOCK = "manifest.lock"

    def __init__(self, results_dir: str | os.PathLike, dataset: str, model_name: str) -> None:
        self.results_dir = Path(results_dir)
        self.dataset = dataset
        self.model_name = model_name
        self.base = f"{dataset}_{model_name}"
        self.path = self.results_dir / self.base

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    def shard_path(self, start: int, stop: int) -> Path:
        return self.path / f"{self.base}_{start}to{stop}.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise ManifestError(f"no evaluation run at {self.path} (manifest.json missing): run with --inference "
                                "first, with the same --cfg-path / --num-beams / --protocol / --model-name")
        return read_json(self.manifest_path, what="run manifest")

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict]:
        with _locked(self.path / self.LOCK):
            data = read_json(self.manifest_path, what="run manifest") if self.manifest_path.is_file() else None
            box = {"data": data}
            yield box
            if box["data"] is not None:
                atomic_write_json(self.manifest_path, box["data"])

    def register_shard(self, *, start: int, stop: int, settings: Mapping[str, Any], annotation_file: str,
                       num_annotations: int, planned: Optional[tuple[int, int]] = None) -> None:
        """Create the manifest or check it matches ``settings``; mark the shard ``running``.

        ``planned``: the whole slice this shard is part of (with ``--shard I/N`` or torchrun), so that a
        merge notices sibling shards that never started.
        """
        with self._update() as box:
            data = box["data"]
            if data is None:
                data = {"dataset": self.dataset, "model_name": self.model_name, "settings": dict(settings),
                        "annotation_file": annotation_file, "num_annotations": num_annotations,
                        "created": _now(), "shards": []}
            else:
                _check_same(data, self.dataset, self.model_name, settings, self.path)
                data["num_annotations"] = num_annotations
            shards = [s for s in data["shards"] if not (s["from"] == start and s["to"] == stop)]
            previous = next((s for s in data["shards"] if s["from"] == start and s["to"] == stop), {})
            shards.append({**previous, "file": self.shard_path(start, stop).name, "from": start, "to": stop,
                           "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
                           "updated": _now()})
            data["shards"] = sorted(shards, key=lambda s: (s["from"], s["to"]))
            plans = data.setdefault("planned", [])
            if planned is not None and list(planned) not in plans:
                plans.append(list(planned))
            box["data"] = data

    def update_shard(self, start: int, stop: int, **fields: Any) -> None:
        with self._update() as box:
            data = box["data"]
            if data is None:
                return
            for shard in data["shards"]:
                if shard["from"] == start and shard["to"] == stop:
                    shard.update(fields, updated=_now())

    def record_judges(self, judges: Mapping[str, Mapping[str, Any]], *, free: tuple[str, ...] = ()) -> None:
        """Remember each judge's settings; a judge re-used with other settings is an error.

        Keys in ``free`` (e.g. the number of attempts) may change between runs without mixing results.
        """
        with self._update() as box:
            data = box["data"]
            known = data.setdefault("judges", {})
            for name, settings in judges.items():
                old = known.get(name)
                fixed = {k: v for k, v in dict(settings).items() if k not in free}
                if old is not None and {k: v for k, v in old.items() if k not in free} != fixed:
                    raise ManifestError(
                        f"{self.path}: judge {name!r} was run with {old}, now {dict(settings)}; its stored "
                        "judgements would mix settings. Use the earlier settings, or another --model-name.")
                known[name] = dict(settings)

    def shard_files(self) -> list[Path]:
        return sorted(self.path.glob(f"{self.base}_*to*.json"))


def _check_same(data: Mapping[str, Any], dataset: str, model_name: str, settings: Mapping[str, Any],
                path: Path) -> None:
    if data.get("dataset") != dataset or data.get("model_name") != model_name:
        raise ManifestError(f"{path}/manifest.json belongs to {data.get('dataset')}/{data.get('model_name')}, "
                            f"not {dataset}/{model_name}")
    old = data.get("settings") or {}
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} → {settings.get(k)!r}" for k in diff)
        raise ManifestError(f"{path} holds results produced with other settings ({details}). Finished items "
                            "would mix settings: choose another --model-name, or move that directory away.")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class ShardFile:
    """One shard's result items, keyed by ``key`` (the evaluation id), rewritten atomically on every change."""

    def __init__(self, path: str | os.PathLike, *, key: str = "evaluation_id") -> None:
        self.path = Path(path)
        self.key = key
        self.items: dict[Any, dict] = {}
        if self.path.is_file():
            data = read_json(self.path, what="shard file")
            if not isinstance(data, list):
                raise ValueError(f"shard file {self.path} must hold a JSON list")
            for item in data:
                self.items[eid_key(item.get(key))] = item

    def __contains__(self, evaluation_id: Any) -> bool:
        return eid_key(evaluation_id) in self.items

    def get(self, evaluation_id: Any) -> Optional[dict]:
        return self.items.get(eid_key(evaluation_id))

    def put(self, item: dict, *, save: bool = True) -> None:
        self.items[eid_key(item.get(self.key))] = item
        if save:
            self.save()

    def save(self) -> None:
        atomic_write_json(self.path, [self.items[k] for k in sorted(self.items)])

    def __len__(self) -> int:
        return len(self.items)
