"""Statistics, breakdowns and the files an evaluation writes.

During a run each finished row is appended to ``per_sample.csv`` and flushed (``RowWriter``),
beside ``fingerprint.json``, the settings the rows were scored with: a run that is killed keeps
its rows, and a rerun into the same folder with the same fingerprint scores only the missing IDs
(``resume_rows``); one with another fingerprint is refused. At the end ``per_sample.csv`` is
rewritten in source order, and every other file is written atomically (a temporary file in the
same folder, then a rename): ``summary.json``, ``report.md`` and ``report.html`` (the same
``report_blocks``, the HTML by ``evaluation/html_report.py``), ``si_sdri_hist.png`` and, for the
best, median and worst TP samples by SI-SDRi and the worst confusions (``pick_examples``),
``examples/{label}_spectrogram.png`` (mixture,
reference, estimate and target) and ``examples/{label}_{mix,ref,estimate,target}.wav``. The
summaries are computed from the rows as the CSV holds them (6 decimals), so a resumed run's
summary equals an uninterrupted one's.
Summaries (mean, median, standard deviation, 5/25/75/95th percentiles) skip NaN; the WER of a
group is the corpus WER (all its errors over all its reference words), not a mean of per-sample
rates.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from dsp.audio import SAMPLE_RATE, save_audio
from dsp.files import atomic_path, write_text_atomic
from dsp.stft import HOP_LENGTH, N_FFT, STFT, WIN_LENGTH
from evaluation.metrics import COLUMNS, STREAM_PREFIX, column
from evaluation.sources import TA, TP, UNKNOWN, EvalInputError, Sample, Skipped

CSV_NAME, SUMMARY_NAME, REPORT_NAME = "per_sample.csv", "summary.json", "report.md"
FINGERPRINT_NAME = "fingerprint.json"
HIST_NAME, EXAMPLES_DIR = "si_sdri_hist.png", "examples"
EXAMPLE_SECONDS = 30  # audio and spectrograms of the examples: at most the first 30 s
EXAMPLE_LABELS = ("best", "median", "worst")
# The worst confusions (estimate closer to an interferer) are examples too: confusion_1, ...
CONFUSION_LABEL, N_CONFUSION_EXAMPLES = "confusion", 2
ROW_FIELDS = ("id", "condition", "n_interferers", "snr_db", "ref_noisy", "sir_db", "seconds")
PERCENTILES = (5, 25, 75, 95)
BAD_SI_SDRI_DB = (0.0, -5.0)  # TP samples below these SI-SDRi: made worse, and badly
WER_COLUMNS = ("wer", "wer_mix", "wer_target", STREAM_PREFIX + "wer")
CSV_DECIMALS = 6
HIST_BIN_DB = 1.0
SPEC_DYNAMIC_RANGE_DB = 80.0  # spectrogram colour range below the loudest bin of the three
SPEC_EPS = 1e-10  # magnitude floor before the log (-200 dB)
FIGURE_DPI = 120
HZ_PER_KHZ = 1000.0
CONDITIONS = (TP, TA, UNKNOWN)

# Row fields that are not metrics, and their types in the CSV (empty cell: None); every other
# field but id, condition and notes is a float (empty cell: NaN).
META_TYPES: dict[str, type] = {"n_interferers": int, "snr_db": float, "ref_noisy": bool,
                               "sir_db": float, "seconds": float}
TEXT_FIELDS = ("id", "condition", "notes")

# The seed system's published results on its own 48 kHz test set (200 samples: 158 TP + 42 TA),
# not the samples of this evaluation: comparable in kind, not item by item (doc/design.md, "The
# seed system's results"). v2: 11.79 M parameters after 1.5 M steps on an RTX 4090, the figure a
# GPU run of the recipe must beat.
SEED_REFERENCES = (
    {"label": "seed v1 (doc/design.md; its own test set, 158 TP + 42 TA)",
     "si_sdr": -1.87, "si_sdri": 4.01, "pesq": 1.15, "stoi": 0.488,
     "ta_suppression_db": 11.2, "params": 7.8e6},
    {"label": "seed v2, 1.5 M steps (its own test set, 158 TP + 42 TA): the recipe's GPU target",
     "si_sdr": -1.71, "si_sdri": 4.18, "pesq": 1.14, "stoi": 0.489,
     "ta_suppression_db": 11.4, "params": 11.79e6},
)


# ---------------------------------------------------------------------------------------------
# Statistics
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


def corpus_wer(rows: Sequence[dict[str, Any]], name: str) -> float:
    """All word errors over all reference words of the rows with a finite ``name`` WER."""
    pairs = [(r[name], r["words"]) for r in rows
             if math.isfinite(r.get(name, math.nan)) and r.get("words", 0) > 0]
    words = sum(w for _, w in pairs)
    return sum(wer * w for wer, w in pairs) / words if words else math.nan


def snr_band(snr_db: float, edges: Sequence[float]) -> str:
    """The breakdown band of an SNR (or SIR): ``[lo,hi)``, the last band closed, outside
    ``<lo``/``>hi``."""
    if snr_db < edges[0]:
        return f"<{edges[0]:g}"
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = i == len(edges) - 2
        if lo <= snr_db < hi or (last and snr_db == hi):
            return f"[{lo:g},{hi:g}{']' if last else ')'}"
    return f">{edges[-1]:g}"


def group_names(row: dict[str, Any], edges: Sequence[float],
                sir_edges: Sequence[float] = ()) -> list[str]:
    """The breakdown groups a row belongs to (conditions the source does not know are left out):
    SNR bands by ``edges``, bands of the target over its loudest interferer by ``sir_edges``."""
    names = ["all", row["condition"]]
    if row.get("n_interferers") is not None:
        n = row["n_interferers"]
        names.append(f"{n} interferer{'s' if n != 1 else ''}")
    if row.get("snr_db") is not None:
        names.append(f"SNR {snr_band(row['snr_db'], edges)} dB")
    if sir_edges and row.get("sir_db") is not None:
        names.append(f"SIR {snr_band(row['sir_db'], sir_edges)} dB")
    if row.get("ref_noisy") is not None:
        names.append("noisy ref" if row["ref_noisy"] else "clean ref")
    return names


def _group_order(name: str) -> tuple[int, float, str]:
    """Sort key of the breakdown: all/conditions, interferers, SNR then SIR bands (ascending),
    refs."""
    if name == "all" or name in CONDITIONS:
        return (0, (("all", *CONDITIONS)).index(name), name)
    if "interferer" in name:
        return (1, float(name.split()[0]), name)
    for rank, kind in ((2, "SNR "), (3, "SIR ")):
        if name.startswith(kind):
            band = name.split()[1]
            lo = -math.inf if band.startswith("<") else float(band.strip("[>").split(",")[0])
            return (rank, lo, name)
    return (4, 0.0, name)


def bad_si_sdri(rows: Sequence[dict[str, Any]], key: str = "si_sdri") -> dict[str, Any]:
    """How many TP samples (with a finite SI-SDRi) the model made worse (< 0 dB: the wrong
    speaker or a failure) and badly worse (< -5 dB)."""
    vals = [r[key] for r in rows if r["condition"] == TP and math.isfinite(r.get(key, math.nan))]
    out: dict[str, Any] = {"n_tp": len(vals)}
    for edge in BAD_SI_SDRI_DB:
        count = sum(v < edge for v in vals)
        out[f"below_{edge:g}_db"] = {"count": count,
                                     "share": count / len(vals) if vals else math.nan}
    return out


def metric_failures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How many rows lost a metric (their ``notes``), and how often each reason occurs."""
    reasons: dict[str, int] = {}
    failed = 0
    for row in rows:
        notes = [n for n in row.get("notes", "").split("; ") if n]
        failed += bool(notes)
        for note in notes:
            reasons[note] = reasons.get(note, 0) + 1
    return {"n_items": failed, "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def summarize(rows: Sequence[dict[str, Any]], columns: Sequence[str],
              edges: Sequence[float], sir_edges: Sequence[float] = ()) -> dict[str, Any]:
    """Statistics of every column over all rows and per breakdown group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for name in group_names(row, edges, sir_edges):
            groups.setdefault(name, []).append(row)
    breakdown = {}
    for name in sorted(groups, key=_group_order):
        members = groups[name]
        breakdown[name] = {
            "n": len(members),
            **{f"n_{c.lower()}": sum(r["condition"] == c for r in members) for c in CONDITIONS},
            "metrics": {m: describe([r.get(m) for r in members]) for m in columns},
            "bad_si_sdri": bad_si_sdri(members),
            "wer": {w: corpus_wer(members, w) for w in WER_COLUMNS if w in columns},
        }
    summary = {
        "metrics": breakdown["all"]["metrics"],
        "bad_si_sdri": breakdown["all"]["bad_si_sdri"],
        "wer": breakdown["all"]["wer"],
        "metric_failures": metric_failures(rows),
        "breakdown": breakdown,
    }
    if STREAM_PREFIX + "si_sdri" in columns:
        summary["stream_bad_si_sdri"] = bad_si_sdri(rows, STREAM_PREFIX + "si_sdri")
    return summary


def pick_examples(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Row indices of the best, median and worst TP samples by SI-SDRi (ties: first row), then
    of the worst confusions (``confusion_1``..): up to ``N_CONFUSION_EXAMPLES`` TP samples
    whose estimate is closer to an interferer than to the target, the closest to an interferer
    (highest ``si_sdr_interferer``) first."""
    tp = [i for i, r in enumerate(rows)
          if r["condition"] == TP and math.isfinite(r.get("si_sdri", math.nan))]
    if not tp:
        return {}
    ranked = sorted(tp, key=lambda i: (-rows[i]["si_sdri"], i))  # best first
    picks = dict(zip(EXAMPLE_LABELS, (ranked[0], ranked[len(ranked) // 2], ranked[-1]),
                     strict=True))
    confused = sorted((i for i in tp if rows[i].get("confusion") == 1
                       and math.isfinite(rows[i].get("si_sdr_interferer", math.nan))),
                      key=lambda i: (-rows[i]["si_sdr_interferer"], i))
    for k, index in enumerate(confused[:N_CONFUSION_EXAMPLES], 1):
        picks[f"{CONFUSION_LABEL}_{k}"] = index
    return picks


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.{CSV_DECIMALS}f}"
    return str(value)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    """One line per sample; empty cells where a value does not apply or failed."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow([_csv_cell(row.get(k)) for k in fields])
    write_text_atomic(path, buf.getvalue())


def _parse_cell(field: str, cell: str) -> Any:
    if field in TEXT_FIELDS:
        return cell
    kind = META_TYPES.get(field)
    if kind is None:  # a metric: counts (fmt "d") stay integers
        if not cell:
            return math.nan
        metric = COLUMNS.get(field.removeprefix(STREAM_PREFIX))
        return int(cell) if metric is not None and metric.fmt == "d" else float(cell)
    if not cell:
        return None
    return bool(int(cell)) if kind is bool else kind(cell)


def row_from_cells(cells: dict[str, str], fields: Sequence[str]) -> dict[str, Any]:
    """A row as ``write_csv`` wrote it, typed again; ``ValueError`` for a malformed one."""
    return {k: _parse_cell(k, cells[k]) for k in fields}


def as_written(row: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """``row`` as it reads back from the CSV: the values every summary is computed from."""
    return row_from_cells({k: _csv_cell(row.get(k)) for k in fields}, fields)


def fingerprint_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in one line; None when they are equal."""
    keys = [k for k in dict.fromkeys([*stored, *current]) if stored.get(k) != current.get(k)]
    if not keys:
        return None
    return "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in keys)


def resume_rows(out_dir: Path, fields: Sequence[str],
                fingerprint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows already scored in ``out_dir`` by an evaluation with this ``fingerprint``, by ID
    (none in a new folder). A line cut short by a kill, or otherwise unreadable, is dropped (its
    ID is scored again) and the CSV is rewritten without it, so appends continue cleanly.
    Raises ``EvalInputError`` when the folder holds rows of other settings."""
    csv_path, fp_path = out_dir / CSV_NAME, out_dir / FINGERPRINT_NAME
    if not csv_path.exists():
        return {}
    if not fp_path.exists():
        raise EvalInputError(f"{csv_path}: results without {FINGERPRINT_NAME} (an older or "
                             "foreign evaluation): use another --out-dir, or remove them")
    try:
        stored = json.loads(fp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalInputError(f"{fp_path}: unreadable ({err})") from None
    if (diff := fingerprint_mismatch(stored, json_safe(fingerprint))) is not None:
        raise EvalInputError(f"{out_dir}: holds an evaluation with other settings ({diff}); "
                             "use another --out-dir")
    text = csv_path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # a kill in the middle of a row: that ID is scored again
    rows: dict[str, dict[str, Any]] = {}
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error:
        header = None
    if header != list(fields):
        raise EvalInputError(f"{csv_path}: its columns are not this evaluation's; use "
                             "another --out-dir")
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error:  # a damaged line (a NUL byte...): its ID is scored again
            continue
        try:
            if len(cells) != len(fields):
                raise ValueError("wrong number of cells")
            row = row_from_cells(dict(zip(fields, cells, strict=True)), fields)
        except ValueError:
            continue
        rows[row["id"]] = row
    write_csv(csv_path, list(rows.values()), fields)
    return rows


class RowWriter:
    """Appends rows to ``per_sample.csv``, each flushed at once. The fingerprint and the header
    are written with the first row, so a run that scores nothing leaves no file."""

    def __init__(self, out_dir: Path, fields: Sequence[str], fingerprint: dict[str, Any]) -> None:
        self.path = out_dir / CSV_NAME
        self.fields = list(fields)
        self.fingerprint = fingerprint
        self._file: io.TextIOWrapper | None = None

    def append(self, row: dict[str, Any]) -> None:
        if self._file is None:
            if not self.path.exists():
                write_text_atomic(self.path.parent / FINGERPRINT_NAME,
                           json.dumps(json_safe(self.fingerprint), indent=2) + "\n")
                write_csv(self.path, [], self.fields)
            self._file = self.path.open("a", newline="", encoding="utf-8")
        csv.writer(self._file, lineterminator="\n").writerow(
            [_csv_cell(row.get(k)) for k in self.fields])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def json_safe(value: Any) -> Any:
    """NaN/inf become null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _save_figure(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)


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


def plot_spectrograms(path: Path, signals: dict[str, np.ndarray], title: str,
                      sample_rate: int = SAMPLE_RATE) -> None:
    """Stacked log-magnitude spectrograms (the project's STFT, its 20 ms / 10 ms frames at any
    rate) on one colour scale and one time axis; a shorter signal (the reference, a recording
    of its own) ends early.

    Shape:
        signals: name -> (N_name,) at ``sample_rate``
    """
    scale = sample_rate / SAMPLE_RATE
    stft = STFT(n_fft=round(N_FFT * scale), win_length=round(WIN_LENGTH * scale),
                hop_length=round(HOP_LENGTH * scale))
    db = {
        name: 20 * np.log10(stft(torch.from_numpy(w)[None])[0].abs().numpy() + SPEC_EPS)
        for name, w in signals.items()
    }  # name -> (F, T)
    vmax = max(float(d.max()) for d in db.values())
    fig = Figure(figsize=(10.0, 2.4 * len(db)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(db), 1, sharex=True))
    image = None
    for ax, (name, d) in zip(axes, db.items(), strict=True):
        image = ax.imshow(d, origin="lower", aspect="auto", cmap="magma",
                          extent=(0.0, len(signals[name]) / sample_rate,
                                  0.0, sample_rate / 2 / HZ_PER_KHZ),
                          vmin=vmax - SPEC_DYNAMIC_RANGE_DB, vmax=vmax)
        ax.set_ylabel(f"{name}\nkHz")
    axes[-1].set_xlim(0.0, max(len(w) for w in signals.values()) / sample_rate)
    axes[-1].set_xlabel("time (s)")
    axes[0].set_title(title)
    fig.colorbar(image, ax=list(axes), label="dB")
    _save_figure(fig, path)


def write_examples(
    out_dir: Path,
    picks: dict[str, int],
    rows: Sequence[dict[str, Any]],
    estimate_of: Callable[[int], tuple[Sample, np.ndarray]],
) -> dict[str, Any]:
    """Audio and spectrograms of the picked samples; ``estimate_of(index)`` loads and extracts
    the sample again (deterministically) rather than keeping it in memory during the run."""
    examples: dict[str, Any] = {}
    extracted: dict[int, tuple[Sample, np.ndarray]] = {}
    for label, index in picks.items():
        if index not in extracted:  # one sample may be best, median and worst at once
            extracted[index] = estimate_of(index)
        sample, estimate = extracted[index]
        crop = EXAMPLE_SECONDS * sample.sample_rate
        # Long recordings: the first EXAMPLE_SECONDS (the spectrogram of an hour would not
        # fit in memory, nor help anyone listen).
        waves = {"mix": sample.mix[:crop], "ref": sample.ref, "estimate": estimate[:crop],
                 "target": sample.target[:crop]}
        audio = {}
        for name, wave in waves.items():
            rel = f"{EXAMPLES_DIR}/{label}_{name}.wav"
            save_audio(out_dir / rel, wave, sample.sample_rate)
            audio[name] = rel
        spec_rel = f"{EXAMPLES_DIR}/{label}_spectrogram.png"
        si_sdri = rows[index]["si_sdri"]
        plot_spectrograms(
            out_dir / spec_rel,
            {"mixture": waves["mix"], "reference": waves["ref"][:crop],
             "estimate": waves["estimate"], "target": waves["target"]},
            f"{label}: {sample.id}, SI-SDRi {si_sdri:+.2f} dB",
            sample.sample_rate,
        )
        examples[label] = {"id": sample.id, "si_sdri": si_sdri, "spectrogram": spec_rel,
                           "audio": audio}
    return examples


# ---------------------------------------------------------------------------------------------
# The report: blocks of content that report.md (here) and report.html (html_report.py) render
# ---------------------------------------------------------------------------------------------

# The text of a block is Markdown inline text whose only markup is `code` (the examples table of
# report.md adds links), so that report.html can render it after escaping it.


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Item:
    text: str
    sub: Sequence[str] = ()


@dataclass(frozen=True)
class Items:
    """A bullet list; an item may carry a list of its own, one level deep."""

    items: Sequence[str | Item]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True)
class Image:
    alt: str
    src: str  # relative to the report


@dataclass(frozen=True)
class Examples:
    """The picked samples as ``write_examples`` returns them: a table of links in report.md,
    spectrograms beside audio players in report.html."""

    examples: dict[str, Any]


Block = Heading | Paragraph | Items | Table | Image | Examples
NO_EXAMPLES = "No target-present sample with a finite SI-SDRi: no examples."


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:{spec}}{unit}"


