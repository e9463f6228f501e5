"""models/pcs.py: PCS400's gains at 48 kHz, exact lengths, the 16 kHz behaviour kept at 48 kHz,
quiet estimates kept quiet, streaming equal to one pass, and inference.py --pcs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from dsp.audio import SAMPLE_RATE, load_audio
from extraction.pcs import pcs, pcs_gains, pcs_stream, stft_sizes
from inference import main
from tests.test_inference import tiny_checkpoint

RAVDESS = "speech/ravdess"
PCS400_RATE = 16_000
BIN_HZ = 40.0  # PCS400's bin spacing, kept at every rate
# The largest PCS400 gain: a bin far below the log1p knee is multiplied by at most this.
MAX_GAIN = 1.4


def original_pcs400() -> np.ndarray:
    """The table as SEMamba's models/pcs400.py builds it (RoyChao19477/SEMamba, MIT)."""
    table = np.ones(201)
    table[0:3] = 1
    table[3:5] = 1.070175439
    table[5:8] = 1.182456140
    table[8:10] = 1.287719298
    table[10:110] = 1.4
    table[110:130] = 1.322807018
    table[130:160] = 1.238596491
    table[160:190] = 1.161403509
    table[190:202] = 1.077192982
    return table


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.fixture(scope="module")
def speech(shared_data: Path) -> np.ndarray:
    """A RAVDESS utterance at 48 kHz (about 3.5 s)."""
    return load_audio(sorted((shared_data / RAVDESS / "Actor_01").glob("*.flac"))[0])


def test_gains_are_pcs400_by_frequency_and_one_above_8_khz() -> None:
    assert stft_sizes(48_000) == (1200, 300)
    assert stft_sizes(PCS400_RATE) == (400, 100)
    gains = pcs_gains(48_000)
    assert gains.shape == (601,)
    table = original_pcs400()
    # Bin k is at k * 40 Hz at both rates: the original's bin k gives the 48 kHz bin k.
    assert 48_000 / 1200 == PCS400_RATE / 400 == BIN_HZ
    np.testing.assert_allclose(gains[:201], table, rtol=1e-7)
    assert gains[0] == gains[2] == 1.0  # below 120 Hz
    assert gains[3] == pytest.approx(1.070175439)  # 120 Hz
    assert gains[int(1000 / BIN_HZ)] == pytest.approx(1.4)  # 1 kHz
    assert gains[int(4800 / BIN_HZ)] == pytest.approx(1.322807018)  # 4.8 kHz
    assert gains[200] == pytest.approx(1.077192982)  # 8 kHz, the original's Nyquist bin
    assert (gains[201:] == 1.0).all()  # above 8 kHz
    np.testing.assert_allclose(pcs_gains(PCS400_RATE), table, rtol=1e-7)
    with pytest.raises(ValueError, match="multiple of 160 Hz"):
        stft_sizes(44_100)


@pytest.mark.parametrize("n", [1, 7, 301, 48_001])
def test_length_dtype_and_type_are_kept(n: int) -> None:
    rng = np.random.default_rng(n)
    wave = (0.1 * rng.standard_normal(n)).astype(np.float32)
    out = pcs(wave)
    assert isinstance(out, np.ndarray)
    assert out.shape == (n,)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    out64 = pcs(wave.astype(np.float64))
    assert out64.dtype == np.float64
    batch = torch.from_numpy(np.stack([wave, 2 * wave]))  # (2, n)
    out_t = pcs(batch)
    assert isinstance(out_t, torch.Tensor)
    assert out_t.shape == (2, n)
    torch.testing.assert_close(out_t[0], torch.from_numpy(out), rtol=1e-4, atol=1e-6)


def test_silence_stays_silent_and_quiet_speech_quiet(speech: np.ndarray) -> None:
    assert not pcs(np.zeros(4800, dtype=np.float32)).any()
    # A target-absent estimate: the target's voice leaking through at -60 dBFS.
    quiet = speech * (10 ** (-60 / 20) / rms(speech))
    ratio = rms(pcs(quiet)) / rms(quiet)
    # Quiet bins gain at most 1.4: no normalisation to full scale (the original's peak
    # normalisation would have multiplied this estimate by about 300).
    assert 1.0 < ratio < MAX_GAIN
    assert np.abs(pcs(quiet)).max() < 0.1  # far from full scale


def test_48_khz_stretch_matches_16_khz_stretch(speech: np.ndarray) -> None:
    """The same sound stretched at 48 kHz and at 16 kHz: equal below 8 kHz (the magnitude
    scaling keeps the level-dependent log1p at PCS400's level)."""
    for level_db in (-40.0, -15.0):
        wave = speech * (10 ** (level_db / 20) / rms(speech))
        wide = soxr.resample(pcs(wave), SAMPLE_RATE, PCS400_RATE)
        narrow = pcs(soxr.resample(wave, SAMPLE_RATE, PCS400_RATE), sr=PCS400_RATE)
        err = rms(wide - narrow) / rms(narrow)
        change = rms(narrow - soxr.resample(wave, SAMPLE_RATE, PCS400_RATE)) / rms(narrow)
        assert err < 0.01 * change, (level_db, err, change)  # measured: below 0.001


@pytest.mark.parametrize("sizes", [[48_000], [1_000, 50_000, 7], [299, 301] * 40, [5] * 100])
def test_stream_equals_one_pass(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    wave = (0.2 * rng.standard_normal(sum(sizes))).astype(np.float32)
    edges = np.cumsum([0, *sizes])
    parts = list(pcs_stream(wave[a:b] for a, b in itertools.pairwise(edges)))
    streamed = np.concatenate(parts)
    assert streamed.shape == wave.shape
    np.testing.assert_allclose(streamed, pcs(wave), rtol=1e-4, atol=1e-6)


def test_inference_pcs_changes_the_output_not_its_length(
    shared_data: Path, tmp_path: Path
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    files = sorted((shared_data / RAVDESS / "Actor_04").glob("*.flac"))
    target, other = load_audio(files[0]), load_audio(files[1])
    n = round(2.3 * SAMPLE_RATE) + 1  # odd, and longer than one 1 s window
    mix = target[:n] + 0.5 * other[:n]
    sf.write(tmp_path / "mix.wav", mix, SAMPLE_RATE, subtype="FLOAT")
    args = ["--ckpt", str(ckpt), "--mix", str(tmp_path / "mix.wav"), "--ref", str(files[2]),
            "--window", "1", "--overlap", "0.25"]
    assert main([*args, "-o", str(tmp_path / "plain.wav")]) == 0
    assert main([*args, "-o", str(tmp_path / "pcs.wav"), "--pcs"]) == 0
    plain, sr = sf.read(tmp_path / "plain.wav", dtype="float32")
    stretched, sr_pcs = sf.read(tmp_path / "pcs.wav", dtype="float32")
    assert sr == sr_pcs == SAMPLE_RATE
    assert plain.shape == stretched.shape == (n,)
    assert not np.allclose(plain, stretched, atol=1e-4)
    # --pcs is PCS of the whole plain output, streamed.
    np.testing.assert_allclose(stretched, pcs(plain), rtol=1e-3, atol=1e-5)
