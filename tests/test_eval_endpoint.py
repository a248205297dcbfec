"""evaluate.py --model-endpoint: the tiny model evaluated through its own OpenAI-compatible server gives the same
answers and scores as evaluated in process (BISON, SparklesEval with its judge, I4)."""

import json
from pathlib import Path

import pytest

import evaluate
import evaluate_I4
from eval_world import judge_reply
from sparkles.eval.endpoint import chat_messages
from sparkles.eval.generator import Request
from sparkles.serve.api import create_app
from sparkles.serve.loading import load_model, make_chat
from sparkles.testing.openai_server import OpenAICompatServer
from sparkles.testing.serving import serve_in_thread
from test_i4_predict import _write_dataset

SERVED = "tiny-served"


def load(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def server(eval_world):
    model, _ = load_model(str(eval_world["cfg"]), sparkles_root=str(eval_world["root"]))
    with serve_in_thread(create_app(make_chat(model), model_name=SERVED)) as base:
        yield base + "/v1"


def test_images_go_where_their_slots_stand(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    a.write_bytes(b"A"), b.write_bytes(b"B")
    req = Request("And IMAGE#2<Img><ImageHere></Img>?", [a, b], None, "item 1",
                  history=("Look at <Img><ImageHere></Img> first.", "I see it."))
    user1, assistant, user2 = chat_messages(req)
    assert [p["type"] for p in user1["content"]] == ["text", "image_url", "text"]
    assert user1["content"][1]["image_url"]["url"] == "data:image/png;base64,QQ=="
    assert assistant == {"role": "assistant", "content": "I see it."}
    assert [p["type"] for p in user2["content"]] == ["text", "image_url", "text"]
    assert user2["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def _args(eval_world, dataset, *extra):
    return ["--sparkles_root", str(eval_world["root"]), "--dataset", dataset, "--max-new-tokens", "8",
            "--no-progress", "--inference", "--merge-results", *extra]


def test_bison_and_sparkleseval_through_the_server_equal_in_process(eval_world, api_env, server, tmp_path):
    results = eval_world["root"] / "evaluation"
    assert evaluate.main(_args(eval_world, "BISON", "--cfg-path", str(eval_world["cfg"]), "--model-name",
                               "in_process")) == 0
    assert evaluate.main(_args(eval_world, "BISON", "--model-endpoint", server, "--model-name", SERVED,
                               "--batch-size", "3")) == 0
    ours = load(results / "BISON/results/BISON_in_process_metrics.json")
    served = load(results / f"BISON/results/BISON_{SERVED}_metrics.json")
    assert served["accuracy"] == ours["accuracy"]
    answers = [(it["evaluation_id"], it["response"]) for it in load(results / "BISON/results" /
                                                                        ours["files"]["results"])]
    assert [(it["evaluation_id"], it["response"]) for it in
            load(results / "BISON/results" / served["files"]["results"])] == answers
    assert served["settings"]["mode"] == "endpoint"

    with OpenAICompatServer(judge_reply) as judge:
        api_env.setenv("OPENAI_BASE_URL", judge.base_url)
        cache = ["--gpt-cache", str(tmp_path / "judge.sqlite")]
        assert evaluate.main(_args(eval_world, "SparklesEval", "--cfg-path", str(eval_world["cfg"]),
                                   "--model-name", "in_process", *cache)) == 0
        # no --model-name: the only model the server lists
        assert evaluate.main(_args(eval_world, "SparklesEval", "--model-endpoint", server, *cache)) == 0
    ours = load(results / "SparklesEval/results/SparklesEval_in_process.json")
    served = load(results / f"SparklesEval/results/SparklesEval_{SERVED}.json")
    assert [it["dialogue"] for it in served] == [it["dialogue"] for it in ours]
    assert [it["gpt-4"]["A1_C123_scores"] for it in served] == [it["gpt-4"]["A1_C123_scores"] for it in ours]


def test_i4_through_the_server_equals_in_process(eval_world, server, tmp_path):
    i4_dir = tmp_path / "demon"
    _write_dataset(i4_dir, "VISION", "multi-choice", 3, 2)
    common = ["--i4-dir", str(i4_dir), "--dataset", "VISION", "--max-new-tokens", "6", "--no-progress"]
    assert evaluate_I4.main(["--cfg-path", str(eval_world["cfg"]), "--sparkles_root", str(eval_world["root"]),
                             "--result-dir", str(tmp_path / "ours"), *common]) == 0
    assert evaluate_I4.main(["--model-endpoint", server, "--result-dir", str(tmp_path / "served"), *common]) == 0
    ours, served = load(tmp_path / "ours/VISION/pred.json"), load(tmp_path / "served/VISION/pred.json")
    assert [(p["sample_id"], p["pred_response"], p.get("error", "")[:20]) for p in served] == \
        [(p["sample_id"], p["pred_response"], p.get("error", "")[:20]) for p in ours]
