"""Tokenisation parity: our renderer and training path give the ids the original implementation gave."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sparkles.common.io import atomic_write_json, read_json
from sparkles.tools import parity

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "upstream_tokenization_tiny"  # see its README.md
CASE_LINE = re.compile(r"^((?:inference|training)\[\d+\])\s+(PASS|FAIL)\b")


def run_check(capsys, fixture: Path) -> tuple[int, dict[str, str]]:
    """Exit status and, per case name, its printed line; every case must be printed exactly once."""
    rc = parity.main(["--tokenization", str(fixture)])
    lines: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        m = CASE_LINE.match(line)
        if m:
            assert m.group(1) not in lines, f"case printed twice: {line}"
            lines[m.group(1)] = line
    return rc, lines


def case_names(fixture: Path) -> list[str]:
    expected = read_json(fixture / "expected.json")
    return ([f"inference[{k}]" for k in range(len(expected["inference"]))]
            + [f"training[{k}]" for k in range(len(expected["training"]))])


@pytest.fixture()
def perturbed(tmp_path) -> Path:
    bad = tmp_path / "fixture"
    shutil.copytree(FIXTURE, bad)
    return bad


def test_our_tokenisation_matches_the_original_one_line_per_case(capsys):
    rc, lines = run_check(capsys, FIXTURE)
    assert sorted(lines) == sorted(case_names(FIXTURE))
    assert len(lines) == 9
    assert all(" PASS " in line for line in lines.values()), lines
    assert rc == 0


def test_a_changed_segment_id_fails_naming_the_case_and_position(capsys, perturbed):
    expected = read_json(perturbed / "expected.json")
    piece = expected["inference"][2]["segment_ids"][1]
    was = piece[4]
    piece[4] = was + 1 if was + 1 < expected["meta"]["media_token_id"] else was - 1
    atomic_write_json(perturbed / "expected.json", expected)

    rc, lines = run_check(capsys, perturbed)
    assert rc == 1
    assert sorted(lines) == sorted(case_names(perturbed))
    failed = {name for name, line in lines.items() if " FAIL " in line}
    assert failed == {"inference[2]"}
    assert f"piece 1 token 4: ours {was} " in lines["inference[2]"]
    assert f"expected {piece[4]} " in lines["inference[2]"]


def test_a_changed_label_fails_naming_the_case_and_position(capsys, perturbed):
    expected = read_json(perturbed / "expected.json")
    labels = expected["training"][1]["labels"]
    last = len(labels) - 1  # the end symbol's label
    was = labels[last]
    labels[last] = was - 1
    atomic_write_json(perturbed / "expected.json", expected)

    rc, lines = run_check(capsys, perturbed)
    assert rc == 1
    failed = {name for name, line in lines.items() if " FAIL " in line}
    assert failed == {"training[1]"}
    assert f"label position {last}: ours {was}, expected {was - 1}" in lines["training[1]"]


def test_a_changed_text_id_of_a_training_sample_fails(capsys, perturbed):
    expected = read_json(perturbed / "expected.json")
    ids = expected["training"][0]["input_ids"]
    pos = 2  # in the instruction, before the first image
    was = ids[pos]
    ids[pos] = was + 1
    atomic_write_json(perturbed / "expected.json", expected)

    rc, lines = run_check(capsys, perturbed)
    assert rc == 1
    assert {name for name, line in lines.items() if " FAIL " in line} == {"training[0]"}
    assert f"input position {pos}: ours {was} " in lines["training[0]"]


def test_without_options_both_checks_run_on_the_repository_fixtures(capsys):
    assert parity.main([]) == 0
    out = capsys.readouterr().out
    assert "PARITY OK" in out and "TOKENIZATION OK" in out
    assert sum(bool(CASE_LINE.match(line)) for line in out.splitlines()) == len(case_names(FIXTURE))
