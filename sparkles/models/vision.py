"""The vision tower: EVA-ViT-g (BLIP-2 variant) built from ``timm``'s Eva, plus ``ln_vision``.

EVA-ViT-g as used by BLIP-2/MiniGPT-4/Sparkles: patch 14, width 1408, 39 of the 40 pretrained blocks, 16
heads, MLP 6144, fused qkv without bias plus learnable q/v biases (k bias fixed at zero), LayerNorm eps 1e-6,
learned absolute position embedding with a CLS token, no final norm and no head. The output is every token
(CLS + patches) of the last block.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def build_eva_vit(*, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int,
                  drop_path_rate: float = 0.0, grad_checkpointing: bool = False) -> nn.Module:
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    # timm derives the hidden size as int(width * mlp_ratio); nudge the ratio so float error cannot
    # round 6144 down to 6143.
    mlp_ratio = (mlp_dim + 0.5) / width
    vit = Eva(
        img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=mlp_ratio, qkv_bias=True, qkv_fused=True, num_classes=0, global_pool="",
        drop_path_rate=drop_path_rate, norm_layer=functools.partial(LayerNorm, eps=1e-6),
        use_abs_pos_emb=True, use_rot_pos_emb=False, use_post_transformer_norm=False, use_fc_norm=False,
    )
    assert vit.blocks[0].mlp.fc1.out_features == mlp_dim
    vit.norm = nn.Identity()  # EVA-ViT-g in BLIP-2 has no final norm
    if grad_checkpointing:
        vit.set_grad_checkpointing(True)
    return vit


class VisionTower(nn.Module):
    """Eva trunk → all tokens. Kept as a thin module so checkpoint keys stay the EVA names."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(pixels)


def ln_vision(width: int) -> nn.LayerNorm:
    """The LayerNorm between ViT and Q-Former; BLIP-2 uses torch's default eps (1e-5), unlike the ViT."""
    return nn.LayerNorm(width, eps=1e-5)
