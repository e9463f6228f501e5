"""Evaluate a HiFi-TSE checkpoint: SI-SDR, SI-SDRi, PESQ, STOI, TA suppression (SPEC §5).

    python evaluate.py --ckpt runs/hifi_tse/best.pt --out-dir runs/hifi_tse/eval   # validation set
    python evaluate.py --ckpt best.pt --out-dir eval --triplets pairs/   # ID-mixed/-ref/-target.wav
    python evaluate.py --ckpt best.pt --out-dir eval --csv list.csv      # mix,ref,target columns

Samples come from one of three sources:

* the fixed validation list of ``HiFiTSEDataset`` (split ``val``): the first ``--n-samples``
  entries, the same every run, built from the HDF5 manifests named by the checkpoint's stored
  config (or ``--config``); each carries its condition (TP/TA, interferers, SNR, noisy ref);
* ``--triplets DIR``: every ``ID-mixed.wav`` with its ``ID-ref.wav`` and, for a target-present
  sample, ``ID-target.wav``;
* ``--csv FILE``: rows of (mix, ref, target) paths, relative to the CSV's folder, with a header
  naming the columns ``mix``, ``ref``, ``target`` (optionally ``id``) or none (then in that
  order). An empty target cell marks a target-absent sample.

Files may have any sample rate and channel count: ``load_audio`` downmixes and resamples them to
48 kHz, where everything is compared. A missing or all-zero target marks a target-absent (TA)
sample. The target is cut or zero-padded to the mixture's length (at most
``MAX_LENGTH_MISMATCH_SECONDS`` apart, else the file is rejected). A reference that cannot
identify the target (``inference.check_reference``: shorter than 1 s, or no voice in it) is
refused before any sample is extracted.

Metrics per sample, all on the 48 kHz signals unless said otherwise:

* SI-SDR (zero-mean, ``losses.separation.si_sdr`` in float64) of the estimate against the
  target, and SI-SDRi, the same minus the SI-SDR of the unprocessed mixture;
* SDR, BSS-Eval v3 (``mir_eval.separation.bss_eval_sources``), only with ``--sdr``: slow;
* PESQ, wide-band (ITU-T P.862.2): estimate and target resampled to 16 kHz with soxr, then
  ``pesq(16000, target, estimate, "wb")``; a PESQ failure (no utterance found, too short) gives
  NaN and its reason in the ``notes`` column;
* STOI and extended STOI (pystoi), called with the 48 kHz signals: pystoi resamples both to its
  own 10 kHz internally, so the values are exactly the reference implementation's;
* TA suppression, ``10 log10(E_mix / E_est)`` dB (``ta_suppression_db``), for TA samples.

The TP metrics are NaN (empty in the CSV) for TA samples and the TA suppression for TP ones.
Summaries (mean, median, standard deviation, 5/25/75/95th percentiles) skip NaN.

The checkpoint is read once (``models.generator.read_checkpoint``): its dict gives the generator,
whether EMA weights exist, the stored config and the step. The generator runs in the main process
through ``inference.Extractor.extract_array``: the windows, cross-fades, one level per file and
reference encoding of inference.py, so the numbers are those of the shipped extraction and the
generator's memory does not grow with a recording's length (the signals and their metrics still grow
linearly). The metrics, which are CPU-heavy, run in ``--jobs`` worker processes while the next
sample is extracted.

Outputs in ``--out-dir``, each written atomically: ``per_sample.csv``, ``summary.json``,
``report.md``, ``si_sdri_hist.png`` and, for the best, median and worst TP samples by SI-SDRi,
``examples/{best,median,worst}_spectrogram.png`` and
``examples/{best,median,worst}_{mix,ref,estimate,target}.wav``.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pesq as pesq_lib
import soundfile as sf
import soxr
import torch
from matplotlib.figure import Figure
from pystoi import stoi as pystoi_stoi
from tqdm import tqdm

from config import Config, ConfigError, apply_overrides, from_dict, load_config
from data.audio_utils import SAMPLE_RATE, STFT, AudioError, load_audio, save_audio
from data.dataset import HiFiTSEDataset, dataset_kwargs
from data.manifest import ManifestError
from inference import Extractor, InferenceError, read_reference, resolve_device
from losses.separation import si_sdr, si_sdr_improvement, ta_suppression_db
from models.generator import CheckpointError, Generator, read_checkpoint
from models.registry import model_from_payload

log = logging.getLogger("evaluate")

# ---- inputs
MIX_SUFFIX, REF_SUFFIX, TARGET_SUFFIX = "-mixed.wav", "-ref.wav", "-target.wav"
CSV_COLUMNS = ("mix", "ref", "target")
# A target whose peak stays below this (-120 dBFS, under one 24-bit LSB) is digital silence: TA.
SILENT_PEAK = 1e-6
# Mixture and target may differ by this much after resampling (rounding of other sample rates);
# a larger difference means the files do not belong together.
MAX_LENGTH_MISMATCH_SECONDS = 0.05
VAL_ID_FORMAT = "val{:05d}"

# ---- metrics
WB_PESQ_SR = 16_000  # wide-band PESQ (ITU-T P.862.2) is defined at 16 kHz
PESQ_MODES = {WB_PESQ_SR: "wb", 8_000: "nb"}  # narrow-band P.862 at 8 kHz
METRICS = ("si_sdr", "si_sdri", "sdr", "pesq", "stoi", "estoi", "ta_suppression_db")
TP_METRICS = ("si_sdr", "si_sdri", "sdr", "pesq", "stoi", "estoi")
METRIC_LABELS = {
    "si_sdr": "SI-SDR (dB)",
    "si_sdri": "SI-SDRi (dB)",
    "sdr": "SDR (dB)",
    "pesq": "PESQ",
    "stoi": "STOI",
    "estoi": "eSTOI",
    "ta_suppression_db": "TA suppression (dB)",
}
PERCENTILES = (5, 25, 75, 95)

# ---- processes
MAX_IN_FLIGHT_PER_JOB = 4  # estimates waiting for a metric worker; bounds the memory they hold

# ---- outputs
CSV_NAME, SUMMARY_NAME, REPORT_NAME = "per_sample.csv", "summary.json", "report.md"
HIST_NAME, EXAMPLES_DIR = "si_sdri_hist.png", "examples"
EXAMPLE_LABELS = ("best", "median", "worst")
CSV_FIELDS = (
    "id", "condition", "n_interferers", "snr_db", "ref_noisy", "seconds",
    "si_sdr_mix", *METRICS, "notes",
)
CSV_DECIMALS = 6
HIST_BIN_DB = 1.0
SPEC_DYNAMIC_RANGE_DB = 80.0  # spectrogram colour range below the loudest bin of the three
SPEC_EPS = 1e-10  # magnitude floor before the log (-200 dB)
FIGURE_DPI = 120
HZ_PER_KHZ = 1000.0

# SPEC §6: the v1 model, 48 kHz, 200 validation samples (158 TP + 42 TA).
V1_REFERENCE = {
    "label": "v1 (SPEC §6, 158 TP + 42 TA)",
    "si_sdr": -1.87, "si_sdri": 4.01, "pesq": 1.15, "stoi": 0.488,
    "ta_suppression_db": 11.2, "params": 7.8e6,
}


class EvalInputError(ValueError):
    """Evaluation input that cannot be used (a folder without triplets, a malformed CSV...);
    the message names the file."""


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One evaluation sample at 48 kHz; ``target`` is ``None`` for a target-absent sample.

    ``meta`` holds the validation set's conditions (``n_interferers``, ``snr_db``,
    ``ref_noisy``); it is empty for triplets and CSV rows.

    Shape:
        mix, target: (N,); ref: (M,)
    """

    id: str
    mix: np.ndarray
    ref: np.ndarray
    target: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleSource:
    """A sample that is read (or mixed) only when ``load`` is called: a run holds one at a time,
    and the examples are loaded again at the end instead of being kept."""

    id: str
    load: Callable[[], Sample]


