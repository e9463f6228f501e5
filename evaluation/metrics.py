"""One function per metric, the columns they fill and the settings they run with.

Every signal is mono float at 48 kHz unless a function says otherwise, and may be a read-only
memory map of an hour of audio: every function works in blocks or segments and states what it
does with a long signal. A metric that does not apply to a sample (a TP metric of a TA sample,
a WER without transcript) is NaN, as is one that fails; ``notes`` then says why. Metrics come in
groups that ``--metrics`` turns on:

* ``core``: SI-SDR(i), PESQ, STOI/eSTOI, the 8-24 kHz log-spectral distance, speaker confusion
  (when the interferers are known), TA suppression, and BSS-Eval SDR with ``--sdr``;
* ``similarity``: cosine similarity of Resemblyzer GE2E speaker embeddings (16 kHz);
* ``dnsmos``: DNSMOS P.835 and personalised DNSMOS (16 kHz, ``speechmos``), no target needed;
* ``wer``: word error rate of PocketSphinx transcripts (16 kHz), on samples with a transcript;
* ``visqol``: ViSQOL v3 in audio mode at 48 kHz (``visqol-python``), full band, needs a target.

``evaluation/scoring.py`` computes a sample's row from these functions.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pesq as pesq_lib
import soxr
import torch
from pystoi import stoi as pystoi_stoi

from config import EVAL_METRIC_GROUPS
from dsp.audio import SAMPLE_RATE
from evaluation.signal import BLOCK_SAMPLES, segment_bounds
from evaluation.sources import TA, TP, UNKNOWN
from losses.separation import DB_PER_LOG10, ENERGY_EPS, MAX_SUPPRESSION_DB, SI_SDR_REL_EPS

WB_PESQ_SR = 16_000  # wide-band PESQ (ITU-T P.862.2) is defined at 16 kHz
PESQ_MODES = {WB_PESQ_SR: "wb", 8_000: "nb"}  # narrow-band P.862 at 8 kHz
STREAM_PREFIX = "stream_"
# DNSMOS depends on the level (RAVDESS at its own -48 dBFS scores 0.5 lower than 20 dB louder)
# and an estimate's gain is arbitrary: every signal is scored at the DNS challenge's -25 dBFS.
DNSMOS_LEVEL_DBFS = -25.0

# The log-spectral distance: 2048-point Hann frames every 512 samples at 48 kHz (23.4 Hz bins),
# the 8-24 kHz band that wide-band PESQ and STOI never see, frames where the target's band is
# within LSD_ACTIVE_DB of its loudest frame (silence has no spectrum to match).
LSD_N_FFT, LSD_HOP = 2048, 512
LSD_BAND_HZ = (8_000.0, 24_000.0)
LSD_ACTIVE_DB = 60.0
# Power floor before the log, relative to the target's loudest band bin: differences below it
# (an estimate that is exactly zero in a bin) count as at most this many dB.
LSD_FLOOR_DB = 120.0
# Metrics a sample rate cannot give: unit -> (its group, the lowest rate it needs, why). Below
# that rate the unit does not run and its columns are left out, and the report says why (8 kHz
# standard sets: no 8-24 kHz band, and the 16 kHz models would score an upsampled narrow band).
MIN_RATE_OF_UNIT = {
    "lsd": ("core", round(2 * LSD_BAND_HZ[1]), "its 8-24 kHz band needs a 48 kHz signal"),
    "similarity": ("similarity", 16_000, "Resemblyzer's GE2E is a 16 kHz model"),
    "dnsmos": ("dnsmos", 16_000, "DNSMOS is a 16 kHz model"),
    "visqol": ("visqol", 48_000, "ViSQOL's audio mode is defined at 48 kHz"),
}
# The columns each of those units fills.
COLUMNS_OF_UNIT = {
    "lsd": ("lsd_hb", "lsd_hb_mix"),
    "similarity": ("spk_sim_ref", "spk_sim_target", "spk_sim_mix"),
    "dnsmos": ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "pdnsmos_sig", "pdnsmos_bak",
               "pdnsmos_ovrl", "dnsmos_ovrl_mix", "pdnsmos_ovrl_mix"),
    "visqol": ("visqol",),
}
REF_SENS_FLOOR_DB = -100.0  # reference sensitivity of two identical outputs


@dataclass(frozen=True)
class Column:
    """A per-sample column: its report label, number format, the conditions it applies to and
    its group. ``estimate``: it depends on the estimate (computed again for ``stream_``)."""

    label: str
    fmt: str
    conditions: tuple[str, ...]
    group: str
    estimate: bool = True


COLUMNS: dict[str, Column] = {
    "si_sdr": Column("SI-SDR (dB)", ".2f", (TP,), "core"),
    "si_sdri": Column("SI-SDRi (dB)", "+.2f", (TP,), "core"),
    "sdr": Column("SDR (dB)", ".2f", (TP,), "core"),
    "pesq": Column("PESQ", ".2f", (TP,), "core"),
    "stoi": Column("STOI", ".3f", (TP,), "core"),
    "estoi": Column("eSTOI", ".3f", (TP,), "core"),
    "lsd_hb": Column("LSD 8-24 kHz (dB)", ".2f", (TP,), "core"),
    "si_sdr_interferer": Column("SI-SDR to interferer (dB)", ".2f", (TP,), "core"),
    "confusion": Column("speaker confusion", ".3f", (TP,), "core"),
    # Run once more with another sample's reference (samples whose interferers are known):
    # how far the two outputs differ, and the SI-SDRi of the wrong-reference output.
    "ref_sens_db": Column("reference sensitivity (dB)", "+.1f", (TP,), "core", estimate=False),
    "si_sdri_wrong_ref": Column("SI-SDRi wrong ref (dB)", "+.2f", (TP,), "core",
                                estimate=False),
    "ta_suppression_db": Column("TA suppression (dB)", ".1f", (TA,), "core"),
    "spk_sim_ref": Column("similarity est-ref", ".3f", (TP, TA, UNKNOWN), "similarity"),
    "spk_sim_target": Column("similarity est-target", ".3f", (TP,), "similarity"),
    "dnsmos_sig": Column("DNSMOS SIG", ".2f", (TP, TA, UNKNOWN), "dnsmos"),
    "dnsmos_bak": Column("DNSMOS BAK", ".2f", (TP, TA, UNKNOWN), "dnsmos"),
    "dnsmos_ovrl": Column("DNSMOS OVRL", ".2f", (TP, TA, UNKNOWN), "dnsmos"),
    "pdnsmos_sig": Column("pDNSMOS SIG", ".2f", (TP, TA, UNKNOWN), "dnsmos"),
    "pdnsmos_bak": Column("pDNSMOS BAK", ".2f", (TP, TA, UNKNOWN), "dnsmos"),
    "pdnsmos_ovrl": Column("pDNSMOS OVRL", ".2f", (TP, TA, UNKNOWN), "dnsmos"),
    "wer": Column("WER", ".3f", (TP, UNKNOWN), "wer"),
    "visqol": Column("ViSQOL (audio, 48 kHz)", ".2f", (TP,), "visqol"),
    # Of the mixture or the target alone: what extraction starts from.
    "si_sdr_mix": Column("SI-SDR mixture (dB)", ".2f", (TP,), "core", estimate=False),
    "lsd_hb_mix": Column("LSD 8-24 kHz mixture (dB)", ".2f", (TP,), "core", estimate=False),
    "spk_sim_mix": Column("similarity mix-ref", ".3f", (TP, TA, UNKNOWN), "similarity",
                          estimate=False),
    "dnsmos_ovrl_mix": Column("DNSMOS OVRL mixture", ".2f", (TP, TA, UNKNOWN), "dnsmos",
                              estimate=False),
    "pdnsmos_ovrl_mix": Column("pDNSMOS OVRL mixture", ".2f", (TP, TA, UNKNOWN), "dnsmos",
                               estimate=False),
    "wer_mix": Column("WER mixture", ".3f", (TP, UNKNOWN), "wer", estimate=False),
    "wer_target": Column("WER target", ".3f", (TP,), "wer", estimate=False),
    "words": Column("words", "d", (TP, UNKNOWN), "wer", estimate=False),
}


@dataclass(frozen=True)
class MetricSettings:
    """How the metrics run; the same for every sample of an evaluation."""

    groups: tuple[str, ...] = EVAL_METRIC_GROUPS
    pesq_sr: int = WB_PESQ_SR
    sdr: bool = False
    zero_mean: bool = True  # SI-SDR convention: ours (zero-mean) or torchmetrics' default (not)
    sample_rate: int = SAMPLE_RATE
    stream: bool = False  # the run also makes a chunked estimate

    def not_applicable(self) -> dict[str, str]:
        """The units of the chosen groups that ``sample_rate`` cannot give, and why."""
        return {unit: f"not applicable at {self.sample_rate / 1000:g} kHz: {why}"
                for unit, (group, rate, why) in MIN_RATE_OF_UNIT.items()
                if self.sample_rate < rate and group in self.groups}

    def columns(self) -> list[str]:
        """The per-sample columns of this evaluation, in report order."""
        left_out = {c for unit in self.not_applicable() for c in COLUMNS_OF_UNIT[unit]}
        names = [n for n, c in COLUMNS.items() if c.group in self.groups
                 and (n != "sdr" or self.sdr) and n not in left_out]
        stream = [STREAM_PREFIX + n for n in names if COLUMNS[n].estimate] if self.stream else []
        return names + stream


def column(name: str) -> Column:
    """The column of ``name``, ``stream_`` names included."""
    return COLUMNS[name.removeprefix(STREAM_PREFIX)]


# ---------------------------------------------------------------------------------------------
# Long signals
# ---------------------------------------------------------------------------------------------

# Inputs may be hour-long np.memmap float32 arrays (1.4 GB as one float64 copy at 48 kHz): the
# sums below run over BLOCK_SAMPLES-sample float64 blocks, the STFT of the LSD over
# LSD_BLOCK_FRAMES frames at a time ((1025, 256) complex128: 4 MiB), PESQ and STOI see
# segments of at most LONG_SEGMENT_SECONDS (``segment_bounds``), and BSS-Eval stops at
# SDR_MAX_SECONDS.
LSD_BLOCK_FRAMES = 256
# Measured with mir_eval 0.8.2 on speech: bss_eval_sources holds ~11 MB per second of signal
# (0.65 GB above the process at 60 s, so ~6.5 GB at 10 min), for one 512-tap projection of
# the whole signal that has no segment-wise equivalent.
SDR_MAX_SECONDS = 60.0


def _float64_blocks(*waves: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Aligned float64 copies of ``BLOCK_SAMPLES`` samples of equal-length signals (copies:
    the callers subtract means in place).

    Shape:
        waves: each (N,) -> tuples of (<= BLOCK_SAMPLES,)
    """
    shapes = {np.shape(w) for w in waves}
    if len(shapes) != 1 or np.ndim(waves[0]) != 1:
        raise ValueError(f"expected mono signals of one shape (N,), got {sorted(shapes)}")
    for start in range(0, len(waves[0]), BLOCK_SAMPLES):
        yield tuple(w[start : start + BLOCK_SAMPLES].astype(np.float64) for w in waves)


