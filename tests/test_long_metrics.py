"""Metrics on long signals: blockwise sums and spectra equal the whole-signal definitions, the
segment rule of PESQ, STOI, ViSQOL and the recogniser, BSS-Eval's length limit, and the batched
speaker encoder and DNSMOS front end equal what they replace. Blocks and segments are made small
(monkeypatched) where a long signal would only cost time."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pesq as pesq_lib
import pytest
import soundfile as sf
import soxr
import torch
from pystoi import stoi as pystoi_stoi
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

from evaluation import asr, dnsmos, metrics, signal, speaker_similarity, visqol
from losses.separation import si_sdr, ta_suppression_db

SR = 48_000
WB_SR = 16_000
SMALL_BLOCK = 1_000  # samples: many blocks on a short signal


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ravdess(data: Path, actor: int = 3) -> np.ndarray:
    """A neutral RAVDESS sentence, float32 at 48 kHz, shape (T,), about 3.7 s."""
    name = f"03-01-01-01-01-01-{actor:02d}.flac"
    wave, sr = sf.read(data / "speech" / "ravdess" / f"Actor_{actor:02d}" / name, dtype="float32")
    assert sr == SR
    return wave


def tiled(data: Path, seconds: float, actor: int = 3) -> np.ndarray:
    """A RAVDESS sentence repeated to ``seconds``: long speech with pauses, float32."""
    return np.resize(ravdess(data, actor), round(seconds * SR))


def noisy(x: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """``x`` plus white noise of RMS ``level``, float32."""
    rng = np.random.default_rng(seed)
    return (x + level * rng.standard_normal(len(x))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Segments and streaming resampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 999, 60 * SR, 60 * SR + 1, 150 * SR + 7, 3600 * SR])
def test_segment_bounds_invariants(n: int) -> None:
    bounds = signal.segment_bounds(n, SR)
    assert len(bounds) == max(1, math.ceil(n / (signal.LONG_SEGMENT_SECONDS * SR)))
    assert bounds[0][0] == 0
    assert bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # consecutive
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) <= signal.LONG_SEGMENT_SECONDS * SR
    assert max(lengths) - min(lengths) <= 1  # no short tail
    assert signal.segment_bounds(10, 1, max_seconds=4.0) == [(0, 3), (3, 6), (6, 10)]


@pytest.mark.parametrize(("sr", "rate"), [(SR, WB_SR), (44_100, WB_SR), (SR, SR)])
def test_streaming_resample_equals_soxr(monkeypatch: pytest.MonkeyPatch, sr: int,
                                        rate: int) -> None:
    monkeypatch.setattr(signal, "BLOCK_SAMPLES", SMALL_BLOCK)
    x = np.random.default_rng(0).standard_normal(20 * SMALL_BLOCK + 17).astype(np.float32)
    blocks = list(signal.resampled_blocks(x, sr, rate))
    assert len(blocks) == 21
    whole = x.astype(np.float64)
    expected = whole if sr == rate else soxr.resample(whole, sr, rate)
    np.testing.assert_array_equal(np.concatenate(blocks), expected)
    out = signal.resample_into(x, sr, rate, np.float32, after=lambda y: 2 * y)
    np.testing.assert_array_equal(out, (2 * expected).astype(np.float32))
    n_out, rms = signal.level_at(x, sr, rate)
    assert n_out == len(expected)
    assert rms == pytest.approx(np.sqrt(np.mean(expected**2)), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Blockwise SI-SDR and TA suppression
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1_000, 48_007, 7 * SMALL_BLOCK + 3])
@pytest.mark.parametrize("zero_mean", [True, False])
def test_blockwise_si_sdr_matches_references(monkeypatch: pytest.MonkeyPatch, n: int,
                                             zero_mean: bool) -> None:
    monkeypatch.setattr(metrics, "BLOCK_SAMPLES", SMALL_BLOCK)
    rng = np.random.default_rng(n)
    target = (0.3 + rng.standard_normal(n)).astype(np.float32)  # a mean, so zero_mean matters
    for noise in (0.5, 0.05):  # SI-SDR ~6 and ~26 dB
        estimate = (0.7 * target + noise * rng.standard_normal(n) + 0.1).astype(np.float32)
        ours = metrics.si_sdr_db(estimate, target, zero_mean=zero_mean)
        t64 = [torch.from_numpy(x.astype(np.float64)) for x in (estimate, target)]
        # The floors of losses.separation.si_sdr are kept exactly...
        assert ours == pytest.approx(float(si_sdr(t64[0][None], t64[1][None],
                                                  zero_mean=zero_mean)[0]), abs=1e-9)
        # ...and shift torchmetrics' value by ~4e-10 * 10^(SI-SDR / 10) dB.
        reference = float(scale_invariant_signal_distortion_ratio(*t64, zero_mean=zero_mean))
        assert ours == pytest.approx(reference, abs=1e-9 * 10 ** (reference / 10))
    before = estimate.astype(np.float64)
    metrics.si_sdr_db(before, target.astype(np.float64), zero_mean=zero_mean)
    np.testing.assert_array_equal(before, estimate)  # the caller's arrays are not touched


def test_si_sdr_extremes() -> None:
    target = np.random.default_rng(0).standard_normal(5_000)
    assert metrics.si_sdr_db(np.zeros_like(target), target) == pytest.approx(0.0, abs=1e-9)
    assert metrics.si_sdr_db(3.0 * target, target) == pytest.approx(100.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        metrics.si_sdr_db(target[:-1], target)


def test_blockwise_ta_suppression(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "BLOCK_SAMPLES", SMALL_BLOCK)
    mix = np.random.default_rng(1).standard_normal(5 * SMALL_BLOCK + 11).astype(np.float32)
    for estimate in (0.1 * mix, 3.0 * mix, np.zeros_like(mix)):
        expected = ta_suppression_db(torch.from_numpy(estimate.astype(np.float64))[None],
                                     torch.from_numpy(mix.astype(np.float64))[None])
        assert metrics.ta_suppression(estimate, mix) == pytest.approx(float(expected[0]),
                                                                      abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Blockwise LSD
# ---------------------------------------------------------------------------------------------


def _old_band_power(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """The whole-signal implementation this module replaced (kept as the reference)."""
    x = torch.from_numpy(np.asarray(wave, dtype=np.float64))
    window = torch.hann_window(metrics.LSD_N_FFT, dtype=torch.float64)
    spec = torch.stft(x, metrics.LSD_N_FFT, metrics.LSD_HOP, window=window,
                      return_complex=True)  # (F, T)
    freqs = np.fft.rfftfreq(metrics.LSD_N_FFT, 1 / sample_rate)
    band = (freqs >= metrics.LSD_BAND_HZ[0]) & (freqs <= metrics.LSD_BAND_HZ[1])
    return spec.abs().square().numpy()[band].T


def _old_lsd_highband(estimate: np.ndarray, target: np.ndarray, sample_rate: int) -> float:
    """The whole-signal implementation this module replaced (kept as the reference)."""
    ref, est = _old_band_power(target, sample_rate), _old_band_power(estimate, sample_rate)
    if ref.max() <= 0:
        return math.nan
    floor = ref.max() * 10 ** (-metrics.LSD_FLOOR_DB / 10)
    frame = ref.mean(axis=1)
    active = frame > frame.max() * 10 ** (-metrics.LSD_ACTIVE_DB / 10)
    diff = 10 * np.log10((ref[active] + floor) / (est[active] + floor))
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=1))))


@pytest.mark.parametrize("n", [1_025, 1_500, 2_047, 2_048, 3 * 512, 40 * 512 + 333, 24_000])
def test_blockwise_lsd_equals_whole_signal(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(metrics, "LSD_BLOCK_FRAMES", 3)  # blocks of 3 frames
    rng = np.random.default_rng(n)
    target = rng.standard_normal(n).astype(np.float32)
    target[n // 3 : n // 2] *= 1e-5  # quiet frames: the active-frame rule must see them
    estimate = (0.5 * target + 0.01 * rng.standard_normal(n)).astype(np.float32)
    estimate[: n // 4] = 0.0  # zero bins: the floor decides
    ours = metrics.lsd_highband(estimate, target, SR)
    assert ours == pytest.approx(_old_lsd_highband(estimate, target, SR), abs=1e-9)
    whole = metrics._band_power(target, SR)
    np.testing.assert_allclose(whole, _old_band_power(target, SR), rtol=1e-12, atol=0)


def test_lsd_short_and_silent_inputs() -> None:
    x = np.random.default_rng(0).standard_normal(1_024)
    with pytest.raises(ValueError, match="more than 1024 samples"):  # torch.stft refused it too
        metrics.lsd_highband(x, x, SR)
    notes: list[str] = []
    assert math.isnan(metrics.lsd_highband(np.ones(4_000), np.zeros(4_000), SR, notes))
    assert notes == ["lsd_hb: no target energy above 8 kHz"]


# ---------------------------------------------------------------------------------------------
# The segment rule: PESQ, STOI, BSS-Eval, ViSQOL, ASR
# ---------------------------------------------------------------------------------------------


def _segment_mean(scores: list[float], bounds: list[tuple[int, int]]) -> float:
    weights = [stop - start for start, stop in bounds]
    return float(np.average(scores, weights=weights))


@pytest.mark.slow
def test_pesq_on_segments(shared_data: Path) -> None:
    """150 s: three 50 s segments; the middle one's target is silent, so PESQ fails there."""
    target = tiled(shared_data, 150.0)
    estimate = noisy(target, 3e-4)
    bounds = signal.segment_bounds(len(target), SR)
    assert len(bounds) == 3
    target[bounds[1][0] : bounds[1][1]] = 0.0
    notes: list[str] = []
    ours = metrics.pesq(estimate, target, SR, WB_SR, notes)
    kept = [bounds[0], bounds[2]]
    scores = [pesq_lib.pesq(WB_SR, *(soxr.resample(x[a:b].astype(np.float64), SR, WB_SR)
                                     for x in (target, estimate)), "wb") for a, b in kept]
    assert ours == pytest.approx(_segment_mean(scores, kept), abs=1e-12)
    assert notes == ["pesq: NoUtterancesError: No utterances detected (1 of 3 segments)"]


