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
from sparkles.engine.decoding import stream_safe_text  # noqa: E402
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


# --------------------------------------------------------------------------------------------- text only
def test_a_text_only_hello_is_answered_from_the_right_prompt(served):
    chat = served["chat"]
    resp = served["client"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                    temperature=0, max_tokens=16)
    assert resp.choices[0].message.content.strip()
    assert resp.usage.completion_tokens > 0
    from sparkles.conversation.render import Message

    prompt = chat.renderer.render([Message("user", "Hello")], chat.layout)
    assert prompt.text.endswith("###Human: Hello###Assistant:") and resp.usage.prompt_tokens == len(prompt)
    assert resp.choices[0].message.content == _engine_answer(chat, "Hello", [], 16)


def test_an_answer_never_opens_with_the_stop_marker(served):
    """A model that would open its answer with a stop string (here the random model's own first word, made a
    stop string) is steered to another first token while its answer is blank; without the guard it answers ""."""
    from sparkles.engine.chat import Chat

    chat = served["chat"]
    first = _step_texts(chat, "Hello", [], 4)[0]
    assert first.strip()
    resp = served["client"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                    temperature=0, max_tokens=16, stop=[first])
    answer = resp.choices[0].message.content
    assert answer.strip() and not answer.startswith(first)
    unguarded = Chat(chat.model, chat.image_processor, generation=chat.generation.updated(nonblank_answer=False))
    session = unguarded.session()
    session.ask("Hello")
    assert session.answer(max_new_tokens=16, do_sample=False, stop_strings=("###", first)) == ""


# --------------------------------------------------------------------------------------------- request fields
HI = [{"role": "user", "content": "hi"}]
UNSERVED = {  # field(s) sent → the param the 400 names
    "json_mode": ({"response_format": {"type": "json_object"}}, "response_format"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto"},
              "tools"),
    "logprobs": ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    "frequency_penalty": ({"frequency_penalty": 0.5}, "frequency_penalty"),
    "presence_penalty": ({"presence_penalty": -1}, "presence_penalty"),
    "logit_bias": ({"logit_bias": {"5": 10}}, "logit_bias"),
    "unknown": ({"temprature": 0}, "temprature"),
    "audio": ({"modalities": ["text", "audio"], "audio": {"voice": "x"}}, "modalities"),
    "stream_option": ({"stream": True, "stream_options": {"include_obfuscation": True}},
                      "stream_options.include_obfuscation"),
}


@pytest.mark.parametrize("case", sorted(UNSERVED))
def test_fields_the_server_does_not_implement_are_refused_by_name(served, case):
    fields, param = UNSERVED[case]
    resp = httpx.post(served["base"] + "/chat/completions", json={"model": MODEL, "messages": HI, **fields},
                      timeout=60)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, "unsupported_parameter", "invalid_request_error")
    refused = [key for key in fields if key not in ("stream", "stream_options")] or [param]
    assert all(f"'{key}'" in error["message"] for key in refused), error["message"]


def test_the_openai_client_gets_the_refusal_and_message_fields_are_checked_too(served):
    client = served["client"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, response_format={"type": "json_object"})
    assert info.value.param == "response_format" and info.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi", "name": "ann"}])
    assert info.value.param == "messages[0].name"


