"""Image decoding (one guarded helper), the BLIP-2 train/eval transforms and the caption cleaner.

``blip2_image_train``: RandomResizedCrop(scale 0.5–1.0, bicubic) → tensor → CLIP normalisation (no flip).
``blip2_image_eval``: resize to a square (aspect ratio not kept, bicubic) → tensor → CLIP normalisation.
``blip_caption``: lower-case, punctuation to spaces, collapse whitespace, keep ``max_words`` words.

Every image the project decodes — API data URLs and local files, demo uploads, dataset files and shard bytes,
evaluation images — goes through :func:`open_image`, which

* tries only the decoders of :data:`ALLOWED_FORMATS` (PNG, JPEG, WEBP, GIF, BMP). Pillow otherwise tries every
  format it knows, among them EPS, which it renders with Ghostscript when that is installed: a PostScript file
  sent as a "PNG" would reach it;
* refuses an image above :data:`MAX_IMAGE_PIXELS` (40 megapixels) from the size in its header, before any pixel
  is decoded, with :class:`ImageTooLargeError` (Pillow's own ``DecompressionBombError`` only fires at 179 MP);
* reduces a large image right after decoding so that its long side is at most :data:`MAX_IMAGE_SIDE`
  (2048 px; JPEG is decoded at a reduced DCT scale with ``Image.draft`` first);
* runs at most :data:`MAX_CONCURRENT_DECODES` decodes at once per process (:func:`set_max_concurrent_decodes`);
* returns an RGB image (the first frame of an animated GIF or WEBP).

Why 2048 px: the model sees 224×224 (``image_size`` in every shipped config). The eval transform resizes the
whole image to that square; the train transform crops half the area or more by default (``min_scale`` 0.5, so
≥ 60 % of each side) before resizing. A 2048-px long side leaves those resizes ≥ 5× the pixels they keep, so
images up to 2048 px (COCO's 640 px, most web photos) are untouched and larger ones differ from a full-size
decode by resampling rounding only — unlike a bound of 4× the input (896 px), which would touch many more
dataset images and depend on the model config.
A 2048×2048 RGB image is 12 MiB, so a request's images stay small in memory after decoding. The peak of one
decode is bounded by the pixel cap: Pillow holds 4 bytes a pixel, so a 40-MP PNG costs about 200 MB while it is
decoded and reduced (measured; ~300 MB before this module reduced before converting), a 40-MP JPEG about 70 MB
(DCT scaling); at most :data:`MAX_CONCURRENT_DECODES` such peaks at once.

Every failure is an :class:`ImageLoadError` (an ``OSError``) whose message starts ``cannot read image <what>:``
— a missing file says ``image not found: <path>``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from ..common.registry import PROCESSORS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Any]  # a path, encoded bytes, a file or a PIL image

#: The only decoders ever tried (Pillow format names).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: Images with more pixels than this (width × height from the header) are refused before decoding.
MAX_IMAGE_PIXELS = 40_000_000
#: Decoded images are reduced (aspect ratio kept) so that neither side exceeds this; None or 0 keeps them whole.
MAX_IMAGE_SIDE = 2048
#: Decodes that may run at once in one process (threads beyond wait); change it with set_max_concurrent_decodes.
MAX_CONCURRENT_DECODES = 4

_FORMAT_NAMES = "PNG, JPEG, WEBP, GIF or BMP"


class ImageLoadError(OSError):
    """An image is missing or cannot (or may not) be decoded.

    ``what`` names the image (a path, "the data URL", ...) and ``reason`` says why, without the name.
    """

    code = "invalid_image"  # the OpenAI-style error code an API answers with (HTTP 400)

    def __init__(self, message: str, *, what: Optional[str] = None, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.what, self.reason = what, reason if reason is not None else message


class UnsupportedImageError(ImageLoadError):
    """Not a PNG, JPEG, WEBP, GIF or BMP image (no other decoder was tried)."""

    code = "invalid_image"  # the OpenAI-style error code an API answers with (HTTP 400)


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than the cap; refused from its header, before any pixel was decoded."""

    code = "image_too_large"

    def __init__(self, message: str, *, what: Optional[str] = None, reason: Optional[str] = None,
                 size: Optional[tuple[int, int]] = None, max_pixels: Optional[int] = None) -> None:
        super().__init__(message, what=what, reason=reason)
        self.size, self.max_pixels = size, max_pixels


def _fail(cls, what: str, reason: str, **extra) -> ImageLoadError:
    return cls(f"cannot read image {what}: {reason}", what=what, reason=reason, **extra)


# ------------------------------------------------------------------------------------------ concurrency
_slots_lock = threading.Lock()
_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)


def set_max_concurrent_decodes(n: int) -> None:
    """Allow ``n`` (≥ 1) decodes at once from now on (decodes already running finish under the old bound)."""
    global _slots, MAX_CONCURRENT_DECODES
    n = int(n)
    if n < 1:
        raise ValueError(f"max concurrent decodes must be at least 1, not {n}")
    with _slots_lock:
        MAX_CONCURRENT_DECODES = n
        _slots = threading.BoundedSemaphore(n)


def _reset_slots_in_child() -> None:  # a fork (DataLoader worker) must not inherit slots held by other threads
    global _slots, _slots_lock
    _slots_lock = threading.Lock()
    _slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_slots_in_child)


@contextlib.contextmanager
def _decode_slot() -> Iterator[None]:
    slots = _slots  # release the semaphore that was acquired even if it is replaced meanwhile
    with slots:
        yield


# ------------------------------------------------------------------------------------------ opening
def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return repr(getattr(source, "name", None) or type(source).__name__)