def test_pesq_up_to_60_s_is_the_whole_file_score(shared_data: Path) -> None:
    target = tiled(shared_data, 60.0)  # exactly 60 s: one segment
    estimate = noisy(target, 3e-4)
    deg, ref = (soxr.resample(x.astype(np.float64), SR, WB_SR) for x in (estimate, target))
    assert metrics.pesq(estimate, target, SR, WB_SR, []) == pesq_lib.pesq(WB_SR, ref, deg, "wb")


def click_only(x: np.ndarray, start: int, stop: int) -> None:
    """``x[start:stop]`` silent but for a 2 ms click, in place: pystoi drops every frame more
    than 40 dB below the loudest one, so too few frames are left to score (all-zero samples
    would not do: all frames are then equally loud and all are kept)."""
    x[start:stop] = 0.0
    x[start + 1_000 : start + 1_100] = 0.5


@pytest.mark.parametrize("extended", [False, True])
def test_stoi_on_segments(shared_data: Path, extended: bool) -> None:
    """150 s: three segments, the middle one a click in silence (it does not count)."""
    target = tiled(shared_data, 150.0)
    estimate = noisy(target, 3e-3)
    bounds = signal.segment_bounds(len(target), SR)
    click_only(target, *bounds[1])
    notes: list[str] = []
    ours = metrics.stoi(estimate, target, SR, extended=extended, notes=notes)
    kept = [bounds[0], bounds[2]]
    scores = [pystoi_stoi(target[a:b], estimate[a:b], SR, extended=extended) for a, b in kept]
    assert ours == pytest.approx(_segment_mean(scores, kept), abs=1e-12)
    assert notes == []
    short = target[: 10 * SR]  # one segment: the whole-file value, bit for bit
    assert metrics.stoi(estimate[: 10 * SR], short, SR, extended=extended, notes=[]) == \
        pystoi_stoi(short, estimate[: 10 * SR], SR, extended=extended)


