"""A frozen, pretrained speaker encoder inside the model: Resemblyzer's GE2E d-vector network.

``model.speaker_embedding: ge2e`` gives a family a second view of its reference besides the one
it learns: the 256-d embedding of a speaker-verification network that has already learnt to
tell voices apart (Wan et al., "Generalized End-to-End Loss for Speaker Verification", ICASSP
2018; the encoder of Real-Time-Voice-Cloning, whose weights ship inside the ``resemblyzer``
wheel as ``resemblyzer/pretrained.pt``, so nothing is downloaded).

The network and its front end are written here in torch, so that they run on the model's device
inside ``encode_reference`` and their weights travel in every checkpoint (a checkpoint and
``inference.py`` need nothing else). The computation follows Resemblyzer's ``VoiceEncoder``
(Apache-2.0) and ``embed_utterance``:

    ref (model rate) -> low-pass + decimate to 16 kHz -> (tile to 1.6 s when shorter)
        -> level to -30 dBFS RMS -> power mel spectrogram (25 ms Hann frames every
        10 ms, 40 Slaney mel bands, librosa's centred STFT with zero padding)
        -> 160-frame partial windows, 1.3 per second, the last kept at >= 75 % coverage
        -> 3-layer LSTM(256) -> last hidden state -> Linear -> ReLU -> L2 norm
        -> mean over the windows -> L2 norm

Differences from ``preprocess_wav`` + ``embed_utterance``, each for a reason:
- no WebRTC VAD trimming of pauses (a reference is a short, mostly voiced utterance, and the VAD
  is a CPU-only C library with no place on the device);
- the level is set to -30 dBFS in both directions (Resemblyzer only raises it): the encoder
  reads a power spectrogram, so its embedding depends on the level, and a family must be
  scale-equivariant;
- a reference shorter than one 1.6 s window is tiled (repeated end to end) and cut to exactly
  one window, where Resemblyzer pads it with zeros: the LSTM then reads speech in every frame;
- 48 kHz (and 32 kHz) is decimated to 16 kHz here with a windowed-sinc low-pass, where
  Resemblyzer resamples with librosa. Model rates that are not a multiple of 16 kHz are refused.

On the same 16 kHz waveform (set to -30 dBFS) this equals ``embed_utterance`` to float32
rounding (``tests/test_ge2e.py`` states the tolerance). The module is frozen: its parameters
take no gradient (``requires_grad`` False, so the optimizer and the EMA leave them alone) and it
runs in float32 outside autocast.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

GE2E_SR = 16_000  # the rate of the encoder's mel front end (resemblyzer.hparams.sampling_rate)
EMBEDDING_DIM = 256  # model_embedding_size
N_MELS = 40  # mel_n_channels
N_FFT = 400  # 25 ms at 16 kHz (mel_window_length)
HOP = 160  # 10 ms (mel_window_step)
WINDOW_FRAMES = 160  # partials_n_frames: 1.6 s
WINDOW_SAMPLES = WINDOW_FRAMES * HOP
PARTIALS_PER_SECOND = 1.3  # embed_utterance's rate
MIN_COVERAGE = 0.75  # embed_utterance's min_coverage
TARGET_RMS = 10.0 ** (-30.0 / 20.0)  # audio_norm_target_dBFS
SILENT_RMS = 1e-5  # -100 dBFS: below it a reference is not amplified (it stays near silent)
NORM_EPS = 1e-12  # an all-zero ReLU output embeds as zeros instead of NaN
KINDS = ("none", "ge2e")  # model.speaker_embedding
# Decimation low-pass: Kaiser-windowed sinc, HALF_TAPS taps per output-rate period on each side
# of the centre, cut off at CUTOFF of the 8 kHz Nyquist frequency (about 100 dB stop band).
HALF_TAPS = 16
CUTOFF = 0.95
KAISER_BETA = 10.0


def resemblyzer_weights() -> Path | None:
    """``resemblyzer/pretrained.pt`` of the installed package, found without importing it
    (its import pulls in librosa and webrtcvad); None where the package is not installed."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    return path if path.is_file() else None


@functools.cache
def pretrained_state() -> dict[str, torch.Tensor] | None:
    """The LSTM and linear weights of Resemblyzer's ``pretrained.pt`` (read once per process;
    its GE2E loss's similarity scale and bias are left out), or None without the package."""
    path = resemblyzer_weights()
    if path is None:
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    return {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}