def test_neutral_values_and_identifiers_are_accepted_and_change_nothing(served):
    client = served["client"]
    plain = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=12)
    same = client.chat.completions.create(
        model=MODEL, messages=HI, temperature=0, max_tokens=12, response_format={"type": "text"}, tools=[],
        logprobs=False, frequency_penalty=0, presence_penalty=0.0, n=1, user="ann", store=False,
        parallel_tool_calls=False, top_logprobs=None)
    assert same.choices[0].message.content == plain.choices[0].message.content
    # an assistant message echoed back as the client returned it (null fields) is fine
    echoed = plain.choices[0].message.model_dump()
    follow = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=4,
                                            messages=[*HI, echoed, {"role": "user", "content": "and?"}])
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_top_k_and_repetition_penalty_reach_the_decoder(served):
    client, chat = served["client"], served["chat"]
    question = "Compare IMAGE#1✨ with IMAGE#2✨."
    messages = [{"role": "user", "content": _two_image_content()}]

    def ask(**kw):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, **kw
                                              ).choices[0].message.content

    greedy = ask(temperature=0)
    # sampling at temperature 1 from the single most likely token is greedy decoding
    assert ask(temperature=1, extra_body={"top_k": 1}) == greedy
    assert ask(temperature=1, seed=3) != greedy, "sampling without top_k wanders (else the check above is empty)"
    penalised = ask(temperature=0, extra_body={"repetition_penalty": 1.8})
    assert penalised != greedy
    session = chat.session()
    for data in (RED, BLUE):
        session.add_image(Image.open(io.BytesIO(data)))
    session.ask(question)
    assert penalised == session.answer(max_new_tokens=20, do_sample=False, repetition_penalty=1.8)
    for bad in ({"top_k": -2}, {"top_k": 1.5}, {"repetition_penalty": 0}, {"repetition_penalty": 11}):
        with pytest.raises(openai.BadRequestError) as info:
            ask(temperature=0, extra_body=bad)
        assert info.value.param == next(iter(bad))


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


# --------------------------------------------------------------------------------------------- streaming
def test_stream_safe_text_holds_back_what_may_become_a_stop_string():
    stops = ("###", "END")
    assert stream_safe_text("Hi there #", stops) == "Hi there "
    assert stream_safe_text("Hi there ##", stops) == "Hi there "
    assert stream_safe_text("Hi there ###Human", stops) == "Hi there ", "a complete stop string ends the answer"
    assert stream_safe_text("Hi #1 and ##2", stops) == "Hi #1 and ##2", "released once it cannot be a stop string"
    assert stream_safe_text("the EN", stops) == "the " and stream_safe_text("the ENDING", stops) == "the "
    assert stream_safe_text("caf\ufffd", stops) == "caf", "an incomplete character waits for its last byte"
    assert stream_safe_text("a #", ()) == "a #"
    # a role name the answer restarts after is held back while it forms, but does not end the answer
    assert stream_safe_text("two red Assist", stops, hold=("Assistant:",)) == "two red "
    assert stream_safe_text("two red Assistant: one", stops, hold=("Assistant:",)) == "two red Assistant: one"


def _step_texts(chat, question: str, images: list[bytes], max_new_tokens: int) -> list[str]:
    """The greedy answer after each token with no stop string at all (so nothing is held back)."""
    session = chat.session()
    for data in images:
        session.add_image(Image.open(io.BytesIO(data)))
    session.ask(question)
    return list(session.stream(max_new_tokens=max_new_tokens, do_sample=False, stop_strings=()))


def _stop_across_tokens(texts: list[str]) -> tuple[str, int, int]:
    """A stop string of two characters that the greedy answer writes across a token boundary, where it first
    appears, after at least two tokens: the last character of one token's text and the first of the next.
    Returns it, the step whose text ends in its first character, and where it starts in the answer."""
    for step, (before, after) in enumerate(zip(texts, texts[1:])):
        if step < 2 or not after.startswith(before) or len(after) == len(before):
            continue
        stop = before[-1] + after[len(before)]
        if not stop.isspace() and " " not in stop and after.find(stop) == len(before) - 1:
            return stop, step, len(before) - 1
    raise AssertionError(f"no token boundary splits two characters in {texts[-1]!r}")


def _assert_stream_is_safe(snapshots: list[str], final: str, stops) -> None:
    """Every snapshot but the final one ends in no proper prefix of a stop string; each extends the one before,
    so the deltas a stream sends add up to the final answer."""
    for shown in snapshots[:-1]:
        assert not any(shown.endswith(s[:k]) for s in stops for k in range(1, len(s))), (shown, stops)
    assert snapshots[-1] == final
    deltas = [b[len(a):] for a, b in zip(["", *snapshots], snapshots)]
    assert all(b.startswith(a) for a, b in zip(["", *snapshots], snapshots)), snapshots
    assert "".join(deltas) == final