def _stat(summary: dict[str, Any], name: str, key: str = "mean") -> str:
    stats = summary["metrics"].get(name)
    return "n/a" if stats is None else fmt(stats[key], column(name).fmt)


HEADLINE = ("si_sdr", "si_sdri", "pesq", "stoi", "ta_suppression_db")


def _headline(info: dict[str, Any], summary: dict[str, Any]) -> Table:
    lines = [["this checkpoint", *(_stat(summary, m) for m in HEADLINE),
              f"{info['generator_params'] / 1e6:.2f} M params"]]
    if info["settings"].get("chunk"):
        lines.append([f"chunked ({info['settings']['chunk']})",
                      *(_stat(summary, STREAM_PREFIX + m) for m in HEADLINE), ""])
    elif info["settings"].get("stream"):
        lines.append(["streamed (causal, hop by hop)",
                      *(_stat(summary, STREAM_PREFIX + m) for m in HEADLINE), ""])
    for ref in SEED_REFERENCES:
        lines.append([ref["label"], fmt(ref["si_sdr"]), fmt(ref["si_sdri"], "+.2f"),
                      fmt(ref["pesq"]), fmt(ref["stoi"], ".3f"),
                      fmt(ref["ta_suppression_db"], ".1f"), f"{ref['params'] / 1e6:.2f} M params"])
    return Table(["model", "SI-SDR (dB)", "SI-SDRi (dB)", "PESQ", "STOI", "TA suppression (dB)",
                  "generator"], lines)


