"""The demo driven by a real browser: the README screenshot (``python -m sparkles.serve.screenshot``) and tests.

Launches the demo on loopback, then drives headless Chromium through its DevTools pipe (no extra Python
packages) as a person would: upload pictures, type each question (a line break as Shift+Enter) and press Enter,
watch the answer stream in. :func:`chat_in_browser` returns what the page showed — every state of each answer
while it streamed, the gallery's labels and whether they are whole and uncovered, the page's model line — and the
saved record; :func:`main` saves a screenshot of one such turn as a palette PNG. The default model is the tiny one
`bash run.sh` trains; ``--untrained`` uses a random tiny model instead (its answers are noise, but the page looks
the same).

    python -m sparkles.serve.screenshot --out docs/img/demo.png
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

QUESTION = "How many circles are in IMAGE#1✨, and what shape is in IMAGE#2⭐?"
ENTER = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
SHIFT = 8  # the DevTools modifier bit


class DevToolsPipe:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, chromium: str, profile_dir: Path, *, width: int, height: int) -> None:
        cmd_read, self._cmd_write = os.pipe()
        self._res_read, res_write = os.pipe()

        def wire_fds() -> None:  # runs in the child: Chromium reads commands on 3, writes replies on 4
            os.dup2(cmd_read, 3)
            os.dup2(res_write, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "--remote-debugging-pipe"],
            pass_fds=(3, 4), preexec_fn=wire_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_read)
        os.close(res_write)
        self._buffer = b""
        self._next_id = 0
        self.session: Optional[str] = None

    def send(self, method: str, params: Optional[dict] = None, *, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self._buffer:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"Chromium did not answer {method}")
                chunk = os.read(self._res_read, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # everything else is an event we do not need
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, width: int, height: int) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = 60, what: str = "") -> None:
        deadline = time.time() + timeout
        while not self.js(expression):
            if time.time() > deadline:
                raise TimeoutError(f"the page never showed {what or expression}")
            time.sleep(0.2)

    def set_files(self, selector: str, files: Sequence[str]) -> None:
        root = self.send("DOM.getDocument", {"depth": -1, "pierce": True})["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": list(files)})

    def press_enter(self, *, shift: bool = False) -> None:
        """A real key press (keydown with its character, keyup), as the page's keyboard handlers receive it."""
        modifiers = {"modifiers": SHIFT} if shift else {}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **ENTER, **modifiers})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **ENTER, **modifiers})

    def type_text(self, text: str) -> None:
        """Type ``text`` where the focus is; each line break is typed as Shift+Enter."""
        for i, line in enumerate(text.split("\n")):
            if i:
                self.press_enter(shift=True)
            if line:
                self.send("Input.insertText", {"text": line})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self._cmd_write)
        os.close(self._res_read)


