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

STD_EPS = 1e-5


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

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's keys and values in head layout, which a streaming caller caches.

        Shape: context (B, S, K, D) -> key (B, h, S, K * c), value (B, h, S, K * D/h)
        """
        d = context.shape[-1]
        return (self._heads(self.to_k(context), self.qk_per_band),
                self._heads(self.to_v(context), d // self.n_heads))

    def attend(
        self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``x``'s frames to given keys and values; ``mask`` (T, S) bool, True
        where a query frame may see a key frame.

        Shape: x (B, T, K, D), key/value as ``keys_values`` -> (B, T, K, D)
        """
        b, t, k, d = x.shape
        q = self._heads(self.to_q(x), self.qk_per_band)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask)  # (B, h, T, K*D/h)
        out = out.view(b, self.n_heads, t, k, d // self.n_heads).permute(0, 2, 3, 1, 4)
        return self.to_out(out.reshape(b, t, k, d))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.attend(x, *self.keys_values(context), mask)


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

    def reference_keys_values(self, z_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's keys and values, which a stream computes once."""
        return self.attn.keys_values(self.norm_ref(z_ref))

    def fused(self, z_mix: torch.Tensor, ref_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attended = self.attn.attend(self.norm_mix(z_mix), *ref_kv)
        return self.fuse(torch.cat([z_mix, attended], dim=-1))

    def forward(self, z_mix: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
        return self.fused(z_mix, self.reference_keys_values(z_ref))


class FiLMLayer(nn.Module):
    """Per-channel scale and shift from statistics pooling of the reference embedding.

    The embedding is linear in the reference's real/imaginary STFT, so its time average is
    close to zero whatever the speaker: phases differ from frame to frame and cancel. Its
    standard deviation over time is a quadratic form of the band's spectrum (pitch harmonics,
    formants), which is where a voice lives. So, as in x-vector statistics pooling, each band's
    mean and std over time go through a shared nonlinear layer, are averaged over bands, and
    give the scale and shift. Starts as the identity (zero-initialised output projection), so
    FiLM can only add conditioning. With ``embedding_dim`` > 0, a pretrained speaker embedding
    (models/layers/ge2e.py) is projected and added to the pooled speaker vector.

    Shape:
        z (B, T, K, D), z_ref (B, S, K, D), embedding (B, E) -> (B, T, K, D)
    """

    def __init__(self, *, feature_dim: int, embedding_dim: int = 0) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(2 * feature_dim, feature_dim), nn.PReLU())
        self.from_embedding = nn.Linear(embedding_dim, feature_dim) if embedding_dim else None
        self.proj = nn.Linear(feature_dim, 2 * feature_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def speaker_vector(self, z_ref: torch.Tensor) -> torch.Tensor:
        """The learnt speaker vector of the reference. Shape: (B, S, K, D) -> (B, D)"""
        mean = z_ref.mean(dim=1)  # (B, K, D)
        # sqrt(var + eps): finite gradient for a constant (e.g. digitally silent) reference.
        std = (z_ref - mean[:, None]).pow(2).mean(dim=1).add(STD_EPS).sqrt()
        return self.embed(torch.cat([mean, std], dim=-1)).mean(dim=1)

    def scale_shift(
        self, z_ref: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's per-channel scale and shift, which a stream computes once.

        Shape: z_ref (B, S, K, D) -> (B, D) each
        """
        speaker = self.speaker_vector(z_ref)  # (B, D)
        if self.from_embedding is not None:
            speaker = speaker + self.from_embedding(embedding.to(speaker.dtype))
        scale, shift = self.proj(speaker).chunk(2, dim=-1)
        return scale, shift

    @staticmethod
    def modulate(z: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, shift = scale_shift
        return z * (1 + scale[:, None, None]) + shift[:, None, None]

    def forward(
        self, z: torch.Tensor, z_ref: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.modulate(z, self.scale_shift(z_ref, embedding))