def _weighted_mean(values: list[float], weights: list[int]) -> float:
    """``sum w v / sum w``, NaN for no values. The weights are normalised first, so one value
    comes back bit for bit (a signal of one segment keeps its whole-signal score)."""
    if not values:
        return math.nan
    total = sum(weights)
    return float(sum(v * (w / total) for v, w in zip(values, weights, strict=True)))


def _segment_note(reason: str, count: int, n_segments: int) -> str:
    """A failure reason, with how many segments it hit when there are several."""
    return reason if n_segments == 1 else f"{reason} ({count} of {n_segments} segments)"


# ---------------------------------------------------------------------------------------------
# Intrusive metrics (need the target)
# ---------------------------------------------------------------------------------------------


def si_sdr_db(estimate: np.ndarray, target: np.ndarray, *, zero_mean: bool = True) -> float:
    """Scale-invariant SDR (Le Roux et al., ICASSP 2019) in dB, in float64:
    ``10 log10(|a s|^2 / |a s - e|^2)`` with ``a = <e, s> / |s|^2``. ``zero_mean`` removes the
    means first (this repository's convention, as asteroid and ESPnet); without it the value is
    torchmetrics' default ``scale_invariant_signal_distortion_ratio(zero_mean=False)``. Any
    rate, the same for both. The floors are those of ``losses.separation.si_sdr``
    (``SI_SDR_REL_EPS |e|^2 + ENERGY_EPS`` on both energies), so the value equals it to rounding
    and torchmetrics' to that floor's shift (~4e-10 * 10^(SI-SDR / 10) dB: 4e-9 dB at 10 dB).

    Long signals: exact, in ``BLOCK_SAMPLES`` float64 blocks and three passes (the means, then
    ``<e, s>``, ``|s|^2`` and ``|e|^2``, then ``|a s|^2`` and ``|a s - e|^2`` summed directly
    rather than by the closed form ``|e|^2 - <e, s>^2 / |s|^2``, which cancels catastrophically
    at high SI-SDR); memory is a few blocks whatever the length.

    Shape:
        estimate (N,), target (N,)
    """
    n = len(target)
    mean_e = mean_s = 0.0
    if zero_mean:
        for e, s in _float64_blocks(estimate, target):
            mean_e, mean_s = mean_e + e.sum(), mean_s + s.sum()
        mean_e, mean_s = mean_e / n, mean_s / n
    dot = energy_s = energy_e = 0.0
    for e, s in _float64_blocks(estimate, target):
        e -= mean_e
        s -= mean_s
        dot, energy_s, energy_e = dot + e @ s, energy_s + s @ s, energy_e + e @ e
    alpha = dot / (energy_s + ENERGY_EPS)
    projection = distortion = 0.0
    for e, s in _float64_blocks(estimate, target):
        e -= mean_e
        s -= mean_s
        s *= alpha  # the projection
        e -= s  # the distortion
        projection, distortion = projection + s @ s, distortion + e @ e
    eps = SI_SDR_REL_EPS * energy_e + ENERGY_EPS
    return DB_PER_LOG10 * (math.log10(projection + eps) - math.log10(distortion + eps))


