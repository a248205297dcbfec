"""The training data stream: one sub-loader per dataset, mixed by ``sample_ratio`` (upstream semantics).

Every step draws one dataset with probability ∝ ``sample_ratio`` (``random.choices`` seeded by ``seed + rank``,
as upstream, or by ``seed`` alone, so that every rank draws the same one: ``run.mixture_per_rank``) and takes
that dataset's next batch, so every batch comes from a single dataset. Each sub-loader is infinite: a map-style dataset is walked by a DistributedSampler-like index stream (a fresh seeded
permutation per pass, padded to a multiple of the world size, rank ``r`` taking every ``world``-th index,
incomplete batches dropped); a shard dataset streams through :class:`~sparkles.data.shards.ShardStream`.

The state is small and exact: the choice RNG and, per dataset, the number of batches the training loop has
consumed. Restoring it replays the very same batches, whatever the number of loader workers (batches a
worker prefetched but the loop never used are simply produced again).
"""

from __future__ import annotations

import random
from typing import Iterator, Mapping, Optional

import torch

from .base import RecordDataset, stable_seed


class IndexStream:
    """Batches of ``(record_position, sample_seed)`` for one rank, passes without end, from any position."""

    def __init__(self, n: int, *, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, name: str = "",
                 shuffle: bool = True, keys: Optional[list[int]] = None) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.name, self.shuffle = seed, name, shuffle
        # Sample seeds use each record's index in its file (not its position after bad records were left
        # out), the same key the shard stream uses, so both paths augment a record identically.
        self.keys = keys if keys is not None else list(range(n))
        self.per_rank = -(-n // world)  # DistributedSampler pads the permutation to a multiple of world
        self.batches_per_pass = self.per_rank // batch_size
        if self.batches_per_pass == 0:
            raise ValueError(f"dataset {name}: {n} samples give each of {world} rank(s) {self.per_rank}, fewer "
                             f"than batch_size_train={batch_size}")

    def pass_indices(self, p: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(stable_seed(self.seed, self.name, "perm", p))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * (-(-total // self.n)))[:total]
        return order[self.rank::self.world]

    def iter_from(self, start: int) -> Iterator[list[tuple[int, int]]]:
        p, k = divmod(start, self.batches_per_pass)
        while True:
            idx = self.pass_indices(p)
            for b in range(k, self.batches_per_pass):
                chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
                yield [(i, stable_seed(self.seed, self.name, p, self.keys[i])) for i in chunk]
            p, k = p + 1, 0


class _BatchSampler:
    """``IndexStream`` from a start position, in the form DataLoader accepts as ``batch_sampler``."""

    def __init__(self, stream: IndexStream, start: int) -> None:
        self.stream, self.start = stream, start

    def __iter__(self):
        return self.stream.iter_from(self.start)


class SubLoader:
    """One dataset's infinite loader with a resumable position (batches consumed by the training loop)."""

    def __init__(self, dataset, *, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.name = dataset.name
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.position = 0
        self._it: Optional[Iterator] = None
        if isinstance(dataset, RecordDataset):
            self.index_stream = IndexStream(len(dataset), batch_size=batch_size, rank=rank, world=world, seed=seed,
                                            name=dataset.name, keys=[r.index for r in dataset.records.records])

    def _make_iter(self) -> Iterator:
        from torch.utils.data import DataLoader

        # A private generator: creating a loader iterator draws a worker base seed, and drawing it from the
        # global RNG would shift the training RNG stream depending on when (or whether) a loader was resumed.
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, generator=torch.Generator(),
                      collate_fn=None)
        if isinstance(self.dataset, RecordDataset):
            common["collate_fn"] = self.dataset.collate
            loader = DataLoader(self.dataset, batch_sampler=_BatchSampler(self.index_stream, self.position), **common)
        else:
            from .shards import ShardStream

            stream = ShardStream(self.dataset, batch_size=self.batch_size, rank=self.rank, world=self.world,
                                 seed=self.seed, start=self.position)
            common["collate_fn"] = _identity
            loader = DataLoader(stream, batch_size=None, **common)
        return iter(loader)

    def next(self) -> dict:
        if self._it is None:
            self._it = self._make_iter()
        batch = next(self._it)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        self.close()
        self.position = int(state["position"])

    def close(self) -> None:
        self._it = None  # drops the iterator; its workers shut down


def _identity(x):
    return x


class MixtureLoader:
    """Draw a dataset per step (∝ ``sample_ratio``) and return ``(name, batch)`` from its sub-loader."""

    def __init__(self, loaders: Mapping[str, SubLoader], ratios: Mapping[str, float], *, seed: int = 0,
                 rank: int = 0, per_rank: bool = True) -> None:
        self.names = list(loaders)
        self.loaders = dict(loaders)
        self.weights = [float(ratios[n]) for n in self.names]
        if not self.names or sum(self.weights) <= 0 or min(self.weights) < 0:
            raise ValueError(f"mixture needs positive sample ratios, got {dict(zip(self.names, self.weights))}")
        # upstream: a choice stream per rank; per_rank=False: one stream, the same choice on every rank
        self.rng = random.Random(seed + rank if per_rank else seed)
        self.draws = {n: 0 for n in self.names}

    def choose(self) -> str:
        name = self.rng.choices(self.names, weights=self.weights)[0]
        self.draws[name] += 1
        return name

    def next(self) -> tuple[str, dict]:
        name = self.choose()
        return name, self.loaders[name].next()

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": {"version": version, "state": list(internal), "gauss": gauss},
                "loaders": {n: self.loaders[n].state_dict() for n in self.names}, "draws": dict(self.draws)}

    def load_state_dict(self, state: Mapping) -> None:
        rng = state["rng"]
        self.rng.setstate((rng["version"], tuple(rng["state"]), rng["gauss"]))
        missing = [n for n in self.names if n not in state["loaders"]]
        if missing:
            raise KeyError(f"checkpoint has no data position for dataset(s) {missing}; the datasets of a resumed "
                           "run must match the original run")
        for n in self.names:
            self.loaders[n].load_state_dict(state["loaders"][n])
        self.draws.update({n: int(v) for n, v in state.get("draws", {}).items() if n in self.draws})

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()


def build_mixture(datasets: Mapping[str, object], *, batch_size: int, rank: int, world: int, seed: int,
                  num_workers: int = 0, pin_memory: bool = False, per_rank: bool = True) -> MixtureLoader:
    loaders = {name: SubLoader(ds, batch_size=batch_size, rank=rank, world=world, seed=seed,
                               num_workers=num_workers, pin_memory=pin_memory) for name, ds in datasets.items()}
    ratios = {name: ds.sample_ratio for name, ds in datasets.items()}
    return MixtureLoader(loaders, ratios, seed=seed, rank=rank, per_rank=per_rank)
