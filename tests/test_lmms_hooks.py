"""The lmms-eval integration (sparkles/lmms) without lmms-eval: the exported task and data files, the task hooks
against the project's benchmark code, the messages read as the API server reads them, and the models' answers
against ModelGenerator's and, through the served model, against the in-process ones."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from eval_world import N, expected_overall, judge_reply
from sparkles.conversation.template import IMAGE_MARKER, strip_slots
from sparkles.eval.benchmarks import CHOICE_BENCHMARKS
from sparkles.eval.benchmarks.sparkleseval import check_dialogue
from sparkles.eval.cli import run as evaluate_run
from sparkles.eval.data import EvalSet
from sparkles.eval.generator import ModelGenerator, Request
from sparkles.eval.protocol import make_protocol
from sparkles.lmms import hooks
from sparkles.lmms.answering import (Answerer, Conversation, TaskRounds, cut_at, endpoint_answerer, generation,
                                     load_answerer)
from sparkles.lmms.export import TASK_NAMES, export
from sparkles.lmms.messages import MessageError, image_part, text_part, to_turns, user_message
from sparkles.lmms.plugin import MODELS
from sparkles.serve.api import create_app
from sparkles.serve.loading import load_model, make_chat
from sparkles.serve.openai_format import parse_chat_request
from sparkles.testing.openai_server import OpenAICompatServer
from sparkles.testing.serving import serve_in_thread

REPO = Path(__file__).resolve().parents[1]
GEN = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": ["###"]}  # as the task files ask


class _FunctionLoader(yaml.SafeLoader):
    """Reads lmms-eval's ``!function module.name`` tags as the dotted name."""


_FunctionLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def _functions(value):
    if isinstance(value, tuple) and value[:1] == ("function",):
        yield value[1]
    elif isinstance(value, dict):
        for v in value.values():
            yield from _functions(v)
    elif isinstance(value, list):
        for v in value:
            yield from _functions(v)


@pytest.fixture(scope="module")
def exported(eval_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms_tasks")
    written = export(eval_world["root"], out, max_new_tokens=8)
    docs = {ds: [json.loads(line) for line in info["data"].read_text().splitlines()] for ds, info in written.items()}
    return {"out": out, "written": written, "docs": docs}


def _read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_FunctionLoader)


