"""Training and validation items from a standard TSE set's fixed mixtures (data/standard_sets.py)
instead of dynamic mixing: the ``standard`` config section names the set.

Each item is one (mixture, target speaker) pair of the set, cropped to ``segment_seconds``, with
an enrollment cropped to ``ref_seconds``:

* training: the pair is drawn at random for each position of the step stream (a function of
  the seed, the rank and the position, as in ``HiFiTSEDataset``), the crop and the enrollment
  crop at random; a pair without a listed enrollment (LibriMix training splits) gets another
  utterance of its speaker from the split, never the target utterance itself (as ESPnet's
  on-the-fly enrollments, ``egs2/librimix/tse1``, and WeSep's ``spk2enroll``);
* validation: pair ``i`` of the list (the first ``data.n_val_samples`` pairs), its first
  ``segment_seconds`` and its enrollment's first ``ref_seconds`` (the enrollment drawn once
  from the seed where none is listed): the same items every validation.

Shorter files are zero-padded. The standard sets hold no target-absent items (``is_ta`` is
always False) and no noisy references; the items carry what train.py and its validation read
(``mix``, ``target``, ``ref``, ``is_ta``, ``n_corrupt``, ``speaker_class``, ``speaker``,
``index``). ``swap_pair(i)`` gives the two targets of one mixture with their enrollments: the
swap test of the validation on the set's own mixtures.

A file that cannot be read, or is not at the set's rate, costs that item: it is counted in
``n_corrupt`` and another pair is drawn (training) or the next one taken (validation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from config import StandardSetConfig
from data.manifest import ManifestError
from data.standard_sets import (
    SetItem,
    StandardSet,
    librimix_utterance,
    read_librimix,
    read_spex_lists,
    read_whamr,
    read_wsj0_2mix_extr,
)
from dsp.audio import AudioError

log = logging.getLogger(__name__)

MAX_DRAWS = 20  # pairs tried before an item gives up (every file of the set unreadable)
_TRAIN_STREAM, _VAL_STREAM, _SWAP_STREAM = 0, 1, 2  # independent RNG streams per purpose


def read_configured_set(s: StandardSetConfig, split: str) -> StandardSet:
    """The ``split`` of the set the ``standard`` section names; ``{split}`` in its paths is
    replaced by the split's name, and ``a+b`` reads splits ``a`` and ``b`` as one (LibriMix's
    ``train-100+train-360``). LibriMix's training split ignores ``enrollment_map``: the
    published maps cover dev and test, and training draws enrollments (module docstring)."""
    if "+" in split:
        parts = [read_configured_set(s, name) for name in split.split("+")]
        pool: dict[str, list[Path]] = {}
        for part in parts:
            for speaker, files in part.enrollment_pool.items():
                pool[speaker] = sorted({*pool.get(speaker, []), *files})
        return StandardSet(name=" + ".join(p.name for p in parts),
                           sample_rate=parts[0].sample_rate, target_kind=parts[0].target_kind,
                           items=[i for p in parts for i in p.items],
                           enrollment_pool=dict(sorted(pool.items())),
                           skipped=[line for p in parts for line in p.skipped])
    return _read_split(s, split)


def _read_split(s: StandardSetConfig, split: str) -> StandardSet:
    """One split of the configured set (``read_configured_set``)."""

    def path(value: str) -> str | None:
        return value.replace("{split}", split) if value else None

    if s.layout == "librimix":
        listed = "" if split in s.train_split.split("+") else s.enrollment_map
        return read_librimix(s.root, n_src=s.n_src, rate=s.rate, mode=s.mode,
                             mix_type=s.mix_type, split=split, enrollment_map=path(listed))
    if s.layout == "spex_lists":
        return read_spex_lists(path(s.lists), replace=s.replace)
    if s.layout == "wsj0_2mix_extr":
        return read_wsj0_2mix_extr(s.root, mode=s.mode, split=split)
    if s.layout == "whamr":
        return read_whamr(s.root, rate=s.rate, mode=s.mode, split=split, mix_type=s.mix_type,
                          target=s.target, lists=path(s.lists), replace=s.replace)
    raise ValueError(f"standard.layout {s.layout!r} names no set")


def read_crop(path: Path, start: int, n: int, sample_rate: int) -> np.ndarray:
    """``n`` samples of a mono (or downmixed) file from ``start``, zero-padded past its end.
    Raises ``AudioError`` naming the file when it cannot be read or is at another rate.

    Shape:
        returns (n,) float32
    """
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            f.seek(min(start, f.frames))
            data = f.read(n, dtype="float32", always_2d=True)  # (<= n, C)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from None
    if rate != sample_rate:
        raise AudioError(f"{path}: {rate} Hz, the set is at {sample_rate} Hz")
    wave = data.mean(axis=1)
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: non-finite samples (NaN or Inf)")
    return np.pad(wave, (0, n - len(wave))).astype(np.float32)


def _frames(path: Path) -> int:
    try:
        return sf.info(str(path)).frames
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from None


class StandardSetDataset(Dataset):
    """Items of a standard set (module docstring).

    Shape:
        mix, target: (N,); ref: (R,) with N = ``segment_seconds``, R = ``ref_seconds`` at
        ``sample_rate``
    """

    def __init__(self, standard: StandardSet, *, train: bool, length: int, seed: int,
                 rank: int = 0, segment_seconds: float = 4.0, ref_seconds: float = 4.0,
                 sample_rate: int = 8000) -> None:
        super().__init__()
        if standard.sample_rate != sample_rate:
            raise ValueError(f"{standard.name} is at {standard.sample_rate} Hz, the run at "
                             f"{sample_rate} Hz (stft.sample_rate)")
        if not standard.items:
            raise ManifestError(f"{standard.name}: no usable items ({len(standard.skipped)} "
                                "skipped)")
        self.standard = standard
        self.items = standard.items
        self.train = train
        # Validation: the first ``length`` pairs of the list (data.n_val_samples), at most all.
        self.length = int(length) if train else min(int(length), len(self.items))
        self.seed, self.rank = int(seed), int(rank)
        self.sample_rate = sample_rate
        self.segment_samples = round(segment_seconds * sample_rate)
        self.ref_samples = round(ref_seconds * sample_rate)
        # The speaker-classification head's classes (loss.speaker_ce) on the training split.
        self.speaker_names = sorted({item.speaker for item in self.items})
        self._speaker_class = {s: i for i, s in enumerate(self.speaker_names)}
        # The pairs of each mixture, for the swap test: mixtures with two or more targets.
        by_mix: dict[Path, list[int]] = {}
        for i, item in enumerate(self.items):
            by_mix.setdefault(item.mix, []).append(i)
        self._pairs = [ids[:2] for ids in by_mix.values() if len(ids) >= 2]
        # speaker -> (file, its LibriMix utterance id or None): parsed once, not per item.
        self._pool = {speaker: [(p, librimix_utterance(p)) for p in files]
                      for speaker, files in standard.enrollment_pool.items()}

    def __len__(self) -> int:
        return self.length

    def _enrollment(self, item: SetItem, rng: np.random.Generator) -> Path:
        """The listed enrollment, or another utterance of the speaker drawn with ``rng``: not the
        target file, nor another LibriMix mixture's copy of the target utterance (LibriMix uses
        an utterance in more than one mixture)."""
        if item.enrollment is not None:
            return item.enrollment
        utterance = librimix_utterance(item.target)
        pool = [p for p, u in self._pool.get(item.speaker, [])
                if p != item.target and (utterance is None or u != utterance)]
        if not pool:
            raise AudioError(f"{item.id}: no other utterance of speaker {item.speaker} to "
                             "enrol with")
        return pool[int(rng.integers(len(pool)))]

    def _crops(self, item: SetItem, rng: np.random.Generator, random_crop: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mix, target, enrollment) crops of one pair."""
        n, m = self.segment_samples, self.ref_samples
        enrollment = self._enrollment(item, rng)
        start = ref_start = 0
        if random_crop:
            start = int(rng.integers(max(1, _frames(item.mix) - n + 1)))
            ref_start = int(rng.integers(max(1, _frames(enrollment) - m + 1)))
        mix = read_crop(item.mix, start, n, self.sample_rate)
        target = read_crop(item.target, start, n, self.sample_rate)
        ref = read_crop(enrollment, ref_start, m, self.sample_rate)
        return mix, target, ref

    def __getitem__(self, position: int | tuple[float, ...]) -> dict[str, Any]:
        # The step stream's tuples carry schedule values for dynamic mixing (TA share, noisy
        # references, SIR boost...), which config.py keeps at their "off" values for these sets.
        index = int(position[0]) if isinstance(position, tuple) else int(position)
        corrupt = 0
        for attempt in range(MAX_DRAWS):
            if self.train:
                rng = np.random.default_rng([self.seed, _TRAIN_STREAM, self.rank, index, attempt])
                pick = int(rng.integers(len(self.items)))
            else:
                rng = np.random.default_rng([self.seed, _VAL_STREAM, index])
                pick = (index + attempt) % len(self.items)
            item = self.items[pick]
            try:
                mix, target, ref = self._crops(item, rng, random_crop=self.train)
            except AudioError as err:
                corrupt += 1
                log.warning("skipped %s", err)
                continue
            return {
                "mix": torch.from_numpy(mix), "target": torch.from_numpy(target),
                "ref": torch.from_numpy(ref), "is_ta": False, "n_corrupt": corrupt,
                "index": index, "speaker": item.speaker,
                "speaker_class": self._speaker_class[item.speaker] if self.train else -1,
            }
        raise AudioError(f"{self.standard.name}: {MAX_DRAWS} pairs in a row could not be read")

    def swap_pair(self, index: int, *, noisy: bool, n_refs: int = 1) -> dict[str, Any]:
        """The two targets of mixture ``index`` (of those with two or more) with their
        enrollments, first ``segment_seconds`` / ``ref_seconds``, as ``HiFiTSEDataset.swap_pair``
        returns them: ``mix`` (N,), ``sources`` (2, N), ``refs`` (2, M), ``speakers``. The set's
        own mixtures are the test: ``noisy`` and ``n_refs`` > 1 are not available."""
        if noisy or n_refs != 1:
            raise ManifestError(f"{self.standard.name}: swap pairs are the set's own mixtures "
                                "(no noisy variant, one reference)")
        if not self._pairs:
            raise ManifestError(f"{self.standard.name}: no mixture has two targets")
        for attempt in range(MAX_DRAWS):  # an unreadable file: the next mixture
            a, b = (self.items[i] for i in self._pairs[(index + attempt) % len(self._pairs)])
            rng = np.random.default_rng([self.seed, _SWAP_STREAM, index, attempt])
            try:
                mix, target_a, ref_a = self._crops(a, rng, random_crop=False)
                _, target_b, ref_b = self._crops(b, rng, random_crop=False)
            except AudioError as err:
                log.warning("swap pair %d: skipped %s", index, err)
                continue
            return {"mix": mix, "sources": np.stack([target_a, target_b]),
                    "refs": np.stack([ref_a, ref_b]), "speakers": [a.speaker, b.speaker]}
        raise ManifestError(f"{self.standard.name}: {MAX_DRAWS} swap pairs in a row could "
                            "not be read")


def standard_dataset(s: StandardSetConfig, split: str, *, train: bool, length: int, seed: int,
                     rank: int, segment_seconds: float, ref_seconds: float,
                     sample_rate: int) -> StandardSetDataset:
    """The dataset of one split of the configured set (``read_configured_set``)."""
    return StandardSetDataset(read_configured_set(s, split), train=train, length=length,
                              seed=seed, rank=rank, segment_seconds=segment_seconds,
                              ref_seconds=ref_seconds, sample_rate=sample_rate)