def _pct(share: float) -> str:
    return fmt(100 * share, ".1f", " %")


def _truth_section(summary: dict[str, Any], columns: Sequence[str]) -> list[Block]:
    """Wrong speaker, target-free quality and WER: the estimate against what it started from."""
    lines: list[str] = []
    bad = summary["bad_si_sdri"]
    if bad["n_tp"]:
        below0, below5 = bad["below_0_db"], bad["below_-5_db"]
        lines += [f"TP samples made worse (SI-SDRi < 0 dB): {below0['count']} of {bad['n_tp']} "
                  f"({_pct(below0['share'])}); badly (< -5 dB): {below5['count']} "
                  f"({_pct(below5['share'])})"]
    if summary["metrics"].get("ref_sens_db", {}).get("n"):
        sens = summary["metrics"]["ref_sens_db"]
        lines += [f"reference swap ({sens['n']} TP samples whose interferers are known, run "
                  "once more with another sample's reference, another speaker's where speakers "
                  "are known): SI-SDRi "
                  f"{_stat(summary, 'si_sdri')} dB with their own, "
                  f"{_stat(summary, 'si_sdri_wrong_ref')} dB with the other; the two outputs "
                  f"differ by {_stat(summary, 'ref_sens_db')} dB (-100: identical, about +3: "
                  "two different voices)"]
    if summary["metrics"].get("confusion", {}).get("n"):
        conf = summary["metrics"]["confusion"]
        lines += [f"speaker confusion (estimate closer to an interferer than to the target, "
                  f"SI-SDR of the sources as heard): {_pct(conf['mean'])} of {conf['n']} TP "
                  "samples whose interferers are known"]
    pairs = [("speaker similarity to the reference (GE2E cosine)", "spk_sim_ref", "spk_sim_mix"),
             ("DNSMOS OVRL", "dnsmos_ovrl", "dnsmos_ovrl_mix"),
             ("personalised DNSMOS OVRL", "pdnsmos_ovrl", "pdnsmos_ovrl_mix")]
    table = [[label, _stat(summary, est), _stat(summary, mix)]
             for label, est, mix in pairs if est in columns]
    if "spk_sim_target" in columns:
        table.append(["speaker similarity to the target", _stat(summary, "spk_sim_target"), ""])
    wer = summary["wer"]
    if wer and any(math.isfinite(v) for v in wer.values()):
        table.append(["WER (corpus: all errors / all reference words)",
                      fmt(wer.get("wer"), ".3f"), fmt(wer.get("wer_mix"), ".3f")])
        table.append(["WER of the clean target (the recogniser's floor)",
                      fmt(wer.get("wer_target"), ".3f"), ""])
    blocks: list[Block] = [Items(lines)] if lines else []
    if table:
        blocks.append(Table(["measure (mean)", "estimate", "mixture"], table))
    if not blocks:
        return []
    return [Heading("Wrong speaker, quality without a target, words"), *blocks]


