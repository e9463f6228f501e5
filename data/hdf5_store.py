"""One HDF5 file per kind of audio (speech, noise, RIR): parallel resumable packing, lazy reading.

Layout: one float32 mono dataset per file (or per RIR channel) under its manifest key, at the
run's sample rate (48 kHz by default; the root attribute ``sample_rate``, absent in packs
written before other rates existed, which are 48 kHz), chunked in 1 s pieces so that a 4 s crop
reads about five chunks and never the whole utterance. Every chunk carries an HDF5 Fletcher-32
checksum (4 bytes; ``dataset.fletcher32`` is True), so bytes changed on disk after packing fail
the read instead of feeding wrong audio that stays in range. Packs written before the checksums
read as they did, unchecked; repacking (delete the file) adds them, and a resumed pack adds them
to its new entries only. Attributes: ``source``, ``speaker`` (speech), ``path``, ``num_samples``
and, written last, ``complete``.

Crash safety: the writer flushes after every entry and sets ``complete`` only after the data,
so a killed pack leaves at most one entry without it; the next run deletes such entries and
packs whatever is missing. The file uses the default (oldest) HDF5 format on purpose: the
newer superblock marks a file "open for write" and refuses to open it after a crash
(``h5clear`` would be needed), which would defeat resuming. A flush writes the new metadata
first and the superblock's end-of-allocation address last, so a kill inside a flush leaves
metadata beyond the recorded end ("addr overflow" on open); the resuming writer then moves
that address to the file's size, as ``h5clear --increment`` does, and reads on; a file that
still cannot be read is one clear error (``PackError``) and is left as it was.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from dsp.audio import SAMPLE_RATE, AudioError, load_audio
from dsp.files import write_json_atomic
from dsp.processes import die_with_parent

log = logging.getLogger(__name__)

CHUNK_SECONDS = 1  # 1 s chunks: a random 4 s crop touches 5 of them
RATE_ATTR = "sample_rate"  # root attribute; a pack without it is 48 kHz
COMPLETE_ATTR = "complete"
MAX_ABS_SAMPLE = 64.0  # a float sample beyond this is garbage, not audio (corrupt bytes)
IN_FLIGHT_PER_WORKER = 4  # decoded files waiting for the writer; bounds the writer's memory


class PackError(ValueError):
    """An HDF5 file an interrupted pack left that cannot be resumed."""


class CorruptEntryError(RuntimeError):
    """An HDF5 entry that is missing, unreadable, incomplete, fails its checksum or holds
    non-finite samples."""


# ---------------------------------------------------------------------------------------------
# Decoding (runs in the worker processes)
# ---------------------------------------------------------------------------------------------


def decode_entry(entry: dict[str, Any], sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The audio of a manifest entry as mono float32 at ``sample_rate``: ``load_audio`` (downmix +
    soxr) for whole files, or one channel of a multi-channel file when ``entry['channel']`` is
    set. Raises ``AudioError`` naming the file.

    Shape:
        returns (N,)
    """
    channel = entry.get("channel")
    if channel is None:
        return load_audio(entry["path"], sample_rate)
    path = entry["path"]
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # (N, C)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio")
    if channel >= data.shape[1]:
        raise AudioError(f"{path}: no channel {channel} (file has {data.shape[1]})")
    wave = np.ascontiguousarray(data[:, channel])
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: non-finite samples (NaN or Inf)")
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate).astype(np.float32, copy=False)
    return wave


def _decode_task(task: tuple[dict[str, Any], int, int]) -> tuple[np.ndarray | None, str | None]:
    """(wave, None) or (None, reason) for one (entry, min_samples, sample_rate); never raises,
    so one bad file cannot stop the pack."""
    entry, min_samples, sample_rate = task
    try:
        wave = decode_entry(entry, sample_rate)
    except AudioError as err:
        return None, str(err)
    except Exception as err:  # a decoder crash on one file is reported like a bad file
        return None, f"{entry['path']}: cannot decode ({type(err).__name__}: {err})"
    if len(wave) < min_samples:
        return None, (
            f"{entry['path']}: too short ({len(wave) / sample_rate:.3f} s < "
            f"{min_samples / sample_rate:.3f} s)"
        )
    if not np.any(wave):
        return None, f"{entry['path']}: silent (all samples are zero)"
    return wave, None


