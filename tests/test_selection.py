"""The swap test (evaluation/selection.py) and the dataset pieces it and the learning ladder
need: swap pairs, the reverberation / noise probabilities and the fixed speaker pair."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from config import DataConfig
from data.dataset import SWAP_SNR_DB, HiFiTSEDataset, active_rms, dataset_kwargs
from evaluation.metrics import REF_SENS_FLOOR_DB, reference_sensitivity
from evaluation.selection import (
    pair_kind,
    run_pairs,
    speaker_group,
    summarize,
    summarize_by_group,
    swap_scores,
)
from tests.packed_data import packed_subset

N_PAIRS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> DataConfig:
    cfg = packed_subset(tmp_path_factory, shared_data)
    cfg.segment_seconds = 1.0
    cfg.ref_seconds = 1.0
    return cfg


def _dataset(data: DataConfig, split: str = "val", **changes: object) -> HiFiTSEDataset:
    return HiFiTSEDataset(**{**dataset_kwargs(data, split), "length": 8,
                             "return_components": True, **changes})


@pytest.fixture(scope="module")
def pairs(data: DataConfig) -> dict[bool, list[dict]]:
    dataset = _dataset(data)
    return {noisy: [dataset.swap_pair(i, noisy=noisy) for i in range(N_PAIRS)]
            for noisy in (False, True)}


def test_swap_pairs(data: DataConfig, pairs: dict[bool, list[dict]]) -> None:
    again = _dataset(data).swap_pair(3, noisy=True)
    np.testing.assert_array_equal(again["mix"], pairs[True][3]["mix"])
    for noisy, items in pairs.items():
        for item in items:
            a, b = item["speakers"]
            assert a != b
            assert item["sources"].shape == (2, len(item["mix"]))
            assert item["refs"].shape == (2, round(data.ref_seconds * 48_000))
            # 0 dB SIR over active speech (before any peak limiting, which scales both).
            level_a, level_b = (active_rms(s) for s in item["sources"])
            assert 20 * math.log10(level_a / level_b) == pytest.approx(0.0, abs=1e-3)
            residual = item["mix"] - item["sources"].sum(axis=0)
            if noisy:
                snr = 10 * math.log10(np.sum(item["sources"].sum(axis=0) ** 2.0)
                                      / np.sum(residual**2.0))
                assert snr == pytest.approx(SWAP_SNR_DB, abs=0.01)
            else:
                assert np.abs(residual).max() < 1e-6
            for ref, source in zip(item["refs"], item["sources"], strict=True):
                assert not np.allclose(ref[:1000], source[:1000])  # another utterance


def test_reference_blind_model_selects_at_chance_and_oracle_always(
    pairs: dict[bool, list[dict]],
) -> None:
    """Dry: a model that ignores its reference is right on exactly one run of each pair."""
    def blind(mix: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return 0.7 * mix + 0.2 * torch.tanh(20 * mix)  # any function of the mixture alone

    dry = pairs[False]
    scores = run_pairs(blind, dry, batch_pairs=4)
    np.testing.assert_array_equal(scores["correct"].sum(axis=1), np.ones(N_PAIRS))
    summary = summarize(scores)
    assert summary["select_acc"] == 0.5
    assert summary["ref_sens_db"] == REF_SENS_FLOOR_DB
    identity = summarize(run_pairs(lambda mix, ref: mix, dry))
    assert identity["si_sdri"] == pytest.approx(0.0, abs=1e-9)
    assert identity["select_acc"] == 0.5

    sources = torch.from_numpy(np.stack([p["sources"] for p in dry]))  # (P, 2, N)
    calls = iter(range(0, N_PAIRS, 4))

    def oracle(mix: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        start = next(calls)  # run_pairs' batches in order; in each, all A runs then all B runs
        return sources[start : start + len(mix) // 2].transpose(0, 1).flatten(0, 1)

    best = summarize(run_pairs(oracle, dry, batch_pairs=4))
    assert best["select_acc"] == 1.0
    assert best["si_sdri"] > 10.0
    assert best["ref_sens_db"] > 0.0
    lo, hi = best["si_sdri_ci"]
    assert lo <= best["si_sdri"] <= hi


def test_reference_sensitivity_of_files() -> None:
    """evaluate.py's per-sample measure is the swap test's, in NumPy blocks."""
    a = np.random.default_rng(0).standard_normal(3 * 48_000).astype(np.float32)
    assert reference_sensitivity(a, a.copy()) == REF_SENS_FLOOR_DB
    assert reference_sensitivity(a, np.zeros_like(a)) == pytest.approx(10 * math.log10(2))
    assert reference_sensitivity(a, -a) == pytest.approx(10 * math.log10(4))
    b = np.random.default_rng(1).standard_normal(len(a)).astype(np.float32)
    batched = swap_scores(torch.from_numpy(np.stack([a, b]))[None],
                          torch.from_numpy(np.stack([a, b]))[None], torch.from_numpy(a + b)[None])
    assert float(batched["ref_sens_db"][0]) == pytest.approx(reference_sensitivity(a, b), abs=1e-6)


def test_groups_and_intervals() -> None:
    assert speaker_group("ravdesstest_Actor_13") == "male"
    assert speaker_group("demotest_test002", {"test002": 250.0}) == "high"
    assert speaker_group("Actor_16") == "female"
    assert speaker_group("test002", {"test002": 120.0}) == "low"
    assert speaker_group("test002") is None
    assert pair_kind(["Actor_01", "Actor_03"]) == "same"
    assert pair_kind(["Actor_01", "Actor_02"]) == "cross"
    rng = np.random.default_rng(0)
    scores = {"correct": rng.integers(0, 2, (40, 2)).astype(float),
              "si_sdri": rng.normal(size=(40, 2)), "ref_sens_db": rng.normal(size=40)}
    out = summarize_by_group(scores, ["same"] * 10 + ["cross"] * 25 + [None] * 5)
    assert (out["all"]["n_pairs"], out["same"]["n_pairs"], out["cross"]["n_pairs"]) == (40, 10, 25)
    lo, hi = out["all"]["select_acc_ci"]
    assert lo < out["all"]["select_acc"] < hi
    # A smaller set has a wider interval.
    assert np.diff(out["same"]["select_acc_ci"]) > np.diff(out["all"]["select_acc_ci"])


# Sums of mix, target and ref and the sum of |mix| of items 0-3 (``_checksum``).
GOLDEN_VAL = [(52.397811, 0.0, -1.198042, 5936.816765), (2.479728, 1.324707, 0.91631, 1495.518747),
              (-17.366882, 0.0, 17.635198, 4412.335826),
              (-28.245026, 0.044168, -26.893725, 4384.162253)]
GOLDEN_TRAIN = [(39.839544, 0.0, 0.204949, 5080.389753),
                (10.075028, 3.318247, 0.030136, 7305.410108),
                (-4.113284, -3.814389, -4.58405, 5808.542443),
                (47.711949, -0.670046, 0.526979, 2756.180783)]


def _checksum(item: dict) -> tuple[float, ...]:
    return (*(float(item[k].double().sum()) for k in ("mix", "target", "ref")),
            float(item["mix"].double().abs().sum()))


def test_ladder_keys(data: DataConfig) -> None:
    """Dry and noise-free samples are exactly target + interferers; a fixed pair always mixes
    the same two training speakers, in validation too; the defaults draw what they drew."""
    # Checksums of the first items made by data/dataset.py before these keys existed (commit
    # 60b450a, the same packed subset, 1 s crops): the defaults draw and mix exactly as before.
    val, train = _dataset(data), _dataset(data, "train")
    for i, expected in enumerate(GOLDEN_VAL):
        assert _checksum(val[i]) == pytest.approx(expected, rel=1e-5, abs=1e-4), i
    for i, expected in enumerate(GOLDEN_TRAIN):  # phase 2 with the SIR boost: every draw used
        assert _checksum(train[(i, 0.3, 0.5, 2.0)]) == pytest.approx(expected, rel=1e-5,
                                                                      abs=1e-4), i
    dry = _dataset(data, reverb_prob=0.0, noise_prob=0.0, ta_prob=0.0)
    for i in range(4):
        item = dry[i]
        parts = item["comp_target"] + item["comp_interferers"].sum(0)
        torch.testing.assert_close(item["mix"], parts, atol=1e-6, rtol=0)
        assert torch.count_nonzero(item["comp_noise"]) == 0
        torch.testing.assert_close(item["target"], item["comp_target"], atol=1e-7, rtol=0)
    train = _dataset(data, "train")
    names = sorted(set(train.speech.speaker_names))
    pair = [names[0], names[5]]
    for split in ("train", "val"):
        fixed = _dataset(data, split, speaker_pair=pair, ta_prob=0.0)
        for i in range(4):
            item = fixed[i]
            assert item["speaker"] == pair[0]
            assert item["n_interferers"] == 1
            assert item["interferer_utts"].split("/")[0] in pair[1] or pair[1] in item[
                "interferer_utts"]
    with pytest.raises(ValueError, match="speaker_pair"):
        _dataset(data, speaker_pair=[names[0]])


def test_selection_curriculum_items(data: DataConfig) -> None:
    """The selection curriculum's items (train.selection_steps): the target and one interferer
    at 0 dB SIR, dry and noise-free, whatever the SIR boost; the same item
    without the flag is what it always was."""
    train = _dataset(data, "train", max_interferers=2, min_interferers=2)
    for i in range(4):
        item = train[(i, 0.0, 0.0, 6.0, 1.0)]
        assert item["n_interferers"] == 1
        assert torch.count_nonzero(item["comp_noise"]) == 0
        interferer = item["comp_interferers"][0]
        torch.testing.assert_close(item["mix"], item["comp_target"] + interferer, atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(item["target"], item["comp_target"], atol=1e-7, rtol=0)
        # The mixing sets levels by the RMS of the window (active speech is the swap test's).
        sir = 10 * math.log10(float(item["comp_target"].double().square().mean()
                                    / interferer.double().square().mean()))
        assert abs(sir) < 1e-3
        assert train[(i, 0.0, 0.0, 6.0, 0.0)]["n_interferers"] == 2
        assert _checksum(train[(i, 0.3, 0.5, 2.0, 0.0)]) == pytest.approx(
            _checksum(train[(i, 0.3, 0.5, 2.0)]), rel=1e-6)


def test_swap_pairs_with_several_references(data: DataConfig,
                                            pairs: dict[bool, list[dict]]) -> None:
    """``n_refs`` > 1 keeps the pair and its first reference and adds other utterances."""
    dataset = _dataset(data)
    for i in range(3):
        multi = dataset.swap_pair(i, noisy=False, n_refs=3)
        one = pairs[False][i]
        assert multi["refs"].shape == (2, 3, one["refs"].shape[-1])
        np.testing.assert_array_equal(multi["mix"], one["mix"])
        np.testing.assert_array_equal(multi["refs"][:, 0], one["refs"])
        assert not np.allclose(multi["refs"][:, 1], multi["refs"][:, 0])


def test_virtual_speakers(data: DataConfig) -> None:
    """data.virtual_speakers: every training speaker once more per factor, its speech played
    that much faster (so shorter, higher), a class of its own; validation keeps real voices."""
    real = _dataset(data, "train")
    virtual = _dataset(data, "train", virtual_speakers=[0.8])
    n = len(real.speaker_names)
    assert virtual.speaker_names[n:] == [f"{s}@x0.8" for s in real.speaker_names]
    assert len(_dataset(data, "val", virtual_speakers=[0.8]).speaker_names) == len(
        _dataset(data, "val").speaker_names)
    items = [virtual[(i, 0.0, 0.0)] for i in range(12)]
    shifted = [it for it in items if it["speaker"].endswith("@x0.8")]
    assert shifted, "about half of the draws should be virtual speakers"
    assert all(it["speaker_class"] >= n for it in shifted)
    assert all(0.8 * 0.9 - 1e-6 <= it["speed"] <= 0.8 * 1.1 + 1e-6 for it in shifted)
    with pytest.raises(ValueError, match="virtual_speakers"):
        _dataset(data, "train", virtual_speakers=[1.0])


@pytest.mark.parametrize("selection", [1.0, 0.0])
def test_twins(data: DataConfig, selection: float) -> None:
    """Twins (train.twin_steps): the odd item is its even neighbour's mixture with its first
    interferer as the target, with that voice's own reference and identity; in the selection
    curriculum's mixtures (dry, 0 dB) and in the full ones (reverberant, noisy, the target as
    target_type makes it)."""
    train = _dataset(data, "train", max_interferers=2)
    for i in (0, 2, 4):
        first, second = (train[(j, 0.0, 0.0, 0.0, selection, 1.0)] for j in (i, i + 1))
        assert (first["index"], second["index"]) == (i, i + 1)
        torch.testing.assert_close(first["mix"], second["mix"], atol=0, rtol=0)
        torch.testing.assert_close(second["comp_target"], first["comp_interferers"][0],
                                   atol=0, rtol=0)
        torch.testing.assert_close(first["comp_target"], second["comp_interferers"][0],
                                   atol=0, rtol=0)
        torch.testing.assert_close(first["comp_interferers"][1:],
                                   second["comp_interferers"][1:], atol=0, rtol=0)
        if selection or train.target_type == "reverberant":  # the target is the voice as heard
            torch.testing.assert_close(second["target"], second["comp_target"], atol=0, rtol=0)
        assert first["speaker"] != second["speaker"]
        assert second["interferer_utts"].split("|")[0] == first["target_utt"]
        assert second["ref_utt"] != second["target_utt"]
        # Keys are "<source>/<speaker folder>/<utterance>": another utterance of the same voice.
        assert second["ref_utt"].rsplit("/", 1)[0] == second["target_utt"].rsplit("/", 1)[0]
        assert not torch.equal(first["ref"], second["ref"])

    # A target-absent neighbour has no twin: the odd item is drawn on its own.
    for i in (0, 2):
        first, second = (train[(j, 1.0, 0.0, 0.0, selection, 1.0)] for j in (i, i + 1))
        assert first["is_ta"]
        assert not torch.equal(first["mix"], second["mix"])
