"""The dynamic-mixing dataset: every training sample is built on the fly from packed HDF5 audio.

One sample (doc/design.md, "Data pipeline"), for a target speaker T and 4 s segments:

1. T and two different utterances of T: one for the mixture, one for the reference.
2. Target present (TP) or, with probability ``ta_prob``, target absent (TA).
3. 1 to 3 interfering speakers, all different from T and from each other.
4. Each speaker in the mixture is convolved with its own random RIR over the span the crop
   needs (crop + RIR length), then cropped: reverb tails that start before the crop are right.
   The training target is the reverberant target, its early part (RIR up to 50 ms after the
   direct path) or the dry speech (``target_type``).
5. Noise at an SNR drawn in ``snr_db``, measured against the sum of the (reverberant) speech
   in the mixture: target + interferers for TP, interferers alone for TA. The noise level thus
   always refers to what a listener hears as "the speech", and a TA mixture is as noisy as a
   TP one.
6. The reference: the other utterance of T, 4 s; with probability ``noisy_ref_prob`` another
   noise clip is added at an SNR drawn in ``ref_snr_db``.
7. If any of mixture, target or mixture component peaks above ``peak_limit``, all of them are
   scaled by the same gain; the reference (a separate input) is limited on its own.

Levels: the first speaker of the mixture (T for TP, the first interferer for TA) is set to an
RMS drawn in ``level_db`` dBFS, each other speaker to that RMS minus a signal-to-interferer
ratio drawn in ``sir_db``; the reference RMS is drawn in ``ref_level_db``. RMS is measured on
the 4 s crop after reverberation, so a gain never depends on audio outside the segment.

Speed perturbation (``speed_perturb``, 0.9 to 1.1 times) resamples the clean speech with soxr
before the RIR: T's mixture utterance and reference share one factor (a speed change shifts
pitch, and the reference must sound like the target), each interferer draws its own.

RIRs are trimmed to start 2.5 ms before their peak (the direct path's onset), scaled so that
the direct path (peak +- 2.5 ms) has unit energy and positive polarity, and cut with a 10 ms
fade after ``max_rir_seconds`` (measured RIRs carry seconds of noise floor that only cost FFT
time). The dry target is the clean speech delayed like the direct path and at its level, so
dry, early and reverberant targets are time-aligned with the mixture.

Reproducibility: a sample is a pure function of (seed, split, rank, epoch, index, ta_prob,
noisy_ref_prob, sir_boost_db): its numpy ``Generator`` is seeded from (seed, split, rank,
epoch, index), never from global state, so DataLoader workers cannot repeat each other and a
resumed run rebuilds the same stream. The validation split ignores rank and epoch: it is a
fixed list of ``length`` samples drawn only from validation speakers (and validation noise /
RIRs).

Phase schedule: the training loop owns it. Set ``dataset.ta_prob`` / ``dataset.noisy_ref_prob``
(backed by shared memory, so running DataLoader workers see the change), or, for samples that
are exactly reproducible across a resume, index the dataset with ``(index, ta_prob,
noisy_ref_prob[, sir_boost_db])`` tuples from the sampler; the optional last item is the SIR
curriculum's boost, added to every SIR of a target-present sample. ``set_epoch`` works the
same way.

Difficulty (``bench/bench_ladder.py``): ``reverb_prob`` and ``noise_prob`` make that share of
the samples reverberant and noisy (the others dry, noise-free); ``speaker_pair`` fixes the
target and the one interferer to two named training speakers (speaker-dependent separation);
fixed interferer counts are ``min_interferers == max_interferers``. The defaults change nothing.

Swap pairs (``swap_pair``, the selection test of ``evaluation/selection.py``): two different
speakers A and B mixed at 0 dB SIR (RMS over active speech), dry and noise-free or each
reverberant with noise at ``SWAP_SNR_DB``, with a reference of each (another utterance). A model
that uses its reference gives A's voice for A's reference and B's for B's.

Robustness: an HDF5 entry that cannot be read, is incomplete or holds garbage is logged,
counted (``dataset.n_corrupt`` in the reading process, and ``n_corrupt`` in every returned
item so the training loop can sum it across workers) and the sample is drawn again.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch
from scipy import fft as sfft
from torch.utils.data import Dataset

from config import DataConfig
from data.hdf5_store import CorruptEntryError, H5Reader
from data.manifest import ManifestError, PackedTable, load_packed
from dsp.audio import SAMPLE_RATE
from dsp.processes import ignore_stop_signals

log = logging.getLogger(__name__)

TARGET_TYPES = ("reverberant", "early", "dry")
MAX_DRAWS = 20  # redraws of one index (corrupt entries, silent crops) before giving up
MIN_ACTIVE_RMS = 1e-4  # -80 dBFS: a crop quieter than this is silence, not speech or noise
RESAMPLE_PAD = 512  # input samples read beyond a speed-perturbed span: soxr's edge transient
RIR_PEAK_SEARCH_SECONDS = 0.5  # the direct path of a measured RIR arrives within this
RIR_FADE_SECONDS = 0.01  # fade-out where a long RIR is cut, so the cut does not click
DIRECT_PATH_HALF_MS = 2.5  # the direct path: the RIR peak +- this
# First seed words: training, validation and swap pairs never share a draw.
_TRAIN_STREAM, _VAL_STREAM, _SWAP_STREAM = 0, 1, 2
SWAP_SNR_DB = 5.0  # noise of the noisy swap condition, against the sum of the two voices
SWAP_LEVEL_DBFS = -25.0  # active-speech RMS of each voice of a swap pair (0 dB SIR)
# Active speech: 10 ms frames within 40 dB of the loudest frame (a crop's leading silence or a
# pause must not lower a voice's level and so raise its gain).
ACTIVE_FRAME_SECONDS = 0.01
ACTIVE_RANGE_DB = 40.0
_ID_SEP = "|"  # joins the ids of several utterances or RIRs into one collatable string


class _Redraw(Exception):
    """A drawn crop is silent; the sample is drawn again with the next attempt's generator."""


