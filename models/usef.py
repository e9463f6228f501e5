"""USEF conditioning: frame-level cross-attention from the mixture to the reference, and FiLM.

The attention treats a frame of the (time, band) grid as one token, as TF-GridNet's full-band
attention does: a head's query/key is the concatenation over the K bands of ``qk_per_band``
channels (TFGridNetV3 style, so the dot product neither vanishes nor explodes with K), and its
value carries ``D / n_heads`` channels per band.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrameAttention(nn.Module):
    """Multi-head attention between the frames of two (time, band) grids.

    Self-attention when ``context`` is ``x``; cross-attention otherwise. The context may have a
    different number of frames (a reference longer or shorter than the mixture).

    Shape:
        x (B, T, K, D), context (B, S, K, D) -> (B, T, K, D)
    """

    def __init__(self, *, feature_dim: int, n_heads: int, qk_per_band: int) -> None:
        super().__init__()
        if feature_dim % n_heads:
            raise ValueError(f"feature_dim {feature_dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qk_per_band = qk_per_band
        self.to_q = nn.Linear(feature_dim, n_heads * qk_per_band)
        self.to_k = nn.Linear(feature_dim, n_heads * qk_per_band)
        self.to_v = nn.Linear(feature_dim, feature_dim)
        self.to_out = nn.Linear(feature_dim, feature_dim)

    def _heads(self, x: torch.Tensor, per_band: int) -> torch.Tensor:
        # (B, T, K, h * c) -> (B, h, T, K * c): one token per frame and head
        b, t, k, _ = x.shape
        return x.view(b, t, k, self.n_heads, per_band).permute(0, 3, 1, 2, 4).flatten(3)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, t, k, d = x.shape
        q = self._heads(self.to_q(x), self.qk_per_band)
        key = self._heads(self.to_k(context), self.qk_per_band)
        v = self._heads(self.to_v(context), d // self.n_heads)
        out = F.scaled_dot_product_attention(q, key, v)  # (B, h, T, K * D/h)
        out = out.view(b, self.n_heads, t, k, d // self.n_heads).permute(0, 2, 3, 1, 4)
        return self.to_out(out.reshape(b, t, k, d))


class USEFCrossAttention(nn.Module):
    """USEF-TSE fusion: attend from mixture frames to reference frames, then fuse the attended
    speaker evidence with the mixture stream (concatenate, project back to D).

    Shape:
        z_mix (B, T, K, D), z_ref (B, S, K, D) -> (B, T, K, D)
    """

    def __init__(self, *, feature_dim: int, n_heads: int, qk_per_band: int) -> None:
        super().__init__()
        self.norm_mix = nn.LayerNorm(feature_dim)
        self.norm_ref = nn.LayerNorm(feature_dim)
        self.attn = FrameAttention(
            feature_dim=feature_dim, n_heads=n_heads, qk_per_band=qk_per_band
        )
        self.fuse = nn.Linear(2 * feature_dim, feature_dim)

    def forward(self, z_mix: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.norm_mix(z_mix), self.norm_ref(z_ref))
        return self.fuse(torch.cat([z_mix, attended], dim=-1))


class FiLMLayer(nn.Module):
    """Per-channel scale and shift from the time- and band-pooled reference embedding.

    Starts as the identity (zero-initialised projection), so FiLM can only add conditioning.

    Shape:
        z (B, T, K, D), z_ref (B, S, K, D) -> (B, T, K, D)
    """

    def __init__(self, *, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, 2 * feature_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, z: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(z_ref.mean(dim=(1, 2))).chunk(2, dim=-1)  # (B, D) each
        return z * (1 + scale[:, None, None]) + shift[:, None, None]