def _validation_item(dataset: HiFiTSEDataset, index: int) -> Sample:
    item = dataset[index]
    return Sample(
        id=VAL_ID_FORMAT.format(index),
        mix=item["mix"].numpy(),
        ref=item["ref"].numpy(),
        target=None if item["is_ta"] else item["target"].numpy(),
        meta={
            "n_interferers": int(item["n_interferers"]),
            "snr_db": float(item["snr_db"]),
            "ref_noisy": bool(item["ref_noisy"]),
        },
    )


def validation_samples(cfg: Config, n_samples: int) -> list[SampleSource]:
    """The first ``n_samples`` of the fixed validation list (the same list every run)."""
    dataset = HiFiTSEDataset(**{**dataset_kwargs(cfg.data, "val"), "length": n_samples})
    return [
        SampleSource(VAL_ID_FORMAT.format(i), partial(_validation_item, dataset, i))
        for i in range(n_samples)
    ]


def _check_audio_file(path: Path) -> None:
    """Fail early, before any model time is spent, on a missing or undecodable file."""
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from None
    if info.frames == 0:
        raise AudioError(f"{path}: empty audio")


def _load_files(
    sample_id: str, mix_path: Path, ref_path: Path, target_path: Path | None
) -> Sample:
    mix = load_audio(mix_path)
    ref = load_audio(ref_path)
    target = None
    if target_path is not None:
        wave = load_audio(target_path)
        if abs(len(wave) - len(mix)) > MAX_LENGTH_MISMATCH_SECONDS * SAMPLE_RATE:
            raise EvalInputError(
                f"{target_path}: {len(wave) / SAMPLE_RATE:.3f} s long, but its mixture "
                f"{mix_path.name} is {len(mix) / SAMPLE_RATE:.3f} s"
            )
        wave = np.pad(wave[: len(mix)], (0, max(0, len(mix) - len(wave))))
        if np.abs(wave).max() > SILENT_PEAK:
            target = wave
    return Sample(id=sample_id, mix=mix, ref=ref, target=target)


