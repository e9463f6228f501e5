"""Where evaluation samples come from: the fixed validation list, triplet folders and CSV lists.

* the validation list of ``HiFiTSEDataset`` (split ``val``): the first ``n`` entries, the same
  every run, with their conditions (TP/TA, interferers, SNR, noisy reference) and their sources
  as heard in the mixture (target and interferers), which speaker confusion needs;
* a triplet folder, in either layout:
  - flat: ``ID-mixed.wav``, ``ID-ref.wav`` and, when the target is known, ``ID-target.wav``;
  - three folders (the SpEx+ homework protocol): ``mix/ID-mixed.wav``, ``refs/ID-ref.wav``,
    ``targets/ID-target.wav``;
  optional ``ID-interferer<K>.wav`` beside the target (interferers as heard in the mixture),
  ``ID-ref<K>.wav`` beside the reference (more references of the target speaker, pooled with
  it: ``inference.py --ref a --ref b``, K = 2, 3, ..) and ``ID.txt`` beside the mixture (or
  in the root folder) holding the target's transcript;
* a standard set's split (``standard_samples``; data/standard_sets.py): its (mixture, target)
  pairs with their listed enrollments;
* a CSV list: rows of (mix, ref, target) paths, relative to the CSV's folder, with a header
  naming the columns ``mix``, ``ref``, ``target`` (optionally ``id``, ``transcript``) or none
  (then in that order).

A missing target means, by ``missing_target``: ``absent``, a target-absent (TA) sample whose
estimate should be silent (simulated sets); or ``unknown``, a real recording whose target was
never recorded apart, scored only by the metrics that need no target (DNSMOS, speaker
similarity to the reference, WER with a transcript). An all-zero target file is always TA.

Files may have any sample rate, sample format and channel count: ``load_audio`` downmixes and
resamples them to the model's rate (``sample_rate``, 48 kHz by default). The target is cut or
zero-padded to the mixture's length (they may be at most ``MAX_LENGTH_MISMATCH_SECONDS`` apart).
Of a reference only the first ``extraction.reference.MAX_REF_SECONDS`` are read.

A bad sample costs that sample, not the run: the listing functions return, beside the sources,
the ``Skipped`` samples, each with one line naming its file and the problem (a missing mixture
or reference, a duplicate ID, an unreadable, empty or too short file, a target whose length is
not its mixture's, a reference that cannot identify the target). Problems that need the samples
themselves (NaN or Inf in a file, a target-present sample whose target is silent) surface when
the sample is loaded, as ``AudioError`` or ``EvalInputError``, which the runner turns into a
skip. ``strict`` raises the first problem instead (the behaviour before skipping existed).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from config import Config
from data.dataset import HiFiTSEDataset, dataset_kwargs
from data.standard_sets import StandardSet
from dsp.audio import SAMPLE_RATE, AudioError, load_audio
from evaluation.signal import BLOCK_SAMPLES
from extraction.reference import MIN_REF_PEAK_DBFS, REF_FRAME_SECONDS, read_reference

log = logging.getLogger("evaluate")

MIX_SUFFIX, REF_SUFFIX, TARGET_SUFFIX = "-mixed.wav", "-ref.wav", "-target.wav"
INTERFERER = re.compile(r"^(?P<id>.+)-interferer(?P<k>\d+)\.wav$")
EXTRA_REF = re.compile(r"^(?P<id>.+)-ref(?P<k>\d+)\.wav$")
THREE_FOLDERS = ("mix", "refs", "targets")
CSV_COLUMNS = ("mix", "ref", "target")
# A target whose peak stays below this (-120 dBFS, under one 24-bit LSB) is digital silence: TA.
SILENT_PEAK = 1e-6
# Mixture and target may differ by this much after resampling (rounding of other sample rates);
# a larger difference means the files do not belong together.
MAX_LENGTH_MISMATCH_SECONDS = 0.05
# A mixture shorter than this cannot be scored: PESQ needs about 0.25 s of speech, STOI 30 frames
# of 25.6 ms (0.4 s) after its silence removal.
MIN_MIX_SECONDS = 0.5
# A target-present sample whose target has no 100 ms reaching the reference's voice threshold
# (-60 dBFS RMS) is silent: its SI-SDR is undefined (any estimate scores against noise floor).
SILENT_TARGET_DBFS = MIN_REF_PEAK_DBFS
LEVEL_BLOCK_FRAMES = 4096  # frames per block of the loudness scan (bounded memory)
VAL_ID_FORMAT = "val{:05d}"
MISSING_TARGET = ("absent", "unknown")
TP, TA, UNKNOWN = "TP", "TA", "unknown"  # the conditions a sample can have


class EvalInputError(ValueError):
    """Evaluation input that cannot be used (a folder without triplets, a malformed CSV...);
    the message names the file."""


@dataclass(frozen=True)
class Skipped:
    """A sample that was not scored, and why: one line that names the file."""

    id: str
    problem: str


def one_line(err: BaseException) -> str:
    """An error as one line: its message with every run of whitespace made one space."""
    return " ".join(str(err).split())


def loudest_frame_db(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """The level (dBFS RMS) of the loudest ``REF_FRAME_SECONDS`` frame, scanned in blocks;
    -inf for digital silence. Shape: wave (N,)."""
    frame = round(REF_FRAME_SECONDS * sample_rate)
    step = frame * LEVEL_BLOCK_FRAMES
    loudest = 0.0
    for start in range(0, len(wave) // frame * frame, step):
        block = np.asarray(wave[start : min(start + step, len(wave) // frame * frame)])
        power = np.square(block.reshape(-1, frame), dtype=np.float64).mean(axis=1)  # (frames,)
        loudest = max(loudest, float(power.max()))
    return 10 * math.log10(loudest) if loudest > 0 else -math.inf


def _peak(wave: np.ndarray) -> float:
    """The largest magnitude of ``wave``, in blocks. Shape: wave (N,)."""
    step = BLOCK_SAMPLES
    return max((float(np.abs(wave[i : i + step]).max()) for i in range(0, len(wave), step)),
               default=0.0)


def check_target(wave: np.ndarray, name: str | Path, sample_rate: int = SAMPLE_RATE) -> None:
    """Refuse a target-present sample whose target is silent (SI-SDR undefined)."""
    level = loudest_frame_db(wave, sample_rate)
    if level < SILENT_TARGET_DBFS:
        raise EvalInputError(
            f"{name}: the target is silent (its loudest {REF_FRAME_SECONDS:g} s at "
            f"{level:.1f} dBFS, below {SILENT_TARGET_DBFS:g}): SI-SDR is undefined, not scored"
        )


@dataclass
class Sample:
    """One evaluation sample at the model's rate.

    ``target`` is ``None`` when the sample has no target: ``condition`` says whether it is
    absent (TA) or unknown (a real recording). ``heard`` are the sources as heard in the
    mixture, target first, then the interferers, when the set stores them (speaker confusion);
    for files, the target and the ``ID-interferer<K>.wav`` files. ``meta`` holds the validation
    set's conditions (``n_interferers``, ``snr_db``, ``ref_noisy``).

    Shape:
        mix, target: (N,); ref: (M,); heard: (1 + K, N); extra_refs: each (M_k,)
    """

    id: str
    mix: np.ndarray
    ref: np.ndarray
    target: np.ndarray | None
    condition: str = TP
    heard: np.ndarray | None = None
    transcript: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extra_refs: tuple[np.ndarray, ...] = ()  # more references of the target, pooled with ref
    sample_rate: int = SAMPLE_RATE  # of every signal above

    def scaled(self, gain: float) -> Sample:
        """The same sample with the mixture and everything compared with it times ``gain``
        (the reference keeps its level: it is a separate recording)."""

        def times(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else (x * gain).astype(np.float32)

        return Sample(self.id, times(self.mix), self.ref, times(self.target), self.condition,
                      times(self.heard), self.transcript, self.meta, self.extra_refs,
                      self.sample_rate)


@dataclass
class SampleSource:
    """A sample that is read (or mixed) only when ``load`` is called: a run holds one at a time,
    and the examples are loaded again at the end instead of being kept."""

    id: str
    load: Callable[[], Sample]
    transcribed: bool = False  # the sample comes with its target's transcript


# ---------------------------------------------------------------------------------------------
# The validation set
# ---------------------------------------------------------------------------------------------


def _validation_item(dataset: HiFiTSEDataset, index: int) -> Sample:
    item = dataset[index]
    is_ta = bool(item["is_ta"])
    if not is_ta:
        check_target(item["target"].numpy(), f"{VAL_ID_FORMAT.format(index)} (validation item)",
                     dataset.sample_rate)
    heard = np.concatenate([item["comp_target"].numpy()[None], item["comp_interferers"].numpy()])
    return Sample(
        id=VAL_ID_FORMAT.format(index),
        mix=item["mix"].numpy(),
        ref=item["ref"].numpy(),
        target=None if is_ta else item["target"].numpy(),
        condition=TA if is_ta else TP,
        heard=None if is_ta else heard,
        meta={
            "n_interferers": int(item["n_interferers"]),
            "snr_db": float(item["snr_db"]),
            "ref_noisy": bool(item["ref_noisy"]),
            "speaker": item["speaker"],
        },
        sample_rate=dataset.sample_rate,
    )


def validation_samples(cfg: Config, n_samples: int) -> list[SampleSource]:
    """The first ``n_samples`` of the fixed validation list (the same list every run)."""
    kwargs = {**dataset_kwargs(cfg.data, "val", sample_rate=cfg.stft.sample_rate),
              "length": n_samples, "return_components": True}
    dataset = HiFiTSEDataset(**kwargs)
    return [
        SampleSource(VAL_ID_FORMAT.format(i), partial(_validation_item, dataset, i))
        for i in range(n_samples)
    ]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass
class SampleFiles:
    """The files of one sample; ``target`` is ``None`` when there is none."""

    id: str
    mix: Path
    ref: Path
    target: Path | None = None
    interferers: list[Path] = field(default_factory=list)
    transcript: str | None = None
    extra_refs: list[Path] = field(default_factory=list)


def _audio_seconds(path: Path) -> float:
    """The duration of an audio file from its header: fail early, before any model time is
    spent, on a missing, undecodable or empty file."""
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{path}: unreadable audio ({one_line(err)})") from None
    if info.frames == 0:
        raise AudioError(f"{path}: empty audio")
    return info.frames / info.samplerate


def _check_length(path: Path, seconds: float, mix_path: Path, mix_seconds: float) -> None:
    """A target or interferer more than a few ms of resampling rounding longer or shorter than
    its mixture does not belong to it."""
    if abs(seconds - mix_seconds) > MAX_LENGTH_MISMATCH_SECONDS:
        raise EvalInputError(f"{path}: {seconds:.3f} s long, but its mixture {mix_path.name} "
                             f"is {mix_seconds:.3f} s")


def _fit(path: Path, wave: np.ndarray, mix_path: Path, n: int, sample_rate: int) -> np.ndarray:
    """``wave`` cut or zero-padded to the mixture's ``n`` samples (a few ms of resampling
    rounding); a larger difference means the files do not belong together."""
    _check_length(path, len(wave) / sample_rate, mix_path, n / sample_rate)
    return np.pad(wave[:n], (0, max(0, n - len(wave))))


def _load_reference(path: Path, sample_rate: int) -> np.ndarray:
    """The used part of a reference (its first ``MAX_REF_SECONDS``) at ``sample_rate``."""
    wave, sr = read_reference(path)
    return wave if sr == sample_rate else soxr.resample(wave, sr, sample_rate).astype(np.float32)


def _load_files(files: SampleFiles, missing_target: str, sample_rate: int) -> Sample:
    mix = load_audio(files.mix, sample_rate)
    ref = _load_reference(files.ref, sample_rate)
    target, condition = None, TA if missing_target == "absent" else UNKNOWN

    def fitted(path: Path) -> np.ndarray:
        return _fit(path, load_audio(path, sample_rate), files.mix, len(mix), sample_rate)

    if files.target is not None:
        wave = fitted(files.target)
        if _peak(wave) > SILENT_PEAK:
            check_target(wave, files.target, sample_rate)
            target, condition = wave, TP
        else:
            condition = TA
    heard = None
    if target is not None and files.interferers:
        heard = np.stack([target, *(fitted(p) for p in files.interferers)])
    return Sample(id=files.id, mix=mix, ref=ref, target=target, condition=condition, heard=heard,
                  transcript=files.transcript,
                  extra_refs=tuple(_load_reference(p, sample_rate) for p in files.extra_refs),
                  sample_rate=sample_rate)


def _file_source(files: SampleFiles, missing_target: str, sample_rate: int) -> SampleSource:
    """The source of a sample's files after the checks that need no samples (headers, lengths,
    the reference's voice); raises ``AudioError``/``EvalInputError`` naming the file."""
    mix_seconds = _audio_seconds(files.mix)
    if mix_seconds < MIN_MIX_SECONDS:
        raise EvalInputError(f"{files.mix}: {mix_seconds:.3f} s long, shorter than the "
                             f"{MIN_MIX_SECONDS:g} s a mixture needs to be scored")
    for ref in (files.ref, *files.extra_refs):
        _audio_seconds(ref)
    for path in (files.target, *files.interferers):
        if path is not None:
            _check_length(path, _audio_seconds(path), files.mix, mix_seconds)
    try:
        for ref in (files.ref, *files.extra_refs):
            read_reference(ref)  # refused now rather than after the samples before it ran
    except AudioError as err:  # too short or voiceless: bad evaluation input
        raise EvalInputError(str(err)) from None
    return SampleSource(files.id, partial(_load_files, files, missing_target, sample_rate),
                        transcribed=files.transcript is not None)


