"""The API server's limits and access rules, over real loopback HTTP (httpx, raw sockets, the ``openai`` client).

A tiny random SparklesChat whose generation never stops early (no stop strings, no end-of-sequence) serves a
server with small limits, an API key and the loopback Host allow-list. Raw sockets hold requests half-sent
or hang up on purpose, so the queue and the cancellation are observed through the server's own counters,
never through timing.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from sparkles.engine.decoding import GenerationConfig  # noqa: E402
from sparkles.serve.api import create_app, is_loopback, loopback_hosts  # noqa: E402
from sparkles.serve.loading import make_chat  # noqa: E402
from sparkles.serve.openai_format import ApiError, parse_json_body  # noqa: E402
from sparkles.testing.serving import free_port  # noqa: E402
from sparkles.testing.tiny import build_tiny_model  # noqa: E402

MODEL = "sparkles-tiny"
KEY = "sk-hardening-test-key"
MAX_BODY = 256 * 1024
MAX_TEXT = 2000
LONG = 1500  # tokens: a generation that runs for seconds unless it is cancelled
HI = [{"role": "user", "content": "hi"}]


def _wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("hardening")
    allowed = work / "allowed"
    allowed.mkdir()
    generation = GenerationConfig(max_new_tokens=8, stop_strings=(), stop_on_eos=False)
    chat = make_chat(build_tiny_model(work / "model", init_std=0.3, llm_max_positions=2048), generation=generation)
    port = free_port()
    app = create_app(chat, model_name=MODEL, allowed_image_dirs=[allowed], api_key=KEY,
                     allowed_hosts=loopback_hosts(port), max_body_bytes=MAX_BODY, max_text_chars=MAX_TEXT,
                     max_queue=1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started, "uvicorn to start", 30)
    yield {"app": app, "worker": app.state.worker, "port": port, "base": f"http://127.0.0.1:{port}/v1",
           "allowed": allowed}
    server.should_exit = True
    thread.join(timeout=10)


def _post(served, body=None, *, content=None, headers=None, key=KEY, path="/chat/completions"):
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    if content is None:
        content = json.dumps({"model": MODEL, **(body or {})})
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    return httpx.post(served["base"] + path, content=content, headers=hdrs, timeout=120)


def _error(resp, status: int, code=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _request_bytes(port: int, body: dict, *, content_length=None) -> tuple[bytes, bytes]:
    data = json.dumps({"model": MODEL, **body}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length or len(data)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head, data


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# ------------------------------------------------------------------------------------------------ limits
def test_a_body_over_the_cap_is_refused_from_its_content_length_before_it_is_read(served):
    sock = _connect(served["port"])
    head, _ = _request_bytes(served["port"], {"messages": HI}, content_length=200_000_000)
    sock.sendall(head)  # and no body at all: a server that waited for it would never answer
    status, headers, body = _read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"

    def pieces():  # a declared length over the cap, streamed without ever holding it in memory
        for _ in range(MAX_BODY // 16384 + 2):
            yield b" " * 16384

    resp = _post(served, content=pieces(), headers={"Content-Type": "application/json",
                                                    "Content-Length": str(MAX_BODY + 32768)})
    _error(resp, 413, "request_too_large")


def test_a_body_without_a_length_is_cut_off_at_the_cap_while_it_streams_in(served):
    def pieces():  # chunked transfer: the server only learns the size by counting
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(4 * MAX_BODY // 16384):
            yield b"a" * 16384
        yield b'"}]}'

    resp = _post(served, content=pieces(), headers={"Content-Type": "application/json"})
    assert "content-length" not in resp.request.headers
    _error(resp, 413, "request_too_large")
    _wait_until(lambda: served["worker"].in_flight == 0, "the refused request to leave the queue")
    assert _post(served, {"messages": HI, "max_tokens": 2}).status_code == 200


def test_text_over_the_cap_is_refused_before_it_reaches_the_model(served):
    submitted = served["worker"].stats["submitted"]
    _error(_post(served, {"messages": [{"role": "user", "content": "a" * (MAX_TEXT + 1)}]}), 400, "text_too_long")
    half = "b" * (MAX_TEXT // 2 + 1)  # the cap counts all text parts together, the system message included
    error = _error(_post(served, {"messages": [{"role": "system", "content": half},
                                               {"role": "user", "content": [{"type": "text", "text": half}]}]}),
                   400, "text_too_long")
    assert error["param"] == "messages[1].content[0].text"
    assert served["worker"].stats["submitted"] == submitted  # refused while parsing: never tokenised
    at_cap = _post(served, {"messages": [{"role": "user", "content": "red circles " * (MAX_TEXT // 12)}],
                            "max_tokens": 2})
    assert at_cap.status_code == 200 or at_cap.json()["error"]["code"] == "context_length_exceeded"


def test_a_full_queue_answers_429_with_retry_after_and_every_admitted_request_is_answered(served):
    worker, port = served["worker"], served["port"]
    _wait_until(lambda: worker.in_flight == 0, "an idle server")
    held = []
    for _ in range(2):  # max_queue=1: one answered + one waiting fill the server
        head, data = _request_bytes(port, {"messages": HI, "max_tokens": 3, "temperature": 0})
        sock = _connect(port)
        sock.sendall(head + data[:-1])  # admitted on its headers; the last byte is held back
        held.append((sock, data[-1:]))
    _wait_until(lambda: worker.in_flight == 2, "both held requests to be admitted")
    busy = _post(served, {"messages": HI, "max_tokens": 3})
    _error(busy, 429, "queue_full")
    assert busy.json()["error"]["type"] == "rate_limit_error"
    assert int(busy.headers["Retry-After"]) >= 1
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=served["base"], api_key=KEY, max_retries=0).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=3)
    answers = []
    for sock, last in held:
        sock.sendall(last)
    for sock, _ in held:
        status, _, body = _read_response(sock)
        assert status == 200, body
        answers.append(json.loads(body)["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]  # the same greedy request, answered in full both times
    _wait_until(lambda: worker.in_flight == 0, "the queue to drain")
    assert _post(served, {"messages": HI, "max_tokens": 3}).status_code == 200


def test_a_client_that_hangs_up_without_streaming_cancels_its_generation(served):
    worker, port = served["worker"], served["port"]
    _wait_until(lambda: worker.in_flight == 0, "an idle server")
    before = dict(worker.stats)
    body = {"messages": HI, "max_tokens": LONG, "temperature": 0}
    running = _connect(port)
    running.sendall(b"".join(_request_bytes(port, body)))
    _wait_until(lambda: worker.stats["started"] == before["started"] + 1, "the first request to start generating")
    waiting = _connect(port)
    waiting.sendall(b"".join(_request_bytes(port, body)))
    _wait_until(lambda: worker.stats["submitted"] == before["submitted"] + 2, "the second request to be queued")
    waiting.close()  # leaves while it waits: it must never run
    _wait_until(lambda: worker.stats["disconnected"] == before["disconnected"] + 1, "the server to notice")
    running.close()  # leaves mid-generation: it must stop at the next token
    _wait_until(lambda: worker.stats["cancelled"] == before["cancelled"] + 2 and worker.in_flight == 0,
                "both requests to be cancelled")
    assert worker.stats["started"] == before["started"] + 1
    assert worker.stats["completed"] == before["completed"]
    assert worker.stats["tokens"] - before["tokens"] < LONG
    assert _post(served, {"messages": HI, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused_while_parsing(served, literal):
    for where in ('"temperature": {}', '"top_p": {}', '"metadata": {{"x": [{}]}}'):
        content = ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], %s}'
                   % (MODEL, where.format(literal)))
        error = _error(_post(served, content=content, headers={"Content-Type": "application/json"}), 400,
                       "invalid_json")
        assert "finite" in error["message"]
    with pytest.raises(ApiError):
        parse_json_body(f"[{literal}]".encode())


def test_stop_strings_and_seed_are_bounded(served):
    def param(body):
        return _error(_post(served, {"messages": HI, **body}), 400)["param"]

    assert param({"stop": ["a", "b", "c", "d", "e"]}) == "stop"
    assert param({"stop": ["x" * 65]}) == "stop"
    assert param({"seed": 2 ** 63}) == "seed"
    assert param({"seed": -(2 ** 63) - 1}) == "seed"
    ok = _post(served, {"messages": HI, "max_tokens": 2, "stop": ["y" * 64] * 4, "seed": 2 ** 63 - 1,
                        "temperature": 0.7})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_every_failure_is_answered_in_the_openai_error_shape(served):
    nul = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(served["allowed"] / "a\x00b.png")}}]}]}
    assert _error(_post(served, nul), 400)["param"] == "messages[0].content[0].image_url"
    for depth in (40, 100_000):  # past our limit; past what Python's parser can recurse into
        nested = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": %s%s}' % (
            MODEL, "[" * depth, "]" * depth)
        _error(_post(served, content=nested, headers={"Content-Type": "application/json"}), 400, "json_too_deep")
    _error(_post(served, content=b'{"model": "\xff\xfe"}', headers={"Content-Type": "application/json"}), 400,
           "invalid_json")
    _error(_post(served, content='{"seed": %s}' % ("9" * 5000), headers={"Content-Type": "application/json"}), 400,
           "invalid_json")
    _error(httpx.get(served["base"] + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)

    def broken():
        raise RuntimeError("an internal failure")

    served["app"].add_api_route("/v1/broken", broken)
    error = _error(httpx.get(served["base"] + "/broken", headers={"Authorization": f"Bearer {KEY}"}), 500,
                   "internal_error")
    assert error["type"] == "server_error" and "an internal failure" not in error["message"]


# ------------------------------------------------------------------------------------------------ access
def test_the_api_key_is_required_and_checked(served):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        resp = httpx.get(served["base"] + "/models", headers=headers)
        _error(resp, 401, "invalid_api_key")
        assert resp.headers["www-authenticate"] == "Bearer"
    _error(_post(served, {"messages": HI}, key=None), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["base"], api_key="sk-wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=served["base"], api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


def test_a_post_must_declare_json(served):
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2})
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        _error(_post(served, content=body, headers={"Content-Type": content_type}), 415, "unsupported_media_type")
    _error(_post(served, content=body), 415, "unsupported_media_type")  # no Content-Type at all
    ok = _post(served, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_only_the_loopback_names_with_the_port_are_answered(served):
    port = served["port"]
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1:{port + 1}", "localhost"):
        resp = httpx.get(served["base"] + "/models", headers={**auth, "Host": host})
        _error(resp, 421, "host_not_allowed")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert httpx.get(served["base"] + "/models", headers={**auth, "Host": host}).status_code == 200, host
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "192.168.1.5", "example.com"))


def test_the_command_line_needs_a_key_off_loopback_and_passes_its_limits(monkeypatch, capsys):
    from sparkles.serve.__main__ import app_options, main, parse_args

    monkeypatch.delenv("SPARKLES_API_KEY", raising=False)
    assert main(["--host", "0.0.0.0"]) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert "SPARKLES_API_KEY" in err and "--api-key" in err and "0.0.0.0" in err

    local = app_options(parse_args(["--port", "9000", "--max-body-mib", "2", "--max-queue", "0",
                                    "--max-text-chars", "500", "--allowed-host", "proxy.lan"]))
    assert local["api_key"] is None and "localhost:9000" in local["allowed_hosts"]
    assert "proxy.lan" in local["allowed_hosts"] and "attacker.example:9000" not in local["allowed_hosts"]
    assert (local["max_body_bytes"], local["max_queue"], local["max_text_chars"]) == (2 * 1024 * 1024, 0, 500)
    inspect.signature(create_app).bind(None, **local)  # every option is a create_app keyword

    monkeypatch.setenv("SPARKLES_API_KEY", "sk-from-the-environment")
    network = app_options(parse_args(["--host", "0.0.0.0"]))
    assert network["api_key"] == "sk-from-the-environment" and network["allowed_hosts"] is None
    assert main(["--host", "0.0.0.0", "--cfg-path", "no/such/config.yaml"]) == 2  # past the key check
    assert "config file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ load
def test_the_load_test_runs_quick(tmp_path):
    from benchmarks import api_load

    out = tmp_path / "api_load.json"
    assert api_load.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and not result["failures"]
    assert result["lost"] == 0 and result["answered"] > 0 and result["clients"] == 32
    assert result["abandoned"] > 0 and result["after_load_ok"]
    assert set(result["hostile"]) == {"oversized_length", "oversized_chunked", "nan", "form_content_type",
                                      "deep_nesting", "no_api_key"}
    assert result["server_rss_mib"]["peak"] >= result["server_rss_mib"]["baseline"] > 0


def test_a_tiny_png_is_accepted_through_all_the_checks(served):
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), "red").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    resp = _post(served, {"messages": [{"role": "user", "content": [{"type": "text", "text": "IMAGE#1"},
                                                                    {"type": "image_url", "image_url": {"url": url}}]}],
                          "max_tokens": 2})
    assert resp.status_code == 200, resp.text