@contextmanager
def _decoder(workers: int) -> Iterator[Callable[..., Iterator[tuple]]]:
    """A function that decodes entries in ``workers`` processes and yields ``(entry, wave,
    error)`` in order, keeping a bounded number of decoded waves waiting (a slow disk must not
    let 200 k utterances pile up in memory). Enter it before opening the HDF5 file: forked
    workers would otherwise inherit the file's handle and lock."""
    if workers <= 0:

        def decode_here(entries: list[dict[str, Any]], min_samples: int,
                        sample_rate: int) -> Iterator[tuple]:
            for e in entries:
                yield (e, *_decode_task((e, min_samples, sample_rate)))

        yield decode_here
        return
    # fork: workers start at once and inherit the imports; they never touch HDF5.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=die_with_parent) as pool:

        def decode(entries: list[dict[str, Any]], min_samples: int,
                   sample_rate: int) -> Iterator[tuple]:
            pending: deque = deque()
            for e in entries:
                task = (e, min_samples, sample_rate)
                pending.append((e, pool.apply_async(_decode_task, (task,))))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    done, result = pending.popleft()
                    yield (done, *result.get())
            while pending:
                done, result = pending.popleft()
                yield (done, *result.get())

        yield decode


# ---------------------------------------------------------------------------------------------
# Packing (the one writer)
# ---------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    """What a pack run left in the HDF5 file."""

    num_samples: dict[str, int] = field(default_factory=dict)  # key -> samples, every entry
    skipped: list[dict[str, str]] = field(default_factory=list)  # key, path, error
    n_new: int = 0  # entries written by this run
    n_resumed: int = 0  # complete entries found from an earlier run
    n_removed: int = 0  # incomplete entries deleted before resuming
    seconds: float = 0.0
    audio_bytes: int = 0  # float32 bytes written by this run


def _existing_entries(f: h5py.File) -> tuple[dict[str, int], list[str], int]:
    """(complete key -> samples, incomplete keys, complete entries without checksums) of an
    HDF5 file left by an earlier run."""
    complete: dict[str, int] = {}
    incomplete: list[str] = []
    unchecked = 0

    def visit(name: str, obj: Any) -> None:
        nonlocal unchecked
        if not isinstance(obj, h5py.Dataset):
            return
        n = obj.attrs.get("num_samples", -1)
        if obj.attrs.get(COMPLETE_ATTR, False) and obj.ndim == 1 and obj.shape[0] == n:
            complete[name] = int(n)
            unchecked += not obj.fletcher32
        else:
            incomplete.append(name)

    f.visititems(visit)
    return complete, incomplete, unchecked


# Superblock version 0 (the default format, module docstring): the 8-byte signature, 8 version
# and size bytes, 2 + 2 B-tree K values, 4 flag bytes, then the base, free-space, end-of-
# allocation and driver-info addresses (HDF5 file format specification, "Superblock version 0").
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_BASE_ADDRESS_AT = 24
_END_ADDRESS_AT = 40


def _extend_end_of_file(h5_path: Path) -> bytes | None:
    """Set a version-0 superblock's end-of-allocation address to the file's size, as
    ``h5clear --increment`` does, and return the 8 bytes it replaced; None when the file is
    not such a file or already ends there."""
    with open(h5_path, "r+b") as fh:
        head = fh.read(_END_ADDRESS_AT + 8)
        if len(head) < _END_ADDRESS_AT + 8 or head[:8] != _SIGNATURE or head[8] != 0:
            return None
        base = int.from_bytes(head[_BASE_ADDRESS_AT:_BASE_ADDRESS_AT + 8], "little")
        before = head[_END_ADDRESS_AT:]
        size = os.fstat(fh.fileno()).st_size - base
        if int.from_bytes(before, "little") >= size:
            return None
        fh.seek(_END_ADDRESS_AT)
        fh.write(size.to_bytes(8, "little"))
        fh.flush()
        os.fsync(fh.fileno())
    return before