def resample_for_pesq(wave: np.ndarray, sample_rate: int, pesq_sr: int) -> np.ndarray:
    """The signal PESQ sees: ``wave`` resampled to ``pesq_sr`` with soxr (float64). A
    whole-signal copy: ``pesq`` calls it on one segment at a time."""
    wave = np.asarray(wave, dtype=np.float64)
    return wave if sample_rate == pesq_sr else soxr.resample(wave, sample_rate, pesq_sr)


def _pesq_reason(err: Exception) -> str:
    """The note of a PESQ failure: its class and message."""
    detail = err.args[0] if err.args else ""
    if isinstance(detail, bytes):  # the C extension passes its message as bytes
        detail = detail.decode(errors="replace")
    return f"pesq: {type(err).__name__}: {detail}".rstrip(": ")


def pesq(estimate: np.ndarray, target: np.ndarray, sample_rate: int, pesq_sr: int,
         notes: list[str]) -> float:
    """PESQ (ITU-T P.862.2 wide-band at 16 kHz, or P.862 narrow-band at 8 kHz) of the estimate
    against the target, both resampled with soxr to ``pesq_sr``; a PESQ failure (no utterance
    found, too short) gives NaN and its reason in ``notes``.

    Long signals: scored on the ``segment_bounds`` segments (consecutive, equal, at most
    ``LONG_SEGMENT_SECONDS``), each resampled alone; the value is the mean of the segment
    scores weighted by segment length, over the segments that scored. A failure reason is
    noted once with how many segments it hit (``pesq: NoUtterancesError: ... (2 of 5
    segments)``); NaN when no segment scored. A signal of up to 60 s is one segment and gets
    the whole-file score. On a longer one the value is not one whole-file P.862 score (its
    time alignment and averaging span the file), but the ``pesq`` package cannot compute that
    safely: its C code segfaults or aborts on long input (ludlows/PESQ issues #15, #18; here at
    ~300 s).
    """
    bounds = segment_bounds(len(target), sample_rate)
    scores, weights, failures = [], [], Counter[str]()
    for start, stop in bounds:
        deg = resample_for_pesq(estimate[start:stop], sample_rate, pesq_sr)
        ref = resample_for_pesq(target[start:stop], sample_rate, pesq_sr)
        try:
            scores.append(float(pesq_lib.pesq(pesq_sr, ref, deg, PESQ_MODES[pesq_sr])))
            weights.append(stop - start)
        except pesq_lib.PesqError as err:
            failures[_pesq_reason(err)] += 1
    notes.extend(_segment_note(reason, k, len(bounds)) for reason, k in failures.items())
    return _weighted_mean(scores, weights)


