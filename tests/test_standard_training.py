"""The standard sets end to end, on tiny synthesised copies of their layouts
(tests/standard_set_copies.py): the fixed-mixture dataset, the config rules, a few train.py steps
and evaluate.py --standard with the published convention in its report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import evaluate
import train
from config import ConfigError, load_config, model_kwargs
from data.standard_dataset import StandardSetDataset, read_configured_set
from data.standard_sets import librimix_utterance, read_librimix
from models.registry import build_model
from tests.standard_set_copies import (
    LIST_FAKE_PREFIX,
    make_librimix,
    make_spex_lists,
    make_whamr,
    make_wsj0_2mix_extr,
)
from training.stopping import EXIT_NO_RESTART, Refused

REPO = Path(__file__).resolve().parents[1]
SR = 8_000
SECONDS = 1.0
AT_8K = {"sample_rate": SR, "n_fft": 256, "win_length_ms": 20.0, "hop_length_ms": 10.0}
# What the standard sets do not have: target-absent items, noisy references, dynamic mixing.
NO_DYNAMIC_MIXING = {
    "data": {"ta_prob": 0.0, "val_noisy_ref_prob": 0.0},
    "loss": {"ta_energy": 0.0},
    "train": {"noisy_ref_max_prob": 0.0},
}


@pytest.fixture(scope="module")
def libri(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, str]:
    """A Libri2Mix copy with train-100, dev and test splits, and the map path pattern."""
    tmp = tmp_path_factory.mktemp("libri")
    for split in ("train-100", "dev", "test"):
        root, map_path = make_librimix(tmp, shared_data, split=split)
    pattern = str(map_path).replace("/test/", "/{split}/")
    return root, pattern


def _sections(layout: str, tmp: Path, shared: Path, libri: tuple[Path, str]) -> tuple[dict, str]:
    """The standard section of a tiny copy of ``layout``, and its test split."""
    if layout == "librimix":
        root, pattern = libri
        return {"layout": "librimix", "root": str(root), "enrollment_map": pattern}, "test"
    if layout == "spex_lists":
        lists = make_spex_lists(tmp, shared)
        return {"layout": "spex_lists", "lists": str(lists.parent / "{split}"),
                "replace": {LIST_FAKE_PREFIX: str(tmp)}, "train_split": "tt",
                "val_split": "tt", "test_split": "tt"}, "tt"
    if layout == "wsj0_2mix_extr":
        return {"layout": "wsj0_2mix_extr", "root": str(make_wsj0_2mix_extr(tmp, shared)),
                "mode": "max", "train_split": "tt", "val_split": "tt", "test_split": "tt"}, "tt"
    root, lists = make_whamr(tmp, shared)
    return {"layout": "whamr", "root": str(root), "lists": str(lists.parent / "{split}"),
            "replace": {LIST_FAKE_PREFIX: str(tmp)}, "mix_type": "mix_both_reverb",
            "train_split": "tt", "val_split": "tt", "test_split": "tt"}, "tt"


def _config(path: Path, standard: dict, **train_keys: object) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["stft"] = dict(AT_8K)
    cfg["standard"] = standard
    for section, values in NO_DYNAMIC_MIXING.items():
        cfg.setdefault(section, {}).update(values)
    cfg["data"].update(segment_seconds=SECONDS, ref_seconds=SECONDS, num_workers=0,
                       samples_per_epoch=64)
    cfg["optim"] = {"grad_accum": 1, "warmup_steps": 1}
    cfg["train"].update(run_dir=str(path.parent / "run"), log_every=1, val_every=2,
                        ckpt_every=2, total_steps=2, n_val_pairs=2, **train_keys)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_items_crops_and_enrollments(libri: tuple[Path, str]) -> None:
    root, pattern = libri
    cfg = load_config(None, [f"standard.root={root}", "standard.layout=librimix",
                             f"standard.enrollment_map={pattern}", "stft.sample_rate=8000",
                             *(f"{k}={v}" for k, v in (("data.ta_prob", 0),
                                                        ("loss.ta_energy", 0),
                                                        ("train.noisy_ref_max_prob", 0),
                                                        ("data.val_noisy_ref_prob", 0)))])
    train_set = read_configured_set(cfg.standard, "train-100")
    assert all(item.enrollment is None for item in train_set.items)  # drawn while training
    test_set = read_configured_set(cfg.standard, "test")
    assert all(item.enrollment is not None for item in test_set.items)  # the map

    data = StandardSetDataset(train_set, train=True, length=32, seed=3, segment_seconds=0.5,
                              ref_seconds=0.75, sample_rate=SR)
    assert len(data) == 32
    assert data.speaker_names == sorted({i.speaker for i in train_set.items})
    for index in range(8):
        item = data[(index, 0.0, 0.0, 0.0, False, False)]  # as the step stream gives them
        assert item["mix"].shape == (4000,)
        assert item["target"].shape == (4000,)
        assert item["ref"].shape == (6000,)
        assert item["is_ta"] is False
        assert item["n_corrupt"] == 0
        assert data.speaker_names[item["speaker_class"]] == item["speaker"]
        assert item["target"].abs().sum() > 0
    again = StandardSetDataset(train_set, train=True, length=32, seed=3, segment_seconds=0.5,
                               ref_seconds=0.75, sample_rate=SR)
    torch.testing.assert_close(again[5]["mix"], data[5]["mix"])  # a function of the position

    # The drawn enrollment is another utterance of the target speaker, never the target file.
    rng = np.random.default_rng(0)
    for item in train_set.items:
        for _ in range(5):
            enrollment = data._enrollment(item, rng)
            assert librimix_utterance(enrollment) != librimix_utterance(item.target)
            assert enrollment in train_set.enrollment_pool[item.speaker]

    val = StandardSetDataset(test_set, train=False, length=999, seed=3, segment_seconds=0.5,
                             ref_seconds=0.5, sample_rate=SR)
    assert len(val) == len(test_set.items)  # at most the list, not the epoch length
    assert len(StandardSetDataset(test_set, train=False, length=2, seed=3,
                                  sample_rate=SR)) == 2  # data.n_val_samples
    first = val[0]
    mix, _ = sf.read(test_set.items[0].mix, dtype="float32")
    np.testing.assert_array_equal(first["mix"].numpy(), mix[:4000])  # the start, every time
    ref, _ = sf.read(test_set.items[0].enrollment, dtype="float32")
    np.testing.assert_array_equal(first["ref"].numpy()[: min(4000, len(ref))],
                                  ref[:4000])
    pair = val.swap_pair(0, noisy=False)
    assert pair["sources"].shape == (2, 4000)
    assert pair["refs"].shape == (2, 4000)
    assert pair["speakers"][0] != pair["speakers"][1]

    with pytest.raises(ValueError, match="at 8000 Hz, the run at 16000 Hz"):
        StandardSetDataset(test_set, train=False, length=1, seed=0, sample_rate=16_000)
    # Splits joined with "+" read as one (train-100+train-360), the training ones without map.
    cfg.standard.train_split = "train-100+dev"
    joined = read_configured_set(cfg.standard, "train-100+dev")
    dev = read_configured_set(replace(cfg.standard, train_split="train-100"), "dev")
    assert joined.items == train_set.items + [replace(i, enrollment=None) for i in dev.items]
    assert all(set(dev.enrollment_pool[k]) <= set(joined.enrollment_pool[k])
               for k in dev.enrollment_pool)
    # The LibriMix reader of the training split alone does not need a map (not published).
    assert len(read_librimix(root, split="train-100").items) == len(train_set.items)


def test_config_rules(libri: tuple[Path, str]) -> None:
    root, _ = libri
    base = ["standard.layout=librimix", f"standard.root={root}", "stft.sample_rate=8000",
            "loss.ta_energy=0", "train.noisy_ref_max_prob=0", "data.val_noisy_ref_prob=0"]
    # Evaluating any checkpoint on a set is allowed; training on one needs the TA and
    # dynamic-mixing terms off.
    cfg = load_config(None, base)  # the default data.ta_prob is 0.2
    with pytest.raises(ConfigError, match=r"data\.ta_prob.*no target-absent items"):
        train.check_config(cfg)
    train.check_config(load_config(None, [*base, "data.ta_prob=0"]))
    with pytest.raises(ConfigError, match=r"train\.twin_steps"):
        train.check_config(load_config(None, [*base, "data.ta_prob=0", "train.twin_steps=10"]))
    with pytest.raises(ConfigError, match=r"standard\.layout.*got 'libri'"):
        load_config(None, ["standard.layout=libri"])


def test_a_set_at_another_rate_is_refused(tmp_path: Path, libri: tuple[Path, str]) -> None:
    root, pattern = libri
    config = _config(tmp_path / "c.yaml", {"layout": "librimix", "root": str(root),
                                           "enrollment_map": pattern})
    with pytest.raises(Refused, match=r"at 8000 Hz, the run at 16000 Hz") as refused:
        train.main(["--config", str(config), "--set", "stft.sample_rate=16000"])
    assert refused.value.code == EXIT_NO_RESTART
    assert not (tmp_path / "run").exists()  # a refused run writes nothing


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["librimix", "spex_lists", "wsj0_2mix_extr", "whamr"])
def test_train_and_evaluate_on_a_copy(
    layout: str, tmp_path: Path, shared_data: Path, libri: tuple[Path, str]
) -> None:
    standard, test_split = _sections(layout, tmp_path, shared_data, libri)
    config = _config(tmp_path / "c.yaml", standard)
    train.main(["--config", str(config)])
    run = tmp_path / "run"
    log = (run / "train.log").read_text()
    assert "training finished" in log
    assert "select_acc=" in log  # the swap test ran on the set's own mixture pairs
    ckpt = run / "last.pt"

    out = tmp_path / "eval"
    # --standard alone scores standard.test_split.
    split = [test_split] if layout == "librimix" else []
    evaluate.main(["--ckpt", str(ckpt), "--standard", *split, "--out-dir", str(out),
                   "--metrics", "core"])
    summary = json.loads((out / "summary.json").read_text())
    expected = len(read_configured_set(load_config(config).standard, test_split).items)
    assert summary["n_samples"] == expected
    assert summary["n_tp"] == expected  # no target-absent items
    assert summary["settings"]["sample_rate"] == SR
    assert summary["settings"]["pesq"].startswith("narrow-band at 8 kHz")
    convention = summary["convention"]
    assert convention[0].startswith(read_configured_set(load_config(config).standard,
                                                        test_split).name)
    assert "zero-mean SI-SDR" in convention[0]
    assert any(line.startswith("not the published list") for line in convention)
    report = (out / "report.md").read_text()
    assert "In the published convention (standard set)" in report
    assert np.isfinite(summary["metrics"]["si_sdri"]["mean"])
    if layout == "librimix":  # no source named: the set's validation split, not a packed list
        evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "val"), "--metrics",
                       "core"])
        source = json.loads((tmp_path / "val" / "summary.json").read_text())["source"]
        assert source.startswith("Libri2Mix 8k min mix_both dev")


RECIPE_FAMILIES = ("hifi_tse", "td_speakerbeam", "td_speakerbeam_espnet", "spex_plus")
SET_RATES = {"libri2mix_16k": 16_000, "libri2mix_8k": SR, "wsj0_2mix_8k": SR,
             "wsj0_2mix_extr_8k": SR, "whamr_8k": SR}


@pytest.mark.parametrize("family", RECIPE_FAMILIES)
def test_every_recipe_row_builds_its_model_at_the_set_rate(family: str) -> None:
    """Each family config combined with each set config (doc/benchmarks.md, "Recipes at the
    standard rates") loads and builds its model at the set's rate, its windows in
    milliseconds turned into that rate's samples."""
    for name, rate in SET_RATES.items():
        cfg = load_config([REPO / "configs" / f"{family}.yaml",
                           REPO / "configs" / "sets" / f"{name}.yaml"])
        args = model_kwargs(cfg)
        assert args["sample_rate"] == rate
        if family == "hifi_tse":
            assert (args["win_length"], args["hop_length"]) == (rate // 50, rate // 100)
        elif family.startswith("td_speakerbeam"):
            assert (args["kernel"], args["stride"]) == (rate // 500, rate // 1000)
        else:
            assert [args[k] for k in ("short_window", "middle_window", "long_window",
                                      "stride")] == [rate // 400, rate // 100, rate // 50,
                                                     rate // 800]
        model = build_model(args)
        assert model.sample_rate == rate
        with torch.no_grad():
            assert model(torch.randn(1, rate // 2), torch.randn(1, rate // 2)).shape == (
                1, rate // 2)
