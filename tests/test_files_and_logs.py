"""What a user sees of files and logs: written files get ordinary permissions, every long step shows a progress bar
on a terminal, and an evaluation of a deliberate slice does not warn about the items it did not ask for.

Progress bars switch themselves off when stderr is not a terminal, so the bar tests give the step a stderr that
says it is one (a text buffer whose ``isatty()`` is true) and read what was drawn on it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import sys
from pathlib import Path

from eval_world import N, judge_reply
from sparkles.common.io import atomic_write, atomic_write_json
from sparkles.common.logging import progress_bar
from sparkles.eval.cli import run as eval_run
from sparkles.testing.openai_server import OpenAICompatServer


class Terminal(io.StringIO):
    """A stderr that reports being a terminal."""

    def isatty(self) -> bool:
        return True


def terminal(monkeypatch) -> Terminal:
    """Make stderr a :class:`Terminal` for the rest of the test. Called in the test body: pytest's capture sets
    ``sys.stderr`` again when the test's call begins, so a fixture's replacement would not last."""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    return term


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def eval_args(eval_world, dataset: str, name: str, *extra: str) -> list[str]:
    return ["--sparkles_root", str(eval_world["root"]), "--cfg-path", str(eval_world["cfg"]), "--dataset", dataset,
            "--model-name", name, "--max-new-tokens", "8", *extra]


# ------------------------------------------------------------------------------------------------ permissions
def test_written_files_get_the_mode_of_a_plain_open_and_keep_an_existing_files_mode(tmp_path):
    saved = os.umask(0o027)
    try:
        written = atomic_write(tmp_path / "a.txt", "new")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("plain")
        assert mode(written) == mode(tmp_path / "plain.txt") == 0o640
        os.umask(0o002)
        assert mode(atomic_write_json(tmp_path / "b.json", {"x": 1})) == 0o664
        # Replacing a file keeps its mode, whatever the umask: private stays private, a script stays executable.
        os.chmod(written, 0o600)
        atomic_write(written, "again")
        assert mode(written) == 0o600 and written.read_text() == "again"
        script = atomic_write(tmp_path / "run.sh", "#!/bin/sh\n")
        os.chmod(script, 0o755)
        atomic_write(script, lambda f: f.write(b"#!/bin/sh\necho hi\n"))
        assert mode(script) == 0o755
    finally:
        os.umask(saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "plain.txt", "run.sh"]  # no temp files


# ------------------------------------------------------------------------------------------------ progress bars
def test_the_progress_bar_draws_on_a_terminal_only(monkeypatch):
    term = terminal(monkeypatch)
    assert sum(progress_bar(range(3), desc="counting", unit="thing")) == 3
    assert re.search(r"counting: 100%.*3/3", term.getvalue())
    quiet = terminal(monkeypatch)
    assert sum(progress_bar(range(3), desc="counting", enabled=False)) == 3
    log_file = io.StringIO()  # a log file or a pipe: a redrawn line would only fill it
    monkeypatch.setattr(sys, "stderr", log_file)
    bar = progress_bar(total=2, desc="counting")
    bar.update(2)
    bar.close()
    assert quiet.getvalue() == log_file.getvalue() == ""


def test_evaluation_shows_bars_for_answering_and_judging(eval_world, api_env, monkeypatch, tmp_path):
    term = terminal(monkeypatch)
    eval_run(eval_args(eval_world, "BISON", "bars", "--inference"))
    assert re.search(rf"BISON answers:\s+\d+%.*/{N}", term.getvalue())
    with OpenAICompatServer(judge_reply) as srv:
        api_env.setenv("OPENAI_BASE_URL", srv.base_url)
        eval_run(["--sparkles_root", str(eval_world["root"]), "--dataset", "SparklesEval", "--model-name", "bars-ref",
                  "--inference", "--gpt-cache", str(tmp_path / "cache.sqlite")])
    assert re.search(rf"judge gpt-4:\s+\d+%.*/{N}", term.getvalue())


def test_statistics_show_a_bar_over_their_steps(tmp_path, monkeypatch):
    term = terminal(monkeypatch)
    from test_statistics import tiny_dialogues

    from sparkles.stats import statistics

    statistics.compute_statistics(tiny_dialogues(), tmp_path, "sample", verb_noun=False, formats=("png",),
                                  progress=True)
    assert re.search(r"statistics sample: 100%.*4/4", term.getvalue())
    quiet = terminal(monkeypatch)
    statistics.compute_statistics(tiny_dialogues(), tmp_path, "quiet", verb_noun=False, formats=("png",))
    assert quiet.getvalue() == "" and (tmp_path / "statistics_quiet.json").is_file()


def test_shard_writing_shows_a_bar(tmp_path, monkeypatch):
    term = terminal(monkeypatch)
    from test_train_helpers import make_tokenizer, make_world, write_config

    from sparkles.data import wds

    root = tmp_path / "root"
    make_world(root, n_per_split=5)
    name = "SparklesDialogueCC_turn1_2img"
    cfg = write_config(tmp_path / "cfg.yaml", root=root, tok_dir=make_tokenizer(tmp_path / "tok"), datasets={name: {}})
    assert wds.main(["--cfg-path", str(cfg), "--out", str(root / "shards")]) == 0
    assert re.search(rf"shards {name}: 100%.*5/5", term.getvalue())


def test_dialogue_generation_shows_a_bar(tmp_path, monkeypatch):
    from test_dialogue_generation import build_cc_root, good_cc_reply

    from sparkles.dialogue_gen import cli

    for var in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_ORGANIZATION", "OPENAI_API_VERSION", "SPARKLES_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-DUMMYKEY0123456789abcdef")
    root = build_cc_root(tmp_path / "root")
    with OpenAICompatServer(good_cc_reply) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        term = terminal(monkeypatch)
        assert cli.main(["--subset", "CC", "--case_num", "2", "--seed", "0", "--sparkles_root", str(root),
                         "--concurrency", "1", "--backoff_base", "0.01", "--timeout", "5"]) == 0
    assert re.search(r"GPT calls \(CC\): 100%.*2/2", term.getvalue())


# ------------------------------------------------------------------------------------------------ slice warning
def _coverage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "outside every shard range" in r.getMessage()]


def test_a_deliberate_slice_merges_without_a_coverage_warning(eval_world, api_env, caplog):
    caplog.set_level(logging.INFO, logger="sparkles")
    report = eval_run(eval_args(eval_world, "BISON", "slice", "--no-progress", "--inference", "--merge-results",
                                "--data-from", "0", "--data-to", "3"))
    assert _coverage_warnings(caplog) == []
    assert f"merging the slice [0, 3) of {N} annotation items (the other {N - 3} were not asked for)" in caplog.text
    merged = report.merged
    assert merged["complete"] and merged["total"] == 3 and merged["not_covered"] == 0
    assert merged["slice"] == [0, 3] and merged["outside_slice"] == N - 3
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dataset"))
    import visualize_data_in_html as viz_cli

    header = viz_cli.metrics_summary(merged, "BISON_slice_metrics.json")
    assert header["complete"] == f"yes (the slice [0, 3) asked for; {N - 3} other items not asked for)"
    # what the run wrote has the permissions of a plain open
    expected = 0o666 & ~current_umask()
    written = [report.result_path, report.result_path.with_suffix(".html"),
               *report.result_path.parent.glob("BISON_slice_metrics.json"), *report.run_dir.glob("*.json")]
    assert len(written) == 5 and {mode(p) for p in written} == {expected}


def test_shards_that_leave_a_hole_still_warn(eval_world, api_env, caplog):
    for lo, hi in ((0, 2), (4, N)):
        eval_run(eval_args(eval_world, "NLVR2", "holes", "--no-progress", "--inference", "--data-from", str(lo),
                           "--data-to", str(hi)))
    caplog.set_level(logging.INFO, logger="sparkles")
    whole = eval_run(eval_args(eval_world, "NLVR2", "holes", "--no-progress", "--merge-results"))
    assert _coverage_warnings(caplog) == [f"2 of {N} annotation items are outside every shard range: [[2, 4]]"]
    assert not whole.merged["complete"] and whole.merged["not_covered_ranges"] == [[2, 4]]
    assert "slice" not in whole.merged
    caplog.clear()
    part = eval_run(eval_args(eval_world, "NLVR2", "holes", "--no-progress", "--merge-results", "--data-to", "3"))
    assert _coverage_warnings(caplog) == ["1 of 3 items of the slice [0, 3) are outside every shard range: [[2, 3]]"]
    assert (f"merging the slice [0, 3) of {N} annotation items (the other {N - 3} were not asked for); 2 finished "
            "item(s) outside it are merged too") in caplog.text
    assert not part.merged["complete"] and part.merged["outside_slice"] == N - 3
    metrics = json.loads(part.result_path.with_name("NLVR2_holes_metrics.json").read_text())
    assert metrics["not_covered_ranges"] == [[2, 3]]


# ------------------------------------------------------------------------------------------------ truncation notes
def test_the_q_formers_designed_cut_of_a_benchmark_prompt_is_a_note_not_a_warning(tmp_path, monkeypatch, caplog):
    """The tiny preset's Q-Former reads a message's first 64 tokens by design (its BISON/NLVR2 prompts run to ~100;
    the caption or statement ends well before 64): every evaluation and training process used to print a
    warning for it. The cut is noted once at INFO; the decoder reads the whole prompt."""
    from test_train_helpers import make_tokenizer

    import sparkles.models.qformer as qformer
    from sparkles.eval.benchmarks import bison, nlvr2
    from sparkles.conversation.template import IMAGE_MARKER
    from sparkles.models.tokenizer import load_tokenizer

    monkeypatch.setattr(qformer, "_warned_truncation", False)
    caplog.set_level(logging.INFO, logger="sparkles")
    tokenizer = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    prompts = [p.replace(IMAGE_MARKER, "") for p in (bison.prompt("a red square and a blue circle"),
                                                     nlvr2.prompt("The left image contains two red squares."))]
    assert all(len(tokenizer(p, add_special_tokens=False)["input_ids"]) > 64 for p in prompts)
    ids, mask = qformer.tokenize_instructions(tokenizer, prompts, 64)
    assert ids.shape == (2, 64) and int(mask.sum()) == 128
    qformer.tokenize_instructions(tokenizer, prompts, 64)
    notes = [r for r in caplog.records if "cut to the Q-Former's first 64" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.INFO]  # once per process
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