def test_stoi_note_only_when_no_segment_scored() -> None:
    rate = 10_000  # pystoi's own rate: no resampling
    target = np.zeros(130 * rate, dtype=np.float32)
    bounds = signal.segment_bounds(len(target), rate)
    for start, stop in bounds:
        click_only(target, start, stop)
    notes: list[str] = []
    assert math.isnan(metrics.stoi(noisy(target, 1e-3), target, rate, extended=False,
                                   notes=notes))
    assert notes == ["stoi: too little non-silent speech"]


def test_bss_sdr_not_computed_above_60_s() -> None:
    rate = 1_000  # the rule is in seconds; a low rate keeps the test free
    x = np.random.default_rng(0).standard_normal(60 * rate + 1)
    notes: list[str] = []
    assert math.isnan(metrics.bss_sdr(x, x, notes, sample_rate=rate))
    assert len(notes) == 1
    assert notes[0].startswith("sdr: not computed above 60 s")
    y = x[: 60 * rate]  # at the limit it is computed
    assert metrics.bss_sdr(0.5 * y + 0.1 * np.roll(y, 7), y, [], sample_rate=rate) > 10.0


def test_visqol_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake ViSQOL whose score is the segment's length in seconds: the weighted mean."""
    calls: list[int] = []

    class FakeApi:
        def measure_from_arrays(self, reference: np.ndarray, degraded: np.ndarray,
                                sample_rate: int) -> object:
            assert reference.dtype == degraded.dtype == np.float64
            calls.append(len(reference))
            return type("Result", (), {"moslqo": len(reference) / sample_rate})()

    monkeypatch.setattr(visqol, "_get_api", lambda: FakeApi())
    n = 130 * SR + 5
    x = np.zeros(n, dtype=np.float32)
    score = visqol.visqol_audio(x, x, SR)
    bounds = signal.segment_bounds(n, SR)
    assert calls == [b - a for a, b in bounds]
    assert score == pytest.approx(_segment_mean([c / SR for c in calls], bounds), rel=1e-12)
    calls.clear()
    assert visqol.visqol_audio(x[: 60 * SR], x[: 60 * SR], SR) == 60.0
    assert calls == [60 * SR]