def _file_source(
    sample_id: str, mix_path: Path, ref_path: Path, target_path: Path | None
) -> SampleSource:
    for path in (mix_path, ref_path, target_path):
        if path is not None:
            _check_audio_file(path)
    try:
        read_reference(ref_path)  # refused now rather than after the samples before it ran
    except AudioError as err:  # too short or voiceless: bad evaluation input
        raise EvalInputError(str(err)) from None
    return SampleSource(sample_id, partial(_load_files, sample_id, mix_path, ref_path, target_path))


def triplet_samples(folder: Path) -> list[SampleSource]:
    """Every ``ID-mixed.wav`` in ``folder`` with its ``ID-ref.wav`` and optional
    ``ID-target.wav`` (no target file: a target-absent sample), sorted by ID."""
    if not folder.is_dir():
        raise EvalInputError(f"{folder}: no such folder")
    mixes = sorted(folder.glob(f"*{MIX_SUFFIX}"))
    if not mixes:
        raise EvalInputError(
            f"{folder}: no triplets (ID{MIX_SUFFIX} + ID{REF_SUFFIX} [+ ID{TARGET_SUFFIX}])"
        )
    sources = []
    for mix_path in mixes:
        sample_id = mix_path.name[: -len(MIX_SUFFIX)]
        ref_path = folder / f"{sample_id}{REF_SUFFIX}"
        if not ref_path.is_file():
            raise AudioError(f"{ref_path}: no such file (the reference of {mix_path.name})")
        target_path = folder / f"{sample_id}{TARGET_SUFFIX}"
        target = target_path if target_path.exists() else None
        sources.append(_file_source(sample_id, mix_path, ref_path, target))
    ids = {s.id for s in sources}
    orphans = [
        p.name for suffix in (REF_SUFFIX, TARGET_SUFFIX) for p in folder.glob(f"*{suffix}")
        if p.name[: -len(suffix)] not in ids
    ]
    if orphans:
        log.warning("%s: %d files without an ID%s, ignored: %s", folder, len(orphans),
                    MIX_SUFFIX, ", ".join(sorted(orphans)[:5]))
    return sources


