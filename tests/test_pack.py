"""HDF5 packing on the real recordings: round trip, layout, resume after a kill, bad inputs,
bytes changed on disk after packing (checksums)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import soxr

from config import DataConfig, load_config
from data.hdf5_store import (
    CHUNK_SECONDS,
    COMPLETE_ATTR,
    CorruptEntryError,
    H5Reader,
    PackError,
    decode_entry,
    pack,
)
from data.manifest import MANIFEST_NAMES, read_manifest
from data.prepare_manifest import prepare
from data.scan import scan_speech
from tests.packed_data import (
    FILES_PER_ACTOR,
    items_around_corrupt,
    link_subset,
    packed_subset,
    write_config,
)

SR = 48_000
CHUNK_SAMPLES = CHUNK_SECONDS * SR
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> DataConfig:
    return packed_subset(tmp_path_factory, shared_data)


def reference_decode(path: str) -> np.ndarray:
    """What packing must store: soundfile, channel mean, soxr to 48 kHz."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    wave = data.mean(axis=1, dtype=np.float32)
    return wave if sr == SR else soxr.resample(wave, sr, SR)


def entries(cfg: DataConfig, kind: str) -> list[dict]:
    return read_manifest(Path(cfg.manifest_dir) / MANIFEST_NAMES[kind])


def h5_of(cfg: DataConfig, entry: dict) -> Path:
    return Path(cfg.manifest_dir) / entry["hdf5"]


