"""Audio I/O and STFT: perfect reconstruction, exact lengths, clear errors, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from dsp.audio import SAMPLE_RATE, AudioError, load_audio, save_audio
from dsp.stft import STFT


@pytest.mark.parametrize("length", [1, 479, 4801, 48_001, 192_001])
def test_stft_istft_reconstruction(length: int) -> None:
    stft = STFT()
    wave = torch.randn(2, length, generator=torch.Generator().manual_seed(length))
    spec = stft(wave)
    assert spec.shape == (2, 1025, stft.n_frames(length))
    back = stft.inverse(spec, length)
    assert back.shape == wave.shape
    assert (back - wave).abs().max().item() < 1e-5


def test_stft_runs_in_float32_under_autocast() -> None:
    stft = STFT()
    wave = torch.randn(1, 4800)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spec = stft(wave)
    assert spec.dtype == torch.complex64


def test_load_audio_downmixes_and_resamples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, (44_100, 2)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44_100, subtype="FLOAT")
    wave = load_audio(path)
    expected = soxr.resample(stereo.mean(axis=1), 44_100, SAMPLE_RATE)
    assert wave.dtype == np.float32
    assert wave.shape == expected.shape == (SAMPLE_RATE,)
    np.testing.assert_allclose(wave, expected, atol=1e-6)
    native = load_audio(path, sr=None)
    assert native.shape == (44_100,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("missing", "no such file"),
        ("garbage", "unreadable"),
        ("empty", "empty"),
        ("nan", "non-finite"),
    ],
)
def test_load_audio_errors_name_file_and_problem(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / f"{content}.wav"
    if content == "garbage":
        path.write_bytes(b"not audio at all" * 10)
    elif content == "empty":
        sf.write(path, np.zeros((0,), np.float32), SAMPLE_RATE)
    elif content == "nan":
        sf.write(path, np.array([0.1, np.nan, 0.2], np.float32), SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=message) as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_save_audio_is_atomic_and_round_trips(tmp_path: Path) -> None:
    wave = np.linspace(-1.5, 1.5, 4800, dtype=np.float32)  # beyond full scale on purpose
    path = tmp_path / "sub" / "out.wav"
    save_audio(path, torch.from_numpy(wave))
    np.testing.assert_array_equal(load_audio(path), wave)
    assert [p.name for p in path.parent.iterdir()] == ["out.wav"]  # no temporary left over
    with pytest.raises(AudioError, match="unsupported"):
        save_audio(tmp_path / "out.xyz", wave)
    assert not list(tmp_path.glob("*.xyz*"))
