"""Image decoding is guarded (issue 30, point 1): allowed formats only, a pixel cap checked before decoding,
large images reduced, a bounded number of decodes at once — for every path an image takes into the project."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from sparkles.processors import image as imgmod
from sparkles.processors.image import (ImageLoadError, ImageTooLargeError, UnsupportedImageError, check_image,
                                       load_rgb, open_image)
from sparkles.serve.images import load_image_url
from sparkles.serve.openai_format import ApiError

REPO = Path(__file__).resolve().parents[1]
BOMB_SIDE = 12000  # 144 MP: above our 40 MP cap, below Pillow's own 179 MP DecompressionBombError
BOMB_RGB_BYTES = BOMB_SIDE * BOMB_SIDE * 3  # 432 MB once converted to RGB
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
       b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit ``side``×``side`` PNG of one colour, written row block by row block (never held decoded)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row * min(500, side - y)) for y in range(0, side, 500)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def encoded(fmt: str, size=(32, 24), colour=(200, 30, 60), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_bomb()
    assert len(data) < 20_000  # ~17.5 KB on disk
    with pytest.warns(Image.DecompressionBombWarning), Image.open(io.BytesIO(data)) as im:
        assert im.size == (BOMB_SIDE, BOMB_SIDE)  # a real PNG that plain Pillow would decode
    return data


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any image's pixels are decoded (``load``) or converted."""
    calls = []

    def refuse(self, *a, **k):
        calls.append(type(self).__name__)
        raise AssertionError(f"pixels of a {self.format} {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "convert", refuse)
    return calls


# --------------------------------------------------------------------------- decompression bomb
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_is_refused_by_name_before_decoding(bomb, tmp_path, no_pixel_decoding):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    for source in (bomb, path, io.BytesIO(bomb)):
        with pytest.raises(ImageTooLargeError) as info:
            open_image(source)
        msg = str(info.value)
        assert "12000×12000" in msg and "144.0 megapixels" in msg and "cap of 40 megapixels" in msg, msg
        assert info.value.size == (BOMB_SIDE, BOMB_SIDE) and info.value.max_pixels == imgmod.MAX_IMAGE_PIXELS
        assert isinstance(info.value, ImageLoadError) and isinstance(info.value, OSError)
    assert str(path) in str(pytest.raises(ImageTooLargeError, load_rgb, path).value)
    with pytest.raises(ImageTooLargeError):
        check_image(bomb)
    assert no_pixel_decoding == []


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_bomb_refusal_costs_no_more_than_its_header(bomb, tmp_path):
    """Peak memory of a process that refuses the bomb stays far below the 432 MB it decodes to.

    ``tracemalloc`` does not see Pillow's pixel buffers (malloc'ed in C); the process's peak resident size
    (VmHWM) does. A fresh process is used and its peak reset first (``ru_maxrss`` would carry the forking
    pytest's size across exec). The same process then decodes a 36-MP image (under the cap) to show that the
    measure sees decoding at all.
    """
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "control.png").write_bytes(png_bomb(6000))
    script = r"""
import json, re, sys, warnings
warnings.simplefilter("ignore")
from sparkles.processors.image import ImageTooLargeError, open_image
bomb, control = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
def peak():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current size
base = peak()
try:
    open_image(bomb)
    refused = False
except ImageTooLargeError:
    refused = True
after = peak()
open_image(control)
print(json.dumps({"refused": refused, "base_kb": base, "peak_kb": after, "control_kb": peak()}))
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bomb.png"), str(tmp_path / "control.png")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    if "Permission denied" in out.stderr:
        pytest.skip("this system does not let a process reset its VmHWM")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["refused"]
    assert (r["peak_kb"] - r["base_kb"]) / 1024 < 8, r  # decoding the bomb needs 144 MB ("1") + 432 MB (RGB)
    assert (r["control_kb"] - r["peak_kb"]) / 1024 > 30, r  # decoding 36 MP does show up in the measure


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_as_api_data_url_is_a_400_that_says_why(bomb):
    with pytest.raises(ApiError) as info:
        load_image_url(data_url(bomb), param="messages[0].content[1].image_url")
    err = info.value
    assert (err.status, err.code, err.param) == (400, "image_too_large", "messages[0].content[1].image_url")
    assert "12000×12000" in err.message and "40 megapixels" in err.message


def test_pixel_cap_is_configurable(monkeypatch):
    data = encoded("PNG", size=(100, 60))
    with pytest.raises(ImageTooLargeError, match=r"100×60 pixels .* cap of 0.005 megapixels"):
        open_image(data, max_pixels=5000)
    monkeypatch.setattr(imgmod, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageTooLargeError):
        open_image(data)
    assert open_image(data, max_pixels=6000).size == (100, 60)


def test_pillow_own_bomb_error_is_also_named(no_pixel_decoding):
    data = png_bomb(14000)  # 196 MP: Pillow raises DecompressionBombError inside Image.open
    with pytest.raises(ImageTooLargeError, match="refused before decoding"):
        open_image(data, max_pixels=10 ** 9)


# --------------------------------------------------------------------------- formats
def test_postscript_disguised_as_png_never_reaches_another_decoder(monkeypatch, no_pixel_decoding):
    from PIL import EpsImagePlugin

    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # unrestricted Pillow takes it for EPS
    touched = []
    accept, factory = Image.OPEN["EPS"][1], Image.OPEN["EPS"][0]
    monkeypatch.setitem(Image.OPEN, "EPS", (lambda *a: touched.append("factory") or factory(*a),
                                            lambda p: touched.append("accept") or accept(p)))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was invoked"))
    for source in (EPS, io.BytesIO(EPS)):
        with pytest.raises(UnsupportedImageError, match="not a PNG, JPEG, WEBP, GIF or BMP image"):
            open_image(source, what="upload.png")
    with pytest.raises(ApiError) as info:
        load_image_url(data_url(EPS), param="p")
    assert (info.value.status, info.value.code) == (400, "invalid_image")
    with pytest.raises(UnsupportedImageError):
        check_image(EPS)
    assert touched == []  # the EPS plugin was not even asked whether it recognises the bytes


def test_path_with_an_eps_extension_is_refused_too(tmp_path):
    path = tmp_path / "picture.eps"
    path.write_bytes(EPS)
    with pytest.raises(UnsupportedImageError, match=re.escape(str(path))):
        load_rgb(path)


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO", "TGA", "PCX"])
def test_other_formats_pillow_knows_are_refused(fmt):
    data = encoded(fmt, size=(16, 16))
    assert Image.open(io.BytesIO(data)).format == fmt
    with pytest.raises(UnsupportedImageError):
        open_image(data)


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                      ("GIF", "image/gif"), ("BMP", "image/bmp")])
def test_allowed_formats_load_as_rgb(fmt, mime, tmp_path):
    data = encoded(fmt, size=(32, 24), colour=(200, 30, 60))
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for image in (open_image(data), open_image(path), load_rgb(str(path)), open_image(io.BytesIO(data)),
                  load_image_url(data_url(data, mime), param="p"),
                  load_image_url(str(path), param="p", allowed_dirs=[tmp_path])):
        assert image.mode == "RGB" and image.size == (32, 24)
        r, g, b = image.getpixel((16, 12))
        assert abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 60) < 12, (fmt, (r, g, b))
    assert check_image(data) == (fmt, (32, 24))


def test_palette_and_alpha_modes_become_rgb():
    for mode in ("L", "LA", "P", "RGBA", "1"):
        buf = io.BytesIO()
        Image.new(mode, (10, 10)).save(buf, format="PNG")
        assert open_image(buf.getvalue()).mode == "RGB"


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    image = open_image(buf.getvalue())
    assert image.mode == "RGB" and image.getpixel((10, 10)) == (255, 0, 0)


def test_broken_and_missing_images_are_named_errors(tmp_path):
    png = encoded("PNG", size=(64, 64))
    with pytest.raises(ImageLoadError, match=r"cannot read image <\d+ bytes>: "):
        open_image(png[: len(png) // 2])  # truncated
    with pytest.raises(ImageLoadError, match=r"image not found: .*gone\.png"):
        load_rgb(tmp_path / "gone.png")
    with pytest.raises(UnsupportedImageError, match=r"cannot read image .*junk\.jpg: not a PNG"):
        (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
        load_rgb(tmp_path / "junk.jpg")
    with pytest.raises(ApiError) as info:
        load_image_url(data_url(png[:100]), param="p")
    assert (info.value.status, info.value.code) == (400, "invalid_image")


# --------------------------------------------------------------------------- reduction after decoding
def test_large_images_are_reduced_to_the_side_bound():
    image = open_image(encoded("PNG", size=(3000, 1000)))
    assert image.size == (imgmod.MAX_IMAGE_SIDE, 683)
    assert open_image(encoded("PNG", size=(300, 100)), max_side=150).size == (150, 50)
    assert open_image(encoded("PNG", size=(300, 100)), max_side=0).size == (300, 100)  # 0: keep whole
    assert open_image(Image.new("RGBA", (5000, 200))).size == (2048, 82)  # an already-decoded image too


def test_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    from PIL import JpegImagePlugin

    seen = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real(self, mode, size)
        seen.append((size, self.size))  # the size the decoder will produce
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    image = open_image(encoded("JPEG", size=(800, 600)), max_side=200)
    assert seen[0] == ((200, 200), (400, 300))  # DCT scale 1/2 (thumbnail's own later draft is a no-op)
    assert image.size == (200, 150) and image.mode == "RGB"


# --------------------------------------------------------------------------- concurrency
def test_concurrent_decodes_are_bounded(monkeypatch):
    state = {"now": 0, "max": 0}
    lock = threading.Lock()
    real_load = ImageFile.ImageFile.load

    def slow_load(self):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        try:
            return real_load(self)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    old = imgmod.MAX_CONCURRENT_DECODES
    data = encoded("PNG", size=(64, 64))
    try:
        imgmod.set_max_concurrent_decodes(2)
        results = []
        threads = [threading.Thread(target=lambda: results.append(open_image(data).size)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [(64, 64)] * 8
        assert state["max"] == 2, state
    finally:
        imgmod.set_max_concurrent_decodes(old)
    assert imgmod.MAX_CONCURRENT_DECODES == old == 4
    with pytest.raises(ValueError):
        imgmod.set_max_concurrent_decodes(0)


def test_a_refused_image_frees_its_decode_slot(bomb):
    with pytest.warns(Image.DecompressionBombWarning):
        for _ in range(imgmod.MAX_CONCURRENT_DECODES + 2):
            with pytest.raises(ImageTooLargeError):
                open_image(bomb)
    assert open_image(encoded("PNG")).size == (32, 24)  # no slot leaked


# --------------------------------------------------------------------------- every decode goes through it
def test_no_image_is_decoded_outside_the_helper():
    """``Image.open`` appears only in the helper (and the screenshot tool, which reads its own browser's PNG)."""
    allowed = {"sparkles/processors/image.py", "sparkles/serve/screenshot.py"}
    found = []
    for path in sorted((REPO / "sparkles").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel not in allowed and re.search(r"Image\.open\(|imread\(|read_image\(", path.read_text()):
            found.append(rel)
    assert found == []


def test_eval_processor_goes_through_the_helper(tmp_path):
    from sparkles.processors.image import build_processor

    proc = build_processor({"name": "blip2_image_eval", "image_size": 32})
    path = tmp_path / "x.png"
    path.write_bytes(EPS)
    with pytest.raises(UnsupportedImageError):
        proc(path)
    path.write_bytes(encoded("PNG", size=(40, 30)))
    assert tuple(proc(path).shape) == (3, 32, 32)


def test_dataset_files_and_shards_go_through_the_helper(tmp_path, monkeypatch):
    import sparkles.data.builders as builders
    import sparkles.models  # noqa: F401  (model schema for load_config)
    from sparkles.common.config import load_config
    from sparkles.data.base import DataError
    from sparkles.data.shards import ShardDataset, ShardStream, read_manifest, write_shards
    from sparkles.models.tokenizer import load_tokenizer
    from test_train_helpers import make_tokenizer, make_world, write_config

    name = "SparklesDialogueCC_turn1_1img"
    root = tmp_path / "root"
    records = make_world(root, n_per_split=2, splits={name: (1, 1)})
    tok_dir = make_tokenizer(tmp_path / "tok")
    cfg = load_config(write_config(tmp_path / "cfg.yaml", root=root, tok_dir=tok_dir,
                                   datasets={name: {"sample_ratio": 1}}))
    ds = builders.build_dataset(name, cfg.datasets[name], root=root, tokenizer=load_tokenizer(tok_dir),
                                model_cfg=cfg.model, run_cfg=cfg.run)

    # shards: written from the good files, streamed back through open_image
    write_shards(ds.records, tmp_path / "shards")
    calls = []
    real = imgmod.open_image

    def spy(source, **k):  # the transforms call it again on the decoded image (convert only): not counted
        if not isinstance(source, Image.Image):
            calls.append(k.get("what") or str(source))
        return real(source, **k)

    monkeypatch.setattr(imgmod, "open_image", spy)
    manifest = {**read_manifest(tmp_path / "shards"), "_dir": str(tmp_path / "shards")}
    batch = next(iter(ShardStream(ShardDataset(name, manifest, ds.encoder), batch_size=1, rank=0, world=1, seed=0)))
    assert batch["images"].shape[0] == 1 and len(calls) == 1 and calls[0].endswith("(shard bytes)")

    # the JSON + image folder path
    assert ds[(0, 0)].pixels.shape[0] == 1 and len(calls) == 2
    image_id = records[name][0]["tgt_imgs"][0]["image_id"]
    (root / f"data/SparklesDialogueCC/images/{image_id}.jpg").write_bytes(EPS)
    with pytest.raises(DataError, match=rf"image '{image_id}': cannot read image .*{image_id}\.jpg: not a PNG"):
        ds[(0, 0)]
    # the converter refuses what training would refuse
    with pytest.raises(DataError, match=rf"image '{image_id}': cannot read image .*{image_id}\.jpg: not a PNG"):
        write_shards(ds.records, tmp_path / "shards2")