@pytest.mark.parametrize("kind", ["speech", "noise", "rir"])
def test_round_trip_equals_soundfile_and_soxr(packed: DataConfig, kind: str) -> None:
    chosen = entries(packed, kind)
    if kind == "speech":
        chosen = chosen[:: len(chosen) // 6]  # a few utterances from different actors
    for e in chosen:
        with h5py.File(h5_of(packed, e), "r") as f:
            stored = f[e["key"]][:]
        expected = reference_decode(e["path"])
        assert stored.dtype == np.float32
        assert stored.shape == expected.shape == (e["num_samples"],)
        np.testing.assert_allclose(stored, expected, atol=1e-6, rtol=0)


def test_layout_attributes_and_manifests(packed: DataConfig) -> None:
    speech = entries(packed, "speech")
    assert len(speech) == 16 * FILES_PER_ACTOR
    assert len({e["key"] for e in speech}) == len(speech)
    val = sorted({e["speaker"] for e in speech if e["split"] == "val"})
    assert val == [f"ravdess_Actor_{i:02d}" for i in (13, 14, 15, 16)]
    with h5py.File(h5_of(packed, speech[0]), "r") as f:
        for e in speech:
            ds = f[e["key"]]
            assert ds.attrs[COMPLETE_ATTR]
            assert ds.attrs["speaker"] == e["speaker"]
            assert ds.attrs["source"] == "ravdess"
            assert ds.chunks == (min(CHUNK_SAMPLES, e["num_samples"]),)  # crops read ~1 s pieces
            assert ds.fletcher32
    # Noise at 16 kHz and 44.1 kHz RIRs were resampled: lengths follow the 48 kHz rate.
    for kind in ("noise", "rir"):
        for e in entries(packed, kind):
            assert e["sample_rate"] != SR
            assert abs(e["num_samples"] - e["duration"] * SR) <= 2
    report = json.loads((Path(packed.hdf5_dir) / "rir_report.json").read_text())
    assert (report["n_packed"], report["n_skipped"]) == (9, 0)


@pytest.mark.slow
def test_resume_after_kill(
    packed: DataConfig, tmp_path: Path, shared_data: Path
) -> None:
    data = link_subset(shared_data, tmp_path / "data")
    config = write_config(tmp_path, data, pack_workers=1)
    h5 = tmp_path / "hdf5" / "speech.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data.prepare_manifest", "--config", str(config), "--no-progress"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill once a few utterances (~0.6 MB each) are in the file: midway through speech.
        deadline = time.monotonic() + 60
        while (not h5.exists() or h5.stat().st_size < 8e6) and time.monotonic() < deadline:
            assert proc.poll() is None, "the pack finished before it could be killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "manifests" / "speaker_manifest.json").exists()

    reference = {e["key"]: e for e in entries(packed, "speech")}
    # A kill inside a flush leaves a file h5py cannot open until its end address is moved
    # (test_resume_after_a_kill_inside_a_flush): count what is done on a copy the pack repairs,
    # so that the real file reaches prepare() as the kill left it.
    probe = tmp_path / "probe.h5"
    shutil.copyfile(h5, probe)
    pack([], probe, min_seconds=0.5, workers=0, show_progress=False)
    with h5py.File(probe, "r") as f:
        done = [k for k in reference if k in f and f[k].attrs.get(COMPLETE_ATTR, False)]
    assert 0 < len(done) < len(reference)
    cfg = load_config(config).data
    summary = prepare(cfg, show_progress=False)
    assert summary["speech"]["resumed"] == len(done)
    assert summary["speech"]["new"] == len(reference) - len(done)

    resumed = entries(cfg, "speech")
    assert sorted(e["key"] for e in resumed) == sorted(reference)
    with h5py.File(h5, "r") as f, h5py.File(h5_of(packed, resumed[0]), "r", locking=False) as ref_f:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == sorted(reference)  # no duplicate, nothing extra
        for e in resumed:
            assert f[e["key"]].attrs[COMPLETE_ATTR]
            np.testing.assert_array_equal(f[e["key"]][:], ref_f[e["key"]][:])

    # A finished pack run again writes nothing new.
    again = prepare(cfg, show_progress=False)
    assert (again["speech"]["new"], again["speech"]["resumed"]) == (0, len(reference))


def test_resume_after_a_kill_inside_a_flush(shared_data: Path, tmp_path: Path) -> None:
    """A flush writes the new metadata before the superblock's end address; a kill between the
    two leaves a file h5py refuses ("addr overflow"). Here that state is made exactly: pack,
    then put back the end address of before. The resumed pack repairs it and loses nothing."""
    speech = few_entries(shared_data, 5)
    h5 = tmp_path / "speech.h5"
    pack(speech[:2], h5, min_seconds=0.5, workers=0, show_progress=False)
    with h5py.File(h5, "a") as f:  # a kill in the middle of a write: data, no "complete" mark
        f.create_dataset(speech[2]["key"], data=np.zeros(1000, dtype=np.float32))
    with open(h5, "rb") as raw:
        end_before = raw.read(48)[40:]
    first = pack(speech[:4], h5, min_seconds=0.5, workers=0, show_progress=False)
    assert (first.n_resumed, first.n_new, first.n_removed) == (2, 2, 1)
    with open(h5, "r+b") as raw:
        raw.seek(40)
        raw.write(end_before)
    with pytest.raises((OSError, RuntimeError)), h5py.File(h5, "r") as f:
        f.visit(lambda name: None)

    result = pack(speech, h5, min_seconds=0.5, workers=0, show_progress=False)
    assert (result.n_resumed, result.n_new, result.n_removed) == (4, 1, 0)
    reader = H5Reader([str(h5)])
    for e in speech:
        expected = reference_decode(e["path"])
        np.testing.assert_allclose(reader.read(0, e["key"].encode(), 0, len(expected)), expected,
                                   atol=1e-6, rtol=0)
    reader.close()


def test_a_file_that_cannot_be_resumed_is_one_clear_error(
    shared_data: Path, tmp_path: Path
) -> None:
    h5 = tmp_path / "speech.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))  # a signature and nothing usable
    with pytest.raises(PackError, match=f"{h5}: cannot resume the pack in this file .*move it "
                       "aside and pack again"):
        pack(few_entries(shared_data, 1), h5, min_seconds=0.5, workers=0, show_progress=False)
    assert h5.read_bytes() == b"\x89HDF\r\n\x1a\n" + bytes(200)


def test_bad_inputs_are_skipped_and_reported(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "speech"
    good = sorted((shared_data / "speech" / "ravdess" / "Actor_01").glob("*.flac"))[:2]
    for f in good:
        (root / "spk").mkdir(parents=True, exist_ok=True)
        (root / "spk" / f.name).symlink_to(f)
    bad = root / "spk"
    (bad / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    sf.write(bad / "empty.wav", np.zeros((0,), dtype=np.float32), SR)
    nan = np.full(SR, 0.1, dtype=np.float32)
    nan[100] = np.nan
    sf.write(bad / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(bad / "short.wav", np.full(SR // 10, 0.1, dtype=np.float32), SR)
    sf.write(bad / "silent.wav", np.zeros(SR, dtype=np.float32), SR)

    scanned = scan_speech([{"root": str(root), "name": "t"}])
    h5 = tmp_path / "speech.h5"
    result = pack(scanned.entries, h5, min_seconds=0.5, workers=2,
                  problems=scanned.problems, show_progress=False)
    assert sorted(result.num_samples) == sorted(f"t/spk/{f.stem}" for f in good)
    report = json.loads((tmp_path / "speech_report.json").read_text())
    reasons = {Path(s["path"]).name: s["error"] for s in report["skipped"]}
    assert set(reasons) == {"garbage.wav", "empty.wav", "nan.wav", "short.wav", "silent.wav"}
    assert "unreadable" in reasons["garbage.wav"]
    assert "empty" in reasons["empty.wav"]
    assert "non-finite" in reasons["nan.wav"]
    assert "too short" in reasons["short.wav"]
    assert "silent" in reasons["silent.wav"]
    assert all(str(root) in s["path"] for s in report["skipped"])
    with h5py.File(h5, "r") as f:
        assert sorted(f["t/spk"]) == sorted(f.stem for f in good)


# ---- bytes changed after packing -----------------------------------------------------------

DAMAGE = np.full(64, 0.01, dtype=np.float32)  # in range: passes the finite / magnitude checks


def few_entries(shared_data: Path, n: int) -> list[dict]:
    files = sorted((shared_data / "speech" / "ravdess" / "Actor_01").glob("*.flac"))[:n]
    return [{"key": f"t/{f.stem}", "path": str(f)} for f in files]


def pack_without_checksums(chosen: list[dict], h5: Path) -> None:
    """What ``pack`` wrote before checksums: the same chunks and attributes, no Fletcher-32."""
    with h5py.File(h5, "a") as f:
        for e in chosen:
            wave = decode_entry(e)
            ds = f.create_dataset(e["key"], data=wave, chunks=(min(len(wave), CHUNK_SAMPLES),))
            ds.attrs["path"] = e["path"]
            ds.attrs["num_samples"] = len(wave)
            ds.attrs[COMPLETE_ATTR] = True


def damage(h5: Path, key: str, all_chunks: bool = False) -> None:
    """Overwrite the first 64 samples of the entry's first (or every) stored chunk with
    ``DAMAGE``, through the plain file as a failing disk or a stray write would."""
    with h5py.File(h5, "r") as f:
        ds_id = f[key].id
        chunks = range(ds_id.get_num_chunks() if all_chunks else 1)
        offsets = [ds_id.get_chunk_info(i).byte_offset for i in chunks]
    with open(h5, "r+b") as raw:
        for offset in offsets:
            raw.seek(offset)
            raw.write(DAMAGE.tobytes())


def test_checksum_catches_in_range_overwrite(shared_data: Path, tmp_path: Path) -> None:
    speech = few_entries(shared_data, 3)
    h5 = tmp_path / "speech.h5"
    pack(speech, h5, min_seconds=0.5, workers=0, show_progress=False)
    bad, good = speech[0]["key"], speech[1]["key"]
    damage(h5, bad)

    reader = H5Reader([str(h5)])
    with pytest.raises(CorruptEntryError, match="checksum mismatch") as err:
        reader.read(0, bad.encode(), 0, 4 * SR)
    assert str(h5) in str(err.value)
    assert bad in str(err.value)
    # Only crops that touch the damaged 1 s chunk are refused, and other entries read.
    reader.read(0, bad.encode(), CHUNK_SAMPLES, 2 * CHUNK_SAMPLES)
    expected = reference_decode(speech[1]["path"])
    np.testing.assert_allclose(reader.read(0, good.encode(), 0, len(expected)), expected,
                               atol=1e-6, rtol=0)
    reader.close()


def test_without_checksums_the_same_overwrite_goes_unnoticed(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An old pack (no checksums) reads as before, and the same damage passes unnoticed: the
    checksum is what catches it."""
    speech = few_entries(shared_data, 2)
    h5 = tmp_path / "speech.h5"
    pack_without_checksums(speech, h5)
    key = speech[0]["key"]
    damage(h5, key)

    reader = H5Reader([str(h5)])
    with caplog.at_level(logging.WARNING):
        crop = reader.read(0, key.encode(), 0, 4 * SR)
        reader.read(0, speech[1]["key"].encode(), 0, 4 * SR)
    reader.close()
    np.testing.assert_array_equal(crop[: len(DAMAGE)], DAMAGE)
    assert not np.array_equal(reference_decode(speech[0]["path"])[: len(DAMAGE)], DAMAGE)
    assert not caplog.records


def test_resume_on_a_pack_without_checksums(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pack resumed on a file written before checksums keeps the old entries as they are
    and checksums the new ones; all of them read."""
    speech = few_entries(shared_data, 4)
    h5 = tmp_path / "speech.h5"
    pack_without_checksums(speech[:2], h5)
    with caplog.at_level(logging.INFO, logger="data.hdf5_store"):
        result = pack(speech, h5, min_seconds=0.5, workers=0, show_progress=False)
    assert (result.n_resumed, result.n_new, result.n_removed) == (2, 2, 0)
    assert "2 entries were packed without checksums" in caplog.text
    with h5py.File(h5, "r") as f:
        assert [f[e["key"]].fletcher32 for e in speech] == [False, False, True, True]

    reader = H5Reader([str(h5)])
    for e in speech:
        expected = reference_decode(e["path"])
        assert result.num_samples[e["key"]] == len(expected)
        np.testing.assert_allclose(reader.read(0, e["key"].encode(), 0, len(expected)), expected,
                                   atol=1e-6, rtol=0)
    reader.close()
    damage(h5, speech[3]["key"])
    reader = H5Reader([str(h5)])
    with pytest.raises(CorruptEntryError, match="checksum mismatch"):
        reader.read(0, speech[3]["key"].encode(), 0, SR)
    reader.read(0, speech[0]["key"].encode(), 0, SR)
    reader.close()


def test_dataset_skips_and_counts_entries_that_fail_their_checksum(
    packed: DataConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(packed.manifest_dir, tmp_path / "manifests")
    shutil.copytree(packed.hdf5_dir, tmp_path / "hdf5")
    manifests = tmp_path / "manifests"
    speakers = {f"ravdess_Actor_{i:02d}" for i in range(1, 5)}
    bad = [e for e in entries(packed, "speech") if e["speaker"] in speakers]
    for e in bad:
        damage(manifests / e["hdf5"], e["key"], all_chunks=True)
    bad_keys = {e["key"] for e in bad}

    items_around_corrupt(packed, manifests, bad_keys, 8, caplog)
    assert "checksum mismatch" in caplog.text
