"""GPT client against a local OpenAI-compatible server: real openai SDK, real HTTP on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest

from sparkles.gpt import (ChatRequest, GPTCallError, GPTClient, GPTConfig, MissingAPIKeyError, PriceTable,
                          UsageLedger)
from sparkles.common.io import read_jsonl, atomic_write_json
from sparkles.testing.openai_server import OpenAICompatServer, Reply

DUMMY_KEY = "sk-test-DUMMYKEY0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_ORGANIZATION", "OPENAI_API_VERSION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)


@pytest.fixture
def server():
    with OpenAICompatServer(lambda req: "answer to: " + req["messages"][-1]["content"]) as srv:
        yield srv


def make_client(srv, tmp_path, *, cache=True, prices=None, **overrides) -> GPTClient:
    values = dict(api_key=DUMMY_KEY, base_url=srv.base_url, backoff_base=0.01, backoff_max=0.05, timeout=2.0,
                  max_retries=3)
    values.update(overrides)
    ledger = UsageLedger(PriceTable(prices)) if prices is not None else None
    return GPTClient(GPTConfig(**values), cache=str(tmp_path / "cache.sqlite") if cache else None, ledger=ledger)


def test_chat_sends_the_exact_request_and_reports_usage(server, tmp_path):
    with make_client(server, tmp_path) as gpt:
        result = gpt.chat("name three red fruits", model="gpt-3.5-turbo", temperature=0.3, max_tokens=77,
                          top_p=0.9, frequency_penalty=0.5)
    assert result.text == "answer to: name three red fruits"
    assert (result.cached, result.model, result.attempts, result.finish_reason) == (False, "gpt-3.5-turbo", 1, "stop")
    (body,) = server.requests
    assert body["model"] == "gpt-3.5-turbo"
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["frequency_penalty"]) == (0.3, 77, 0.9, 0.5)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"] == "name three red fruits"
    # the server counts words as tokens
    expected_prompt = sum(len(m["content"].split()) for m in body["messages"])
    assert result.usage.prompt_tokens == expected_prompt
    assert result.usage.completion_tokens == len(result.text.split())
    assert result.usage.total_tokens == expected_prompt + len(result.text.split())


def test_message_list_prompt_is_sent_as_given(server, tmp_path):
    msgs = [{"role": "system", "content": "judge strictly"}, {"role": "user", "content": "score this"}]
    with make_client(server, tmp_path, cache=False) as gpt:
        assert gpt.chat(msgs, model="gpt-4").text == "answer to: score this"
    assert server.requests[0]["messages"] == msgs


def test_cache_hit_skips_http_and_survives_a_new_client(server, tmp_path):
    with make_client(server, tmp_path) as gpt:
        first = gpt.chat("hello", model="gpt-4", temperature=1.0)
        second = gpt.chat("hello", model="gpt-4", temperature=1.0)
        assert (first.cached, second.cached) == (False, True)
        assert second.text == first.text and second.usage == first.usage
        assert server.request_count == 1
        gpt.chat("hello", model="gpt-4", temperature=0.0)  # another parameter = another request
        gpt.chat("hello", model="gpt-4", temperature=1.0, cache_tag="case-2")  # another tag = another sample
        assert server.request_count == 3
    with make_client(server, tmp_path) as again:  # a later run on the same cache file
        assert again.chat("hello", model="gpt-4", temperature=1.0).cached
        s = again.ledger.summary()["models"]["gpt-4"]
        assert (s["calls"], s["cached_calls"]) == (0, 1)
    assert server.request_count == 3


def test_retryable_errors_are_retried_with_the_same_model_and_parameters(server, tmp_path):
    server.enqueue(Reply.error(429, retry_after=0.01), Reply.error(500), Reply.error(503))
    with make_client(server, tmp_path) as gpt:
        result = gpt.chat("retry me", model="gpt-3.5-turbo", temperature=0.2, max_tokens=10)
    assert result.text == "answer to: retry me" and result.attempts == 4
    assert server.request_count == 4
    bodies = server.requests
    assert all(b == bodies[0] for b in bodies)  # upstream switched to gpt-4 on retry; we never do
    assert bodies[0]["model"] == "gpt-3.5-turbo"


def test_exhausted_retries_raise_and_cache_nothing(server, tmp_path):
    server.enqueue(*[Reply.error(500)] * 4)
    with make_client(server, tmp_path, max_retries=3) as gpt:
        with pytest.raises(GPTCallError) as info:
            gpt.chat("doomed", model="gpt-4")
        err = info.value
        assert (err.attempts, err.status, err.kind, err.retryable, err.model) == (4, 500, "server_error", True, "gpt-4")
        assert server.request_count == 4
        assert gpt.chat("doomed", model="gpt-4").cached is False  # the failure was not cached
    assert server.request_count == 5


@pytest.mark.parametrize("status,kind", [(401, "auth"), (403, "auth"), (400, "bad_request"), (404, "bad_request")])
def test_non_retryable_errors_fail_at_once(server, tmp_path, status, kind):
    server.enqueue(Reply.error(status, f"Incorrect API key provided: {DUMMY_KEY}"))
    with make_client(server, tmp_path) as gpt:
        with pytest.raises(GPTCallError) as info:
            gpt.chat("x", model="gpt-4")
    assert server.request_count == 1
    assert (info.value.kind, info.value.status, info.value.retryable, info.value.attempts) == (kind, status, False, 1)
    assert DUMMY_KEY not in str(info.value) and DUMMY_KEY[:12] not in str(info.value)


def test_timeout_is_retried(server, tmp_path):
    server.enqueue(Reply.timeout(1.5))
    with make_client(server, tmp_path, timeout=0.25) as gpt:
        t0 = time.monotonic()
        result = gpt.chat("slow", model="gpt-4")
    assert result.attempts == 2 and server.request_count == 2
    assert time.monotonic() - t0 < 1.4  # gave up on the slow attempt instead of waiting for it


def test_malformed_bodies_are_retried_and_content_filter_is_not(server, tmp_path):
    server.enqueue(Reply.malformed('{"choices": ['), Reply.malformed('{"id": "x", "choices": []}'))
    with make_client(server, tmp_path) as gpt:
        assert gpt.chat("m", model="gpt-4").attempts == 3
        filtered = json.dumps({"id": "x", "model": "gpt-4", "choices": [
            {"index": 0, "finish_reason": "content_filter", "message": {"role": "assistant", "content": None}}]})
        server.enqueue(Reply.malformed(filtered))
        with pytest.raises(GPTCallError) as info:
            gpt.chat("f", model="gpt-4")
    assert info.value.kind == "content_filter" and info.value.attempts == 1
    assert server.request_count == 4


def test_backoff_is_exponential_bounded_and_honours_retry_after():
    gpt = GPTClient(GPTConfig(api_key=DUMMY_KEY, backoff_base=1.0, backoff_max=8.0), cache=None)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [gpt.backoff_delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert gpt.backoff_delay(1, retry_after=5.0) == 5.0
    assert gpt.backoff_delay(1, retry_after=100.0) == 8.0  # capped


def test_map_chat_limits_concurrency_keeps_order_and_reports_each_result(tmp_path):
    def slow(req):
        return Reply("done " + req["messages"][-1]["content"], delay=0.15)

    seen = []
    with OpenAICompatServer(slow) as srv, make_client(srv, tmp_path) as gpt:
        t0 = time.monotonic()
        results = gpt.map_chat([{"prompt": f"q{i}", "model": "gpt-4"} for i in range(9)], concurrency=3,
                               on_result=lambda i, r: seen.append(i))
        elapsed = time.monotonic() - t0
        assert [r.text for r in results] == [f"done q{i}" for i in range(9)]
        assert srv.max_in_flight == 3
        assert sorted(seen) == list(range(9))
        assert elapsed < 9 * 0.15  # really parallel
        # the client's own limit caps callers that ask for more threads
        srv.reset()
        limited = make_client(srv, tmp_path, cache=False, concurrency=2)
        limited.map_chat([ChatRequest(prompt=f"p{i}") for i in range(6)], concurrency=6)
        assert srv.max_in_flight == 2
        limited.close()


def test_map_chat_returns_failures_in_place(server, tmp_path):
    def reply(req):
        text = req["messages"][-1]["content"]
        return Reply.error(400, "bad prompt") if text == "bad" else "fine"

    server.set_reply(reply)
    with make_client(server, tmp_path) as gpt:
        results = gpt.map_chat([{"prompt": "a"}, {"prompt": "bad"}, {"prompt": "c"}], concurrency=2)
        assert [type(r).__name__ for r in results] == ["ChatResult", "GPTCallError", "ChatResult"]
        with pytest.raises(GPTCallError):
            gpt.map_chat([{"prompt": "bad", "cache_tag": "again"}], return_exceptions=False)


def test_cost_summary_adds_up(server, tmp_path):
    prices = {"gpt-4": (30.0, 60.0), "gpt-3.5-turbo": {"input_per_1m": 0.5, "output_per_1m": 1.5}}
    usage = {"prompt_tokens": 1000, "completion_tokens": 500}
    server.enqueue(Reply("a", usage=usage), Reply("b", usage=usage), Reply("c", usage=usage), Reply("d", usage=usage))
    with make_client(server, tmp_path, prices=prices) as gpt:
        r1 = gpt.chat("one", model="gpt-4")
        gpt.chat("two", model="gpt-4-0613")  # a dated snapshot is priced as its family
        gpt.chat("three", model="gpt-3.5-turbo")
        gpt.chat("four", model="my-local-model")
        cached = gpt.chat("one", model="gpt-4")
        summary = gpt.ledger.summary()
        table = gpt.ledger.format()
    assert r1.cost_usd == pytest.approx(0.06) and cached.cached and cached.cost_usd == pytest.approx(0.06)
    m = summary["models"]
    assert m["gpt-4"]["cost_usd"] == pytest.approx(0.06) and m["gpt-4"]["saved_usd"] == pytest.approx(0.06)
    assert m["gpt-4-0613"]["cost_usd"] == pytest.approx(0.06)
    assert m["gpt-3.5-turbo"]["cost_usd"] == pytest.approx(0.00125)
    assert m["my-local-model"]["cost_usd"] is None
    t = summary["total"]
    assert t["cost_usd"] == pytest.approx(0.06 + 0.06 + 0.00125)
    assert t["cost_usd"] == pytest.approx(sum(v["cost_usd"] or 0 for v in m.values()))
    assert (t["calls"], t["cached_calls"], t["prompt_tokens"], t["completion_tokens"]) == (4, 1, 4000, 2000)
    assert summary["unpriced_models"] == ["my-local-model"]
    assert "my-local-model" in table and f"{0.06 + 0.06 + 0.00125:.4f}" in table
    path = atomic_write_json(tmp_path / "cost.json", summary)
    assert json.loads(path.read_text()) == json.loads(json.dumps(summary))


def test_price_table_file(tmp_path):
    (tmp_path / "prices.json").write_text(json.dumps({"my-model": {"input_per_1m": 2, "output_per_1m": 4}}))
    table = PriceTable.from_file(tmp_path / "prices.json")
    assert table.lookup("my-model").cost(1_000_000, 500_000) == pytest.approx(4.0)
    assert table.lookup("gpt-4") is not None
    (tmp_path / "bad.json").write_text(json.dumps({"m": {"input": 1}}))
    with pytest.raises(ValueError, match="'m'"):
        PriceTable.from_file(tmp_path / "bad.json")


def test_from_env_needs_a_key_and_uses_base_url_and_organization(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
        GPTClient.from_env()
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_ORGANIZATION", "org-sparkles")
    with GPTClient.from_env(backoff_base=0.01) as gpt:
        assert gpt.chat("via env", model="gpt-4").text == "answer to: via env"
        assert "DUMMYKEY" not in repr(gpt.config)
    headers = {k.lower(): v for k, v in server.records[0].headers.items()}
    assert headers["openai-organization"] == "org-sparkles"
    assert server.records[0].path == "/v1/chat/completions"
    from sparkles.gpt import redact
    assert redact("see https://user:pw@host/v1 with sk-abcdef123456") == "see https://***@host/v1 with ***"
    with pytest.raises(KeyError, match="colour"):
        GPTConfig.from_mapping({"api_key": "x", "colour": "red"})


def test_azure_mode_from_openai_api_base(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_BASE", server.endpoint)
    with GPTClient.from_env() as gpt:
        result = gpt.chat("azure?", model="gpt-3.5-turbo")
    assert result.model == "gpt-3.5-turbo"
    rec = server.records[0]
    assert rec.path == "/openai/deployments/gpt-35-turbo/chat/completions"
    assert rec.query["api-version"] == GPTConfig().azure_api_version
    assert {k.lower(): v for k, v in rec.headers.items()}["api-key"] == DUMMY_KEY
    with GPTClient.from_env(azure_deployment="my-gpt4", azure_api_version="2024-10-21") as gpt:
        gpt.chat("again", model="gpt-4")
    assert server.records[1].path == "/openai/deployments/my-gpt4/chat/completions"
    assert server.records[1].query["api-version"] == "2024-10-21"


def test_api_key_never_reaches_logs_cache_or_errors(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="sparkles.gpt")
    server.enqueue(Reply.error(429, f"slow down {DUMMY_KEY}"), Reply.error(401, f"Incorrect API key {DUMMY_KEY}"))
    with make_client(server, tmp_path) as gpt:
        with pytest.raises(GPTCallError) as info:
            gpt.chat("secret?", model="gpt-4")
        gpt.chat("fine", model="gpt-4")
        atomic_write_json(tmp_path / "cost.json", gpt.ledger.summary())
    assert "retry 1/3" in caplog.text
    for text in (caplog.text, str(info.value), json.dumps(info.value.to_dict()),
                 (tmp_path / "cache.sqlite").read_bytes().decode("latin-1"), (tmp_path / "cost.json").read_text()):
        assert DUMMY_KEY not in text and "DUMMYKEY" not in text


def test_server_models_route_and_broken_reply_function(tmp_path):
    def broken(req):
        raise RuntimeError("helper bug")

    import openai

    with OpenAICompatServer(broken, model_list=("gpt-4", "local")) as srv:
        sdk = openai.OpenAI(base_url=srv.base_url, api_key=DUMMY_KEY, max_retries=0)
        assert [m.id for m in sdk.models.list()] == ["gpt-4", "local"]
        with pytest.raises(openai.InternalServerError, match="helper bug"):
            sdk.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
        sdk.close()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_call_gpt_api_script(server, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    script = _load_script("call_gpt_api")
    assert script.main(["hi there", "--model", "gpt-3.5-turbo", "--temperature", "0", "--usage"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "answer to: hi there"
    assert "gpt-3.5-turbo" in out.err
    assert server.requests[0]["model"] == "gpt-3.5-turbo" and server.requests[0]["temperature"] == 0
    assert script.call_gpt("compat", model="gpt-4") == "answer to: compat"
    server.enqueue(Reply.error(401))
    assert script.main(["x"]) == 1 and "auth" in capsys.readouterr().err


def test_jsonl_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": "cut', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)
