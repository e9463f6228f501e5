"""TF-GridNet blocks (after ESPnet's TFGridNetV2) on the band-split grid, and the speaker
re-injection layer placed in front of chosen blocks.

The grid is kept channels-last, (B, T, K, D), so that the intra-frame sequence layer reads a free
view and only the sub-band one needs one transposed copy per block. The sequence layer of both
paths is a BiLSTM (``sequence_layer="lstm"``, the recipe) or a bidirectional Mamba (``"mamba"``).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.mamba import BiMamba
from models.layers.usef import FrameAttention

SEQUENCE_LAYERS = ("lstm", "mamba")
PROBE_SHAPE = (2, 5, 8)  # (N, L, D) of the start-up bf16 LSTM probe: small, but a real LSTM


def bf16_lstm_works(device: torch.device) -> bool:
    """Whether a bidirectional LSTM runs forward and backward under bf16 autocast on ``device``.

    cuDNN builds differ: some raise ``not implemented for 'BFloat16'`` for the LSTM while every
    other bf16 op works, and a run would only find out at its first step (or, on a node with
    another build, days later on resume). The trainer probes once at start-up instead.
    """
    n, length, dim = PROBE_SHAPE
    # A linear layer in front, as in the generator: what dtype reaches the LSTM under autocast
    # depends on the op before it (and oneDNN on some CPUs rejects an LSTM given float32 there).
    probe = nn.Sequential(nn.Linear(dim, dim), _BiLSTMPath(feature_dim=dim, lstm_hidden=dim))
    probe = probe.to(device)
    x = torch.randn(n, length, dim, device=device, requires_grad=True)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = probe(x)
        y.float().square().mean().backward()
    except RuntimeError:
        return False
    return x.grad is not None and bool(torch.isfinite(x.grad).all())


def use_float32_lstms(model: nn.Module, enabled: bool = True) -> int:
    """Run every TF-GridNet BiLSTM of ``model`` in float32 inside autocast (the rest of the
    network keeps the autocast dtype). Returns the number of LSTMs switched: none in a Mamba
    model, whose scans run in float32 anyway."""
    paths = [m for m in model.modules() if isinstance(m, _BiLSTMPath)]
    for path in paths:
        path.float32_lstm = enabled
    return len(paths)


class _BiLSTMPath(nn.Module):
    """Pre-norm BiLSTM over the middle axis of (N, L, D) sequences, projected back to D."""

    def __init__(self, *, feature_dim: int, lstm_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.lstm = nn.LSTM(feature_dim, lstm_hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * lstm_hidden, feature_dim)
        self.float32_lstm = False  # see use_float32_lstms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.float32_lstm and torch.is_autocast_enabled(y.device.type):
            with torch.autocast(y.device.type, enabled=False):
                h = self.lstm(y.float())[0]
        else:
            h = self.lstm(y)[0]
        return self.proj(h)  # back under autocast, if any


class _BiMambaPath(nn.Module):
    """Pre-norm bidirectional Mamba over the middle axis of (N, L, D) sequences; BiMamba's own
    projection brings its two directions back to D, as ``proj`` does for the BiLSTM."""

    def __init__(self, *, feature_dim: int, d_state: int, expand: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.mamba = BiMamba(d_model=feature_dim, d_state=d_state, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mamba(self.norm(x))


def _sequence_path(
    *,
    sequence_layer: str,
    feature_dim: int,
    lstm_hidden: int,
    mamba_d_state: int,
    mamba_expand: int,
) -> nn.Module:
    """One pre-norm bidirectional sequence path, (N, L, D) -> (N, L, D)."""
    if sequence_layer == "lstm":
        return _BiLSTMPath(feature_dim=feature_dim, lstm_hidden=lstm_hidden)
    if sequence_layer == "mamba":
        return _BiMambaPath(feature_dim=feature_dim, d_state=mamba_d_state, expand=mamba_expand)
    raise ValueError(
        f"model.sequence_layer {sequence_layer!r} is not one of {', '.join(SEQUENCE_LAYERS)}"
    )


class TFGridNetBlock(nn.Module):
    """Intra-frame sequence layer across bands, sub-band sequence layer across time, full-band
    multi-head self-attention across time; each a pre-norm residual branch. The sequence layers
    are BiLSTMs or bidirectional Mambas (``sequence_layer``); nothing else changes with them.

    Shape:
        x (B, T, K, D) -> (B, T, K, D)
    """

    def __init__(
        self,
        *,
        feature_dim: int,
        lstm_hidden: int,
        n_heads: int,
        qk_per_band: int,
        sequence_layer: str = "lstm",
        mamba_d_state: int = 16,
        mamba_expand: int = 2,
    ) -> None:
        super().__init__()
        path = {"sequence_layer": sequence_layer, "feature_dim": feature_dim,
                "lstm_hidden": lstm_hidden, "mamba_d_state": mamba_d_state,
                "mamba_expand": mamba_expand}
        self.intra = _sequence_path(**path)
        self.inter = _sequence_path(**path)
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
