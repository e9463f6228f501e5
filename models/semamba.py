"""SEMamba-TSE: SEMamba's generator (Chao et al., "An Investigation of Incorporating Mamba for
Speech Enhancement", SLT 2024, the paper's advanced recipe) at 48 kHz, told which speaker to
keep by this repository's USEF cross-attention, FiLM and speaker re-injection.

mix -> ÷RMS -> STFT -> (|X|^0.3, phase) -> DenseEncoder -> USEF (ref) -> FiLM (ref)
    -> [SpeakerReinject (ref) -> TF-Mamba block] x n_blocks
    -> MagDecoder (learnable-sigmoid mask x |X|^0.3) + PhaseDecoder (atan2) -> iSTFT -> *RMS
ref -> ÷RMS -> STFT -> (|R|^0.3, phase) -> DenseEncoder (shared weights) -> z_ref -----^

The dense encoder, TF-Mamba block, decoders and learnable sigmoid follow SEMamba's
models/generator.py, codec_module.py, mamba_block.py and lsigmoid.py closely (github
RoyChao19477/SEMamba, MIT License, Copyright (c) 2024 Rong Chao; portions Copyright (c) 2023
Ye-Xin Lu, MP-SENet, MIT), rewritten channels-last around this repository's ``BiMamba``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsp.level import rms_scale
from dsp.stft import STFT
from models.layers.conditioning import ReferenceConditioned, SpeakerReference
from models.layers.mamba import BiMamba

# Added to |X|^2 before the compression power, as SEMamba's ``mag_phase_stft(addeps=True)``:
# keeps |X|^0.3 and its gradient finite at an exactly zero bin.
COMPRESS_EPS = 1e-10
NORM_EPS = 1e-5  # SEMamba's norm_epsilon of the RMSNorms in front of its Mambas
FREQ_KERNEL, FREQ_STRIDE = 3, 2  # the encoder's (1, 3) stride-(1, 2) conv halves the bins
DENSE_KERNEL = (3, 3)  # (time, frequency); the time dilation doubles per layer


@dataclass
class SEMambaTSEArgs:
    """SEMamba-TSE's arguments besides the sample rate (``model`` section, ``arch: semamba``).
    Defaults are SEMamba's advanced recipe (hid_feature 64, 4 TF-Mamba blocks, d_state 16,
    d_conv 4, expand 4, compress 0.3, beta 2) with its STFT durations at 48 kHz."""

    # The model's own STFT (the stft section is the loss's and TensorBoard's). SEMamba's 16 kHz
    # n_fft 400 / hop 100 is a 25 ms window every 6.25 ms; the same durations at 48 kHz are
    # 1200 / 300: 601 bins of 40 Hz, 160 frames/s. The TF-Mamba grid has (n_fft / 4) x
    # (sr / hop) positions per second whatever the window, so the cost is set by the 75 %
    # overlap, not by the window: n_fft 1024 / hop 256 costs the same for 47 Hz bins and 5.3 ms
    # frames. Keeping the paper's durations keeps what its dense blocks' time dilations
    # (1, 2, 4, 8 frames) span in milliseconds, and 40 Hz bins still resolve the harmonics of
    # low voices, which carry the speaker identity.
    n_fft: int = 1200
    win_length: int = 1200
    hop_length: int = 300
    compress: float = 0.3  # magnitude compression power (SEMamba's compress_factor)
    hidden: int = 64  # channels of the dense blocks and the Mamba grid (SEMamba's hid_feature)
    dense_depth: int = 4  # layers per dense block, time dilations 1, 2, .., 2^(depth-1)
    n_blocks: int = 4  # TF-Mamba blocks (SEMamba's num_tfmamba)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 4
    beta: float = 2.0  # the learnable sigmoid's ceiling: masks in (0, beta)
    # Speaker conditioning (models/layers/conditioning.py): USEF cross-attention and FiLM
    # after the encoder, where the grid first exists at the Mambas' resolution, and a
    # re-injection in front of each TF-Mamba block listed here (all four, as hifi_tse does).
    # A frame of the (time, bin) grid is one attention token, of qk_per_band channels per bin.
    n_heads: int = 4
    qk_per_band: int = 4
    reinject_at: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    use_film: bool = True
    # A frozen pretrained speaker encoder, entering as in hifi_tse (models/layers/ge2e.py).
    speaker_embedding: str = "none"


class CompressedSTFT(nn.Module):
    """The model's STFT with SEMamba's magnitude compression: features |X|^c and phase, and
    the compressed complex spectrum X |X|^(c-1) that its losses compare.

    Shape:
        wave (B, N) -> mag, pha (B, F, T) float32; complex (B, F, T) complex64
    """

    def __init__(self, *, n_fft: int, win_length: int, hop_length: int, compress: float) -> None:
        super().__init__()
        self.stft = STFT(n_fft=n_fft, win_length=win_length, hop_length=hop_length)
        self.compress = compress

    @property
    def n_bins(self) -> int:
        return self.stft.n_bins

    def mag_phase(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed magnitude and phase (the phase is not differentiable at a zero bin: use
        it for inputs and targets)."""
        spec = self.stft(wave)  # float32 whatever the autocast
        power = spec.real.square() + spec.imag.square()
        return (power + COMPRESS_EPS).pow(self.compress / 2), spec.angle()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """The compressed complex spectrum |X|^c e^(j angle X), written without the angle so
        that its gradient is finite everywhere (the consistency loss differentiates it)."""
        spec = self.stft(wave)
        power = spec.real.square() + spec.imag.square()
        return spec * (power + COMPRESS_EPS).pow((self.compress - 1) / 2)

    def inverse(self, mag: torch.Tensor, pha: torch.Tensor, length: int) -> torch.Tensor:
        """Waveform of a compressed magnitude and a phase; exactly ``length`` samples."""
        mag = mag.float().pow(1 / self.compress)
        return self.stft.inverse(torch.polar(mag, pha.float()), length)


