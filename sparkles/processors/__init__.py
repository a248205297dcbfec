"""Image and text processors; importing this package registers them by their upstream names."""

from .image import Blip2ImageEvalProcessor, Blip2ImageTrainProcessor, BlipCaptionProcessor, build_processor  # noqa: F401
