"""LR schedules: the paper config reproduces upstream's worked values; variants behave as documented."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sparkles.runners.lr_sched import LRSchedule

REPO = Path(__file__).resolve().parents[1]


def upstream_formula(t, *, init=3e-5, lo=1e-5, warm=1e-6, warmup=400, total=2000):
    if t < warmup:
        return min(init, warm + (init - warm) * t / warmup)
    return lo + (init - lo) * 0.5 * (1 + math.cos(math.pi * t / total))


def paper_schedule() -> LRSchedule:
    import sparkles.data.builders  # noqa: F401
    import sparkles.models  # noqa: F401
    from sparkles.common.config import load_config

    cfg = load_config(REPO / "train_configs" / "sparkleschat.yaml")
    return LRSchedule.from_run_config(cfg.run)


@pytest.mark.parametrize("step,expected", [(0, 1.0e-6), (200, 1.55e-5), (399, 2.99275e-5), (400, 2.809017e-5),
                                           (1000, 2.0e-5), (1999, 1.0000012e-5)])
def test_paper_config_gives_upstream_worked_values(step, expected):
    sched = paper_schedule()
    assert sched(step) == pytest.approx(expected, rel=1e-6)
    assert sched(step) == pytest.approx(upstream_formula(step), rel=1e-12)


def test_cosine_after_warmup_is_continuous_and_ends_at_min_lr():
    s = LRSchedule("linear_warmup_cosine_lr", init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=100,
                   iters_per_epoch=200, max_epoch=5, cosine_after_warmup=True)
    assert s(0) == pytest.approx(1e-5)
    assert s(100) == pytest.approx(1e-3)  # no drop at the end of warmup
    assert s(99) < s(100)
    assert s(999) == pytest.approx(1e-4, rel=1e-3)
    assert all(s(t) >= s(t + 1) for t in range(100, 999))


def test_step_and_constant_schedules():
    step = LRSchedule("linear_warmup_step_lr", init_lr=1e-4, min_lr=1e-6, warmup_lr=1e-6, warmup_steps=10,
                      iters_per_epoch=20, max_epoch=5, decay_rate=0.5)
    assert step(0) == pytest.approx(1e-6)
    assert step(15) == pytest.approx(1e-4)  # warmup done, still epoch 0
    assert step(20) == pytest.approx(5e-5) and step(40) == pytest.approx(2.5e-5)
    const = LRSchedule("constant_lr", init_lr=2e-4, min_lr=0, warmup_lr=0, warmup_steps=4, iters_per_epoch=10,
                       max_epoch=2)
    assert const(2) == pytest.approx(1e-4) and const(19) == 2e-4
    with pytest.raises(ValueError, match="lr_decay_rate"):
        LRSchedule("linear_warmup_step_lr", init_lr=1, min_lr=0, warmup_lr=0, warmup_steps=0, iters_per_epoch=1,
                   max_epoch=1)
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule("cosine", init_lr=1, min_lr=0, warmup_lr=0, warmup_steps=0, iters_per_epoch=1, max_epoch=1)
