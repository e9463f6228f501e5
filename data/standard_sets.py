"""Readers of the standard target-speaker-extraction sets in their official file layouts.

Each reader turns one published layout (doc/standard_sets.md §5; the formats are followed, no
code is copied) into a :class:`StandardSet`: one item per (mixture, target speaker) with its
mixture, scored target and enrollment files, the rate of the layout, what kind of target is
scored, a pool of clean utterances per speaker, and one line for every row that could not be
used.

* ``read_librimix``: a ``Libri2Mix``/``Libri3Mix`` tree and its metadata CSV (§5.1), with
  enrollments from the BUT SpeakerBeam map (§5.2) or ESPnet ``enroll_spk*.scp`` lists (§5.3);
* ``read_spex_lists``: the SpEx+ WSJ0-2mix TSE lists ``mix.scp``/``ref.scp``/``aux.scp`` (§5.4);
* ``read_wsj0_2mix_extr``: the original WSJ0-2mix-extr ``mix``/``aux``/``s1`` folders (§5.5);
* ``read_whamr``: the WHAMR! tree, with targets and enrollments from a SpEx+-style list (§5.6).

Two kinds of failure: a layout that cannot be read at all (a missing folder or list file, a
header or list line that is not the published format) raises :class:`SetLayoutError` naming the
file; a well-formed row that cannot be used (a missing audio file, a list line for an unknown
mixture, an enrollment that is the target utterance itself) is left out and described in
``StandardSet.skipped``. The readers look at file names and list text only; no audio is opened,
so the sample rate of a file is the layout's promise, not checked here.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RATES = {"8k": 8000, "16k": 16000}  # the wav{rate} folder names of LibriMix and WHAMR!
MODES = ("min", "max")  # mixtures cut to the shortest source, or padded to the longest
TARGET_KINDS = ("dry", "reverberant")

LIBRIMIX_N_SRC = (2, 3)
LIBRIMIX_MIX_TYPES = ("mix_clean", "mix_both", "mix_single")
LIBRIMIX_SPLITS = ("train-100", "train-360", "dev", "test")
# A newer LibriMix generator (branch augmentation_fix) adds this column after mixture_ID.
LIBRIMIX_OPTIONAL_COLUMN = "original_mixture_ID"

WSJ0_SPLITS = ("tr", "cv", "tt")
WSJ0_2MIX_RATE = 8000  # the SpEx+ lists and WSJ0-2mix-extr are 8 kHz only
WSJ0_SPEAKER_CHARS = 3  # a WSJ0 utterance id starts with its 3-character speaker id
SPEX_LISTS = ("mix.scp", "ref.scp", "aux.scp")
SPEX_SOURCES = ("s1", "s2")
KEY_SAMPLE = 3  # how many missing keys a key-mismatch error quotes

WHAMR_MIX_TYPES = (
    "mix_both_anechoic", "mix_clean_anechoic", "mix_single_anechoic",
    "mix_both_reverb", "mix_clean_reverb", "mix_single_reverb",
)
WHAMR_TARGETS = {"anechoic": "dry", "reverb": "reverberant"}  # s{k}_<target> -> target_kind
# The reference folder of a list line: wsj0-2mix "s1" (SpEx+ lists) or WHAMR! "s1_anechoic".
_REF_FOLDER = re.compile(r"^s([12])(?:_(?:anechoic|reverb))?$")
# A BUT SpeakerBeam enrollment_ID: "s<k>/<mixture_ID>", a source file of another mixture.
_MAP_ENROLLMENT = re.compile(r"^s(\d+)/(.+)$")
# An ESPnet training enroll_spk*.scp entry "*<uttID> <spkID>": drawn on the fly, no file.
ESPNET_ON_THE_FLY = "*"


class SetLayoutError(ValueError):
    """A set layout that cannot be read at all (names the file and the problem)."""


@dataclass(frozen=True)
class SetItem:
    """One (mixture, target speaker) pair of a standard set."""

    id: str  # unique per (mixture, target): "<mixture_ID>_s1" (LibriMix), the list key (SpEx+)
    mix: Path
    target: Path  # the scored target file (dry or as heard: see StandardSet.target_kind)
    enrollment: Path | None  # None only where the layout draws it (StandardSet.enrollment_pool)
    speaker: str  # target speaker id
    interferers: tuple[Path, ...] = ()  # the other speakers' files where the layout has them


@dataclass
class StandardSet:
    """The items of one standard set, read from its official layout."""

    name: str  # e.g. "Libri2Mix 8k min mix_both test"
    sample_rate: int  # from the layout (folder name), not from the files
    target_kind: str  # one of TARGET_KINDS: what the scored target is
    items: list[SetItem]
    enrollment_pool: dict[str, list[Path]]  # speaker -> clean utterances of the split
    skipped: list[str]  # one line per unusable row: file (and line), then the problem


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _check_choice(name: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise SetLayoutError(f"{path}: {what} folder not found")


def _read_scp(path: Path) -> dict[str, tuple[int, str]]:
    """key -> (line number, value) of a Kaldi-style ``<key> <value>`` list (blank lines skipped).

    A line without a value or a repeated key means the file is not such a list."""
    if not path.is_file():
        raise SetLayoutError(f"{path}: list file not found")
    entries: dict[str, tuple[int, str]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split(maxsplit=1)
            if not fields:
                continue
            if len(fields) != 2:
                raise SetLayoutError(f"{path}:{number}: expected '<key> <path>', "
                                     f"got {line.strip()!r}")
            key, value = fields[0], fields[1].strip()
            if key in entries:
                raise SetLayoutError(f"{path}:{number}: key {key!r} repeats line {entries[key][0]}")
            entries[key] = (number, value)
    return entries


def _missing(paths: Iterable[Path | None]) -> list[str]:
    return [str(p) for p in paths if p is not None and not p.is_file()]


def _pool(pairs: Iterable[tuple[str, Path]]) -> dict[str, list[Path]]:
    """speaker -> sorted distinct files, speakers sorted."""
    pool: dict[str, set[Path]] = defaultdict(set)
    for speaker, path in pairs:
        pool[speaker].add(path)
    return {speaker: sorted(pool[speaker]) for speaker in sorted(pool)}


def _wsj0_enrollment_problem(target_utt: str, enrollment_utt: str) -> str | None:
    """Why a WSJ0 enrollment utterance cannot serve a target utterance, or None."""
    if enrollment_utt == target_utt:
        return f"the enrollment is the target utterance {target_utt} itself"
    if enrollment_utt[:WSJ0_SPEAKER_CHARS] != target_utt[:WSJ0_SPEAKER_CHARS]:
        return (f"the enrollment {enrollment_utt} is not of the target speaker "
                f"{target_utt[:WSJ0_SPEAKER_CHARS]} ({target_utt})")
    return None


def _finish(name: str, sample_rate: int, target_kind: str, items: list[SetItem],
            pool: dict[str, list[Path]], skipped: list[str]) -> StandardSet:
    if skipped:
        log.warning("%s: %d row(s) skipped, first: %s", name, len(skipped), skipped[0])
    return StandardSet(name=name, sample_rate=sample_rate, target_kind=target_kind, items=items,
                       enrollment_pool=pool, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# LibriMix (+ BUT SpeakerBeam map, ESPnet enroll scp)
# ---------------------------------------------------------------------------------------------


def librimix_header(n_src: int, mix_type: str) -> list[str]:
    """The columns of ``mixture_<split>_<mix_type>.csv`` (JorisCos/LibriMix
    ``scripts/create_librimix_from_metadata.py``, ``create_empty_mixture_md``): a mix_single
    mixture holds source 1 and the noise only."""
    n_listed = 1 if mix_type == "mix_single" else n_src
    sources = [f"source_{k}_path" for k in range(1, n_listed + 1)]
    noise = [] if mix_type == "mix_clean" else ["noise_path"]
    return ["mixture_ID", "mixture_path", *sources, *noise, "length"]


def _librimix_rows(path: Path, n_src: int, mix_type: str) -> list[tuple[int, str]]:
    """(line number, mixture_ID) of a LibriMix mixture metadata CSV, after checking its header.

    Only the IDs are used: the path columns are absolute paths of the machine that generated the
    set, so the files are found in the LibriMix tree instead."""
    if not path.is_file():
        raise SetLayoutError(f"{path}: LibriMix metadata CSV not found")
    expected = librimix_header(n_src, mix_type)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if header not in (expected, [expected[0], LIBRIMIX_OPTIONAL_COLUMN, *expected[1:]]):
            raise SetLayoutError(f"{path}: header {','.join(header)!r} is not the Libri{n_src}Mix "
                                 f"{mix_type} header {','.join(expected)!r}")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise SetLayoutError(f"{path}:{reader.line_num}: {len(row)} fields, the header "
                                     f"has {len(header)}")
            rows.append((reader.line_num, row[0]))
    return rows


def librimix_utterance(path: Path) -> str | None:
    """The LibriSpeech utterance id of a LibriMix source file ``s<k>/<mixture_ID>.wav`` (the
    k-th ``_``-separated part of the mixture ID), None for any other file."""
    match = re.fullmatch(r"s(\d+)", path.parent.name)
    parts = path.stem.split("_")
    if not match or not 1 <= int(match[1]) <= len(parts):
        return None
    return parts[int(match[1]) - 1]


def librispeech_speaker(utterance: str) -> str:
    """The LibriSpeech speaker id of an utterance id ``<speaker>-<chapter>-<index>``."""
    return utterance.split("-", 1)[0]


def _read_enrollment_map(path: Path, mixtures: Mapping[str, list[str]], split_dir: Path,
                         csv_name: str, skipped: list[str]
                         ) -> dict[tuple[str, int], Path | None]:
    """(mixture_ID, source number) -> enrollment file, from a BUT SpeakerBeam
    ``map_mixture2enrollment`` (BUTSpeechFIT/speakerbeam ``egs/libri2mix/data/wav8k/min/{dev,
    test}/map_mixture2enrollment``, format described in ``egs/libri2mix/local/
    create_enrollment_csv_fixed.py``): ``mixture_ID target_utterance_ID enrollment_ID`` with
    enrollment_ID ``s<k>/<other mixture_ID>``, a source file of the same split."""
    if not path.is_file():
        raise SetLayoutError(f"{path}: enrollment map not found")
    enrollments: dict[tuple[str, int], Path | None] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{number}"
            if len(fields) != 3:
                raise SetLayoutError(f"{where}: expected 'mixture_ID target_utterance_ID "
                                     f"enrollment_ID', got {line.strip()!r}")
            mixture, target_utt, enrollment_id = fields
            if mixture not in mixtures:
                skipped.append(f"{where}: mixture {mixture} is not in {csv_name}")
                continue
            utterances = mixtures[mixture]
            if target_utt not in utterances:
                skipped.append(f"{where}: {target_utt} is not a source of mixture {mixture}")
                continue
            source = utterances.index(target_utt) + 1
            if (mixture, source) in enrollments:
                skipped.append(f"{where}: a second enrollment for {target_utt} in {mixture}")
                continue
            problem = _map_enrollment_problem(enrollment_id, target_utt)
            if problem:
                skipped.append(f"{where}: {problem}")
                continue
            enrollments[mixture, source] = split_dir / f"{enrollment_id}.wav"
    return enrollments


def _map_enrollment_problem(enrollment_id: str, target_utt: str) -> str | None:
    """Why a map's ``s<k>/<mixture_ID>`` enrollment cannot serve the target, or None (also for
    an enrollment_ID of another form, which is then only checked to exist)."""
    match = _MAP_ENROLLMENT.match(enrollment_id)
    if not match:
        return None
    source, utterances = int(match[1]), match[2].split("_")
    if not 1 <= source <= len(utterances):
        return f"enrollment {enrollment_id} names a source its mixture does not have"
    enrollment_utt = utterances[source - 1]
    if enrollment_utt == target_utt:
        return f"enrollment {enrollment_id} is the target utterance {target_utt} itself"
    if librispeech_speaker(enrollment_utt) != librispeech_speaker(target_utt):
        return f"enrollment {enrollment_id} is not of the speaker of {target_utt}"
    return None


def _read_espnet_enroll(paths: Sequence[str | Path], targets: Sequence[int],
                        mixtures: Mapping[str, list[str]], csv_name: str,
                        skipped: list[str]) -> dict[tuple[str, int], Path | None]:
    """(mixture_ID, source number) -> enrollment file from ESPnet ``enroll_spk<k>.scp``
    (espnet/espnet ``egs2/librimix/tse1/local/prepare_librimix_enroll.py``): dev/test lines
    ``<mixture_ID> <enrollment wav path>``; a training line ``<mixture_ID> *<uttID> <spkID>``
    asks for an enrollment drawn on the fly (None here)."""
    enrollments: dict[tuple[str, int], Path | None] = {}
    for source in targets:
        scp = Path(paths[source - 1])
        for key, (number, value) in _read_scp(scp).items():
            if key not in mixtures:
                skipped.append(f"{scp}:{number}: mixture {key} is not in {csv_name}")
                continue
            if value.startswith(ESPNET_ON_THE_FLY):
                enrollments[key, source] = None
                continue
            path = Path(value)
            # ESPnet writes the paths of the machine that prepared the lists; a path that is
            # not there is taken as relative to the list's folder.
            enrollments[key, source] = path if path.is_file() else scp.parent / value
    return enrollments


def read_librimix(
    root: str | Path,
    *,
    n_src: int = 2,
    rate: str = "8k",
    mode: str = "min",
    mix_type: str = "mix_both",
    split: str = "test",
    enrollment_map: str | Path | None = None,
    espnet_enroll: Sequence[str | Path] | None = None,
) -> StandardSet:
    """A LibriMix split (JorisCos/LibriMix ``scripts/create_librimix_from_metadata.py``) as TSE
    items, one per target source: s1 only for ``mix_single``, else s1..s{n_src}.

    ``root`` is the ``Libri2Mix`` (or ``Libri3Mix``) folder; the set is
    ``root/wav{rate}/{mode}/metadata/mixture_{split}_{mix_type}.csv`` and the files are found at
    ``root/wav{rate}/{mode}/{split}/<folder>/<mixture_ID>.wav``. The target is the dry source
    ``s<k>``, the interferers the other sources (none for ``mix_single``, whose second source is
    not in the mixture).

    Enrollments come from one of:

    * ``enrollment_map``: a BUT SpeakerBeam ``map_mixture2enrollment`` for this split, rate and
      mode. It is under an evaluation-only licence, so it is never shipped with HiFi-TSE: the
      user downloads it and passes its path. Items without a map line are skipped;
    * ``espnet_enroll``: ESPnet's ``enroll_spk1.scp``, ``enroll_spk2.scp`` [, spk3] (one per
      source); items without a line, or whose file does not exist, are skipped;
    * neither: ``enrollment=None``, to be drawn from ``enrollment_pool`` (every source file of
      the split, by speaker).
    """
    _check_choice("n_src", n_src, LIBRIMIX_N_SRC)
    _check_choice("rate", rate, RATES)
    _check_choice("mode", mode, MODES)
    _check_choice("mix_type", mix_type, LIBRIMIX_MIX_TYPES)
    _check_choice("split", split, LIBRIMIX_SPLITS)
    if enrollment_map is not None and espnet_enroll is not None:
        raise ValueError("give enrollment_map or espnet_enroll, not both")
    if espnet_enroll is not None and len(espnet_enroll) != n_src:
        raise ValueError(f"espnet_enroll: {len(espnet_enroll)} scp files for {n_src} sources")

    # Files come from the LibriMix tree, not from the CSV's path columns: those are absolute
    # paths of the machine that generated the set.
    base = Path(root) / f"wav{rate}" / mode
    csv_path = base / "metadata" / f"mixture_{split}_{mix_type}.csv"
    split_dir = base / split
    rows = _librimix_rows(csv_path, n_src, mix_type)
    _require_dir(split_dir, "LibriMix split")
    skipped: list[str] = []

    mixtures: dict[str, list[str]] = {}  # mixture_ID -> utterance ids in source order
    lines: dict[str, int] = {}
    for number, mixture in rows:
        utterances = mixture.split("_")
        if len(utterances) != n_src:
            skipped.append(f"{csv_path}:{number}: mixture_ID {mixture} names {len(utterances)} "
                           f"utterance(s), not {n_src}")
        elif mixture in mixtures:
            skipped.append(f"{csv_path}:{number}: mixture_ID {mixture} repeats line "
                           f"{lines[mixture]}")
        else:
            mixtures[mixture], lines[mixture] = utterances, number

    targets = (1,) if mix_type == "mix_single" else tuple(range(1, n_src + 1))
    enrollments: dict[tuple[str, int], Path | None] | None = None
    enrollment_source = ""
    if enrollment_map is not None:
        enrollment_source = str(enrollment_map)
        enrollments = _read_enrollment_map(Path(enrollment_map), mixtures, split_dir,
                                           csv_path.name, skipped)
    elif espnet_enroll is not None:
        enrollment_source = ", ".join(str(espnet_enroll[k - 1]) for k in targets)
        enrollments = _read_espnet_enroll(espnet_enroll, targets, mixtures, csv_path.name,
                                          skipped)

    items: list[SetItem] = []
    for mixture, utterances in mixtures.items():
        where = f"{csv_path}:{lines[mixture]}"
        name = f"{mixture}.wav"
        sources = [split_dir / f"s{k}" / name for k in range(1, n_src + 1)]
        for k in targets:
            item_id = f"{mixture}_s{k}"
            enrollment = None
            if enrollments is not None:
                if (mixture, k) not in enrollments:
                    skipped.append(f"{where}: {item_id}: no enrollment for {utterances[k - 1]} "
                                   f"in {enrollment_source}")
                    continue
                enrollment = enrollments[mixture, k]
            interferers = () if mix_type == "mix_single" else tuple(
                path for j, path in enumerate(sources, 1) if j != k)
            mix = split_dir / mix_type / name
            missing = _missing([mix, sources[k - 1], *interferers, enrollment])
            if missing:
                skipped.append(f"{where}: {item_id}: missing {', '.join(missing)}")
                continue
            items.append(SetItem(id=item_id, mix=mix, target=sources[k - 1],
                                 enrollment=enrollment,
                                 speaker=librispeech_speaker(utterances[k - 1]),
                                 interferers=interferers))

    pool = _pool(
        (librispeech_speaker(utt), split_dir / f"s{k}" / f"{mixture}.wav")
        for mixture, utterances in mixtures.items()
        for k, utt in enumerate(utterances, 1)
        if (split_dir / f"s{k}" / f"{mixture}.wav").is_file()
    )
    return _finish(f"Libri{n_src}Mix {rate} {mode} {mix_type} {split}", RATES[rate], "dry",
                   items, pool, skipped)


# ---------------------------------------------------------------------------------------------
# SpEx+ lists (WSJ0-2mix) and WHAMR!
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ListEntry:
    """One key of a SpEx+-style list folder: per list file, its line number and path (with the
    prefixes replaced)."""

    key: str
    lines: dict[str, int]  # "mix.scp" -> line number
    paths: dict[str, Path]  # "mix.scp" -> path

    def where(self, list_dir: Path, name: str = "mix.scp") -> str:
        return f"{list_dir / name}:{self.lines[name]}"


def _replace_prefix(path: str, replace: Mapping[str, str] | None) -> Path:
    """``path`` with its longest matching old prefix of ``replace`` swapped for the new one."""
    for old in sorted(replace or {}, key=len, reverse=True):
        if path.startswith(old):
            return Path(replace[old] + path[len(old):])
    return Path(path)


def _read_tse_lists(list_dir: Path, replace: Mapping[str, str] | None) -> list[_ListEntry]:
    """The keys of ``mix.scp``, ``ref.scp`` and ``aux.scp`` (gemengtju/SpEx_Plus
    ``data/wsj0_2mix/{tr,cv,tt}/``, Kaldi style ``<key> <path>``) in mix.scp order; the three
    files must hold the same keys."""
    _require_dir(list_dir, "list")
    lists = {name: _read_scp(list_dir / name) for name in SPEX_LISTS}
    keys = lists["mix.scp"]
    for name in SPEX_LISTS[1:]:
        missing = [key for key in keys if key not in lists[name]]
        extra = [key for key in lists[name] if key not in keys]
        if missing or extra:
            raise SetLayoutError(
                f"{list_dir / name}: keys differ from mix.scp: {len(missing)} missing "
                f"(e.g. {', '.join(missing[:KEY_SAMPLE]) or '-'}), {len(extra)} not in mix.scp "
                f"(e.g. {', '.join(extra[:KEY_SAMPLE]) or '-'})")
    return [
        _ListEntry(key=key,
                   lines={name: lists[name][key][0] for name in SPEX_LISTS},
                   paths={name: _replace_prefix(lists[name][key][1], replace)
                          for name in SPEX_LISTS})
        for key in keys
    ]


def spex_speaker(key: str) -> str:
    """The target speaker of a SpEx+ list key ``<mixture>_<enrollment utt>``: the first three
    characters of its last ``_`` field (gemengtju/SpEx_Plus ``nnet/libs/dataset.py`` line 60)."""
    return key.split("_")[-1][:WSJ0_SPEAKER_CHARS]


def _list_entry_problem(entry: _ListEntry, source: int) -> str | None:
    """Why a list line is inconsistent (mixture and reference of different mixtures, or an
    enrollment that is not a different utterance of the target speaker), or None."""
    mixture, reference = entry.paths["mix.scp"].stem, entry.paths["ref.scp"].stem
    if mixture != reference:
        return f"mixture {mixture} and reference {reference} differ"
    fields = mixture.split("_")  # <utt1>_<snr1>_<utt2>_<snr2> (wsj0-2mix)
    if len(fields) != len(SPEX_SOURCES) * 2:
        return None
    return _wsj0_enrollment_problem(fields[2 * (source - 1)], entry.key.split("_")[-1])


def read_spex_lists(list_dir: str | Path, *, replace: Mapping[str, str] | None = None
                    ) -> StandardSet:
    """The SpEx+ WSJ0-2mix TSE list folder (gemengtju/SpEx_Plus ``data/wsj0_2mix/tt``: 3000
    mixtures x 2 targets, 8 kHz min): ``mix.scp`` -> wsj0-2mix ``min/tt/mix``, ``ref.scp`` ->
    ``s1`` or ``s2`` (dry: wsj0-2mix is anechoic), ``aux.scp`` -> a clean WSJ0 utterance of the
    target speaker.

    ``replace`` maps old path prefixes to new ones (the lists hold the authors' absolute paths).
    A line whose file is then missing is skipped. The interferer is the other wsj0-2mix source
    (``s2`` for ``s1``), when that file exists."""
    list_dir = Path(list_dir)
    skipped: list[str] = []
    items: list[SetItem] = []
    for entry in _read_tse_lists(list_dir, replace):
        missing = [f"{entry.where(list_dir, name)}: {entry.paths[name]}"
                   for name in SPEX_LISTS if not entry.paths[name].is_file()]
        if missing:
            skipped.append(f"{entry.key}: missing {'; '.join(missing)}")
            continue
        ref = entry.paths["ref.scp"]
        folder = ref.parent.name
        problem = None
        interferers: tuple[Path, ...] = ()
        if folder in SPEX_SOURCES:
            problem = _list_entry_problem(entry, SPEX_SOURCES.index(folder) + 1)
            other = ref.parent.parent / SPEX_SOURCES[1 - SPEX_SOURCES.index(folder)] / ref.name
            interferers = (other,) if other.is_file() else ()
        if problem:
            skipped.append(f"{entry.where(list_dir)}: {entry.key}: {problem}")
            continue
        items.append(SetItem(id=entry.key, mix=entry.paths["mix.scp"], target=ref,
                             enrollment=entry.paths["aux.scp"], speaker=spex_speaker(entry.key),
                             interferers=interferers))
    pool = _pool((item.speaker, item.enrollment) for item in items if item.enrollment)
    return _finish(f"WSJ0-2mix 8k min SpEx+ list {list_dir.name}", WSJ0_2MIX_RATE, "dry", items,
                   pool, skipped)


def read_whamr(
    root: str | Path,
    *,
    rate: str = "8k",
    mode: str = "min",
    split: str = "tt",
    mix_type: str = "mix_both_reverb",
    target: str = "anechoic",
    lists: str | Path,
    replace: Mapping[str, str] | None = None,
) -> StandardSet:
    """WHAMR! as TSE (layout as checked by espnet/espnet ``egs2/whamr/enh1/local/
    whamr_data_prep.sh``): mixtures ``root/wav{rate}/{mode}/{split}/{mix_type}/<mixture>.wav``,
    target ``s<k>_anechoic`` (dry, the default: as Asteroid's ``sep_reverb_noisy`` task and
    USEF-TSE score) or ``s<k>_reverb`` (reverberant, as heard in the mixture).

    ``lists`` is a SpEx+-style list folder (``mix.scp``, ``ref.scp``, ``aux.scp``; keys
    ``<mixture>_<enrollment utt>``). Only names are taken from its mix and ref paths: the
    mixture name, and the target number from the reference folder (``s1``/``s2``, or WHAMR!'s
    ``s1_anechoic``...); the files are found in the WHAMR! tree. The enrollment is the
    ``aux.scp`` file after ``replace`` (old prefix -> new prefix), at its own rate: at 16k the
    list must point at 16 kHz enrollments."""
    _check_choice("rate", rate, RATES)
    _check_choice("mode", mode, MODES)
    _check_choice("split", split, WSJ0_SPLITS)
    _check_choice("mix_type", mix_type, WHAMR_MIX_TYPES)
    _check_choice("target", target, WHAMR_TARGETS)
    split_dir = Path(root) / f"wav{rate}" / mode / split
    _require_dir(split_dir / mix_type, "WHAMR! mixture")
    list_dir = Path(lists)
    skipped: list[str] = []
    items: list[SetItem] = []
    for entry in _read_tse_lists(list_dir, replace):
        folder = entry.paths["ref.scp"].parent.name
        match = _REF_FOLDER.match(folder)
        if not match:
            skipped.append(f"{entry.where(list_dir, 'ref.scp')}: {entry.key}: reference folder "
                           f"{folder!r} is not s1 or s2")
            continue
        source = int(match[1])
        problem = _list_entry_problem(entry, source)
        if problem:
            skipped.append(f"{entry.where(list_dir)}: {entry.key}: {problem}")
            continue
        name = f"{entry.paths['mix.scp'].stem}.wav"
        mix = split_dir / mix_type / name
        reference = split_dir / f"s{source}_{target}" / name
        interferer = split_dir / f"s{3 - source}_{target}" / name
        enrollment = entry.paths["aux.scp"]
        missing = _missing([mix, reference, interferer, enrollment])
        if missing:
            skipped.append(f"{entry.where(list_dir)}: {entry.key}: missing {', '.join(missing)}")
            continue
        items.append(SetItem(id=entry.key, mix=mix, target=reference, enrollment=enrollment,
                             speaker=spex_speaker(entry.key), interferers=(interferer,)))
    pool = _pool((item.speaker, item.enrollment) for item in items if item.enrollment)
    return _finish(f"WHAMR! {rate} {mode} {mix_type} {split} s*_{target}", RATES[rate],
                   WHAMR_TARGETS[target], items, pool, skipped)


# ---------------------------------------------------------------------------------------------
# The original WSJ0-2mix-extr
# ---------------------------------------------------------------------------------------------


def read_wsj0_2mix_extr(root: str | Path, *, mode: str = "max", split: str = "tt"
                        ) -> StandardSet:
    """The original WSJ0-2mix-extr folders (xuchenglin28/speaker_extraction
    ``simulation/simulate_2spk_mix.m``): ``root/wav8k/{mode}/{split}/{mix,aux,s1}/<name>.wav``,
    paired by name, ``<name> = <target utt>_<gain>_<interferer utt>_<-gain>_<enrollment utt>``.
    One target per mixture (the first speaker); only the target is written, so there are no
    interferer files."""
    _check_choice("mode", mode, MODES)
    _check_choice("split", split, WSJ0_SPLITS)
    split_dir = Path(root) / "wav8k" / mode / split
    for folder in ("mix", "aux", "s1"):
        _require_dir(split_dir / folder, "WSJ0-2mix-extr")
    skipped: list[str] = []
    items: list[SetItem] = []
    for mix in sorted((split_dir / "mix").glob("*.wav")):
        fields = mix.stem.split("_")
        if len(fields) != 5:
            skipped.append(f"{mix}: name is not <target>_<gain>_<interferer>_<gain>_<enrollment>")
            continue
        target_utt, enrollment_utt = fields[0], fields[4]
        aux, s1 = split_dir / "aux" / mix.name, split_dir / "s1" / mix.name
        missing = _missing([aux, s1])
        problem = (f"missing {', '.join(missing)}" if missing
                   else _wsj0_enrollment_problem(target_utt, enrollment_utt))
        if problem:
            skipped.append(f"{mix}: {problem}")
            continue
        items.append(SetItem(id=mix.stem, mix=mix, target=s1, enrollment=aux,
                             speaker=target_utt[:WSJ0_SPEAKER_CHARS]))
    pool = _pool((item.speaker, item.enrollment) for item in items if item.enrollment)
    return _finish(f"WSJ0-2mix-extr 8k {mode} {split}", WSJ0_2MIX_RATE, "dry", items, pool,
                   skipped)
