"""The dynamic-mixing dataset on packed real recordings: doc/design.md "Data pipeline" invariants
for many samples, reproducibility, DataLoader workers, and corrupt HDF5 entries."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from config import DataConfig
from data.dataset import HiFiTSEDataset, dataset_kwargs
from data.hdf5_store import COMPLETE_ATTR
from data.manifest import MANIFEST_NAMES, read_manifest
from tests.packed_data import items_around_corrupt, packed_subset

SEGMENT = 192_000  # 4 s at 48 kHz, the recipe's segment and reference length
N_SAMPLES = 50


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> DataConfig:
    return packed_subset(tmp_path_factory, shared_data)


@pytest.fixture(scope="module")
def speaker_of(packed: DataConfig) -> dict[str, str]:
    entries = read_manifest(Path(packed.manifest_dir) / MANIFEST_NAMES["speech"])
    return {e["key"]: e["speaker"] for e in entries}


def make(packed: DataConfig, split: str = "train", **overrides: object) -> HiFiTSEDataset:
    return HiFiTSEDataset(**{**dataset_kwargs(packed, split), **overrides})


@pytest.fixture(scope="module")
def samples(packed: DataConfig) -> list[dict]:
    ds = make(packed, return_components=True)
    ds.ta_prob, ds.noisy_ref_prob = 0.3, 0.5  # what the training loop sets in phase 2
    return [ds[i] for i in range(N_SAMPLES)]


def energy(x: torch.Tensor | np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(x * x))


@pytest.mark.slow
def test_mix_is_sum_of_components(samples: list[dict], packed: DataConfig) -> None:
    limited = 0
    for s in samples:
        total = s["comp_target"] + s["comp_interferers"].sum(0) + s["comp_noise"]
        torch.testing.assert_close(s["mix"], total, atol=1e-5, rtol=0)
        assert s["comp_interferers"].shape == (s["n_interferers"], SEGMENT)
        limited += bool(torch.isclose(s["mix"].abs().max(), torch.tensor(packed.peak_limit)))
    assert 0 < limited < len(samples)  # both peak-limited and untouched mixtures were checked


@pytest.mark.slow
def test_snr_matches_the_draw(samples: list[dict]) -> None:
    for s in samples:
        speech = s["comp_target"] + s["comp_interferers"].sum(0)
        snr = 10 * np.log10(energy(speech) / energy(s["comp_noise"]))
        assert abs(snr - s["snr_db"]) < 0.1
        assert -5.0 <= s["snr_db"] <= 15.0


def sirs_db(sample: dict) -> list[float]:
    """Target / each interferer, in dB, from the returned components."""
    return [10 * np.log10(energy(sample["comp_target"]) / energy(i))
            for i in sample["comp_interferers"]]


@pytest.mark.slow
def test_sirs_in_range(samples: list[dict], packed: DataConfig) -> None:
    low, high = packed.sir_db
    measured = [x for s in samples if not s["is_ta"] for x in sirs_db(s)]
    assert len(measured) > 20
    assert min(measured) >= low - 0.01
    assert max(measured) <= high + 0.01


def test_sir_boost_quiets_only_the_interferers(packed: DataConfig) -> None:
    ds = make(packed, return_components=True)
    for index in (3, 7):
        plain, boosted = ds[(index, 0.0, 0.0, 0.0)], ds[(index, 0.0, 0.0, 6.0)]
        # Same draws (speakers, utterances, SNR), only the interferers 6 dB lower.
        for key in ("target_utt", "interferer_utts", "rir_ids", "noise_id", "snr_db"):
            assert plain[key] == boosted[key]
        np.testing.assert_allclose(sirs_db(boosted), np.array(sirs_db(plain)) + 6.0, atol=1e-3)
    assert torch.equal(ds[(3, 0.0, 0.0)]["mix"], ds[(3, 0.0, 0.0, 0.0)]["mix"])
    # Target-absent samples have no target to boost: unchanged.
    ta_plain, ta_boosted = ds[(3, 1.0, 0.0, 0.0)], ds[(3, 1.0, 0.0, 6.0)]
    assert ta_plain["is_ta"]
    assert torch.equal(ta_plain["mix"], ta_boosted["mix"])


@pytest.mark.slow
def test_lengths_and_peaks(samples: list[dict], packed: DataConfig) -> None:
    for s in samples:
        for name in ("mix", "target", "ref"):
            assert s[name].shape == (SEGMENT,)
            assert s[name].dtype == torch.float32
            assert s[name].abs().max() <= packed.peak_limit + 1e-6
            assert torch.isfinite(s[name]).all()


@pytest.mark.slow
def test_speakers_and_reference(samples: list[dict], speaker_of: dict[str, str]) -> None:
    for s in samples:
        interferers = s["interferer_utts"].split("|")
        assert len(interferers) == s["n_interferers"]
        int_speakers = [speaker_of[u] for u in interferers]
        assert s["speaker"] not in int_speakers
        assert len(set(int_speakers)) == len(int_speakers)
        assert speaker_of[s["ref_utt"]] == s["speaker"]
        assert s["ref_utt"] != s["target_utt"]
        if not s["is_ta"]:
            assert speaker_of[s["target_utt"]] == s["speaker"]
        assert len(s["rir_ids"].split("|")) == s["n_interferers"] + (not s["is_ta"])


@pytest.mark.slow
def test_target_present_and_absent(samples: list[dict]) -> None:
    ta = [s for s in samples if s["is_ta"]]
    tp = [s for s in samples if not s["is_ta"]]
    assert ta
    assert tp
    assert any(s["ref_noisy"] for s in samples)
    assert not all(s["ref_noisy"] for s in samples)
    assert {s["n_interferers"] for s in samples} == {1, 2, 3}
    for s in ta:
        assert not s["target"].any()
        assert not s["comp_target"].any()
        assert s["target_utt"] == ""
        # Nothing but the interferers and the noise is in the mixture.
        rest = s["comp_interferers"].sum(0) + s["comp_noise"]
        torch.testing.assert_close(s["mix"], rest, atol=1e-5, rtol=0)
    for s in tp:
        # The default target is the reverberant target exactly as mixed in.
        torch.testing.assert_close(s["target"], s["comp_target"], atol=0, rtol=0)
        assert energy(s["target"]) > 0


def best_lag(x: torch.Tensor, y: torch.Tensor, max_lag: int = 200) -> int:
    """The shift of ``y`` (in samples) that best matches ``x``."""
    x64, y64 = x.double().numpy(), y.double().numpy()
    mid = slice(max_lag, len(x64) - max_lag)
    scores = [x64[mid] @ np.roll(y64, -k)[mid] for k in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag


def test_early_target_on_real_rirs(packed: DataConfig) -> None:
    reverberant, early = make(packed), make(packed, target_type="early")
    for i in range(4):
        rev, ear = reverberant[i], early[i]
        torch.testing.assert_close(rev["mix"], ear["mix"], atol=0, rtol=0)  # same draw
        assert abs(best_lag(rev["target"], ear["target"])) <= 1
        assert energy(ear["target"]) < energy(rev["target"])


def test_dry_and_early_targets_align_with_the_direct_path(
    packed: DataConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An RIR whose first 50 ms hold only a delayed, scaled, inverted direct path: then the early
    # target must equal the dry one exactly (same delay, same level), the reverberant one not.
    delay, tail_start = 30, 3_000  # samples; the tail starts 62.5 ms after the direct path
    h = np.zeros(SEGMENT // 4, dtype=np.float32)
    h[delay] = -0.5
    tail = np.random.default_rng(0).standard_normal(len(h) - tail_start).astype(np.float32)
    h[tail_start:] = 0.05 * tail * np.exp(-np.arange(len(tail)) / 4_000, dtype=np.float32)
    monkeypatch.setattr(HiFiTSEDataset, "_read_rir", lambda self, idx: (h.copy(), False))
    rev, ear, dry = (make(packed, target_type=t)[5] for t in ("reverberant", "early", "dry"))
    assert not rev["is_ta"]
    torch.testing.assert_close(ear["target"], dry["target"], atol=1e-6, rtol=0)
    assert energy(rev["target"] - dry["target"]) > 1e-3 * energy(dry["target"])
    # The reverberant target starts like the dry one: same first 62.5 ms after any onset.
    assert best_lag(rev["target"], dry["target"]) == 0


def test_same_seed_bit_identical_and_epochs_differ(packed: DataConfig) -> None:
    one, two = make(packed), make(packed)
    a, b = one[3], two[3]
    for name in ("mix", "ref", "target"):
        assert torch.equal(a[name], b[name])
    assert a["rir_ids"] == b["rir_ids"]
    two.set_epoch(1)
    assert not torch.equal(two[3]["mix"], a["mix"])
    assert not torch.equal(make(packed, seed=99)[3]["mix"], a["mix"])
    assert not torch.equal(make(packed, rank=1)[3]["mix"], a["mix"])
    # Per-sample probabilities (a sampler's (index, ta_prob, noisy_ref_prob)) give TA here.
    assert one[(3, 1.0, 0.0)]["is_ta"]


def test_validation_set_fixed_and_held_out(packed: DataConfig, speaker_of: dict[str, str]) -> None:
    val = make(packed, "val")
    assert len(val) == packed.n_val_samples
    val_speakers = {f"ravdess_Actor_{i:02d}" for i in (13, 14, 15, 16)}
    first = [val[i] for i in range(4)]
    val.set_epoch(5)  # epochs move the training stream only
    again = [val[i] for i in range(2)] + [make(packed, "val", rank=3)[i] for i in range(2, 4)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["mix"], b["mix"])
        assert torch.equal(a["ref"], b["ref"])
        used = {a["speaker"], speaker_of[a["ref_utt"]]}
        used |= {speaker_of[u] for u in a["interferer_utts"].split("|")}
        assert used <= val_speakers


@pytest.mark.slow
def test_workers_differ_and_see_the_training_loop_settings(packed: DataConfig) -> None:
    ds = make(packed)
    loader = DataLoader(ds, batch_size=1, num_workers=2, persistent_workers=True,
                        sampler=list(range(4)))
    first = list(loader)
    mixes = [b["mix"][0] for b in first]
    assert all(not torch.equal(mixes[i], mixes[j]) for i in range(4) for j in range(i))
    # Each worker built exactly the sample the main process builds for that index.
    torch.testing.assert_close(mixes[1], ds[1]["mix"], atol=0, rtol=0)
    assert not any(bool(b["is_ta"]) for b in first)
    ds.ta_prob = 1.0  # set in the main process while the workers keep running
    assert all(bool(b["is_ta"]) for b in loader)


def corrupt_copy(packed: DataConfig, dest: Path, speakers: set[str]) -> tuple[Path, set[str]]:
    """Copy the packed data, then damage every utterance of ``speakers``: NaN bytes in one,
    a missing "complete" mark in another, a deleted entry for the rest."""
    manifests = dest / "manifests"
    shutil.copytree(packed.manifest_dir, manifests)
    shutil.copytree(packed.hdf5_dir, dest / "hdf5")
    entries = read_manifest(manifests / MANIFEST_NAMES["speech"])
    bad = [e for e in entries if e["speaker"] in speakers and e["split"] == "train"]
    h5 = manifests / bad[0]["hdf5"]
    with h5py.File(h5, "a") as f:
        chunk = f[bad[0]["key"]].id.get_chunk_info(0)
        del f[bad[2]["key"]]
        f[bad[1]["key"]].attrs[COMPLETE_ATTR] = False
        for e in bad[3:]:
            del f[e["key"]]
    with open(h5, "r+b") as raw:  # NaN where the first second of audio was
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)
    return manifests, {e["key"] for e in bad}


def test_corrupt_entries_skipped_counted_and_logged(
    packed: DataConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifests, bad_keys = corrupt_copy(
        packed, tmp_path, {f"ravdess_Actor_{i:02d}" for i in range(1, 5)}
    )
    items = items_around_corrupt(packed, manifests, bad_keys, 12, caplog)
    assert "corrupt" in caplog.text
    for s in items:
        assert torch.isfinite(s["mix"]).all()
