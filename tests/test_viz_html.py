"""HTML pages for dialogues and results: escaping, unique ids, image hooks, pagination, CLI, browser rendering.

Hostile records (``<script>``, quotes, ``<Img>`` markers, ids that prefix each other) check the safety rules;
a hostile-free sample root (Pillow images) gives the browser screenshots. ``SPARKLES_UPDATE_DOCS_IMG=1``
copies those screenshots to ``docs/img/`` for the README.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sparkles.viz import html as viz

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dataset"))
import visualize_data_in_html as cli  # noqa: E402

SLOT = "<Img><ImageHere></Img>"
PWN = "document.body.setAttribute('data-pwned','1')"
RED, BLUE, GREEN = (230, 25, 25), (25, 25, 230), (25, 170, 60)


# --------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------------
def hostile_dialogues() -> list[dict]:
    return [
        {"evaluation_id": "7",
         "dialogue": [
             {"role": "user",
              "content": f"Compare IMAGE#14{SLOT} with IMAGE#1417{SLOT}. <script>{PWN}</script> \"quoted\" & 'single'",
              "images": [{"image_id": 14, "caption": "A red square <b>bold</b> \"quote\" " + "x" * 120},
                         {"image_id": 1417, "caption": f"Blue <script>{PWN}</script>{SLOT}"}]},
             {"role": "assistant",
              "content": f"#14 differs from #1417; #141 is no image. <img src=x onerror=\"{PWN}\"> {SLOT}"},
             {"role": "user", "content": f"Now IMAGE#2{SLOT} next to IMAGE#14.",
              "images": [{"image_id": "2", "caption": "green</figure></details><script>x</script>"}]},
             {"role": "assistant", "content": "IMAGE#2 and image #14 and IMAGE#14x."},
         ],
         "gpt-4": {"A1_C123_scores": [8.0, 8.0, 9.0, 7.0], "A2_C123_scores": [7.0, 7.0, 7.0, 7.0],
                   "prompt": "judge prompt", "response": f"<script>{PWN}</script> Rating: [[8]] " + "y" * 150},
         "gpt-3.5-turbo": {"A1_C123_scores": [6, 6, 6, 6], "A2_C123_scores": [5, 5, 5, 5], "response": "ok"}},
        {"dialogue": [
            {"role": "user", "content": f"Only one image IMAGE#14{SLOT}", "images": [{"image_id": 14, "caption": "red"}]},
            {"role": "assistant", "content": "Fine."}]},
    ]


def hostile_results() -> list[dict]:
    return [
        {"label": "IMAGE#2", "predict": "image#2", "evaluation_id": 3,
         "prompt": f"Two pictures, IMAGE#1{SLOT} and IMAGE#2{SLOT}. Caption: '<script>{PWN}</script>'",
         "response": "Let's think step by step. IMAGE#1 shows... Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#2.",
         "sentence": "A \"red\" <b>square</b>.", "img_paths": ["/data/x/images/red.jpg", "/data/x/images/blue b.jpg"]},
        {"label": "IMAGE#1", "predict": "image#2", "evaluation_id": 4, "prompt": "p", "response": "r",
         "sentence": "s", "img_paths": ["/a/red.jpg", "/a/blue b.jpg"]},
        {"label": "True", "predict": None, "evaluation_id": 5, "prompt": "p", "response": "unparsable",
         "sentence": "t", "img_paths": []},
    ]


class Page(HTMLParser):
    """Collects tags, ids, text and element classes of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.ids: list[str] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.append(a["id"])
        self._in_script = tag == "script"

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())]

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def make_image(path: Path, color, size=(160, 120)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def run_chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium not installed (scripts/install_system.sh installs Debian's chromium)")
    profile = tmp / f"chrome-profile-{len(list(tmp.glob('chrome-profile-*')))}"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------------------
# Dialogue page
# --------------------------------------------------------------------------------------------------------
def test_dialogue_page_escapes_all_text_and_has_unique_ids():
    items = hostile_dialogues()
    html = viz.render_dialogue_page(items, viz.relative_image_url("../images"), title="t <script>x</script>",
                                    model_name="m\"<x>")
    page = Page(html)
    # Exactly our own script; no injected tags of any kind survive.
    assert len(page.find("script")) == 1
    assert PWN not in "".join(page.scripts)
    assert not page.find("b") and not page.find("ImageHere".lower())
    assert all("onerror" not in a for _, a in page.tags)
    # The hostile strings are shown verbatim as text.
    text = page.all_text
    assert f"<script>{PWN}</script>" in text
    assert "\"quoted\" & 'single'" in text
    assert "<img src=x onerror=" in text
    assert "green</figure></details><script>x</script>" in text
    assert "t <script>x</script>" in text and "m\"<x>" in text
    # Unique ids everywhere, including the per-dialogue anchors.
    assert len(page.ids) == len(set(page.ids)), [i for i in page.ids if page.ids.count(i) > 1]
    assert {"dlg-0", "dlg-1", "modal", "modal-img", "modal-close", "hover-preview"} <= set(page.ids)


def test_slot_markers_become_thumbnails_in_order_and_orphans_stay_visible():
    html = viz.render_dialogue_page(hostile_dialogues()[:1], viz.relative_image_url("imgs", ".png"))
    page = Page(html)
    slots = [a["src"] for a in page.find("img", "slot-thumb")]
    assert slots == ["imgs/14.png", "imgs/1417.png", "imgs/2.png"]
    assert all(a.get("loading") == "lazy" for a in page.find("img", "slot-thumb"))
    # The assistant's stray marker has no image: shown as text in an "orphan" span, not dropped.
    orphan = re.findall(r'<span class="slot-orphan"[^>]*>(.*?)</span>', html)
    assert orphan == ["&lt;Img&gt;&lt;ImageHere&gt;&lt;/Img&gt;"]
    # Image strip: one card per image of the dialogue, with id, thumbnail and caption.
    thumbs = [a["src"] for a in page.find("img", "thumb")]
    assert thumbs == ["imgs/14.png", "imgs/1417.png", "imgs/2.png"]
    assert "Image ID: 1417" in page.all_text
    # The long caption is cut to 100 characters + "..." with the full text behind a click (<details>).
    assert len(page.find("details", "caption")) == 1
    assert ("A red square <b>bold</b> \"quote\" " + "x" * 120)[:100] + "..." in page.all_text


def test_mentions_match_whole_ids_only():
    html = viz.render_dialogue_page(hostile_dialogues()[:1], viz.relative_image_url())
    mentions = re.findall(r'<span class="img-mention" tabindex="0" data-src="([^"]+)" data-image-id="([^"]+)">'
                          r'([^<]*)</span>', html)
    pairs = [(image_id, text) for _, image_id, text in mentions]
    assert pairs == [("14", "IMAGE#14"), ("1417", "IMAGE#1417"),   # Q1
                     ("14", "#14"), ("1417", "#1417"),             # A1: "#141" is not an image
                     ("2", "IMAGE#2"), ("14", "IMAGE#14"),         # Q2 mentions a turn-1 image too
                     ("2", "IMAGE#2"), ("14", "image #14")]        # A2: "IMAGE#14x" is not image 14
    assert all(src == f"../images/{i}.jpg" for src, i, _ in mentions)
    assert "#141 is no image" in Page(html).all_text


def test_hover_and_click_hooks_and_csp_hash():
    html = viz.render_dialogue_page(hostile_dialogues(), viz.relative_image_url())
    page = Page(html)
    script = "".join(page.scripts)
    for hook in ("mouseover", "focusin", "img-mention", "img.zoomable", "openModal", "Escape"):
        assert hook in script
    content_imgs = [a for t, a in page.tags if t == "img" and a.get("id") not in ("modal-img", "hover-preview-img")]
    assert content_imgs and all("zoomable" in a["class"].split() for a in content_imgs)
    assert all(a.get("loading") == "lazy" for a in content_imgs)
    # Self-contained: no external script/style/link, and the CSP admits exactly the inline script.
    assert not page.find("link") and all("src" not in a for a in page.find("script"))
    assert "http://" not in html and "https://" not in html
    csp = [a["content"] for a in page.find("meta") if a.get("http-equiv") == "Content-Security-Policy"][0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp


def test_judge_scores_and_summary():
    html = viz.render_dialogue_page(hostile_dialogues(), viz.relative_image_url())
    text = Page(html).all_text
    assert "JUDGE MODEL: gpt-4" in text and "JUDGE MODEL: gpt-3.5-turbo" in text
    assert "Turn 1 A1: 8, C1: 8, C2: 9, C3: 7" in text
    assert "Turn 2 A2: 7, C1: 7, C2: 7, C3: 7" in text
    assert len(Page(html).find("details", "judge-reply")) == 1  # the long reply is expandable
    summary = viz.judge_summary(hostile_dialogues())
    assert summary["gpt-4"]["A1"] == pytest.approx(8.0) and summary["gpt-4"]["A2"] == pytest.approx(7.0)
    assert summary["gpt-4"]["overall"] == pytest.approx(7.5)
    assert summary["gpt-3.5-turbo"]["overall"] == pytest.approx(5.5)
    assert re.search(r"<td>gpt-4</td><td>1</td><td>8.00, 8.00, 9.00, 7.00</td><td>7.00, 7.00, 7.00, 7.00</td>"
                     r"<td>8.00</td><td>7.00</td><td>7.50</td>", html)


def test_bad_records_are_named():
    with pytest.raises(ValueError, match=r"record 1: message 0 has no 'content'"):
        viz.render_dialogue_page([hostile_dialogues()[1], {"dialogue": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"record 0: expected an object with a 'dialogue' list"):
        viz.render_dialogue_page([{"dialog": []}])


# --------------------------------------------------------------------------------------------------------
# Result page
# --------------------------------------------------------------------------------------------------------
def test_choice_results_page():
    items = hostile_results()
    html = viz.render_choice_results_page(items, title="BISON <x>")
    page = Page(html)
    assert viz.choice_accuracy(items) == pytest.approx(1 / 3)
    assert "Accuracy: 0.333 (1 / 3 correct)" in page.all_text
    sections = [a for a in page.find("section")]
    assert [s["class"] for s in sections] == ["result correct", "result wrong", "result wrong"]
    assert [s["id"] for s in sections] == ["item-0", "item-1", "item-2"]
    text = page.all_text
    assert "A \"red\" <b>square</b>." in text and f"'<script>{PWN}</script>'" in text
    assert text.count("Correct") == 1 and text.count("Wrong") == 2 and "(none)" in text
    assert len(page.find("script")) == 1 and not page.find("b")
    pair = [a["src"] for a in page.find("img", "pair-img")]
    assert pair == ["../images/red.jpg", "../images/blue%20b.jpg"] * 2
    # Prompt slots show the two images inline; IMAGE#1/#2 mentions preview them.
    assert [a["src"] for a in page.find("img", "slot-thumb")] == ["../images/red.jpg", "../images/blue%20b.jpg"]
    assert 'data-image-id="2">IMAGE#2</span>' in html
    assert len(page.ids) == len(set(page.ids))


def test_labels_and_predictions_are_written_alike():
    """Result files hold the label as the annotations spell it and the prediction as the answer reader returns it
    (BISON ``IMAGE#2`` / ``image#2``, NLVR2 ``True`` / ``true``); the page writes both one way."""
    nlvr2 = [{"label": "True", "predict": "true", "evaluation_id": 1, "prompt": "p", "response": "r",
              "sentence": "s", "img_paths": []},
             {"label": "False", "predict": "TRUE", "evaluation_id": 2, "prompt": "p", "response": "r",
              "sentence": "s", "img_paths": []}]
    for items, shown in ((hostile_results(), [("IMAGE#2", "IMAGE#2"), ("IMAGE#1", "IMAGE#2"), ("True", "(none)")]),
                         (nlvr2, [("True", "True"), ("False", "True")])):
        html = viz.render_choice_results_page(items)
        fields = re.findall(r"<dt>label</dt><dd>(.*?)</dd>\s*<dt>predict</dt><dd>(.*?)</dd>", html)
        assert fields == shown
    assert [viz.choice_text(v) for v in ("image #1", " IMAGE#12 ", "false", "maybe")] == \
        ["IMAGE#1", "IMAGE#12", "False", "maybe"]


# --------------------------------------------------------------------------------------------------------
# Writers and CLI
# --------------------------------------------------------------------------------------------------------
def test_large_files_paginate(tmp_path):
    base = hostile_dialogues()[1]
    items = [dict(base, evaluation_id=i) for i in range(1201)]
    paths = viz.write_dialogue_page(items, tmp_path / "big.html", page_size=500)
    assert [p.name for p in paths] == ["big.html", "big_page2.html", "big_page3.html"]
    pages = [Page(p.read_text(encoding="utf-8")) for p in paths]
    assert [len(p.find("section", "dialogue")) for p in pages] == [500, 500, 201]
    assert pages[2].find("section", "dialogue")[0]["id"] == "dlg-1000"
    for p in pages:
        assert len(p.ids) == len(set(p.ids))
        assert {a["href"] for a in p.find("a")} <= {"big.html", "big_page2.html", "big_page3.html"}
    # A results file keeps the whole-file accuracy on every page.
    res = hostile_results() * 4
    rpaths = viz.write_choice_results_page(res, tmp_path / "r.html", page_size=5)
    assert len(rpaths) == 3
    assert all("Accuracy: 0.333 (4 / 12 correct)" in Page(p.read_text()).all_text for p in rpaths)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_renders_root_layout_and_single_files(tmp_path, capsys):
    root = tmp_path / "root"
    ann = root / "data/SparklesDialogueCC/annotations/SparklesDialogueCC.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(hostile_dialogues()))
    results = root / "evaluation/BISON/results"
    results.mkdir(parents=True)
    (results / "BISON_models_pretrained_tiny_acc0.333.json").write_text(json.dumps(hostile_results()))
    sp = root / "evaluation/SparklesEval/results"
    sp.mkdir(parents=True)
    (sp / "SparklesEval_models_pretrained_tiny.json").write_text(json.dumps(hostile_dialogues()))

    assert cli.main(["--sparkles_root", str(root), "--visualize_SparklesDialogue", "--visualize_eval_results"]) == 0
    err = capsys.readouterr().err
    assert "SparklesDialogueVG.json" in err and "NLVR2" in err  # missing inputs are reported, not fatal
    page = Page(ann.with_suffix(".html").read_text())
    assert "ASSISTANT MODEL: gpt-4 (reference dialogues)" in page.all_text
    bison = Page((results / "BISON_models_pretrained_tiny_acc0.333.html").read_text())
    assert "Accuracy: 0.333" in bison.all_text and "model: models_pretrained_tiny" in bison.all_text
    sp_page = Page((sp / "SparklesEval_models_pretrained_tiny.html").read_text())
    assert "ASSISTANT MODEL: models_pretrained_tiny" in sp_page.all_text

    out = tmp_path / "one.html"
    assert cli.main(["--input", str(ann), "--output", str(out), "--relative_dir", "pics", "--page-size", "1"]) == 0
    assert out.exists() and (tmp_path / "one_page2.html").exists()
    assert 'src="pics/14.jpg"' in out.read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--sparkles_root", str(empty), "--visualize_SparklesDialogue"]) == 2
    assert "no input files" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"foo": 1}]))
    assert cli.main(["--input", str(bad)]) == 2
    assert "neither dialogues" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Browser rendering (headless Chromium)
# --------------------------------------------------------------------------------------------------------
def _scene(path: Path, sky, ground, sun=None, shape=None) -> None:
    """A small drawn picture for the sample pages (no real photos are available offline)."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (320, 240), sky)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 160, 320, 240], fill=ground)
    if sun:
        d.ellipse([230, 25, 285, 80], fill=sun)
    if shape == "house":
        d.rectangle([70, 105, 170, 175], fill=(200, 70, 60))
        d.polygon([(60, 105), (120, 60), (180, 105)], fill=(110, 60, 40))
        d.rectangle([108, 140, 132, 175], fill=(70, 40, 20))
    elif shape == "boat":
        d.polygon([(90, 170), (230, 170), (205, 195), (115, 195)], fill=(190, 30, 30))
        d.line([(160, 170), (160, 95)], fill=(60, 40, 20), width=4)
        d.polygon([(163, 100), (163, 165), (215, 165)], fill=(245, 245, 245))
    elif shape == "tree":
        d.rectangle([150, 120, 170, 180], fill=(100, 65, 30))
        d.ellipse([115, 55, 205, 140], fill=(40, 140, 50))
    im.save(path, quality=90)


def sample_root(tmp: Path) -> Path:
    """A tiny, friendly Sparkles root: one dialogue file and one BISON result file with drawn images."""
    root = tmp / "sample"
    imgs = root / "data/SparklesDialogueVG/images"
    _scene(imgs / "101.jpg", (135, 190, 235), (90, 160, 80), (250, 210, 60), "house")
    _scene(imgs / "2024.jpg", (70, 120, 200), (40, 90, 160), (250, 160, 60), "boat")
    _scene(imgs / "202.jpg", (180, 215, 240), (120, 170, 90), None, "tree")
    caption = {"101": "A red cottage with a brown roof stands on a green meadow under a clear blue sky; "
                      "the afternoon sun is bright and a small wooden door faces the viewer.",
               "2024": "A small red sailing boat with a white sail floats on calm dark-blue water at sunset.",
               "202": "A single leafy tree grows in a pale green field on a hazy morning."}
    dialogue = [
        {"role": "user", "content": f"I'm planning a weekend trip. Could you write a short postcard message "
                                    f"that links the cottage in IMAGE#101{SLOT} with the boat in IMAGE#2024{SLOT}?",
         "images": [{"image_id": 101, "caption": caption["101"]}, {"image_id": 2024, "caption": caption["2024"]}]},
        {"role": "assistant", "content": "Dear friend,\nWe arrived at the little red cottage from IMAGE#101 just as "
                                         "the sun came out. Tomorrow we will sail the red boat of IMAGE#2024 "
                                         "across the bay and watch the sunset from the water."},
        {"role": "user", "content": f"Lovely! Now add the quiet tree of IMAGE#202{SLOT} as the place where "
                                    f"the trip ends.", "images": [{"image_id": 202, "caption": caption["202"]}]},
        {"role": "assistant", "content": "After the sail we will walk up to the lone tree in IMAGE#202, rest in "
                                         "its shade and look back at the cottage of IMAGE#101 one last time."},
    ]
    data = [{"evaluation_id": 1, "dialogue": dialogue,
             "gpt-4": {"A1_C123_scores": [9.0, 9.0, 8.0, 9.0], "A2_C123_scores": [8.0, 8.0, 9.0, 8.0],
                       "prompt": "...", "response": "* Evaluating A1\n- (C1) Explanation: \"The answer uses both "
                       "images correctly.\" Rating: [[9]]\n- (C2) ... Rating: [[8]]\n- (C3) ... Rating: [[9]]\n"
                       "Therefore, the overall rating of A1 is [[9]]"}}]
    ann = root / "data/SparklesDialogueVG/annotations/SparklesDialogueVG.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data, indent=1))

    bimgs = root / "evaluation/BISON/images"
    _scene(bimgs / "COCO_val2014_000000000101.jpg", (135, 190, 235), (90, 160, 80), (250, 210, 60), "house")
    _scene(bimgs / "COCO_val2014_000000000102.jpg", (135, 190, 235), (90, 160, 80), None, "tree")
    _scene(bimgs / "COCO_val2014_000000000103.jpg", (70, 120, 200), (40, 90, 160), (250, 160, 60), "boat")
    from sparkles.eval.benchmarks.bison import prompt as bison_prompt

    def item(i, caption, files, label, predict, reason):
        return {"evaluation_id": i, "sentence": caption, "label": label, "predict": predict,
                "prompt": bison_prompt(caption), "img_paths": [f"/eval/BISON/images/{f}" for f in files],
                "response": f"Let's think step by step. {reason} Therefore, the answer (IMAGE#1 or IMAGE#2) is "
                            f"{predict.upper()}."}
    results = [
        item(1, "A red house with a brown roof in the sunshine.",
             ["COCO_val2014_000000000102.jpg", "COCO_val2014_000000000101.jpg"], "IMAGE#2", "image#2",
             "IMAGE#1 shows a tree and no house; IMAGE#2 shows a red house under a yellow sun."),
        item(2, "A tree standing alone in a field.",
             ["COCO_val2014_000000000102.jpg", "COCO_val2014_000000000103.jpg"], "IMAGE#1", "image#2",
             "IMAGE#2 has an open space around a mast, which could look like a trunk."),
    ]
    res = root / "evaluation/BISON/results/BISON_models_pretrained_sample_acc0.500.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(results, indent=1))
    return root


def _colour_pixels(png: Path, rgb, tol: int = 40) -> int:
    from PIL import Image

    import numpy as np

    px = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return int((np.abs(px - np.asarray(rgb)).max(axis=-1) <= tol).sum())


def test_browser_runs_script_and_no_injected_code(tmp_path):
    ann = tmp_path / "root/annotations/x.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(hostile_dialogues()))
    make_image(tmp_path / "root/images/14.jpg", RED)
    make_image(tmp_path / "root/images/1417.jpg", BLUE)
    make_image(tmp_path / "root/images/2.jpg", GREEN)
    assert cli.main(["--input", str(ann)]) == 0
    page = ann.with_suffix(".html")
    proc = run_chromium(tmp_path, "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout).group(0)
    assert 'data-viewer-ready="1"' in body  # our script ran under the CSP
    assert "data-pwned" not in body          # nothing from the data did

    # Drive the hooks in the real browser: a probe script (admitted by adding its hash to the page's CSP)
    # hovers a mention, clicks a thumbnail, presses Escape, and writes what it saw onto <body>.
    probe = ("var b=document.body,p=document.getElementById('hover-preview'),mo=document.getElementById('modal');"
             "var m=document.querySelectorAll('.img-mention')[1];"
             "m.dispatchEvent(new MouseEvent('mouseover',{bubbles:true}));"
             "b.setAttribute('data-t-hover',(p.hidden?'hidden':'shown')+'|'+"
             "document.getElementById('hover-preview-img').getAttribute('src'));"
             "m.dispatchEvent(new MouseEvent('mouseout',{bubbles:true}));"
             "b.setAttribute('data-t-unhover',p.hidden?'hidden':'shown');"
             "document.querySelectorAll('img.slot-thumb')[2].click();"
             "b.setAttribute('data-t-click',(mo.hidden?'hidden':'shown')+'|'+"
             "document.getElementById('modal-img').getAttribute('src'));"
             "document.dispatchEvent(new KeyboardEvent('keydown',{key:'Escape'}));"
             "b.setAttribute('data-t-escape',mo.hidden?'hidden':'shown');")
    digest = base64.b64encode(hashlib.sha256(probe.encode()).digest()).decode()
    probed = page.with_name("probed.html")
    text = page.read_text(encoding="utf-8").replace("script-src '", f"script-src 'sha256-{digest}' '", 1)
    probed.write_text(text.replace("</body>", f"<script>{probe}</script></body>"), encoding="utf-8")
    proc = run_chromium(tmp_path, "--dump-dom", probed.as_uri())
    body = re.search(r"<body[^>]*>", proc.stdout).group(0)
    assert 'data-t-hover="shown|../images/1417.jpg"' in body
    assert 'data-t-unhover="hidden"' in body
    assert 'data-t-click="shown|' in body and '/images/2.jpg"' in body
    assert 'data-t-escape="hidden"' in body
    assert "data-pwned" not in body

    shot = tmp_path / "hostile.png"
    proc = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    # The relative image URLs resolved: the red and blue test images are on screen.
    assert _colour_pixels(shot, RED) > 2000 and _colour_pixels(shot, BLUE) > 2000


def with_probe(page: Path, probe: str) -> Path:
    """A copy of ``page`` that also runs ``probe`` (its hash added to the page's CSP) after the page's script."""
    digest = base64.b64encode(hashlib.sha256(probe.encode()).digest()).decode()
    text = page.read_text(encoding="utf-8").replace("script-src '", f"script-src 'sha256-{digest}' '", 1)
    probed = page.with_name(f"probed-{page.name}")
    probed.write_text(text.replace("</body>", f"<script>{probe}</script></body>"), encoding="utf-8")
    return probed


def test_a_clicked_image_opens_at_least_at_its_natural_size(tmp_path):
    """A 96-px image of the CPU world opens enlarged by a whole factor with square pixels; a photo larger than the
    window opens at its natural size (the viewer scrolls) instead of being shrunk."""
    make_image(tmp_path / "images/small.jpg", RED, size=(96, 96))
    make_image(tmp_path / "images/big.jpg", BLUE, size=(1600, 1200))
    items = [{"label": "IMAGE#1", "predict": "image#1", "evaluation_id": 0, "prompt": "p", "response": "r",
              "sentence": "s", "img_paths": ["/elsewhere/small.jpg", "/elsewhere/big.jpg"]}]
    [page] = viz.write_choice_results_page(items, tmp_path / "results/page.html")
    # Click each image in turn; when the viewer's image has loaded, write its size on <body>.
    probe = ("var b=document.body,mi=document.getElementById('modal-img'),imgs=document.querySelectorAll("
             "'img.pair-img'),k=0;mi.addEventListener('load',function(){"  # layout size: the zoom-in animation scales
             "b.setAttribute('data-t-'+k,mi.offsetWidth+'x'+mi.offsetHeight+'|'+mi.naturalWidth+'x'+"
             "mi.naturalHeight+'|'+getComputedStyle(mi).imageRendering+'|'+innerWidth+'x'+innerHeight);k++;"
             "if(k<imgs.length){"
             "document.dispatchEvent(new KeyboardEvent('keydown',{key:'Escape'}));imgs[k].click();}});imgs[0].click();")
    proc = run_chromium(tmp_path, "--dump-dom", "--window-size=1200,900", "--virtual-time-budget=10000",
                        with_probe(page, probe).as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = dict(re.findall(r'data-t-(\d)="([^"]*)"', proc.stdout))
    size, natural, rendering, window = shown["0"].split("|")
    (width, height), (room_w, room_h) = (map(int, size.split("x")), map(int, window.split("x")))
    scale = width // 96
    # enlarged by the largest whole factor that fits the viewer's 92% x 86% of the window
    assert natural == "96x96" and rendering == "pixelated" and width == height == 96 * scale and scale >= 3
    assert 96 * scale <= min(0.92 * room_w, 0.86 * room_h) < 96 * (scale + 1)
    assert shown["1"].startswith("1600x1200|1600x1200|pixelated|")  # larger than the window: natural size


def test_browser_screenshots_of_sample_pages(tmp_path):
    root = sample_root(tmp_path)
    assert cli.main(["--sparkles_root", str(root), "--visualize_SparklesDialogue", "--visualize_eval_results"]) == 0
    pages = {"viz_dialogue_page.png": root / "data/SparklesDialogueVG/annotations/SparklesDialogueVG.html",
             "viz_results_page.png": root / "evaluation/BISON/results/BISON_models_pretrained_sample_acc0.500.html"}
    shots = []
    for name, page in pages.items():
        shot = tmp_path / name
        proc = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1100", page.as_uri())
        assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
        import numpy as np
        from PIL import Image

        im = Image.open(shot)
        assert im.size == (1280, 1100)
        colours = {tuple(p) for p in np.asarray(im.convert("RGB").resize((64, 64))).reshape(-1, 3)}
        assert len(colours) > 50  # a rendered page, not a blank one
        shots.append(shot)
    # Drawn sample images are visible: the red cottage/boat colour appears in both screenshots.
    assert all(_colour_pixels(s, (200, 70, 60), tol=30) + _colour_pixels(s, (190, 30, 30), tol=30) > 20 for s in shots)
    if os.environ.get("SPARKLES_UPDATE_DOCS_IMG") == "1":
        dest = REPO / "docs/img"
        dest.mkdir(parents=True, exist_ok=True)
        for s in shots:
            shutil.copyfile(s, dest / s.name)
