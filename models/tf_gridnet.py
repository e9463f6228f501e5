"""TF-GridNet blocks (after ESPnet's TFGridNetV2) on the band-split grid, and the speaker
re-injection layer placed in front of chosen blocks.

The grid is kept channels-last, (B, T, K, D), so that the intra-frame LSTM reads a free view
and only the sub-band LSTM needs one transposed copy per block.
"""

from __future__ import annotations

import torch
from torch import nn

from models.usef import FrameAttention


class _BiLSTMPath(nn.Module):
    """Pre-norm BiLSTM over the middle axis of (N, L, D) sequences, projected back to D."""

    def __init__(self, *, feature_dim: int, lstm_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.lstm = nn.LSTM(feature_dim, lstm_hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * lstm_hidden, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.lstm(self.norm(x))[0])


class TFGridNetBlock(nn.Module):
    """Intra-frame BiLSTM across bands, sub-band BiLSTM across time, full-band multi-head
    self-attention across time; each a pre-norm residual branch.

    Shape:
        x (B, T, K, D) -> (B, T, K, D)
    """

    def __init__(
        self, *, feature_dim: int, lstm_hidden: int, n_heads: int, qk_per_band: int
    ) -> None:
        super().__init__()
        self.intra = _BiLSTMPath(feature_dim=feature_dim, lstm_hidden=lstm_hidden)
        self.inter = _BiLSTMPath(feature_dim=feature_dim, lstm_hidden=lstm_hidden)
        self.attn_norm = nn.LayerNorm(feature_dim)
        self.attn = FrameAttention(
            feature_dim=feature_dim, n_heads=n_heads, qk_per_band=qk_per_band
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, k, d = x.shape
        x = x + self.intra(x.reshape(b * t, k, d)).view(b, t, k, d)
        across_time = x.transpose(1, 2).reshape(b * k, t, d)  # (B*K, T, D)
        x = x + self.inter(across_time).view(b, k, t, d).transpose(1, 2)
        y = self.attn_norm(x)
        return x + self.attn(y, y)


class SpeakerReinjectLayer(nn.Module):
    """Cross-attention from the current mixture stream to the reference embedding, added as a
    residual, so that deep blocks are reminded which speaker to keep.

    Shape:
        x (B, T, K, D), z_ref (B, S, K, D) -> (B, T, K, D)
    """

    def __init__(self, *, feature_dim: int, n_heads: int, qk_per_band: int) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(feature_dim)
        self.norm_ref = nn.LayerNorm(feature_dim)
        self.attn = FrameAttention(
            feature_dim=feature_dim, n_heads=n_heads, qk_per_band=qk_per_band
        )

    def forward(self, x: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm_x(x), self.norm_ref(z_ref))