def draw_sample_images(folder: Path) -> list[Path]:
    """Two simple pictures: two red circles; one blue square."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    scenes = {"two_red_circles.png": [("circle", (200, 40, 40), (30, 60, 100, 130)),
                                      ("circle", (200, 40, 40), (120, 90, 190, 160))],
              "blue_square.png": [("square", (40, 70, 200), (60, 60, 160, 160))]}
    paths = []
    for name, shapes in scenes.items():
        image = Image.new("RGB", (224, 224), (238, 238, 238))
        draw = ImageDraw.Draw(image)
        for kind, color, box in shapes:
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=color)
        image.save(folder / name)
        paths.append(folder / name)
    return paths


def _notice_has(text: str) -> str:
    return f"(document.querySelector('#sparkles-notice') || {{innerText: ''}}).innerText.includes({json.dumps(text)})"


# Records the text of answer number window.sparklesAnswerIndex at every change of the chat's DOM, so no state it
# passed through while streaming is missed (sampling from Python could skip one).
WATCH_ANSWERS = """(() => {
  window.sparklesAnswerStates = [];
  window.sparklesAnswerIndex = 0;
  const answer = () => { const bot = document.querySelectorAll('#sparkles-chat [data-testid="bot"]')[
                           window.sparklesAnswerIndex]; return bot ? bot.innerText : null; };
  new MutationObserver(() => { const text = answer(), seen = window.sparklesAnswerStates;
                               if (text !== null && text !== seen[seen.length - 1]) seen.push(text); })
    .observe(document.querySelector('#sparkles-chat'), {subtree: true, childList: true, characterData: true});
})()"""
# Whether the gallery's captions are whole (not cut to "IMAGE…") and on top where they are drawn, and whether the
# first thumbnail is free of anything else of the gallery drawn over it (a floating label, buttons; compared by
# their boxes, since such overlays may let clicks through and so escape hit-testing).
GALLERY_LAYOUT = """(() => {
  const gallery = document.querySelector('#sparkles-gallery');
  gallery.scrollIntoView({block: 'center'});
  const labels = [...gallery.querySelectorAll('.caption-label')].map(el => {
    const r = el.getBoundingClientRect(), hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return {text: el.innerText, whole: el.scrollWidth <= el.clientWidth && r.width > 0,
            uncovered: !!hit && el.contains(hit)};
  });
  const first = gallery.querySelector('.thumbnail-item');
  let over = ['no thumbnail'];
  if (first) {
    const r = first.getBoundingClientRect();
    over = [...gallery.querySelectorAll('*')].filter(el => {
      if (el.contains(first) || first.contains(el) || el.offsetParent === null) return false;
      const style = getComputedStyle(el), q = el.getBoundingClientRect();
      return style.visibility !== 'hidden' && Number(style.opacity) > 0 && q.width > 0 && q.height > 0
             && q.left < r.right && q.right > r.left && q.top < r.bottom && q.bottom > r.top;
    }).map(el => el.tagName.toLowerCase() + (el.className ? '.' + String(el.className).split(' ')[0] : ''));
  }
  return {labels, first_thumbnail_uncovered: over.length === 0, over_first_thumbnail: over,
          page_width: document.documentElement.clientWidth};
})()"""
# Gradio's own error marks (a component's "Error" badge, an error toast's title and text) that are showing.
ERROR_MARKS = """[...document.querySelectorAll('.error')].filter(e => e.offsetParent !== null)
                 .map(e => e.innerText.trim()).filter(t => t)"""


@dataclass
class BrowserChat:
    """What a browser showed of a conversation with the demo."""

    answers: list[str]  # each turn's answer as the page finally showed it
    states: list[list[str]]  # each turn's answer at every change of the page while it streamed, in order
    upload_notice: str  # the notice under the upload box once the files were uploaded
    upload_errors: list[str]  # Gradio's error marks on the page then (an "Error" badge, a toast)
    notices: list[str]  # the notice after each turn
    gallery: dict  # GALLERY_LAYOUT: labels (text, whole, uncovered), first_thumbnail_uncovered (and what is over
    # it: over_first_thumbnail), page_width
    model_line: str  # the page's "Model: ..." line
    record: dict = field(default_factory=dict)  # the conversation as the demo saved it
    screenshot: Optional[bytes] = None  # the page after the last turn (PNG), when asked for


def drive_demo(url: str, images: Sequence[Path], questions: Sequence[str], *, work: Path, chromium: str,
               width: int = 1280, height: int = 1000, timeout: float = 300, screenshot: bool = False
               ) -> BrowserChat:
    """Drive the demo at ``url`` as a person would: upload ``images`` (other files among them are refused by the
    page), then for each question click the message box, type it and press Enter, and wait until its answer is
    complete."""
    browser = DevToolsPipe(chromium, work / "chromium-profile", width=width, height=height)
    answers, states, notices = [], [], []
    try:
        browser.open(url, width, height)
        browser.wait_for("!!document.querySelector('input[type=file]') && !!document.querySelector('#sparkles-chat')",
                         what="the upload box")
        browser.set_files("input[type=file]", [str(p) for p in images])
        browser.wait_for(f"{_notice_has('Added ')} || {_notice_has('Skipped ')}", timeout=timeout,
                         what="the uploaded files")
        upload_notice = browser.js("document.querySelector('#sparkles-notice').innerText")
        upload_errors = browser.js(ERROR_MARKS)
        gallery = browser.js(GALLERY_LAYOUT)
        settle = time.time() + 3  # the upload's loading overlay fades out over a moment
        while not gallery["first_thumbnail_uncovered"] and time.time() < settle:
            time.sleep(0.2)
            gallery = browser.js(GALLERY_LAYOUT)
        browser.js(WATCH_ANSWERS)
        for turn, question in enumerate(questions, 1):
            browser.js(f"window.sparklesAnswerStates.length = 0; window.sparklesAnswerIndex = {turn - 1};"
                       "document.querySelector('#sparkles-message textarea').focus()")
            browser.type_text(question)
            browser.press_enter()
            # complete: the turn's answer is on the page and the notice no longer says it is being written; or
            # the page refused the question (markers that do not match the images, an error)
            browser.wait_for(f"""(document.querySelectorAll('#sparkles-chat [data-testid="bot"]').length === {turn}
                                  && !{_notice_has('Thinking')} && !{_notice_has('Answering')})
                                 || {_notice_has('Not sent')} || {_notice_has('Not answered')}""",
                             timeout=timeout, what=f"the answer to question {turn}")
            notice = browser.js("document.querySelector('#sparkles-notice').innerText")
            if notice.startswith(("Not sent", "Not answered")):
                raise RuntimeError(f"question {turn} was not answered: {notice}")
            time.sleep(0.3)  # let the last update paint
            states.append(browser.js("window.sparklesAnswerStates.slice()"))
            answers.append(browser.js("""[...document.querySelectorAll('#sparkles-chat [data-testid="bot"]')]
                                         .pop().innerText"""))
            notices.append(browser.js("document.querySelector('#sparkles-notice').innerText"))
        model_line = browser.js("document.querySelector('#sparkles-model').innerText")
        png = browser.screenshot() if screenshot else None
    finally:
        browser.close()
    return BrowserChat(answers=answers, states=states, upload_notice=upload_notice, upload_errors=upload_errors,
                       notices=notices, gallery=gallery, model_line=model_line, screenshot=png)


def chat_in_browser(images: Sequence[Path], questions: Sequence[str], *, work: Path,
                    cfg_path: Optional[str] = None, sparkles_root: Optional[str] = None,
                    options: Optional[Sequence[str]] = None, untrained: bool = False, model=None, settings=None,
                    chromium: Optional[str] = None, width: int = 1280, height: int = 1000, timeout: float = 300,
                    screenshot: bool = False) -> BrowserChat:
    """Serve the demo on a free loopback port, have headless Chromium hold the conversation (:func:`drive_demo`),
    and return what it showed with the record the demo saved under ``work``.

    The model: a config (``cfg_path``, ``sparkles_root``, ``options``) served as ``demo.py`` serves it, with the
    config's demo settings; or ``model``, a SparklesChat already built, or with ``untrained`` a random tiny one,
    both answering greedily. ``settings`` (:class:`~.demo_app.DemoSettings`) replaces either's."""
    from ..common.io import read_json
    from ..testing.serving import free_port
    from .demo_app import DemoSettings, build_demo, build_demo_for, launch_kwargs
    from .loading import load_model, make_chat

    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("chromium not found (scripts/install_system.sh installs it)")
    work = Path(work)
    save_root = work / "conversations"
    if untrained or model is not None:
        if model is None:
            from ..testing.tiny import build_tiny_model

            model = build_tiny_model(work / "model", init_std=0.3)
        note = "Its weights are random: its answers are noise." if untrained else DemoSettings.note
        demo = build_demo(make_chat(model), save_root=save_root,
                          model_name="untrained tiny SparklesChat" if untrained else "SparklesChat",
                          settings=settings or DemoSettings(note=note, temperature=0.0))
    else:
        model, cfg = load_model(cfg_path, options=options, sparkles_root=sparkles_root)
        demo = build_demo_for(model, cfg, save_root=save_root, settings=settings)
    demo.queue()
    port = free_port()
    before = set(save_root.iterdir()) if save_root.is_dir() else set()
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(demo, port=port))
    try:
        result = drive_demo(f"http://127.0.0.1:{port}/", images, questions, work=work, chromium=chromium,
                            width=width, height=height, timeout=timeout, screenshot=screenshot)
    finally:
        demo.close()
    folders = [p for p in save_root.iterdir() if p not in before] if save_root.is_dir() else []
    if len(folders) == 1:
        result.record = read_json(folders[0] / "conversation.json")
    return result