@dataclass
class _Rir:
    """A trimmed RIR and its spectra at the FFT size that its convolutions use."""

    length: int  # R: taps
    delay: int  # index of the direct-path peak (<= 2.5 ms: its onset is kept)
    n_fft: int  # >= segment + R - 1: a circular convolution of that size holds the crop
    spectrum: np.ndarray  # (n_fft // 2 + 1,) complex64
    early_spectrum: np.ndarray | None  # same, of the first ``early_reverb_ms`` only


def _energy(x: np.ndarray) -> float:
    # einsum, not np.dot: a 1-D dot goes to multi-threaded BLAS, whose threads fight the other
    # DataLoader workers for the cores (measured, 2 workers on 2 cores: 22 vs 61 samples/s).
    return float(np.einsum("i,i->", x, x, dtype=np.float64))


def _rms(x: np.ndarray) -> float:
    return math.sqrt(_energy(x) / max(len(x), 1))


def _convolved(spec: np.ndarray, response: np.ndarray, rir: _Rir, n: int) -> np.ndarray:
    """The last ``n`` samples of the circular convolution of a window (its rfft ``spec``) with
    an RIR's ``response``: overlap-save, since with n_fft >= n + R - 1 points those outputs see
    R true taps and no wrap-around, i.e. they are the crop of the full linear convolution."""
    return sfft.irfft(spec * response, rir.n_fft)[rir.length - 1 : rir.length - 1 + n]