@contextlib.contextmanager
def _open_checked(source, what: str, max_pixels: Optional[int]):
    """The Pillow image of ``source`` with only its header read: an allowed format, within the pixel cap."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"image not found: {path}", what=what, reason="image not found")
        fp: Any = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(source))
    else:
        fp = source  # a binary file object
    try:
        im = Image.open(fp, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _fail(UnsupportedImageError, what, f"not a {_FORMAT_NAMES} image") from None
    except Image.DecompressionBombError as exc:
        raise _fail(ImageTooLargeError, what, f"{exc} (refused before decoding)", max_pixels=max_pixels) from None
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {what}", what=what, reason="image not found") from None
    except Exception as exc:  # OSError, ValueError, EOFError, ... from a plugin reading a malformed header
        raise _fail(ImageLoadError, what, f"{type(exc).__name__}: {exc}") from None
    with im:
        if im.format not in ALLOWED_FORMATS:  # cannot happen with formats=...; kept as a second lock
            raise _fail(UnsupportedImageError, what, f"{im.format} images are not accepted (only {_FORMAT_NAMES})")
        width, height = im.size
        if width <= 0 or height <= 0:
            raise _fail(ImageLoadError, what, f"the image is {width}×{height} pixels")
        if max_pixels and width * height > max_pixels:
            raise _fail(ImageTooLargeError, what,
                        f"{width}×{height} pixels ({width * height / 1e6:.1f} megapixels) is above the cap of "
                        f"{max_pixels / 1e6:g} megapixels (refused before decoding)",
                        size=(width, height), max_pixels=max_pixels)
        yield im


def _reduce(image, max_side: Optional[int]):
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side))  # keeps the aspect ratio; bicubic after a box pre-reduction
    return image


def open_image(source: ImageLike, *, what: Optional[str] = None, max_pixels: Optional[int] = None,
               max_side: Optional[int] = None):
    """The RGB PIL image of ``source``, decoded under the guards described in the module docstring.

    ``source``: a path, the encoded bytes, a binary file object, or a PIL image (already decoded: it is only
    converted and reduced). ``what`` names it in errors (default: the path). ``max_pixels`` / ``max_side``
    default to :data:`MAX_IMAGE_PIXELS` / :data:`MAX_IMAGE_SIDE`. Raises :class:`ImageLoadError` (or its
    subclasses :class:`UnsupportedImageError`, :class:`ImageTooLargeError`).
    """
    from PIL import Image

    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_side = MAX_IMAGE_SIDE if max_side is None else max_side
    if isinstance(source, Image.Image):
        return _reduce(source.convert("RGB"), max_side)
    what = what or _describe(source)
    with _decode_slot():
        with _open_checked(source, what, max_pixels) as im:
            try:
                if max_side and im.format == "JPEG":
                    im.draft("RGB", (max_side, max_side))  # DCT scaling: decode at 1/2, 1/4 or 1/8 size
                im.load()  # the first frame of an animated GIF / WEBP
                if im.mode in ("RGB", "L"):  # reduce in place before the RGB copy: the same pixels, less memory
                    _reduce(im, max_side)
                rgb = im.convert("RGB")  # palette, 1-bit, alpha, CMYK, ...: converted first, reduced after
            except Exception as exc:  # truncated or corrupt data: OSError, ValueError, EOFError, ...
                raise _fail(ImageLoadError, what, f"{type(exc).__name__}: {exc}") from None
        return _reduce(rgb, max_side)


def check_image(source: ImageLike, *, what: Optional[str] = None, max_pixels: Optional[int] = None
                ) -> tuple[str, tuple[int, int]]:
    """``(format, (width, height))`` of an image :func:`open_image` would accept, without decoding its pixels.

    The same gate (allowed formats, pixel cap) plus Pillow's ``verify()`` (PNG chunk checksums); for writing
    shards, where the pixels are decoded later, at training time.
    """
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    what = what or _describe(source)
    with _open_checked(source, what, max_pixels) as im:
        fmt, size = im.format, im.size
        try:
            im.verify()
        except Exception as exc:
            raise _fail(ImageLoadError, what, f"{type(exc).__name__}: {exc}") from None
    return fmt, size


def load_rgb(image: ImageLike):
    """PIL RGB image from a path, encoded bytes or an image object (:func:`open_image` with its defaults)."""
    return open_image(image)


class _ImageProcessor:
    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image: ImageLike):
        return self.transform(load_rgb(image))


@PROCESSORS.register("blip2_image_train")
class Blip2ImageTrainProcessor(_ImageProcessor):
    def __init__(self, image_size: int = 224, min_scale: float = 0.5, max_scale: float = 1.0,
                 mean=CLIP_MEAN, std=CLIP_STD) -> None:
        from torchvision import transforms as T

        super().__init__(T.Compose([
            T.RandomResizedCrop(image_size, scale=(min_scale, max_scale),
                                interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize(mean, std)]))
        self.image_size = image_size


@PROCESSORS.register("blip2_image_eval")
class Blip2ImageEvalProcessor(_ImageProcessor):
    def __init__(self, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        from torchvision import transforms as T

        super().__init__(T.Compose([
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize(mean, std)]))
        self.image_size = image_size


@PROCESSORS.register("blip_caption")
class BlipCaptionProcessor:
    def __init__(self, prompt: str = "", max_words: int = 50) -> None:
        self.prompt = prompt
        self.max_words = max_words

    def __call__(self, caption: str) -> str:
        text = re.sub(r"[.!\"()*#:;~]", " ", caption.lower())
        text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip()
        words = text.split(" ")
        if len(words) > self.max_words:
            text = " ".join(words[: self.max_words])
        return self.prompt + text


def build_processor(spec: Any):
    """Build from a config node ``{name: ..., **kwargs}`` (None → None)."""
    if spec is None:
        return None
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise ValueError("processor config needs a 'name'")
    return PROCESSORS.get(name)(**spec)
