"""The frozen image encoder: EVA / BLIP-2 ViT with pre-LN blocks and fused qkv (q and v biases only).

Module names follow transformers' Blip2VisionModel, so its checkpoints load key for key.
`post_layernorm` is BLIP-2's `ln_vision`: trainable, applied to every output token.
References: EVA-CLIP (Fang et al. 2023), LAVIS `eva_vit.py`, transformers `modeling_blip_2.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .config import VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.stored_grid  # positions are stored for this grid; other grids interpolate
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid**2 + 1, cfg.hidden_size))

    def positions_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings (1, 1 + grid_h*grid_w, D); bicubic interpolation when the grid differs."""
        pos = self.position_embedding
        if grid_h == self.grid and grid_w == self.grid:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1 + N, D)
        b, _, h, w = pixel_values.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(b, 1, -1).to(dtype)
        x = torch.cat([cls, patches], dim=1)
        return x + self.positions_for(h // self.patch_size, w // self.patch_size).to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        # Fused qkv; EVA has q and v biases and no k bias, stored as one bias with a zero middle.
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.projection = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, L, hd)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, L, hd)
        return self.projection(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block; with `layer_scale`, each branch is scaled per channel (DINOv2)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        if cfg.layer_scale:
            self.layer_scale1 = nn.Parameter(torch.ones(cfg.hidden_size))
            self.layer_scale2 = nn.Parameter(torch.ones(cfg.hidden_size))
        else:
            self.layer_scale1 = self.layer_scale2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.layer_norm1(x))
        x = x + (attn if self.layer_scale1 is None else attn * self.layer_scale1)
        mlp = self.mlp(self.layer_norm2(x))
        return x + (mlp if self.layer_scale2 is None else mlp * self.layer_scale2)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """pixel_values (B, 3, H, W) -> image tokens (B, 1 + N, D), CLS first, after ln_vision."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        eps = cfg.layer_norm_eps if cfg.ln_vision_eps is None else cfg.ln_vision_eps
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)  # ln_vision

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen part: tokens before ln_vision, in the encoder's dtype."""
        return self.encoder(self.embeddings(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encode(pixel_values)
        return self.post_layernorm(x.to(self.post_layernorm.weight.dtype))
