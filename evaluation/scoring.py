"""A sample's row: the metrics of ``evaluation/metrics.py`` grouped into units, and ``score``.

A *unit* is the smallest piece of a row that is computed, and lost, as one: a metric, or a few
metrics that share their inputs (STOI and eSTOI; the SI-SDR family). When a metric worker dies
(a segfault or an abort in a C library) or hangs, the runner scores the sample again one unit
per fresh process (``evaluation/isolation.py``), so that the unit that failed costs only its own
columns on that one row. ``native`` units run code outside NumPy and PyTorch (the ``pesq`` C
extension, ONNX Runtime, PocketSphinx, ViSQOL's libsvm, WebRTC's VAD): they are the ones that
can take a process down, and they run in a child process even with ``--jobs 0``.

Columns that depend on the estimate are computed for each estimate a run makes (the whole-file
one, and the chunked one of ``--chunk`` under the prefix ``stream_``); columns of the mixture or
target alone (``si_sdr_mix``, ``*_mix``, ``wer_target``) once per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.metrics import (
    COLUMNS,
    DNSMOS_LEVEL_DBFS,
    SDR_MAX_SECONDS,
    STREAM_PREFIX,
    MetricSettings,
    bss_sdr,
    lsd_highband,
    pesq,
    si_sdr_db,
    speaker_confusion,
    stoi,
    ta_suppression,
)
from evaluation.signal import BLOCK_SAMPLES, LONG_SEGMENT_SECONDS
from evaluation.sources import TA, TP, Sample

Estimates = dict[str, np.ndarray]  # column prefix -> (N,) estimate
UnitFn = Callable[[Sample, Estimates, MetricSettings, list[str]], dict[str, Any]]


@dataclass(frozen=True)
class Unit:
    """Metrics computed (and lost) together: ``compute(sample, estimates, settings, notes)``
    returns the columns it fills, and appends to ``notes`` what failed."""

    name: str
    group: str
    compute: UnitFn
    native: bool = False  # may crash its process: a child process even with --jobs 0


def _tp_estimates(sample: Sample, estimates: Estimates) -> Estimates:
    return estimates if sample.condition == TP else {}


def _si_sdr_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
                 notes: list[str]) -> dict[str, Any]:
    zm, out = settings.zero_mean, {}
    if sample.condition == TA:
        for prefix, est in estimates.items():
            out[prefix + "ta_suppression_db"] = ta_suppression(est, sample.mix)
    if sample.condition != TP:
        return out
    out["si_sdr_mix"] = si_sdr_db(sample.mix, sample.target, zero_mean=zm)
    for prefix, est in estimates.items():
        out[prefix + "si_sdr"] = si_sdr_db(est, sample.target, zero_mean=zm)
        out[prefix + "si_sdri"] = out[prefix + "si_sdr"] - out["si_sdr_mix"]
        if sample.heard is not None and len(sample.heard) > 1:
            out[prefix + "si_sdr_interferer"], out[prefix + "confusion"] = speaker_confusion(
                est, sample.heard, zero_mean=zm)
    return out


def _lsd_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
              notes: list[str]) -> dict[str, Any]:
    if sample.condition != TP:
        return {}
    sr = settings.sample_rate
    out = {"lsd_hb_mix": lsd_highband(sample.mix, sample.target, sr)}
    for prefix, est in estimates.items():
        out[prefix + "lsd_hb"] = lsd_highband(est, sample.target, sr, notes)
    return out


def _pesq_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
               notes: list[str]) -> dict[str, Any]:
    return {prefix + "pesq": pesq(est, sample.target, settings.sample_rate, settings.pesq_sr,
                                  notes)
            for prefix, est in _tp_estimates(sample, estimates).items()}


def _stoi_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
               notes: list[str]) -> dict[str, Any]:
    out = {}
    for prefix, est in _tp_estimates(sample, estimates).items():
        for name, extended in (("stoi", False), ("estoi", True)):
            out[prefix + name] = stoi(est, sample.target, settings.sample_rate,
                                      extended=extended, notes=notes)
    return out


def _sdr_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
              notes: list[str]) -> dict[str, Any]:
    return {prefix + "sdr": bss_sdr(est, sample.target, notes)
            for prefix, est in _tp_estimates(sample, estimates).items()}


def _similarity_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
                     notes: list[str]) -> dict[str, Any]:
    from evaluation.speaker_similarity import cosine_similarity, speaker_embedding

    sr = settings.sample_rate
    ref = speaker_embedding(sample.ref, sr)
    target = speaker_embedding(sample.target, sr) if sample.condition == TP else None
    out = {"spk_sim_mix": cosine_similarity(speaker_embedding(sample.mix, sr), ref)}
    for prefix, est in estimates.items():
        embedding = speaker_embedding(est, sr)
        out[prefix + "spk_sim_ref"] = cosine_similarity(embedding, ref)
        if target is not None:
            out[prefix + "spk_sim_target"] = cosine_similarity(embedding, target)
    return out


def _dnsmos_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
                 notes: list[str]) -> dict[str, Any]:
    from evaluation.dnsmos import dnsmos

    sr, out = settings.sample_rate, {}
    for name, personalized in (("dnsmos", False), ("pdnsmos", True)):
        def scores(wave: np.ndarray, personalized: bool = personalized) -> dict[str, float]:
            return dnsmos(wave, sr, personalized=personalized, level_dbfs=DNSMOS_LEVEL_DBFS)

        out[f"{name}_ovrl_mix"] = scores(sample.mix)["ovrl"]
        for prefix, est in estimates.items():
            out.update({f"{prefix}{name}_{k}": v for k, v in scores(est).items()})
    return out


def _wer(transcript: str, wave: np.ndarray, sample_rate: int) -> float:
    from evaluation.asr import transcribe, word_errors

    errors, words = word_errors(transcript, transcribe(wave, sample_rate))
    return errors / words if words else math.nan


def _wer_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
              notes: list[str]) -> dict[str, Any]:
    from evaluation.asr import word_errors

    if sample.transcript is None or sample.condition == TA:
        return {}
    sr, text = settings.sample_rate, sample.transcript
    out = {"words": word_errors(text, text)[1], "wer_mix": _wer(text, sample.mix, sr)}
    if sample.condition == TP:
        out["wer_target"] = _wer(text, sample.target, sr)
    for prefix, est in estimates.items():
        out[prefix + "wer"] = _wer(text, est, sr)
    return out


def _visqol_unit(sample: Sample, estimates: Estimates, settings: MetricSettings,
                 notes: list[str]) -> dict[str, Any]:
    from evaluation.visqol import visqol_audio

    return {prefix + "visqol": visqol_audio(est, sample.target, settings.sample_rate)
            for prefix, est in _tp_estimates(sample, estimates).items()}


# What each unit does with a long signal (the report's settings; the functions' docstrings
# give the details). LONG_SEGMENT_SECONDS segments: consecutive, of equal length, each at most
# that long, so that no short tail is scored alone.
LONG_INPUT_RULES = {
    "si_sdr": "SI-SDR(i), speaker confusion, TA suppression: whole signal, exact, computed in "
              "blocks in float64",
    "lsd": "whole signal, exact, computed in blocks of STFT frames",
    "pesq": f"segments of at most {LONG_SEGMENT_SECONDS:g} s scored alone and averaged "
            "(weighted by length); differs from one whole-file score, which the pesq package "
            "cannot give safely (it crashes on a few minutes)",
    "stoi": f"segments of at most {LONG_SEGMENT_SECONDS:g} s scored alone and averaged "
            "(weighted by length); silent frames are removed per segment, not over the file",
    "sdr": f"not computed above {SDR_MAX_SECONDS:g} s (NaN, noted): BSS-Eval's filtered "
           "projection grows too slow and large",
    "similarity": "whole signal: GE2E partial windows embedded in batches and averaged",
    "dnsmos": "whole signal: every 9.01 s window (one per second) scored, one window at a "
              "time, and averaged; its CPU cost grows with the length",
    "wer": f"decoded in segments of at most {LONG_SEGMENT_SECONDS:g} s, the words joined",
    "visqol": f"segments of at most {LONG_SEGMENT_SECONDS:g} s scored alone and averaged "
              "(weighted by length)",
}

UNITS: dict[str, Unit] = {u.name: u for u in (
    Unit("si_sdr", "core", _si_sdr_unit),
    Unit("lsd", "core", _lsd_unit),
    Unit("pesq", "core", _pesq_unit, native=True),
    Unit("stoi", "core", _stoi_unit),
    Unit("sdr", "core", _sdr_unit),
    Unit("similarity", "similarity", _similarity_unit, native=True),
    Unit("dnsmos", "dnsmos", _dnsmos_unit, native=True),
    Unit("wer", "wer", _wer_unit, native=True),
    Unit("visqol", "visqol", _visqol_unit, native=True),
)}


def units_of(settings: MetricSettings) -> tuple[str, ...]:
    """The units an evaluation with ``settings`` runs, in ``UNITS`` order."""
    left_out = settings.not_applicable()
    return tuple(n for n, u in UNITS.items() if u.group in settings.groups
                 and (n != "sdr" or settings.sdr) and n not in left_out)


def all_finite(wave: np.ndarray) -> bool:
    """Whether every sample is finite, checked block by block (``wave`` may be a memmap of an
    hour: no whole-signal mask)."""
    return all(np.isfinite(wave[i : i + BLOCK_SAMPLES]).all()
               for i in range(0, len(wave), BLOCK_SAMPLES))


def nan_row(settings: MetricSettings) -> dict[str, float]:
    """Every column of ``settings`` as NaN: what a row holds before (or without) its units."""
    return dict.fromkeys(settings.columns(), math.nan)


def finite_estimates(estimates: Estimates) -> tuple[Estimates, list[str]]:
    """The estimates that are finite, and a note for each one that is not (it gets no
    columns)."""
    finite = {p: e for p, e in estimates.items() if all_finite(e)}
    return finite, [f"{p}non-finite estimate" for p in estimates if p not in finite]


def score_unit(name: str, sample: Sample, estimates: Estimates,
               settings: MetricSettings) -> dict[str, Any]:
    """The columns one unit fills and its ``notes`` (a list). A Python exception inside the
    unit costs that unit, with its type and message in the notes; a crash of the process is
    ``evaluation/isolation.py``'s business."""
    notes: list[str] = []
    try:
        columns = UNITS[name].compute(sample, estimates, settings, notes)
    except Exception as err:  # any failure inside a metric library costs its unit alone
        return {"notes": [f"{name}: {type(err).__name__}: {' '.join(str(err).split())}"]}
    unknown = set(columns) - set(COLUMNS) - {STREAM_PREFIX + c for c in COLUMNS}
    if unknown:  # a unit filling a column the report does not know is a bug, not a result
        raise KeyError(f"unit {name} filled unknown columns {sorted(unknown)}")
    return {**columns, "notes": notes}


def score(estimates: Estimates, sample: Sample, settings: MetricSettings,
          units: Sequence[str] | None = None) -> dict[str, Any]:
    """The columns of one sample that ``units`` (default: all of ``settings``) fill, and
    ``notes``, the list of what failed. ``estimates`` maps a column prefix ("" for the
    whole-file estimate, ``stream_`` for the chunked one) to its estimate.

    Shape:
        estimates: prefix -> (N,) at ``settings.sample_rate``
    """
    finite, notes = finite_estimates(estimates)
    row: dict[str, Any] = {}
    for name in units_of(settings) if units is None else units:
        part = score_unit(name, sample, finite, settings)
        notes += part.pop("notes")
        row.update(part)
    row["notes"] = notes
    return row


def row_of(estimates: Estimates, sample: Sample, settings: MetricSettings) -> dict[str, Any]:
    """Every column of one sample computed in this process (NaN where a metric does not apply
    or failed) with ``notes`` joined into one string: the row of an evaluation without
    isolation (benchmarks and tests)."""
    scored = score(estimates, sample, settings)
    return {**nan_row(settings), **scored, "notes": "; ".join(dict.fromkeys(scored["notes"]))}
