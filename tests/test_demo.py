"""The Gradio demo, launched on loopback and driven headless through ``gradio_client`` (and Chromium).

A tiny random SparklesChat answers (gibberish, but deterministic with temperature 0), so the streamed demo
answer can be compared with the chat engine's own answer for the same images and question.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from PIL import Image  # noqa: E402

from sparkles.common.config import load_config  # noqa: E402
from sparkles.conversation.template import count_glyphs  # noqa: E402
from sparkles.testing.serving import free_port  # noqa: E402
from sparkles.testing.tiny import build_tiny_model, write_tiny_tokenizer  # noqa: E402
from sparkles.serve.demo_app import (EXAMPLES, DemoSettings, build_demo, launch_kwargs, model_label,  # noqa: E402
                                     place_images, slider_ranges)
from sparkles.serve.loading import LoadError, context_limit, load_model, make_chat, parse_gpu_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Compare IMAGE#1✨ with IMAGE#2⭐."
GREEDY = dict(beams=1, temperature=0.0, top_p=0.9, max_new_tokens=32)


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("sparkles_demo_entry", ROOT / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    model = build_tiny_model(work / "model", init_std=0.3)
    chat = make_chat(model)
    calls = {"decoder": 0}

    def count(*_):
        calls["decoder"] += 1

    hook = model.llama_model.register_forward_hook(count)  # observes whether the model ran
    images = []
    for name, color in (("red.png", "red"), ("blue.png", "blue"), ("green.png", "green")):
        Image.new("RGB", (60, 40), color).save(work / name)
        images.append(work / name)
    (work / "broken.png").write_bytes(b"this is not a picture")
    save_root = work / "conversations"
    demo = build_demo(chat, save_root=save_root, model_name="tiny")
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(demo, port=port))
    yield {"url": f"http://127.0.0.1:{port}/", "chat": chat, "calls": calls, "images": images, "work": work,
           "save_root": save_root}
    hook.remove()
    demo.close()


def _client(app):
    return gradio_client.Client(app["url"], verbose=False, download_files=str(app["work"] / "downloads"),
                                analytics_enabled=False)


def _upload(client, paths):
    return client.predict([gradio_client.handle_file(str(p)) for p in paths], api_name="/add_images")


def _ask(client, text, *, auto_place=True, **params):
    p = {**GREEDY, **params}
    job = client.submit(text, p["beams"], p["temperature"], p["top_p"], p["max_new_tokens"], auto_place,
                        api_name="/chat")
    result = job.result(timeout=120)
    return result, job.outputs()


def _text(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _conversation_files(save_root: Path) -> list[Path]:
    return sorted(save_root.glob("*/conversation.json"))


def test_two_images_streamed_answer_is_saved(app):
    client = _client(app)
    gallery, notice, files = _upload(client, app["images"][:2])
    assert [item["caption"] for item in gallery] == ["IMAGE#1", "IMAGE#2"]
    assert "IMAGE#1, IMAGE#2" in notice and files is None

    (chatbot, notice, textbox), outputs = _ask(client, QUESTION)
    assert [m["role"] for m in chatbot] == ["user", "assistant"]
    assert _text(chatbot[0]) == QUESTION and textbox == ""
    answer = _text(chatbot[1])
    partial = [_text(out[0][-1]) for out in outputs if out[0] and out[0][-1]["role"] == "assistant"]
    assert len(set(partial)) > 2, "the answer should stream in several updates"
    assert partial[-1] == answer

    session = app["chat"].session()  # the engine's own answer for the same dialogue
    for path in app["images"][:2]:
        session.add_image(path)
    session.ask(QUESTION)
    assert answer == session.answer(max_new_tokens=32, do_sample=False) and answer

    # a follow-up turn reuses the conversation (and its KV cache)
    (chatbot, notice, _), _ = _ask(client, "Which one is brighter?", max_new_tokens=16)
    assert [m["role"] for m in chatbot] == ["user", "assistant"] * 2

    records = [json.loads(p.read_text()) for p in _conversation_files(app["save_root"])]
    record = next(r for r in records if r["turns"] and r["turns"][0]["assistant"] == answer)
    folder = app["save_root"] / record["id"]
    assert [i["file"] for i in record["images"]] == ["images/image_1.png", "images/image_2.png"]
    assert all((folder / i["file"]).is_file() for i in record["images"])
    assert [i["uploaded_as"] for i in record["images"]] == ["red.png", "blue.png"]
    assert record["turns"][0]["user"] == QUESTION and len(record["turns"]) == 2
    assert record["turns"][0]["generation"]["do_sample"] is False
    raw = (folder / "conversation.json").read_text()
    assert str(app["work"]) not in raw and "/tmp" not in raw, "no server paths in the saved record"
    assert str(app["work"]) not in notice


def test_marker_mismatch_is_explained_and_never_reaches_the_model(app):
    client = _client(app)
    _upload(client, app["images"][:1])
    before = app["calls"]["decoder"]
    (chatbot, notice, textbox), _ = _ask(client, QUESTION)  # two markers, one image
    assert chatbot == []
    assert "Not sent" in notice and "2 image marker" in notice and "1 is uploaded" in notice
    assert textbox == QUESTION, "the message stays in the box so it can be fixed"

    _upload(client, app["images"][1:3])  # now three images, but the message below places none
    (chatbot, notice, _), _ = _ask(client, "What do you see?", auto_place=False)
    assert chatbot == [] and "IMAGE#1, IMAGE#2, IMAGE#3 have no" in notice
    assert app["calls"]["decoder"] == before, "a mismatch must not run the model"

    gallery, notice, _ = _upload(client, [app["work"] / "broken.png"])
    assert "Skipped broken.png" in notice and len(gallery) == 3


def test_unmarked_images_are_placed_and_announced_then_votes_and_clear(app):
    client = _client(app)
    _upload(client, app["images"][:2])
    (chatbot, notice, _), _ = _ask(client, "Tell me about IMAGE#1✨.", max_new_tokens=16)
    assert "Placed IMAGE#2" in notice
    assert _text(chatbot[0]) == "IMAGE#2✨ Tell me about IMAGE#1✨."

    assert "upvote" in client.predict(*GREEDY.values(), api_name="/upvote")
    assert "flag" in client.predict(*GREEDY.values(), api_name="/flag")
    files, gallery, chatbot, textbox, notice = client.predict(api_name="/clear")
    assert gallery == [] and chatbot == [] and textbox == ""
    assert "Nothing to rate" in client.predict(*GREEDY.values(), api_name="/downvote")

    record = next(json.loads(p.read_text()) for p in _conversation_files(app["save_root"])
                  if json.loads(p.read_text())["feedback"])
    assert [f["kind"] for f in record["feedback"]] == ["upvote", "flag"]
    assert record["turns"][0]["auto_placed_images"] == [2]


def test_page_renders_in_headless_chromium(app, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/install_system.sh installs it)")
    shot = tmp_path / "demo.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,900",
           "--virtual-time-budget=10000", app["url"]]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 900)
    lo, hi = image.getextrema()
    assert hi - lo > 100, "the page should not be blank"
    assert sum(1 for n in image.histogram() if n) > 20, "a drawn page has many shades"
    # the page was built by Gradio's front end from our app (not an error page)
    dom = subprocess.run([c for c in cmd if not c.startswith("--screenshot")][:-1] + ["--dump-dom", app["url"]],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "Chat with ✨Sparkles✨" in dom and "IMAGE#2" in dom


def test_place_images_rules():
    assert place_images("a ✨ b ⭐", slots_before=0, num_images=2, auto_place=False) == ("a ✨ b ⭐", [], None)
    text, placed, problem = place_images("hi ✨", slots_before=1, num_images=3, auto_place=True)
    assert (text, placed, problem) == ("IMAGE#3✨ hi ✨", [3], None)
    _, _, problem = place_images("✨✨", slots_before=0, num_images=1, auto_place=True)
    assert "Not sent" in problem
    _, _, problem = place_images("<Img><ImageHere></Img>", slots_before=0, num_images=0, auto_place=True)
    assert problem is not None, "a raw slot marker counts as a marker too"
    assert place_images("no images", slots_before=0, num_images=0, auto_place=False)[2] is None


def test_cli_arguments_and_single_device_loading(tmp_path, monkeypatch, capsys):
    import argparse

    assert parse_gpu_ids("0,1") == [0, 1] and parse_gpu_ids("3") == [3] and parse_gpu_ids(None) is None
    for bad in ("a", "0,,1", "1,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_gpu_ids(bad)
    demo = _load_demo_module()
    args = demo.parse_args(["--gpu-id", "0,1", "--port", "7000", "--options", "model.max_txt_len=8"])
    assert args.gpu_id == [0, 1] and args.host == "127.0.0.1" and args.share is False and args.port == 7000
    with pytest.raises(SystemExit):
        demo.parse_args(["--gpu-id", "zero"])

    # the single-device path: a config → a model on the CPU → a working chat
    write_tiny_tokenizer(tmp_path / "models" / "tiny_llm")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  arch: sparkleschat\n  model_type: tiny\nrun:\n  imports: [sparkles.tinyworld]\n"
                   "  sparkles_root: " + str(tmp_path) + "\n")
    model, loaded = load_model(str(cfg))
    assert str(model.device) == "cpu" and loaded.model.model_type == "tiny" and not model.training
    chat = make_chat(model)
    assert chat.generation.max_length <= model.llama_model.config.max_position_embeddings
    session = chat.session()
    session.add_image(Image.new("RGB", (20, 20), "red"))
    session.ask("What is in IMAGE#1✨?")
    assert isinstance(session.answer(max_new_tokens=4, do_sample=False), str)

    with pytest.raises(LoadError, match="model.ckpt"):
        load_model(str(cfg), options=["model.ckpt=models/missing.pth"])
    monkeypatch.chdir(tmp_path)  # no eval_configs/ here: the default config is missing
    assert demo.main([]) == 2
    assert "bash run.sh" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert demo.main(["--cfg-path", str(cfg), "--gpu-id", "0"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_a_real_browser_drives_a_conversation(tmp_path):
    """Headless Chromium uploads two images, sends a ✨/⭐ question and gets an answer (the README screenshot tool)."""
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("chromium is not installed (scripts/install_system.sh installs it)")
    from sparkles.serve.screenshot import QUESTION as SHOT_QUESTION
    from sparkles.serve.screenshot import main as screenshot_main

    out = tmp_path / "shot.png"
    assert screenshot_main(["--untrained", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    assert Image.open(out).size == (1280, 1000) and out.stat().st_size < 200_000
    [record_file] = _conversation_files(tmp_path / "work" / "conversations")
    record = json.loads(record_file.read_text())
    assert [i["label"] for i in record["images"]] == ["IMAGE#1", "IMAGE#2"]
    assert [t["user"] for t in record["turns"]] == [SHOT_QUESTION] and record["turns"][0]["assistant"]


def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/install_system.sh installs it)")
    return chromium


def _unheld_states(model, questions: list[str], answers: list[str], images: list[Path]) -> list[list[str]]:
    """Each turn's answer after every token as the engine decodes it with no stop string (nothing held back),
    greedily as the page asks, with the demo's default answer length: what a stream without the hold would show."""
    chat = make_chat(model)
    max_new_tokens = slider_ranges(context_limit(chat))["max_new_tokens"].default
    states = []
    for turn, question in enumerate(questions):
        session = chat.session()
        for path in images:
            session.add_image(path)
        for earlier, answer in zip(questions[:turn], answers[:turn]):
            session.add_exchange(earlier, answer)
        session.ask(question)
        states.append(list(session.stream(max_new_tokens=max_new_tokens, do_sample=False, stop_strings=())))
    return states


