"""The demo driven through its API the way a script (not the page) can: decoding settings outside the sliders'
ranges, turns and uploads that fail half-way, a login, and the retention of saved conversations."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from PIL import Image  # noqa: E402

from sparkles.serve.demo_app import (build_demo, generation_options, keep_pruning, launch_kwargs,  # noqa: E402
                                     prune_conversations, slider_ranges)
from sparkles.serve.loading import context_limit, make_chat  # noqa: E402
from sparkles.testing.serving import free_port  # noqa: E402
from sparkles.testing.tiny import build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GREEDY = dict(beams=1, temperature=0.0, top_p=0.9, max_new_tokens=16)
LOGIN = ("ann", "correct horse")


def _launch(chat, save_root: Path, **launch):
    demo = build_demo(chat, save_root=save_root, model_name="tiny")
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(demo, port=port, **launch))
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo_hardening")
    chat = make_chat(build_tiny_model(work / "model", init_std=0.3))
    images = []
    for name, color in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (60, 40), color).save(work / name)
        images.append(work / name)
    save_root = work / "conversations"
    demo, url = _launch(chat, save_root)
    yield {"url": url, "chat": chat, "images": images, "work": work, "save_root": save_root}
    demo.close()


def _client(url, work, **kw):
    return gradio_client.Client(url, verbose=False, download_files=str(work / "downloads"), analytics_enabled=False,
                                **kw)


def _upload(client, paths):
    return client.predict([gradio_client.handle_file(str(p)) for p in paths], api_name="/add_images")


def _ask(client, text, *, auto_place=True, **params):
    p = {**GREEDY, **params}
    return client.predict(text, p["beams"], p["temperature"], p["top_p"], p["max_new_tokens"], auto_place,
                          api_name="/chat")


def _text(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _new_folder(save_root: Path, before: set) -> Path:
    (folder,) = [p for p in save_root.iterdir() if p.name not in before]
    return folder


def _record(folder: Path) -> dict:
    return json.loads((folder / "conversation.json").read_text())


def _break_saving(folder: Path) -> None:
    """Make every save of this conversation fail: a folder stands where the record's file is replaced."""
    (folder / "conversation.json").unlink()
    (folder / "conversation.json").mkdir()


def _repair_saving(folder: Path, record: dict) -> None:
    (folder / "conversation.json").rmdir()
    (folder / "conversation.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------- slider ranges
def test_values_outside_the_sliders_are_clamped_by_the_handler(app):
    max_length = context_limit(app["chat"])
    cap = slider_ranges(max_length)["max_new_tokens"].hi
    options = generation_options(0, -3, 7, 10**9, max_length=max_length)
    assert options == {"num_beams": 1, "do_sample": False, "top_p": 1.0, "max_new_tokens": cap,
                       "max_length": max_length}
    options = generation_options("many", math.nan, "x", 20.6, max_length=max_length)
    assert options["num_beams"] == 1 and options["temperature"] == 1.0 and options["top_p"] == 0.9
    assert options["max_new_tokens"] == 21
    assert generation_options(99, 5, 0, 0, max_length=max_length)["num_beams"] == 5

    # Through the API: Gradio checks a slider's value against its limits, but NaN passes that check (every
    # comparison with it is false) and would reach the decoder's settings. gradio_client refuses to send NaN;
    # plain HTTP with the client's session does not.
    client = _client(app["url"], app["work"])
    before = set(os.listdir(app["save_root"])) if app["save_root"].exists() else set()
    _upload(client, app["images"][:1])
    nan = [math.nan] * 4
    event, (chatbot, notice, *_) = _raw_call(app["url"], "chat", ["What is in IMAGE#1✨?", *nan, True],
                                             client.session_hash)
    assert event == "complete" and "Not answered" not in notice
    assert [m["role"] for m in chatbot] == ["user", "assistant"]
    event, (notice,) = _raw_call(app["url"], "upvote", nan, client.session_hash)
    assert event == "complete" and "upvote" in notice
    record = _record(_new_folder(app["save_root"], before))
    defaults = slider_ranges(max_length)
    for saved in (record["turns"][0]["generation"], record["feedback"][0]["generation"]):
        assert (saved["num_beams"], saved["temperature"], saved["top_p"], saved["max_new_tokens"]) == \
            (1, 1.0, 0.9, defaults["max_new_tokens"].default)


def _raw_call(url: str, api_name: str, data: list, session_hash: str) -> tuple[str, list]:
    """One call of Gradio's HTTP API, JSON written by hand (NaN included): the last event and its data."""
    import httpx

    body = json.dumps({"data": data, "session_hash": session_hash})
    event_id = httpx.post(f"{url}gradio_api/call/{api_name}", content=body,
                          headers={"Content-Type": "application/json"}, timeout=60).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120).text
    events = [block.split("\n") for block in stream.strip().split("\n\n")]
    last = dict(line.split(": ", 1) for line in events[-1] if ": " in line)
    return last["event"], json.loads(last["data"]) if last.get("data") not in (None, "null") else []