def stoi(estimate: np.ndarray, target: np.ndarray, sample_rate: int, *, extended: bool,
         notes: list[str]) -> float:
    """STOI (Taal et al., 2011) or extended STOI (Jensen & Taal, 2016) from pystoi, called with
    the signals at their own rate (pystoi resamples both to its 10 kHz internally, so the value
    is the reference implementation's). NaN when too little non-silent speech is left.

    Long signals: the ``segment_bounds`` rule of ``pesq``, one pystoi call per segment of at
    most 60 s, the mean weighted by segment length over the segments that scored (a segment
    with too little speech does not count; the note comes only when none scored). Up to 60 s
    the value is the whole-file one. Beyond, it differs from one whole-file call: pystoi drops
    the frames more than 40 dB below the loudest frame *of the signal it is given*, so silence
    removal is relative to each segment's loudest frame, and the 30-frame windows do not span
    segment boundaries. Why: a whole-file call holds every 30-frame window as a copy (~30
    copies of each frame of 15 band envelopes) plus its normalised copies, measured here on
    tiled speech at 0.46 GB (STOI) and 0.67 GB (eSTOI) above the process for 10 min, so ~3
    and ~4 GB for 60 min, and more for speech with fewer pauses.
    """
    name = "estoi" if extended else "stoi"
    scores, weights = [], []
    for start, stop in segment_bounds(len(target), sample_rate):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = float(pystoi_stoi(target[start:stop], estimate[start:stop], sample_rate,
                                      extended=extended))
        # pystoi warns and returns 1e-5 when too little non-silent speech is left: not a score.
        if not any(issubclass(w.category, RuntimeWarning) for w in caught):
            scores.append(value)
            weights.append(stop - start)
    if not scores:
        notes.append(f"{name}: too little non-silent speech")
    return _weighted_mean(scores, weights)