def test_enter_sends_and_a_narrow_page_streams_two_turns_without_stop_marker_pieces(tmp_path):
    """A person at a 420 px wide browser uploads two pictures (and a text file), types a question with a line
    break (Shift+Enter) and sends it with Enter, then a second one: both are answered, no state of either answer
    on the page ends in a piece of the stop marker "###", the gallery's labels are whole and uncovered, the page
    names the model, and the refused file is explained in the notice, which the next action replaces."""
    from sparkles.serve.screenshot import chat_in_browser, draw_sample_images

    images = draw_sample_images(tmp_path / "images")
    (tmp_path / "notes.txt").write_text("not a picture")
    questions = ["How many circles are in IMAGE#1✨?\nAnd what shape is in IMAGE#2⭐?", "Which one is blue?"]
    model = build_tiny_model(tmp_path / "model", init_std=0.3)
    result = chat_in_browser([*images, tmp_path / "notes.txt"], questions, work=tmp_path / "work", model=model,
                             untrained=True, chromium=_chromium(), width=420)

    # Enter sent each question, and Shift+Enter put a line break into the first instead of sending it
    assert [t["user"] for t in result.record["turns"]] == questions
    saved = [t["assistant"] for t in result.record["turns"]]
    assert all(saved) and [" ".join(a.split()) for a in result.answers] == [" ".join(a.split()) for a in saved]
    # the stream: every state shown grows the one before and never ends in "#" or "##"
    for states, answer in zip(result.states, result.answers):
        assert len(states) > 2 and states[-1] == answer
        assert not [t for t in states if t.rstrip().endswith("#")], states
    # ... where the decoder's text did pass through such a state: the tokenizer writes "###" one "#" a token, so
    # without holding them back the page would have shown "#", then "##"
    unheld = _unheld_states(model, questions, saved, images)
    assert any(t.endswith("#") for turn in unheld for t in turn)
    # the gallery at 420 px: labels whole and on top, nothing over the first thumbnail
    gallery = result.gallery
    assert gallery["page_width"] == 420
    assert [label["text"] for label in gallery["labels"]] == ["IMAGE#1", "IMAGE#2"]
    assert all(label["whole"] and label["uncovered"] for label in gallery["labels"]), gallery
    assert gallery["first_thumbnail_uncovered"]
    assert result.model_line.startswith("Model: untrained tiny SparklesChat")
    # the text file: explained in the notice (no error badge that stays), and gone with the next action
    assert "Skipped notes.txt" in result.upload_notice and result.upload_errors == []
    assert not any("Skipped" in notice for notice in result.notices)


