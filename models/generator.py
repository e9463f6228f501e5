"""The HiFi-TSE generator: waveform mixture + reference in, target waveform out.

mix -> STFT -> BandSplitEncoder -> USEF cross-attn (ref) -> FiLM (ref)
    -> [SpeakerReinject -> TF-GridNet block] x n_blocks -> BandMergeDecoder -> iSTFT
ref -> STFT -> BandSplitEncoder (shared weights) -------^
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from data.audio_utils import STFT
from models.band_split import BandMergeDecoder, BandSplitEncoder, band_layout
from models.tf_gridnet import SpeakerReinjectLayer, TFGridNetBlock
from models.usef import FiLMLayer, USEFCrossAttention

RMS_EPS = 1e-8  # float32 waveforms only, so this never underflows


def rms_scale(wave: torch.Tensor) -> torch.Tensor:
    """The level ``Generator`` divides a waveform by: its RMS (+ ``RMS_EPS``), in float32.

    Shape:
        (B, N) -> (B, 1)
    """
    return wave.float().pow(2).mean(-1, keepdim=True).sqrt() + RMS_EPS


# Constructor arguments that checkpoints written by earlier versions carry and the generator no
# longer takes (grad_checkpoint is now train.grad_checkpoint).
LEGACY_MODEL_ARGS = ("grad_checkpoint",)


def current_model_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` of a checkpoint of any version, without the keys that were retired."""
    return {k: v for k, v in model_args.items() if k not in LEGACY_MODEL_ARGS}


class CheckpointError(ValueError):
    """A file that is not a usable HiFi-TSE checkpoint; the message names the file."""


def _one_line(text: str) -> str:
    """A checkpoint loader's message on one line, without torch's advice to unpickle anyway."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # terminal colour codes
    unpickler = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if unpickler:
        path = text.split(": ", 1)[0]
        reason = unpickler.group(1).split(". Please")[0].rstrip(".")
        if "Unsupported global" in reason:
            return (
                f"{path}: not a HiFi-TSE checkpoint (it holds pickled objects other than "
                f"tensors, which are never unpickled: {reason})"
            )
        return f"{path}: not a HiFi-TSE checkpoint (not a torch.save file: {reason})"
    return " ".join(text.split())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A HiFi-TSE checkpoint's dict, read once with ``weights_only=True``, with one-line errors
    naming ``path``.

    A file in torch's zip format is memory-mapped: a training checkpoint's optimizer and
    discriminator states are never copied into memory, only what ``build_generator`` takes.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:  # torch raises many types for a non-checkpoint file
        raise CheckpointError(_one_line(f"{path}: not a loadable checkpoint ({err})")) from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "generator" not in ckpt:
        raise CheckpointError(f"{path}: not a HiFi-TSE checkpoint (no model_args/generator)")
    return ckpt


class Generator(nn.Module):
    """BSRNN band split + USEF + FiLM + TF-GridNet target speaker extractor.

    Keyword arguments are the ``stft`` and ``model`` config sections (``config.model_kwargs``);
    defaults are the v2 recipe (SPEC §2).

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
    ) -> None:
        super().__init__()
        band_regions = band_regions or [[0, 1000, 10], [1000, 8000, 28], [8000, 24000, 15]]
        reinject_at = list(range(n_blocks)) if reinject_at is None else list(reinject_at)
        if any(not 0 <= i < n_blocks for i in reinject_at):
            raise ValueError(f"reinject_at {reinject_at} names a block outside 0..{n_blocks - 1}")
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
        self.usef = USEFCrossAttention(**attn)
        self.film = FiLMLayer(feature_dim=feature_dim) if use_film else None
        self.blocks = nn.ModuleList(
            TFGridNetBlock(lstm_hidden=lstm_hidden, **attn) for _ in range(n_blocks)
        )
        self.reinject = nn.ModuleDict(
            {str(i): SpeakerReinjectLayer(**attn) for i in sorted(set(reinject_at))}
        )
        self.decoder = BandMergeDecoder(
            bands=bands,
            feature_dim=feature_dim,
            mask_hidden=mask_hidden,
            n_bins=self.stft.n_bins,
        )

    def _block(self, i: int, z: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
        if str(i) in self.reinject:
            z = self.reinject[str(i)](z, z_ref)
        return self.blocks[i](z)

    def forward(self, mix: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Shape: mix (B, N), ref (B, M) -> (B, N); ``extract(mix, encode_reference(ref))``."""
        return self.extract(mix, self.encode_reference(ref))

    def encode_reference(self, ref: torch.Tensor) -> torch.Tensor:
        """Embed the reference once; ``extract`` reuses it for any number of mixture windows.

        Shape:
            ref (B, M) -> z_ref (B, S, K, D)
        """
        ref_scale = rms_scale(ref)  # (B, 1)
        return self.encoder(self.stft(ref.float() / ref_scale))

    def extract(
        self, mix: torch.Tensor, z_ref: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The target in ``mix`` given an embedded reference (``encode_reference``).

        ``scale`` is the level the mixture is divided by on the way in and multiplied by on the
        way out; by default the mixture's own RMS. A caller that runs a long recording window
        by window passes one scale for every window, so the level never changes between them.

        Shape:
            mix (B, N), z_ref (B, S, K, D), scale (B, 1) -> (B, N)
        """
        n_samples = mix.shape[-1]
        # Scale-free input: the network sees unit-RMS signals, the estimate gets the mix's scale.
        scale = rms_scale(mix) if scale is None else scale.float()  # (B, 1)
        mix_spec = self.stft(mix.float() / scale)  # (B, F, T) complex
        z = self.encoder(mix_spec)  # (B, T, K, D)
        z = self.usef(z, z_ref)
        if self.film is not None:
            z = self.film(z, z_ref)
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i in range(len(self.blocks)):
            if use_ckpt:
                z = checkpoint(self._block, i, z, z_ref, use_reentrant=False)
            else:
                z = self._block(i, z, z_ref)
        est_spec = self.decoder(z, mix_spec)  # (B, F, T) complex
        return self.stft.inverse(est_spec, n_samples) * scale

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, use_ema: bool = True) -> Generator:
        """Rebuild the generator from a checkpoint file that carries its ``model_args``."""
        path = Path(path)
        return cls.from_payload(read_checkpoint(path), use_ema=use_ema, name=str(path))

    @classmethod
    def from_payload(
        cls, ckpt: dict[str, Any], *, use_ema: bool = True, name: str = "checkpoint"
    ) -> Generator:
        """The generator a checkpoint dict (``read_checkpoint``) describes, with its EMA weights
        when ``use_ema`` and it has them, else the raw ones; errors name ``name``. A caller that
        needs more of the checkpoint (evaluate.py: its config and step) reads the file once."""
        try:
            model = cls(**current_model_args(ckpt["model_args"]))
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(
                f"{name}: not a HiFi-TSE checkpoint (model_args: {_one_line(str(err))[:200]})"
            ) from None
        state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["generator"]
        try:
            model.load_state_dict(state)
        except (TypeError, RuntimeError) as err:  # e.g. written by an older generator version
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{name}: weights do not fit this generator ({first})") from None
        return model

    def checkpoint_payload(self, model_args: dict[str, Any]) -> dict[str, Any]:
        """The minimal checkpoint dict ``from_checkpoint`` understands."""
        return {"model_args": dict(model_args), "generator": self.state_dict()}
