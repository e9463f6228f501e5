"""TF-GridNet blocks (after ESPnet's TFGridNetV2) on the band-split grid.

The grid is kept channels-last, (B, T, K, D), so that the intra-frame sequence layer reads a free
view and only the sub-band one needs one transposed copy per block. The sequence layer of both
paths is a BiLSTM (``sequence_layer="lstm"``, the recipe) or a bidirectional Mamba (``"mamba"``).

A causal block (``causal=True``) changes only what runs along time: the sub-band path is a
unidirectional LSTM and the full-band attention sees the current frame and the
``attn_lookback - 1`` frames before it. ``step`` runs such a block on a few new frames with the
state of the frames before them (the LSTM's (h, c) per band, the attention's cached keys and
values), which gives what one pass over the whole sequence gives (doc/design.md, "Real time").
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
    probe = nn.Sequential(nn.Linear(dim, dim), _LSTMPath(feature_dim=dim, lstm_hidden=dim))
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
    """Run every TF-GridNet LSTM of ``model`` in float32 inside autocast (the rest of the
    network keeps the autocast dtype). Returns the number of LSTMs switched: none in a Mamba
    model, whose scans run in float32 anyway."""
    paths = [m for m in model.modules() if isinstance(m, _LSTMPath)]
    for path in paths:
        path.float32_lstm = enabled
    return len(paths)


class _LSTMPath(nn.Module):
    """Pre-norm LSTM (bidirectional unless causal) over the middle axis of (N, L, D) sequences,
    projected back to D."""

    def __init__(self, *, feature_dim: int, lstm_hidden: int, bidirectional: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.lstm = nn.LSTM(feature_dim, lstm_hidden, batch_first=True,
                            bidirectional=bidirectional)
        self.proj = nn.Linear((2 if bidirectional else 1) * lstm_hidden, feature_dim)
        self.float32_lstm = False  # see use_float32_lstms

    def step(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The path on ``x`` starting from the LSTM ``state`` (zeros for None); returns the
        output and the state after the last position.

        Shape: x (N, L, D), state (h, c) (directions, N, H) each -> (N, L, D), state
        """
        y = self.norm(x)
        if self.float32_lstm and torch.is_autocast_enabled(y.device.type):
            with torch.autocast(y.device.type, enabled=False):
                h, state = self.lstm(y.float(), state)
        else:
            h, state = self.lstm(y, state)
        return self.proj(h), state  # back under autocast, if any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)[0]


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
    bidirectional: bool = True,
) -> nn.Module:
    """One pre-norm sequence path, (N, L, D) -> (N, L, D)."""
    if sequence_layer == "lstm":
        return _LSTMPath(feature_dim=feature_dim, lstm_hidden=lstm_hidden,
                         bidirectional=bidirectional)
    if sequence_layer == "mamba" and not bidirectional:
        # A causal Mamba would need a recurrent one-step mode of its scan to stream; the
        # parallel scan here has none, so the Mamba variant is offline only.
        raise ValueError("model.causal needs sequence_layer lstm: the Mamba layers have no "
                         "streaming (one-step) mode")
    if sequence_layer == "mamba":
        return _BiMambaPath(feature_dim=feature_dim, d_state=mamba_d_state, expand=mamba_expand)
    raise ValueError(
        f"model.sequence_layer {sequence_layer!r} is not one of {', '.join(SEQUENCE_LAYERS)}"
    )


def lookback_mask(n_queries: int, n_keys: int, lookback: int, device: torch.device) -> torch.Tensor:
    """Which keys each query may attend to when the last ``n_queries`` of ``n_keys`` frames are
    the queries: itself and at most ``lookback - 1`` frames before it, never after.

    Shape: -> (n_queries, n_keys) bool
    """
    q = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    k = torch.arange(n_keys, device=device)[None]
    return (k <= q) & (k > q - lookback)


