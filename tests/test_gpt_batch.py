"""The OpenAI Batch API path (``--batch-api``) against the local server's files and batches endpoints: the same
answers, cache and outputs as the synchronous path at half the price, resumption after SIGKILL without a second
upload, and failed batches and error lines handled as documented in ``sparkles.gpt.batch``."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from sparkles.dialogue_gen import cli as generation_cli
from sparkles.gpt import GPTCallError, GPTClient, GPTConfig, PriceTable, SpendingCap, UsageLedger
from sparkles.gpt.batch import BatchRunner
from sparkles.testing.openai_server import BatchEnd, OpenAICompatServer, Reply
from test_dialogue_generation import DUMMY_KEY, build_cc_root, candidates_in, cc_argv, good_cc_reply, prompt_of

REPO = Path(__file__).resolve().parents[1]
PRICES = {"gpt-4": (30.0, 60.0)}
POLL = "0.05"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_ORGANIZATION", "OPENAI_API_VERSION", "SPARKLES_ROOT",
                "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)


def echo(request: dict) -> "str | Reply":
    text = request["messages"][-1]["content"]
    if text.startswith("bad"):
        return Reply.error(400, f"refused: {text}")
    if text.startswith("long"):
        return Reply("cut " + text, finish_reason="length")
    return f"answer to: {text} ({request['temperature']})"


def make_client(srv, cache: Path, *, cap: float | None = None, **overrides) -> GPTClient:
    values = dict(api_key=DUMMY_KEY, base_url=srv.base_url, backoff_base=0.01, backoff_max=0.05, timeout=5.0,
                  max_retries=2, max_tokens=50)
    values.update(overrides)
    prices = PriceTable(PRICES)
    return GPTClient(GPTConfig(**values), cache=cache, ledger=UsageLedger(prices),
                     cap=SpendingCap(cap, prices) if cap is not None else None)


def runner(client: GPTClient, messages: list | None = None, **kwargs) -> BatchRunner:
    return BatchRunner(client, poll_interval=0.0, notify=messages.append if messages is not None else None, **kwargs)


def cache_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT key, request, text, response_model, finish_reason, prompt_tokens, "
                            "completion_tokens FROM responses ORDER BY key").fetchall()


def batch_creations(srv) -> int:
    return sum(r.path.endswith("/batches") for r in srv.api_records)


def upload_lines(srv, file_id: str) -> list[dict]:
    return [json.loads(line) for line in srv.file_content(file_id).decode().splitlines()]


REQUESTS = [{"prompt": "alpha", "model": "gpt-4", "temperature": 0.0},
            {"prompt": "beta", "model": "gpt-4", "temperature": 0.7, "cache_tag": "case-1"},
            {"prompt": "long story", "model": "gpt-4"},
            {"prompt": "alpha", "model": "gpt-4", "temperature": 0.0},  # the same request again
            {"prompt": [{"role": "system", "content": "judge"}, {"role": "user", "content": "gamma"}],
             "model": "gpt-4", "max_tokens": 20, "seed": 7}]


# ------------------------------------------------------------------------------------------------ the client
def test_batch_answers_equal_sync_answers_with_the_same_cache_at_half_price(tmp_path):
    with OpenAICompatServer(echo) as srv:
        with make_client(srv, tmp_path / "sync.sqlite") as gpt:
            sync = gpt.map_chat(REQUESTS, concurrency=1)
            sync_cost = gpt.ledger.summary()
        assert srv.request_count == 4  # the repeated request is a cache hit
        srv.reset()
        messages, order = [], []
        with make_client(srv, tmp_path / "batch.sqlite") as gpt:
            batch = runner(gpt, messages).map_chat(REQUESTS, on_result=lambda i, r: order.append(i))
            batch_cost = gpt.ledger.summary()
            table = gpt.ledger.format()
        assert srv.request_count == 0 and len(srv.uploads) == 1 and batch_creations(srv) == 1
        assert order == [0, 1, 2, 3, 4]

        assert [(r.text, r.usage, r.finish_reason, r.key) for r in batch] == \
               [(r.text, r.usage, r.finish_reason, r.key) for r in sync]
        assert batch[2].truncated and batch[4].text == "answer to: gamma (1.0)"
        assert [(r.cached, r.batch) for r in batch] == [(False, True)] * 3 + [(True, False), (False, True)]
        assert cache_rows(tmp_path / "batch.sqlite") == cache_rows(tmp_path / "sync.sqlite")

        # the uploaded file: one line per distinct request, custom_id = cache key, body = the cached request
        lines = upload_lines(srv, srv.uploads[0])
        assert [line["custom_id"] for line in lines] == [r.key for r in sync[:3]] + [sync[4].key]
        cached_requests = {k: json.loads(req) for k, req, *_ in cache_rows(tmp_path / "sync.sqlite")}
        assert all(line["method"] == "POST" and line["url"] == "/v1/chat/completions" for line in lines)
        assert all(line["body"] == cached_requests[line["custom_id"]] for line in lines)
        assert lines[3]["body"]["seed"] == 7 and lines[3]["body"]["max_tokens"] == 20
        assert srv.batches[0]["endpoint"] == "/v1/chat/completions" and srv.batches[0]["completion_window"] == "24h"

        # the ledger: same tokens, batch calls at half the synchronous price
        s, b = sync_cost["total"], batch_cost["total"]
        assert (b["calls"], b["batch_calls"], b["cached_calls"]) == (4, 4, 1) and s["batch_calls"] == 0
        assert (b["prompt_tokens"], b["completion_tokens"]) == (s["prompt_tokens"], s["completion_tokens"])
        assert s["cost_usd"] == pytest.approx((s["prompt_tokens"] * 30 + s["completion_tokens"] * 60) / 1e6)
        assert b["cost_usd"] == pytest.approx(0.5 * s["cost_usd"]) and b["saved_usd"] == pytest.approx(s["saved_usd"])
        assert batch[0].cost_usd == pytest.approx(0.5 * sync[0].cost_usd)
        assert "batch" in table.splitlines()[0] and "Batch API, priced at 0.5 x" in table
        assert not list(tmp_path.glob("*.batch-*.json"))  # the state file is gone once filed
        assert any("submitted batch" in m for m in messages)

        # each path's cache answers the other: no HTTP at all
        srv.reset()
        with make_client(srv, tmp_path / "batch.sqlite") as gpt:
            assert all(r.cached for r in gpt.map_chat(REQUESTS))
        with make_client(srv, tmp_path / "sync.sqlite") as gpt:
            again = runner(gpt).map_chat(REQUESTS)
            assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in sync]
        assert srv.request_count == 0 and srv.api_records == []


def test_batches_are_split_at_the_request_and_size_limits(tmp_path):
    requests = [{"prompt": f"item {i} " + "x" * (40 if i == 3 else 0), "model": "gpt-4"} for i in range(5)]
    with OpenAICompatServer(echo) as srv:
        with make_client(srv, tmp_path / "a.sqlite") as gpt:
            results = runner(gpt, max_requests=2).map_chat(requests)
        assert [len(upload_lines(srv, f)) for f in srv.uploads] == [2, 2, 1]
        assert [r.text for r in results] == [f"answer to: {r['prompt']} (1.0)" for r in requests]
        sizes = sorted(len(line) + 1 for f in srv.uploads for line in srv.file_content(f).splitlines())
        limit = sizes[-1] + sizes[0]  # room for two lines, never for three
        with make_client(srv, tmp_path / "b.sqlite") as gpt:  # the same requests, the same lines
            results = runner(gpt, max_bytes=limit).map_chat(requests)
        files = srv.uploads[3:]
        assert all(len(srv.file_content(f)) <= limit for f in files) and len(files) == 3
        assert sum(len(upload_lines(srv, f)) for f in files) == 5 and all(not isinstance(r, Exception) for r in results)
        # a batch input file names one model: requests for two models go in two files
        mixed = [{"prompt": f"m{i}", "model": "gpt-4" if i % 2 else "gpt-3.5-turbo"} for i in range(4)]
        with make_client(srv, tmp_path / "m.sqlite") as gpt:
            results = runner(gpt).map_chat(mixed)
        models = [{line["body"]["model"] for line in upload_lines(srv, f)} for f in srv.uploads[6:]]
        assert sorted(models, key=sorted) == [{"gpt-3.5-turbo"}, {"gpt-4"}]
        assert [(r.text, r.model) for r in results] == [(f"answer to: m{i} (1.0)", m["model"])
                                                        for i, m in enumerate(mixed)]


def test_spending_cap_holds_back_requests_at_their_batch_estimate(tmp_path):
    with OpenAICompatServer(echo) as srv, make_client(srv, tmp_path / "c.sqlite", cap=1.0) as gpt:
        one = SpendingCap(1.0, gpt.ledger.prices).estimate(gpt.build_request("p0", model="gpt-4"), batch=True)
        assert one == pytest.approx(0.5 * SpendingCap(1.0, gpt.ledger.prices).estimate(
            gpt.build_request("p0", model="gpt-4")))
        gpt.cap.max_usd = 2.5 * one  # room for two requests at batch prices, not three
        results = runner(gpt).map_chat([{"prompt": f"p{i}", "model": "gpt-4"} for i in range(4)])
        assert [type(r).__name__ for r in results] == ["ChatResult", "ChatResult", "GPTCallError", "GPTCallError"]
        assert results[2].kind == "budget" and "batch prices" in str(results[2])
        assert len(upload_lines(srv, srv.uploads[0])) == 2
        assert gpt.cap.reserved == pytest.approx(0.0)
        assert gpt.cap.spent == pytest.approx(results[0].cost_usd + results[1].cost_usd)


def test_azure_batches_name_the_deployment_and_the_unversioned_route(tmp_path):
    with OpenAICompatServer(echo) as srv:
        config = GPTConfig(api_key=DUMMY_KEY, azure_endpoint=srv.endpoint, backoff_base=0.01)
        with GPTClient(config, cache=tmp_path / "az.sqlite") as gpt:
            (result,) = runner(gpt).map_chat([{"prompt": "hello", "model": "gpt-3.5-turbo"}])
        assert result.text == "answer to: hello (1.0)" and result.model == "gpt-3.5-turbo"
        (line,) = upload_lines(srv, srv.uploads[0])
        assert line["url"] == "/chat/completions" and line["body"]["model"] == "gpt-35-turbo"
        assert srv.batches[0]["endpoint"] == "/chat/completions"
        assert {r.path for r in srv.api_records} >= {"/openai/files", "/openai/batches"}


# ------------------------------------------------------------------------------------------------ failures
def test_error_lines_and_a_failed_batch_are_reported_and_not_cached(tmp_path):
    requests = [{"prompt": "fine", "model": "gpt-4"}, {"prompt": "bad one", "model": "gpt-4"},
                {"prompt": "also fine", "model": "gpt-4"}]
    messages: list = []
    with OpenAICompatServer(echo) as srv, make_client(srv, tmp_path / "c.sqlite") as gpt:
        srv.enqueue(Reply.error(429))  # the first line of the batch is refused for its rate limit
        results = runner(gpt, messages).map_chat(requests)
        assert isinstance(results[0], GPTCallError) and results[0].kind == "rate_limit" and results[0].status == 429
        assert isinstance(results[1], GPTCallError) and results[1].kind == "bad_request"
        assert "refused: bad one" in str(results[1]) and srv.batches[0]["id"] in str(results[1])
        assert results[2].text == "answer to: also fine (1.0)"
        assert len(gpt.cache) == 1 and any("2 request(s) failed" in m for m in messages)

        # the next run submits the failed requests again, and only those
        results = runner(gpt).map_chat(requests)
        assert [line["body"]["messages"][-1]["content"] for line in upload_lines(srv, srv.uploads[1])] == \
               ["fine", "bad one"]
        assert results[0].text == "answer to: fine (1.0)" and results[2].cached
        assert isinstance(results[1], GPTCallError)

        # a batch that fails as a whole: every request fails with its status, nothing is cached
        srv.script_batches(BatchEnd("failed"))
        messages.clear()
        results = runner(gpt, messages).map_chat([{"prompt": "p1", "model": "gpt-4"}, {"prompt": "p2"}])
        assert all(isinstance(r, GPTCallError) and r.kind == "batch_failed" for r in results)
        assert any("ended failed" in m for m in messages) and len(gpt.cache) == 2
        srv.script_batches(BatchEnd("failed"))
        with pytest.raises(GPTCallError, match="ended failed"):
            runner(gpt).map_chat([{"prompt": "p3"}], return_exceptions=False)
        assert not list(tmp_path.glob("*.batch-*.json"))


def interrupt(_seconds):
    """A ``sleep`` that is interrupted (Ctrl-C while a run waits for its batch)."""
    raise KeyboardInterrupt


def test_an_interrupted_run_reattaches_and_resubmits_what_an_expired_batch_left(tmp_path):
    requests = [{"prompt": f"q{i}", "model": "gpt-4"} for i in range(3)]
    with OpenAICompatServer(echo) as srv, make_client(srv, tmp_path / "c.sqlite") as gpt:
        srv.hold_batches()
        srv.script_batches(BatchEnd("expired", answered=1))
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while waiting
            BatchRunner(gpt, poll_interval=1.0, sleep=interrupt).map_chat(requests)
        (state_file,) = tmp_path.glob("c.sqlite.batch-*.json")
        state = json.loads(state_file.read_text())
        assert state["batch_id"] == srv.batches[0]["id"] and state["input_file_id"] == srv.uploads[0]
        assert state["keys"] == [line["custom_id"] for line in upload_lines(srv, srv.uploads[0])]
        assert srv.batches[0]["status"] == "in_progress" and len(gpt.cache) == 0

        srv.release_batches()
        messages: list = []
        results = runner(gpt, messages).map_chat(requests)
        assert [r.text for r in results] == [f"answer to: q{i} (1.0)" for i in range(3)]
        assert any(f"re-attaching to batch {state['batch_id']}" in m for m in messages)
        assert any("ended expired" in m and "submitted again" in m for m in messages)
        # one upload for the first try, one for the two requests the expired batch did not run
        assert [len(upload_lines(srv, f)) for f in srv.uploads] == [3, 2] and batch_creations(srv) == 2
        assert [r.batch for r in results] == [True, True, True] and not state_file.exists()


def test_a_restarted_run_submits_its_new_requests_while_the_earlier_batch_runs(tmp_path):
    first = [{"prompt": f"q{i}", "model": "gpt-4"} for i in range(2)]
    with OpenAICompatServer(echo) as srv, make_client(srv, tmp_path / "c.sqlite") as gpt:
        srv.hold_batches()
        with pytest.raises(KeyboardInterrupt):
            BatchRunner(gpt, poll_interval=1.0, sleep=interrupt).map_chat(first)

        batches_at_first_wait: list[int] = []

        def wait(_seconds):
            batches_at_first_wait.append(batch_creations(srv))
            srv.release_batches()

        requests = first + [{"prompt": "q2", "model": "gpt-4"}]
        results = BatchRunner(gpt, poll_interval=1.0, sleep=wait).map_chat(requests)
        assert [r.text for r in results] == [f"answer to: q{i} (1.0)" for i in range(3)]
        # the new request was submitted before the run waited for the earlier batch, and only it
        assert batches_at_first_wait[0] == 2
        assert [len(upload_lines(srv, f)) for f in srv.uploads] == [2, 1] and not list(tmp_path.glob("*.batch-*"))


# ------------------------------------------------------------------------------------------------ generation
def cc_reply(request: dict) -> str:
    """Good dialogues, except for prompts whose first candidate id is odd (those replies do not parse)."""
    if int(candidates_in(prompt_of(request))[0]) % 2:
        return "I cannot help with that."
    return good_cc_reply(request)


def exported(out: Path) -> dict[str, bytes]:
    """The files generation exports (the summary and cost files name paths and prices, so they are left out)."""
    skip = ("_summary.json", "_cost.json", "_files.json")
    return {p.name: p.read_bytes() for p in sorted(out.glob("SparklesDialogueCC*.json")) if not p.name.endswith(skip)}


def sync_generation(tmp_path: Path, srv, monkeypatch, cases: int) -> tuple[dict, dict]:
    root = build_cc_root(tmp_path / "sync_root")
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    assert generation_cli.main(cc_argv(root, cases)) == 0
    out = root / "data/SparklesDialogueCC/generated"
    return exported(out), json.loads((out / "SparklesDialogueCC_cost.json").read_text())


def test_generation_through_batches_exports_what_the_synchronous_run_exports(tmp_path, monkeypatch, capsys):
    with OpenAICompatServer(cc_reply) as srv:
        sync_files, sync_cost = sync_generation(tmp_path, srv, monkeypatch, 4)
        sync_calls = srv.request_count
        root = build_cc_root(tmp_path / "batch_root")
        out = root / "data/SparklesDialogueCC/generated"
        capsys.readouterr()
        assert generation_cli.main(cc_argv(root, 4, "--batch-api", "--batch_poll_interval", POLL)) == 0
        printed = capsys.readouterr()
        assert srv.request_count == sync_calls == 4 and len(srv.uploads) == 1 and batch_creations(srv) == 1
        assert len(upload_lines(srv, srv.uploads[0])) == 4
    assert exported(out) == sync_files
    summary = json.loads((out / "SparklesDialogueCC_summary.json").read_text())
    assert summary["calls"] == {"planned": 4, "already_done": 0, "new": 4, "failed": 0}
    assert 0 < summary["dialogues"]["accepted"] < 12 and summary["dialogues"]["rejected"] > 0
    cost = json.loads((out / "SparklesDialogueCC_cost.json").read_text())
    for part in ("this_run", "all_raw_calls"):
        assert cost[part]["total"]["cost_usd"] == pytest.approx(0.5 * sync_cost[part]["total"]["cost_usd"])
        assert cost[part]["total"]["prompt_tokens"] == sync_cost[part]["total"]["prompt_tokens"]
    assert cost["this_run"]["total"]["batch_calls"] == 4
    assert "Batch API prices" in printed.out and "submitted batch" in printed.err


def test_killed_batch_generation_reattaches_to_its_batch(tmp_path, monkeypatch):
    """SIGKILL while the batch is in flight, then the same command: no second upload, no second batch."""
    with OpenAICompatServer(cc_reply) as srv:
        sync_files, _ = sync_generation(tmp_path, srv, monkeypatch, 4)
        srv.reset()
        root = build_cc_root(tmp_path / "batch_root")
        out = root / "data/SparklesDialogueCC/generated"
        argv = cc_argv(root, 4, "--batch-api", "--batch_poll_interval", POLL)
        srv.hold_batches()
        env = {**os.environ, "OPENAI_API_KEY": DUMMY_KEY, "OPENAI_BASE_URL": srv.base_url,
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, "dataset/generate_SparklesDialogue.py", *argv], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # the client writes its state file before its first poll: from then on it waits for the batch
            waited = srv.wait_for(lambda s: s.batch_polls >= 1 or proc.poll() is not None, timeout=120)
        finally:
            proc.kill()
        stderr = proc.communicate(timeout=30)[1].decode()
        assert waited and proc.returncode == -9, stderr
        (state_file,) = out.glob("gpt_cache.sqlite.batch-*.json")
        assert json.loads(state_file.read_text())["batch_id"] == srv.batches[0]["id"]
        assert not (out / "SparklesDialogueCC_raw.jsonl").exists()
        assert len(srv.uploads) == 1 and batch_creations(srv) == 1 and srv.batch_requests == []

        srv.release_batches()
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        assert generation_cli.main(argv) == 0
        assert len(srv.uploads) == 1 and batch_creations(srv) == 1  # re-attached: nothing uploaded or paid again
        assert len(srv.batch_requests) == 4 and srv.request_count == 0
    assert exported(out) == sync_files
    assert not state_file.exists()
    summary = json.loads((out / "SparklesDialogueCC_summary.json").read_text())
    assert summary["calls"]["new"] == 4 and summary["calls"]["failed"] == 0


def test_generation_reports_a_failed_batch_line_and_submits_it_on_the_next_run(tmp_path, monkeypatch, capsys):
    root = build_cc_root(tmp_path / "root")
    out = root / "data/SparklesDialogueCC/generated"
    argv = cc_argv(root, 2, "--batch-api", "--batch_poll_interval", POLL)
    with OpenAICompatServer(good_cc_reply) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        srv.enqueue(Reply.error(500))  # the first line of the batch
        assert generation_cli.main(argv) == 1
        summary = json.loads((out / "SparklesDialogueCC_summary.json").read_text())
        assert summary["calls"] == {"planned": 2, "already_done": 0, "new": 1, "failed": 1}
        (failed,) = summary["failed_calls"]
        assert failed["case_id"] == "CC-00000" and failed["kind"] == "server_error" and failed["status"] == 500
        assert srv.batches[0]["id"] in failed["error"] and "run the same command again" in capsys.readouterr().err
        assert generation_cli.main(argv) == 0
        assert [len(upload_lines(srv, f)) for f in srv.uploads] == [2, 1] and srv.request_count == 0
    summary = json.loads((out / "SparklesDialogueCC_summary.json").read_text())
    assert summary["calls"]["already_done"] == 1 and summary["dialogues"]["accepted"] == 6


# ------------------------------------------------------------------------------------------------ the judge
N_DIALOGUES = 5


def sparkleseval_root(root: Path) -> Path:
    items = []
    for k in range(N_DIALOGUES):
        a, b, c = 3 * k + 1, 3 * k + 2, 3 * k + 3
        slot = "<Img><ImageHere></Img>"
        items.append({"evaluation_id": 100 + k, "dialogue": [
            {"role": "user", "content": f"Compare IMAGE#{a}{slot} and IMAGE#{b}{slot} (dialogue-{k}).",
             "images": [{"image_id": a, "caption": f"caption {a}"}, {"image_id": b, "caption": f"caption {b}"}]},
            {"role": "assistant", "content": f"First answer of dialogue-{k}."},
            {"role": "user", "content": f"Add IMAGE#{c}{slot}.", "images": [{"image_id": c, "caption": "c"}]},
            {"role": "assistant", "content": f"Second answer of dialogue-{k}."}]})
    path = root / "evaluation/SparklesEval/annotations/sparkles_evaluation_sparkleseval_annotations.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(items))
    return root


def scripted_judge():
    """Ratings from the dialogue number k; dialogue-1's first reply and every dialogue-2 reply do not parse,
    dialogue-3 is refused (an API error: its judgement stays unrecorded)."""
    asked: dict[int, int] = {}

    def reply(request):
        k = int(re.search(r"dialogue-(\d+)", request["messages"][-1]["content"]).group(1))
        asked[k] = asked.get(k, 0) + 1
        if k == 3:
            return Reply.error(400, "refused")
        if k == 2 or (k == 1 and asked[k] == 1):
            return "Both answers are fine."
        return "".join(f"* Evaluating {name}\n" + "".join(f'- (C{i + 1}) Explanation: "ok" Rating: [[{v}]]\n'
                                                           for i, v in enumerate(c))
                       + f"Therefore, the overall rating of {name} is [[{c[0]}]]\n"
                       for name, c in (("A1", [k + 1, 5, 6]), ("A2", [7, 8, k + 2])))
    return reply


def judge_run(root: Path, tmp_path: Path, name: str, *extra: str):
    args = ["--sparkles_root", str(root), "--dataset", "SparklesEval", "--inference", "--merge-results",
            "--no-progress", "--model-name", name, "--judge-attempts", "2", "--gpt-cache",
            str(tmp_path / f"{name}.sqlite"), *extra]
    code = evaluate.main(args)
    results = root / "evaluation/SparklesEval/results"
    return code, json.loads((results / f"SparklesEval_{name}.json").read_text()), \
        json.loads((results / f"SparklesEval_{name}_metrics.json").read_text())


def test_judge_rates_all_pending_dialogues_in_one_batch_per_attempt(tmp_path, monkeypatch):
    root = sparkleseval_root(tmp_path / "root")
    with OpenAICompatServer(scripted_judge()) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        sync_code, sync_items, sync_metrics = judge_run(root, tmp_path, "sync", "--allow-partial")
        assert srv.request_count == N_DIALOGUES + 2  # two attempts for dialogues 1 and 2
    with OpenAICompatServer(scripted_judge()) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        code, items, metrics = judge_run(root, tmp_path, "batch", "--allow-partial", "--batch-api",
                                         "--batch-poll-interval", POLL)
        assert srv.request_count == 0 and batch_creations(srv) == 2
        assert [len(upload_lines(srv, f)) for f in srv.uploads] == [N_DIALOGUES, 2]
    assert code == sync_code == 3  # dialogue-3 could not be judged: run again to continue
    assert items == sync_items
    assert "gpt-4" not in items[3] and items[2]["gpt-4"]["attempts"] == 2 and items[1]["gpt-4"]["A1_C123_scores"]
    assert metrics["judges"] == sync_metrics["judges"]
    assert metrics["judges"]["gpt-4"]["rated"] == 3 and metrics["judges"]["gpt-4"]["failed"] == 1
    with sqlite3.connect(tmp_path / "batch.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == N_DIALOGUES + 1


def test_a_reattached_batch_files_every_answer_and_an_unknown_batch_is_submitted_afresh(tmp_path):
    requests = [{"prompt": f"r{i}", "model": "gpt-4"} for i in range(3)]
    with OpenAICompatServer(echo) as srv, make_client(srv, tmp_path / "c.sqlite") as gpt:
        srv.hold_batches()
        with pytest.raises(KeyboardInterrupt):
            BatchRunner(gpt, poll_interval=1.0, sleep=interrupt).map_chat(requests)
        srv.release_batches()
        (first,) = runner(gpt).map_chat(requests[:1])  # a run that needs one of the batch's three answers
        assert first.text == "answer to: r0 (1.0)" and len(srv.uploads) == 1
        # the other two are filed too, with their requests read back from the batch's input file
        assert len(gpt.cache) == 3 and f"/v1/files/{srv.uploads[0]}/content" in {r.path for r in srv.api_records}
        assert gpt.ledger.summary()["total"]["batch_calls"] == 3
        assert all(r.cached for r in gpt.map_chat(requests))

        # a state file naming a batch this endpoint does not know: reported, removed, submitted again
        key = gpt.key_for(gpt.build_request("new", model="gpt-4"))
        stale = tmp_path / "c.sqlite.batch-batch_gone.json"
        stale.write_text(json.dumps({"batch_id": "batch_gone", "input_file_id": "file_gone", "model": "gpt-4",
                                     "keys": [key]}))
        messages: list = []
        (result,) = runner(gpt, messages).map_chat([{"prompt": "new", "model": "gpt-4"}])
        assert result.text == "answer to: new (1.0)" and result.key == key and len(srv.uploads) == 2
        assert any("unknown to the API (HTTP 404)" in m for m in messages) and not stale.exists()
