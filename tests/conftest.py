"""Shared test fixtures: the upstream parity fixture and a tiny random SparklesChat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def parity_fixture_dir() -> Path:
    """The shared upstream parity fixture (``../shared/fixtures/upstream_parity_tiny`` beside the checkout)."""
    env = os.environ.get("SPARKLES_PARITY_FIXTURE")
    return Path(env) if env else REPO.parent / "shared" / "fixtures" / "upstream_parity_tiny"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    path = parity_fixture_dir()
    if not (path / "expected.pt").is_file():
        pytest.skip(f"parity fixture not found at {path} (set SPARKLES_PARITY_FIXTURE)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SparklesChat whose outputs depend on its inputs (weights drawn with std 0.3)."""
    from sparkles.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0, init_std=0.3).eval()