def _stream_section(info: dict[str, Any], summary: dict[str, Any],
                    columns: Sequence[str]) -> list[Block]:
    names = [c.removeprefix(STREAM_PREFIX) for c in columns if c.startswith(STREAM_PREFIX)]
    if not names:
        return []
    rows = []
    for name in names:
        whole, other = (summary["metrics"][n]["mean"] for n in (name, STREAM_PREFIX + name))
        diff = other - whole if math.isfinite(whole) and math.isfinite(other) else math.nan
        spec = column(name).fmt.lstrip("+")
        rows.append([column(name).label, fmt(whole, spec), fmt(other, spec),
                     fmt(diff, "+" + spec)])
    if info["settings"].get("stream"):
        title, kind, how = ("Streamed extraction: causal, hop by hop", "streamed",
                            "The mixture pushed one hop at a time through the causal model, "
                            "as a live system runs it (`Extractor.extract_streamed`).")
    else:
        title, kind, how = (f"Chunked (streaming) extraction: {info['settings']['chunk']}",
                            "chunked", "Each chunk extracted alone at its own level, with the one "
                            "reference embedding, and cross-faded back together "
                            "(`Extractor.extract_chunked`).")
    return [Heading(title), Paragraph(how),
            Table(["metric (mean)", "whole file", kind, "difference"], rows)]