def _read_transcript(path: Path) -> str:
    try:
        return " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path}: cannot read the transcript ({err})") from None


class _Listing:
    """Sources and skipped samples of a listing, loaded at ``sample_rate``; ``strict`` raises
    the first problem instead."""

    def __init__(self, strict: bool, missing_target: str, sample_rate: int) -> None:
        self.strict = strict
        self.missing_target = missing_target
        self.sample_rate = sample_rate
        self.sources: list[SampleSource] = []
        self.skipped: list[Skipped] = []

    def skip(self, sample_id: str, err: Exception) -> None:
        if self.strict:
            raise err
        self.skipped.append(Skipped(sample_id, one_line(err)))

    def add(self, files: SampleFiles) -> None:
        try:
            self.sources.append(_file_source(files, self.missing_target, self.sample_rate))
        except (AudioError, EvalInputError) as err:
            self.skip(files.id, err)


def triplet_samples(folder: Path, *, missing_target: str = "absent", strict: bool = False,
                    sample_rate: int = SAMPLE_RATE) -> tuple[list[SampleSource], list[Skipped]]:
    """Every ``ID-mixed.wav`` of ``folder`` (flat) or of ``folder/mix`` (three folders) with
    its reference, optional target, interferers and transcript, sorted by ID; and the samples
    skipped (a reference or target without its mixture counts as one, named by its ID)."""
    if not folder.is_dir():
        raise EvalInputError(f"{folder}: no such folder")
    three = all((folder / name).is_dir() for name in THREE_FOLDERS)
    mix_dir, ref_dir, target_dir = ((folder / n for n in THREE_FOLDERS) if three
                                    else (folder, folder, folder))
    mixes = sorted(mix_dir.glob(f"*{MIX_SUFFIX}"))
    if not mixes:
        raise EvalInputError(
            f"{folder}: no triplets (ID{MIX_SUFFIX} + ID{REF_SUFFIX} [+ ID{TARGET_SUFFIX}], "
            f"in one folder or in {'/, '.join(THREE_FOLDERS)}/)"
        )
    interferers: dict[str, list[tuple[int, Path]]] = {}
    for path in target_dir.glob("*-interferer*.wav"):
        if match := INTERFERER.match(path.name):
            interferers.setdefault(match["id"], []).append((int(match["k"]), path))
    extra_refs: dict[str, list[tuple[int, Path]]] = {}
    for path in ref_dir.glob("*-ref*.wav"):
        if match := EXTRA_REF.match(path.name):
            extra_refs.setdefault(match["id"], []).append((int(match["k"]), path))
    listing = _Listing(strict, missing_target, sample_rate)
    ids = [m.name[: -len(MIX_SUFFIX)] for m in mixes]
    for sample_id, mix_path in zip(ids, mixes, strict=True):
        ref_path = ref_dir / f"{sample_id}{REF_SUFFIX}"
        if not ref_path.is_file():
            listing.skip(sample_id, AudioError(
                f"{ref_path}: no such file (the reference of {mix_path.name})"))
            continue
        target_path = target_dir / f"{sample_id}{TARGET_SUFFIX}"
        text = next((p for p in (mix_dir / f"{sample_id}.txt", folder / f"{sample_id}.txt")
                     if p.is_file()), None)
        try:
            transcript = None if text is None else _read_transcript(text)
        except EvalInputError as err:
            listing.skip(sample_id, err)
            continue
        listing.add(SampleFiles(
            id=sample_id, mix=mix_path, ref=ref_path,
            target=target_path if target_path.exists() else None,
            interferers=[p for _, p in sorted(interferers.get(sample_id, []))],
            transcript=transcript,
            extra_refs=[p for _, p in sorted(extra_refs.get(sample_id, []))],
        ))
    known = set(ids)
    orphans = {
        p.name[: -len(suffix)]: p
        for d, suffix in ((target_dir, TARGET_SUFFIX), (ref_dir, REF_SUFFIX))
        for p in sorted(d.glob(f"*{suffix}")) if p.name[: -len(suffix)] not in known
    }
    for sample_id, path in sorted(orphans.items()):
        listing.skip(sample_id, AudioError(
            f"{path}: no mixture {sample_id}{MIX_SUFFIX} in {mix_dir}"))
    return listing.sources, listing.skipped