class TFGridNetBlock(nn.Module):
    """Intra-frame sequence layer across bands, sub-band sequence layer across time, full-band
    multi-head self-attention across time; each a pre-norm residual branch. The sequence layers
    are BiLSTMs or bidirectional Mambas (``sequence_layer``); nothing else changes with them.
    With ``causal``, the sub-band LSTM runs forward only and the attention looks back at most
    ``attn_lookback`` frames (the current one included).

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
        causal: bool = False,
        attn_lookback: int = 100,
    ) -> None:
        super().__init__()
        if causal and attn_lookback < 1:
            raise ValueError(f"attn_lookback {attn_lookback} must be >= 1 (the current frame)")
        path = {"sequence_layer": sequence_layer, "feature_dim": feature_dim,
                "lstm_hidden": lstm_hidden, "mamba_d_state": mamba_d_state,
                "mamba_expand": mamba_expand}
        self.causal = causal
        self.attn_lookback = attn_lookback
        self.intra = _sequence_path(**path)
        self.inter = _sequence_path(**path, bidirectional=not causal)
        self.attn_norm = nn.LayerNorm(feature_dim)
        self.attn = FrameAttention(
            feature_dim=feature_dim, n_heads=n_heads, qk_per_band=qk_per_band
        )

    def _across_bands(self, x: torch.Tensor) -> torch.Tensor:
        b, t, k, d = x.shape
        return x + self.intra(x.reshape(b * t, k, d)).view(b, t, k, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, k, d = x.shape
        x = self._across_bands(x)
        across_time = x.transpose(1, 2).reshape(b * k, t, d)  # (B*K, T, D)
        x = x + self.inter(across_time).view(b, k, t, d).transpose(1, 2)
        y = self.attn_norm(x)
        mask = lookback_mask(t, t, self.attn_lookback, x.device) if self.causal else None
        return x + self.attn(y, y, mask)

    def step(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A causal block on ``t`` new frames, given the ``state`` of the frames before them
        (None at the start): the LSTM's ``h``/``c`` per band and the attention's ``key``/
        ``value`` of the last ``attn_lookback - 1`` frames, so the state's size is fixed.

        Shape: x (B, t, K, D) -> (B, t, K, D); state h, c (1, B*K, H), key (B, h, <L, K*c),
        value (B, h, <L, K*D/h)
        """
        if not self.causal:
            raise RuntimeError("step needs a causal block (model.causal)")
        b, t, k, d = x.shape
        x = self._across_bands(x)
        hc = None if state is None else (state["h"], state["c"])
        y, (h, c) = self.inter.step(x.transpose(1, 2).reshape(b * k, t, d), hc)
        x = x + y.view(b, k, t, d).transpose(1, 2)
        y = self.attn_norm(x)
        key, value = self.attn.keys_values(y)
        if state is not None:
            key = torch.cat([state["key"], key], dim=2)
            value = torch.cat([state["value"], value], dim=2)
        mask = lookback_mask(t, key.shape[2], self.attn_lookback, x.device)
        out = x + self.attn.attend(y, key, value, mask)
        drop = max(0, key.shape[2] - (self.attn_lookback - 1))  # what the next frame cannot see
        return out, {"h": h, "c": c, "key": key[:, :, drop:], "value": value[:, :, drop:]}

    @property
    def cache_frames(self) -> int:
        """Frames of keys and values that ``step_fixed`` carries: ``attn_lookback - 1`` (at
        least one, so that no state is empty)."""
        return max(1, self.attn_lookback - 1)

    def step_fixed(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, n_past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """``step`` with a state of fixed shape, for an exported graph: the attention's cache
        always holds ``cache_frames`` frames, of which the last ``n_past`` are real (the frames
        before the stream's start are zeros that the mask hides). At the start ``h``, ``c``,
        ``key`` and ``value`` are zeros and ``n_past`` 0; the caller advances ``n_past`` by
        ``t``, up to ``cache_frames``. Gives ``step``'s output up to float rounding.

        Shape: x (B, t, K, D), h, c (1, B*K, H), key (B, h, C, K*c), value (B, h, C, K*D/h),
        n_past () int64 -> x (B, t, K, D), h, c, key, value
        """
        if not self.causal:
            raise RuntimeError("step_fixed needs a causal block (model.causal)")
        b, t, k, d = x.shape
        x = self._across_bands(x)
        y, (h, c) = self.inter.step(x.transpose(1, 2).reshape(b * k, t, d), (h, c))
        x = x + y.view(b, k, t, d).transpose(1, 2)
        y = self.attn_norm(x)
        new_key, new_value = self.attn.keys_values(y)
        cache = key.shape[2]
        key = torch.cat([key, new_key], dim=2)
        value = torch.cat([value, new_value], dim=2)
        mask = lookback_mask(t, cache + t, self.attn_lookback, x.device)
        real = torch.arange(cache + t, device=x.device) >= cache - n_past  # (C + t,)
        out = x + self.attn.attend(y, key, value, mask & real[None])
        return out, h, c, key[:, :, t:], value[:, :, t:]
