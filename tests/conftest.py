"""Shared test fixtures: the upstream parity fixture and a tiny random SparklesChat."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


PARITY_FIXTURE = REPO / "tests" / "fixtures" / "upstream_parity_tiny"  # see its README.md


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The original implementation's outputs on tiny weights in the original formats."""
    assert (PARITY_FIXTURE / "expected.pt").is_file(), f"parity fixture missing: {PARITY_FIXTURE}"
    return PARITY_FIXTURE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SparklesChat whose outputs depend on its inputs (weights drawn with std 0.3)."""
    from sparkles.testing.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0, init_std=0.3).eval()
