"""Screenshot of the demo in use, for the README: ``python -m sparkles.serve.screenshot``.

Launches the demo on loopback, then drives headless Chromium through its DevTools pipe (no extra Python
packages): upload two drawn pictures, ask a question with ✨/⭐, wait for the answer, save a palette PNG.
The default model is the tiny one `bash run.sh` trains; ``--untrained`` uses a random tiny model instead
(its answers are noise, but the page looks the same).

    python -m sparkles.serve.screenshot --out docs/img/demo.png
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

QUESTION = "How many circles are in IMAGE#1✨, and what shape is in IMAGE#2⭐?"


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


def capture(url: str, out: Path, images: Sequence[Path], *, question: str = QUESTION, work: Path,
            chromium: str, width: int = 1280, height: int = 1000, timeout: float = 180) -> Path:
    """Drive the demo at ``url`` through one question and save the page as a small palette PNG."""
    from PIL import Image

    browser = DevToolsPipe(chromium, work / "chromium-profile", width=width, height=height)
    try:
        browser.open(url, width, height)
        browser.wait_for("!!document.querySelector('input[type=file]')", what="the upload box")
        browser.set_files("input[type=file]", [str(p) for p in images])
        browser.wait_for(_notice_has(f"Added IMAGE#1, IMAGE#{len(images)}"), timeout=timeout, what="the images")
        # Svelte listens for input events; setting .value alone would not reach the app.
        browser.js("""(() => { const box = [...document.querySelectorAll('textarea')]
                               .find(t => t.placeholder.startsWith('Ask about'));
                               box.value = %s; box.dispatchEvent(new Event('input', {bubbles: true})); })()"""
                   % json.dumps(question))
        time.sleep(0.3)
        browser.js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Send').click()")
        browser.wait_for(_notice_has("Done."), timeout=timeout, what="the answer")
        time.sleep(0.5)  # let the last update paint
        png = browser.screenshot()
    finally:
        browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .demo_app import build_demo, launch_kwargs
    from .loading import LoadError, load_model, make_chat

    parser = argparse.ArgumentParser(prog="python -m sparkles.serve.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/demo.png", help="PNG to write (default: docs/img/demo.png)")
    parser.add_argument("--cfg-path", default=None, help="model config (default: the tiny model of `bash run.sh`)")
    parser.add_argument("--untrained", action="store_true", help="use a random tiny model (answers are noise)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        print("screenshot: chromium not found (scripts/install_system.sh installs it)", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="sparkles-shot-"))
    if args.untrained:
        from ..testing.tiny import build_tiny_model

        model = build_tiny_model(work / "model", init_std=0.3)
    else:
        try:
            model, _ = load_model(args.cfg_path)
        except LoadError as exc:
            print(f"screenshot: {exc} (or pass --untrained)", file=sys.stderr)
            return 2
    demo = build_demo(make_chat(model), save_root=work / "conversations", model_name="screenshot")
    demo.queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(demo, port=port))
    try:
        out = capture(f"http://127.0.0.1:{port}/", Path(args.out), draw_sample_images(work / "images"), work=work,
                      chromium=args.chromium)
    finally:
        demo.close()
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