def csv_samples(path: Path) -> list[SampleSource]:
    """The (mix, ref, target) rows of a CSV file; see the module doc for the format."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path}: cannot read the CSV ({err})") from None
    reader = csv.reader(io.StringIO(text))
    columns: dict[str, int] | None = None
    sources: list[SampleSource] = []
    seen: set[str] = set()
    for row in reader:
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        where = f"{path}:{reader.line_num}"
        if columns is None:
            names = [c.lower() for c in cells]
            if "mix" in names:
                if "ref" not in names:
                    raise EvalInputError(f"{where}: the header has no 'ref' column")
                wanted = (*CSV_COLUMNS, "id")
                columns = {name: names.index(name) for name in wanted if name in names}
                continue
            columns = {name: i for i, name in enumerate(CSV_COLUMNS)}
        get = {k: cells[i] if i < len(cells) else "" for k, i in columns.items()}
        if not get["mix"] or not get["ref"]:
            raise EvalInputError(f"{where}: expected mix and ref paths, got {row}")
        mix, ref = (_csv_path(path, get[k]) for k in ("mix", "ref"))
        target = _csv_path(path, get["target"]) if get.get("target") else None
        sample_id = get.get("id") or mix.name.removesuffix(MIX_SUFFIX).removesuffix(mix.suffix)
        if sample_id in seen:
            sample_id = f"{sample_id}#{reader.line_num}"
        seen.add(sample_id)
        sources.append(_file_source(sample_id, mix, ref, target))
    if not sources:
        raise EvalInputError(f"{path}: no samples in the CSV")
    return sources


def _csv_path(csv_file: Path, cell: str) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else csv_file.parent / path


# ---------------------------------------------------------------------------------------------
# Metrics (run in worker processes)
# ---------------------------------------------------------------------------------------------


def _init_worker() -> None:
    # One thread per worker: the workers are the parallelism, and the generator in the main
    # process needs the remaining cores.
    torch.set_num_threads(1)


def compute_metrics(
    estimate: np.ndarray,
    target: np.ndarray | None,
    mixture: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    pesq_sr: int = WB_PESQ_SR,
    sdr: bool = False,
) -> dict[str, Any]:
    """All metrics of one sample; NaN where a metric does not apply or fails (then ``notes``
    says why). ``target=None`` marks a target-absent sample.

    Shape:
        estimate, mixture, target: (N,) at ``sample_rate``.
        returns: {"si_sdr_mix", *METRICS: float, "notes": str}
    """
    out: dict[str, Any] = {"si_sdr_mix": math.nan, **dict.fromkeys(METRICS, math.nan)}
    notes: list[str] = []
    if not np.isfinite(estimate).all():
        out["notes"] = "non-finite estimate"
        return out
    est = torch.from_numpy(np.asarray(estimate, dtype=np.float64))[None]  # (1, N)
    mix = torch.from_numpy(np.asarray(mixture, dtype=np.float64))[None]
    if target is None:
        out["ta_suppression_db"] = float(ta_suppression_db(est, mix)[0])
        out["notes"] = ""
        return out
    tgt = torch.from_numpy(np.asarray(target, dtype=np.float64))[None]
    out["si_sdr"] = float(si_sdr(est, tgt)[0])
    out["si_sdri"] = float(si_sdr_improvement(est, tgt, mix)[0])
    out["si_sdr_mix"] = out["si_sdr"] - out["si_sdri"]
    out["pesq"] = _pesq(estimate, target, sample_rate, pesq_sr, notes)
    out["stoi"] = _stoi(estimate, target, sample_rate, extended=False, notes=notes)
    out["estoi"] = _stoi(estimate, target, sample_rate, extended=True, notes=notes)
    if sdr:
        out["sdr"] = _bss_sdr(estimate, target, notes)
    out["notes"] = "; ".join(notes)
    return out


def resample_for_pesq(wave: np.ndarray, sample_rate: int, pesq_sr: int) -> np.ndarray:
    """The signal PESQ sees: ``wave`` resampled to ``pesq_sr`` with soxr (float64)."""
    wave = np.asarray(wave, dtype=np.float64)
    return wave if sample_rate == pesq_sr else soxr.resample(wave, sample_rate, pesq_sr)


def _pesq(
    estimate: np.ndarray, target: np.ndarray, sample_rate: int, pesq_sr: int, notes: list[str]
) -> float:
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


def _stoi(
    estimate: np.ndarray, target: np.ndarray, sample_rate: int, *, extended: bool,
    notes: list[str],
) -> float:
    name = "estoi" if extended else "stoi"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(pystoi_stoi(target, estimate, sample_rate, extended=extended))
    # pystoi warns and returns 1e-5 when too little non-silent speech is left: not a score.
    if any(issubclass(w.category, RuntimeWarning) for w in caught):
        notes.append(f"{name}: too little non-silent speech")
        return math.nan
    return value


def _bss_sdr(estimate: np.ndarray, target: np.ndarray, notes: list[str]) -> float:
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


# ---------------------------------------------------------------------------------------------
# The run: generator in the main process, metrics in workers
# ---------------------------------------------------------------------------------------------


def extract(extractor: Extractor, sample: Sample) -> np.ndarray:
    """The generator's estimate of ``sample``'s target, extracted as inference.py extracts it.

    Shape:
        returns (N,) float32 with N = len(sample.mix)
    """
    return extractor.extract_array(sample.mix, sample.ref, ref_name=f"{sample.id} (reference)")


def _row(sample: Sample) -> dict[str, Any]:
    return {
        "id": sample.id,
        "condition": "TA" if sample.target is None else "TP",
        "n_interferers": sample.meta.get("n_interferers"),
        "snr_db": sample.meta.get("snr_db"),
        "ref_noisy": sample.meta.get("ref_noisy"),
        "seconds": len(sample.mix) / SAMPLE_RATE,
    }


def run_samples(
    extractor: Extractor,
    sources: Sequence[SampleSource],
    *,
    jobs: int,
    metric_kwargs: dict[str, Any],
) -> list[dict[str, Any]]:
    """One row per source, in the sources' order: conditions and metrics.

    ``jobs`` worker processes (spawned: safe after CUDA and OpenMP are initialised) compute the
    metrics while the main process extracts the next samples; ``jobs=0`` computes them in the
    main process (for debugging).
    """
    rows: list[dict[str, Any]] = [{} for _ in sources]
    bar = tqdm(total=len(sources), desc="evaluate", unit="sample", disable=None)
    pool = (
        ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                            initializer=_init_worker)
        if jobs > 0
        else None
    )
    pending: dict[Future[dict[str, Any]], int] = {}

    def collect(done: set[Future[dict[str, Any]]]) -> None:
        for fut in done:
            rows[pending.pop(fut)].update(fut.result())
            bar.update()

    try:
        for i, source in enumerate(sources):
            sample = source.load()
            estimate = extract(extractor, sample)
            rows[i] = _row(sample)
            args = (estimate, sample.target, sample.mix)
            if pool is None:
                rows[i].update(compute_metrics(*args, **metric_kwargs))
                bar.update()
                continue
            pending[pool.submit(compute_metrics, *args, **metric_kwargs)] = i
            if len(pending) >= MAX_IN_FLIGHT_PER_JOB * jobs:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        while pending:
            collect(wait(pending, return_when=FIRST_COMPLETED).done)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def describe(values: Sequence[float | None]) -> dict[str, float | int]:
    """Count, mean, median, standard deviation (ddof 1) and percentiles of the finite values;
    NaN statistics when there are none."""
    x = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    x = x[np.isfinite(x)]
    stats: dict[str, float | int] = {"n": int(x.size)}
    names = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    if x.size == 0:
        return {**stats, **dict.fromkeys(names, math.nan)}
    values_ = [
        float(x.mean()), float(np.median(x)), float(x.std(ddof=1)) if x.size > 1 else 0.0,
        *(float(v) for v in np.percentile(x, PERCENTILES)),
    ]
    return {**stats, **dict(zip(names, values_, strict=True))}


def snr_band(snr_db: float, edges: Sequence[float]) -> str:
    """The breakdown band of an SNR: ``[lo,hi)``, the last band closed, outside ``<lo``/``>hi``."""
    if snr_db < edges[0]:
        return f"<{edges[0]:g}"
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = i == len(edges) - 2
        if lo <= snr_db < hi or (last and snr_db == hi):
            return f"[{lo:g},{hi:g}{']' if last else ')'}"
    return f">{edges[-1]:g}"


def group_names(row: dict[str, Any], edges: Sequence[float]) -> list[str]:
    """The breakdown groups a row belongs to (conditions the source does not know are left out)."""
    names = ["all", row["condition"]]
    if row.get("n_interferers") is not None:
        n = row["n_interferers"]
        names.append(f"{n} interferer{'s' if n != 1 else ''}")
    if row.get("snr_db") is not None:
        names.append(f"SNR {snr_band(row['snr_db'], edges)} dB")
    if row.get("ref_noisy") is not None:
        names.append("noisy ref" if row["ref_noisy"] else "clean ref")
    return names


def _group_order(name: str) -> tuple[int, float, str]:
    """Sort key of the breakdown: all/TP/TA, interferers, SNR bands (ascending), references."""
    if name in ("all", "TP", "TA"):
        return (0, ("all", "TP", "TA").index(name), name)
    if "interferer" in name:
        return (1, float(name.split()[0]), name)
    if name.startswith("SNR "):
        band = name.split()[1]
        lo = -math.inf if band.startswith("<") else float(band.strip("[>").split(",")[0])
        return (2, lo, name)
    return (3, 0.0, name)


def negative_si_sdri(rows: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """How many TP samples (with a finite SI-SDRi) the model made worse: wrong speaker or
    failure."""
    vals = [r["si_sdri"] for r in rows if r["condition"] == "TP" and math.isfinite(r["si_sdri"])]
    count = sum(v < 0 for v in vals)
    return {"count": count, "n_tp": len(vals), "share": count / len(vals) if vals else math.nan}


def summarize(rows: Sequence[dict[str, Any]], edges: Sequence[float]) -> dict[str, Any]:
    """Statistics of every metric over all rows and per breakdown group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for name in group_names(row, edges):
            groups.setdefault(name, []).append(row)
    breakdown = {}
    for name in sorted(groups, key=_group_order):
        members = groups[name]
        breakdown[name] = {
            "n": len(members),
            "n_tp": sum(r["condition"] == "TP" for r in members),
            "n_ta": sum(r["condition"] == "TA" for r in members),
            "metrics": {m: describe([r[m] for r in members]) for m in METRICS},
            "negative_si_sdri": negative_si_sdri(members),
        }
    return {
        "metrics": breakdown["all"]["metrics"],
        "negative_si_sdri": breakdown["all"]["negative_si_sdri"],
        "breakdown": breakdown,
    }


