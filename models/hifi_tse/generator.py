"""The HiFi-TSE generator: waveform mixture + reference in, target waveform out.

mix -> STFT -> BandSplitEncoder -> USEF cross-attn (ref) -> FiLM (ref)
    -> [SpeakerReinject -> TF-GridNet block] x n_blocks -> BandMergeDecoder -> iSTFT
ref -> STFT -> BandSplitEncoder (shared weights) -------^
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsp.level import rms_scale
from dsp.stft import STFT
from models.hifi_tse.band_split import BandMergeDecoder, BandSplitEncoder, band_layout
from models.hifi_tse.tf_gridnet import TFGridNetBlock
from models.layers.conditioning import ReferenceConditioned, SpeakerReference


@dataclass
class HiFiTSEArgs:
    """The generator's arguments besides the STFT (the ``model`` section of ``arch: hifi_tse``)."""

    feature_dim: int = 128
    # (f_low_hz, f_high_hz, n_bands): equal-width bands per region. The recipe's 10 + 28 + 15 = 53
    # bands are fine (100 Hz) below 1 kHz, medium (250 Hz) to 8 kHz, coarse (~1.07 kHz) above.
    band_regions: list[list[float]] = field(
        default_factory=lambda: [[0.0, 1000.0, 10], [1000.0, 8000.0, 28], [8000.0, 24000.0, 15]]
    )
    band_overlap: float = 0.25  # each band reaches this fraction of its width into its neighbours
    n_blocks: int = 6
    lstm_hidden: int = 256
    n_heads: int = 4
    qk_per_band: int = 4  # query/key channels per band and head (TFGridNetV3 style)
    mask_hidden: int = 64  # hidden width of each band's mask MLP (keeps the recipe near 12 M)
    reinject_at: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    use_film: bool = True
    # The TF-GridNet blocks' intra-frame and sub-band paths: "lstm" (BiLSTMs of lstm_hidden, the
    # recipe) or "mamba" (bidirectional Mambas of the two sizes below; lstm_hidden is then
    # unused), see models/layers/mamba.py. Checkpoints from before this key are lstm.
    sequence_layer: str = "lstm"
    mamba_d_state: int = 16  # SSM state size N (mamba-ssm's default)
    mamba_expand: int = 2  # inner width = mamba_expand * feature_dim (mamba-ssm's default)
    # A frozen pretrained speaker encoder beside the learnt reference path (models/layers/ge2e.py):
    # "none" or "ge2e" (Resemblyzer's GE2E d-vector, added to FiLM's speaker vector and
    # scaling and shifting the stream at every re-injection layer).
    speaker_embedding: str = "none"
    # Training speakers of a classification head on FiLM's learnt speaker vector (needs
    # use_film), trained by loss.speaker_ce: a speaker-discriminative reference path. 0 = none;
    # train.py sets it from the data when loss.speaker_ce is on.
    n_speakers: int = 0