def test_the_page_offers_what_the_config_says_for_its_model():
    """eval_configs/sparkles_tiny.yaml's demo section: greedy, examples about counts, colours, shapes and places
    for two images; the released weights' config has none and gets the demo's own."""
    tiny = load_config(ROOT / "eval_configs" / "sparkles_tiny.yaml")
    released = load_config(ROOT / "eval_configs" / "sparkles_eval.yaml")
    settings = DemoSettings.from_config(tiny)
    assert settings.temperature == 0.0 and settings.examples and tuple(settings.examples) != EXAMPLES
    assert all(count_glyphs(e) == 2 for e in settings.examples)
    words = " ".join(settings.examples + (settings.note,)).lower()
    assert all(w in words for w in ("how many", "where", "circle", "square", "red", "blue"))
    assert DemoSettings.from_config(released) == DemoSettings() and DemoSettings().temperature == 1.0
    assert model_label(tiny) == "sparkleschat:tiny (sparkleschat_tiny/checkpoint_last.pth)"
    assert model_label(released) == "sparkleschat:pretrain_vicuna (pretrained/sparkleschat_7b.pth)"
    opts = load_config(ROOT / "eval_configs" / "sparkles_tiny.yaml", ["demo.temperature=0.7"])
    assert DemoSettings.from_config(opts).temperature == 0.7


def test_the_page_shows_the_settings_and_the_model(tmp_path):
    chat = make_chat(build_tiny_model(tmp_path / "model"))
    settings = DemoSettings(examples=("Where is IMAGE#1✨?", "Count IMAGE#1✨ and IMAGE#2✨."), note="Tiny only.",
                            temperature=0.0)
    config = build_demo(chat, save_root=tmp_path, model_name="sparkleschat:tiny (x/y.pth)",
                        settings=settings).config
    components = {c["id"]: c["props"] for c in config["components"]}
    texts = [p.get("value") for p in components.values() if isinstance(p.get("value"), str)]
    assert any("**Model:** sparkleschat:tiny (x/y.pth)" in t and "Tiny only." in t for t in texts)
    temperature = next(p for p in components.values() if p.get("label") == "Temperature")
    assert temperature["value"] == 0.0
    samples = next(p for p in components.values() if "samples" in p)
    assert [row[0] for row in samples["samples"]] == list(settings.examples)
    assert "upload 2 images first" in samples["label"]
    message = next(p for p in components.values() if p.get("label") == "Me")
    assert message["lines"] == 1 and "Enter sends" in message["info"], "Enter sends (Gradio's rule for lines=1)"