# --------------------------------------------------------------------------------------------- failures
def test_a_turn_that_fails_leaves_the_conversation_as_it_was(app):
    client = _client(app["url"], app["work"])
    before = set(os.listdir(app["save_root"])) if app["save_root"].exists() else set()
    _upload(client, app["images"])
    folder = _new_folder(app["save_root"], before)
    saved = _record(folder)
    question = "Compare IMAGE#1✨ with IMAGE#2⭐."

    _break_saving(folder)  # the answer is generated, then its record cannot be saved
    chatbot, notice, textbox = _ask(client, question)
    assert chatbot == [] and "Not answered" in notice and textbox == question
    assert str(folder) not in notice, "no server paths in what the page shows"

    _repair_saving(folder, saved)
    chatbot, notice, _ = _ask(client, question)
    assert [m["role"] for m in chatbot] == ["user", "assistant"], "no half-added message of the failed turn"
    session = app["chat"].session()  # the same images and question, asked once
    for path in app["images"]:
        session.add_image(path)
    session.ask(question)
    assert _text(chatbot[1]) == session.answer(max_new_tokens=16, do_sample=False)
    assert [t["user"] for t in _record(folder)["turns"]] == [question]


def test_an_upload_that_fails_leaves_the_gallery_as_it_was(app):
    client = _client(app["url"], app["work"])
    before = set(os.listdir(app["save_root"])) if app["save_root"].exists() else set()
    gallery, _, _ = _upload(client, app["images"][:1])
    folder = _new_folder(app["save_root"], before)
    saved = _record(folder)

    _break_saving(folder)
    gallery, notice, _ = _upload(client, app["images"][1:])
    assert [item["caption"] for item in gallery] == ["IMAGE#1"] and "Could not add blue.png" in notice

    _repair_saving(folder, saved)
    # the session holds one image: a question with one marker and no automatic placing is sent as it is
    chatbot, notice, _ = _ask(client, "Describe IMAGE#1✨.", auto_place=False)
    assert [m["role"] for m in chatbot] == ["user", "assistant"] and "Not sent" not in notice
    gallery, notice, _ = _upload(client, app["images"][1:])
    assert [item["caption"] for item in gallery] == ["IMAGE#1", "IMAGE#2"]
    assert [i["label"] for i in _record(folder)["images"]] == ["IMAGE#1", "IMAGE#2"]


