"""The dataset mixture: ratio-proportional draws, rank sharding, reproducible and resumable positions."""

from __future__ import annotations

import math

import pytest
import torch

import sparkles.data.builders as builders
import sparkles.models  # noqa: F401
from sparkles.common.config import load_config
from sparkles.data.mixture import IndexStream, build_mixture
from test_train_helpers import SPLITS, make_tokenizer, make_world, write_config


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("mix")
    make_world(base / "root", n_per_split=10)
    tok_dir = make_tokenizer(base / "tok")
    cfg = load_config(write_config(base / "cfg.yaml", root=base / "root", tok_dir=tok_dir))
    from sparkles.models.tokenizer import load_tokenizer

    return builders.build_datasets(cfg, root=base / "root", tokenizer=load_tokenizer(tok_dir))


def test_index_stream_is_a_distributed_sampler_without_end():
    n, world, bs = 10, 3, 2
    streams = [IndexStream(n, batch_size=bs, rank=r, world=world, seed=5, name="d") for r in range(world)]
    assert streams[0].batches_per_pass == 2  # ceil(10/3)=4 per rank → 2 batches of 2
    for p in range(3):
        per_rank = [s.pass_indices(p) for s in streams]
        assert set().union(*map(set, per_rank)) == set(range(n))
        assert sum(map(len, per_rank)) == 12  # padded by wrapping, like DistributedSampler
    assert streams[0].pass_indices(0) != streams[0].pass_indices(1)  # a new permutation per pass
    again = IndexStream(n, batch_size=bs, rank=0, world=world, seed=5, name="d")
    it = again.iter_from(0)
    first = [next(it) for _ in range(5)]
    assert first[3:] == [next(again.iter_from(3)), next(again.iter_from(4))]  # any start position
    assert first[0] != next(IndexStream(n, batch_size=bs, rank=0, world=world, seed=6, name="d").iter_from(0))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        IndexStream(3, batch_size=3, rank=0, world=2, name="tiny")


def test_draw_frequencies_follow_sample_ratios(datasets):
    mix = build_mixture(datasets, batch_size=2, rank=0, world=1, seed=1)
    n = 15000
    counts = {name: 0 for name in datasets}
    for _ in range(n):
        counts[mix.choose()] += 1
    total_ratio = sum(ds.sample_ratio for ds in datasets.values())
    for name, ds in datasets.items():
        p = ds.sample_ratio / total_ratio
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[name] / n - p) < 5 * sigma, (name, counts[name] / n, p)
    other_rank = build_mixture(datasets, batch_size=2, rank=1, world=2, seed=1)
    assert [other_rank.choose() for _ in range(30)] != [build_mixture(datasets, batch_size=2, rank=0, world=2,
                                                                       seed=1).choose() for _ in range(30)]


def test_a_shared_choice_draws_the_same_dataset_on_every_rank_from_disjoint_shards(datasets):
    ranks = [build_mixture(datasets, batch_size=2, rank=r, world=2, seed=1, per_rank=False) for r in range(2)]
    steps = [[mix.next() for _ in range(40)] for mix in ranks]
    names = [[name for name, _ in s] for s in steps]
    assert names[0] == names[1] and len(set(names[0])) > 1  # the same draw each step, not one dataset throughout
    for (_, a), (_, b) in zip(*steps):
        assert not set(a["ids"]) & set(b["ids"])
    total_ratio = sum(ds.sample_ratio for ds in datasets.values())
    per_rank = build_mixture(datasets, batch_size=2, rank=1, world=2, seed=1)
    shared = build_mixture(datasets, batch_size=2, rank=1, world=2, seed=1, per_rank=False)
    n = 15000
    for mix in (per_rank, shared):  # sharing the draw keeps each dataset's share of the steps
        counts = {name: 0 for name in datasets}
        for _ in range(n):
            counts[mix.choose()] += 1
        for name, ds in datasets.items():
            p = ds.sample_ratio / total_ratio
            assert abs(counts[name] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (name, counts[name] / n, p)


def test_each_batch_comes_from_the_drawn_dataset_and_ranks_are_disjoint(datasets):
    name = next(iter(SPLITS))
    seen = []
    for rank in range(2):
        mix = build_mixture({name: datasets[name]}, batch_size=5, rank=rank, world=2, seed=3)
        drawn, batch = mix.next()
        assert drawn == name and all(i.startswith(name + "/") for i in batch["ids"])
        seen.append(set(batch["ids"]))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10  # one pass over 10 records, split in two


def test_state_restores_the_exact_stream_whatever_the_worker_count(datasets):
    a = build_mixture(datasets, batch_size=3, rank=0, world=1, seed=11)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(6)]
    b = build_mixture(datasets, batch_size=3, rank=0, world=1, seed=11, num_workers=2)
    b.load_state_dict(state)
    try:
        got = [b.next() for _ in range(6)]
    finally:
        b.close()
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (_, x), (_, y) in zip(got, expected):
        assert x["ids"] == y["ids"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["images"], y["images"])
    assert b.state_dict()["loaders"] == a.state_dict()["loaders"]
