"""Image transforms (BLIP-2 train/eval) and the caption cleaner, registered by their upstream names.

``blip2_image_train``: RandomResizedCrop(scale 0.5–1.0, bicubic) → tensor → CLIP normalisation (no flip).
``blip2_image_eval``: resize to a square (aspect ratio not kept, bicubic) → tensor → CLIP normalisation.
``blip_caption``: lower-case, punctuation to spaces, collapse whitespace, keep ``max_words`` words.
Images are always opened with PIL and converted to RGB; a missing or unreadable file raises an error that
names it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

from ..common.registry import PROCESSORS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[str, os.PathLike, Any]  # a path or a PIL image


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded."""


def load_rgb(image: ImageLike):
    """PIL RGB image from a path or an image object."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


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
