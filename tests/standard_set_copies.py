"""Tiny copies of the standard TSE set layouts (doc/standard_sets.md §5) for the tests of
data/standard_sets.py: the official folder and file names, list and CSV formats, and real speech.

Each utterance is 1.0-1.5 s of a RAVDESS sentence (``../shared/data``), one actor per speaker,
resampled with soxr to the layout's rate. Every file is written as 16-bit PCM from int16 samples,
and each mixture is the integer sum of the files it is made of (sources, reverberant sources,
noise), so a metric computed on a copy means what it means on the real set. Everything is drawn
from a seeded generator: two calls with the same arguments write the same files.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

RATES = {"8k": 8000, "16k": 16000}
SEED = 0
CUT_SECONDS = (1.0, 1.5)  # length range of one utterance
CUT_START_SECONDS = 0.9  # RAVDESS sentences start about 1.0 s into the file
SOURCE_DBFS = (-26.0, -20.0)  # RMS range of a LibriMix source (loudness-normalised speech)
NOISE_BELOW_SPEECH_DB = 20.0  # a low noise: mix_both still sounds like two talkers
WSJ0_2MIX_GAIN_DB = 2.5  # largest gain field g of a name: source 1 at +g dB, source 2 at -g dB
WSJ0_PEAK = 0.9  # wsj0-2mix(-extr) rescales the written files jointly to this peak
PCM_SCALE = 32768  # int16 full scale (soundfile reads PCM_16 as int / 32768)
NOISE_FILE = "running_tap"  # ../shared/data/noise/<name>.flac, 16 kHz
# One measured room response per WHAMR! source; both keep a clear direct path (a far microphone
# in the medium or large room leaves a dry target at -30 dB SI-SDR in the mixture).
RIR_FILES = ("auralizr_s1", "openair_small_room")
RIR_SECONDS = 0.3
DIRECT_PATH_FRACTION = 0.3  # the direct path: the first sample above this fraction of the peak

# LibriSpeech test-clean speaker-chapter prefixes; speaker i is RAVDESS actor i + 1.
LIBRISPEECH_CHAPTERS = ("1089-134686", "4077-13754", "5142-33396", "121-121726")
# WSJ0 si_dt_05 / si_et_05 style speaker ids (3 characters); speaker i is actor i + 1.
WSJ0_SPEAKERS = ("050", "22g", "440", "443")
# The absolute prefixes of the machines that "generated" the sets: the readers must not need them.
LIBRIMIX_FAKE_PREFIX = "/data/LibriMix"
LIST_FAKE_PREFIX = "/export/home/spex/data"
WSJ0_AUX_DIR = "wsj0_8k/si_et_05"  # clean 8 kHz WSJ0 enrollments, <dir>/<spk>/<utt>.wav


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


def speech(shared: Path, speaker: int, index: int, sample_rate: int,
           rng: np.random.Generator) -> np.ndarray:
    """1.0-1.5 s of RAVDESS actor ``speaker + 1``'s file number ``index``, float64 at
    ``sample_rate``, RMS in SOURCE_DBFS. Shape (T,)."""
    files = sorted((shared / "speech" / "ravdess" / f"Actor_{speaker + 1:02d}").glob("*.flac"))
    path = files[index % len(files)]
    file_rate = sf.info(path).samplerate
    seconds = rng.uniform(*CUT_SECONDS)
    wave, _ = sf.read(path, start=round(CUT_START_SECONDS * file_rate),
                      frames=round(seconds * file_rate), dtype="float64")
    wave = soxr.resample(wave, file_rate, sample_rate)
    return at_dbfs(wave, rng.uniform(*SOURCE_DBFS))


def noise(shared: Path, n_samples: int, sample_rate: int, offset_s: float) -> np.ndarray:
    """``n_samples`` of the real noise recording from ``offset_s`` on, at ``sample_rate``."""
    path = shared / "noise" / f"{NOISE_FILE}.flac"
    file_rate = sf.info(path).samplerate
    frames = int(np.ceil(n_samples * file_rate / sample_rate)) + file_rate // 10
    wave, _ = sf.read(path, start=round(offset_s * file_rate), frames=frames, dtype="float64")
    return soxr.resample(wave, file_rate, sample_rate)[:n_samples]


def room_response(shared: Path, index: int, sample_rate: int) -> np.ndarray:
    """The first RIR_SECONDS of a measured room response (left channel) at ``sample_rate``,
    from its direct path on, so that a reverberant source stays aligned with its dry one."""
    path = shared / "rir" / f"{RIR_FILES[index]}.wav"
    file_rate = sf.info(path).samplerate
    wave, _ = sf.read(path, frames=round(RIR_SECONDS * file_rate), dtype="float64",
                      always_2d=True)
    rir = soxr.resample(wave[:, 0], file_rate, sample_rate)
    magnitude = np.abs(rir)
    return rir[np.argmax(magnitude >= DIRECT_PATH_FRACTION * magnitude.max()):]


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(wave**2)))


def at_dbfs(wave: np.ndarray, dbfs: float) -> np.ndarray:
    return wave * (10 ** (dbfs / 20) / rms(wave))


def fit(waves: Sequence[np.ndarray], mode: str) -> list[np.ndarray]:
    """Cut to the shortest (``min``) or zero-pad to the longest (``max``), as the generators do."""
    length = min(map(len, waves)) if mode == "min" else max(map(len, waves))
    return [np.pad(w[:length], (0, length - len(w[:length]))) for w in waves]


def pcm(wave: np.ndarray) -> np.ndarray:
    """int16 samples of a float wave (must not clip: the copies keep their peaks below 1)."""
    ints = np.round(wave * PCM_SCALE)
    assert np.abs(ints).max() < PCM_SCALE, "a copy would clip"
    return ints.astype(np.int16)


def total(*parts: np.ndarray) -> np.ndarray:
    """The int16 sum of int16 files: a mixture exactly equal to its parts."""
    summed = np.sum([p.astype(np.int32) for p in parts], axis=0)
    assert np.abs(summed).max() < PCM_SCALE, "a mixture would clip"
    return summed.astype(np.int16)


def write(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate, subtype="PCM_16")


def write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# LibriMix (§5.1) + BUT SpeakerBeam map (§5.2) + ESPnet enroll scp (§5.3)
# ---------------------------------------------------------------------------------------------


def librimix_speaker(mixture: int, source: int, n_src: int) -> int:
    """Speaker index of a source: n_src + 1 speakers in rotation, so that the sources of a
    mixture differ and every speaker is in two mixtures (an enrollment from another one)."""
    return (mixture + source) % (n_src + 1)


def librispeech_id(speaker: int, index: int) -> str:
    return f"{LIBRISPEECH_CHAPTERS[speaker]}-{index:04d}"


def snr_db(part: np.ndarray, mixture: np.ndarray) -> float:
    rest = mixture.astype(np.float64) - part
    return float(10 * np.log10(np.sum(part.astype(np.float64) ** 2) / np.sum(rest**2)))


def make_librimix(tmp: Path, shared: Path, *, n_src: int = 2, rate: str = "8k",
                  mode: str = "min", split: str = "test", n_mix: int = 3) -> tuple[Path, Path]:
    """``tmp/Libri{n_src}Mix/wav{rate}/{mode}/{split}/{s1..,mix_clean,mix_both,mix_single,noise}``
    with the metadata CSVs (``mixture_*``, ``metrics_*``) and a BUT SpeakerBeam
    ``map_mixture2enrollment`` (in ``tmp/speakerbeam/egs/libri{n}mix/data/wav{rate}/{mode}/
    {split}/``): every source a target, its enrollment a source of the same speaker in another
    mixture. Returns (Libri{n}Mix folder, map file)."""
    sample_rate = RATES[rate]
    rng = np.random.default_rng(SEED)
    root = tmp / f"Libri{n_src}Mix"
    split_dir = root / f"wav{rate}" / mode / split
    fake_split = f"{LIBRIMIX_FAKE_PREFIX}/Libri{n_src}Mix/wav{rate}/{mode}/{split}"
    counts = [0] * (n_src + 1)
    mixtures: list[tuple[str, list[int]]] = []  # (mixture_ID, speaker of each source)
    metadata: dict[str, list[list[object]]] = {}
    for m in range(n_mix):
        speakers = [librimix_speaker(m, k, n_src) for k in range(n_src)]
        utterances, waves = [], []
        for s in speakers:
            utterances.append(librispeech_id(s, counts[s]))
            waves.append(speech(shared, s, counts[s], sample_rate, rng))
            counts[s] += 1
        mixture_id = "_".join(utterances)
        mixtures.append((mixture_id, speakers))
        sources = [pcm(w) for w in fit(waves, mode)]
        level = rms(sources[0] / PCM_SCALE) * 10 ** (-NOISE_BELOW_SPEECH_DB / 20)
        noise_pcm = pcm(at_dbfs(noise(shared, len(sources[0]), sample_rate, offset_s=2.0 * m),
                                20 * np.log10(level)))
        folders = {f"s{k}": s for k, s in enumerate(sources, 1)}
        folders["noise"] = noise_pcm
        mixes = {"mix_clean": (sources, []), "mix_both": (sources, [noise_pcm]),
                 "mix_single": (sources[:1], [noise_pcm])}
        for mix_type, (parts, noises) in mixes.items():
            folders[mix_type] = total(*parts, *noises)
            fake = [f"{fake_split}/{folder}/{mixture_id}.wav"
                    for folder in (mix_type, *[f"s{k}" for k in range(1, len(parts) + 1)])]
            fake += [f"{fake_split}/noise/{mixture_id}.wav"] if noises else []
            length = float(len(folders[mix_type]))  # LibriMix writes it as a float: 30160.0
            metadata.setdefault(f"mixture_{split}_{mix_type}", []).append(
                [mixture_id, *fake, length])
            metadata.setdefault(f"metrics_{split}_{mix_type}", []).append(
                [mixture_id, *(snr_db(p, folders[mix_type]) for p in (*parts, *noises))])
        for folder, samples in folders.items():
            write(split_dir / folder / f"{mixture_id}.wav", samples, sample_rate)

    metadata_dir = root / f"wav{rate}" / mode / "metadata"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in metadata.items():
        mix_type = name.split(f"_{split}_")[1]
        if name.startswith("mixture_"):
            header = librimix_header(n_src, mix_type)
        else:  # create_empty_metrics_md
            n_listed = 1 if mix_type == "mix_single" else n_src
            header = ["mixture_ID", *(f"source_{k}_SNR" for k in range(1, n_listed + 1))]
            header += [] if mix_type == "mix_clean" else ["noise_SNR"]
        with (metadata_dir / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    map_lines = []
    for m, (mixture_id, speakers) in enumerate(mixtures):
        for k, s in enumerate(speakers):
            others = [(j, speakers_j.index(s)) for j, (_, speakers_j) in enumerate(mixtures)
                      if j != m and s in speakers_j]
            if not others:
                raise ValueError(f"n_mix={n_mix}: speaker {s} is in one mixture only, so it "
                                 "has no enrollment in another")
            other_m, other_k = others[0]
            map_lines.append(f"{mixture_id} {mixture_id.split('_')[k]} "
                             f"s{other_k + 1}/{mixtures[other_m][0]}")
    map_path = (tmp / "speakerbeam" / "egs" / f"libri{n_src}mix" / "data" / f"wav{rate}" / mode
                / split / "map_mixture2enrollment")
    write_lines(map_path, map_lines)
    return root, map_path


def librimix_header(n_src: int, mix_type: str) -> list[str]:
    """The mixture CSV header, written out here rather than taken from the reader under test."""
    if mix_type == "mix_clean":
        return ["mixture_ID", "mixture_path", *(f"source_{k}_path" for k in range(1, n_src + 1)),
                "length"]
    if mix_type == "mix_both":
        return ["mixture_ID", "mixture_path", *(f"source_{k}_path" for k in range(1, n_src + 1)),
                "noise_path", "length"]
    return ["mixture_ID", "mixture_path", "source_1_path", "noise_path", "length"]


def write_espnet_enroll(map_path: Path, root: Path, out_dir: Path, *, n_src: int = 2,
                        rate: str = "8k", mode: str = "min", split: str = "test"
                        ) -> tuple[Path, ...]:
    """ESPnet dev/test ``enroll_spk<k>.scp`` (``<mixture_ID> <enrollment wav path>``) made from
    a SpeakerBeam map, as ESPnet's later recipe does. spk1 holds paths relative to ``out_dir``
    (resolved against the list's folder), the others absolute paths."""
    split_dir = root / f"wav{rate}" / mode / split
    lines: list[list[str]] = [[] for _ in range(n_src)]
    for line in map_path.read_text().splitlines():
        mixture_id, target_utt, enrollment_id = line.split()
        k = mixture_id.split("_").index(target_utt)
        path = split_dir / f"{enrollment_id}.wav"
        shown = os.path.relpath(path, out_dir) if k == 0 else str(path)
        lines[k].append(f"{mixture_id} {shown}")
    paths = tuple(out_dir / f"enroll_spk{k}.scp" for k in range(1, n_src + 1))
    for path, scp_lines in zip(paths, lines, strict=True):
        write_lines(path, scp_lines)
    return paths


# ---------------------------------------------------------------------------------------------
# WSJ0-2mix: SpEx+ lists (§5.4), WSJ0-2mix-extr (§5.5), WHAMR! (§5.6)
# ---------------------------------------------------------------------------------------------


def wsj0_id(speaker: int, session: str, index: int) -> str:
    """A WSJ0-like utterance id: 3-character speaker, session letter, 4 characters."""
    return f"{WSJ0_SPEAKERS[speaker]}{session}05{index:02d}"


def wsj0_2mix_name(utt1: str, utt2: str, rng: np.random.Generator) -> tuple[str, float]:
    """``<utt1>_<g>_<utt2>_<-g>`` and ``g``, the gain in dB of source 1 (source 2: ``-g``)."""
    gain = round(float(rng.uniform(0.01, WSJ0_2MIX_GAIN_DB)), 5)
    return f"{utt1}_{gain:.5f}_{utt2}_{-gain:.5f}", gain


def jointly_scaled(waves: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The waves scaled together so the largest peak (mixture included) is WSJ0_PEAK."""
    peak = max(np.abs(w).max() for w in waves)
    return [w * (WSJ0_PEAK / peak) for w in waves]


class _Wsj0Speech:
    """Distinct WSJ0-like utterances per speaker: targets from even RAVDESS files, enrollments
    (session 'c') from odd ones, so an enrollment is never the target's recording."""

    def __init__(self, shared: Path, sample_rate: int, rng: np.random.Generator) -> None:
        self.shared, self.sample_rate, self.rng = shared, sample_rate, rng
        self.counts: dict[tuple[int, str], int] = {}

    def __call__(self, speaker: int, session: str) -> tuple[str, np.ndarray]:
        index = self.counts.get((speaker, session), 0)
        self.counts[speaker, session] = index + 1
        parity = 1 if session == "c" else 0
        wave = speech(self.shared, speaker, 2 * index + parity, self.sample_rate, self.rng)
        return wsj0_id(speaker, session, index + 1), wave


def two_speaker_mixtures(n_mix: int, utterance: _Wsj0Speech, rng: np.random.Generator,
                         mode: str) -> list[tuple[str, list[int], list[str], list[np.ndarray]]]:
    """wsj0-2mix style mixtures: (name, speakers, utterance ids, scaled sources (T,))."""
    result = []
    for m in range(n_mix):
        speakers = [librimix_speaker(m, k, 2) for k in range(2)]
        (utt1, wave1), (utt2, wave2) = (utterance(s, "a") for s in speakers)
        name, gain = wsj0_2mix_name(utt1, utt2, rng)
        gains = (10 ** (gain / 20), 10 ** (-gain / 20))
        sources = fit([wave1 * gains[0], wave2 * gains[1]], mode)
        result.append((name, speakers, [utt1, utt2], sources))
    return result


def write_lists(list_dir: Path, rows: Sequence[tuple[str, str, str, str]]) -> Path:
    """``mix.scp``, ``ref.scp``, ``aux.scp`` from (key, mix, ref, aux) rows, sorted by key."""
    rows = sorted(rows)
    for column, name in enumerate(("mix.scp", "ref.scp", "aux.scp"), 1):
        write_lines(list_dir / name, [f"{row[0]} {row[column]}" for row in rows])
    return list_dir


def make_spex_lists(tmp: Path, shared: Path, n_mix: int = 3) -> Path:
    """A SpEx+-style ``tt`` list folder (``tmp/lists/wsj0_2mix/tt``, 2 keys per mixture) over
    wsj0-2mix style ``tmp/wsj0_2mix/min/tt/{mix,s1,s2}`` files and clean WSJ0-style 8 kHz
    enrollments in ``tmp/wsj0_8k/si_et_05/<spk>/``. The lists hold LIST_FAKE_PREFIX paths: map
    it to ``tmp`` with ``replace``."""
    sample_rate = RATES["8k"]
    rng = np.random.default_rng(SEED)
    utterance = _Wsj0Speech(shared, sample_rate, rng)
    rows = []
    for name, speakers, _, sources in two_speaker_mixtures(n_mix, utterance, rng, "min"):
        s1, s2 = (pcm(w) for w in jointly_scaled([*sources, sources[0] + sources[1]])[:2])
        files = {"mix": total(s1, s2), "s1": s1, "s2": s2}
        for folder, samples in files.items():
            write(tmp / "wsj0_2mix" / "min" / "tt" / folder / f"{name}.wav", samples, sample_rate)
        for k, s in enumerate(speakers, 1):
            enrollment, wave = utterance(s, "c")
            aux = f"{WSJ0_AUX_DIR}/{WSJ0_SPEAKERS[s]}/{enrollment}.wav"
            write(tmp / aux, pcm(wave), sample_rate)
            rows.append((f"{name}_{enrollment}",
                         f"{LIST_FAKE_PREFIX}/wsj0_2mix/min/tt/mix/{name}.wav",
                         f"{LIST_FAKE_PREFIX}/wsj0_2mix/min/tt/s{k}/{name}.wav",
                         f"{LIST_FAKE_PREFIX}/{aux}"))
    return write_lists(tmp / "lists" / "wsj0_2mix" / "tt", rows)


def make_wsj0_2mix_extr(tmp: Path, shared: Path, n: int = 3) -> Path:
    """``tmp/wsj0-2mix-extr/wav8k/max/tt/{mix,aux,s1}/<t>_<g>_<i>_<-g>_<e>.wav``: the first
    speaker is the target; mixture, target and enrollment jointly scaled to a 0.9 peak."""
    sample_rate = RATES["8k"]
    rng = np.random.default_rng(SEED)
    utterance = _Wsj0Speech(shared, sample_rate, rng)
    root = tmp / "wsj0-2mix-extr"
    split_dir = root / "wav8k" / "max" / "tt"
    for name, speakers, _, sources in two_speaker_mixtures(n, utterance, rng, "max"):
        enrollment, wave = utterance(speakers[0], "c")
        s1, s2, aux = (pcm(w) for w in
                       jointly_scaled([*sources, wave, sources[0] + sources[1]])[:3])
        full = f"{name}_{enrollment}"
        for folder, samples in {"mix": total(s1, s2), "s1": s1, "aux": aux}.items():
            write(split_dir / folder / f"{full}.wav", samples, sample_rate)
    return root


WHAMR_FOLDERS = ("mix_both_anechoic", "mix_clean_anechoic", "mix_single_anechoic",
                 "mix_both_reverb", "mix_clean_reverb", "mix_single_reverb",
                 "s1_anechoic", "s2_anechoic", "s1_reverb", "s2_reverb", "noise")


def make_whamr(tmp: Path, shared: Path, n_mix: int = 3) -> tuple[Path, Path]:
    """``tmp/WHAMR/wav8k/min/tt/<the 11 folders>/<mixture>.wav`` (each source convolved with its
    own measured room response for ``s<k>_reverb``) and a USEF-TSE-style list folder
    ``tmp/lists/whamr/tt``: mix -> ``mix_both_reverb``, ref -> ``s<k>_anechoic``, aux -> a clean
    8 kHz WSJ0-style utterance, all under LIST_FAKE_PREFIX. Returns (WHAMR folder, list folder)."""
    sample_rate = RATES["8k"]
    rng = np.random.default_rng(SEED)
    utterance = _Wsj0Speech(shared, sample_rate, rng)
    rirs = [room_response(shared, k, sample_rate) for k in range(len(RIR_FILES))]
    root = tmp / "WHAMR"
    split_dir = root / "wav8k" / "min" / "tt"
    fake_split = f"{LIST_FAKE_PREFIX}/WHAMR/wav8k/min/tt"
    rows = []
    for m, (name, speakers, _, sources) in enumerate(
            two_speaker_mixtures(n_mix, utterance, rng, "min")):
        # At the level of its dry source, as the dry and reverberant targets of WHAMR! are.
        reverb = [at_dbfs(np.convolve(w, rir)[:len(w)], 20 * np.log10(rms(w)))
                  for w, rir in zip(sources, rirs, strict=True)]
        level = rms(sources[0]) * 10 ** (-NOISE_BELOW_SPEECH_DB / 20)
        wham = at_dbfs(noise(shared, len(sources[0]), sample_rate, offset_s=2.0 * m),
                       20 * np.log10(level))
        scaled = jointly_scaled([*sources, *reverb, wham, sum(sources) + wham,
                                 sum(reverb) + wham])
        s1a, s2a, s1r, s2r, noise_pcm = (pcm(w) for w in scaled[:5])
        files = {"s1_anechoic": s1a, "s2_anechoic": s2a, "s1_reverb": s1r, "s2_reverb": s2r,
                 "noise": noise_pcm}
        for kind, (a, b) in {"anechoic": (s1a, s2a), "reverb": (s1r, s2r)}.items():
            files[f"mix_clean_{kind}"] = total(a, b)
            files[f"mix_both_{kind}"] = total(a, b, noise_pcm)
            files[f"mix_single_{kind}"] = total(a, noise_pcm)
        for folder, samples in files.items():
            write(split_dir / folder / f"{name}.wav", samples, sample_rate)
        for k, s in enumerate(speakers, 1):
            enrollment, wave = utterance(s, "c")
            aux = f"{WSJ0_AUX_DIR}/{WSJ0_SPEAKERS[s]}/{enrollment}.wav"
            write(tmp / aux, pcm(wave), sample_rate)
            rows.append((f"{name}_{enrollment}", f"{fake_split}/mix_both_reverb/{name}.wav",
                         f"{fake_split}/s{k}_anechoic/{name}.wav", f"{LIST_FAKE_PREFIX}/{aux}"))
    return root, write_lists(tmp / "lists" / "whamr" / "tt", rows)