# ---------------------------------------------------------------------------------------------- export
def test_export_writes_task_files_that_name_their_data_by_absolute_path(exported, eval_world, tmp_path):
    import datasets

    assert sorted(exported["written"]) == ["BISON", "NLVR2", "SparklesEval"]
    for dataset, info in exported["written"].items():
        config = _read_yaml(info["yaml"])
        assert config["task"] == TASK_NAMES[dataset] == info["task"]
        # `--tasks NAME` reads an existing folder NAME as a folder of task files: no folder may share the tag
        assert config["tag"] == "sparkles_benchmarks" and not (REPO / config["tag"]).exists()
        data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert data_file.is_absolute() and data_file == info["data"] and data_file.is_file()
        assert config["generation_kwargs"]["max_new_tokens"] == 8
        assert config["lmms_eval_specific_kwargs"]["default"]["layout"] == "slots"
        assert "${" not in info["yaml"].read_text()
        for name in _functions(config):  # every hook the file names exists
            module, _, function = name.rpartition(".")
            assert module == "sparkles.lmms.hooks" and callable(getattr(hooks, function)), name
        # lmms-eval loads the data with the `json` builder of datasets, as here
        loaded = datasets.load_dataset("json", data_files={"test": str(data_file)}, split="test",
                                       cache_dir=str(tmp_path / "hf"))
        evalset = EvalSet(eval_world["root"], dataset)
        assert len(loaded) == info["documents"] == len(evalset.items) == N
        for doc, item in zip(loaded, evalset.items):
            assert hooks.record(doc) == item
            paths = doc["images"] if dataset in CHOICE_BENCHMARKS else sum(doc["turn_images"], [])
            assert paths and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def test_export_refuses_a_missing_image(eval_world, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(eval_world["root"] / "evaluation", root / "evaluation")
    next((root / "evaluation/NLVR2/images").glob("*.png")).unlink()
    from sparkles.lmms.export import main

    assert main(["--sparkles_root", str(root), "--out", str(tmp_path / "out"), "--datasets", "NLVR2"]) == 1
    assert not (tmp_path / "out" / "sparkles_nlvr2.yaml").exists()


def test_the_plugin_and_the_package_data_are_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"] == {"sparkles": "sparkles.lmms.plugin:model_manifests"}
    assert any(r.startswith("lmms-eval==") for r in project["optional-dependencies"]["lmms"])
    classes = {node.name for node in ast.parse((REPO / "sparkles/lmms/models.py").read_text()).body
               if isinstance(node, ast.ClassDef)}
    assert set(MODELS) == {"sparkles_chat", "sparkles_api"}
    assert {path.rsplit(".", 1)[1] for path in MODELS.values()} <= classes
    assert all(path.startswith("sparkles.lmms.models.") for path in MODELS.values())


# ---------------------------------------------------------------------------------------------- the hooks
@pytest.mark.parametrize("dataset", ["BISON", "NLVR2"])
def test_choice_questions_are_the_benchmarks_with_every_image_at_its_slot(exported, eval_world, dataset):
    benchmark = CHOICE_BENCHMARKS[dataset]
    evalset = EvalSet(eval_world["root"], dataset)
    for index, doc in enumerate(exported["docs"][dataset]):
        question = benchmark.question(evalset, index)
        [message] = hooks.doc_to_messages(doc, {"layout": "slots"})
        parts = message["content"]
        assert message["role"] == "user"
        assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
        assert [p["url"] for p in parts if p["type"] == "image"] == \
            [str(evalset.abspath(p).resolve()) for p in question.img_paths]
        assert parts[0]["text"].endswith("IMAGE#1") and parts[2]["text"].endswith("IMAGE#2")
        rebuilt = "".join(IMAGE_MARKER if p["type"] == "image" else p["text"] for p in parts)
        assert rebuilt == question.prompt
        assert hooks.doc_to_text(doc) == question.prompt.replace(IMAGE_MARKER, "<image>")
        stock = hooks.doc_to_messages(doc, {"layout": "images_first"})[0]["content"]
        assert [p["type"] for p in stock] == ["image", "image", "text"]
        assert stock[2]["text"] == strip_slots(question.prompt)
        assert [p["type"] for p in hooks.doc_to_messages(doc, {"layout": "text_first"})[0]["content"]] == \
            ["text", "image", "image"]


@pytest.mark.parametrize("dataset", ["BISON", "NLVR2"])
def test_choice_answers_are_read_and_scored_by_the_benchmark(exported, dataset, tmp_path):
    benchmark = CHOICE_BENCHMARKS[dataset]
    first, second = (o.upper() for o in benchmark.OPTIONS)
    replies = [f"Let's think step by step. Therefore, the answer ({first} or {second}) is {first}.",
               f"Let's think step by step. Therefore, the answer ({first} or {second}) is {second}.",
               "I cannot tell."]
    docs = exported["docs"][dataset]
    values = [hooks.choice_process_results(doc, [replies[(k + 1) % 3]])["accuracy"] for k, doc in enumerate(docs)]
    for k, (doc, value) in enumerate(zip(docs, values)):
        assert value["item"]["predict"] == benchmark.extract(replies[(k + 1) % 3])
        assert value["score"] == int(value["item"]["predict"] == doc["label"].lower())
    args = SimpleNamespace(output_path=str(tmp_path / "lmms_out"), model="sparkles_chat")
    accuracy = hooks.choice_aggregate(list(reversed(values)), args)  # written in annotation order all the same
    items = [v["item"] for v in values]
    assert accuracy == benchmark.score(items)["accuracy"] == sum(v["score"] for v in values) / len(values)
    assert 0 < accuracy < 1
    path = hooks.results_path(dataset, args)
    assert path == tmp_path / "lmms_out" / "sparkles_results" / f"{dataset}_lmms_sparkles_chat.json"
    # evaluate.py reads the file back as one of its own result files and finds the same accuracy
    report = evaluate_run(["--results-file", str(path), "--merge-results", "--output-dir", str(tmp_path / "re")])
    assert report.merged["accuracy"] == accuracy and report.merged["changed_predictions"] == 0


def test_sparkleseval_rounds_follow_lmms_evals_protocol(exported):
    doc = exported["docs"]["SparklesEval"][0]
    q1, _, q2, _ = check_dialogue(hooks.record(doc))
    [first] = hooks.doc_to_messages(doc)
    assert "".join(IMAGE_MARKER if p["type"] == "image" else p["text"] for p in first["content"]) == q1["content"]
    messages, terminal, previous, info = hooks.doc_to_messages(doc, round_idx=1, previous_output=["A one."])
    assert not terminal and previous == ["A one."] and info is None
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0] == first and messages[1]["content"] == [text_part("A one.")]
    assert [p["url"] for p in messages[2]["content"] if p["type"] == "image"] == doc["turn_images"][1]
    assert hooks.doc_to_messages(doc, round_idx=2, previous_output=["A one.", "A two."])[1] is True
    assert hooks.reference_answers(doc) == [hooks.record(doc)["dialogue"][1]["content"],
                                            hooks.record(doc)["dialogue"][3]["content"]]