def active_rms(x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """RMS over the active 10 ms frames of ``x`` (within ``ACTIVE_RANGE_DB`` of the loudest);
    0 for silence. Shape: x (N,)."""
    frame = round(ACTIVE_FRAME_SECONDS * sample_rate)
    n = len(x) // frame * frame
    if n == 0:
        return _rms(x)
    power = np.square(x[:n].reshape(-1, frame), dtype=np.float64).mean(axis=1)  # (frames,)
    if power.max() <= 0:
        return 0.0
    active = power >= power.max() * 10 ** (-ACTIVE_RANGE_DB / 10)
    return float(np.sqrt(power[active].mean()))


def _uniform(rng: np.random.Generator, bounds: list[float] | tuple[float, float]) -> float:
    lo, hi = bounds
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


class HiFiTSEDataset(Dataset):
    """Target speaker extraction samples mixed on the fly from packed speech, noise and RIRs.

    Items are dicts of float32 tensors ``mix`` (N,), ``target`` (N,), ``ref`` (R,) with N =
    ``segment_seconds`` and R = ``ref_seconds`` at 48 kHz, plus metadata that collates with the
    default ``collate_fn``: ``is_ta``, ``ref_noisy`` (bool), ``n_interferers``, ``n_corrupt``,
    ``index``, ``speaker_class`` (int: the reference speaker's index in the split's sorted
    speaker list on the training split, -1 elsewhere), ``snr_db``, ``speed`` (float),
    ``speaker``, ``target_utt``, ``ref_utt``,
    ``interferer_utts``, ``rir_ids``, ``noise_id`` (str; several ids joined by ``|``).
    With ``return_components`` the item also holds ``comp_target`` (N,) (the target as heard
    in the mixture, zeros for TA), ``comp_interferers`` (K, N) and ``comp_noise`` (N,), which
    sum to ``mix``; K varies, so batch those with batch size 1.

    Shape:
        mix, target: (N,); ref: (R,)
    """

    def __init__(
        self,
        *,
        manifest_dir: str | Path,
        split: str = "train",
        length: int = 100_000,
        seed: int = 1234,
        rank: int = 0,
        segment_seconds: float = 4.0,
        ref_seconds: float = 4.0,
        min_interferers: int = 1,
        max_interferers: int = 3,
        level_db: tuple[float, float] | list[float] = (-35.0, -15.0),
        sir_db: tuple[float, float] | list[float] = (-5.0, 5.0),
        snr_db: tuple[float, float] | list[float] = (-5.0, 15.0),  # doc/design.md, "Data pipeline"
        ref_level_db: tuple[float, float] | list[float] = (-35.0, -15.0),
        ref_snr_db: tuple[float, float] | list[float] = (0.0, 20.0),
        ta_prob: float = 0.0,  # phase 1 has no target-absent samples (doc/design.md, "Training")
        noisy_ref_prob: float = 0.0,
        target_type: str = "reverberant",
        early_reverb_ms: float = 50.0,
        max_rir_seconds: float = 2.0,
        rir_cache_size: int = 512,
        speed_perturb: tuple[float, float] | list[float] = (0.9, 1.1),
        peak_limit: float = 0.95,
        reverb_prob: float = 1.0,
        noise_prob: float = 1.0,
        speaker_pair: tuple[str, str] | list[str] = (),
        virtual_speakers: tuple[float, ...] | list[float] = (),
        return_components: bool = False,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        super().__init__()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if target_type not in TARGET_TYPES:
            raise ValueError(f"target_type must be one of {TARGET_TYPES}, got {target_type!r}")
        if seed < 0 or rank < 0:
            raise ValueError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}")
        for name, prob in (("reverb_prob", reverb_prob), ("noise_prob", noise_prob)):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {prob}")
        if len(speaker_pair) not in (0, 2):
            raise ValueError(f"speaker_pair names a target and an interferer speaker, got "
                             f"{list(speaker_pair)}")
        if any(not 0.5 <= f <= 2.0 or f == 1.0 for f in virtual_speakers):
            raise ValueError(f"virtual_speakers factors must be in [0.5, 2] and not 1, got "
                             f"{list(virtual_speakers)}")
        if not 1 <= min_interferers <= max_interferers:
            raise ValueError(
                f"need 1 <= min_interferers <= max_interferers, got "
                f"{min_interferers}, {max_interferers}"
            )
        self.split = split
        self.length = int(length)
        self.seed = int(seed)
        self.rank = int(rank)
        self.sample_rate = int(sample_rate)  # of the packed audio: its manifests must agree
        self.segment_samples = round(segment_seconds * sample_rate)
        self.ref_samples = round(ref_seconds * sample_rate)
        self.level_db = list(level_db)
        self.sir_db = list(sir_db)
        self.snr_db = list(snr_db)
        self.ref_level_db = list(ref_level_db)
        self.ref_snr_db = list(ref_snr_db)
        self.target_type = target_type
        self.early_samples = max(1, round(early_reverb_ms * sample_rate / 1000))
        self.max_rir_samples = max(1, round(max_rir_seconds * sample_rate))
        self.rir_cache_size = int(rir_cache_size)
        self.speed_perturb = list(speed_perturb)
        self.peak_limit = float(peak_limit)
        self.reverb_prob = float(reverb_prob)
        self.noise_prob = float(noise_prob)
        self.return_components = return_components
        self.n_corrupt = 0  # corrupt entries met by this process (see also item["n_corrupt"])

        manifest_dir = Path(manifest_dir)
        # A fixed pair is speaker-dependent separation: its validation items are other crops
        # and mixtures (the validation RNG stream) of the same two training speakers.
        self.speech = load_packed(manifest_dir, "speech", "train" if speaker_pair else split,
                                  sample_rate)
        self.noise = self._table_or_train(manifest_dir, "noise")
        self.rirs = self._table_or_train(manifest_dir, "rir")
        self._check_not_empty(manifest_dir)
        # Utterances grouped by speaker; the target needs two (mixture and reference).
        order = np.argsort(self.speech.speakers, kind="stable")
        bounds = np.searchsorted(
            self.speech.speakers[order], np.arange(len(self.speech.speaker_names) + 1)
        )
        self._utts = [order[bounds[s] : bounds[s + 1]] for s in range(len(bounds) - 1)]
        # Speaker s plays its utterances self._speed[s] times faster; virtual training speakers
        # (copies of the real ones at other speeds) follow the real ones.
        self.speaker_names = list(self.speech.speaker_names)
        self._speed = [1.0] * len(self._utts)
        if split == "train":
            real = list(zip(self.speaker_names, self._utts, strict=True))
            for f in virtual_speakers:
                self.speaker_names += [f"{name}@x{f:g}" for name, _ in real]
                self._utts += [utts for _, utts in real]
                self._speed += [float(f)] * len(real)
        self._targets = np.array([s for s, u in enumerate(self._utts) if len(u) >= 2])
        n_speakers = len(self._utts)
        if len(self._targets) == 0 or n_speakers < 2:
            raise ManifestError(
                f"{manifest_dir}: the {split} split needs two speakers, one of them with two "
                f"utterances (has {n_speakers} speakers)"
            )
        if max_interferers > n_speakers - 1:
            log.warning(
                "%s split has %d speakers: at most %d interferers instead of %d",
                split, n_speakers, n_speakers - 1, max_interferers,
            )
        self.max_interferers = min(max_interferers, n_speakers - 1)
        self.min_interferers = min(min_interferers, self.max_interferers)
        self.speaker_pair: tuple[int, int] | None = None
        if speaker_pair:
            names = list(self.speech.speaker_names)
            missing = [n for n in speaker_pair if n not in names]
            if missing or speaker_pair[0] == speaker_pair[1]:
                raise ManifestError(f"{manifest_dir}: speaker_pair {list(speaker_pair)} must be "
                                    f"two different training speakers (unknown: {missing})")
            target, interferer = (names.index(n) for n in speaker_pair)
            if len(self._utts[target]) < 2:
                raise ManifestError(f"{manifest_dir}: speaker_pair target {speaker_pair[0]} has "
                                    "one utterance; the reference needs another")
            self.speaker_pair = (target, interferer)

        files = self.speech.files + self.noise.files + self.rirs.files
        self._reader = H5Reader(files)  # opens nothing until a worker reads
        self._noise_file0 = len(self.speech.files)
        self._rir_file0 = self._noise_file0 + len(self.noise.files)
        self._rir_cache: OrderedDict[int, _Rir] = OrderedDict()
        # [ta_prob, noisy_ref_prob, epoch] in shared memory: DataLoader workers (forked or
        # spawned) read the values the training loop sets in the main process.
        self._shared = torch.tensor([ta_prob, noisy_ref_prob, 0.0], dtype=torch.float64)
        self._shared.share_memory_()

    def _table_or_train(self, manifest_dir: Path, kind: str) -> PackedTable:
        table = load_packed(manifest_dir, kind, self.split, self.sample_rate)
        if len(table) == 0 and self.split == "val":
            log.warning("no validation %s entries; the validation set uses the training ones", kind)
            table = load_packed(manifest_dir, kind, "train", self.sample_rate)
        return table

    def _check_not_empty(self, manifest_dir: Path) -> None:
        for kind, table in (("speech", self.speech), ("noise", self.noise), ("rir", self.rirs)):
            if len(table) == 0:
                raise ManifestError(f"{manifest_dir}: no packed {kind} entries in the manifest")

    # ---- state set by the training loop --------------------------------------------------

    @property
    def ta_prob(self) -> float:
        return float(self._shared[0])

    @ta_prob.setter
    def ta_prob(self, value: float) -> None:
        self._shared[0] = float(value)

    @property
    def noisy_ref_prob(self) -> float:
        return float(self._shared[1])

    @noisy_ref_prob.setter
    def noisy_ref_prob(self, value: float) -> None:
        self._shared[1] = float(value)

    @property
    def epoch(self) -> int:
        return int(self._shared[2])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's stream of training mixtures (no effect on validation)."""
        self._shared[2] = float(epoch)

    def __len__(self) -> int:
        return self.length

    # ---- sampling ------------------------------------------------------------------------

    def __getitem__(self, item: int | tuple[float, ...]) -> dict[str, Any]:
        sir_boost, selection, twins = 0.0, False, False
        if isinstance(item, tuple):
            # (index, ta_prob, noisy_ref_prob[, sir_boost_db[, selection[, twins]]])
            index, ta_prob, noisy_ref_prob = int(item[0]), float(item[1]), float(item[2])
            sir_boost = float(item[3]) if len(item) > 3 else 0.0
            selection = len(item) > 4 and bool(item[4])
            twins = len(item) > 5 and bool(item[5])
        else:
            index, ta_prob, noisy_ref_prob = int(item), self.ta_prob, self.noisy_ref_prob
        # Twins: an odd index is its even neighbour's mixture with the roles of the target and
        # the first interferer exchanged (a target-absent neighbour has no twin: the odd index
        # is then drawn on its own).
        twin = twins and index % 2 == 1
        sample = self._draw(index - 1 if twin else index, ta_prob, noisy_ref_prob, sir_boost,
                            selection, twins, twin)
        if twin and sample["is_ta"]:
            sample = self._draw(index, ta_prob, noisy_ref_prob, sir_boost, selection, twins,
                                False)
        sample["index"] = index
        return sample

    def _draw(self, index: int, ta_prob: float, noisy_ref_prob: float, sir_boost: float,
              selection: bool, twins: bool, twin: bool) -> dict[str, Any]:
        """Item ``index``'s draws (``_build``), drawn again after a corrupt entry."""
        if self.split == "val":
            words = [self.seed, _VAL_STREAM, 0, 0, index]
        else:
            words = [self.seed, _TRAIN_STREAM, self.rank, self.epoch, index]
        n_corrupt = 0
        for attempt in range(MAX_DRAWS):
            rng = np.random.default_rng([*words, attempt])
            try:
                sample = self._build(rng, ta_prob, noisy_ref_prob, sir_boost, selection, twins,
                                     twin)
            except CorruptEntryError as err:
                n_corrupt += 1
                self.n_corrupt += 1
                log.warning("sample %d: skipped a corrupt entry and drew again: %s", index, err)
                continue
            except _Redraw:
                continue
            sample.update(index=index, n_corrupt=n_corrupt)
            return sample
        raise RuntimeError(
            f"{self.split} sample {index}: no usable sample in {MAX_DRAWS} draws "
            f"({n_corrupt} corrupt entries met); check the packed HDF5 files"
        )

    def _build(
        self,
        rng: np.random.Generator,
        ta_prob: float,
        noisy_ref_prob: float,
        sir_boost: float,
        selection: bool = False,
        twins: bool = False,
        twin: bool = False,
    ) -> dict[str, Any]:
        """Draw everything first (a fixed order of draws), then read and mix. ``sir_boost``
        (dB) is added to the drawn SIRs of target-present samples after the draws, so a boosted
        sample is the unboosted one with quieter interferers. ``selection`` (the selection
        curriculum, ``train.selection_steps``) then keeps the target and its first interferer
        only, at exactly 0 dB SIR, dry and noise-free. ``twins`` (``train.twin_steps``) draws
        the first interferer's reference utterance too, and ``twin`` gives the same mixture
        with that interferer as the target (as ``target_type`` makes a target) and its own
        reference."""
        n = self.segment_samples
        is_ta = bool(rng.random() < ta_prob)
        ref_noisy = bool(rng.random() < noisy_ref_prob)
        n_int = int(rng.integers(self.min_interferers, self.max_interferers + 1))
        spk_t = int(rng.choice(self._targets))
        # Interferers: distinct speakers drawn from all but the target.
        others = rng.choice(len(self._utts) - 1, size=n_int, replace=False)
        interferers = [int(s) + int(s >= spk_t) for s in others]
        if self.speaker_pair is not None:
            spk_t, interferer = self.speaker_pair
            n_int, interferers = 1, [interferer]
        utt_t, utt_ref = (int(u) for u in rng.choice(self._utts[spk_t], size=2, replace=False))
        utt_int = [int(rng.choice(self._utts[s])) for s in interferers]
        speed_t = _uniform(rng, self.speed_perturb) * self._speed[spk_t]
        speed_int = [_uniform(rng, self.speed_perturb) * self._speed[s] for s in interferers]
        rirs = [int(i) for i in rng.integers(0, len(self.rirs), size=1 + n_int)]
        noise_idx, ref_noise_idx = (int(i) for i in rng.integers(0, len(self.noise), size=2))
        level = _uniform(rng, self.level_db)
        sirs = [_uniform(rng, self.sir_db) + (0.0 if is_ta else sir_boost) for _ in interferers]
        snr = _uniform(rng, self.snr_db)
        ref_level = _uniform(rng, self.ref_level_db)
        ref_snr = _uniform(rng, self.ref_snr_db)
        # Drawn only below 1, so that the default configuration draws what it always drew.
        reverberant = self.reverb_prob == 1.0 or bool(rng.random() < self.reverb_prob)
        noisy = self.noise_prob == 1.0 or bool(rng.random() < self.noise_prob)
        twin = twin and not is_ta  # a target-absent item has no twin (__getitem__ draws anew)
        if selection and not is_ta:
            n_int, interferers, utt_int, speed_int = 1, interferers[:1], utt_int[:1], speed_int[:1]
            rirs, sirs, reverberant, noisy = rirs[:2], [0.0], False, False
        if twins and not is_ta:
            free = [u for u in self._utts[interferers[0]] if u != utt_int[0]]
            utt_ref_int = int(rng.choice(free)) if free else utt_int[0]

        # Speech in the mixture, each convolved with its own RIR. (S, N) after stacking.
        utts = ([] if is_ta else [utt_t]) + utt_int
        speeds = ([] if is_ta else [speed_t]) + speed_int
        rir_ids = rirs[1:] if is_ta else rirs
        # The voice whose target signal is made: the first, or the twin's first interferer.
        lead = 1 if twin else 0
        sources, target_sig = [], None
        for k, (u, f, r) in enumerate(zip(utts, speeds, rir_ids, strict=True)):
            if not reverberant:  # dry: the speech as recorded, whatever the target type
                sources.append(self._speech_window(u, f, rng, pre=0, n=n))
                target_sig = sources[lead] if k == lead and not is_ta else target_sig
                continue
            rir = self._rir(r)
            window = self._speech_window(u, f, rng, pre=rir.length - 1, n=n)  # (n + R - 1,)
            spec = sfft.rfft(window, rir.n_fft)
            sources.append(_convolved(spec, rir.spectrum, rir, n))
            if k == lead and not is_ta:
                if self.target_type == "reverberant":
                    target_sig = sources[lead]
                elif self.target_type == "early":
                    target_sig = _convolved(spec, rir.early_spectrum, rir, n)
                else:  # dry: delayed like the direct path, whose energy is 1
                    start = rir.length - 1 - rir.delay
                    target_sig = window[start : start + n]

        # Levels: first speaker at `level` dBFS, the others `sir` dB below it.
        lead_rms = _rms(sources[0])
        if lead_rms < MIN_ACTIVE_RMS:
            raise _Redraw
        gains = [10 ** (level / 20) / lead_rms]
        # For TA the first interferer leads, so its own SIR draw goes unused.
        for src, sir in zip(sources[1:], sirs[1:] if is_ta else sirs, strict=True):
            src_rms = _rms(src)
            if src_rms < MIN_ACTIVE_RMS:
                raise _Redraw
            gains.append(10 ** ((level - sir) / 20) / src_rms)
        sources = [(g * s).astype(np.float32) for g, s in zip(gains, sources, strict=True)]
        target = (
            np.zeros(n, dtype=np.float32)
            if is_ta
            else (gains[lead] * target_sig).astype(np.float32)
        )
        speech = np.sum(sources, axis=0, dtype=np.float32)
        noise = (self._noise_at(noise_idx, rng, n, _energy(speech), snr) if noisy
                 else np.zeros(n, dtype=np.float32))
        mix = speech + noise

        # One gain for every signal whose sum or part forms the mixture.
        comp_target = np.zeros(n, dtype=np.float32) if is_ta else sources[lead]
        comp_int = np.stack([s for k, s in enumerate(sources) if is_ta or k != lead])  # (K, n)
        peak = max(np.abs(mix).max(), np.abs(target).max(), np.abs(comp_int).max(),
                   np.abs(comp_target).max(), np.abs(noise).max())
        if peak > self.peak_limit:
            g = np.float32(self.peak_limit / peak)
            mix, target, comp_target, comp_int, noise = (
                mix * g, target * g, comp_target * g, comp_int * g, noise * g
            )

        if twin:  # the other voice is the target: its reference and its identity
            spk_t, utt_t, utt_ref, speed_t, utt_int = (
                interferers[0], utt_int[0], utt_ref_int, speed_int[0], [utt_t, *utt_int[1:]])
        ref = self._reference(utt_ref, speed_t, rng, ref_level, ref_noisy, ref_noise_idx, ref_snr)
        sample: dict[str, Any] = {
            "mix": torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32)),
            "ref": torch.from_numpy(ref),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "is_ta": is_ta,
            "ref_noisy": ref_noisy,
            "n_interferers": n_int,
            "snr_db": snr,
            "speed": speed_t,
            "speaker": self.speaker_names[spk_t],
            # The reference speaker's class among the sorted training speakers, for families
            # with a speaker-classification head; unseen (validation) speakers have none.
            "speaker_class": spk_t if self.split == "train" else -1,
            "target_utt": "" if is_ta else self.speech.key(utt_t),
            "ref_utt": self.speech.key(utt_ref),
            "interferer_utts": _ID_SEP.join(self.speech.key(u) for u in utt_int),
            "rir_ids": _ID_SEP.join(self.rirs.key(r) for r in rir_ids) if reverberant else "",
            "noise_id": self.noise.key(noise_idx) if noisy else "",
        }
        if self.return_components:
            sample["comp_target"] = torch.from_numpy(np.ascontiguousarray(comp_target))
            sample["comp_interferers"] = torch.from_numpy(np.ascontiguousarray(comp_int))
            sample["comp_noise"] = torch.from_numpy(np.ascontiguousarray(noise))
        return sample

    def swap_pair(self, index: int, *, noisy: bool, n_refs: int = 1) -> dict[str, Any]:
        """Swap pair ``index`` (a pure function of the seed, the index and ``noisy``): speakers
        A and B, one utterance of each in the mixture at 0 dB SIR (active-speech RMS, each at
        ``SWAP_LEVEL_DBFS``) and another of each as its reference (clean, at its own drawn
        level). ``noisy``: each voice through its own RIR, noise at ``SWAP_SNR_DB``. No speed
        perturbation. Returns ``mix`` (N,), ``sources`` (2, N): A and B as heard in the
        mixture, ``refs`` (2, M): the references of A and B, ``speakers``: their names. With
        ``n_refs`` > 1, ``refs`` is (2, n_refs, M): the same first reference of each, then
        further utterances (drawn after everything else, so the pair is otherwise the same).
        """
        if len(self._targets) < 2:
            raise ManifestError(f"the {self.split} split needs two speakers with two utterances "
                                "each for swap pairs")
        n = self.segment_samples
        for attempt in range(MAX_DRAWS):
            # The same draws for both conditions: pair i is the same two voices, dry or noisy.
            rng = np.random.default_rng([self.seed, _SWAP_STREAM, index, attempt])
            speakers = [int(s) for s in rng.choice(self._targets, size=2, replace=False)]
            utts = [[int(u) for u in rng.choice(self._utts[s], size=2, replace=False)]
                    for s in speakers]  # (mixture, reference) per speaker
            rirs = [int(i) for i in rng.integers(0, len(self.rirs), size=2)]
            noise_idx = int(rng.integers(0, len(self.noise)))
            ref_levels = [_uniform(rng, self.ref_level_db) for _ in speakers]
            try:
                sources = []
                for (utt, _), r in zip(utts, rirs, strict=True):
                    if noisy:
                        rir = self._rir(r)
                        window = self._speech_window(utt, 1.0, rng, pre=rir.length - 1, n=n)
                        voice = _convolved(sfft.rfft(window, rir.n_fft), rir.spectrum, rir, n)
                    else:
                        voice = self._speech_window(utt, 1.0, rng, pre=0, n=n)
                    level = active_rms(voice, self.sample_rate)
                    if level < MIN_ACTIVE_RMS:
                        raise _Redraw
                    sources.append((voice * (10 ** (SWAP_LEVEL_DBFS / 20) / level))
                                   .astype(np.float32))
                heard = np.stack(sources)  # (2, N)
                mix = heard.sum(axis=0)
                if noisy:
                    mix = mix + self._noise_at(noise_idx, rng, n, _energy(mix), SWAP_SNR_DB)
                refs = np.stack([
                    self._reference(ref, 1.0, rng, level, False, noise_idx, 0.0)
                    for (_, ref), level in zip(utts, ref_levels, strict=True)
                ])  # (2, M)
                if n_refs > 1:
                    refs = np.stack([self._more_references(first, s, used, level, n_refs, rng)
                                     for first, s, used, level
                                     in zip(refs, speakers, utts, ref_levels, strict=True)])
            except (_Redraw, CorruptEntryError):
                continue
            peak = max(float(np.abs(mix).max()), float(np.abs(heard).max()))
            if peak > self.peak_limit:
                mix, heard = mix * (self.peak_limit / peak), heard * (self.peak_limit / peak)
            return {"mix": np.ascontiguousarray(mix, dtype=np.float32),
                    "sources": np.ascontiguousarray(heard, dtype=np.float32), "refs": refs,
                    "speakers": [self.speaker_names[s] for s in speakers]}
        raise RuntimeError(f"swap pair {index}: no usable pair in {MAX_DRAWS} draws")

    def _more_references(self, first: np.ndarray, speaker: int, used: list[int], level: float,
                         n_refs: int, rng: np.random.Generator) -> np.ndarray:
        """``first`` and ``n_refs - 1`` more clean references of ``speaker`` at ``level``, from
        utterances other than ``used`` where there are enough. Shape: -> (n_refs, M)"""
        free = [u for u in self._utts[speaker] if u not in used]
        more = rng.choice(free, size=n_refs - 1, replace=len(free) < n_refs - 1)
        return np.stack([first, *(self._reference(int(u), 1.0, rng, level, False, 0, 0.0)
                                  for u in more)])

    def _reference(
        self,
        utt: int,
        speed: float,
        rng: np.random.Generator,
        level: float,
        noisy: bool,
        noise_idx: int,
        snr: float,
    ) -> np.ndarray:
        """The dry reference at ``level`` dBFS, plus noise at ``snr`` dB when ``noisy``.

        Shape:
            returns (ref_samples,) float32
        """
        ref = self._speech_window(utt, speed, rng, pre=0, n=self.ref_samples)
        ref_rms = _rms(ref)
        if ref_rms < MIN_ACTIVE_RMS:
            raise _Redraw
        ref = (ref * np.float32(10 ** (level / 20) / ref_rms)).astype(np.float32)
        if noisy:
            noise = self._noise_crop(noise_idx, rng, self.ref_samples)
            noise_energy = _energy(noise)
            if noise_energy < MIN_ACTIVE_RMS**2 * len(noise):
                raise _Redraw
            ref += noise * np.float32(math.sqrt(_energy(ref) / (noise_energy * 10 ** (snr / 10))))
        peak = float(np.abs(ref).max())
        if peak > self.peak_limit:
            ref *= np.float32(self.peak_limit / peak)
        return np.ascontiguousarray(ref, dtype=np.float32)

    # ---- reading -------------------------------------------------------------------------

    def _speech_window(
        self, utt: int, speed: float, rng: np.random.Generator, *, pre: int, n: int
    ) -> np.ndarray:
        """A random crop of ``n`` samples of an utterance played ``speed`` times faster, with
        the ``pre`` samples before it (what an RIR of ``pre + 1`` taps needs); zeros outside the
        utterance. An utterance shorter than ``n`` lands at a random offset in the crop.

        Shape:
            returns (pre + n,) float32
        """
        file_index = int(self.speech.file_index[utt])
        key = self.speech.keys[utt]
        n_in = int(self.speech.num_samples[utt])
        n_out = int(n_in / speed)  # length after speed perturbation
        if n_out >= n:
            start = int(rng.integers(0, n_out - n + 1))
        else:
            start = -int(rng.integers(0, n - n_out + 1))
        lo, hi = start - pre, start + n  # window in perturbed samples
        if speed == 1.0:
            return self._reader.read(file_index, key, lo, hi)
        # Read the input span that maps onto the window (plus soxr's edge margin), resample it
        # and place it: never the whole utterance.
        in_lo = max(0, math.floor(lo * speed) - RESAMPLE_PAD)
        in_hi = min(n_in, math.ceil(hi * speed) + RESAMPLE_PAD)
        out = np.zeros(hi - lo, dtype=np.float32)
        if in_hi <= in_lo:
            return out
        chunk = self._reader.read(file_index, key, in_lo, in_hi)
        rate = self.sample_rate
        played = soxr.resample(chunk, rate * speed, rate)  # len ≈ len / speed
        offset = round(in_lo / speed) - lo  # where played[0] falls in the window
        a, b = max(0, offset), min(len(out), offset + len(played))
        if b > a:
            out[a:b] = played[a - offset : b - offset]
        # Past the utterance's end (n_out) the window is silence, whatever soxr's tail holds.
        out[max(0, n_out - lo) :] = 0.0
        return out

    def _noise_at(self, idx: int, rng: np.random.Generator, n: int, speech_energy: float,
                  snr: float) -> np.ndarray:
        """A crop of noise clip ``idx`` scaled to ``snr`` dB below ``speech_energy``; a silent
        crop is drawn again. Shape: returns (n,) float32."""
        noise = self._noise_crop(idx, rng, n)
        noise_energy = _energy(noise)
        if noise_energy < MIN_ACTIVE_RMS**2 * n:
            raise _Redraw
        return noise * np.float32(math.sqrt(speech_energy / (noise_energy * 10 ** (snr / 10))))

    def _noise_crop(self, idx: int, rng: np.random.Generator, n: int) -> np.ndarray:
        """A random ``n``-sample crop of a noise clip; a shorter clip is repeated to fill it.

        Shape:
            returns (n,) float32
        """
        file_index = self._noise_file0 + int(self.noise.file_index[idx])
        key = self.noise.keys[idx]
        total = int(self.noise.num_samples[idx])
        if total >= n:
            start = int(rng.integers(0, total - n + 1))
            return self._reader.read(file_index, key, start, start + n)
        clip = self._reader.read(file_index, key, 0, total)
        return np.resize(clip, n).astype(np.float32)

    def _rir(self, idx: int) -> _Rir:
        """An RIR and its spectra from the worker's LRU cache (a small RIR set is drawn over and
        over; with a large one the cache mostly misses and costs one FFT per RIR)."""
        cached = self._rir_cache.get(idx)
        if cached is not None:
            self._rir_cache.move_to_end(idx)
            return cached
        h, longer = self._read_rir(idx)
        rir = self._prepare_rir(h, longer, self.rirs.key(idx))
        self._rir_cache[idx] = rir
        if len(self._rir_cache) > self.rir_cache_size:
            self._rir_cache.popitem(last=False)
        return rir


    def _read_rir(self, idx: int) -> tuple[np.ndarray, bool]:
        """The start of a packed RIR (direct-path search span + ``max_rir_seconds``), and
        whether the RIR goes on beyond what was read.

        Shape:
            returns (L,) float32, bool
        """
        file_index = self._rir_file0 + int(self.rirs.file_index[idx])
        total = int(self.rirs.num_samples[idx])
        n = min(total, round(RIR_PEAK_SEARCH_SECONDS * self.sample_rate) + self.max_rir_samples)
        return self._reader.read(file_index, self.rirs.keys[idx], 0, n), total > n

    def _prepare_rir(self, h: np.ndarray, longer: bool, name: str) -> _Rir:
        """Trim, scale and cut an RIR (see the module doc) and compute its spectra."""
        search = round(RIR_PEAK_SEARCH_SECONDS * self.sample_rate)
        peak = int(np.argmax(np.abs(h[:search])))
        if h[peak] == 0:
            raise CorruptEntryError(f"RIR '{name}': silent for its first {search} samples")
        # A measured direct path is a short pulse, not one tap: keep its onset and measure its
        # energy over +-2.5 ms.
        half = round(DIRECT_PATH_HALF_MS * self.sample_rate / 1000)
        delay = min(peak, half)
        cut = longer or peak - delay + self.max_rir_samples < len(h)
        h = h[peak - delay : peak - delay + self.max_rir_samples]
        h = h * np.float32(np.sign(h[delay]) / math.sqrt(_energy(h[: delay + half + 1])))
        if cut:
            fade = min(len(h), round(RIR_FADE_SECONDS * self.sample_rate))
            h[len(h) - fade :] *= np.hanning(2 * fade)[fade:].astype(np.float32)
        h = np.ascontiguousarray(h, dtype=np.float32)
        n_fft = sfft.next_fast_len(self.segment_samples + len(h) - 1, real=True)
        return _Rir(
            length=len(h),
            delay=delay,
            n_fft=n_fft,
            spectrum=sfft.rfft(h, n_fft),
            early_spectrum=(
                sfft.rfft(h[: delay + self.early_samples], n_fft)
                if self.target_type == "early"
                else None
            ),
        )