def find_chromium() -> Optional[str]:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def save_palette_png(png: bytes, out: Path) -> Path:
    """A screenshot as a small palette PNG (128 colours), for the docs."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .loading import LoadError

    parser = argparse.ArgumentParser(prog="python -m sparkles.serve.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/demo.png", help="PNG to write (default: docs/img/demo.png)")
    parser.add_argument("--cfg-path", default=None, help="model config (default: the tiny model of `bash run.sh`)")
    parser.add_argument("--sparkles_root", default=None, help="the model's Sparkles root (default: the config's)")
    parser.add_argument("--untrained", action="store_true", help="use a random tiny model (answers are noise)")
    parser.add_argument("--question", default=QUESTION, help=f"what to ask (default: {QUESTION!r})")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--chromium", default=find_chromium())
    args = parser.parse_args(argv)
    if not args.chromium:
        print("screenshot: chromium not found (scripts/install_system.sh installs it)", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="sparkles-shot-"))
    try:
        result = chat_in_browser(draw_sample_images(work / "images"), [args.question], work=work,
                                 cfg_path=args.cfg_path, sparkles_root=args.sparkles_root, untrained=args.untrained,
                                 chromium=args.chromium, screenshot=True)
    except LoadError as exc:
        print(f"screenshot: {exc} (or pass --untrained)", file=sys.stderr)
        return 2
    out = save_palette_png(result.screenshot, Path(args.out))
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