def bss_sdr(estimate: np.ndarray, target: np.ndarray, notes: list[str], *,
            sample_rate: int = SAMPLE_RATE) -> float:
    """SDR of BSS-Eval v3 (Vincent et al., 2006; ``mir_eval.separation.bss_eval_sources``):
    distortions up to a 512-tap filter are allowed.

    Long signals: not computed above ``SDR_MAX_SECONDS`` (NaN and a note): the projection
    onto the target's 512 delayed copies is one whole-signal computation that holds ~11 MB
    per second of signal (0.65 GB at 60 s), and a segment-wise value would be another metric.
    """
    if len(target) > SDR_MAX_SECONDS * sample_rate:
        notes.append(f"sdr: not computed above {SDR_MAX_SECONDS:g} s (BSS-Eval's filter "
                     "projection holds ~11 MB per second of signal)")
        return math.nan
    import mir_eval  # imported here: only --sdr needs it, and it is slow to import
    try:
        with warnings.catch_warnings():
            # mir_eval 0.8 marks its separation module deprecated; the numbers are BSS-Eval v3.
            warnings.simplefilter("ignore", FutureWarning)
            sdr, _, _, _ = mir_eval.separation.bss_eval_sources(
                np.asarray(target, dtype=np.float64)[None],
                np.asarray(estimate, dtype=np.float64)[None],
            )
    except ValueError as err:  # e.g. an all-zero estimate
        notes.append(f"sdr: {err}")
        return math.nan
    return float(sdr[0])