# ---------------------------------------------------------------------------------------------
# Construction from the config, and DataLoader worker seeding
# ---------------------------------------------------------------------------------------------


def dataset_kwargs(d: DataConfig, split: str, *, rank: int = 0,
                   sample_rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Constructor arguments of ``HiFiTSEDataset`` for ``split`` from the data section, at the
    run's ``sample_rate`` (``stft.sample_rate``).

    Training starts as phase 1 (no TA, clean references); the training loop raises
    ``ta_prob`` and ``noisy_ref_prob`` later. Validation is fixed: ``n_val_samples`` samples
    with ``ta_prob`` and ``val_noisy_ref_prob`` from the config.
    """
    is_val = split == "val"
    return {
        "manifest_dir": d.manifest_dir,
        "split": split,
        "length": d.n_val_samples if is_val else d.samples_per_epoch,
        "seed": d.seed,
        "rank": rank,
        "segment_seconds": d.segment_seconds,
        "ref_seconds": d.ref_seconds,
        "min_interferers": d.min_interferers,
        "max_interferers": d.max_interferers,
        "level_db": d.level_db,
        "sir_db": d.sir_db,
        "snr_db": d.snr_db,
        "ref_level_db": d.ref_level_db,
        "ref_snr_db": d.ref_snr_db,
        "ta_prob": d.ta_prob if is_val else 0.0,
        "noisy_ref_prob": d.val_noisy_ref_prob if is_val else 0.0,
        "target_type": d.target_type,
        "early_reverb_ms": d.early_reverb_ms,
        "max_rir_seconds": d.max_rir_seconds,
        "rir_cache_size": d.rir_cache_size,
        "speed_perturb": d.speed_perturb,
        "peak_limit": d.peak_limit,
        "reverb_prob": d.reverb_prob,
        "noise_prob": d.noise_prob,
        "speaker_pair": d.speaker_pair,
        "virtual_speakers": d.virtual_speakers,
        "sample_rate": sample_rate,
    }


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader: seeds the global RNGs (numpy, random) of each worker
    from torch's per-worker seed, for any library that draws from them. The dataset itself
    never does; its samples depend on (seed, rank, epoch, index) only. The worker ignores the
    stop signals: the training process decides when to stop (``dsp.processes``)."""
    ignore_stop_signals()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 -- global state is exactly what this protects
    random.seed(seed)
