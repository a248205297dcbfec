"""evaluate.py end to end on a tiny world: a random tiny SparklesChat saved as config + checkpoint, tiny
BISON / NLVR2 / SparklesEval files with Pillow images, and a local OpenAI-compatible judge over real HTTP.

The tiny model's answers are gibberish but deterministic, which is what batching, sharding and resume
checks need. Every run gets its own --model-name (its own run directory) and its own judge cache.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
from eval_world import N, expected_overall, judge_reply
from sparkles.eval.cli import run as eval_run
from sparkles.testing.openai_server import OpenAICompatServer, Reply

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny_test_ckpt_checkpoint_last"  # <ckpt parent of parent>_<ckpt parent>_<ckpt stem>


def common(eval_world, dataset, name, *extra):
    return ["--sparkles_root", str(eval_world["root"]), "--cfg-path", str(eval_world["cfg"]), "--dataset", dataset,
            "--model-name", name, "--max-new-tokens", "8", "--no-progress", *extra]


def results_dir(eval_world, dataset):
    return eval_world["root"] / "evaluation" / dataset / "results"


def load(path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------ BISON / NLVR2
def test_bison_end_to_end(eval_world, api_env):
    ann = eval_world["root"] / "evaluation/BISON/annotations/sparkles_evaluation_bison_annotations.json"
    before = ann.read_bytes()
    args = ["--sparkles_root", str(eval_world["root"]), "--cfg-path", str(eval_world["cfg"]), "--dataset", "BISON",
            "--inference", "--merge-results", "--max-new-tokens", "8", "--no-progress"]
    assert evaluate.main(args) == 0
    out = results_dir(eval_world, "BISON")
    metrics = load(out / f"BISON_{MODEL_NAME}_metrics.json")  # default naming from the checkpoint path
    result = out / metrics["files"]["results"]
    assert result.name == f"BISON_{MODEL_NAME}_acc{metrics['accuracy']:.3f}.json"
    items = load(result)
    assert [it["evaluation_id"] for it in items] == list(range(N))
    for k, it in enumerate(items):
        assert {"label", "prompt", "img_paths", "predict", "response", "sentence", "evaluation_id"} <= set(it)
        assert it["label"] == ("IMAGE#1" if k % 2 == 0 else "IMAGE#2")
        assert it["img_paths"] == [f"evaluation/BISON/images/COCO_{1000 + 2 * k}.jpg",
                                   f"evaluation/BISON/images/COCO_{1001 + 2 * k}.jpg"]
        assert it["sentence"] in it["prompt"] and it["prompt"].count("<ImageHere>") == 2
        assert it["generations"] == 1  # default protocol: no re-generation
    assert str(eval_world["root"]) not in result.read_text()  # no machine paths in result files
    assert metrics["total"] == N and metrics["unparseable"] == sum(it["predict"] is None for it in items)
    assert metrics["complete"] and metrics["settings"]["protocol"]["do_sample"] is False
    assert (out / result.name.replace(".json", ".html")).is_file()
    assert ann.read_bytes() == before
    # the shard file and manifest stay after merging
    run_dir = out / f"BISON_{MODEL_NAME}"
    assert (run_dir / f"BISON_{MODEL_NAME}_0to{N}.json").is_file()
    assert load(run_dir / "manifest.json")["shards"][0]["status"] == "done"


@pytest.fixture(scope="module")
def bison_one_by_one(eval_world):
    """BISON answered one item at a time: the reference for batching and resume checks."""
    return load(eval_run(common(eval_world, "BISON", "b1", "--inference", "--merge-results", "--batch-size", "1"))
                .result_path)


def test_batched_equals_unbatched(eval_world, api_env, bison_one_by_one):
    batched = eval_run(common(eval_world, "BISON", "b4", "--inference", "--merge-results", "--batch-size", "4"))
    assert [it["response"] for it in load(batched.result_path)] == [it["response"] for it in bison_one_by_one]
    # (SparklesEval below checks batched answers, which differ from item to item, against one-by-one ones)


def test_nlvr2_upstream_protocol_is_seeded_per_item(eval_world, api_env):
    extra = ["--protocol", "upstream", "--max-retries", "1", "--max-new-tokens", "5", "--data-to", "4"]
    whole = eval_run(common(eval_world, "NLVR2", "up_whole", "--inference", "--merge-results", *extra))
    assert whole.model_name == "up_whole"
    for i in range(2):  # the same items in two shards must give the same sampled answers
        eval_run(common(eval_world, "NLVR2", "up_shards", "--inference", "--shard", f"{i}/2", *extra))
    sharded = eval_run(common(eval_world, "NLVR2", "up_shards", "--merge-results", *extra))
    a, b = load(whole.result_path), load(sharded.result_path)
    assert [it["response"] for it in a] == [it["response"] for it in b]
    for k, it in enumerate(a):
        assert it["img_paths"] == [f"evaluation/NLVR2/images/dev-{k}-0-img0.png",
                                   f"evaluation/NLVR2/images/dev-{k}-0-img1.png"]
        assert it["label"] == ("True" if k % 3 else "False")
        # gibberish never parses: 1 + max_retries generations, then counted as unparseable
        assert (it["predict"], it["generations"]) == (None, 2)
    assert len(a) == 4 and whole.merged["unparseable"] == 4 and whole.merged["generations"] == 2 * 4
    assert len({it["response"] for it in a}) > 1
    assert whole.merged["settings"]["protocol"]["do_sample"] is True


def test_generation_crash_resumes_without_redoing_items(eval_world, api_env, bison_one_by_one, caplog):
    img = eval_world["root"] / "evaluation/BISON/images/COCO_1006.jpg"  # first image of item 3
    saved = img.read_bytes()
    img.write_bytes(b"not an image")
    try:
        assert evaluate.main(common(eval_world, "BISON", "crash", "--inference")) == 1
    finally:
        img.write_bytes(saved)
    assert re.search(r"record 3 \(evaluation_id 3\), img_paths: cannot read image .*COCO_1006.jpg", caplog.text)
    run_dir = results_dir(eval_world, "BISON") / "BISON_crash"
    shard = load(run_dir / f"BISON_crash_0to{N}.json")
    assert [it["evaluation_id"] for it in shard] == [0, 1, 2]
    assert load(run_dir / "manifest.json")["shards"][0]["status"] == "failed"
    report = eval_run(common(eval_world, "BISON", "crash", "--inference", "--merge-results"))
    assert report.stats["reused"] == 3 and report.stats["generated"] == 3
    assert load(report.result_path) == bison_one_by_one


def test_shards_merge_gaps_and_duplicates(eval_world, api_env):
    assert eval_run(common(eval_world, "NLVR2", "sh", "--inference", "--shard", "0/2")).shard == (0, 3)
    assert evaluate.main(common(eval_world, "NLVR2", "sh", "--merge-results")) == 1  # items 3..5 missing
    partial = eval_run(common(eval_world, "NLVR2", "sh", "--merge-results", "--allow-partial"))
    assert partial.merged["missing"] == 3 and partial.merged["missing_ranges"] == [[3, 6]]
    assert not partial.merged["complete"] and partial.merged["total"] == 3
    eval_run(common(eval_world, "NLVR2", "sh", "--inference", "--shard", "1/2"))
    # an overlapping range copies finished items from its sibling shards instead of generating them
    overlap = eval_run(common(eval_world, "NLVR2", "sh", "--inference", "--data-from", "2", "--data-to", "4"))
    assert overlap.stats["generated"] == 0 and overlap.stats["reused"] == 2
    merged = eval_run(common(eval_world, "NLVR2", "sh", "--merge-results"))
    assert merged.merged["complete"] and merged.merged["duplicates"] == 2 and merged.merged["total"] == N
    run_dir = results_dir(eval_world, "NLVR2") / "NLVR2_sh"
    assert sorted(p.name for p in run_dir.glob("NLVR2_sh_*.json")) == \
        ["NLVR2_sh_0to3.json", "NLVR2_sh_2to4.json", "NLVR2_sh_3to6.json"]  # nothing deleted


def test_torchrun_environment_picks_the_shard(eval_world, api_env):
    api_env.setenv("RANK", "1")
    api_env.setenv("WORLD_SIZE", "2")
    report = eval_run(common(eval_world, "BISON", "tr", "--inference"))
    assert report.shard == (3, 6)


def test_changed_settings_are_refused(eval_world, api_env):
    assert evaluate.main(common(eval_world, "BISON", "cfgchk", "--inference", "--data-to", "1")) == 0
    args = common(eval_world, "BISON", "cfgchk", "--inference", "--data-to", "1")
    args[args.index("--max-new-tokens") + 1] = "9"
    assert evaluate.main(args) == 1
    with pytest.raises(Exception, match="max_new_tokens"):
        eval_run(args)


# ------------------------------------------------------------------------------------------------ SparklesEval
def test_sparkleseval_end_to_end_with_http_judge(eval_world, api_env, tmp_path):
    with OpenAICompatServer(judge_reply) as srv:
        api_env.setenv("OPENAI_BASE_URL", srv.base_url)
        args = common(eval_world, "SparklesEval", "se", "--inference", "--merge-results", "--batch-size", "3",
                      "--gpt-cache", str(tmp_path / "cache.sqlite"))
        report = eval_run(args)
        assert srv.request_count == N
        assert all(r["model"] == "gpt-4" and r["temperature"] == 0 and r["max_tokens"] == 1024 for r in srv.requests)
        again = eval_run(args)  # nothing left to do: no generation, no judge call
        assert srv.request_count == N and again.stats["generated"] == 0 and again.stats["judge_calls"] == 0
    items = load(report.result_path)
    assert report.result_path.name == "SparklesEval_se.json"
    assert [it["evaluation_id"] for it in items] == [10 + k for k in range(N)]
    for k, it in enumerate(items):
        assert it["dialogue"][1]["content"] != f"Reference answer one of dialogue-{k}."
        assert it["gpt-4"]["A1_C123_scores"] == [round((k + 12) / 3), k + 1, 5, 6]
        assert it["gpt-4"]["A2_C123_scores"] == [round((k + 17) / 3), 7, 8, k + 2]
        assert it["dialogue"][1]["content"] in it["gpt-4"]["prompt"]
    summary = report.merged["judges"]["gpt-4"]
    assert summary["overall"] == pytest.approx(expected_overall(range(N)))
    assert report.merged["headline"]["overall"] == pytest.approx(expected_overall(range(N)))
    metrics = load(results_dir(eval_world, "SparklesEval") / "SparklesEval_se_metrics.json")
    assert metrics["judges"]["gpt-4"]["rated"] == N
    assert "sk-dummy" not in report.result_path.read_text()

    # turn 2 is conditioned on the model's own turn-1 answer, with the images of both turns
    import sparkles.models  # noqa: F401
    from sparkles.common.config import load_config
    from sparkles.engine.batch import generate_batch
    from sparkles.engine.chat import Chat
    from sparkles.models.sparkleschat import SparklesChat
    from sparkles.processors.image import build_processor

    cfg = load_config(eval_world["cfg"])
    model = SparklesChat.from_config(cfg.model, root=eval_world["root"]).eval()
    chat = Chat(model, build_processor({"name": "blip2_image_eval", "image_size": cfg.model.image_size}))
    img_dir = eval_world["root"] / "evaluation/SparklesEval/images"
    for it in items[2:4]:  # generated in batches of 3 above (one batch held items 2 and 3); here one at a time
        q1, a1, q2, a2 = it["dialogue"]
        files = lambda msg: [img_dir / f"{im['image_id']}.jpg" for im in msg["images"]]  # noqa: E731
        assert generate_batch(chat, [(q1["content"], files(q1))], max_new_tokens=8)[0] == a1["content"]
        prompt = q1["content"] + "###Assistant: " + a1["content"] + "###Human: " + q2["content"]
        assert generate_batch(chat, [(prompt, files(q1) + files(q2))], max_new_tokens=8)[0] == a2["content"]
    assert len({it["dialogue"][1]["content"] for it in items}) > 1  # answers depend on the input


def test_judge_api_failure_and_unparseable_replies_resume(eval_world, api_env, tmp_path):
    state = {"fail": True}

    def flaky(request):
        text = request["messages"][-1]["content"]
        if "dialogue-2" in text and state["fail"]:
            return Reply.error(401, "bad key")  # not retryable: the item stays unjudged
        if "dialogue-4" in text and not state.get("fix4"):
            return "I liked both answers."  # does not parse
        return judge_reply(request)

    args = common(eval_world, "SparklesEval", "se_crash", "--inference", "--merge-results", "--judge-attempts", "2",
                  "--judge-concurrency", "2", "--batch-size", "6", "--gpt-cache", str(tmp_path / "cache.sqlite"))
    with OpenAICompatServer(flaky) as srv:
        api_env.setenv("OPENAI_BASE_URL", srv.base_url)
        assert evaluate.main(args) == 3  # incomplete: re-run to continue
        # 4 good + 1 failed call + 2 attempts for the unparseable one
        assert srv.request_count == 4 + 1 + 2
        run_dir = results_dir(eval_world, "SparklesEval") / "SparklesEval_se_crash"
        shard = load(run_dir / f"SparklesEval_se_crash_0to{N}.json")
        assert load(run_dir / "manifest.json")["shards"][0]["status"] == "incomplete"
        assert sum("gpt-4" in it for it in shard) == N - 1
        failed = next(it for it in shard if it["evaluation_id"] == 14)["gpt-4"]
        assert "error" in failed and failed["response"] == "I liked both answers." and failed["attempts"] == 2
        state["fail"] = False
        report = eval_run(args)
        assert srv.request_count == 4 + 1 + 2 + 1  # only the missing judgement is asked for
        assert report.exit_code == 0 and report.stats["generated"] == 0
        s = report.merged["judges"]["gpt-4"]
        assert s["rated"] == N - 1 and s["failed"] == 1 and s["failed_ids"] == [14]
        assert s["overall"] == pytest.approx(expected_overall([0, 1, 2, 3, 5]))
        # more attempts for the failed one: attempts 1-2 replay from the cache, only attempt 3 is sent
        state["fix4"] = True
        args[args.index("--judge-attempts") + 1] = "3"
        report = eval_run(args + ["--rejudge-failed"])
        assert srv.request_count == 4 + 1 + 2 + 1 + 1
    assert report.merged["judges"]["gpt-4"]["overall"] == pytest.approx(expected_overall(range(N)))


def test_reference_dialogues_are_judged_into_results(eval_world, api_env, tmp_path):
    ann = eval_world["root"] / "evaluation/SparklesEval/annotations/sparkles_evaluation_sparkleseval_annotations.json"
    before = ann.read_bytes()
    with OpenAICompatServer(judge_reply) as srv:
        api_env.setenv("OPENAI_BASE_URL", srv.base_url)
        report = eval_run(["--sparkles_root", str(eval_world["root"]), "--dataset", "SparklesEval", "--inference",
                           "--merge-results", "--no-progress", "--gpt-cache", str(tmp_path / "c.sqlite")])
        assert srv.request_count == N
    assert report.model_name == "gpt-4"
    assert report.result_path == results_dir(eval_world, "SparklesEval") / "SparklesEval_gpt-4.json"
    items = load(report.result_path)
    assert items[0]["dialogue"][1]["content"] == "Reference answer one of dialogue-0."
    assert ann.read_bytes() == before  # the annotation file is an input: never rewritten
    assert evaluate.main(["--sparkles_root", str(eval_world["root"]), "--dataset", "BISON", "--inference"]) == 1


def test_reference_judge_on_the_synthetic_world(eval_world, api_env, tmp_path, caplog):
    # the world's judge is registered by the world's module (--imports or run.imports); on data without scenes
    # it refuses instead of inventing scores
    assert evaluate.main(["--sparkles_root", str(eval_world["root"]), "--dataset", "SparklesEval", "--inference",
                          "--imports", "sparkles.tinyworld", "--judge_models", "reference", "--model-name",
                          "refjudge", "--no-progress"]) == 1
    assert "synthetic world" in caplog.text
    import sparkles.tinyworld as synth

    root = tmp_path / "synthetic"
    synth.write_world(synth.build_world(synth.WorldConfig(seed=3, num_train=10, num_bison=2, num_nlvr2=2,
                                                          num_sparkleseval=4)), root)
    ref = eval_run(["--sparkles_root", str(root), "--dataset", "SparklesEval", "--inference", "--merge-results",
                    "--imports", "sparkles.tinyworld", "--judge_models", "reference", "--no-progress"])
    ref_score = ref.merged["judges"]["reference"]
    assert ref_score["rated"] == 4 and ref_score["overall"] >= 8  # the reference answers are right
    # the untrained tiny model (weights from the test eval_world, given as absolute paths) scores far lower
    cfg = tmp_path / "tiny_abs.yaml"
    cfg.write_text(eval_world["cfg"].read_text().replace("models/tiny_test", str(eval_world["root"] / "models/tiny_test")))
    tiny = eval_run(["--sparkles_root", str(root), "--cfg-path", str(cfg), "--dataset", "SparklesEval",
                     "--inference", "--merge-results", "--imports", "sparkles.tinyworld", "--judge_models",
                     "reference", "--max-new-tokens", "8",
                     "--batch-size", "4", "--no-progress"])
    tiny_score = tiny.merged["judges"]["reference"]
    assert tiny_score["rated"] == 4 and tiny_score["overall"] < ref_score["overall"] - 3
    assert set(tiny.merged["judges"]) == {"reference"}


# ------------------------------------------------------------------------------------------------ evaluate.sh
@pytest.mark.slow
def test_evaluate_sh_shards_on_cpu_and_merges(eval_world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHON=sys.executable, EVAL_LOG_DIR=str(tmp_path / "logs"), PATH=env.get("PATH", ""))
    if shutil.which("nvidia-smi"):
        pytest.skip("exercises the CPU path")
    proc = subprocess.run(["bash", str(REPO / "evaluate.sh"), str(eval_world["root"]), str(eval_world["cfg"]), "BISON", "2",
                           "--", "--model-name", "sh", "--max-new-tokens", "6"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wall time" in proc.stdout
    manifest = load(results_dir(eval_world, "BISON") / "BISON_sh" / "manifest.json")
    assert [(s["from"], s["to"], s["status"]) for s in manifest["shards"]] == [(0, 3, "done"), (3, 6, "done")]
    assert list(results_dir(eval_world, "BISON").glob("BISON_sh_acc*.json"))


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_equals_unbatched(eval_world, api_env):
    one = eval_run(common(eval_world, "NLVR2", "cuda1", "--inference", "--merge-results", "--device", "cuda",
                          "--batch-size", "1"))
    many = eval_run(common(eval_world, "NLVR2", "cuda3", "--inference", "--merge-results", "--device", "cuda",
                           "--batch-size", "3"))
    assert [it["response"] for it in load(one.result_path)] == [it["response"] for it in load(many.result_path)]