def csv_samples(path: Path, *, missing_target: str = "absent", strict: bool = False,
                sample_rate: int = SAMPLE_RATE) -> tuple[list[SampleSource], list[Skipped]]:
    """The (mix, ref, target[, id, transcript]) rows of a CSV file (module docstring), and the
    rows skipped; a row whose ID an earlier row has is skipped (IDs name the rows of the
    results, and a resumed run skips the IDs it has)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path}: cannot read the CSV ({err})") from None
    reader = csv.reader(io.StringIO(text))
    columns: dict[str, int] | None = None
    listing = _Listing(strict, missing_target, sample_rate)
    first_line: dict[str, int] = {}
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
                wanted = (*CSV_COLUMNS, "id", "transcript")
                columns = {name: names.index(name) for name in wanted if name in names}
                continue
            columns = {name: i for i, name in enumerate(CSV_COLUMNS)}
        get = {k: cells[i] if i < len(cells) else "" for k, i in columns.items()}
        if not get["mix"] or not get["ref"]:
            listing.skip(f"line {reader.line_num}",
                         EvalInputError(f"{where}: expected mix and ref paths, got {row}"))
            continue
        mix, ref = (_csv_path(path, get[k]) for k in ("mix", "ref"))
        target = _csv_path(path, get["target"]) if get.get("target") else None
        sample_id = get.get("id") or mix.name.removesuffix(MIX_SUFFIX).removesuffix(mix.suffix)
        if sample_id in first_line:
            listing.skip(sample_id, EvalInputError(
                f"{where}: duplicate ID '{sample_id}' (first on line {first_line[sample_id]}; "
                "give the rows an id column)"))
            continue
        first_line[sample_id] = reader.line_num
        listing.add(SampleFiles(id=sample_id, mix=mix, ref=ref, target=target,
                                transcript=get.get("transcript") or None))
    if not listing.sources and not listing.skipped:
        raise EvalInputError(f"{path}: no samples in the CSV")
    return listing.sources, listing.skipped


def standard_samples(standard: StandardSet, *, strict: bool = False,
                     sample_rate: int = SAMPLE_RATE) -> tuple[list[SampleSource], list[Skipped]]:
    """The (mixture, target) pairs of a standard set (data/standard_sets.py), each with its
    listed enrollment as the reference and the set's scored target, its other sources as the
    interferers; the rows its reader could not use, and pairs without a listed enrollment,
    are skipped samples."""
    if standard.sample_rate != sample_rate:
        raise EvalInputError(f"{standard.name} is at {standard.sample_rate} Hz, the model at "
                             f"{sample_rate} Hz: evaluate a model trained at the set's rate")
    listing = _Listing(strict, "absent", sample_rate)
    for number, line in enumerate(standard.skipped, 1):
        listing.skip(f"row {number}", EvalInputError(line))
    for item in standard.items:
        if item.enrollment is None:
            listing.skip(item.id, EvalInputError(
                f"{item.mix}: no enrollment listed for {item.id} (standard.enrollment_map)"))
            continue
        listing.add(SampleFiles(id=item.id, mix=item.mix, ref=item.enrollment,
                                target=item.target, interferers=list(item.interferers)))
    return listing.sources, listing.skipped


def _csv_path(csv_file: Path, cell: str) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else csv_file.parent / path


def read_transcripts(path: Path) -> dict[str, str]:
    """A transcript file in Kaldi's ``text`` format: one ``ID words...`` line per sample."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path}: cannot read the transcripts ({err})") from None
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if parts[0] in out:
            raise EvalInputError(f"{path}:{number}: transcript of {parts[0]} given twice")
        out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


def with_transcripts(sources: list[SampleSource], transcripts: dict[str, str],
                     name: Path, skipped: Collection[str] = ()) -> list[SampleSource]:
    """The sources with the transcripts of ``--transcripts`` (they replace ``ID.txt`` files);
    an ID of the file that names no sample is an error (a typo would silently drop a WER)."""
    ids = {s.id for s in sources} | set(skipped)
    unknown = sorted(set(transcripts) - ids)
    if unknown:
        raise EvalInputError(f"{name}: transcripts of unknown samples: {', '.join(unknown[:5])}")

    def load(source: SampleSource) -> Sample:
        sample = source.load()
        sample.transcript = transcripts.get(sample.id, sample.transcript)
        return sample

    return [SampleSource(s.id, partial(load, s), s.transcribed or s.id in transcripts)
            for s in sources]
