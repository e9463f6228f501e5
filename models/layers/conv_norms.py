"""The layer norms of the time-domain families (Conv-TasNet's gLN and cLN), shared by
models/td_speakerbeam.py and models/spex_plus.py.

Their statistics are computed in float32 whatever the autocast dtype, rather than by raising
the epsilon: under fp16 the variance of small activations (< 6e-8) underflows and the
division turned into inf/NaN (the project's fp16 lesson). The result is cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORM_EPS = 1e-8  # gLN/cLN variance floor, as in Conv-TasNet; the statistics are float32


class _ConvLayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + NORM_EPS) * weight + bias`` over ``DIMS`` of (B, C, T),
    computed in float32 and returned in ``x``'s dtype; a per-channel gain and bias."""

    DIMS: tuple[int, ...] = ()

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        mean = y.mean(dim=self.DIMS, keepdim=True)
        var = (y - mean).square().mean(dim=self.DIMS, keepdim=True)
        y = (y - mean) * torch.rsqrt(var + NORM_EPS)
        return (y * self.weight.float()[:, None] + self.bias.float()[:, None]).to(x.dtype)


class GlobalLayerNorm(_ConvLayerNorm):
    """gLN (Conv-TasNet): one mean and variance per item over channels and time.

    Shape:
        (B, C, T) -> (B, C, T)
    """

    DIMS = (1, 2)


class ChannelLayerNorm(_ConvLayerNorm):
    """cLN: a mean and variance per item and frame over channels.

    Shape:
        (B, C, T) -> (B, C, T)
    """

    DIMS = (1,)
