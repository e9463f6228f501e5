"""The frozen GE2E speaker encoder inside the models (models/layers/ge2e.py,
``model.speaker_embedding: ge2e``): equal to Resemblyzer's own ``embed_utterance``, frozen,
deterministic, batch-independent, level-free, and carried by checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from config import ConfigError, load_config, model_kwargs
from evaluation.speaker_similarity import _get_encoder, _resemblyzer
from models.layers import ge2e
from models.registry import build_model, checkpoint_payload, load_model
from training.nets import build_nets

REPO = Path(__file__).resolve().parents[1]
# embed_utterance in numpy/librosa against the torch front end and encoder, both float32: the
# largest difference measured over these signals is 1e-7; 1e-5 leaves room for other BLAS builds.
EMBEDDING_ATOL = 1e-5


# One torch thread per test (conftest.py): small tensors on shared cores only contend.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def voice(seconds: float, f0: float, sr: int = 16_000, seed: int = 0) -> np.ndarray:
    """A voiced-like test signal: a harmonic series on a wandering pitch, with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    wave = sum(np.sin(h * phase) / h for h in range(1, 20)) + 0.05 * rng.standard_normal(t.size)
    return (0.1 * wave).astype(np.float32)


def at_minus_30_dbfs(wave: np.ndarray) -> np.ndarray:
    return (wave * (ge2e.TARGET_RMS / np.sqrt(np.mean(wave.astype(np.float64) ** 2)))).astype(
        np.float32)


def test_mel_filters_equal_librosa() -> None:
    import librosa

    _resemblyzer()  # librosa comes with it
    ours = ge2e.slaney_mel_filters(16_000, ge2e.N_FFT, ge2e.N_MELS)
    np.testing.assert_allclose(ours, librosa.filters.mel(sr=16_000, n_fft=ge2e.N_FFT,
                                                         n_mels=ge2e.N_MELS), atol=1e-7)


@pytest.mark.parametrize("n_samples", [25_600, 30_001, 41_000, 91_234])
def test_partial_windows_equal_resemblyzer(n_samples: int) -> None:
    _, slices = _get_encoder().compute_partial_slices(n_samples, ge2e.PARTIALS_PER_SECOND,
                                                      ge2e.MIN_COVERAGE)
    assert ge2e.partial_windows(n_samples) == [s.start for s in slices]


@pytest.mark.parametrize("seconds", [1.7, 3.3, 6.1])
def test_equals_embed_utterance_on_the_same_waveform(seconds: float) -> None:
    wave = at_minus_30_dbfs(voice(seconds, 140.0))
    expected = _get_encoder().embed_utterance(wave)
    with torch.no_grad():
        ours = ge2e.GE2EEncoder(sample_rate=16_000)(torch.from_numpy(wave)[None])[0]
    np.testing.assert_allclose(ours.numpy(), expected, atol=EMBEDDING_ATOL)


def test_equals_embed_utterance_on_real_speech(shared_data: Path) -> None:
    """Resemblyzer's ``preprocess_wav`` (resampling, VAD trimming) on real speech, then both
    encoders on its output set to -30 dBFS, so that the trimming is not part of the check."""
    files = sorted((shared_data / "speech" / "ravdess" / "Actor_02").glob("*.flac"))[:3]
    wave = np.concatenate([sf.read(f, dtype="float32")[0] for f in files])
    prepared = at_minus_30_dbfs(_resemblyzer().preprocess_wav(wave, source_sr=48_000))
    assert prepared.size > ge2e.WINDOW_SAMPLES  # several partial windows, no tiling
    expected = _get_encoder().embed_utterance(prepared)
    with torch.no_grad():
        ours = ge2e.GE2EEncoder(sample_rate=16_000)(torch.from_numpy(prepared)[None])[0]
    np.testing.assert_allclose(ours.numpy(), expected, atol=EMBEDDING_ATOL)


