"""Data that cannot be lost: the world generator and the dialogue pipeline never overwrite or delete what they did
not write, two generation runs never interleave, a reader never rewrites a log being written, and a spending cap
stops GPT calls before it would be passed (against a local OpenAI-compatible server, real HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparkles.dialogue_gen import cli
from sparkles.testing.openai_server import OpenAICompatServer, Reply
from sparkles.tinyworld import main as world_main
from test_dialogue_generation import DUMMY_KEY, build_cc_root, cc_argv, good_cc_reply

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "ci", "--num-train", "12", "--num-bison", "2", "--num-nlvr2", "2", "--num-sparkleseval", "2",
         "--no-tokenizer", "--num-i4", "0", "--workers", "1", "--quiet"]
CAPTION_IMAGES = "data/cc_sbu_align/image"


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> list[str]:
    return json.loads((root / "world" / "manifest.json").read_text())["files"]


# --------------------------------------------------------------------------------------------- the world
def released_root(root: Path) -> Path:
    """A few files of a real Sparkles root, where the world would write."""
    ann = root / "data/SparklesDialogueCC/annotations"
    ann.mkdir(parents=True)
    (ann / "SparklesDialogueCC.json").write_text('[{"dialogue": "released"}]')
    (ann / "SparklesDialogueCC_turn1_1img.json").write_text('[{"answer": "released"}]')
    (root / CAPTION_IMAGES).mkdir(parents=True)
    (root / CAPTION_IMAGES / "2437.jpg").write_bytes(b"\xff\xd8 a real photograph")
    (root / "data/cc_sbu_align/filter_cap.json").write_text('{"annotations": []}')
    return root


def test_the_world_refuses_a_folder_with_data_it_did_not_write(tmp_path, capsys):
    root = released_root(tmp_path / "Sparkles")
    before = files_of(root)
    for extra in ([], ["--force"]):
        assert world_main(["--out", str(root), "--seed", "1", *SMALL, *extra]) == 2
        err = capsys.readouterr().err
        assert "did not write" in err and "SparklesDialogueCC.json" in err, err
        assert files_of(root) == before, "nothing is written, nothing deleted"
    # any unrelated file makes a folder without a world off limits, not only files at the world's paths
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("mine")
    assert world_main(["--out", str(other), "--seed", "1", *SMALL]) == 2
    assert "README.txt" in capsys.readouterr().err and files_of(other) == {"README.txt": b"mine"}


def test_replacing_a_world_deletes_only_files_it_wrote(tmp_path):
    root = tmp_path / "world"
    assert world_main(["--out", str(root), "--seed", "1", *SMALL]) == 0
    listed = manifest(root)
    assert listed == sorted(listed) and set(listed) == set(files_of(root)) - {"world/manifest.json"}
    assert "world/generation_report.json" in listed and any(f.startswith(CAPTION_IMAGES) for f in listed)

    # the user's own files beside the world's (same folders, same kind of names) survive a replacement
    mine = {f"{CAPTION_IMAGES}/999999.jpg": b"my own picture", "data/SparklesDialogueCC/images/mine.jpg": b"mine",
            "models/sparkleschat_tiny/checkpoint_last.pth": b"a trained model"}
    for rel, data in mine.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    assert world_main(["--out", str(root), "--seed", "2", "--force", *SMALL]) == 0
    after = files_of(root)
    assert all(after[rel] == data for rel, data in mine.items())
    listed = manifest(root)
    assert set(listed) == set(after) - {"world/manifest.json"} - set(mine), "every other file is the new world's"

    # a world file that is not the generator's makes the folder someone else's: refused even with --force
    (root / "world/manifest.json").unlink()
    (root / "world/scenes.json").write_text('{"scenes": "not a world file"}')
    assert world_main(["--out", str(root), "--seed", "3", "--force", *SMALL]) == 2


def test_a_world_written_before_manifests_and_a_half_written_one_are_still_the_generators(tmp_path):
    root = tmp_path / "world"
    assert world_main(["--out", str(root), "--seed", "1", *SMALL]) == 0
    first = set(manifest(root))
    # written before the manifest existed: what the world file describes is the generator's
    (root / "world/manifest.json").unlink()
    (root / CAPTION_IMAGES / "999999.jpg").write_bytes(b"my own picture")
    assert world_main(["--out", str(root), "--seed", "1", "--force", *SMALL]) == 0
    assert set(manifest(root)) == first and (root / CAPTION_IMAGES / "999999.jpg").read_bytes() == b"my own picture"
    # killed before the world file was written: the manifest says whose the files are, and no --force is needed
    (root / "world/scenes.json").unlink()
    assert world_main(["--out", str(root), "--seed", "1", *SMALL]) == 0
    assert set(manifest(root)) == first


# --------------------------------------------------------------------------------------------- dialogue export
@pytest.fixture()
def api(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_ORGANIZATION", "OPENAI_API_VERSION", "SPARKLES_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    with OpenAICompatServer(good_cc_reply) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        yield srv


def test_export_refuses_to_overwrite_released_annotations_unless_forced(tmp_path, api, capsys):
    root = build_cc_root(tmp_path / "root")
    ann = root / "data/SparklesDialogueCC/annotations"
    (ann / "SparklesDialogueCC.json").write_text('[{"released": true}]')
    (ann / "SparklesDialogueCC_turn2_9img.json").write_text('[{"released": true}]')
    before = files_of(ann)
    for extra in ([], ["--step", "export"]):
        assert cli.main(cc_argv(root, 2, "--output_dir", str(ann), *extra)) == 2
        err = capsys.readouterr().err
        assert "SparklesDialogueCC.json" in err and "SparklesDialogueCC_turn2_9img.json" in err and "--force" in err
        assert all(files_of(ann)[f] == data for f, data in before.items()) and api.request_count == 0
        assert not [f for f in files_of(ann) if f.startswith("SparklesDialogueCC") and f not in before]

    assert cli.main(cc_argv(root, 2, "--output_dir", str(ann), "--force")) == 0
    records = json.loads((ann / "SparklesDialogueCC.json").read_text())
    assert len(records) == 6 and all("raw" in r for r in records)
    owned = json.loads((ann / "SparklesDialogueCC_files.json").read_text())["files"]
    assert "SparklesDialogueCC.json" in owned and "SparklesDialogueCC_turn2_9img.json" in owned
    # the seeds of the demos were never the pipeline's to write
    assert not any("50demo" in f for f in owned)
    assert all(files_of(ann)[f] == before[f] for f in before if "50demo" in f)
    # once written by generation, the files are its own: a second run needs no --force
    assert cli.main(cc_argv(root, 3, "--output_dir", str(ann))) == 0


def test_two_runs_on_one_output_folder_cannot_interleave(tmp_path, api, capsys):
    root = build_cc_root(tmp_path / "root")
    out = root / "data/SparklesDialogueCC/generated"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom sparkles.dialogue_gen.pipeline import generation_lock\n"
         "with generation_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n", str(out)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--step", "export"]):
            assert cli.main(cc_argv(root, 2, *extra)) == 2
            err = capsys.readouterr().err
            assert "in use by another generation run" in err and f"pid {holder.pid} " in err, err
        assert api.request_count == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert cli.main(cc_argv(root, 2)) == 0 and api.request_count == 2  # the lock ends with its holder


def test_a_reader_never_rewrites_a_log_another_process_is_writing(tmp_path, api):
    root = build_cc_root(tmp_path / "root")
    assert cli.main(cc_argv(root, 1)) == 0
    log = root / "data/SparklesDialogueCC/generated/SparklesDialogueCC_raw.jsonl"
    record = json.loads(log.read_text())
    line = json.dumps({**record, "case_id": "CC-00001"}) + "\n"
    # Another process is appending a record: half of its line is written when the export reads the log.
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys\nhalf, rest = sys.argv[2], sys.argv[3]\n"
         "with open(sys.argv[1], 'a', encoding='utf-8') as f:\n"
         "    f.write(half); f.flush(); print('half', flush=True); sys.stdin.read(); f.write(rest)\n",
         str(log), line[:100], line[100:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "half"
        assert cli.main(cc_argv(root, 1, "--step", "export")) == 0
    finally:
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == ["CC-00000", "CC-00001"], "the writer's line is whole"


# --------------------------------------------------------------------------------------------- spending cap
def test_a_spending_cap_stops_calls_before_it_would_be_passed(tmp_path, api, capsys):
    """Answers are priced at $1 a token, so a call of max_tokens=10 is estimated (and billed) at $10."""
    root = build_cc_root(tmp_path / "root")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4": {"input_per_1m": 0, "output_per_1m": 1_000_000}}))
    api.set_reply(lambda request: Reply(good_cc_reply(request), usage={"prompt_tokens": 7, "completion_tokens": 10}))
    argv = cc_argv(root, 6, "--max_tokens", "10", "--price_table", str(prices), "--concurrency", "2")

    assert cli.main(argv + ["--max_usd", "35"]) == 1
    out, err = capsys.readouterr()
    assert "planned: 6 GPT call(s) to gpt-4 x ~$10.0000 each" in out and "= ~$60.0000" in out
    assert out.index("planned:") < out.index("calls:")
    assert api.request_count == 3, "a fourth call would have passed $35"
    assert "spending cap $35.00 reached: 3 call(s) not made" in err
    summary = json.loads((root / "data/SparklesDialogueCC/generated/SparklesDialogueCC_summary.json").read_text())
    assert summary["spending"] == {"planned_cost_usd": 60.0, "max_usd": 35.0, "calls_not_made": 3}
    assert summary["cost_usd"]["this_run"] == pytest.approx(30.0)

    # a higher cap makes only the calls not made yet
    assert cli.main(argv + ["--max_usd", "100"]) == 0
    assert "planned: 3 GPT call(s)" in capsys.readouterr().out and api.request_count == 6
    # a model without a price cannot be capped: refused before any call
    assert cli.main(cc_argv(root, 8, "--model", "unpriced-model", "--max_usd", "5")) == 2
    assert "needs a price" in capsys.readouterr().err and api.request_count == 6
