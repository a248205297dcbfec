"""The OpenAI-compatible API, driven over real loopback HTTP by the official ``openai`` client.

A tiny random SparklesChat serves the requests (its answers are gibberish but deterministic with greedy
decoding), so every answer can be compared with what the chat engine itself says for the same dialogue.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from sparkles.testing.serving import serve_in_thread  # noqa: E402
from sparkles.testing.tiny import build_tiny_model  # noqa: E402
from sparkles.serve.api import create_app  # noqa: E402
from sparkles.serve.loading import make_chat  # noqa: E402
from sparkles.serve.openai_format import DeltaTracker  # noqa: E402

MODEL = "sparkles-tiny"
MAX_IMAGES = 3


def _png(color, size=(48, 40), stripe=None) -> bytes:
    im = Image.new("RGB", size, color)
    if stripe:
        for x in range(0, size[0], 6):
            for y in range(size[1]):
                im.putpixel((x, y), stripe)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


RED, BLUE, GREEN = _png("red"), _png("blue", stripe=(255, 255, 0)), _png("green", (30, 60))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    allowed = work / "allowed"
    allowed.mkdir()
    (allowed / "green.png").write_bytes(GREEN)
    (work / "outside.png").write_bytes(GREEN)
    chat = make_chat(build_tiny_model(work / "model", init_std=0.3))
    app = create_app(chat, model_name=MODEL, allowed_image_dirs=[allowed], max_images=MAX_IMAGES)
    with serve_in_thread(app) as root:
        base = root + "/v1"
        client = openai.OpenAI(base_url=base, api_key="sk-dummy-not-a-key", max_retries=0, timeout=120)
        yield {"chat": chat, "client": client, "base": base, "work": work, "allowed": allowed}


def _two_image_content(first=RED, second=BLUE):
    return [{"type": "text", "text": "Compare IMAGE#1"},
            {"type": "image_url", "image_url": {"url": _data_url(first)}},
            {"type": "text", "text": " with IMAGE#2"},
            {"type": "image_url", "image_url": {"url": _data_url(second)}},
            {"type": "text", "text": "."}]


def _engine_answer(chat, question: str, images: list[bytes], max_new_tokens: int) -> str:
    session = chat.session()
    for data in images:
        session.add_image(Image.open(io.BytesIO(data)))
    session.ask(question)
    return session.answer(max_new_tokens=max_new_tokens, do_sample=False)


def test_models_list(served):
    assert [m.id for m in served["client"].models.list().data] == [MODEL]


def test_two_images_answer_matches_the_engine(served):
    resp = served["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": _two_image_content()}], temperature=0, max_tokens=20)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    expected = _engine_answer(served["chat"], "Compare IMAGE#1✨ with IMAGE#2✨.", [RED, BLUE], 20)
    assert expected and choice.message.content == expected
    nq = served["chat"].model.num_query_token
    assert resp.usage.prompt_tokens > 2 * nq
    assert 0 < resp.usage.completion_tokens <= 20
    # the images matter: swapping them changes the (greedy) answer
    swapped = served["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": _two_image_content(BLUE, RED)}], temperature=0,
        max_tokens=20)
    assert swapped.choices[0].message.content != choice.message.content


def test_streaming_gives_the_same_answer_in_openai_chunks(served):
    messages = [{"role": "user", "content": _two_image_content()}]
    plain = served["client"].chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    stream = served["client"].chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                                      stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    raw = httpx.post(served["base"] + "/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 5})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_images_across_turns_and_a_system_message(served):
    resp = served["client"].chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "You compare pictures."},
        {"role": "user", "content": [{"type": "text", "text": "Look at IMAGE#1"},
                                     {"type": "image_url", "image_url": {"url": _data_url(RED)}}]},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": [{"type": "text", "text": "And IMAGE#2"},
                                     {"type": "image_url", "image_url": {"url": _data_url(BLUE)}},
                                     {"type": "text", "text": "?"}]},
    ])
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.usage.prompt_tokens > 2 * served["chat"].model.num_query_token


def test_local_files_only_inside_the_allowed_directory(served):
    client = served["client"]
    local = [{"type": "image_url", "image_url": {"url": (served["allowed"] / "green.png").as_uri()}},
             {"type": "text", "text": "What is this?"}]
    ok = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=4,
                                        messages=[{"role": "user", "content": local}])
    assert ok.choices[0].finish_reason in ("stop", "length")
    for url, code in [(str(served["work"] / "outside.png"), "image_path_not_allowed"),
                      (str(served["allowed"] / ".." / "outside.png"), "image_path_not_allowed"),
                      ("missing.png", "image_not_found"),
                      ("https://example.com/cat.png", "remote_image_url_not_supported")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}])
        assert info.value.code == code, url
        assert info.value.body["param"] == "messages[0].content[0].image_url"
    assert "data URL" in str(info.value)  # the remote-URL refusal says what to send instead


def _image_msg(*urls):
    return [{"role": "user", "content": [{"type": "text", "text": "Describe"}]
             + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


BAD_REQUESTS = {
    "too_many_images": (400, "too_many_images", "messages",
                        {"messages": _image_msg(*[_data_url(RED)] * (MAX_IMAGES + 1))}),
    "undecodable_image": (400, "invalid_image", "messages[0].content[1].image_url",
                          {"messages": _image_msg("data:image/png;base64," + base64.b64encode(b"no image").decode())}),
    "unknown_model": (404, "model_not_found", "model",
                      {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    "context_too_long": (400, "context_length_exceeded", "messages",
                         {"messages": [{"role": "user", "content": "red circles " * 400}]}),
    "n_above_one": (400, "unsupported_value", "n", {"n": 2, "messages": [{"role": "user", "content": "hi"}]}),
    "glyph_in_text": (400, "invalid_value", "messages[0].content",
                      {"messages": [{"role": "user", "content": "what is in ✨?"}]}),
    "ends_with_assistant": (400, "invalid_value", "messages",
                            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    "bad_temperature": (400, "invalid_value", "temperature",
                        {"temperature": 3, "messages": [{"role": "user", "content": "hi"}]}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_openai_error_bodies(served, case):
    status, code, param, body = BAD_REQUESTS[case]
    resp = httpx.post(served["base"] + "/chat/completions", json={"model": MODEL, **body}, timeout=60)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert error["message"]


def test_errors_through_the_openai_client_and_malformed_json(served):
    with pytest.raises(openai.NotFoundError) as info:
        served["client"].chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        served["client"].chat.completions.create(model=MODEL, n=2, messages=[{"role": "user", "content": "hi"}])
    assert info.value.param == "n"
    resp = httpx.post(served["base"] + "/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    resp = httpx.get(served["base"] + "/nothing-here", timeout=30)
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_are_queued_and_answered_independently(served):
    client = served["client"]

    def ask(first_red: bool):
        content = _two_image_content(RED, BLUE) if first_red else _two_image_content(BLUE, RED)
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=12).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [True, False, True, False]))
    assert answers[0] == answers[2] and answers[1] == answers[3]
    assert answers[0] == _engine_answer(served["chat"], "Compare IMAGE#1✨ with IMAGE#2✨.", [RED, BLUE], 12)


def test_delta_tracker_never_sends_what_a_stop_string_will_remove():
    tracker = DeltaTracker(["###"])
    sent = [tracker.update(t) for t in ["Hi", "Hi the", "Hi there #", "Hi there ##", "Hi there"]]
    sent.append(tracker.update("Hi there", final=True))
    assert "".join(sent) == "Hi there"
    assert json.dumps(sent)  # plain strings


def test_cli_refuses_a_gpu_without_cuda(capsys):
    import torch

    from sparkles.serve.__main__ import main, parse_args

    args = parse_args(["--gpu-id", "0,1", "--allowed-image-dir", "a", "--allowed-image-dir", "b"])
    assert args.gpu_id == [0, 1] and args.allowed_image_dir == ["a", "b"] and args.host == "127.0.0.1"
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["--gpu-id", "0", "--cfg-path", __file__]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
