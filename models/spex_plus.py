"""SpEx+ (Ge, Xu, Wang, Chng, Dang, Li, Interspeech 2020, "SpEx+: A Complete Time Domain Speaker
Extraction Network") at 48 kHz: a time-domain extractor whose speaker encoder shares the
multi-scale speech encoder with the mixture path.

mix -> MultiScaleEncoder (3 windows) -> cLN -> 1x1 -> [TCN stack (ref emb in block 0)] x 4
    -> 3 ReLU masks x the 3 encodings -> 3 ConvTranspose1d decoders -> short / middle / long
ref -> MultiScaleEncoder (same weights) -> SpeakerEncoder (ResNet) -> embedding -> (Linear: logits)

Written from the paper. WeSep's (Apache-2.0) ``ConvTasNet`` with ``encoder_type: Multi`` was read
for understanding; the places that follow it closely say so. Two defaults follow the Conv-TasNet
paper (Luo & Mesgarani, 2019) where SpEx+ is silent: single-parameter PReLUs, and encoders and
decoders without bias (a zero mixture gives a zero estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dsp.level import RMS_EPS, rms_scale
from models.layers.conditioning import EmbeddingFusion, speaker_encoder
from models.layers.conv_norms import ChannelLayerNorm, GlobalLayerNorm

SAMPLE_RATE = 48_000
POOL = 3  # max-pool width of each speaker ResNet block (SpEx+ speaker encoder)


@dataclass
class SpExPlusArgs:
    """SpEx+'s arguments (the ``model`` section of its arch); windows are in samples at 48 kHz,
    or in milliseconds for any rate.

    Names follow the paper: N = n_filters, O = spk_channels, P = spk_hidden, D = embed_dim,
    B = bottleneck, H = hidden.
    """

    n_filters: int = 256  # N, filters per encoder scale (SpEx+ experimental setup)
    # Windows 2.5 / 10 / 20 ms as in SpEx+ (20 / 80 / 160 samples at its 8 kHz); at 48 kHz:
    short_window: int = 120  # L1
    middle_window: int = 480  # L2
    long_window: int = 960  # L3
    stride: int = 60  # L1 / 2, common to the three scales (SpEx+ speech encoder)
    # Alternatives in milliseconds (config.resolve_milliseconds): non-zero, they set the window
    # or stride at the run's sample rate (2.5 / 10 / 20 / 1.25 ms: SpEx+ at any rate);
    # checkpoints store the samples.
    short_window_ms: float = 0.0
    middle_window_ms: float = 0.0
    long_window_ms: float = 0.0
    stride_ms: float = 0.0
    spk_channels: int = 256  # O, speaker encoder's 1x1 conv and first ResNet block (SpEx+)
    spk_hidden: int = 512  # P, width of the later ResNet blocks (SpEx+)
    embed_dim: int = 256  # D, speaker embedding (SpEx+)
    n_resnet: int = 3  # ResNet blocks in the speaker encoder, each max-pools by 3 (SpEx+)
    bottleneck: int = 256  # B, TCN residual channels (SpEx+, as Conv-TasNet)
    hidden: int = 512  # H, TCN block channels (SpEx+, as Conv-TasNet)
    n_stacks: int = 4  # TCN stacks; the embedding enters the first block of each (SpEx+)
    n_blocks: int = 8  # TCN blocks per stack, dilations 2^0..2^7 (SpEx+)
    conv_kernel: int = 3  # depthwise kernel of a TCN block (SpEx+, as Conv-TasNet)
    # Training speakers of the classification head (101 in SpEx+ on WSJ0-2mix-extr); 0 = none.
    n_speakers: int = 0
    # A frozen pretrained speaker encoder (models/layers/ge2e.py): "none" or "ge2e", whose embedding
    # is concatenated with SpEx+'s own (the TCN stacks then take D + 256 channels of it).
    speaker_embedding: str = "none"


# ---------------------------------------------------------------------------------------------
# Normalisation (float32 statistics whatever the autocast dtype)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Multi-scale speech encoder (shared by the mixture and the reference)
# ---------------------------------------------------------------------------------------------


class MultiScaleEncoder(nn.Module):
    """Three Conv1d 1 -> N filterbanks with windows L1 <= L2 <= L3 and one stride, ReLU.

    Frame t of every scale starts at sample ``t * stride``; the number of frames is the short
    window's, just enough to cover every input sample, and the longer windows' inputs get more
    zeros on the right so that they yield the same count (WeSep's ``MultiEncoder`` aligns the
    scales the same way: start-aligned, right-padded).

    Shape:
        wave (B, n), n_frames T -> three (B, N, T)
    """

    def __init__(self, *, n_filters: int, windows: tuple[int, int, int], stride: int) -> None:
        super().__init__()
        self.windows = windows
        self.stride = stride
        self.convs = nn.ModuleList(
            nn.Conv1d(1, n_filters, window, stride=stride, bias=False) for window in windows
        )

    def n_frames(self, n_samples: int) -> int:
        """Frames of the short window, zero-padded on the right, that cover ``n_samples``."""
        return -(-max(n_samples - self.windows[0], 0) // self.stride) + 1

    def forward(self, wave: Tensor, n_frames: int) -> list[Tensor]:
        x = wave[:, None]  # (B, 1, n)
        out = []
        for conv, window in zip(self.convs, self.windows, strict=True):
            needed = (n_frames - 1) * self.stride + window
            out.append(F.relu(conv(F.pad(x, (0, needed - x.shape[-1])))))  # (B, N, T)
        return out


class MultiScaleDecoder(nn.Module):
    """One ConvTranspose1d N -> 1 per scale, with that scale's window and the common stride;
    each output is trimmed to the input's length (frames start-aligned as in the encoder).

    Shape:
        three (B, N, T), n_samples -> three (B, n_samples)
    """

    def __init__(self, *, n_filters: int, windows: tuple[int, int, int], stride: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.ConvTranspose1d(n_filters, 1, window, stride=stride, bias=False)
            for window in windows
        )

    def forward(self, masked: list[Tensor], n_samples: int) -> list[Tensor]:
        return [
            conv(x)[:, 0, :n_samples]  # (B, (T - 1) * stride + window) -> (B, n)
            for conv, x in zip(self.convs, masked, strict=True)
        ]


# ---------------------------------------------------------------------------------------------
# Speaker encoder
# ---------------------------------------------------------------------------------------------


class ResNetBlock(nn.Module):
    """conv1x1-BN-PReLU-conv1x1-BN, + residual (a 1x1 conv where the width changes), PReLU,
    max-pool 3 (SpEx+ speaker encoder; the same layout as WeSep's ``ResBlock``).

    BatchNorm mixes the items of a training batch, as in the paper; in eval mode it applies its
    running statistics and the items are independent.

    Shape:
        (B, C_in, T) -> (B, C_out, T // 3)
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.norm1 = nn.BatchNorm1d(out_channels)
        self.act1 = nn.PReLU()
        self.conv2 = nn.Conv1d(out_channels, out_channels, 1, bias=False)
        self.norm2 = nn.BatchNorm1d(out_channels)
        self.shortcut = (
            nn.Conv1d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.act2 = nn.PReLU()
        self.pool = nn.MaxPool1d(POOL)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.pool(self.act2(y + self.shortcut(x)))


class SpeakerEncoder(nn.Module):
    """cLN, 1x1 conv 3N -> O, ResNet blocks (O -> ... -> P), 1x1 conv P -> D, then the mean
    over the valid frames (those of the reference before any padding).

    The first blocks keep O channels and the last two have P (O->O, O->P, P->P for three,
    the paper's layout).

    Shape:
        enc (B, 3N, T), n_valid (B,) -> (B, D) float32
    """

    def __init__(
        self, *, in_channels: int, channels: int, hidden: int, embed_dim: int, n_resnet: int
    ) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(in_channels)
        self.proj = nn.Conv1d(in_channels, channels, 1)
        blocks = []
        width = channels
        for i in range(n_resnet):
            out = channels if i < n_resnet - 2 else hidden
            blocks.append(ResNetBlock(width, out))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv1d(width, embed_dim, 1)

    def forward(self, enc: Tensor, n_valid: Tensor) -> Tensor:
        h = self.out(self.blocks(self.proj(self.norm(enc)))).float()  # (B, D, T')
        valid = torch.arange(h.shape[-1], device=h.device) < n_valid[:, None]  # (B, T')
        return (h * valid[:, None]).sum(-1) / n_valid[:, None]


# ---------------------------------------------------------------------------------------------
# Speaker extractor (TCN stacks)
# ---------------------------------------------------------------------------------------------


class TCNBlock(nn.Module):
    """Conv-TasNet block: 1x1 conv -> PReLU -> gLN -> dilated depthwise conv -> PReLU -> gLN ->
    1x1 conv back to the bottleneck. Returns the residual branch only (no skip path, as SpEx+).

    Shape:
        (B, C_in, T) -> (B, bottleneck, T)
    """

    def __init__(
        self, *, in_channels: int, bottleneck: int, hidden: int, kernel: int, dilation: int
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(in_channels, hidden, 1)
        self.act_in = nn.PReLU()
        self.norm_in = GlobalLayerNorm(hidden)
        self.depthwise = nn.Conv1d(
            hidden,
            hidden,
            kernel,
            dilation=dilation,
            padding=dilation * (kernel - 1) // 2,
            groups=hidden,
        )
        self.act_dw = nn.PReLU()
        self.norm_dw = GlobalLayerNorm(hidden)
        self.conv_out = nn.Conv1d(hidden, bottleneck, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm_in(self.act_in(self.conv_in(x)))
        y = self.norm_dw(self.act_dw(self.depthwise(y)))
        return self.conv_out(y)


class TCNStack(nn.Module):
    """``n_blocks`` TCN blocks with dilations 1, 2, ..., 2^(n_blocks - 1). The speaker embedding,
    repeated over time, is concatenated to the input of the first block only (SpEx+ extractor;
    WeSep's ``Conv1DBlock4Fuse`` + ``multi_fuse`` do the same); that block's residual is its
    bottleneck input.

    Shape:
        y (B, bottleneck, T), emb (B, D) -> (B, bottleneck, T)
    """

    def __init__(
        self, *, bottleneck: int, hidden: int, embed_dim: int, kernel: int, n_blocks: int
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TCNBlock(
                in_channels=bottleneck + (embed_dim if i == 0 else 0),
                bottleneck=bottleneck,
                hidden=hidden,
                kernel=kernel,
                dilation=2**i,
            )
            for i in range(n_blocks)
        )

    def forward(self, y: Tensor, emb: Tensor) -> Tensor:
        emb = emb.to(y.dtype)[:, :, None].expand(-1, -1, y.shape[-1])  # (B, D, T)
        y = y + self.blocks[0](torch.cat([y, emb], dim=1))
        for block in self.blocks[1:]:
            y = y + block(y)
        return y


# ---------------------------------------------------------------------------------------------
# SpEx+
# ---------------------------------------------------------------------------------------------


class SpExPlus(nn.Module):
    """SpEx+ target speaker extractor (time domain, multi-scale, shared speech encoder).

    Keyword arguments are ``sample_rate`` and the fields of ``SpExPlusArgs``. ``forward`` returns
    the short-window estimate; ``with_aux=True`` adds the middle and long estimates and the
    speaker logits that SpEx+'s multi-task loss needs.

    Shape:
        mix (B, N), ref (B, M) -> (B, N); M may differ from N.
    """

    def __init__(
        self,
        *,
        sample_rate: int = SAMPLE_RATE,
        n_filters: int = 256,
        short_window: int = 120,
        middle_window: int = 480,
        long_window: int = 960,
        stride: int = 60,
        spk_channels: int = 256,
        spk_hidden: int = 512,
        embed_dim: int = 256,
        n_resnet: int = 3,
        bottleneck: int = 256,
        hidden: int = 512,
        n_stacks: int = 4,
        n_blocks: int = 8,
        conv_kernel: int = 3,
        n_speakers: int = 0,
        speaker_embedding: str = "none",
    ) -> None:
        super().__init__()
        windows = (short_window, middle_window, long_window)
        if not 0 < stride <= short_window <= middle_window <= long_window:
            raise ValueError(
                f"need 0 < stride <= short_window <= middle_window <= long_window, got stride "
                f"{stride} and windows {windows}"
            )
        if conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd to keep the frame count, got {conv_kernel}")
        self.sample_rate = sample_rate
        # Per-stack activation checkpointing while training: a runtime memory setting that the
        # trainer sets, not a constructor argument. The stacks hold no BatchNorm, so recomputing
        # them updates no running statistics twice.
        self.grad_checkpoint = False
        self.n_resnet = n_resnet
        self.encoder = MultiScaleEncoder(n_filters=n_filters, windows=windows, stride=stride)
        self.speaker_encoder = SpeakerEncoder(
            in_channels=3 * n_filters,
            channels=spk_channels,
            hidden=spk_hidden,
            embed_dim=embed_dim,
            n_resnet=n_resnet,
        )
        self.speaker_head = nn.Linear(embed_dim, n_speakers) if n_speakers > 0 else None
        self.embed_dim = embed_dim
        self.pretrained_encoder = speaker_encoder(speaker_embedding, sample_rate)
        self.fusion = (EmbeddingFusion(own_dim=embed_dim, mode="concat")
                       if self.pretrained_encoder is not None else None)
        stack_embed = embed_dim if self.fusion is None else self.fusion.out_dim
        self.mix_norm = ChannelLayerNorm(3 * n_filters)
        self.mix_proj = nn.Conv1d(3 * n_filters, bottleneck, 1)
        self.stacks = nn.ModuleList(
            TCNStack(
                bottleneck=bottleneck,
                hidden=hidden,
                embed_dim=stack_embed,
                kernel=conv_kernel,
                n_blocks=n_blocks,
            )
            for _ in range(n_stacks)
        )
        self.masks = nn.ModuleList(nn.Conv1d(bottleneck, n_filters, 1) for _ in windows)
        self.decoder = MultiScaleDecoder(n_filters=n_filters, windows=windows, stride=stride)

    # -- reference ----------------------------------------------------------------------------

    def encode_reference(self, ref: Tensor, *, ref_lengths: Tensor | None = None) -> Tensor:
        """Embed the reference once; ``extract`` reuses it for any number of mixture windows.

        ``ref_lengths`` (B,), for a batch of references zero-padded on the right to a common
        length: the level and the time average then cover each reference's own samples and
        frames, so a padded reference embeds as it would alone (eval mode). A reference too
        short for the max-pools (under 26 hops + one short window, 35 ms at the recipe size)
        is zero-padded and averaged over one pooled frame.

        Shape:
            ref (B, M), ref_lengths (B,) -> z_ref (B, D) float32
        """
        n_samples = ref.shape[-1]
        if ref_lengths is None:
            ref_lengths = torch.full((ref.shape[0],), n_samples, device=ref.device)
            ref_scale = rms_scale(ref)  # (B, 1)
        else:
            ref_lengths = ref_lengths.to(ref.device)
            power = ref.float().pow(2).sum(-1, keepdim=True) / ref_lengths[:, None]
            ref_scale = power.sqrt() + RMS_EPS  # rms_scale over the valid samples
        stride, short = self.encoder.stride, self.encoder.windows[0]
        pooling = POOL**self.n_resnet
        n_frames = max(self.encoder.n_frames(n_samples), pooling)
        enc = torch.cat(self.encoder(ref.float() / ref_scale, n_frames), dim=1)  # (B, 3N, T)
        # The valid frames of each reference, as the encoder counts them (ceil, as n_frames),
        # after the pools: each keeps floor(T / 3) frames, and floor(floor(T / 3) / 3) is
        # floor(T / 9), so n_resnet pools keep floor(T / 3^n_resnet).
        valid_frames = ((ref_lengths - short).clamp(min=0) + stride - 1) // stride + 1  # (B,)
        n_valid = (valid_frames // pooling).clamp(min=1)
        z_ref = self.speaker_encoder(enc, n_valid)
        if self.pretrained_encoder is None:
            return z_ref
        return self.fusion(z_ref, self.pretrained_encoder(ref))

    # -- mixture ------------------------------------------------------------------------------

    def _run_stack(self, i: int, y: Tensor, z_ref: Tensor) -> Tensor:
        return self.stacks[i](y, z_ref)

    def _extract_all(self, mix: Tensor, z_ref: Tensor, scale: Tensor | None) -> list[Tensor]:
        """The short, middle and long estimates, each (B, N), all at the mixture's level."""
        n_samples = mix.shape[-1]
        # Scale-free input: the network sees unit-RMS signals, the estimates get the mix's scale.
        scale = rms_scale(mix) if scale is None else scale.float()  # (B, 1)
        encodings = self.encoder(mix.float() / scale, self.encoder.n_frames(n_samples))
        y = self.mix_proj(self.mix_norm(torch.cat(encodings, dim=1)))  # (B, bottleneck, T)
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i in range(len(self.stacks)):
            if use_ckpt:
                y = checkpoint(self._run_stack, i, y, z_ref, use_reentrant=False)
            else:
                y = self._run_stack(i, y, z_ref)
        masked = [
            enc * F.relu(mask(y)) for enc, mask in zip(encodings, self.masks, strict=True)
        ]  # three (B, N, T)
        return [est.float() * scale for est in self.decoder(masked, n_samples)]

    def extract(self, mix: Tensor, z_ref: Tensor, scale: Tensor | None = None) -> Tensor:
        """The target in ``mix`` given an embedded reference (``encode_reference``): the short
        window's estimate, the one SpEx+ uses at inference.

        ``scale`` is the level the mixture is divided by on the way in and multiplied by on the
        way out; by default the mixture's own RMS. A caller that runs a long recording window
        by window passes one scale for every window.

        Shape:
            mix (B, N), z_ref (B, D), scale (B, 1) -> (B, N)
        """
        return self._extract_all(mix, z_ref, scale)[0]

    def forward(
        self,
        mix: Tensor,
        ref: Tensor,
        *,
        with_aux: bool = False,
        ref_lengths: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """``extract(mix, encode_reference(ref))``; with ``with_aux`` also what SpEx+'s
        training loss needs: ``{"est_middle", "est_long"}`` (B, N) and ``"speaker_logits"``
        (B, n_speakers) when the model has a speaker head.

        Shape:
            mix (B, N), ref (B, M) -> (B, N) or ((B, N), dict)
        """
        z_ref = self.encode_reference(ref, ref_lengths=ref_lengths)
        est_short, est_middle, est_long = self._extract_all(mix, z_ref, None)
        if not with_aux:
            return est_short
        aux = {"est_middle": est_middle, "est_long": est_long}
        if self.speaker_head is not None:
            # The head classifies SpEx+'s own embedding, never the frozen one.
            aux["speaker_logits"] = self.speaker_head(z_ref[:, : self.embed_dim])
        return est_short, aux
