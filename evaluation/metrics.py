"""One function per metric; ``score`` computes a sample's row from its estimates.

Every signal is mono float at 48 kHz unless a function says otherwise. A metric that does not
apply to a sample (a TP metric of a TA sample, a WER without transcript) is NaN, as is one that
fails; ``notes`` then says why. Metrics come in groups that ``--metrics`` turns on:

* ``core``: SI-SDR(i), PESQ, STOI/eSTOI, the 8-24 kHz log-spectral distance, speaker confusion
  (when the interferers are known), TA suppression, and BSS-Eval SDR with ``--sdr``;
* ``similarity``: cosine similarity of Resemblyzer GE2E speaker embeddings (16 kHz);
* ``dnsmos``: DNSMOS P.835 and personalised DNSMOS (16 kHz, ``speechmos``), no target needed;
* ``wer``: word error rate of PocketSphinx transcripts (16 kHz), on samples with a transcript;
* ``visqol``: ViSQOL v3 in audio mode at 48 kHz (``visqol-python``), full band, needs a target.

Columns that depend on the estimate are computed for each estimate a run makes (the whole-file
one, and the chunked one of ``--chunk`` under the prefix ``stream_``); columns of the mixture or
target alone (``si_sdr_mix``, ``*_mix``, ``wer_target``) once per sample.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pesq as pesq_lib
import soxr
import torch
from pystoi import stoi as pystoi_stoi

from config import EVAL_METRIC_GROUPS
from data.audio_utils import SAMPLE_RATE
from evaluation.sources import TA, TP, UNKNOWN, Sample
from losses.separation import si_sdr, ta_suppression_db

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

    def columns(self) -> list[str]:
        """The per-sample columns of this evaluation, in report order."""
        names = [n for n, c in COLUMNS.items() if c.group in self.groups
                 and (n != "sdr" or self.sdr)]
        stream = [STREAM_PREFIX + n for n in names if COLUMNS[n].estimate] if self.stream else []
        return names + stream


def column(name: str) -> Column:
    """The column of ``name``, ``stream_`` names included."""
    return COLUMNS[name.removeprefix(STREAM_PREFIX)]


# ---------------------------------------------------------------------------------------------
# Intrusive metrics (need the target)
# ---------------------------------------------------------------------------------------------


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))[None]  # (1, N)


def si_sdr_db(estimate: np.ndarray, target: np.ndarray, *, zero_mean: bool = True) -> float:
    """Scale-invariant SDR (Le Roux et al., ICASSP 2019) in dB, in float64:
    ``10 log10(|a s|^2 / |a s - e|^2)`` with ``a = <e, s> / |s|^2``. ``zero_mean`` removes the
    means first (this repository's convention, as asteroid and ESPnet); without it the value is
    torchmetrics' default ``scale_invariant_signal_distortion_ratio(zero_mean=False)``. Any
    rate, the same for both."""
    return float(si_sdr(_t(estimate), _t(target), zero_mean=zero_mean)[0])


def resample_for_pesq(wave: np.ndarray, sample_rate: int, pesq_sr: int) -> np.ndarray:
    """The signal PESQ sees: ``wave`` resampled to ``pesq_sr`` with soxr (float64)."""
    wave = np.asarray(wave, dtype=np.float64)
    return wave if sample_rate == pesq_sr else soxr.resample(wave, sample_rate, pesq_sr)


def pesq(estimate: np.ndarray, target: np.ndarray, sample_rate: int, pesq_sr: int,
         notes: list[str]) -> float:
    """PESQ (ITU-T P.862.2 wide-band at 16 kHz, or P.862 narrow-band at 8 kHz) of the estimate
    against the target, both resampled with soxr to ``pesq_sr``; a PESQ failure (no utterance
    found, too short) gives NaN and its reason in ``notes``."""
    deg = resample_for_pesq(estimate, sample_rate, pesq_sr)
    ref = resample_for_pesq(target, sample_rate, pesq_sr)
    try:
        return float(pesq_lib.pesq(pesq_sr, ref, deg, PESQ_MODES[pesq_sr]))
    except pesq_lib.PesqError as err:
        detail = err.args[0] if err.args else ""
        if isinstance(detail, bytes):  # the C extension passes its message as bytes
            detail = detail.decode(errors="replace")
        notes.append(f"pesq: {type(err).__name__}: {detail}".rstrip(": "))
        return math.nan


def stoi(estimate: np.ndarray, target: np.ndarray, sample_rate: int, *, extended: bool,
         notes: list[str]) -> float:
    """STOI (Taal et al., 2011) or extended STOI (Jensen & Taal, 2016) from pystoi, called with
    the signals at their own rate (pystoi resamples both to its 10 kHz internally, so the value
    is the reference implementation's). NaN when too little non-silent speech is left."""
    name = "estoi" if extended else "stoi"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(pystoi_stoi(target, estimate, sample_rate, extended=extended))
    # pystoi warns and returns 1e-5 when too little non-silent speech is left: not a score.
    if any(issubclass(w.category, RuntimeWarning) for w in caught):
        notes.append(f"{name}: too little non-silent speech")
        return math.nan
    return value


def bss_sdr(estimate: np.ndarray, target: np.ndarray, notes: list[str]) -> float:
    """SDR of BSS-Eval v3 (Vincent et al., 2006; ``mir_eval.separation.bss_eval_sources``):
    distortions up to a 512-tap filter are allowed. Slow on long signals."""
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


def _band_power(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """The STFT power in ``LSD_BAND_HZ``. Shape: (N,) -> (T, F_band)."""
    x = torch.from_numpy(np.asarray(wave, dtype=np.float64))
    window = torch.hann_window(LSD_N_FFT, dtype=torch.float64)
    spec = torch.stft(x, LSD_N_FFT, LSD_HOP, window=window, return_complex=True)  # (F, T)
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
    24 kHz); NaN when the target has no energy in the band."""
    if sample_rate < 2 * LSD_BAND_HZ[1]:
        raise ValueError(f"lsd_highband needs 48 kHz signals, got {sample_rate} Hz")
    ref, est = _band_power(target, sample_rate), _band_power(estimate, sample_rate)
    if ref.max() <= 0:
        if notes is not None:
            notes.append("lsd_hb: no target energy above 8 kHz")
        return math.nan
    floor = ref.max() * 10 ** (-LSD_FLOOR_DB / 10)
    frame = ref.mean(axis=1)  # (T,)
    active = frame > frame.max() * 10 ** (-LSD_ACTIVE_DB / 10)
    diff = 10 * np.log10((ref[active] + floor) / (est[active] + floor))
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=1))))


def ta_suppression(estimate: np.ndarray, mixture: np.ndarray) -> float:
    """Target-absent suppression in dB, ``10 log10(E_mixture / E_estimate)`` (energies over the
    whole signal, float64; ``losses.separation.ta_suppression_db``): how far below the mixture
    the output of a sample without its target stays. Any rate, the same for both."""
    return float(ta_suppression_db(_t(estimate), _t(mixture))[0])


def speaker_confusion(estimate: np.ndarray, heard: np.ndarray, *,
                      zero_mean: bool = True) -> tuple[float, float]:
    """Whether the estimate is closer to an interferer than to the target: (the best SI-SDR of
    the estimate against an interferer, 1.0 if that exceeds its SI-SDR against the target else
    0.0). The sources are compared as heard in the mixture (``Sample.heard``: reverberant
    target first, then the interferers), so neither side gets the dry target's advantage.

    Shape:
        estimate (N,), heard (1 + K, N) with K >= 1
    """
    scores = [si_sdr_db(estimate, s, zero_mean=zero_mean) for s in heard]
    best_interferer = max(scores[1:])
    return best_interferer, float(best_interferer > scores[0])


# ---------------------------------------------------------------------------------------------
# A sample's row
# ---------------------------------------------------------------------------------------------


def _nan_row(settings: MetricSettings, prefix: str, estimate: bool) -> dict[str, float]:
    return {prefix + n: math.nan for n in settings.columns()
            if not n.startswith(STREAM_PREFIX) and COLUMNS[n].estimate == estimate}


def _applies(name: str, sample: Sample, settings: MetricSettings) -> bool:
    col = COLUMNS[name]
    return col.group in settings.groups and sample.condition in col.conditions


class _Embeddings:
    """Speaker embeddings of one sample, each computed once (the reference and the mixture
    serve every estimate)."""

    def __init__(self, sample_rate: int) -> None:
        self.sr = sample_rate
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, key: str, wave: np.ndarray) -> np.ndarray:
        from evaluation.speaker_similarity import speaker_embedding

        if key not in self._cache:
            self._cache[key] = speaker_embedding(wave, self.sr)
        return self._cache[key]


def estimate_metrics(estimate: np.ndarray, sample: Sample, settings: MetricSettings,
                     embed: _Embeddings, notes: list[str], prefix: str = "",
                     si_sdr_mix: float = math.nan) -> dict[str, Any]:
    """The estimate-dependent columns of one estimate (NaN where they do not apply);
    ``si_sdr_mix`` is the mixture's SI-SDR (``baseline_metrics``), which SI-SDRi subtracts."""
    out = _nan_row(settings, prefix, estimate=True)
    if not np.isfinite(estimate).all():
        notes.append(f"{prefix}non-finite estimate")
        return out
    sr, zm = settings.sample_rate, settings.zero_mean
    put = {}
    if sample.condition == TA and "core" in settings.groups:
        put["ta_suppression_db"] = ta_suppression(estimate, sample.mix)
    if sample.condition == TP and "core" in settings.groups:
        target = sample.target
        put["si_sdr"] = si_sdr_db(estimate, target, zero_mean=zm)
        put["si_sdri"] = put["si_sdr"] - si_sdr_mix
        put["pesq"] = pesq(estimate, target, sr, settings.pesq_sr, notes)
        put["stoi"] = stoi(estimate, target, sr, extended=False, notes=notes)
        put["estoi"] = stoi(estimate, target, sr, extended=True, notes=notes)
        put["lsd_hb"] = lsd_highband(estimate, target, sr, notes)
        if settings.sdr:
            put["sdr"] = bss_sdr(estimate, target, notes)
        if sample.heard is not None and len(sample.heard) > 1:
            put["si_sdr_interferer"], put["confusion"] = speaker_confusion(
                estimate, sample.heard, zero_mean=zm)
    if "similarity" in settings.groups:
        from evaluation.speaker_similarity import cosine_similarity

        est = embed(prefix + "estimate", estimate)
        put["spk_sim_ref"] = cosine_similarity(est, embed("ref", sample.ref))
        if sample.condition == TP:
            put["spk_sim_target"] = cosine_similarity(est, embed("target", sample.target))
    if "dnsmos" in settings.groups:
        from evaluation.dnsmos import dnsmos

        for name, personalized in (("dnsmos", False), ("pdnsmos", True)):
            scores = dnsmos(estimate, sr, personalized=personalized, level_dbfs=DNSMOS_LEVEL_DBFS)
            for key in ("sig", "bak", "ovrl"):
                put[f"{name}_{key}"] = scores[key]
    if _applies("wer", sample, settings) and sample.transcript is not None:
        put["wer"] = _wer(sample.transcript, estimate, sr)
    if _applies("visqol", sample, settings):
        from evaluation.visqol import visqol_audio

        put["visqol"] = visqol_audio(estimate, sample.target, sr)
    out.update({prefix + k: v for k, v in put.items()})
    return out


def _wer(transcript: str, wave: np.ndarray, sample_rate: int) -> float:
    from evaluation.asr import transcribe, word_errors

    errors, words = word_errors(transcript, transcribe(wave, sample_rate))
    return errors / words if words else math.nan


def baseline_metrics(sample: Sample, settings: MetricSettings, embed: _Embeddings,
                     notes: list[str]) -> dict[str, Any]:
    """The columns of the mixture or target alone: what extraction starts from."""
    out = _nan_row(settings, "", estimate=False)
    sr = settings.sample_rate
    if _applies("si_sdr_mix", sample, settings):
        out["si_sdr_mix"] = si_sdr_db(sample.mix, sample.target, zero_mean=settings.zero_mean)
        out["lsd_hb_mix"] = lsd_highband(sample.mix, sample.target, sr)
    if "similarity" in settings.groups:
        from evaluation.speaker_similarity import cosine_similarity

        out["spk_sim_mix"] = cosine_similarity(embed("mix", sample.mix),
                                               embed("ref", sample.ref))
    if "dnsmos" in settings.groups:
        from evaluation.dnsmos import dnsmos

        for name, personalized in (("dnsmos", False), ("pdnsmos", True)):
            out[f"{name}_ovrl_mix"] = dnsmos(sample.mix, sr, personalized=personalized,
                                            level_dbfs=DNSMOS_LEVEL_DBFS)["ovrl"]
    if _applies("wer_mix", sample, settings) and sample.transcript is not None:
        from evaluation.asr import word_errors

        out["words"] = word_errors(sample.transcript, sample.transcript)[1]
        out["wer_mix"] = _wer(sample.transcript, sample.mix, sr)
        if sample.condition == TP:
            out["wer_target"] = _wer(sample.transcript, sample.target, sr)
    return out


def score(estimates: dict[str, np.ndarray], sample: Sample,
          settings: MetricSettings) -> dict[str, Any]:
    """Every column of one sample: ``estimates`` maps a column prefix ("" for the whole-file
    estimate, ``stream_`` for the chunked one) to its estimate; ``notes`` says what failed.

    Shape:
        estimates: prefix -> (N,) at ``settings.sample_rate``
    """
    notes: list[str] = []
    embed = _Embeddings(settings.sample_rate)
    row = baseline_metrics(sample, settings, embed, notes)
    for prefix, estimate in estimates.items():
        row.update(estimate_metrics(estimate, sample, settings, embed, notes, prefix,
                                    si_sdr_mix=row.get("si_sdr_mix", math.nan)))
    row["notes"] = "; ".join(dict.fromkeys(notes))
    return row
