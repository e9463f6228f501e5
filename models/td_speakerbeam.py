"""TD-SpeakerBeam (Delcroix et al., ICASSP 2020, arXiv:2001.08378) at 48 kHz: a Conv-TasNet
extractor told which speaker to keep by multiplicative adaptation with a reference embedding.

mix -> Encoder -> gLN -> 1x1 -> block 0 -> (x z_ref) -> blocks 1 .. X*R-1 -> sum of skips
    -> PReLU -> 1x1 -> ReLU mask -> (x encoded mix) -> Decoder
ref -> Encoder' -> gLN -> 1x1 -> aux blocks -> PReLU -> time mean -> Linear -> z_ref

Conv-TasNet is Luo & Mesgarani, "Conv-TasNet: Surpassing ideal time-frequency magnitude masking
for speech separation", IEEE/ACM TASLP 2019; its best non-causal configuration (N=512, L=2 ms,
B=Sc=128, H=512, P=3, X=8, R=3) is the extractor here, with L and the stride counted at 48 kHz.
Written from the papers; the layer layout of a block agrees with Asteroid's ``Conv1DBlock`` (MIT)
and ESPnet's TD-SpeakerBeam extractor (Apache-2.0), which were read for reference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsp.level import rms_scale
from models.layers.conditioning import EmbeddingFusion, speaker_encoder
from models.layers.conv_norms import GlobalLayerNorm


@dataclass
class TDSpeakerBeamArgs:
    """TD-SpeakerBeam's arguments besides the sample rate (``model`` section, ``arch:
    td_speakerbeam``). Sizes are Conv-TasNet's best non-causal configuration (Luo & Mesgarani
    2019), which TD-SpeakerBeam's extraction network follows (Delcroix et al. 2020); lengths in
    samples are 48 kHz ones, or given in milliseconds for any rate."""

    n_filters: int = 512  # N: encoder/decoder basis functions (Conv-TasNet N=512)
    kernel: int = 96  # L: 2 ms at 48 kHz (Conv-TasNet L=16 samples at 8 kHz)
    stride: int = 48  # L/2, 1 ms: the encoder frames overlap by half (Conv-TasNet)
    # Alternatives in milliseconds (config.resolve_milliseconds): non-zero, they set kernel /
    # stride at the run's sample rate; checkpoints store the samples. 2 / 1 give the above at
    # any rate (16 / 8 samples at Conv-TasNet's 8 kHz).
    kernel_ms: float = 0.0
    stride_ms: float = 0.0
    bottleneck: int = 128  # B = Sc: residual and skip channels of the TCN (Conv-TasNet B=Sc=128)
    hidden: int = 512  # H: channels inside a conv block (Conv-TasNet H=512)
    conv_kernel: int = 3  # P: depthwise kernel (Conv-TasNet P=3)
    n_blocks: int = 8  # X: blocks per repeat, dilations 1, 2, .., 2^(X-1) (Conv-TasNet X=8)
    n_repeats: int = 3  # R: repeats of the X blocks (Conv-TasNet R=3)
    # Blocks of the auxiliary (reference) network: one repeat of X, as ESPnet's
    # TDSpeakerBeamExtractor builds its auxiliary TCN.
    aux_blocks: int = 8
    # Index of the extractor block whose outputs the embedding multiplies. 0: right after the
    # first block, where the paper's Fig. 1 puts the adaptation layer; ESPnet's recipe default
    # is 7, the end of the first repeat.
    adapt_block: int = 0
    # A frozen pretrained speaker encoder (models/layers/ge2e.py): "none" or "ge2e", whose embedding
    # is projected and added to the auxiliary network's before the multiplicative adaptation.
    speaker_embedding: str = "none"
    # Training speakers of a classification head on the auxiliary network's embedding (before
    # the pretrained one joins it), trained by loss.speaker_ce. 0 = none; train.py sets it
    # from the data when loss.speaker_ce is on.
    n_speakers: int = 0


class ConvBlock(nn.Module):
    """Conv-TasNet's 1-D conv block: 1x1 conv B -> H, PReLU, gLN, dilated depthwise conv,
    PReLU, gLN, then a 1x1 conv back to B for the residual stream and one for the skip output.

    Either output can be left out (``residual=False`` in the extractor's last block, whose
    residual stream nothing reads; ``skip=False`` in the auxiliary network, which reads only the
    residual stream), so that every parameter gets a gradient (DDP needs no unused-parameter
    search).

    Shape:
        x (B, C, T) -> (residual (B, C, T) or None, skip (B, C, T) or None)
    """

    def __init__(
        self,
        *,
        channels: int,
        hidden: int,
        kernel: int,
        dilation: int,
        residual: bool = True,
        skip: bool = True,
    ) -> None:
        super().__init__()
        self.in_conv = nn.Conv1d(channels, hidden, 1)
        self.act_in = nn.PReLU()
        self.norm_in = GlobalLayerNorm(hidden)
        # "same" padding for an odd kernel: non-causal, as in the paper's offline setting
        self.depthwise = nn.Conv1d(
            hidden,
            hidden,
            kernel,
            padding=dilation * (kernel - 1) // 2,
            dilation=dilation,
            groups=hidden,
        )
        self.act_dw = nn.PReLU()
        self.norm_dw = GlobalLayerNorm(hidden)
        self.res_conv = nn.Conv1d(hidden, channels, 1) if residual else None
        self.skip_conv = nn.Conv1d(hidden, channels, 1) if skip else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h = self.norm_in(self.act_in(self.in_conv(x)))  # (B, H, T)
        h = self.norm_dw(self.act_dw(self.depthwise(h)))  # (B, H, T)
        res = x + self.res_conv(h) if self.res_conv is not None else None
        skip = self.skip_conv(h) if self.skip_conv is not None else None
        return res, skip


class TDSpeakerBeam(nn.Module):
    """Time-domain SpeakerBeam target speaker extractor.

    Keyword arguments are ``TDSpeakerBeamArgs`` plus the sample rate; defaults are the recipe.
    The extractor and the auxiliary network each have their own encoder (same shapes).

    Shape:
        mix (B, N), ref (B, M) -> (B, N); M may differ from N (M >= ``kernel``).
    """

    def __init__(
        self,
        *,
        sample_rate: int = 48_000,
        n_filters: int = 512,
        kernel: int = 96,
        stride: int = 48,
        bottleneck: int = 128,
        hidden: int = 512,
        conv_kernel: int = 3,
        n_blocks: int = 8,
        n_repeats: int = 3,
        aux_blocks: int = 8,
        adapt_block: int = 0,
        speaker_embedding: str = "none",
        n_speakers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < stride <= kernel:
            raise ValueError(f"stride {stride} must be in 1..kernel ({kernel})")
        if conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel {conv_kernel} must be odd (same-length convolutions)")
        if n_blocks < 1 or n_repeats < 1 or aux_blocks < 0:
            raise ValueError(
                f"need n_blocks >= 1, n_repeats >= 1, aux_blocks >= 0 "
                f"(got {n_blocks}, {n_repeats}, {aux_blocks})"
            )
        if not 0 <= adapt_block < n_blocks * n_repeats:
            raise ValueError(
                f"adapt_block {adapt_block} names a block outside 0..{n_blocks * n_repeats - 1}"
            )
        self.sample_rate = sample_rate
        # Per-repeat activation checkpointing while training: a runtime memory setting that the
        # trainer sets (train.grad_checkpoint), not a constructor argument.
        self.grad_checkpoint = False
        self.kernel = kernel
        self.stride = stride
        self.n_blocks = n_blocks
        self.adapt_block = adapt_block

        def block(index: int, **kw: bool) -> ConvBlock:
            return ConvBlock(
                channels=bottleneck,
                hidden=hidden,
                kernel=conv_kernel,
                dilation=2 ** (index % n_blocks),
                **kw,
            )

        # Extraction network. No bias in the encoder/decoder (Conv-TasNet), so silence maps to
        # silence.
        self.encoder = nn.Conv1d(1, n_filters, kernel, stride=stride, bias=False)
        self.in_norm = GlobalLayerNorm(n_filters)
        self.in_proj = nn.Conv1d(n_filters, bottleneck, 1)
        last = n_blocks * n_repeats - 1
        self.repeats = nn.ModuleList(
            nn.ModuleList(
                block(r * n_blocks + x, residual=r * n_blocks + x != last) for x in range(n_blocks)
            )
            for r in range(n_repeats)
        )
        self.mask_act = nn.PReLU()
        self.mask_conv = nn.Conv1d(bottleneck, n_filters, 1)
        self.decoder = nn.ConvTranspose1d(n_filters, 1, kernel, stride=stride, bias=False)

        # Auxiliary network: its own encoder, the same front end and blocks, a time average.
        self.aux_encoder = nn.Conv1d(1, n_filters, kernel, stride=stride, bias=False)
        self.aux_norm = GlobalLayerNorm(n_filters)
        self.aux_proj = nn.Conv1d(n_filters, bottleneck, 1)
        self.aux_tcn = nn.ModuleList(block(x, skip=False) for x in range(aux_blocks))
        self.aux_act = nn.PReLU()
        # A 1x1 conv before the time mean equals a linear layer after it; the latter is cheaper.
        self.aux_out = nn.Linear(bottleneck, bottleneck)
        self.speaker_head = nn.Linear(bottleneck, n_speakers) if n_speakers > 0 else None
        self.pretrained_encoder = speaker_encoder(speaker_embedding, sample_rate)
        self.fusion = (EmbeddingFusion(own_dim=bottleneck, mode="add")
                       if self.pretrained_encoder is not None else None)

    # ---------------------------------------------------------------------------------------
    # Reference
    # ---------------------------------------------------------------------------------------

    def _aux_tcn(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.aux_tcn:
            h = blk(h)[0]
        return h

    def encode_reference(self, ref: torch.Tensor) -> torch.Tensor:
        """The target speaker's embedding; ``extract`` reuses it for any number of windows.

        Shape:
            ref (B, M) -> z_ref (B, bottleneck); M >= ``kernel``
        """
        return self._with_pretrained(self._own_embedding(ref), ref)

    def _with_pretrained(self, own: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if self.pretrained_encoder is None:
            return own
        return self.fusion(own, self.pretrained_encoder(ref))

    def _own_embedding(self, ref: torch.Tensor) -> torch.Tensor:
        """The auxiliary network's embedding. Shape: (B, M) -> (B, bottleneck)"""
        if ref.shape[-1] < self.kernel:
            raise ValueError(f"reference of {ref.shape[-1]} samples; need >= {self.kernel}")
        x = (ref.float() / rms_scale(ref)).unsqueeze(1)  # (B, 1, M)
        h = self.aux_proj(self.aux_norm(F.relu(self.aux_encoder(x))))  # (B, Bc, T')
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            h = checkpoint(self._aux_tcn, h, use_reentrant=False)
        else:
            h = self._aux_tcn(h)
        pooled = self.aux_act(h).float().mean(-1)  # (B, Bc): the mean over T' in float32
        return self.aux_out(pooled)

    # ---------------------------------------------------------------------------------------
    # Extraction
    # ---------------------------------------------------------------------------------------

    def _padding(self, n_samples: int) -> tuple[int, int]:
        """Zeros (left, right) so that every input sample lies under the same number of frames
        as a sample in the middle (``kernel - stride`` on the left) and the padded length is a
        whole number of strides plus the kernel."""
        left = self.kernel - self.stride
        # ceil, + 1 for the kernel; written without negative operands, which an exported
        # graph's integer division would truncate towards zero instead of flooring
        n_frames = (n_samples + left + self.stride - 1) // self.stride + 1
        right = (n_frames - 1) * self.stride + self.kernel - n_samples - left
        return left, right

    def _repeat(
        self, r: int, h: torch.Tensor, z_ref: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Repeat ``r`` of the TCN: the residual stream out (None after the last block) and
        the sum of the repeat's skip outputs."""
        skips = None
        for x, blk in enumerate(self.repeats[r]):
            res, skip = blk(h)
            if r * self.n_blocks + x == self.adapt_block:
                # Multiplicative adaptation: everything downstream sees speaker-scaled channels.
                gain = z_ref.to(skip.dtype)[:, :, None]  # (B, Bc, 1)
                skip = skip * gain
                res = res * gain if res is not None else None
            skips = skip if skips is None else skips + skip
            h = res
        return h, skips

    def extract(
        self, mix: torch.Tensor, z_ref: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The target in ``mix`` given an embedded reference (``encode_reference``).

        ``scale`` is the level the mixture is divided by on the way in and multiplied by on the
        way out; by default the mixture's own RMS. A caller that runs a long recording window
        by window passes one scale for every window.

        Shape:
            mix (B, N), z_ref (B, bottleneck), scale (B, 1) -> (B, N)
        """
        n_samples = mix.shape[-1]
        scale = rms_scale(mix) if scale is None else scale.float()  # (B, 1)
        left, right = self._padding(n_samples)
        x = F.pad(mix.float() / scale, (left, right)).unsqueeze(1)  # (B, 1, left + N + right)
        feats = F.relu(self.encoder(x))  # (B, N_filters, T)
        h = self.in_proj(self.in_norm(feats))  # (B, Bc, T)
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        skip_sum = None
        for r in range(len(self.repeats)):
            if use_ckpt:
                h, skips = checkpoint(self._repeat, r, h, z_ref, use_reentrant=False)
            else:
                h, skips = self._repeat(r, h, z_ref)
            skip_sum = skips if skip_sum is None else skip_sum + skips
        # ReLU mask, as Conv-TasNet's released code and Asteroid/ESPnet use: the learned basis is
        # not orthogonal, so a mask above 1 can be needed, and the ReLU encoder output is >= 0.
        mask = F.relu(self.mask_conv(self.mask_act(skip_sum)))  # (B, N_filters, T)
        est = self.decoder(feats * mask)[:, 0, left : left + n_samples]  # (B, N)
        return est * scale

    def forward(
        self, mix: torch.Tensor, ref: torch.Tensor, *, with_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Shape: mix (B, N), ref (B, M) -> (B, N); ``extract(mix, encode_reference(ref))``.
        With ``with_aux``, ``(estimate, aux)``: ``speaker_logits`` (B, n_speakers) of the
        auxiliary embedding where the model has a speaker head, else an empty aux."""
        own = self._own_embedding(ref)
        est = self.extract(mix, self._with_pretrained(own, ref))
        if not with_aux:
            return est
        return est, ({} if self.speaker_head is None
                     else {"speaker_logits": self.speaker_head(own)})