def _reflected(wave: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``wave[start:stop]`` in float64, where indices before 0 or from N on read the signal
    reflected about its first or last sample (``torch.stft``'s centred ``reflect`` padding;
    like it, this needs N to exceed the padding, ``-start`` and ``stop - N``)."""
    n = len(wave)
    parts = [np.asarray(wave[max(start, 0) : min(stop, n)], dtype=np.float64)]
    if start < 0:  # x[-start], ..., x[1]
        parts.insert(0, np.asarray(wave[1 : 1 - start], dtype=np.float64)[::-1])
    if stop > n:  # x[N - 2], ..., x[2N - 1 - stop]
        parts.append(np.asarray(wave[2 * n - 1 - stop : n - 1], dtype=np.float64)[::-1])
    return np.concatenate(parts)


def _lsd_frames(n: int) -> int:
    """Frames of the centred ``LSD_N_FFT``/``LSD_HOP`` STFT of ``n`` samples."""
    return 1 + n // LSD_HOP


def _band_power(wave: np.ndarray, sample_rate: int, *,
                frames: tuple[int, int] | None = None) -> np.ndarray:
    """The STFT power in ``LSD_BAND_HZ`` of frames ``[t0, t1)`` (all by default) of the
    whole-signal ``torch.stft(center=True)`` (reflect padding), computed from only the samples
    those frames see.

    Shape:
        wave (N,) -> (t1 - t0, F_band)
    """
    half = LSD_N_FFT // 2
    if len(wave) <= half:
        raise ValueError(f"the LSD's centred STFT needs more than {half} samples "
                         f"(reflect padding), got {len(wave)}")
    t0, t1 = frames if frames is not None else (0, _lsd_frames(len(wave)))
    chunk = torch.from_numpy(_reflected(wave, t0 * LSD_HOP - half, (t1 - 1) * LSD_HOP + half))
    window = torch.hann_window(LSD_N_FFT, dtype=torch.float64)
    spec = torch.stft(chunk, LSD_N_FFT, LSD_HOP, window=window, center=False,
                      return_complex=True)  # (F, t1 - t0)
    freqs = np.fft.rfftfreq(LSD_N_FFT, 1 / sample_rate)
    band = (freqs >= LSD_BAND_HZ[0]) & (freqs <= LSD_BAND_HZ[1])
    return spec.abs().square().numpy()[band].T


def lsd_highband(estimate: np.ndarray, target: np.ndarray, sample_rate: int = SAMPLE_RATE,
                 notes: list[str] | None = None) -> float:
    """Log-spectral distance on 8-24 kHz, in dB (the band 16 kHz PESQ and STOI never see):
    ``mean_t sqrt(mean_f (10 log10 P_target(t, f) - 10 log10 P_est(t, f))^2)`` over the
    ``LSD_N_FFT``-point frames whose target band power is within ``LSD_ACTIVE_DB`` of the
    loudest one, both powers floored ``LSD_FLOOR_DB`` below the target's loudest bin. The
    bandwidth-extension literature's unitless LSD (log10 power, no factor 10) is this value
    / 10. Not scale-invariant: a gain g reads 20 log10 g. Needs 48 kHz signals (a band up to
    24 kHz) of more than ``LSD_N_FFT / 2`` samples; NaN when the target has no energy in the
    band.

    Long signals: the same value as on the whole signal (to rounding), computed over
    ``LSD_BLOCK_FRAMES`` frames at a time in two passes: the target's per-frame band power and
    loudest bin (the active frames and the floor stay relative to the whole signal), then the
    distance of the active frames. Memory: one block's spectra plus 8 bytes per frame.

    Shape:
        estimate (N,), target (N,)
    """
    if sample_rate < 2 * LSD_BAND_HZ[1]:
        raise ValueError(f"lsd_highband needs 48 kHz signals, got {sample_rate} Hz")
    n_frames = _lsd_frames(len(target))
    blocks = [(t, min(t + LSD_BLOCK_FRAMES, n_frames))
              for t in range(0, n_frames, LSD_BLOCK_FRAMES)]
    frame_power = np.empty(n_frames)  # (T,) the target's mean band power per frame
    peak = 0.0
    for t0, t1 in blocks:
        ref = _band_power(target, sample_rate, frames=(t0, t1))
        frame_power[t0:t1] = ref.mean(axis=1)
        peak = max(peak, float(ref.max()))
    if peak <= 0:
        if notes is not None:
            notes.append("lsd_hb: no target energy above 8 kHz")
        return math.nan
    floor = peak * 10 ** (-LSD_FLOOR_DB / 10)
    active = frame_power > frame_power.max() * 10 ** (-LSD_ACTIVE_DB / 10)
    total = 0.0
    for t0, t1 in blocks:
        keep = active[t0:t1]
        if keep.any():
            ref = _band_power(target, sample_rate, frames=(t0, t1))[keep]
            est = _band_power(estimate, sample_rate, frames=(t0, t1))[keep]
            diff = 10 * np.log10((ref + floor) / (est + floor))
            total += float(np.sqrt(np.mean(diff**2, axis=1)).sum())
    return total / int(active.sum())


def reference_sensitivity(estimate: np.ndarray, other: np.ndarray) -> float:
    """How far the outputs of one mixture with two references differ, in dB:
    ``10 log10(2 |a - b|^2 / (|a|^2 + |b|^2))``, summed in float64 blocks; ``REF_SENS_FLOOR_DB``
    for identical outputs (a model that ignores its reference), about +3 dB for two
    uncorrelated, equally loud outputs (``evaluation/selection.py``, the swap test's measure)."""
    diff = energy = 0.0
    for start in range(0, len(estimate), BLOCK_SAMPLES):
        a = np.asarray(estimate[start : start + BLOCK_SAMPLES], dtype=np.float64)
        b = np.asarray(other[start : start + BLOCK_SAMPLES], dtype=np.float64)
        diff += float(np.sum((a - b) ** 2))
        energy += float(np.sum(a**2) + np.sum(b**2)) / 2
    value = DB_PER_LOG10 * math.log10((diff + ENERGY_EPS) / (energy + ENERGY_EPS))
    return max(value, REF_SENS_FLOOR_DB)


def ta_suppression(estimate: np.ndarray, mixture: np.ndarray) -> float:
    """Target-absent suppression in dB, ``10 log10(E_mixture / E_estimate)`` (energies over the
    whole signal, float64, floored and clamped as ``losses.separation.ta_suppression_db``): how
    far below the mixture the output of a sample without its target stays. Any rate, the same
    for both. Long signals: the energies are summed over ``BLOCK_SAMPLES`` blocks (the same
    value; memory a few blocks).

    Shape:
        estimate (N,), mixture (N,)
    """
    energy_e = energy_m = 0.0
    for e, m in _float64_blocks(estimate, mixture):
        energy_e, energy_m = energy_e + e @ e, energy_m + m @ m
    db = DB_PER_LOG10 * (math.log10(energy_m + ENERGY_EPS) - math.log10(energy_e + ENERGY_EPS))
    return min(max(db, -MAX_SUPPRESSION_DB), MAX_SUPPRESSION_DB)


def speaker_confusion(estimate: np.ndarray, heard: np.ndarray, *,
                      zero_mean: bool = True) -> tuple[float, float]:
    """Whether the estimate is closer to an interferer than to the target: (the best SI-SDR of
    the estimate against an interferer, 1.0 if that exceeds its SI-SDR against the target else
    0.0). The sources are compared as heard in the mixture (``Sample.heard``: reverberant
    target first, then the interferers), so neither side gets the dry target's advantage.
    Long signals: blockwise, as ``si_sdr_db``.

    Shape:
        estimate (N,), heard (1 + K, N) with K >= 1
    """
    scores = [si_sdr_db(estimate, s, zero_mean=zero_mean) for s in heard]
    best_interferer = max(scores[1:])
    return best_interferer, float(best_interferer > scores[0])