# Constructor arguments that checkpoints written by earlier versions carry and the generator no
# longer takes (grad_checkpoint is now train.grad_checkpoint).
class Generator(ReferenceConditioned):
    """BSRNN band split + USEF + FiLM + TF-GridNet target speaker extractor.

    Keyword arguments are the ``stft`` and ``model`` config sections (``config.model_kwargs``);
    defaults are the v2 recipe (doc/design.md, "Generator").

    Shape:
        mix (B, N), ref (B, M) -> (B, N); M may differ from N.
    """

    def __init__(
        self,
        *,
        sample_rate: int = 48_000,
        n_fft: int = 2048,
        win_length: int = 960,
        hop_length: int = 480,
        feature_dim: int = 128,
        band_regions: list[list[float]] | None = None,
        band_overlap: float = 0.25,
        n_blocks: int = 6,
        lstm_hidden: int = 256,
        n_heads: int = 4,
        qk_per_band: int = 4,
        mask_hidden: int = 64,
        reinject_at: list[int] | None = None,
        use_film: bool = True,
        sequence_layer: str = "lstm",
        mamba_d_state: int = 16,
        mamba_expand: int = 2,
        speaker_embedding: str = "none",
        n_speakers: int = 0,
    ) -> None:
        super().__init__()
        band_regions = band_regions or [[0, 1000, 10], [1000, 8000, 28], [8000, 24000, 15]]
        reinject_at = list(range(n_blocks)) if reinject_at is None else list(reinject_at)
        self.sample_rate = sample_rate
        # Per-block activation checkpointing while training: a runtime memory setting that the
        # trainer sets (train.grad_checkpoint), not a constructor argument, so a checkpoint's
        # model_args do not depend on it.
        self.grad_checkpoint = False
        self.stft = STFT(n_fft=n_fft, win_length=win_length, hop_length=hop_length)
        bands = band_layout(
            sample_rate=sample_rate,
            n_fft=n_fft,
            band_regions=band_regions,
            band_overlap=band_overlap,
        )
        self.bands = bands
        attn = {"feature_dim": feature_dim, "n_heads": n_heads, "qk_per_band": qk_per_band}
        self.encoder = BandSplitEncoder(bands=bands, feature_dim=feature_dim)
        reinject = self._build_entry(feature_dim=feature_dim, attn=attn, use_film=use_film,
                                     speaker_embedding=speaker_embedding, sample_rate=sample_rate)
        if n_speakers and not use_film:
            raise ValueError("n_speakers (a speaker head on FiLM's speaker vector) needs use_film")
        self.speaker_head = nn.Linear(feature_dim, n_speakers) if n_speakers > 0 else None
        sequence = {"sequence_layer": sequence_layer, "lstm_hidden": lstm_hidden,
                    "mamba_d_state": mamba_d_state, "mamba_expand": mamba_expand}
        self.blocks = nn.ModuleList(TFGridNetBlock(**sequence, **attn) for _ in range(n_blocks))
        self._build_reinjection(reinject_at, reinject)
        self.decoder = BandMergeDecoder(
            bands=bands,
            feature_dim=feature_dim,
            mask_hidden=mask_hidden,
            n_bins=self.stft.n_bins,
        )

    def forward(
        self, mix: torch.Tensor, ref: torch.Tensor, *, with_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``extract(mix, encode_reference(ref))``; with ``with_aux``, ``(estimate, aux)``:
        ``speaker_logits`` (B, n_speakers) of the reference where the model has a speaker head,
        else an empty aux (see models/registry.py).

        Shape: mix (B, N), ref (B, M) -> (B, N)
        """
        z_ref = self.encode_reference(ref)
        est = self.extract(mix, z_ref)
        if not with_aux:
            return est
        if self.speaker_head is None:
            return est, {}
        return est, {"speaker_logits": self.speaker_head(self.film.speaker_vector(z_ref.frames))}

    def encode_reference(self, ref: torch.Tensor) -> SpeakerReference:
        """Embed the reference once; ``extract`` reuses it for any number of mixture windows.

        Shape:
            ref (B, M) -> frames (B, S, K, D), embedding (B, 256) or None
        """
        ref_scale = rms_scale(ref)  # (B, 1)
        return self.speaker_reference(self.encoder(self.stft(ref.float() / ref_scale)), ref)

    def extract(
        self, mix: torch.Tensor, z_ref: SpeakerReference, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The target in ``mix`` given an embedded reference (``encode_reference``).

        ``scale`` is the level the mixture is divided by on the way in and multiplied by on the
        way out; by default the mixture's own RMS. A caller that runs a long recording window
        by window passes one scale for every window, so the level never changes between them.

        Shape:
            mix (B, N), z_ref (frames (B, S, K, D), embedding), scale (B, 1) -> (B, N)
        """
        n_samples = mix.shape[-1]
        # Scale-free input: the network sees unit-RMS signals, the estimate gets the mix's scale.
        scale = rms_scale(mix) if scale is None else scale.float()  # (B, 1)
        mix_spec = self.stft(mix.float() / scale)  # (B, F, T) complex
        z = self.encoder(mix_spec)  # (B, T, K, D)
        z = self.conditioned_blocks(z, z_ref)
        est_spec = self.decoder(z, mix_spec)  # (B, F, T) complex
        return self.stft.inverse(est_spec, n_samples) * scale