class LearnableSigmoid(nn.Module):
    """``beta * sigmoid(slope_f * x)`` with one learned slope per frequency bin (MP-SENet's
    LearnableSigmoid2D, as SEMamba uses it): a magnitude mask in (0, beta), so the decoder
    can raise a bin as well as lower it.

    Shape:
        x (..., F) -> (..., F)
    """

    def __init__(self, n_features: int, *, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.slope = nn.Parameter(torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.beta * torch.sigmoid(self.slope * x)


def _conv_norm_act(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.InstanceNorm2d(channels, affine=True), nn.PReLU(channels))


class DenseBlock(nn.Module):
    """SEMamba's (MP-SENet's) dilated dense block: layer i sees the concatenation of the block
    input and every earlier layer's output, with a (3, 3) conv dilated 2^i over time.

    Shape:
        x (B, C, T, F) -> (B, C, T, F)
    """

    def __init__(self, *, channels: int, depth: int) -> None:
        super().__init__()
        layers = []
        for i in range(depth):
            dil = 2**i
            pad = (dil * (DENSE_KERNEL[0] - 1) // 2, (DENSE_KERNEL[1] - 1) // 2)
            conv = nn.Conv2d(channels * (i + 1), channels, DENSE_KERNEL, dilation=(dil, 1),
                             padding=pad)
            layers.append(_conv_norm_act(conv, channels))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        for layer in self.layers:
            x = layer(skip)
            skip = torch.cat([x, skip], dim=1)
        return x


class DenseEncoder(nn.Module):
    """(compressed magnitude, phase) -> 1x1 conv -> dense block -> (1, 3) conv of stride 2
    over frequency: F bins -> (F - 3) // 2 + 1.

    Shape:
        x (B, 2, T, F) -> (B, C, T, F')
    """

    def __init__(self, *, channels: int, depth: int) -> None:
        super().__init__()
        self.conv_in = _conv_norm_act(nn.Conv2d(2, channels, 1), channels)
        self.dense = DenseBlock(channels=channels, depth=depth)
        self.conv_out = _conv_norm_act(
            nn.Conv2d(channels, channels, (1, FREQ_KERNEL), stride=(1, FREQ_STRIDE)), channels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.dense(self.conv_in(x)))


def _upsample(channels: int) -> nn.ConvTranspose2d:
    """The inverse of the encoder's frequency stride: F' -> 2 (F' - 1) + 3 = F for odd F."""
    return nn.ConvTranspose2d(channels, channels, (1, FREQ_KERNEL), stride=(1, FREQ_STRIDE))


class MagDecoder(nn.Module):
    """Dense block, back to F bins, one channel, learnable sigmoid: the magnitude mask.

    Shape:
        x (B, C, T, F') -> (B, T, F) in (0, beta)
    """

    def __init__(self, *, channels: int, depth: int, n_bins: int, beta: float) -> None:
        super().__init__()
        self.dense = DenseBlock(channels=channels, depth=depth)
        self.conv = nn.Sequential(
            _upsample(channels), _conv_norm_act(nn.Conv2d(channels, 1, 1), 1), nn.Conv2d(1, 1, 1)
        )
        self.sigmoid = LearnableSigmoid(n_bins, beta=beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(self.conv(self.dense(x))[:, 0].float())


class PhaseDecoder(nn.Module):
    """Dense block, back to F bins, then two parallel 1x1 convs as the real and imaginary
    parts of a phasor whose angle (atan2) is the phase: no wrapping to learn.

    Shape:
        x (B, C, T, F') -> (B, T, F) in [-pi, pi]
    """

    def __init__(self, *, channels: int, depth: int) -> None:
        super().__init__()
        self.dense = DenseBlock(channels=channels, depth=depth)
        self.conv = _conv_norm_act(_upsample(channels), channels)
        self.to_real = nn.Conv2d(channels, 1, 1)
        self.to_imag = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.dense(x))
        return torch.atan2(self.to_imag(x)[:, 0].float(), self.to_real(x)[:, 0].float())


class TFMambaBlock(nn.Module):
    """SEMamba's TF-Mamba block: a bidirectional Mamba along time for every bin, then one along
    frequency for every frame, each behind an RMSNorm and added as a residual. (SEMamba runs
    mamba-ssm ``Block``s, each direction with its own norm and an inner skip, then a 1x1
    ConvTranspose of the concatenation; ``BiMamba`` concatenates and projects the same way.)

    Shape:
        x (B, T, K, D) -> (B, T, K, D)
    """

    def __init__(self, *, dim: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        mamba = {"d_model": dim, "d_state": d_state, "d_conv": d_conv, "expand": expand}
        self.time_norm = nn.RMSNorm(dim, eps=NORM_EPS)
        self.time = BiMamba(**mamba)
        self.freq_norm = nn.RMSNorm(dim, eps=NORM_EPS)
        self.freq = BiMamba(**mamba)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, k, d = x.shape
        across_time = x.transpose(1, 2).reshape(b * k, t, d)  # (B*K, T, D)
        x = x + self.time(self.time_norm(across_time)).view(b, k, t, d).transpose(1, 2)
        across_freq = x.reshape(b * t, k, d)  # (B*T, K, D)
        return x + self.freq(self.freq_norm(across_freq)).view(b, t, k, d)


class SEMambaTSE(ReferenceConditioned):
    """SEMamba's generator with USEF / FiLM / re-injection speaker conditioning.

    Keyword arguments are ``sample_rate`` and the ``model`` section (``SEMambaTSEArgs``).

    Shape:
        mix (B, N), ref (B, M) -> (B, N); M may differ from N.
    """

    def __init__(
        self,
        *,
        sample_rate: int = 48_000,
        n_fft: int = 1200,
        win_length: int = 1200,
        hop_length: int = 300,
        compress: float = 0.3,
        hidden: int = 64,
        dense_depth: int = 4,
        n_blocks: int = 4,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 4,
        beta: float = 2.0,
        n_heads: int = 4,
        qk_per_band: int = 4,
        reinject_at: list[int] | None = None,
        use_film: bool = True,
        speaker_embedding: str = "none",
    ) -> None:
        super().__init__()
        reinject_at = list(range(n_blocks)) if reinject_at is None else list(reinject_at)
        if n_fft % 2:
            raise ValueError(f"n_fft {n_fft} must be even (an odd bin count maps back through "
                             "the encoder's frequency stride)")
        self.sample_rate = sample_rate
        self.grad_checkpoint = False  # set by the trainer (train.grad_checkpoint)
        self.spectrum = CompressedSTFT(n_fft=n_fft, win_length=win_length,
                                       hop_length=hop_length, compress=compress)
        dense = {"channels": hidden, "depth": dense_depth}
        attn = {"feature_dim": hidden, "n_heads": n_heads, "qk_per_band": qk_per_band}
        self.encoder = DenseEncoder(**dense)
        reinject = self._build_entry(feature_dim=hidden, attn=attn, use_film=use_film,
                                     speaker_embedding=speaker_embedding, sample_rate=sample_rate)
        self.blocks = nn.ModuleList(
            TFMambaBlock(dim=hidden, d_state=d_state, d_conv=d_conv, expand=expand)
            for _ in range(n_blocks)
        )
        self._build_reinjection(reinject_at, reinject)
        self.mag_decoder = MagDecoder(**dense, n_bins=self.spectrum.n_bins, beta=beta)
        self.phase_decoder = PhaseDecoder(**dense)

    def _checkpointed(self, fn: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """``fn(*args)``, recomputed in backward under ``grad_checkpoint`` while training."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _encode(self, mag: torch.Tensor, pha: torch.Tensor) -> torch.Tensor:
        """Shape: mag, pha (B, F, T) -> (B, T, F', D), channels-last for the grid layers."""
        x = torch.stack([mag, pha], dim=1).transpose(2, 3)  # (B, 2, T, F)
        return self._checkpointed(self.encoder, x).permute(0, 2, 3, 1)

    def encode_reference(self, ref: torch.Tensor) -> SpeakerReference:
        """Embed the reference once; ``extract`` reuses it for any number of mixture windows.

        Shape:
            ref (B, M) -> frames (B, S, F', D), embedding (B, 256) or None
        """
        frames = self._encode(*self.spectrum.mag_phase(ref.float() / rms_scale(ref)))
        return self.speaker_reference(frames, ref)

    def _extract(
        self, mix: torch.Tensor, z_ref: SpeakerReference, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_samples = mix.shape[-1]
        scale = rms_scale(mix) if scale is None else scale.float()  # (B, 1)
        unit = mix.float() / scale
        mix_mag, mix_pha = self.spectrum.mag_phase(unit)  # (B, F, T) each
        # The network sees the window at its own unit RMS, as SEMamba normalises every
        # utterance: its mask and phase then depend on the content alone, so the estimate (a
        # mask on |X|) is scale-equivariant to float precision, whatever scale a windowed
        # caller passes. ``scale`` only sets the units of the aux spectra the losses compare.
        feat_mag = mix_mag / rms_scale(unit)[..., None] ** self.spectrum.compress
        z = self.conditioned_blocks(self._encode(feat_mag, mix_pha), z_ref)  # (B, T, F', D)
        z = z.permute(0, 3, 1, 2)  # (B, D, T, F')
        mask = self._checkpointed(self.mag_decoder, z).transpose(1, 2)  # (B, F, T)
        pha = self._checkpointed(self.phase_decoder, z).transpose(1, 2)  # (B, F, T)
        mag = mask * mix_mag  # compressed magnitude of the unit-RMS estimate
        est = self.spectrum.inverse(mag, pha, n_samples) * scale
        return est, {"compressed_mag": mag, "phase": pha, "scale": scale}

    def extract(
        self, mix: torch.Tensor, z_ref: SpeakerReference, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The target in ``mix`` given an embedded reference (``encode_reference``).

        ``scale`` is the level the mixture is divided by on the way in and multiplied by on the
        way out; by default the mixture's own RMS. A caller that runs a long recording window
        by window passes one scale for every window.

        Shape:
            mix (B, N), z_ref (frames (B, S, F', D), embedding), scale (B, 1) -> (B, N)
        """
        return self._extract(mix, z_ref, scale)[0]

    def forward(
        self, mix: torch.Tensor, ref: torch.Tensor, *, with_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``extract(mix, encode_reference(ref))``. With ``with_aux``, ``(estimate, aux)``:
        ``compressed_mag`` and ``phase`` (B, F, T), the predicted spectrum of the estimate
        divided by ``scale`` (B, 1), for the losses in losses/mag_phase.py.

        Shape: mix (B, N), ref (B, M) -> (B, N)
        """
        est, aux = self._extract(mix, self.encode_reference(ref), None)
        return (est, aux) if with_aux else est