def slaney_mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels) (Slaney's mel scale and area
    normalisation, 0 Hz to Nyquist), computed in float64 and returned as float32.

    Shape: -> (n_mels, n_fft // 2 + 1)
    """
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def to_mel(hz: np.ndarray) -> np.ndarray:
        log_part = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
        return np.where(hz >= min_log_hz, log_part, hz / f_sp)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        log_part = min_log_hz * np.exp(logstep * (mel - min_log_mel))
        return np.where(mel >= min_log_mel, log_part, f_sp * mel)

    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    mel_hz = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(sr / 2.0)), n_mels + 2))
    widths = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.astype(np.float32)


def partial_windows(n_samples: int) -> list[int]:
    """First mel frames of the 160-frame partial windows that ``embed_utterance`` cuts from a
    16 kHz signal of ``n_samples`` (Resemblyzer's ``compute_partial_slices`` at its defaults)."""
    n_frames = math.ceil((n_samples + 1) / HOP)
    frame_step = round(GE2E_SR / PARTIALS_PER_SECOND / HOP)
    starts = list(range(0, max(1, n_frames - WINDOW_FRAMES + frame_step + 1), frame_step))
    coverage = (n_samples - starts[-1] * HOP) / WINDOW_SAMPLES
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return starts


def lowpass_taps(factor: int) -> torch.Tensor:
    """The decimation filter: a Kaiser-windowed sinc at ``CUTOFF`` of the output Nyquist
    frequency, unit DC gain. Shape: -> (2 * HALF_TAPS * factor + 1,)"""
    half = HALF_TAPS * factor
    n = np.arange(-half, half + 1, dtype=np.float64)
    fc = CUTOFF / (2 * factor)  # cycles per input sample
    taps = 2 * fc * np.sinc(2 * fc * n) * np.kaiser(2 * half + 1, KAISER_BETA)
    return torch.from_numpy(taps / taps.sum()).float()


class GE2EEncoder(nn.Module):
    """Frozen GE2E speaker encoder of references at the model's rate.

    Built with Resemblyzer's pretrained weights where the package is installed; a checkpoint
    carries them (``loaded`` is part of the state), so a model read from one needs no package.

    Shape:
        ref (B, M) at ``sample_rate`` -> (B, 256) unit-norm, float32
    """

    def __init__(self, *, sample_rate: int) -> None:
        super().__init__()
        if sample_rate % GE2E_SR:
            raise ValueError(
                f"model.speaker_embedding ge2e needs a sample rate that is a multiple of "
                f"{GE2E_SR} Hz (it decimates to the encoder's 16 kHz), got {sample_rate}"
            )
        self.factor = sample_rate // GE2E_SR
        self.lstm = nn.LSTM(N_MELS, EMBEDDING_DIM, 3, batch_first=True)
        self.linear = nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM)
        # Constants of the front end: rebuilt from the code, so not stored in checkpoints.
        self.register_buffer("mel_filters", torch.from_numpy(
            slaney_mel_filters(GE2E_SR, N_FFT, N_MELS)), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("taps", lowpass_taps(self.factor), persistent=False)
        # Whether the weights are the pretrained ones (a checkpoint carries this flag).
        self.register_buffer("loaded", torch.tensor(False))
        self._checked_loaded = False  # set once ``loaded`` was seen True (forward)
        state = pretrained_state()
        if state is not None:
            self.load_state_dict({**state, "loaded": torch.tensor(True)})
        self.requires_grad_(False)

    def to_16k(self, ref: torch.Tensor) -> torch.Tensor:
        """Low-pass and decimate to 16 kHz. Shape: (B, M) -> (B, ceil(M / factor))"""
        if self.factor == 1:
            return ref
        half = (self.taps.numel() - 1) // 2
        out = nn.functional.conv1d(ref[:, None], self.taps.view(1, 1, -1), stride=self.factor,
                                   padding=half)
        return out[:, 0]

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """Resemblyzer's power mel spectrogram of a 16 kHz signal. Shape: (B, T) -> (B, F, 40)"""
        spec = torch.stft(wav, N_FFT, hop_length=HOP, window=self.window, center=True,
                          pad_mode="constant", return_complex=True)  # (B, 201, F)
        power = spec.real.square() + spec.imag.square()
        return torch.matmul(self.mel_filters, power).transpose(1, 2)

    def embed_windows(self, mels: torch.Tensor) -> torch.Tensor:
        """``VoiceEncoder.forward``. Shape: (W, 160, 40) -> (W, 256) unit-norm"""
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        # Checked once: bool() of a device buffer is a host sync, which a training step
        # must not pay every time.
        if not self._checked_loaded and not bool(self.loaded):
            raise RuntimeError(
                "the GE2E speaker encoder has no pretrained weights: install resemblyzer (it "
                "ships them) or load a checkpoint that holds them"
            )
        self._checked_loaded = True
        with torch.no_grad(), torch.autocast(ref.device.type, enabled=False):
            wav = self.to_16k(ref.float())  # (B, T)
            if wav.shape[-1] < WINDOW_SAMPLES:
                wav = wav.repeat(1, math.ceil(WINDOW_SAMPLES / wav.shape[-1]))
                wav = wav[:, :WINDOW_SAMPLES]
            rms = wav.square().mean(-1, keepdim=True).sqrt().clamp_min(SILENT_RMS)
            wav = wav * (TARGET_RMS / rms)
            starts = partial_windows(wav.shape[-1])
            end = (starts[-1] + WINDOW_FRAMES) * HOP  # embed_utterance's zero padding
            wav = nn.functional.pad(wav, (0, max(0, end - wav.shape[-1])))
            mel = self.mel(wav)  # (B, F, 40)
            mels = torch.stack([mel[:, s : s + WINDOW_FRAMES] for s in starts], 1)  # (B, P, ..)
            b, p = mels.shape[:2]
            partial = self.embed_windows(mels.flatten(0, 1)).view(b, p, EMBEDDING_DIM)
            mean = partial.mean(1)
            return mean / mean.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def speaker_encoder(kind: str, sample_rate: int) -> GE2EEncoder | None:
    """The frozen encoder that ``model.speaker_embedding`` names (None for ``none``)."""
    if kind not in KINDS:
        raise ValueError(f"model.speaker_embedding must be one of {', '.join(KINDS)}, "
                         f"got {kind!r}")
    return GE2EEncoder(sample_rate=sample_rate) if kind == "ge2e" else None