# ---------------------------------------------------------------------------------------------- messages
def _as_openai(messages):
    """The same messages as lmms-eval's API client sends them (each image an image_url part where it stands)."""
    out = []
    for m in messages:
        parts = [{"type": "text", "text": p["text"]} if p["type"] == "text" else
                 {"type": "image_url", "image_url": {"url": f"file:///{p['url']}"}} for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return out


def test_messages_are_read_as_the_api_server_reads_them():
    conversation = [
        user_message("Look at IMAGE#1<Img><ImageHere></Img> and IMAGE#2<Img><ImageHere></Img>.", ["a.png", "b.png"]),
        {"role": "user", "content": [text_part("Be brief.")]},  # consecutive user messages are joined
        {"role": "assistant", "content": [text_part("Two shapes.")]},
        user_message("Now IMAGE#3✨ only.", ["c.png"], "images_first"),
    ]
    turns, images = to_turns(conversation, image_tokens=False)
    served = parse_chat_request({"model": "m", "messages": _as_openai(conversation)}, model_name="m", max_images=8)
    assert turns == served.turns
    assert images == ["a.png", "b.png", "c.png"] == [u.url.removeprefix("file:///") for u in
                                                     (p for p in served.images)]
    assert turns[0] == ("user", "Look at IMAGE#1<Img><ImageHere></Img> and IMAGE#2<Img><ImageHere></Img>."
                                "\nBe brief.")
    assert turns[2] == ("user", "<Img><ImageHere></Img>Now IMAGE#3 only.")


def test_image_tokens_of_stock_layout_messages_become_the_slots():
    stock = {"role": "user", "content": [image_part("a.png"), image_part("b.png"),
                                         text_part("Is <image> brighter than <image>?")]}
    assert to_turns([stock])[0] == [("user", "Is <Img><ImageHere></Img> brighter than <Img><ImageHere></Img>?")]
    assert to_turns([stock], image_tokens=False)[0] == \
        [("user", "<Img><ImageHere></Img><Img><ImageHere></Img>Is <image> brighter than <image>?")]
    one_token = {"role": "user", "content": [image_part("a.png"), image_part("b.png"), text_part("Is <image> it?")]}
    assert to_turns([one_token])[0][0][1].startswith("<Img><ImageHere></Img><Img><ImageHere></Img>Is <image>")
    with pytest.raises(MessageError, match="system"):
        to_turns([{"role": "system", "content": "Be terse."}, stock])
    with pytest.raises(MessageError, match="video"):
        to_turns([{"role": "user", "content": [{"type": "video", "url": "v.mp4"}, text_part("?")]}])
    with pytest.raises(MessageError, match="slot"):
        user_message("IMAGE#1<Img><ImageHere></Img>", ["a.png", "b.png"])


def test_generation_settings_and_stop_strings():
    gen, until = generation({"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n\n"]})
    assert gen == {**make_protocol("default", max_new_tokens=16).generation()} and until == ("\n\n",)
    assert generation({})[0]["max_new_tokens"] == 1000 and generation({})[1] == ()
    sampled, _ = generation({"temperature": 0.7, "top_p": 0.9})
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    assert not generation({"temperature": 0.7, "do_sample": False})[0]["do_sample"]
    assert cut_at("one\n\ntwo###", ("###", "\n\n")) == "one" and cut_at("one", ("x",)) == "one"


# ---------------------------------------------------------------------------------------------- answers
@pytest.fixture(scope="module")
def in_process(eval_world):
    """The lmms-eval model's answerer as `sparkles_chat` builds it, on the world's tiny random model."""
    return load_answerer(str(eval_world["cfg"]), str(eval_world["root"]), device="cpu", batch_size=3,
                         progress=False)


def _conversations(docs, gen=GEN, rounds=False, layout="slots"):
    ask = partial(hooks.doc_to_messages, lmms_eval_specific_kwargs={"layout": layout})
    return [Conversation(ask(doc), dict(gen), f"task document {k}", TaskRounds(ask, doc) if rounds else None)
            for k, doc in enumerate(docs)]