def test_48khz_path_matches_16khz_and_ignores_level() -> None:
    wave16 = voice(3.0, 180.0)
    wave48 = soxr.resample(wave16, 16_000, 48_000).astype(np.float32)
    with torch.no_grad():
        e16 = ge2e.GE2EEncoder(sample_rate=16_000)(torch.from_numpy(wave16)[None])[0]
        enc48 = ge2e.GE2EEncoder(sample_rate=48_000)
        e48 = enc48(torch.from_numpy(wave48)[None])[0]
        quiet = enc48(torch.from_numpy(wave48 * 1e-3)[None])[0]
    assert float(e16 @ e48) > 0.9999  # the decimator against soxr: the same voice
    torch.testing.assert_close(quiet, e48, atol=1e-5, rtol=0)


def test_short_references_are_tiled_to_one_window() -> None:
    short = voice(0.9, 120.0)
    tiled = np.tile(short, 2)[: ge2e.WINDOW_SAMPLES]
    enc = ge2e.GE2EEncoder(sample_rate=16_000)
    with torch.no_grad():
        a = enc(torch.from_numpy(short)[None])
        b = enc(torch.from_numpy(tiled)[None])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_deterministic_and_batch_independent() -> None:
    enc = ge2e.GE2EEncoder(sample_rate=48_000)
    refs = torch.from_numpy(np.stack([voice(2.0, f, 48_000, seed=i)
                                      for i, f in enumerate((110.0, 190.0, 240.0))]))
    with torch.no_grad():
        batch = enc(refs)
        assert torch.equal(batch, enc(refs))
        for i in range(3):
            torch.testing.assert_close(batch[i : i + 1], enc(refs[i : i + 1]), atol=1e-6,
                                       rtol=0)
    # Different voices, different embeddings (unit-norm, non-negative: cosines in [0, 1]).
    assert float(batch[0] @ batch[2]) < 0.99


@pytest.mark.parametrize("config", ["tiny.yaml", "td_speakerbeam_tiny.yaml"])
def test_frozen_out_of_optimizer_and_ema(config: str, tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / config, ["model.speaker_embedding=ge2e",
                                                   f"train.run_dir={tmp_path}"])
    torch.manual_seed(0)
    nets = build_nets(cfg, torch.device("cpu"))
    frozen = dict(nets.generator.pretrained_encoder.named_parameters())
    assert frozen
    assert not any(p.requires_grad for p in frozen.values())
    in_optimizer = {id(p) for g in nets.opt_g.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen.values()}
    before = {k: v.clone() for k, v in frozen.items()}
    # Gradients reach the trained parts through the embedding's projections, none the encoder.
    mix, ref = torch.randn(2, 9_600) * 0.1, torch.randn(2, 14_400) * 0.1
    nets.generator.train()
    nets.generator(mix, ref).square().mean().backward()
    assert all(p.grad is None for p in frozen.values())
    nets.opt_g.step()
    assert all(torch.equal(before[k], p) for k, p in frozen.items())
    assert sum(p.numel() for p in frozen.values()) > ge2e.EMBEDDING_DIM * 4


def test_checkpoint_needs_no_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint carries the encoder's weights: it loads and extracts the same where
    Resemblyzer is not installed; a fresh model without the weights refuses to run."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.speaker_embedding=ge2e"])
    args = model_kwargs(cfg)
    torch.manual_seed(0)
    model = build_model(args).eval()
    path = tmp_path / "model.pt"
    torch.save(checkpoint_payload(model, args), path)
    monkeypatch.setattr(ge2e, "pretrained_state", lambda: None)
    mix, ref = torch.randn(1, 9_600) * 0.1, torch.randn(1, 9_600) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).eval()(mix, ref), model(mix, ref), atol=0,
                                   rtol=0)
        with pytest.raises(RuntimeError, match="install resemblyzer"):
            build_model(args)(mix, ref)


def test_config_refuses_unknown_embedding() -> None:
    with pytest.raises(ConfigError, match=r"model\.speaker_embedding"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.speaker_embedding=xvector"])
    with pytest.raises(ValueError, match="multiple of 16000"):
        ge2e.GE2EEncoder(sample_rate=44_100)
