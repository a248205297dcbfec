"""Shared test fixtures: the upstream parity fixture, a tiny random SparklesChat, the CI-sized run.sh run."""

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


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory):
    """BISON / NLVR2 / SparklesEval files and a tiny model config under a fresh root (tests/eval_world.py)."""
    from eval_world import build_world

    return build_world(tmp_path_factory.mktemp("sparkles_root"))


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """``bash run.sh`` on the CI-sized world (preset ci): ``(output folder, finished process)``. Slow: the
    end-to-end tests share this one run."""
    import os
    import subprocess

    out = tmp_path_factory.mktemp("run_sh") / "tiny"
    # 200 warm-up and dialogue steps: fewer leave a model that answers "IMAGE" without a label (the browser test)
    env = dict(os.environ, SPARKLES_OUT=str(out), SPARKLES_PRESET="ci", SKIP_INSTALL="1", CI_ITERS="200",
               PYTHON=os.environ.get("PYTHON", "python"))
    proc = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture
def api_env(monkeypatch):
    """A dummy API key and no distributed, Azure or root variables: judges reach only a local server."""
    from eval_world import set_api_env

    return set_api_env(monkeypatch)


@pytest.fixture(autouse=True)
def _sparkles_logger_propagates():
    """Entry points run in-process (train.main) point the ``sparkles`` logger at stderr and stop it propagating;
    undo that after each test so that later tests' ``caplog`` still sees the package's records."""
    import logging

    yield
    logger = logging.getLogger("sparkles")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
