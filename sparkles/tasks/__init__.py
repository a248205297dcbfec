"""Tasks: what a run trains on and how one step computes its loss; importing registers them."""

from .image_text_pretrain import ImageTextPretrainTask  # noqa: F401  (registers "image_text_pretrain")