def test_choice_answers_equal_model_generators(exported, in_process, tiny_model):
    from PIL import Image

    from sparkles.processors.image import build_processor

    docs = exported["docs"]["BISON"] + exported["docs"]["NLVR2"]
    ours = [rounds[0] for rounds in in_process.answer(_conversations(docs))]
    one_by_one = ModelGenerator(in_process.generator.model, in_process.generator.chat.image_processor)
    gen = make_protocol("default", max_new_tokens=8).generation()
    expected = [one_by_one.generate([Request(hooks.choice_prompt(d), d["images"], None, "x")], gen)[0].text
                for d in docs]
    assert ours == expected
    assert len(set(ours)) > 1  # the tiny model's answers depend on its inputs
    # images handed over as decoded PIL images (lmms-eval's stock tasks) give the same answers
    pil = [[{**p, "url": Image.open(p["url"])} if p["type"] == "image" else p for p in c.messages[0]["content"]]
           for c in _conversations(docs[:3])]
    as_pil = [Conversation([{"role": "user", "content": parts}], dict(GEN), f"pil {k}") for k, parts in enumerate(pil)]
    assert [r[0] for r in in_process.answer(as_pil)] == ours[:3]
    # the tiny_model fixture through the same logic: Answerer over ModelGenerator equals ModelGenerator
    generator = ModelGenerator(tiny_model, build_processor({"name": "blip2_image_eval", "image_size": 32}),
                               batch_size=4)
    some = docs[::3]
    answers = [r[0] for r in Answerer(generator, progress=False).answer(_conversations(some))]
    single = ModelGenerator(tiny_model, build_processor({"name": "blip2_image_eval", "image_size": 32}))
    assert answers == [single.generate([Request(hooks.choice_prompt(d), d["images"], None, "x")], gen)[0].text
                       for d in some]


def test_sparkleseval_answers_are_evaluate_pys_and_its_judges_read_them(exported, in_process, api_env, tmp_path):
    docs = exported["docs"]["SparklesEval"]
    rounds = in_process.answer(_conversations(docs, rounds=True))
    gen = make_protocol("default", max_new_tokens=8).generation()
    one_by_one = ModelGenerator(in_process.generator.model, in_process.generator.chat.image_processor)
    for doc, (a1, a2) in zip(docs, rounds):
        q1, _, q2, _ = check_dialogue(hooks.record(doc))
        images1, images2 = doc["turn_images"]
        assert a1 == one_by_one.generate([Request(q1["content"], images1, None, "x")], gen)[0].text
        assert a2 == one_by_one.generate([Request(q2["content"], images1 + images2, None, "x",
                                                  history=(q1["content"], a1))], gen)[0].text
    values = [hooks.dialogue_process_results(doc, [r])["answered"] for doc, r in zip(docs, rounds)]
    args = SimpleNamespace(output_path=str(tmp_path / "out"), model="sparkles_chat")
    assert hooks.dialogue_aggregate(values, args) == 1.0
    path = hooks.results_path("SparklesEval", args)
    written = json.loads(path.read_text())
    assert [(it["dialogue"][1]["content"], it["dialogue"][3]["content"]) for it in written] == \
        [tuple(r) for r in rounds]
    with OpenAICompatServer(judge_reply) as judge:
        api_env.setenv("OPENAI_BASE_URL", judge.base_url)
        report = evaluate_run(["--results-file", str(path), "--merge-results", "--judge_models", "gpt-4",
                               "--output-dir", str(tmp_path / "judged"), "--no-progress"])
    assert report.merged["judges"]["gpt-4"]["overall"] == pytest.approx(expected_overall(range(N)))
    unanswered = hooks.dialogue_process_results(docs[0], [["only one"]])["answered"]
    assert unanswered["score"] == 0 and "error" in unanswered["item"]


def test_the_api_backend_answers_both_rounds_as_the_in_process_model(exported, in_process, eval_world):
    model, _ = load_model(str(eval_world["cfg"]), sparkles_root=str(eval_world["root"]))
    docs = exported["docs"]["SparklesEval"][:3] + exported["docs"]["NLVR2"][:3]
    with serve_in_thread(create_app(make_chat(model), model_name="tiny-served")) as base:
        served = endpoint_answerer(base + "/v1", batch_size=3, progress=False)
        dialogues = served.answer(_conversations(docs[:3], rounds=True))
        choices = served.answer(_conversations(docs[3:]))
    assert dialogues == in_process.answer(_conversations(docs[:3], rounds=True))
    assert all(len(r) == 2 for r in dialogues)
    assert choices == in_process.answer(_conversations(docs[3:]))
    assert re.search(r"\S", "".join(a for r in dialogues for a in r))