def test_asr_decodes_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """130 s: three utterances of 43.3 s at 16 kHz, their words joined by spaces."""
    lengths: list[int] = []

    def fake_decode(pcm: np.ndarray) -> str:
        assert pcm.dtype == np.int16
        lengths.append(len(pcm))
        return "" if len(lengths) == 2 else f"word{len(lengths)}"

    monkeypatch.setattr(asr, "_decode", fake_decode)
    x = noisy(np.zeros(130 * SR, dtype=np.float32), 0.1)
    assert asr.transcribe(x, SR) == "word1 word3"
    assert lengths == [b - a for a, b in signal.segment_bounds(130 * WB_SR, WB_SR)]


def test_transcribe_short_signal_as_before(shared_data: Path) -> None:
    """Up to 60 s: one utterance, the 16-bit signal of the whole-signal float64 pipeline."""
    x = ravdess(shared_data)
    old = soxr.resample(x.astype(np.float64), SR, asr.ASR_SR)
    rms = float(np.sqrt(np.mean(old**2)))
    pcm = np.round(np.clip(old * (asr.TARGET_RMS / rms), -1.0, 1.0) * asr.INT16_SCALE)
    assert asr.transcribe(x, SR) == asr._decode(pcm.astype(np.int16))


# ---------------------------------------------------------------------------------------------
# Batched speaker encoder and DNSMOS front end
# ---------------------------------------------------------------------------------------------


def test_trim_long_silences_equals_resemblyzer(shared_data: Path) -> None:
    x = soxr.resample(tiled(shared_data, 20.0), SR, WB_SR)
    x *= speaker_similarity.TARGET_RMS / np.sqrt(np.mean(x**2))  # as _prepare sets it
    ours = speaker_similarity._trim_long_silences(x)
    np.testing.assert_array_equal(ours, speaker_similarity._resemblyzer().trim_long_silences(x))
    assert 0 < len(ours) < len(x)  # the pauses between the repetitions were cut


def test_batched_ge2e_equals_embed_utterance(monkeypatch: pytest.MonkeyPatch,
                                             shared_data: Path) -> None:
    x = speaker_similarity._prepare(tiled(shared_data, 20.0), SR)
    assert x is not None
    theirs = speaker_similarity._get_encoder().embed_utterance(x)
    monkeypatch.setattr(speaker_similarity, "PARTIALS_PER_BATCH", 4)  # several batches
    ours = speaker_similarity._embed(x)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # A signal shorter than one partial window: one zero-padded window.
    short = x[: WB_SR // 2]
    np.testing.assert_allclose(speaker_similarity._embed(short),
                               speaker_similarity._get_encoder().embed_utterance(short),
                               atol=1e-5)


def test_dnsmos_front_end_as_before(monkeypatch: pytest.MonkeyPatch,
                                    shared_data: Path) -> None:
    """The blockwise level, clip and resampling give the float64 whole-signal pipeline's windows
    and scores."""
    monkeypatch.setattr(signal, "BLOCK_SAMPLES", 10_000)
    wave = tiled(shared_data, 10.0)
    level = -8.0  # loud enough that both clips act
    x = wave.astype(np.float64)
    x = x * (10.0 ** (level / 20.0) / float(np.sqrt(np.mean(x**2))))
    assert np.abs(x).max() > 1.0
    old = np.clip(soxr.resample(np.clip(x, -1.0, 1.0), SR, dnsmos.DNSMOS_SR), -1.0, 1.0)
    new = dnsmos._at_16k(wave, SR, level)
    np.testing.assert_allclose(new, old.astype(np.float32), rtol=0, atol=1e-7)
    old_windows = np.stack(list(dnsmos._windows(old))).astype(np.float32)
    session = dnsmos._get_session(False)
    raw = np.stack([session.run(None, {"input_1": w[None]})[0][0] for w in old_windows])
    expected = {name: float(np.mean(np.polyval(dnsmos._POLYFIT[False][name],
                                                raw[:, k].astype(np.float64))))
                for k, name in enumerate(dnsmos.SCORES)}
    assert dnsmos.dnsmos(wave, SR, level_dbfs=level) == pytest.approx(expected, abs=1e-6)