def _read_existing(h5_path: Path) -> tuple[dict[str, int], list[str], int, int]:
    """``_existing_entries`` of the file an earlier run left at ``h5_path`` (empty when there is
    none) and its sample rate, repairing the end address a kill inside a flush leaves (module
    docstring).

    The file is read in read-only mode: a writable handle on a broken file fails to close
    and stays open inside HDF5 with the stale end address, so a retry would read that again.
    """
    if not h5_path.exists():
        return {}, [], 0, SAMPLE_RATE
    before = None
    while True:
        try:
            with h5py.File(h5_path, "r", locking=False) as f:
                return (*_existing_entries(f), int(f.attrs.get(RATE_ATTR, SAMPLE_RATE)))
        except (OSError, RuntimeError) as err:
            if before is None:
                before = _extend_end_of_file(h5_path)
                if before is not None:
                    log.warning("%s: an interrupted flush left metadata beyond the file's "
                                "recorded end; moved the end to the file's size", h5_path)
                    continue
            else:  # the repair did not help: leave the file as it was
                with open(h5_path, "r+b") as fh:
                    fh.seek(_END_ADDRESS_AT)
                    fh.write(before)
            raise PackError(f"{h5_path}: cannot resume the pack in this file ({err}); move it "
                            "aside and pack again") from None


def pack(
    entries: list[dict[str, Any]],
    h5_path: str | Path,
    *,
    min_seconds: float,
    workers: int,
    report_path: str | Path | None = None,
    problems: list[dict[str, str]] | None = None,
    show_progress: bool = True,
    sample_rate: int = SAMPLE_RATE,
) -> PackResult:
    """Pack ``entries`` (manifest dicts with ``key`` and ``path``) into ``h5_path`` at
    ``sample_rate``, resuming; a file packed at another rate is an error.

    Entries already complete in the file are kept, incomplete ones are rewritten, unusable
    files are skipped and listed (with ``problems`` found earlier, e.g. by the scan) in the JSON
    report, by default ``<h5 stem>_report.json`` beside the HDF5 file.
    """
    start = time.perf_counter()
    h5_path = Path(h5_path)
    h5_path.parent.mkdir(parents=True, exist_ok=True)
    report_path = Path(report_path or h5_path.with_name(f"{h5_path.stem}_report.json"))
    keys = [e["key"] for e in entries]
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        raise ValueError(f"{h5_path}: duplicate keys in the entries to pack: {dupes[:5]}")
    min_samples = max(1, round(min_seconds * sample_rate))
    result = PackResult(skipped=[dict(p) for p in problems or []])
    complete, incomplete, unchecked, rate = _read_existing(h5_path)
    if complete and rate != sample_rate:
        raise PackError(f"{h5_path}: packed at {rate} Hz, this pack is at {sample_rate} Hz "
                        "(stft.sample_rate); pack into another hdf5_dir")
    with _decoder(workers) as decode, h5py.File(h5_path, "a") as f:
        f.attrs[RATE_ATTR] = sample_rate
        for name in incomplete:
            del f[name]
        if incomplete:
            log.warning("%s: removed %d incomplete entries of an interrupted pack",
                        h5_path, len(incomplete))
            f.flush()
        result.n_removed = len(incomplete)
        todo = [e for e in entries if e["key"] not in complete]
        result.n_resumed = len(entries) - len(todo)
        result.num_samples = {k: complete[k] for k in keys if k in complete}
        if result.n_resumed:
            log.info("%s: %d entries already packed, %d to go", h5_path, result.n_resumed,
                     len(todo))
        if unchecked:
            log.info("%s: %d entries were packed without checksums; delete the file and pack "
                     "again to add them", h5_path, unchecked)
        bar = tqdm(total=len(todo), desc=h5_path.name, unit="file", disable=not show_progress)
        chunk = round(CHUNK_SECONDS * sample_rate)
        for entry, wave, error in decode(todo, min_samples, sample_rate):
            bar.update()
            if wave is None:
                result.skipped.append({"key": entry["key"], "path": entry["path"], "error": error})
                log.warning("skipped %s", error)
                continue
            n = len(wave)
            ds = f.create_dataset(
                entry["key"],
                data=wave,
                dtype=np.float32,
                chunks=(min(n, chunk),),
                fletcher32=True,  # per chunk: a read of changed bytes fails (module docstring)
            )
            for name in ("source", "speaker", "path"):
                if entry.get(name) is not None:
                    ds.attrs[name] = entry[name]
            ds.attrs["num_samples"] = n
            ds.attrs[COMPLETE_ATTR] = True  # last: its presence proves the data above is whole
            # Flushing every entry keeps the file consistent on disk at each entry boundary,
            # so a killed run loses at most the entry in flight.
            f.flush()
            result.num_samples[entry["key"]] = n
            result.n_new += 1
            result.audio_bytes += wave.nbytes
        bar.close()
    result.seconds = time.perf_counter() - start
    write_json_atomic(
        report_path,
        {
            "hdf5": str(h5_path),
            "sample_rate": sample_rate,
            "n_entries": len(entries),
            "n_packed": len(result.num_samples),
            "n_new": result.n_new,
            "n_resumed": result.n_resumed,
            "n_removed_incomplete": result.n_removed,
            "n_skipped": len(result.skipped),
            "skipped": result.skipped,
        },
    )
    return result


