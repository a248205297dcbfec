"""SparklesDialogue generation: parsing, validation, export, and whole runs against a local OpenAI-compatible
server (real openai client, real HTTP on 127.0.0.1), including a run killed mid-way and resumed."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparkles.dialogue_gen import cli
from sparkles.dialogue_gen.demos import for_display, select_vg_demos
from sparkles.dialogue_gen.export import export_dialogues, turn_samples
from sparkles.dialogue_gen.llava_svit import convert_svit, uniform_question
from sparkles.dialogue_gen.parse import ReplyParseError, parse_reply
from sparkles.dialogue_gen.pipeline import GenerationOptions, plan_cc_cases, run_job
from sparkles.dialogue_gen.schema import IMAGE_SLOT as SLOT
from sparkles.dialogue_gen.validate import Rejected, insert_slots, validate_dialogue
from sparkles.gpt import GPTClient, GPTConfig
from sparkles.testing.openai_server import OpenAICompatServer, Reply

DUMMY_KEY = "sk-test-DUMMYKEY0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]
LONG = " ".join(["detail"] * 120)


# --- fixture builders ------------------------------------------------------------------------------------
def dialogue_record(first_ids, second_id, *, question="Compare", answer=LONG, caption=lambda i: f"caption {i}"):
    refs = " and ".join(f"IMAGE#{i}{SLOT}" for i in first_ids)
    return {"dialogue": [
        {"role": "user", "content": f"{question} {refs} please.",
         "images": [{"image_id": i, "caption": caption(i)} for i in first_ids]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"Now bring IMAGE#{second_id}{SLOT} next to IMAGE#{first_ids[0]}.",
         "images": [{"image_id": second_id, "caption": caption(second_id)}]},
        {"role": "assistant", "content": answer}]}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def build_cc_root(root: Path, n_images: int = 30) -> Path:
    """filter_cap.json with ids 1..n plus the demo images 901..918, and three demo-seed files."""
    anns = [{"image_id": str(i), "caption": f"a scene with object {i}"} for i in range(1, n_images + 1)]
    anns += [{"image_id": str(i), "caption": f"demo picture {i}"} for i in range(901, 919)]
    write_json(root / "data/cc_sbu_align/filter_cap.json", {"annotations": anns})
    ann_dir = root / "data/SparklesDialogueCC/annotations"
    nxt = (str(i) for i in range(901, 919))
    for k in (1, 2, 3):
        seeds = [dialogue_record([next(nxt) for _ in range(k)], next(nxt), question=f"Seed{k} asks") for _ in range(2)]
        write_json(ann_dir / f"SparklesDialogueCC_50demo_img{k}1.json", seeds)
    return root


def candidates_in(prompt: str) -> list:
    blocks = re.findall(r"```json\n(.*?)\n```", prompt, flags=re.S)
    return [c["image_id"] for c in json.loads(blocks[-1])]


def conv(first, second, question="What links"):
    return [
        {"role": "user", "image_ids": list(first),
         "content": f"{question} " + " and ".join(f"IMAGE#{i}" for i in first) + "?"},
        {"role": "assistant", "content": "They share a mood. " + LONG},
        {"role": "user", "image_ids": [second], "content": f"Add IMAGE#{second} to the story of IMAGE#{first[0]}."},
        {"role": "assistant", "content": "Here is the story. " + LONG}]


def cc_conversations(prompt: str) -> list:
    c = candidates_in(prompt)
    return [conv(c[0:1], c[1]), conv(c[2:4], c[4]), conv(c[5:8], c[8])]


def vg_conversations(prompt: str) -> list:
    c = candidates_in(prompt)
    m = {"two": 2, "three": 3}[re.search(r"chooses exactly (\w+) candidate", prompt).group(1)]
    return [conv(c[:m], c[m], question="Plan a day with")]


def prompt_of(request: dict) -> str:
    return request["messages"][-1]["content"]


def good_cc_reply(request: dict) -> str:
    return json.dumps(cc_conversations(prompt_of(request)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_ORGANIZATION", "OPENAI_API_VERSION", "SPARKLES_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)


def cc_argv(root: Path, case_num: int, *extra: str) -> list[str]:
    return ["--subset", "CC", "--case_num", str(case_num), "--seed", "0", "--sparkles_root", str(root),
            "--concurrency", "1", "--no_progress", "--backoff_base", "0.01", "--timeout", "5", *extra]


# --- parsing ---------------------------------------------------------------------------------------------
THREE = [conv(["1"], "2"), conv(["3", "4"], "5"), conv(["6", "7", "8"], "9")]


def test_parse_strict_fenced_python_and_wrapped_replies():
    text = json.dumps(THREE)
    assert parse_reply(text, expected=3).method == "json"
    fenced = parse_reply("Sure! Here they are:\n```json\n" + text + "\n```\nEnjoy.", expected=3)
    assert fenced.method == "fenced_json" and [d for _, d in fenced.dialogues] == THREE
    python = parse_reply(repr(THREE), expected=3)
    assert python.method == "python" and [d for _, d in python.dialogues] == THREE
    wrapped = parse_reply(json.dumps({"dialogues": THREE}))
    assert [d for _, d in wrapped.dialogues] == THREE
    keyed = parse_reply(json.dumps({f"conversation_{i}": c for i, c in enumerate(THREE)}))
    assert [d for _, d in keyed.dialogues] == THREE
    prose = parse_reply("Here are [three] conversations:\n" + json.dumps(THREE)[:-1], expected=3)
    assert prose.method == "salvaged" and [d for _, d in prose.dialogues] == THREE
    single = parse_reply(json.dumps(THREE[0]), expected=1)
    assert [d for _, d in single.dialogues] == [THREE[0]] and not single.notes


def test_parse_truncated_reply_keeps_complete_conversations():
    text = json.dumps(THREE)
    cut = text[: text.index("Add IMAGE#9") + 5]  # cut inside the third conversation
    parsed = parse_reply(cut, expected=3)
    assert parsed.method == "salvaged"
    assert [d for _, d in parsed.dialogues] == THREE[:2]
    assert [(i, reason) for i, reason, _ in parsed.failed] == [(2, "truncated")]


def test_parse_braces_and_unescaped_quotes_inside_content():
    convs = copy.deepcopy(THREE[:2])
    convs[0][1]["content"] = "Use a set {like this] } and } more ] brackets."
    text = json.dumps(convs)
    assert [d for _, d in parse_reply(text).dialogues] == convs  # strict JSON handles braces in strings
    # GPT forgot to escape quotes: not JSON, not Python; recovered message by message
    broken = text.replace("They share a mood.", 'They say "hi {there}" and leave.', 1)
    parsed = parse_reply(broken, expected=2)
    assert parsed.method == "salvaged" and len(parsed.dialogues) == 2
    assert parsed.dialogues[0][1] == convs[0]  # the braces-only conversation is still read as JSON
    assert parsed.dialogues[1][1][1]["content"].startswith('They say "hi {there}" and leave.')
    assert parsed.dialogues[1][1][0]["image_ids"] == ["3", "4"]


def test_parse_regex_fallback_and_failure():
    text = "\n".join([
        "{'role': 'user', 'image_ids': [12, 13], 'content': 'Why do IMAGE#12 and IMAGE#13 feel calm? It's {odd}'},",
        "{'role': 'assistant', 'content': 'Because...'},",
        "{'role': 'user', 'image_ids': [14], 'content': 'And IMAGE#14?'},",
        "{'role': 'assistant', 'content': 'Also calm.'}"])
    parsed = parse_reply(text, expected=1)
    assert parsed.method == "regex"
    (_, msgs), = parsed.dialogues
    assert msgs[0]["image_ids"] == ["12", "13"] and msgs[0]["content"].endswith("It's {odd}")
    with pytest.raises(ReplyParseError):
        parse_reply("I'm sorry, I can't help with that.", expected=3)
    with pytest.raises(ReplyParseError):
        parse_reply("   ")


# --- validation ------------------------------------------------------------------------------------------
def cands(*ids, as_int=False):
    return {str(i): {"image_id": int(i) if as_int else str(i), "caption": f"cap {i}"} for i in ids}


def test_slots_go_after_whole_word_ids_and_images_follow_their_order():
    pool = cands("14", "1417", "5")
    c = conv(["14", "1417"], "5")
    c[0]["content"] = "Is photo 1417 older than IMAGE#14?"  # id written bare, and in reverse order
    ok = validate_dialogue(c, pool, first_turn_images=2)
    first = ok.dialogue[0]
    assert first["content"] == f"Is photo 1417{SLOT} older than IMAGE#14{SLOT}?"
    assert [img["image_id"] for img in first["images"]] == ["1417", "14"]
    assert "image_order_fixed" in ok.warnings
    assert insert_slots("IMAGE#14 and 14 and IMAGE#14", ["14"]) == f"IMAGE#14{SLOT} and 14 and IMAGE#14"
    assert ok.dialogue[2]["images"] == [{"image_id": "5", "caption": "cap 5"}]
    assert set(ok.dialogue[1]) == {"role", "content"}


@pytest.mark.parametrize("mutate,reason", [
    (lambda c: c.pop(), "wrong_message_count"),
    (lambda c: c[1].update(role="user"), "bad_role"),
    (lambda c: c[3].update(content="..."), "empty_content"),
    (lambda c: c[0].pop("image_ids"), "missing_image_ids"),
    (lambda c: c[0].update(image_ids=["1", "1"]), "duplicate_image_id"),
    (lambda c: c[2].update(image_ids=["3", "4"], content="Add IMAGE#3 and IMAGE#4."), "second_turn_image_count"),
    (lambda c: c[2].update(image_ids=["1"], content="Again IMAGE#1."), "second_turn_image_reused"),
    (lambda c: c[0].update(image_ids=["1", "77"], content="IMAGE#1 vs IMAGE#77"), "unknown_image_id"),
    (lambda c: c[0].update(image_ids=["1", "2"], content="Only IMAGE#1 here"), "slot_count_mismatch"),
    (lambda c: c[0].update(image_ids=["1", "2"], content=f"IMAGE#1{SLOT} and IMAGE#2"), "slot_count_mismatch"),
    (lambda c: c[0].update(image_ids=["1", "2"], content=f"IMAGE#1{SLOT} and {SLOT} IMAGE#2"), "slot_id_mismatch"),
])
def test_rejections_name_their_reason(mutate, reason):
    c = conv(["1", "2"], "3")
    mutate(c)
    with pytest.raises(Rejected) as info:
        validate_dialogue(c, cands("1", "2", "3", "4"), first_turn_images=2)
    assert info.value.reason == reason


def test_first_turn_count_is_a_warning_unless_strict_and_ids_keep_their_type():
    c = conv(["101"], "102")
    ok = validate_dialogue(c, cands(101, 102, as_int=True), first_turn_images=2)
    assert ok.warnings == ["first_turn_image_count"]
    assert [img["image_id"] for img in ok.dialogue[0]["images"]] == [101]  # VG ids stay integers
    with pytest.raises(Rejected, match="first_turn_image_count"):
        validate_dialogue(c, cands(101, 102, as_int=True), first_turn_images=2, strict_first_turn=True)


# --- export ----------------------------------------------------------------------------------------------
def test_turn_samples_and_split_files_for_any_image_count(tmp_path):
    small = dialogue_record(["a"], "b")
    big = dialogue_record(["c", "d", "e", "f"], "g")  # 4 + 1 images: upstream's exporter crashed past 4
    t1, t2 = turn_samples(small, 1), turn_samples(small, 2)
    q1, a1, q2, a2 = (m["content"] for m in small["dialogue"])
    assert t1 == {"uniform_question": q1, "instruction": f"###Human: {q1}###Assistant: ", "answer": a1,
                  "tgt_imgs": small["dialogue"][0]["images"]}
    assert t2["instruction"] == f"###Human: {q1}###Assistant: {a1}###Human: {q2}###Assistant: "
    assert t2["answer"] == a2 and [i["image_id"] for i in t2["tgt_imgs"]] == ["a", "b"]
    files = export_dialogues([small, big, small], tmp_path, "SparklesDialogueCC")
    names = sorted(p.name for p in files)
    assert names == ["SparklesDialogueCC.json", "SparklesDialogueCC_turn1_1img.json",
                     "SparklesDialogueCC_turn1_4img.json", "SparklesDialogueCC_turn2_2img.json",
                     "SparklesDialogueCC_turn2_5img.json"]
    assert len(json.loads((tmp_path / "SparklesDialogueCC_turn2_2img.json").read_text())) == 2
    (s5,) = json.loads((tmp_path / "SparklesDialogueCC_turn2_5img.json").read_text())
    assert s5["instruction"].count(SLOT) == len(s5["tgt_imgs"]) == 5
    bad = copy.deepcopy(small)
    bad["dialogue"][2]["images"].append({"image_id": "z", "caption": "z"})
    with pytest.raises(ValueError, match=r"record 1: dialogue\[2\]\.content has 1 image slots but 2 images"):
        export_dialogues([small, bad], tmp_path / "x", "SparklesDialogueCC")


# --- whole runs ------------------------------------------------------------------------------------------
def test_cc_run_end_to_end_with_faults_rejects_and_resume(tmp_path, monkeypatch, capsys):
    root = build_cc_root(tmp_path / "root")
    seeds_before = {p.name: p.read_bytes() for p in (root / "data/SparklesDialogueCC/annotations").glob("*.json")}
    n = {"calls": 0}

    def reply(request):
        n["calls"] += 1
        convs = cc_conversations(prompt_of(request))
        call = n["calls"]
        if call == 1:
            return json.dumps(convs)
        if call == 2:
            return "Here you go:\n```json\n" + json.dumps(convs, indent=1) + "\n```"
        if call == 3:  # first conversation brings two new images in turn 2: upstream let index 0 through
            c = candidates_in(prompt_of(request))
            convs[0][2].update(image_ids=[c[1], c[2]], content=f"Add IMAGE#{c[1]} and IMAGE#{c[2]}.")
            return json.dumps(convs)
        if call in (4, 5):
            return Reply.error(429 if call == 4 else 500)
        if call == 6:  # cut off by max_tokens inside the third conversation
            text = json.dumps(convs)
            return Reply(text[: text.rindex("Here is the story")], finish_reason="length")
        if call == 7:
            convs[1][0]["image_ids"] = ["999999"]  # not a candidate
            return json.dumps(convs)
        return "I cannot help with that."

    with OpenAICompatServer(reply) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        assert cli.main(cc_argv(root, 6)) == 0
        assert srv.request_count == 8  # 6 cases + one 429 + one 500 retried
        out = root / "data/SparklesDialogueCC/generated"
        summary = json.loads((out / "SparklesDialogueCC_summary.json").read_text())
        d = summary["dialogues"]
        assert summary["calls"] == {"planned": 6, "already_done": 0, "new": 6, "failed": 0}
        assert d["accepted"] == 3 + 3 + 2 + 2 + 2 + 0
        assert d["rejected_by_reason"] == {"second_turn_image_count": 1, "truncated": 1, "unknown_image_id": 1,
                                           "unparseable_reply": 1}
        assert d["parse_methods"] == {"json": 3, "fenced_json": 1, "salvaged": 1}
        assert d["notes"]["reply_cut_by_max_tokens"] == 1
        rejects = json.loads((out / "SparklesDialogueCC_rejects.json").read_text())
        assert sorted(r["reason"] for r in rejects) == sorted(d["rejected_by_reason"])
        assert all(r["detail"] for r in rejects)
        records = json.loads((out / "SparklesDialogueCC.json").read_text())
        assert len(records) == 12 and all(set(r) == {"dialogue", "raw"} for r in records)
        used = {img["image_id"] for r in records for m in r["dialogue"] if m["role"] == "user" for img in m["images"]}
        assert all(isinstance(i, str) and int(i) <= 30 for i in used)  # never a demo image, ids stay strings
        by_first = d["accepted_by_first_turn_images"]
        for n_img in (1, 2, 3):
            t1 = json.loads((out / f"SparklesDialogueCC_turn1_{n_img}img.json").read_text())
            t2 = json.loads((out / f"SparklesDialogueCC_turn2_{n_img + 1}img.json").read_text())
            assert len(t1) == len(t2) == by_first[str(n_img)]
            assert all(s["instruction"].count(SLOT) == len(s["tgt_imgs"]) for s in t1 + t2)
        raw = json.loads((out / "SparklesDialogueCC_raw.json").read_text())
        assert len(raw) == 6 and set(raw[0]["raw"][0]) == {"prompt", "response"}
        # cost: the server's token counts, priced at gpt-4's default price
        cost = json.loads((out / "SparklesDialogueCC_cost.json").read_text())
        pt = sum(sum(len(m["content"].split()) for m in b["messages"]) for b in srv.requests[:3] + srv.requests[5:])
        total = cost["all_raw_calls"]["total"]
        assert total["prompt_tokens"] == pt and total["calls"] == 6
        assert total["cost_usd"] == pytest.approx((pt * 30 + total["completion_tokens"] * 60) / 1e6)
        assert cost["this_run"]["total"]["cost_usd"] == pytest.approx(total["cost_usd"])
        printed = capsys.readouterr().out
        assert "12 accepted" in printed and "gpt-4" in printed

        # the same command again: nothing is called twice, and the outputs are the same
        before = (out / "SparklesDialogueCC.json").read_bytes()
        assert cli.main(cc_argv(root, 6)) == 0
        assert srv.request_count == 8
        assert (out / "SparklesDialogueCC.json").read_bytes() == before
        # two more cases: only those are called
        assert cli.main(cc_argv(root, 8)) == 0
        assert srv.request_count == 10
        # raw log lost: the response cache still answers every finished call
        (out / "SparklesDialogueCC_raw.jsonl").unlink()
        assert cli.main(cc_argv(root, 8)) == 0
        assert srv.request_count == 10
        assert len((out / "SparklesDialogueCC_raw.jsonl").read_text().splitlines()) == 8
        # another seed in the same output directory is refused instead of mixed in
        assert cli.main(cc_argv(root, 8)[:5] + ["1"] + cc_argv(root, 8)[6:]) == 2
        assert "different prompt" in capsys.readouterr().err
    # demo seeds are never modified
    assert {p.name: p.read_bytes() for p in (root / "data/SparklesDialogueCC/annotations").glob("*.json")} == seeds_before
    assert DUMMY_KEY not in "".join(p.read_text(errors="replace") for p in out.glob("*.json*"))


def test_cc_prompts_show_deep_copied_demos_and_only_pool_candidates(tmp_path):
    from sparkles.dialogue_gen.pipeline import load_cc_inputs

    root = build_cc_root(tmp_path / "root")
    seeds, pool = load_cc_inputs(GenerationOptions(sparkles_root=str(root)))
    frozen = copy.deepcopy(seeds)
    cases = plan_cc_cases(seeds, pool, case_num=5, seed=3)
    assert seeds == frozen  # showing a demo never changes it
    again = plan_cc_cases(seeds, pool, case_num=7, seed=3)
    assert [c.prompt for c in again[:5]] == [c.prompt for c in cases]  # deterministic, extendable
    for case in cases:
        ids = candidates_in(case.prompt)
        assert len(ids) == 9 == len(set(ids)) and all(int(i) <= 30 for i in ids)
        demos = json.loads(re.findall(r"```json\n(.*?)\n```", case.prompt, flags=re.S)[0])
        assert len(demos) == 3 and all(len(d) == 4 for d in demos)
        assert [len(d[0]["image_ids"]) for d in demos] == [1, 2, 3]
        assert all(d[3]["content"] == "..." and d[1]["content"] != "..." for d in demos)
        assert SLOT not in case.prompt
    shown = for_display(seeds[1][0])
    assert list(shown[0]) == ["role", "image_ids", "content"]


def test_killed_run_resumes_without_repeating_finished_calls(tmp_path, monkeypatch):
    """A real process, killed with SIGKILL while a call is in flight, then the same command again."""
    root = build_cc_root(tmp_path / "root")
    out = root / "data/SparklesDialogueCC/generated"
    log = out / "SparklesDialogueCC_raw.jsonl"
    served = {"n": 0}

    def first_run(request):
        served["n"] += 1
        if served["n"] <= 3:
            return good_cc_reply(request)
        return Reply(good_cc_reply(request), delay=30)  # hangs until the process is killed

    with OpenAICompatServer(first_run) as srv:
        env = {**os.environ, "OPENAI_API_KEY": DUMMY_KEY, "OPENAI_BASE_URL": srv.base_url,
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, "dataset/generate_SparklesDialogue.py", *cc_argv(root, 6)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while srv.request_count < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.kill()
        stderr = proc.communicate(timeout=10)[1].decode()
        assert srv.request_count == 4, stderr
        finished = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["case_id"] for r in finished] == ["CC-00000", "CC-00001", "CC-00002"]
        finished_prompts = {r["prompt"] for r in finished}

        srv.reset()
        srv.set_reply(good_cc_reply)
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        assert cli.main(cc_argv(root, 6)) == 0
        assert srv.request_count == 3  # only the three unfinished cases
        assert not finished_prompts & {prompt_of(b) for b in srv.requests}
    ids = [json.loads(line)["case_id"] for line in log.read_text().splitlines()]
    assert sorted(ids) == [f"CC-{i:05d}" for i in range(6)]
    summary = json.loads((out / "SparklesDialogueCC_summary.json").read_text())
    assert summary["calls"]["already_done"] == 3 and summary["dialogues"]["accepted"] == 18


def test_failed_calls_are_reported_and_retried_on_the_next_run(tmp_path, monkeypatch, capsys):
    root = build_cc_root(tmp_path / "root")
    with OpenAICompatServer(good_cc_reply) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        srv.enqueue(*[Reply.error(503)] * 3)
        assert cli.main(cc_argv(root, 2, "--max_retries", "2")) == 1
        summary = json.loads((root / "data/SparklesDialogueCC/generated/SparklesDialogueCC_summary.json").read_text())
        assert summary["calls"]["failed"] == 1 and summary["failed_calls"][0]["case_id"] == "CC-00000"
        assert summary["failed_calls"][0]["attempts"] == 3
        assert "run the same command again" in capsys.readouterr().err
        assert cli.main(cc_argv(root, 2)) == 0
        assert srv.request_count == 3 + 1 + 1


def test_missing_key_and_missing_inputs_give_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    assert cli.main(cc_argv(tmp_path, 1)) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    assert cli.main(cc_argv(tmp_path, 1)) == 2
    assert "SparklesDialogueCC_50demo_img11.json" in capsys.readouterr().err
    # export needs no key and no server
    monkeypatch.delenv("OPENAI_API_KEY")
    assert cli.main(cc_argv(tmp_path, 1, "--step", "export")) == 0


# --- VG ----------------------------------------------------------------------------------------------------
def first_words_grouping(messages: list[str]) -> list[dict]:
    """A deterministic stand-in for the spaCy verb–noun grouping: (first word, second word)."""
    groups: dict[tuple, dict] = {}
    for idx, msg in enumerate(messages):
        words = msg.lower().split()
        key = (words[0], words[1] if len(words) > 1 else "")
        g = groups.setdefault(key, {"verb": key[0], "noun": key[1], "instr_dialogue": [], "count": 0})
        g["instr_dialogue"].append({"instruction": msg, "dialogue_idx": idx})
        g["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"])


def build_vg_root(root: Path) -> Path:
    cc = [
        dialogue_record(["1", "2"], "3", question="Design poster"),        # unique verb-noun: a 2-image demo
        dialogue_record(["4", "5"], "6", question="Compare cities"),       # shares its pair: never a demo
        dialogue_record(["7", "8"], "9", question="Compare cities"),
        dialogue_record(["10", "11"], "12", question="Write story", answer="too short"),  # short answers
        dialogue_record(["13", "14", "15"], "16", question="Plan trip"),   # the 3-image demo
        dialogue_record(["17"], "18", question="Name dish"),               # 1 image: not for VG
    ]
    write_json(root / "data/SparklesDialogueCC/generated/SparklesDialogueCC.json", cc)
    svit = [{"image_id": i, "conversations": [{"content": [{"value": "Describe it."}, {"value": f"VG scene {i}"}]}]}
            for i in range(1, 141)]
    write_json(root / "data/SVIT/detail_description.json", svit)
    write_json(root / "evaluation/SparklesEval/annotations/sparkles_evaluation_sparkleseval_annotations.json",
               [{"evaluation_id": 0, **dialogue_record([101, 102], 103)}])
    return root


def test_vg_run_draws_unique_allowed_images_and_unique_verb_noun_demos(tmp_path):
    root = build_vg_root(tmp_path / "root")
    opts = GenerationOptions(subset="VG", case_num=3, seed=1, sparkles_root=str(root), progress=False)

    def reply(request):
        return "```json\n" + json.dumps(vg_conversations(prompt_of(request))) + "\n```"

    with OpenAICompatServer(reply) as srv:
        client = GPTClient(GPTConfig(api_key=DUMMY_KEY, base_url=srv.base_url, backoff_base=0.01))
        summary = run_job(opts, client, group_fn=first_words_grouping)
        client.close()
        prompts = [prompt_of(b) for b in srv.requests]
    assert summary["inputs"]["demos_per_first_turn_count"] == {2: 1, 3: 1}
    assert summary["inputs"]["pool"] == 140 - 100 - 3
    offered = [i for p in prompts for i in candidates_in(p)]
    assert len(offered) == 24 == len(set(offered))  # without replacement across all calls
    assert all(isinstance(i, int) and i > 103 for i in offered)  # reserved ids and SparklesEval images excluded
    assert sum("Design poster" in p for p in prompts) == 3 and sum("Plan trip" in p for p in prompts) == 3
    assert not any("Compare cities" in p or "Write story" in p for p in prompts)
    d = summary["dialogues"]
    assert (d["accepted"], d["rejected"], d["accepted_by_first_turn_images"]) == (6, 0, {"2": 3, "3": 3})
    out = root / "data/SparklesDialogueVG/generated"
    for name in ("SparklesDialogueVG_raw_2img.jsonl", "SparklesDialogueVG_raw_3img.json", "SparklesDialogueVG.json",
                 "SparklesDialogueVG_turn1_2img.json", "SparklesDialogueVG_turn2_4img.json"):
        assert (out / name).exists(), name
    records = json.loads((out / "SparklesDialogueVG.json").read_text())
    assert all(isinstance(img["image_id"], int) for r in records for img in r["dialogue"][0]["images"])


def test_select_vg_demos_returns_copies():
    cc = [dialogue_record(["1", "2"], "3", question="Design poster")]
    demos = select_vg_demos(cc, 2, group_fn=first_words_grouping)
    demos[0]["dialogue"][0]["content"] = "changed"
    assert cc[0]["dialogue"][0]["content"].startswith("Design poster")
    assert select_vg_demos(cc, 3, group_fn=first_words_grouping) == []


# --- LLaVA / SVIT re-formatting ---------------------------------------------------------------------------
def test_llava_conversion_filters_overlapping_images(tmp_path, capsys):
    root = tmp_path / "root"
    write_json(root / "data/SparklesDialogueVG/annotations/SparklesDialogueVG.json", [dialogue_record([501, 502], 503)])
    write_json(root / "data/VisualGenome/image_data.json",
               [{"image_id": 501, "coco_id": 1111}, {"image_id": 502, "coco_id": None}, {"image_id": 600, "coco_id": 2222},
                {"image_id": 700, "coco_id": 3333}])
    write_json(root / "evaluation/BISON/annotations/sparkles_evaluation_bison_annotations.json",
               [{"evaluation_id": 0, "caption": "c", "true_image_id": 2222,
                 "image_candidates": [{"image_id": 2222}, {"image_id": 1111}]}])

    def item(cid, q):
        return {"id": f"{cid:012d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": f"ans {cid}"}]}

    items = [item(1111, "<image>\nWhat is in the image?"), item(2222, "What color is the car?"),
             item(3333, "What color is the car?\n<image>"), item(4444, "Describe the image in detail."),
             item(5555, "How many people are there?")]
    write_json(root / "data/LLaVA/detail_23k.json", items)
    write_json(root / "data/LLaVA/complex_reasoning_77k.json", items[:2])
    assert cli.main(["--step", "llava", "--sparkles_root", str(root), "--seed", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bison_images_used_by_sparkles"] == [1111]
    out = json.loads((root / "data/LLaVA/LLaVA_detail_23k_filtered_for_Sparkles.json").read_text())
    assert [r["tgt_imgs"][0]["image_id"] for r in out] == ["000000003333", "000000004444", "000000005555"]
    assert json.loads((root / "data/LLaVA/LLaVA_complex_reasoning_77k_filtered_for_Sparkles.json").read_text()) == []
    for r in out:
        assert r["uniform_question"].count(SLOT) == 1 and "<image>" not in r["uniform_question"]
        assert r["tgt_imgs"][0]["caption"] == r["answer"]
    assert out[0]["question"] == "What color is the car?"
    rng = random.Random(0)
    uq = [uniform_question("What color is the car?", "9", rng) for _ in range(40)]
    assert all(u.count(SLOT) == 1 for u in uq)
    assert any(u.endswith(f"{SLOT}?") for u in uq) and any(u.endswith("what color is the car?") for u in uq)
    assert uniform_question("Describe the image now.", "9", random.Random(1)).startswith("Describe the ")
    records, stats = convert_svit([{"image_id": 9, "conversations": [{"content": [
        {"value": "What is shown in the image?"}, {"value": "A dog."}]}]}, {"image_id": 501, "conversations": [
            {"content": [{"value": "q"}, {"value": "a"}]}]}], {501}, random.Random(0))
    assert stats == {"kept": 1, "excluded": 1}
    assert records[0]["uniform_question"] == f"What is shown in the IMAGE#9{SLOT}?"