def test_engine_streams_hold_back_a_stop_string_until_it_resolves(served):
    from sparkles.conversation.render import Message
    from sparkles.conversation.template import replace_glyphs
    from sparkles.engine.scheduler import Scheduler

    chat, question = served["chat"], "Compare IMAGE#1✨ with IMAGE#2✨."
    texts = _step_texts(chat, question, [RED, BLUE], 24)
    stop, step, at = _stop_across_tokens(texts)
    never = stop[0] + "\u2603"  # starts as the answer goes on at that token, but is never completed
    scheduler = Scheduler(chat, max_batch=2)
    try:
        for stops, expected in (((stop,), texts[-1][:at].strip()), ((never,), texts[-1])):
            session = chat.session()
            for data in (RED, BLUE):
                session.add_image(Image.open(io.BytesIO(data)))
            session.ask(question)
            snapshots = list(session.stream(max_new_tokens=24, do_sample=False, stop_strings=stops))
            assert session.messages[-1].content == expected
            _assert_stream_is_safe(snapshots, expected, stops)
            # the token that wrote the stop string's first character was shown without it
            assert texts[step].endswith(stop[0]) and snapshots[step] == texts[step][:-1].rstrip()
            if stops == (never,):
                assert snapshots[step + 1] == texts[step + 1], "released by the next token"
            handle = scheduler.submit([Message("user", replace_glyphs(question))],
                                      [Image.open(io.BytesIO(data)) for data in (RED, BLUE)],
                                      max_new_tokens=24, do_sample=False, stop_strings=stops)
            from_scheduler = list(handle.stream())
            _assert_stream_is_safe(from_scheduler, expected, stops)
            assert from_scheduler[:step + 1] == snapshots[:step + 1]
    finally:
        scheduler.close()


def test_the_sse_stream_never_shows_a_piece_of_a_stop_string(served):
    texts = _step_texts(served["chat"], "Compare IMAGE#1✨ with IMAGE#2✨.", [RED, BLUE], 24)
    stop, _, at = _stop_across_tokens(texts)
    request = {"model": MODEL, "messages": [{"role": "user", "content": _two_image_content()}], "temperature": 0,
               "max_tokens": 24, "stop": [stop]}
    plain = served["client"].chat.completions.create(**request).choices[0].message.content
    assert plain == texts[-1][:at].strip()
    raw = httpx.post(served["base"] + "/chat/completions", timeout=120, json={**request, "stream": True})
    chunks = [json.loads(e[len("data: "):]) for e in raw.text.split("\n\n") if e and e != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    deltas = [d for d in deltas if d]
    assert len(deltas) > 1
    shown = ["".join(deltas[:i + 1]) for i in range(len(deltas))]  # what a client has shown after each event
    _assert_stream_is_safe(shown, plain, [stop, "###"])


def test_delta_tracker_sends_only_what_extends_the_answer():
    tracker = DeltaTracker()
    sent = [tracker.update(t) for t in ["Hi", "Hi the", "Hi there", "Hi there", "Hi there!"]]
    assert sent == ["Hi", " the", "re", "", "!"]
    assert tracker.update("Assistant restarts") == "" and tracker.sent == "Hi there!"


def test_cli_refuses_a_gpu_without_cuda(capsys):
    import torch

    from sparkles.serve.__main__ import main, parse_args

    args = parse_args(["--gpu-id", "0,1", "--allowed-image-dir", "a", "--allowed-image-dir", "b"])
    assert args.gpu_id == [0, 1] and args.allowed_image_dir == ["a", "b"] and args.host == "127.0.0.1"
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["--gpu-id", "0", "--cfg-path", __file__]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
