"""A compact NCSN++ score network on complex STFTs: the backbone of a score-based generative
refiner (SGMSE+ / StoRM).

Follows sgmse's NCSN++ (github sp-uhh/sgmse, ``sgmse/backbones/ncsnpp.py``, ``ncsnpp_48k.py``
and ``ncsnpp_utils/``, MIT License), itself adapted from Song et al.'s score_sde (github
yang-song/score_sde, Copyright 2020 The Google Research Authors, Apache License 2.0), the network
of Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations",
ICLR 2021. Rewritten here with only what sgmse's 48 kHz model (``ncsnpp_48k``) uses:

- a Gaussian Fourier embedding of log(t) and a two-layer MLP (SiLU) to a 4 nf time embedding;
- BigGAN residual blocks (GroupNorm, SiLU, conv, + time embedding, GroupNorm, SiLU, dropout,
  conv zero-initialised, 1x1 skip when the shape changes, sum rescaled by 1/sqrt(2)); the
  down- and upsampling steps are such blocks with FIR resampling on both paths;
- FIR resampling with the (1, 3, 3, 1) binomial kernel as plain depthwise ``conv2d`` /
  ``conv_transpose2d`` (score_sde's ``upfirdn2d`` has a compiled CUDA op; these are the same
  filter, checked against upfirdn2d's definition in tests/test_ncsnpp.py);
- ``progressive="none"``, ``progressive_input="none"``: a plain U-Net whose skips are
  concatenated (``progressive_combine`` is then unused). These are ``ncsnpp_48k``'s defaults;
  sgmse's 16 kHz ``ncsnpp`` adds an input pyramid (``input_skip``) and an output pyramid
  (``output_skip``), not implemented here;
- no attention (``ncsnpp_48k`` already has none at any resolution, but keeps one self-attention
  block at the bottleneck: dropped here).

Also changed from sgmse: the inputs are real channels (the caller stacks real and imaginary
parts), any (F, T) is accepted (padded inside, see ``NCSNpp``), the last 3x3 conv maps straight to
``out_channels`` (sgmse's maps to its 4 input channels and adds a 1x1 conv to 2, two linear maps
in a row), and the output is the raw network output: ``ncsnpp_48k`` divides it by t
(``scale_by_sigma``), a scaling that belongs to the refiner's parametrisation (as in sgmse's
``ncsnpp_v2``, whose scaling is in the ScoreModel).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

FIR_TAPS = (1.0, 3.0, 3.0, 1.0)  # score_sde's fir_kernel: a binomial low-pass
RESAMPLE_FACTOR = 2  # every level halves (doubles) both axes
TEMB_MULT = 4  # the time embedding has 4 nf channels (score_sde)
GN_CHANNELS_PER_GROUP, GN_MAX_GROUPS, GN_EPS = 4, 32, 1e-6  # score_sde's min(C // 4, 32) groups
# score_sde's default_init maps init_scale 0 to 1e-10: "zero-initialised" layers start tiny
# but not exactly zero.
ZERO_INIT_SCALE = 1e-10
SKIP_RESCALE = 1 / math.sqrt(2)  # keeps the variance of a residual sum at that of its terms

# A compact size for one 24 GB GPU at 48 kHz: sgmse's 48 kHz layout at half its width (see NCSNpp
# for its size and memory).
RECIPE = {"nf": 64, "ch_mult": (1, 1, 2, 2, 2, 2, 2), "num_res_blocks": 2}
# For CPU tests: two levels, one block each, GroupNorm still with several groups.
TINY = {"nf": 8, "ch_mult": (1, 2), "num_res_blocks": 1}


def default_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """score_sde's ``default_init``: ``variance_scaling(scale, "fan_avg", "uniform")``, i.e.
    U(-b, b) with b = sqrt(3 scale / ((fan_in + fan_out) / 2)), which is Xavier-uniform with gain
    sqrt(scale). Scale 0 means ``ZERO_INIT_SCALE``, as there."""
    scale = scale or ZERO_INIT_SCALE
    return nn.init.xavier_uniform_(weight, gain=math.sqrt(scale))


def _conv(in_ch: int, out_ch: int, kernel_size: int = 3, *, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    default_init_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = min(channels // GN_CHANNELS_PER_GROUP, GN_MAX_GROUPS)
    return nn.GroupNorm(groups, channels, eps=GN_EPS)


def fir_kernel(taps: tuple[float, ...] = FIR_TAPS) -> Tensor:
    """The separable 2-D FIR kernel outer(k, k) normalised to sum 1 (score_sde's
    ``_setup_kernel``). Even length: the resampling below pads it symmetrically.

    Shape: -> (K, K)
    """
    if len(taps) % 2:
        raise ValueError(f"FIR taps {taps}: need an even number")
    k = torch.tensor(taps, dtype=torch.float32)
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def fir_downsample(x: Tensor, kernel: Tensor) -> Tensor:
    """Filter with ``kernel`` and keep every other sample on both axes, gain 1 (a constant image
    stays that constant away from the borders); outside the image is zero. score_sde's
    ``downsample_2d(x, k, factor=2)``, i.e. ``upfirdn2d(x, k, down=2, pad=(K/2 - 1,) * 2)``.

    Shape: x (B, C, H, W), kernel (K, K) -> (B, C, H // 2, W // 2)
    """
    channels, size = x.shape[1], kernel.shape[-1]
    pad = size // 2 - 1
    weight = kernel.expand(channels, 1, size, size)  # one filter per channel
    return F.conv2d(F.pad(x, (pad,) * 4), weight, stride=RESAMPLE_FACTOR, groups=channels)


def fir_upsample(x: Tensor, kernel: Tensor) -> Tensor:
    """Insert zeros between samples and filter with ``kernel`` x 4 on both axes, gain 1.
    score_sde's ``upsample_2d(x, k, factor=2)``, i.e. ``upfirdn2d(x, 4 k, up=2, pad=(K/2, K/2 -
    1))``, written as a strided transposed convolution (the same sum, without the zeros).

    Shape: x (B, C, H, W), kernel (K, K) -> (B, C, 2 H, 2 W)
    """
    channels, size = x.shape[1], kernel.shape[-1]
    # Each output sample sees every other tap on each axis: x4 makes the gain 1.
    weight = (kernel * RESAMPLE_FACTOR**2).expand(channels, 1, size, size)
    return F.conv_transpose2d(x, weight, stride=RESAMPLE_FACTOR, padding=size // 2 - 1,
                              groups=channels)


class ResBlockBigGAN(nn.Module):
    """score_sde's ``ResnetBlockBigGANpp`` with ``fir=True, skip_rescale=True``: a residual block
    with the time embedding added after its first conv, optionally resampling both paths.

    Shape:
        x (B, in_ch, H, W), temb (B, temb_dim) already through SiLU -> (B, out_ch, H', W'),
        H' = H / 2 for ``resample="down"``, 2 H for ``"up"``, else H (W alike)
    """

    def __init__(
        self,
        *,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        dropout: float,
        resample: Literal["up", "down"] | None = None,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.norm_0 = _group_norm(in_ch)
        self.conv_0 = _conv(in_ch, out_ch)
        self.dense = _linear(temb_dim, out_ch)
        self.norm_1 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        # Zero-initialised: each block starts as (nearly) its skip path, times 1/sqrt(2).
        self.conv_1 = _conv(out_ch, out_ch, init_scale=0.0)
        changes_shape = in_ch != out_ch or resample is not None
        self.skip = _conv(in_ch, out_ch, kernel_size=1) if changes_shape else None
        if resample is not None:
            # Derived from FIR_TAPS, so not saved with the weights.
            self.register_buffer("fir", fir_kernel(), persistent=False)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return fir_downsample(x, self.fir)
        if self.resample == "up":
            return fir_upsample(x, self.fir)
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.silu(self.norm_0(x))
        h = self.conv_0(self._resample(h))
        h = h + self.dense(temb)[:, :, None, None]  # a per-channel bias that depends on t
        h = self.conv_1(self.dropout(F.silu(self.norm_1(h))))
        x = self._resample(x)
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * SKIP_RESCALE


class NCSNpp(nn.Module):
    """NCSN++ (sgmse's ``ncsnpp_48k`` without attention, see the module docstring): a U-Net of
    BigGAN residual blocks over (frequency, time), conditioned on the diffusion time.

    ``len(ch_mult)`` levels with ``nf * ch_mult[i]`` channels; each has ``num_res_blocks``
    blocks then a downsampling block on the way down, ``num_res_blocks + 1`` blocks (each taking
    one skip) then an upsampling block on the way up, and two blocks sit at the bottleneck.

    Any F and T: the input is zero-padded at the end of both axes (the highest bins and the
    last frames) to a multiple of 2^(len(ch_mult) - 1) and the output cropped back. Zeros, not
    reflection: zeros are what every 3x3 conv and FIR filter already assume beyond the border,
    and what sgmse's data module pads with (silence has a zero STFT), and reflection would fail
    for a pad longer than the input. The valid region is not exactly independent of the pad, as
    the GroupNorm statistics include the padded zeros; 768 bins need no frequency pad at 6 or 7
    levels, and a few frames of pad among hundreds move them little.

    Time embedding: sgmse's NCSN++ embeds log(t) (``torch.log(time_cond)`` in its forward, as
    score_sde embeds log(sigma)) with Gaussian Fourier features of scale ``fourier_scale``; so
    does this one, computed in float32 (sin of |log t| x 16 x 2 pi x N(0, 1), up to ~1e3 rad,
    would be meaningless in bf16).

    Sizes (parameters counted; the Fourier projection is a buffer of nf numbers, not counted):

    - the defaults, sgmse's 48 kHz EARS size (nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2), 2 blocks):
      64,476,034 parameters (sgmse's, with its bottleneck attention: ~64.7 M);
    - ``RECIPE``, the same layout at half the width (nf 64): 16,144,834 parameters, with the
      same depth (the bottleneck sees 768 bins as 12). Activations saved for backward at batch
      2 x 768 bins x 512 frames under bf16 autocast, an estimate (saved tensors counted on a
      128 x 64 input with CUDA's autocast dtypes, GroupNorm in float32, scaled by bins x
      frames): ~15 GiB without ``grad_checkpoint``, ~3.4 GiB with it (the blocks' inputs, plus
      one block's activations recomputed in backward); not counted, weights, gradients and
      AdamW moments (16 B a parameter, 0.26 GB), activation gradients in flight and allocator
      slack. The default size: ~36 GiB and ~6.8 GiB. So on 24 GB, batch 2 should fit without
      checkpointing, a larger batch needs it;
    - ``TINY`` (nf 8, ch_mult (1, 2), 1 block), for CPU tests: 45,314 parameters.

    ``grad_checkpoint`` (a runtime setting, like the generator's): while training, each residual
    block runs under ``torch.utils.checkpoint`` and its activations are recomputed in backward.

    Shape:
        x (B, in_channels, F, T) real, t (B,) in (0, 1] -> (B, out_channels, F, T)
    """

    def __init__(
        self,
        *,
        in_channels: int = 6,
        out_channels: int = 2,
        nf: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 2, 2, 2),
        num_res_blocks: int = 2,
        fourier_scale: float = 16.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.grad_checkpoint = False
        self.pad_multiple = RESAMPLE_FACTOR ** (len(ch_mult) - 1)
        temb_dim = TEMB_MULT * nf
        # Fixed random frequencies (score_sde's GaussianFourierProjection, a frozen parameter
        # there): a persistent buffer, so a checkpoint carries them.
        self.register_buffer("fourier_freqs", torch.randn(nf) * fourier_scale)
        self.temb_mlp = nn.Sequential(_linear(2 * nf, temb_dim), nn.SiLU(),
                                      _linear(temb_dim, temb_dim))
        block = partial(ResBlockBigGAN, temb_dim=temb_dim, dropout=dropout)

        self.conv_in = _conv(in_channels, nf)
        self.down = nn.ModuleList()
        skip_channels = [nf]  # the channels of every tensor the down path leaves for the up path
        ch = nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(in_ch=ch, out_ch=nf * mult))
                ch = nf * mult
                skip_channels.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(block(in_ch=ch, out_ch=ch, resample="down"))
                skip_channels.append(ch)
        self.mid = nn.ModuleList([block(in_ch=ch, out_ch=ch), block(in_ch=ch, out_ch=ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(in_ch=ch + skip_channels.pop(), out_ch=nf * mult))
                ch = nf * mult
            if level > 0:
                self.up.append(block(in_ch=ch, out_ch=ch, resample="up"))
        self.norm_out = _group_norm(ch)
        self.conv_out = _conv(ch, out_channels, init_scale=0.0)

    def time_embedding(self, t: Tensor) -> Tensor:
        """Fourier features of log(t) through the MLP and a SiLU (the activation every block
        applies to the embedding first, done once here).

        Shape: t (B,) -> (B, TEMB_MULT * nf)
        """
        phase = torch.log(t.float())[:, None] * self.fourier_freqs.float() * (2 * math.pi)
        features = torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)  # (B, 2 nf)
        return F.silu(self.temb_mlp(features))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (B, in_channels, F, T) real; t (B,) diffusion time in (0, 1] -> (B, out_channels,
        F, T)."""
        n_freq, n_frames = x.shape[-2:]
        x = F.pad(x, (0, -n_frames % self.pad_multiple, 0, -n_freq % self.pad_multiple))
        temb = self.time_embedding(t)
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()

        def run(block: ResBlockBigGAN, h: Tensor) -> Tensor:
            if use_ckpt:
                return checkpoint(block, h, temb, use_reentrant=False)
            return block(h, temb)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = run(block, h)
            skips.append(h)
        for block in self.mid:
            h = run(block, h)
        for block in self.up:
            if block.resample != "up":
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, F', T')
            h = run(block, h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., :n_freq, :n_frames]
