"""Protocol files: importing the original's texts from an upstream-shaped tree, running the three benchmarks with
them, the original's answer reading, context overflow, and re-scoring finished result files."""

import json
import logging
from pathlib import Path

import pytest
import torch

import evaluate
from sparkles.conversation.protocol_file import (ProtocolFileError, ProtocolTexts, dump_protocol, fill,
                                                 load_protocol_file)
from sparkles.conversation.template import IMAGE_MARKER
from sparkles.engine.chat import Chat, ChatError
from sparkles.engine.decoding import GenerationConfig
from sparkles.eval.benchmarks.choice import extract_choice, extract_choice_upstream
from sparkles.eval.benchmarks.sparkleseval import build_judge_prompt
from sparkles.testing.openai_server import OpenAICompatServer
from sparkles.tools import import_protocol
from eval_world import judge_reply
from upstream_shaped import JUDGE_SYSTEM, SYSTEM_TEXT, load_upstream_evaluate, write_upstream_tree


def load(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module", params=["five", "two"])
def upstream(request, tmp_path_factory):
    root = write_upstream_tree(tmp_path_factory.mktemp(f"upstream_{request.param}"), request.param)
    out = root / "protocol_upstream.yaml"
    assert import_protocol.main(["--upstream", str(root), "--out", str(out)]) == 0
    return {"root": root, "file": out, "texts": load_protocol_file(out), "source": load_upstream_evaluate(root)}


DIALOGUE = [
    {"role": "user", "content": "Is IMAGE#7<Img><ImageHere></Img> {tidy}? 'quoted' \\ text",
     "images": [{"image_id": 7, "caption": "a café with {braces} and \"quotes\""}]},
    {"role": "assistant", "content": "It is {q2}."},
    {"role": "user", "content": "And IMAGE#9<Img><ImageHere></Img> with IMAGE#7?",
     "images": [{"image_id": 9, "caption": "a boat"}]},
    {"role": "assistant", "content": "Both."},
]


# ------------------------------------------------------------------------------------------------ importing
def test_imported_texts_build_what_the_original_code_builds(upstream):
    texts, source = upstream["texts"], upstream["source"]
    assert texts.system_text == SYSTEM_TEXT
    assert texts.judge_system == JUDGE_SYSTEM
    assert texts.extraction == "upstream"
    for caption in ("a red bus", "it's {odd} \\ text"):
        assert fill(texts.bison_template, caption=caption) == source.bison_prompt(caption)
        assert fill(texts.nlvr2_template, statement=caption) == source.nlvr2_prompt(caption)
    assert build_judge_prompt(DIALOGUE, texts.judge_template, texts.judge_images_format) == \
        source.judge_prompt(DIALOGUE)
    assert texts.judge_images_format == ("python_repr" if upstream["root"].name.startswith("upstream_five")
                                         else "json")


def test_import_names_what_it_cannot_find(tmp_path, capsys):
    root = write_upstream_tree(tmp_path / "up")
    src = (root / "evaluate.py").read_text().replace("(TRUE or FALSE)", "(YES or NO)")
    (root / "evaluate.py").write_text(src)
    out = tmp_path / "p.yaml"
    assert import_protocol.main(["--upstream", str(root), "--out", str(out)]) == 1
    assert "NLVR2" in capsys.readouterr().err and not out.exists()
    assert import_protocol.main(["--upstream", str(tmp_path / "nowhere"), "--out", str(out)]) == 1


def test_protocol_file_round_trips_and_is_checked(tmp_path):
    texts = ProtocolTexts(system_text="  lead & trail  \n\tnext: line — ü ", judge_system='say "hi": {x}',
                          bison_template=f"A{IMAGE_MARKER}B{IMAGE_MARKER} '{{caption}}' {{other}}", extraction="sparkles")
    path = tmp_path / "p.yaml"
    path.write_text(dump_protocol(texts, "a header\nof two lines"))
    loaded = load_protocol_file(path)
    assert {k: getattr(loaded, k) for k in texts.given()} == {k: getattr(texts, k) for k in texts.given()}
    assert loaded.source == str(path)
    bad = {"nlvr2_template: 'no placeholder'": "{statement}", f"bison_template: 'one {IMAGE_MARKER} {{caption}}'":
           "2 image slots", "judge_sytem: typo": "unknown key", "extraction: maybe": "extraction"}
    for body, message in bad.items():
        path.write_text(body + "\n")
        with pytest.raises(ProtocolFileError, match=message):
            load_protocol_file(path)


# ------------------------------------------------------------------------------------------------ reading answers
@pytest.mark.parametrize("response, upstream_choice, ours", [
    ("Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#2.", "image#2", "image#2"),
    ("Therefore, the answer is not IMAGE #1.", "image#2", "image#2"),
    # the original returns the first option mentioned even when an explicit statement names the other
    ("Therefore, IMAGE#1 is wrong and the answer is IMAGE#2.", "image#1", "image#2"),
    ("Therefore, IMAGE#1 or IMAGE#2, hard to say", None, None),
    ("No conclusion here: IMAGE#1.", None, None),
])
def test_the_original_extraction_rule(response, upstream_choice, ours):
    assert extract_choice_upstream(response, ("IMAGE#1", "IMAGE#2")) == upstream_choice
    assert extract_choice(response, ("IMAGE#1", "IMAGE#2")) == ours


def test_the_original_rule_matches_substrings():
    # "untrue" contains "true": the original reads TRUE, the project's whole-token rule reads nothing
    assert extract_choice_upstream("Therefore, the statement is untrue", ("TRUE", "FALSE")) == "true"
    assert extract_choice("Therefore, the statement is untrue", ("TRUE", "FALSE")) is None


# ------------------------------------------------------------------------------------------------ end to end
def _args(eval_world, dataset, name, *extra):
    return ["--sparkles_root", str(eval_world["root"]), "--cfg-path", str(eval_world["cfg"]), "--dataset", dataset,
            "--model-name", name, "--max-new-tokens", "8", "--no-progress", *extra]


def test_upstream_protocol_with_imported_texts_end_to_end(eval_world, api_env, upstream, tmp_path):
    texts, source = upstream["texts"], upstream["source"]
    proto = ["--protocol", "upstream", "--protocol-file", str(upstream["file"]), "--max-retries", "1"]
    name = f"imported_{upstream['root'].name}"
    ann = lambda d: load(eval_world["root"] / f"evaluation/{d}/annotations/sparkles_evaluation_{d.lower()}_annotations.json")  # noqa: E731
    for dataset, field, build in (("BISON", "caption", source.bison_prompt), ("NLVR2", "sentence", source.nlvr2_prompt)):
        assert evaluate.main(_args(eval_world, dataset, name, "--inference", "--merge-results", *proto)) == 0
        metrics = load(eval_world["root"] / f"evaluation/{dataset}/results/{dataset}_{name}_metrics.json")
        items = load(eval_world["root"] / f"evaluation/{dataset}/results" / metrics["files"]["results"])
        by_id = {a["evaluation_id"]: a for a in ann(dataset)}
        for item in items:
            assert item["prompt"] == build(by_id[item["evaluation_id"]][field])
            assert item["model_input"] == texts.system_text + "###Human: " + item["prompt"] + "###Assistant:"
            assert item["predict"] == extract_choice_upstream(item["response"], ("IMAGE#1", "IMAGE#2")
                                                              if dataset == "BISON" else ("TRUE", "FALSE"))
        assert metrics["settings"]["protocol"]["texts"]["given"] == texts.given()

    with OpenAICompatServer(judge_reply) as srv:
        api_env.setenv("OPENAI_BASE_URL", srv.base_url)
        args = _args(eval_world, "SparklesEval", name, "--inference", "--merge-results", "--gpt-cache",
                     str(tmp_path / "cache.sqlite"), *proto)
        assert evaluate.main(args) == 0
        requests = srv.requests
    out = eval_world["root"] / "evaluation/SparklesEval/results"
    items = load(out / f"SparklesEval_{name}.json")
    assert len(requests) == len(items)
    sent = {r["messages"][1]["content"]: r["messages"][0]["content"] for r in requests}
    for item in items:
        q1, a1, q2 = (m["content"] for m in item["dialogue"][:3])
        assert item["prompt"] == [q1, q1 + "###Assistant: " + a1 + "###Human: " + q2]  # the original's turn 2
        assert all(x.startswith(texts.system_text + "###Human: ") for x in item["model_input"])
        judge_prompt = source.judge_prompt(item["dialogue"])
        assert item["gpt-4"]["prompt"] == judge_prompt and sent[judge_prompt] == JUDGE_SYSTEM


def test_upstream_protocol_without_texts_warns_loudly(eval_world, api_env, caplog):
    with caplog.at_level(logging.WARNING):
        assert evaluate.main(_args(eval_world, "BISON", "no_texts", "--protocol", "upstream", "--max-retries", "0",
                                   "--data-to", "1", "--inference")) == 0
    warnings = [r.getMessage() for r in caplog.records if "NOT comparable" in r.getMessage()]
    assert len(warnings) == 1 and "import_protocol" in warnings[0]


def test_items_that_do_not_fit_are_recorded_and_the_run_goes_on(eval_world, api_env):
    # 24 positions hold the short NLVR2 question of no item: every item fails, none crashes the shard
    args = _args(eval_world, "NLVR2", "too_small", "--max-length", "32", "--inference", "--merge-results")
    assert evaluate.main(args) == 0
    metrics = load(eval_world["root"] / "evaluation/NLVR2/results/NLVR2_too_small_metrics.json")
    assert metrics["failed_items"] == metrics["items"] == 6 and metrics["accuracy"] == 0.0
    items = load(eval_world["root"] / "evaluation/NLVR2/results" / metrics["files"]["results"])
    assert all("does not fit" in it["error"] and it["response"] is None for it in items)


def test_turn_two_drops_turn_one_under_the_default_protocol(eval_world, api_env, tmp_path):
    from sparkles.conversation.render import Renderer
    from sparkles.models.tokenizer import load_tokenizer

    renderer = Renderer(load_tokenizer(eval_world["root"] / "models/tiny_test/tokenizer"), 4)
    with OpenAICompatServer(judge_reply) as srv:
        api_env.setenv("OPENAI_BASE_URL", srv.base_url)
        common = ["--gpt-cache", str(tmp_path / "c.sqlite"), "--data-to", "3"]
        assert evaluate.main(_args(eval_world, "SparklesEval", "fits", "--inference", *common)) == 0
        shard = load(eval_world["root"] / "evaluation/SparklesEval/results/SparklesEval_fits/SparklesEval_fits_0to3.json")
        # positions of turn 2 with turn 1, and of turn 2 alone (the system text is empty in this config)
        whole = [len(renderer.tokenize(it["model_input"][1])) for it in shard]
        alone = [len(renderer.tokenize("###Human: " + it["dialogue"][2]["content"] + "###Assistant:")) for it in shard]
        first = [len(renderer.tokenize(it["model_input"][0])) for it in shard]
        budget = max(alone + first)
        assert budget < min(whole), (first, alone, whole)  # room for each turn alone, not for turn 2 with turn 1
        args = _args(eval_world, "SparklesEval", "drops", "--inference", "--merge-results", "--max-length",
                     str(budget + 8), *common)
        assert evaluate.main(args) == 0
    items = load(eval_world["root"] / "evaluation/SparklesEval/results/SparklesEval_drops.json")
    for item in items:
        assert "error" not in item, item.get("error")
        q1 = item["dialogue"][0]["content"]
        assert item["model_input"][0] == "###Human: " + q1 + "###Assistant:"
        assert q1 not in item["model_input"][1] and any("left out" in w for w in item["warnings"])
        assert "gpt-4" in item  # judged all the same


# ------------------------------------------------------------------------------------------------ the engine
def test_left_truncation_cuts_the_start_and_answers(tiny_model):
    chat = Chat(tiny_model)
    gen = GenerationConfig(max_new_tokens=4, max_length=30, overflow="truncate_left")
    session = chat.session()
    session.add_image(torch.zeros(3, 32, 32))
    session.ask("Compare IMAGE#1✨ with the words of a rather long question that goes on and on and on.")
    full = len(chat.renderer.render(session.messages, chat.layout))
    answer = session.answer(**{k: getattr(gen, k) for k in ("max_new_tokens", "max_length", "overflow")})
    assert isinstance(answer, str)
    assert session.last_context.cut == full - 26 > 0 and "cut off" in session.last_warning
    assert session.stats["prefill_tokens"] == 26
    with pytest.raises(ChatError, match="does not fit"):
        fresh = chat.session()
        fresh.add_image(torch.zeros(3, 32, 32))
        fresh.ask("Compare IMAGE#1✨ with the words of a rather long question that goes on and on and on.")
        fresh.answer(max_new_tokens=4, max_length=30)


def test_minigpt4_chat_places_the_image_before_the_first_question(tiny_model):
    chat = Chat(tiny_model, chat_mode="minigpt4")
    session = chat.session()
    session.add_image(torch.zeros(3, 32, 32))
    session.ask("What is shown?")
    assert session.messages[0].content == IMAGE_MARKER + " What is shown?"
    assert isinstance(session.answer(max_new_tokens=3), str)
    session.ask("And now?")
    assert session.messages[-1].content == "And now?"
    two = chat.session()
    two.add_images([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    with pytest.raises(ChatError, match="one image"):
        two.ask("Which?")


# ------------------------------------------------------------------------------------------------ re-scoring
def _released_choice_file(tmp_path):
    items = [
        {"label": "IMAGE#1", "prompt": "p", "img_paths": ["/authors/a.jpg", "/authors/b.jpg"], "predict": "image#1",
         "response": "Let's think step by step. Therefore, IMAGE#1 is it and the answer is IMAGE#2.",
         "sentence": "s", "evaluation_id": 1},
        {"label": "IMAGE#2", "prompt": "p", "img_paths": ["/authors/c.jpg", "/authors/d.jpg"], "predict": "image#2",
         "response": "Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#2.", "sentence": "s", "evaluation_id": 2},
        {"label": "IMAGE#2", "prompt": "p", "img_paths": ["/authors/e.jpg", "/authors/f.jpg"], "predict": "image#1",
         "response": "Therefore the answer is not IMAGE#1.", "sentence": "s", "evaluation_id": 3},
    ]
    path = tmp_path / "BISON_models_pretrained_sparkleschat_7b_acc0.333.json"
    path.write_text(json.dumps(items))
    return path


def test_rescoring_a_released_choice_file_never_touches_it(tmp_path, api_env):
    path = _released_choice_file(tmp_path)
    before = path.read_bytes()
    # item 1: the original rule takes the first option mentioned (right), ours the explicit statement (wrong)
    for protocol, accuracy in (("upstream", 1.0), ("default", 2 / 3)):
        assert evaluate.main(["--results-file", str(path), "--merge-results", "--protocol", protocol]) == 0
        metrics = load(tmp_path / "BISON_models_pretrained_sparkleschat_7b_rescored_metrics.json")
        assert metrics["accuracy"] == pytest.approx(accuracy)
        assert metrics["original_accuracy"] == pytest.approx(2 / 3)  # the file's own third answer was misread
        assert metrics["extraction"] == ("upstream" if protocol == "upstream" else "sparkles")
    assert path.read_bytes() == before
    assert evaluate.main(["--results-file", str(path)]) == 1  # --merge-results is required


def test_rejudging_a_released_sparkleseval_file(tmp_path, api_env):
    items = []
    for k in range(3):
        dialogue = [dict(m) for m in DIALOGUE]
        dialogue[0] = {**DIALOGUE[0], "content": DIALOGUE[0]["content"] + f" (dialogue-{k})"}
        items.append({"evaluation_id": k, "dialogue": dialogue,
                      "gpt-4": {"A1_C123_scores": [8.0, 8.0, 9.0, 7.0], "A2_C123_scores": [6.0, 5.0 + k, 6.0, 7.0],
                                "prompt": "old", "response": "old"}})
    path = tmp_path / "released" / "SparklesEval_models_pretrained_sparkleschat_7b.json"
    path.parent.mkdir()
    path.write_text(json.dumps(items))
    before = path.read_bytes()
    out = tmp_path / "rescored"
    with OpenAICompatServer(judge_reply) as srv:
        api_env.setenv("OPENAI_BASE_URL", srv.base_url)
        args = ["--results-file", str(path), "--merge-results", "--judge_models", "gpt-4o", "--output-dir", str(out),
                "--no-progress"]
        assert evaluate.main(args) == 0
        assert srv.request_count == 3
        assert evaluate.main(args) == 0  # a second run finds everything judged
        assert srv.request_count == 3
    assert path.read_bytes() == before
    metrics = load(out / "SparklesEval_models_pretrained_sparkleschat_7b_rescored_metrics.json")
    original = metrics["judges"]["gpt-4@original"]
    assert original["A1"] == pytest.approx(8.0)
    assert original["A2"] == pytest.approx((6.0 + 6.0 + 7.0) / 3)  # C1 means 6, C2 6, C3 7
    new = metrics["judges"]["gpt-4o"]
    assert metrics["headline"]["judge"] == "gpt-4o" and new["rated"] == 3
    assert new["overall"] == pytest.approx(sum(((k + 12) / 3 + (17 + k) / 3) / 2 for k in range(3)) / 3)