def report_blocks(info: dict[str, Any], summary: dict[str, Any], rows: Sequence[dict],
                  columns: Sequence[str]) -> list[Block]:
    """The report's content: headline (as doc/design.md's seed results), wrong speaker and
    target-free measures, chunked extraction, distributions, breakdown, skipped inputs,
    failures, histogram and examples."""
    whole = [c for c in columns if not c.startswith(STREAM_PREFIX)]
    stream_kind = "streamed" if info["settings"].get("stream") else "chunked"
    counts = ", ".join(f"{info[f'n_{c.lower()}']} {c}" for c in CONDITIONS
                       if info[f"n_{c.lower()}"])
    blocks: list[Block] = [
        Heading("HiFi-TSE evaluation", 1),
        Items([
            f"checkpoint: `{info['checkpoint']}`"
            + (f" (step {info['step']})" if info.get("step") is not None else "")
            + f", weights: {info['weights']}",
            f"samples: {info['source']}: {info['n_samples']} ({counts})",
            f"generator: {info['generator_params']:,} parameters ({info['arch']})",
            *([f"sample rate: {info['settings']['sample_rate'] / 1000:g} kHz (the model's; "
               "every file is resampled to it)"] if info["settings"].get("sample_rate") else []),
            *(f"{k}: {v}" for k, v in info["settings"].items()
              if k not in ("snr_band_edges_db", "sir_band_edges_db", "sample_rate",
                           "long_inputs", "not_applicable") and v not in (None, False)),
            Item("long recordings (above 60 s):",
                 [f"{unit}: {rule}" for unit, rule in info["settings"]["long_inputs"].items()]),
            *([Item("metrics left out:",
                    [f"{unit}: {why}" for unit, why in info["settings"]["not_applicable"].items()])]
              if info["settings"].get("not_applicable") else []),
        ]),
        Heading("Headline (means)"),
        _headline(info, summary),
        *([Heading("In the published convention (standard set)"), Items(info["convention"])]
          if info.get("convention") else []),
        *_truth_section(summary, columns),
        *_stream_section(info, summary, columns),
        Heading("Distributions"),
        Table(
            ["metric", "n", "mean", "median", "std", *(f"p{p}" for p in PERCENTILES)],
            [
                [column(m).label + (f" ({stream_kind})" if m.startswith(STREAM_PREFIX) else ""),
                 str(s["n"]),
                 *(fmt(s[k], column(m).fmt.lstrip("+"))
                   for k in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES)))]
                for m in columns if m != "words"
                for s in [summary["metrics"][m]] if s["n"]
            ],
        ),
        Heading("Breakdown (means)"),
        Table(
            ["group", *CONDITIONS, *(column(m).label for m in whole if m != "words"),
             "SI-SDRi < 0"],
            [
                [name, *(str(g[f"n_{c.lower()}"]) for c in CONDITIONS),
                 *(fmt(g["metrics"][m]["mean"], column(m).fmt) for m in whole if m != "words"),
                 _pct(g["bad_si_sdri"]["below_0_db"]["share"])]
                for name, g in summary["breakdown"].items()
            ],
        ),
    ]
    skipped: list[Skipped] = info["skipped"]
    if skipped:
        blocks += [Heading("Inputs skipped"),
                   Paragraph(f"{len(skipped)} sample{'s' if len(skipped) != 1 else ''} "
                             "not scored:"),
                   Items([f"`{k.id}`: {k.problem}" for k in skipped])]
    failures = [(r["id"], r["notes"]) for r in rows if r.get("notes")]
    if failures:
        failed = summary["metric_failures"]
        blocks += [Heading("Metrics that failed (NaN)"),
                   Paragraph(f"{failed['n_items']} of {len(rows)} samples lost at least one "
                             "metric:"),
                   Table(["reason", "samples"],
                         [[r, str(n)] for r, n in failed["reasons"].items()]),
                   Items([f"`{i}`: {n}" for i, n in failures])]
    blocks += [Heading("Figures and audio"), Image("SI-SDRi histogram", HIST_NAME),
               Examples(info["examples"]) if info["examples"] else Paragraph(NO_EXAMPLES)]
    return blocks


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in lines),
    ]