# ---------------------------------------------------------------------------------------------
# Reading (one per dataset; files opened lazily in whichever process reads)
# ---------------------------------------------------------------------------------------------


class H5Reader:
    """Reads spans of packed entries. HDF5 handles do not survive ``fork``, so files are opened
    on first use in the reading process (a DataLoader worker) and reopened after a fork; the
    object pickles without them (``spawn`` workers).
    """

    def __init__(self, files: list[str]) -> None:
        self.files = list(files)
        self._handles: dict[int, h5py.File] = {}
        self._pid = -1
        self._checked: set[tuple[int, bytes]] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}, "_pid": -1, "_checked": set()}

    def _file(self, file_index: int) -> h5py.File:
        if self._pid != os.getpid():
            # Inherited handles belong to the parent's HDF5 library state: never use them.
            self._handles, self._pid, self._checked = {}, os.getpid(), set()
        handle = self._handles.get(file_index)
        if handle is None:
            path = self.files[file_index]
            try:
                # Read-only with no lock: file locking fails on some network file systems and
                # protects nothing for a reader.
                handle = h5py.File(path, "r", locking=False)
            except OSError as err:
                raise CorruptEntryError(f"{path}: cannot open HDF5 file ({err})") from None
            self._handles[file_index] = handle
        return handle

    def read(self, file_index: int, key: bytes, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` of entry ``key``; positions outside the entry read as zero.

        Shape:
            returns (stop - start,) float32
        """
        path = self.files[file_index]
        name = key.decode()
        out = np.zeros(stop - start, dtype=np.float32)
        ds: h5py.Dataset | None = None
        try:
            ds = self._file(file_index)[name]
            if (file_index, key) not in self._checked:
                if not ds.attrs.get(COMPLETE_ATTR, False) or ds.shape[0] != ds.attrs.get(
                    "num_samples", -1
                ):
                    raise CorruptEntryError(f"{path}: entry '{name}' is incomplete")
                self._checked.add((file_index, key))
            lo, hi = max(start, 0), min(stop, ds.shape[0])
            if hi > lo:
                ds.read_direct(out, np.s_[lo:hi], np.s_[lo - start : hi - start])
        except CorruptEntryError:
            raise
        except OSError as err:
            # HDF5 reports a Fletcher-32 mismatch only as a failed filter ("filter returned
            # failure during read"), and the checksum is the one filter a pack applies.
            if ds is not None and ds.fletcher32 and "filter" in str(err):
                raise CorruptEntryError(
                    f"{path}: entry '{name}': checksum mismatch, bytes changed after packing "
                    f"({err})"
                ) from None
            raise CorruptEntryError(f"{path}: cannot read entry '{name}' ({err})") from None
        except (KeyError, ValueError, RuntimeError) as err:
            raise CorruptEntryError(f"{path}: cannot read entry '{name}' ({err})") from None
        if not np.isfinite(out).all() or np.abs(out).max(initial=0.0) > MAX_ABS_SAMPLE:
            raise CorruptEntryError(f"{path}: entry '{name}' holds non-finite or garbage samples")
        return out

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = {}
