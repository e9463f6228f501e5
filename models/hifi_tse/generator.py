"""The HiFi-TSE generator: waveform mixture + reference in, target waveform out.

mix -> STFT -> BandSplitEncoder -> USEF cross-attn (ref) -> FiLM (ref)
    -> [SpeakerReinject -> TF-GridNet block] x n_blocks -> BandMergeDecoder -> iSTFT
ref -> STFT -> BandSplitEncoder (shared weights) -------^
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsp.level import RMS_EPS, rms_scale
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
    # A causal model that streams (doc/design.md, "Real time"): the sub-band LSTMs run forward
    # only, the full-band attention looks back attn_lookback frames (the current one included),
    # and the level the network sees is a running RMS of time constant rms_seconds instead of
    # the whole mixture's. The Mamba variant does not stream.
    causal: bool = False
    attn_lookback: int = 100  # frames: 1 s at the 10 ms hop
    rms_seconds: float = 1.0


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
        causal: bool = False,
        attn_lookback: int = 100,
        rms_seconds: float = 1.0,
    ) -> None:
        super().__init__()
        if causal and rms_seconds <= 0:
            raise ValueError(f"rms_seconds {rms_seconds} must be > 0")
        band_regions = band_regions or [[0, 1000, 10], [1000, 8000, 28], [8000, 24000, 15]]
        reinject_at = list(range(n_blocks)) if reinject_at is None else list(reinject_at)
        self.sample_rate = sample_rate
        # Per-block activation checkpointing while training: a runtime memory setting that the
        # trainer sets (train.grad_checkpoint), not a constructor argument, so a checkpoint's
        # model_args do not depend on it.
        self.grad_checkpoint = False
        self.causal = causal
        # Per-hop decay of the running mean square: exp(-hop / (rms_seconds * sample_rate)).
        self.rms_decay = math.exp(-hop_length / (rms_seconds * sample_rate))
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
                    "mamba_d_state": mamba_d_state, "mamba_expand": mamba_expand,
                    "causal": causal, "attn_lookback": attn_lookback}
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
        way out; by default the mixture's own RMS, or, in a causal model, its running RMS frame
        by frame (``running_level``). A caller that runs a long recording window by window
        passes one scale for every window, so the level never changes between them.

        Shape:
            mix (B, N), z_ref (frames (B, S, K, D), embedding), scale (B, 1) -> (B, N)
        """
        n_samples = mix.shape[-1]
        if self.causal and scale is None:
            spec = self.stft(mix.float())  # (B, F, T) complex
            level = self.running_level(spec, self.level_state(mix.shape[0], mix.device))[0]
            est_spec = self._extract_frames(spec / level[:, None], z_ref) * level[:, None]
            return self.stft.inverse(est_spec, n_samples)
        # Scale-free input: the network sees unit-RMS signals, the estimate gets the mix's scale.
        scale = rms_scale(mix) if scale is None else scale.float()  # (B, 1)
        mix_spec = self.stft(mix.float() / scale)  # (B, F, T) complex
        return self.stft.inverse(self._extract_frames(mix_spec, z_ref), n_samples) * scale

    def _extract_frames(self, mix_spec: torch.Tensor, z_ref: SpeakerReference) -> torch.Tensor:
        """Shape: mix_spec (B, F, T) complex at unit level -> (B, F, T) complex"""
        z = self.encoder(mix_spec)  # (B, T, K, D)
        z = self.conditioned_blocks(z, z_ref)
        return self.decoder(z, mix_spec)

    # -- streaming (causal models) -------------------------------------------------------------

    def level_state(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The running level before the first frame: no power seen, no frame counted."""
        zero = torch.zeros(batch, dtype=torch.float32, device=device)
        return {"mean_square": zero, "weight": zero.clone()}

    def running_level(
        self, spec: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The causal level of each frame: the RMS of the signal so far, its frames weighted by
        ``rms_decay`` per hop (an exponential moving average of the frames' mean squares,
        divided by the sum of its weights, so the first frames are not biased towards zero),
        plus ``RMS_EPS``. Scale-equivariant: ``a * spec`` has level ``a * level``.

        Shape: spec (B, F, T) complex, state (B,) each -> level (B, T), state
        """
        # Each frame's mean square of windowed samples (Parseval on the one-sided spectrum).
        weights = torch.full((spec.shape[1],), 2.0, device=spec.device)
        weights[0] = weights[-1] = 1.0
        window = self.stft.window
        power = (spec.abs().square() * weights[:, None]).sum(1) / (
            self.stft.n_fft * window.square().sum())  # (B, T)
        mean_square, weight = state["mean_square"], state["weight"]
        levels = []
        for t in range(power.shape[1]):  # sequential by nature; T scalars per item
            mean_square = self.rms_decay * mean_square + (1 - self.rms_decay) * power[:, t]
            weight = self.rms_decay * weight + (1 - self.rms_decay)
            levels.append((mean_square / weight).sqrt() + RMS_EPS)
        return torch.stack(levels, dim=1), {"mean_square": mean_square, "weight": weight}

    def stream_frames(
        self, spec: torch.Tensor, z_ref: SpeakerReference, state: dict[str, Any] | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A causal model on the next ``t`` STFT frames of a stream, given the state of the
        frames before them (None at the start): the running level and each block's state.
        Frame by frame, this gives what ``extract`` gives on the whole signal. The state also
        holds what the conditioning derives from the reference (``reference_cache``), computed
        at the first call.

        Shape: spec (B, F, t) complex -> (B, F, t) complex, state
        """
        if not self.causal:
            raise RuntimeError("stream_frames needs a causal model (model.causal: true)")
        if state is None:
            state = {"level": self.level_state(spec.shape[0], spec.device), "blocks": None,
                     "reference": self.reference_cache(z_ref)}
        level, level_state = self.running_level(spec, state["level"])
        unit = spec / level[:, None]
        z, blocks = self.conditioned_blocks_step(self.encoder(unit), z_ref, state["reference"],
                                                 state["blocks"])
        est = self.decoder(z, unit) * level[:, None]
        return est, {"level": level_state, "blocks": blocks, "reference": state["reference"]}
