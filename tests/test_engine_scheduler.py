"""Continuous batching (``sparkles.engine.scheduler``): answers equal those of each request served alone.

A tiny random SparklesChat (large initial weights, so answers depend on their input) answers requests of
different lengths, images, answer lengths and settings through the scheduler — joining a running batch,
leaving it, cancelled — and each answer is compared with ``ChatSession.answer`` for the same request alone.
The last tests drive the real API server over loopback HTTP with concurrent clients.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from sparkles.conversation.render import Message
from sparkles.conversation.template import replace_glyphs
from sparkles.engine.decoding import GenerationConfig
from sparkles.engine.scheduler import Scheduler
from sparkles.serve.loading import make_chat
from sparkles.testing.tiny import build_tiny_model

COLORS = ("red", "blue", "green", "yellow", "purple")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("scheduler"), seed=0, init_std=0.3, llm_max_positions=2048)
    return make_chat(model)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40 + 4 * i, 32), c) for i, c in enumerate(COLORS)]


def _requests(images):
    """(history of (question, answer) turns, last question, images, options): varied on purpose."""
    red, blue, green, yellow, purple = images
    return [
        ([], "Compare IMAGE#1✨ with IMAGE#2✨.", [red, blue], dict(max_new_tokens=20)),
        ([], "hello there", [], dict(max_new_tokens=7)),
        ([], "What is in IMAGE#1✨ and why is it so colourful today, do you think?", [green],
         dict(max_new_tokens=30)),
        ([("Look at IMAGE#1✨", "It is yellow.")], "And IMAGE#2✨ IMAGE#3✨?", [yellow, blue, red],
         dict(max_new_tokens=12)),
        ([], "a", [], dict(max_new_tokens=25, stop_strings=("###", "blu"))),
        ([], "IMAGE#1✨ again", [purple], dict(max_new_tokens=16, repetition_penalty=1.3)),
    ]


def _alone(chat, history, question, images, options) -> str:
    session = chat.session()
    session.add_images(images)
    for q, a in history:
        session.add_exchange(q, a)
    session.ask(question)
    return session.answer(**{"do_sample": False, **options})


def _messages(history, question):
    out = []
    for q, a in history:
        out += [Message("user", replace_glyphs(q)), Message("assistant", a)]
    return out + [Message("user", replace_glyphs(question))]


def test_concurrent_greedy_requests_equal_each_alone(chat, images):
    requests = _requests(images)
    expected = [_alone(chat, *r) for r in requests]
    assert len(set(expected)) == len(expected)  # distinct answers: the comparison means something
    scheduler = Scheduler(chat, max_batch=4)  # fewer rows than requests: some wait, and join as others leave
    try:
        handles = [scheduler.submit(_messages(h, q), ims, do_sample=False, **opts) for h, q, ims, opts in requests]
        streams = [list(h.stream()) for h in handles]
    finally:
        scheduler.close()
    assert [s[-1] for s in streams] == expected
    assert all(len(s) > 1 for s in streams[:4])  # streamed: the text after every token
    assert scheduler.stats["max_rows"] == 4 and scheduler.stats["admitted"] == len(requests)


def test_a_request_joins_a_running_batch_at_the_next_step(chat, images):
    long_one = ([], "Tell me everything about IMAGE#1✨.", [images[0]], dict(max_new_tokens=60))
    later = _requests(images)[:3]
    expected_long = _alone(chat, *long_one)
    expected = [_alone(chat, *r) for r in later]
    scheduler = Scheduler(chat, max_batch=8)
    try:
        first = scheduler.submit(_messages(*long_one[:2]), long_one[2], do_sample=False, **long_one[3])
        events = first.events()
        tokens_before = 0
        for event in events:  # a few tokens in: the batch is running
            if event.kind == "text":
                tokens_before = event.tokens
                if tokens_before >= 5:
                    break
        handles = [scheduler.submit(_messages(h, q), ims, do_sample=False, **o) for h, q, ims, o in later]
        rest = [e for e in events]
        answers = [h.result() for h in handles]
    finally:
        scheduler.close()
    assert rest[-1].kind == "done" and rest[-1].text == expected_long and rest[-1].finish_reason == "length"
    assert answers == expected
    assert tokens_before < 60 and scheduler.stats["max_rows"] == 4  # they joined while the first decoded


def test_seeded_sampling_follows_each_request_own_generator(chat, images):
    requests = [([], "Compare IMAGE#1✨ with IMAGE#2✨.", images[:2], dict(max_new_tokens=15)),
                ([], "hello there", [], dict(max_new_tokens=15)),
                ([], "IMAGE#1✨ again", [images[4]], dict(max_new_tokens=15))]
    settings = [dict(seed=7, temperature=1.3, top_p=0.9), dict(seed=8, temperature=0.8, top_p=0.95),
                dict(seed=7, temperature=1.3, top_p=0.9)]
    expected = [_alone(chat, h, q, ims, {**o, **s, "do_sample": True}) for (h, q, ims, o), s in zip(requests, settings)]
    scheduler = Scheduler(chat, max_batch=3)
    try:
        handles = [scheduler.submit(_messages(h, q), ims, do_sample=True, **o, **s)
                   for (h, q, ims, o), s in zip(requests, settings)]
        assert [h.result() for h in handles] == expected
    finally:
        scheduler.close()


def test_a_cancelled_or_failing_request_leaves_the_others_unaffected(chat, images):
    requests = _requests(images)[:3]
    expected = [_alone(chat, *r) for r in requests]
    scheduler = Scheduler(chat, max_batch=4)
    try:
        doomed = scheduler.submit([Message("user", "on and on")], [], do_sample=False, max_new_tokens=500)
        broken = scheduler.submit([Message("user", "two slots <Img><ImageHere></Img>")], [], do_sample=False)
        handles = [scheduler.submit(_messages(h, q), ims, do_sample=False, **o) for h, q, ims, o in requests]
        events = doomed.events()
        for event in events:
            if event.kind == "text" and event.tokens == 3:
                doomed.cancel()
                break
        last = [e for e in events][-1]
        answers = [h.result() for h in handles]
        error = [e for e in broken.events()][-1]
        waiting = scheduler.submit([Message("user", "never")], [], cancelled=threading.Event())
        waiting.cancel()
        assert [e.finish_reason for e in waiting.events()] == ["cancelled"]
    finally:
        scheduler.close()
    assert last.kind == "done" and last.finish_reason == "cancelled" and last.tokens < 10
    assert error.kind == "error" and "slot" in str(error.error)
    assert answers == expected


# ------------------------------------------------------------------------------------------- over HTTP
MODEL = "sparkles-tiny"


def _png(color, size=(48, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from sparkles.serve.api import create_app
    from sparkles.testing.serving import serve_in_thread

    work = tmp_path_factory.mktemp("batched_api")
    generation = GenerationConfig(stop_strings=(), stop_on_eos=False)  # answers run their full length
    chat = make_chat(build_tiny_model(work / "model", seed=0, init_std=0.3, llm_max_positions=2048),
                     generation=generation)
    app = create_app(chat, model_name=MODEL, max_batch=4, max_queue=8)
    with serve_in_thread(app) as base:
        yield {"chat": chat, "worker": app.state.worker, "base": base + "/v1"}


def _http_requests():
    """(content, max_tokens) of varied requests: text only, one image, two images in either order."""
    two = lambda a, b: [{"type": "text", "text": "Compare IMAGE#1"},  # noqa: E731
                        {"type": "image_url", "image_url": {"url": _png(a)}},
                        {"type": "text", "text": " with IMAGE#2"},
                        {"type": "image_url", "image_url": {"url": _png(b)}}, {"type": "text", "text": "."}]
    return [(two("red", "blue"), 14), ("hello there, how are you", 9), (two("blue", "red"), 20),
            ([{"type": "text", "text": "What is IMAGE#1"}, {"type": "image_url", "image_url": {"url": _png("green")}},
              {"type": "text", "text": "?"}], 11), ("a", 17), (two("yellow", "green"), 6)]


def _ask(served, content, max_tokens, stream=False) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream}
    resp = httpx.post(served["base"] + "/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    if not stream:
        return resp.json()["choices"][0]["message"]["content"]
    text = ""
    for line in resp.text.split("\n\n"):
        if line.startswith("data: {"):
            choices = json.loads(line[6:])["choices"]
            if choices:
                text += choices[0]["delta"].get("content") or ""
    return text


def test_concurrent_http_requests_are_batched_and_equal_one_at_a_time(served):
    requests = _http_requests()
    one_at_a_time = [_ask(served, c, n) for c, n in requests]
    assert len(set(one_at_a_time)) == len(one_at_a_time)
    worker = served["worker"]
    rows_before = worker.scheduler.stats["max_rows"]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda i: _ask(served, *requests[i], stream=i % 2 == 1), range(len(requests))))
    assert together == one_at_a_time
    assert worker.scheduler.stats["max_rows"] > 1 or rows_before > 1  # they were decoded together


def test_a_cancelled_http_request_leaves_the_others_unaffected(served):
    worker = served["worker"]
    requests = _http_requests()[:4]
    expected = [_ask(served, c, n) for c, n in requests]
    before = dict(worker.stats)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1500, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", served["base"] + "/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(lines)  # the stream has begun: the long request is in the batch
            with ThreadPoolExecutor(len(requests)) as pool:
                futures = [pool.submit(_ask, served, c, n) for c, n in requests]
                deadline = time.monotonic() + 60
                while worker.scheduler.running < 2:  # others have joined the long one
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
        # the long request's client has hung up while the others decode
        answers = [f.result() for f in futures]
    deadline = time.monotonic() + 60
    while worker.stats["cancelled"] == before["cancelled"] or worker.in_flight:
        assert time.monotonic() < deadline, "the hung-up request was never cancelled"
        time.sleep(0.01)
    assert answers == expected
    assert worker.stats["tokens"] - before["tokens"] < 1500 + sum(n for _, n in requests)
    assert worker.stats["completed"] - before["completed"] == len(requests)