def _markdown(block: Block) -> list[str]:
    match block:
        case Heading(text, level):
            return [f"{'#' * level} {text}"]
        case Paragraph(text):
            return [text]
        case Items(items):
            lines = []
            for item in items:
                item = item if isinstance(item, Item) else Item(item)
                lines += [f"- {item.text}", *(f"  - {sub}" for sub in item.sub)]
            return lines
        case Table(header, rows):
            return _markdown_table(header, rows)
        case Image(alt, src):
            return [f"![{alt}]({src})"]
        case Examples(examples):
            return _markdown_table(
                ["example", "id", "SI-SDRi", "spectrogram", "audio"],
                [[label, f"`{ex['id']}`", fmt(ex["si_sdri"], "+.2f", " dB"),
                  f"[png]({ex['spectrogram']})",
                  " ".join(f"[{k}]({v})" for k, v in ex["audio"].items())]
                 for label, ex in examples.items()])
    raise TypeError(f"not a report block: {block!r}")


def render_report(info: dict[str, Any], summary: dict[str, Any], rows: Sequence[dict],
                  columns: Sequence[str]) -> str:
    """The Markdown report (``report_blocks``), blocks one blank line apart."""
    blocks = report_blocks(info, summary, rows, columns)
    return "\n\n".join("\n".join(_markdown(b)) for b in blocks) + "\n"