# --------------------------------------------------------------------------------------------- login
def _load_demo_entry():
    spec = importlib.util.spec_from_file_location("sparkles_demo_entry_hardening", ROOT / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_share_needs_a_login_and_the_login_guards_the_api(app, tmp_path, capsys):
    demo = _load_demo_entry()
    with pytest.raises(SystemExit):
        demo.parse_args(["--share"])
    assert "--auth" in capsys.readouterr().err
    assert demo.parse_args(["--share", "--auth", "ann:pw:with:colons"]).auth == [("ann", "pw:with:colons")]
    assert demo.parse_args(["--share", "--share-without-auth"]).auth is None
    for bad in ("nocolon", ":pw", "ann:"):
        with pytest.raises(SystemExit):
            demo.parse_args(["--auth", bad])

    guarded, url = _launch(app["chat"], tmp_path / "conversations", auth=[LOGIN])
    try:
        import httpx

        with pytest.raises(gradio_client.exceptions.AuthenticationError):
            _client(url, tmp_path)
        refused = httpx.post(f"{url}gradio_api/call/upvote", json={"data": list(GREEDY.values())}, timeout=60)
        assert refused.status_code == 401, "the API needs the login as much as the page"
        with pytest.raises(ValueError, match="Could not login"):
            _client(url, tmp_path, auth=(LOGIN[0], "wrong"))
        client = _client(url, tmp_path, auth=LOGIN)
        assert "Nothing to rate" in client.predict(*GREEDY.values(), api_name="/upvote")
    finally:
        guarded.close()


def test_the_server_log_names_the_demos_own_flags(tmp_path):
    """demo.py says where the page runs and how to share it in its own flags (--share), not in Gradio's
    (``share=True`` in ``launch()``), and keeps the page on this machine by default."""
    import subprocess
    import sys
    import threading

    from sparkles.testing.tiny import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path / "models" / "tiny_llm")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  arch: sparkleschat\n  model_type: tiny\nrun:\n  imports: [sparkles.tinyworld]\n"
                   f"  sparkles_root: {tmp_path}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--cfg-path", str(cfg), "--port", str(port),
                             "--save-root", str(tmp_path / "conversations")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a demo that never comes up fails the test instead of hanging it
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "demo running on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        watchdog.cancel()
    log = "".join(lines)
    assert f"demo running on http://127.0.0.1:{port}" in log and "(this machine only)" in log, log
    assert "--share" in log and "share=True" not in log, log


# --------------------------------------------------------------------------------------------- retention
def _conversation(save_root: Path, name: str, age_days: float, *, newest_file_age: float | None = None) -> Path:
    folder = save_root / name
    (folder / "images").mkdir(parents=True)
    (folder / "conversation.json").write_text("{}")
    (folder / "images" / "image_1.png").write_bytes(b"png")
    old = time.time() - age_days * 86400
    for p in (folder / "images" / "image_1.png", folder / "images", folder / "conversation.json", folder):
        os.utime(p, (old, old))
    if newest_file_age is not None:
        t = time.time() - newest_file_age * 86400
        os.utime(folder / "conversation.json", (t, t))
    return folder


def test_old_saved_conversations_are_pruned_and_nothing_else(tmp_path):
    root = tmp_path / "conversations"
    old = _conversation(root, "2020-01-01_00-00-00_a1b2c3", 40)
    active = _conversation(root, "2020-01-02_00-00-00_d4e5f6", 40, newest_file_age=1)  # added to yesterday
    recent = _conversation(root, "2021-06-01_00-00-00_0a0b0c", 2)
    other = _conversation(root, "my_notes", 400)  # not a conversation folder of the demo
    (root / "2019-01-01_00-00-00_ffffff.txt").write_text("a file, not a folder")
    assert prune_conversations(root, 0) == [] and old.exists()
    assert prune_conversations(root, 30) == [old]
    assert not old.exists() and active.exists() and recent.exists() and other.exists()
    assert prune_conversations(root, 1.5) == [recent] and active.exists()
    assert prune_conversations(root, 0.5) == [active] and other.exists()
    assert prune_conversations(tmp_path / "absent", 30) == []


def test_pruning_runs_at_start_and_then_periodically(tmp_path):
    root = tmp_path / "conversations"
    first = _conversation(root, "2020-01-01_00-00-00_a1b2c3", 40)
    stop = keep_pruning(root, 30, every_s=0.05)
    try:
        assert not first.exists(), "pruned before the server starts"
        later = _conversation(root, "2020-01-02_00-00-00_d4e5f6", 40)
        deadline = time.monotonic() + 60
        while later.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not later.exists(), "pruned by the periodic pass"
    finally:
        stop.set()
    assert keep_pruning(root, 0).is_set() is False  # 0 keeps everything: no thread, nothing pruned


def test_keep_days_sets_the_retention_of_uploads_too(app, tmp_path):
    demo = _load_demo_entry()
    assert demo.parse_args([]).keep_days == 30
    with pytest.raises(SystemExit):
        demo.parse_args(["--keep-days", "-1"])
    assert build_demo(app["chat"], save_root=tmp_path, keep_days=2).delete_cache == (3600, 2 * 86400)
    assert build_demo(app["chat"], save_root=tmp_path, keep_days=0).delete_cache is None