def pick_examples(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Row indices of the best, median and worst TP samples by SI-SDRi (ties: first row)."""
    tp = [i for i, r in enumerate(rows) if r["condition"] == "TP" and math.isfinite(r["si_sdri"])]
    if not tp:
        return {}
    ranked = sorted(tp, key=lambda i: (-rows[i]["si_sdri"], i))  # best first
    return dict(zip(EXAMPLE_LABELS, (ranked[0], ranked[len(ranked) // 2], ranked[-1]), strict=True))


# ---------------------------------------------------------------------------------------------
# Writing (every file atomically: a temporary file in the same folder, then a rename)
# ---------------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path`` and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.{CSV_DECIMALS}f}"
    return str(value)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per sample; empty cells where a value does not apply or failed."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        writer.writerow([_csv_cell(row.get(k)) for k in CSV_FIELDS])
    write_text(path, buf.getvalue())


def _json_safe(value: Any) -> Any:
    """NaN/inf become null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _save_figure(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=FIGURE_DPI))


def plot_histogram(path: Path, values: Sequence[float]) -> None:
    """Histogram of the TP samples' SI-SDRi, 1 dB bins, with 0 dB and the mean marked."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    if x.size:
        bins = np.arange(math.floor(x.min()), math.ceil(x.max()) + HIST_BIN_DB, HIST_BIN_DB)
        ax.hist(x, bins=bins, color="tab:blue", edgecolor="white")
        ax.axvline(0.0, color="black", linewidth=1, linestyle=":", label="0 dB")
        ax.axvline(float(x.mean()), color="tab:red", linewidth=1.5,
                   label=f"mean {x.mean():+.2f} dB")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no target-present samples", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("SI-SDRi (dB)")
    ax.set_ylabel("TP samples")
    ax.set_title(f"SI-SDRi of {x.size} target-present samples")
    _save_figure(fig, path)


def plot_spectrograms(path: Path, signals: dict[str, np.ndarray], title: str) -> None:
    """Stacked log-magnitude spectrograms (the project's STFT) on one colour scale.

    Shape:
        signals: name -> (N,) at 48 kHz
    """
    stft = STFT()
    db = {
        name: 20 * np.log10(stft(torch.from_numpy(w)[None])[0].abs().numpy() + SPEC_EPS)
        for name, w in signals.items()
    }  # name -> (F, T)
    vmax = max(float(d.max()) for d in db.values())
    seconds = max(len(w) for w in signals.values()) / SAMPLE_RATE
    fig = Figure(figsize=(10.0, 2.4 * len(db)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(db), 1, sharex=True))
    image = None
    for ax, (name, d) in zip(axes, db.items(), strict=True):
        image = ax.imshow(d, origin="lower", aspect="auto", cmap="magma",
                          extent=(0.0, seconds, 0.0, SAMPLE_RATE / 2 / HZ_PER_KHZ),
                          vmin=vmax - SPEC_DYNAMIC_RANGE_DB, vmax=vmax)
        ax.set_ylabel(f"{name}\nkHz")
    axes[-1].set_xlabel("time (s)")
    axes[0].set_title(title)
    fig.colorbar(image, ax=list(axes), label="dB")
    _save_figure(fig, path)


def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:{spec}}{unit}"


def _headline_cells(means: dict[str, float], params: float) -> list[str]:
    return [
        _fmt(means["si_sdr"], ".2f", " dB"),
        _fmt(means["si_sdri"], "+.2f", " dB"),
        _fmt(means["pesq"], ".2f"),
        _fmt(means["stoi"], ".3f"),
        _fmt(means["ta_suppression_db"], ".1f", " dB"),
        f"{params / 1e6:.2f} M params",
    ]


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in lines),
    ]


METRIC_FORMATS = {"pesq": ".2f", "stoi": ".3f", "estoi": ".3f"}  # dB values: ".2f"


def render_report(info: dict[str, Any], summary: dict[str, Any], rows: Sequence[dict]) -> str:
    """The Markdown report: headline (as SPEC §6), distributions, breakdown, examples."""
    metrics = [m for m in METRICS if m != "sdr" or info["settings"]["sdr"]]
    means = {m: summary["metrics"][m]["mean"] for m in METRICS}
    neg = summary["negative_si_sdri"]
    lines = [
        "# HiFi-TSE evaluation",
        "",
        f"- checkpoint: `{info['checkpoint']}`"
        + (f" (step {info['step']})" if info.get("step") is not None else "")
        + f", weights: {info['weights']}",
        f"- samples: {info['source']}: {info['n_samples']} ({info['n_tp']} TP + {info['n_ta']} TA)",
        f"- generator: {info['generator_params']:,} parameters",
        f"- PESQ: {info['settings']['pesq']}; STOI: {info['settings']['stoi']}",
        "",
        "## Headline (means)",
        "",
        *_table(
            ["model", "SI-SDR", "SI-SDRi", "PESQ", "STOI", "TA suppression", "generator"],
            [
                ["this checkpoint", *_headline_cells(means, info["generator_params"])],
                [V1_REFERENCE["label"], *_headline_cells(V1_REFERENCE, V1_REFERENCE["params"])],
            ],
        ),
        "",
        f"TP samples with SI-SDRi < 0 dB (wrong speaker or failure): {neg['count']} of "
        f"{neg['n_tp']} ({_fmt(100 * neg['share'], '.1f', ' %')})",
        "",
        "## Distributions",
        "",
        *_table(
            ["metric", "n", "mean", "median", "std", *(f"p{p}" for p in PERCENTILES)],
            [
                [METRIC_LABELS[m], str(s["n"]),
                 *(_fmt(s[k], METRIC_FORMATS.get(m, ".2f"))
                   for k in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES)))]
                for m in metrics
                for s in [summary["metrics"][m]]
            ],
        ),
        "",
        "## Breakdown (means)",
        "",
        *_table(
            ["group", "TP", "TA", *(METRIC_LABELS[m] for m in metrics), "SI-SDRi < 0"],
            [
                [name, str(g["n_tp"]), str(g["n_ta"]),
                 *(_fmt(g["metrics"][m]["mean"], METRIC_FORMATS.get(m, ".2f")) for m in metrics),
                 _fmt(100 * g["negative_si_sdri"]["share"], ".0f", " %")]
                for name, g in summary["breakdown"].items()
            ],
        ),
        "",
    ]
    failures = [(r["id"], r["notes"]) for r in rows if r.get("notes")]
    if failures:
        lines += ["## Metrics that failed (NaN)", "", *(f"- `{i}`: {n}" for i, n in failures), ""]
    lines += ["## Figures and audio", "", f"![SI-SDRi histogram]({HIST_NAME})", ""]
    examples = info["examples"]
    if examples:
        lines += _table(
            ["example", "id", "SI-SDRi", "spectrogram", "audio"],
            [
                [label, f"`{ex['id']}`", _fmt(ex["si_sdri"], "+.2f", " dB"),
                 f"[png]({ex['spectrogram']})",
                 " ".join(f"[{k}]({v})" for k, v in ex["audio"].items())]
                for label, ex in examples.items()
            ],
        )
    else:
        lines.append("No target-present sample with a finite SI-SDRi: no examples.")
    return "\n".join(lines) + "\n"


def write_examples(
    out_dir: Path,
    picks: dict[str, int],
    rows: Sequence[dict[str, Any]],
    sources: Sequence[SampleSource],
    extractor: Extractor,
) -> dict[str, Any]:
    """Audio and spectrograms of the picked samples, extracted again (deterministically)
    rather than kept in memory during the run."""
    examples: dict[str, Any] = {}
    for label, index in picks.items():
        sample = sources[index].load()
        estimate = extract(extractor, sample)
        waves = {"mix": sample.mix, "ref": sample.ref, "estimate": estimate,
                 "target": sample.target}
        audio = {}
        for name, wave in waves.items():
            rel = f"{EXAMPLES_DIR}/{label}_{name}.wav"
            save_audio(out_dir / rel, wave, SAMPLE_RATE)
            audio[name] = rel
        spec_rel = f"{EXAMPLES_DIR}/{label}_spectrogram.png"
        si_sdri = rows[index]["si_sdri"]
        plot_spectrograms(
            out_dir / spec_rel,
            {"mixture": sample.mix, "estimate": estimate, "target": sample.target},
            f"{label}: {sample.id}, SI-SDRi {si_sdri:+.2f} dB",
        )
        examples[label] = {"id": sample.id, "si_sdri": si_sdri, "spectrogram": spec_rel,
                           "audio": audio}
    return examples


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def resolve_config(args: argparse.Namespace, stored: dict[str, Any] | None) -> Config:
    """``--config`` if given, else the checkpoint's stored config; then the ``--set`` items."""
    if args.config is not None:
        return load_config(args.config, args.set)
    if stored is None:
        if args.triplets is None and args.csv is None:
            raise EvalInputError(
                f"{args.ckpt}: the checkpoint stores no config; pass --config for the "
                "validation set"
            )
        return load_config(None, args.set)
    try:
        cfg = from_dict(stored)
    except ConfigError as err:
        raise ConfigError(f"{args.ckpt}: stored config: {err}") from None
    return apply_overrides(cfg, args.set)


@dataclass
class Checkpoint:
    """What an evaluation takes from its checkpoint, read once."""

    model: Generator
    cfg: Config  # the stored config (or --config), with the --set overrides
    use_ema: bool  # EMA weights: present, and neither --no-ema nor eval.use_ema false
    step: int | None


def load_checkpoint(args: argparse.Namespace) -> Checkpoint:
    """The generator, config and step of ``args.ckpt`` from one read of the file."""
    ckpt = read_checkpoint(args.ckpt)
    cfg = resolve_config(args, ckpt.get("config"))
    use_ema = not args.no_ema and cfg.eval.use_ema and ckpt.get("ema") is not None
    model = model_from_payload(ckpt, use_ema=use_ema, name=str(args.ckpt))
    return Checkpoint(model=model, cfg=cfg, use_ema=use_ema, step=ckpt.get("step"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a HiFi-TSE checkpoint (SI-SDR, SI-SDRi, PESQ, STOI, TA "
        "suppression) on the validation set, a folder of triplets or a CSV of paths."
    )
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint (.pt)")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the results")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--triplets", type=Path, metavar="DIR",
                        help="folder of ID-mixed.wav, ID-ref.wav[, ID-target.wav]")
    source.add_argument("--csv", type=Path, metavar="FILE", help="CSV of mix,ref,target paths")
    parser.add_argument("--config", type=Path,
                        help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, repeatable")
    parser.add_argument("--n-samples", type=int,
                        help="validation samples (default: eval.n_samples)")
    parser.add_argument("--sdr", action="store_true", help="also BSS-Eval SDR (mir_eval; slow)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="metric worker processes; 0 computes them in the main process")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: eval.device)")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw generator weights, not the EMA ones")
    return parser


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run a whole evaluation from parsed arguments; returns the summary that was written."""
    loaded = load_checkpoint(args)
    cfg, use_ema = loaded.cfg, loaded.use_ema
    if cfg.eval.pesq_sr not in PESQ_MODES:
        raise ConfigError(f"config key 'eval.pesq_sr': PESQ runs at {sorted(PESQ_MODES)} Hz, "
                          f"not {cfg.eval.pesq_sr}")
    device = resolve_device(args.device or cfg.eval.device)
    jobs = max(0, args.jobs)
    if device.type == "cpu" and jobs > 0:
        # The metric workers take one core each; more generator threads than the cores left
        # only contend (an LSTM on a busy CPU slows down many times over).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - jobs))
    extractor = Extractor(loaded.model, device=device)
    n_params = sum(p.numel() for p in loaded.model.parameters())

    if args.triplets is not None:
        sources, source_desc = triplet_samples(args.triplets), f"triplets in `{args.triplets}`"
    elif args.csv is not None:
        sources, source_desc = csv_samples(args.csv), f"CSV `{args.csv}`"
    else:
        n = args.n_samples if args.n_samples is not None else cfg.eval.n_samples
        if n < 1:
            raise EvalInputError(f"--n-samples must be >= 1, got {n}")
        sources = validation_samples(cfg, n)
        source_desc = f"validation set (first {n} of the fixed list, `{cfg.data.manifest_dir}`)"
    log.info("evaluating %d samples (%s) on %s with %s weights, %d metric workers",
             len(sources), source_desc, device, "EMA" if use_ema else "generator", jobs)

    sdr = args.sdr or cfg.eval.sdr
    rows = run_samples(extractor, sources, jobs=jobs,
                       metric_kwargs={"pesq_sr": cfg.eval.pesq_sr, "sdr": sdr})
    edges = list(cfg.eval.snr_band_edges_db)
    summary = summarize(rows, edges)

    out_dir: Path = args.out_dir
    write_csv(out_dir / CSV_NAME, rows)
    plot_histogram(out_dir / HIST_NAME,
                   [r["si_sdri"] for r in rows if r["condition"] == "TP"])
    picks = pick_examples(rows)
    examples = write_examples(out_dir, picks, rows, sources, extractor)
    pesq_mode = PESQ_MODES[cfg.eval.pesq_sr]
    info = {
        "checkpoint": str(args.ckpt),
        "step": loaded.step,
        "weights": "EMA" if use_ema else "generator",
        "source": source_desc,
        "n_samples": len(rows),
        "n_tp": sum(r["condition"] == "TP" for r in rows),
        "n_ta": sum(r["condition"] == "TA" for r in rows),
        "generator_params": n_params,
        "settings": {
            "sample_rate": SAMPLE_RATE,
            "pesq": f"{'wide' if pesq_mode == 'wb' else 'narrow'}-band at "
                    f"{cfg.eval.pesq_sr / HZ_PER_KHZ:g} kHz (soxr resampling)",
            "stoi": "pystoi at 48 kHz (resampled to 10 kHz inside pystoi)",
            "si_sdr": "zero-mean, float64",
            "sdr": sdr,
            "snr_band_edges_db": edges,
        },
        "examples": examples,
    }
    result = {**info, **summary,
              "failures": [{"id": r["id"], "notes": r["notes"]} for r in rows if r.get("notes")]}
    write_text(out_dir / SUMMARY_NAME,
               json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    write_text(out_dir / REPORT_NAME, render_report(info, summary, rows))
    means = {m: s["mean"] for m, s in summary["metrics"].items()}
    log.info("SI-SDRi %s dB, PESQ %s, STOI %s, TA suppression %s dB -> %s",
             _fmt(means["si_sdri"], "+.2f"), _fmt(means["pesq"]), _fmt(means["stoi"], ".3f"),
             _fmt(means["ta_suppression_db"], ".1f"), out_dir / REPORT_NAME)
    return result


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        evaluate(args)
    except (CheckpointError, AudioError, ConfigError, ManifestError, EvalInputError, InferenceError,
            OSError) as err:
        sys.stderr.write(f"evaluate.py: error: {_one_line(err)}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
