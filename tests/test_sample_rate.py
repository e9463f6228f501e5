"""One sample-rate key (stft.sample_rate) through the pipeline: every existing config builds what
it built before at 48 kHz, milliseconds resolve to samples at the run's rate, packing and
dynamic mixing follow the rate and refuse a pack of another, and at 8 kHz train.py runs,
evaluate.py scores in the narrow-band conventions and inference.py resamples with a notice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import yaml

import evaluate
from config import ConfigError, load_config, model_kwargs
from data.dataset import HiFiTSEDataset, dataset_kwargs
from data.hdf5_store import PackError
from data.manifest import MANIFEST_NAMES, ManifestError, read_manifest
from data.prepare_manifest import prepare
from evaluation.metrics import MetricSettings
from losses.pesq_target import pesq_rate
from tests.packed_data import link_subset, packed_subset, write_config

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "configs_at_48k.json"
SR = 48_000
# HiFi-TSE at 8 kHz for the end-to-end test: the 20 ms / 10 ms frames of the 48 kHz default.
AT_8K = ["stft.sample_rate=8000", "stft.win_length_ms=20", "stft.hop_length_ms=10",
         "stft.n_fft=256"]


def _built(cfg_path: Path) -> dict:
    """model_kwargs and the dataset arguments of a config, as JSON values. A two-stage config's
    first stage is left out: its arguments come from a trained run's file, not the config."""
    cfg = load_config(cfg_path)
    if getattr(cfg.model, "first_stage_ckpt", ""):
        cfg.model.first_stage_ckpt = ""
    return json.loads(json.dumps({
        "model_args": model_kwargs(cfg),
        "dataset_train": dataset_kwargs(cfg.data, "train", sample_rate=cfg.stft.sample_rate),
        "dataset_val": dataset_kwargs(cfg.data, "val", sample_rate=cfg.stft.sample_rate),
    }, default=str))


def test_every_shipped_config_builds_what_it_built_before_the_rate_key() -> None:
    """tests/fixtures/configs_at_48k.json holds model_kwargs and the dataset arguments of every
    config as the commit before the sample-rate key computed them (d9d4b68). Regenerate it only
    for an intended change of a config."""
    before = json.loads(FIXTURE.read_text())
    configs = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert set(before) <= set(configs), "a config of before the rate key was removed"
    for name in sorted(before):  # configs added since are not "existing" ones
        now = _built(REPO / "configs" / name)
        assert now["model_args"] == before[name]["model_args"], name
        for split in ("train", "val"):
            kwargs = now[f"dataset_{split}"]
            assert kwargs.pop("sample_rate") == SR, name
            assert kwargs == before[name][f"dataset_{split}"], name


def test_milliseconds_become_samples_at_the_run_rate() -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["stft.sample_rate=16000", "stft.win_length_ms=20", "stft.hop_length_ms=10",
                       "stft.n_fft=512"])
    args = model_kwargs(cfg)
    assert (args["sample_rate"], args["win_length"], args["hop_length"]) == (16_000, 320, 160)
    assert not any(k.endswith("_ms") for k in args)  # checkpoints store samples only

    td = model_kwargs(load_config(REPO / "configs" / "td_speakerbeam_tiny.yaml",
                                  ["stft.sample_rate=8000", "model.kernel_ms=2",
                                   "model.stride_ms=1"]))
    assert (td["kernel"], td["stride"]) == (16, 8)  # Conv-TasNet's L = 16 at 8 kHz
    spex = model_kwargs(load_config(
        REPO / "configs" / "spex_plus_tiny.yaml",
        ["stft.sample_rate=8000", "model.short_window_ms=2.5", "model.middle_window_ms=10",
         "model.long_window_ms=20", "model.stride_ms=1.25"]))
    assert [spex[k] for k in ("short_window", "middle_window", "long_window", "stride")] == [
        20, 80, 160, 10]  # SpEx+ at its 8 kHz
    assert not any(k.endswith("_ms") for k in spex)
    # Of a count and its alternative the one set last wins, in files and overrides alike.
    assert load_config(REPO / "configs" / "td_speakerbeam.yaml",
                       ["model.kernel=32", "model.stride=16"]).model.kernel == 32
    assert load_config(REPO / "configs" / "td_speakerbeam.yaml",
                       ["model.kernel=32", "model.kernel_ms=4"]).model.kernel == 192
    # The rate can come after the milliseconds: they resolve against the final rate.
    late = load_config(REPO / "configs" / "tiny.yaml",
                       ["stft.win_length_ms=20", "stft.sample_rate=8000"])
    assert late.stft.win_length == 160
    with pytest.raises(ConfigError, match=r"stft\.hop_length_ms.*less than one sample at 8000 Hz"):
        load_config(REPO / "configs" / "tiny.yaml", ["stft.sample_rate=8000",
                                                     "stft.hop_length_ms=0.01"])


def test_rate_rules_of_the_metrics() -> None:
    assert [pesq_rate(r) for r in (8_000, 16_000, 48_000)] == [8_000, 16_000, 16_000]
    assert pesq_rate(48_000, 8_000) == 8_000  # eval.pesq_sr still chooses above 16 kHz
    groups = ("core", "similarity", "dnsmos", "visqol")
    at_8k = MetricSettings(groups=groups, sample_rate=8_000)
    assert set(at_8k.not_applicable()) == {"lsd", "similarity", "dnsmos", "visqol"}
    assert not {"lsd_hb", "spk_sim_ref", "dnsmos_ovrl", "visqol"} & set(at_8k.columns())
    at_16k = MetricSettings(groups=groups, sample_rate=16_000)
    assert set(at_16k.not_applicable()) == {"lsd", "visqol"}
    assert "spk_sim_ref" in at_16k.columns()
    assert "lsd_hb" not in at_16k.columns()
    assert MetricSettings(groups=groups).not_applicable() == {}


@pytest.fixture(scope="module")
def packed_16k(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("packed16k")
    config = write_config(root, link_subset(shared_data, root / "data"))
    prepare(load_config(config).data, show_progress=False, sample_rate=16_000)
    return config


def test_packing_and_mixing_follow_the_rate(
    packed_16k: Path, tmp_path_factory: pytest.TempPathFactory, shared_data: Path
) -> None:
    d16 = load_config(packed_16k).data
    d48 = packed_subset(tmp_path_factory, shared_data)
    manifests16, manifests48 = Path(d16.manifest_dir), Path(d48.manifest_dir)
    with h5py.File(Path(d16.hdf5_dir) / "speech.h5", "r") as f:
        assert f.attrs["sample_rate"] == 16_000
    assert json.loads((Path(d16.hdf5_dir) / "speech_report.json").read_text())[
        "sample_rate"] == 16_000
    n16 = {e["key"]: e["num_samples"]
           for e in read_manifest(manifests16 / MANIFEST_NAMES["speech"], 16_000)}
    n48 = {e["key"]: e["num_samples"]
           for e in read_manifest(manifests48 / MANIFEST_NAMES["speech"], SR)}
    assert n16.keys() == n48.keys()
    assert all(abs(n16[k] - n48[k] / 3) <= 1 for k in n16)  # the same seconds

    data = {**dataset_kwargs(d16, "val", sample_rate=16_000), "length": 4,
            "return_components": True}
    item = HiFiTSEDataset(**data)[0]
    assert item["mix"].shape == (round(d16.segment_seconds * 16_000),)
    assert item["ref"].shape == (round(d16.ref_seconds * 16_000),)

    with pytest.raises(ManifestError, match="packed at 16000 Hz, the run is at 48000 Hz"):
        HiFiTSEDataset(**{**data, "sample_rate": SR})
    with pytest.raises(PackError, match=r"speech\.h5: packed at 16000 Hz, this pack is at 48000"):
        prepare(d16, show_progress=False, sample_rate=SR)


@pytest.mark.slow
def test_train_evaluate_and_infer_at_8k(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "packed8k"
    data_yaml = write_config(root, link_subset(shared_data, root / "data"), segment_seconds=1.0,
                             ref_seconds=1.0, n_val_samples=4, num_workers=0, ta_prob=0.0)
    cfg = yaml.safe_load(data_yaml.read_text())
    cfg.update(yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text()))
    cfg["train"].update(run_dir=str(tmp_path / "run"), total_steps=4, log_every=1, val_every=4,
                        ckpt_every=4, n_val_pairs=0)
    cfg["optim"] = {"grad_accum": 1, "warmup_steps": 1}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "data.prepare_manifest", "--config", str(config),
                    "--no-progress", *(a for s in AT_8K for a in ("--set", s))],
                   cwd=REPO, check=True, capture_output=True)
    manifest = json.loads((root / "manifests" / MANIFEST_NAMES["speech"]).read_text())
    assert manifest["sample_rate"] == 8_000

    subprocess.run([sys.executable, "train.py", "--config", str(config),
                    *(a for s in AT_8K for a in ("--set", s))],
                   cwd=REPO, check=True, capture_output=True)
    ckpt = tmp_path / "run" / "last.pt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["model_args"]["sample_rate"] == 8_000
    assert stored["model_args"]["win_length"] == 160

    # Triplets at 48 kHz and 16 kHz, scored at the model's 8 kHz.
    files = sorted((shared_data / "speech" / "ravdess" / "Actor_01").glob("*.flac"))
    other = sorted((shared_data / "speech" / "ravdess" / "Actor_02").glob("*.flac"))
    target, _ = sf.read(files[0], dtype="float32")
    interferer, _ = sf.read(other[0], dtype="float32")
    ref, _ = sf.read(files[3], dtype="float32")
    n = min(len(target), len(interferer))
    mix = target[:n] + 0.5 * interferer[:n]
    triplets = tmp_path / "triplets"
    triplets.mkdir()
    for name, wave, sr in [("a-mixed", mix, SR), ("a-ref", ref, SR), ("a-target", target[:n], SR),
                           ("b-mixed", mix, 16_000), ("b-ref", ref, 16_000),
                           ("b-target", target[:n], 16_000)]:
        sf.write(triplets / f"{name}.wav", wave if sr == SR else soxr.resample(wave, SR, sr), sr)
    out = tmp_path / "eval"
    evaluate.main(["--ckpt", str(ckpt), "--triplets", str(triplets), "--out-dir", str(out),
                   "--metrics", "core,similarity"])
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["settings"]
    assert settings["sample_rate"] == 8_000
    assert settings["pesq"].startswith("narrow-band at 8 kHz")
    assert set(settings["not_applicable"]) == {"lsd", "similarity"}
    header = (out / "per_sample.csv").read_text().splitlines()[0].split(",")
    assert {"pesq", "si_sdri"} <= set(header)
    assert not {"lsd_hb", "spk_sim_ref"} & set(header)
    assert np.isfinite(summary["metrics"]["pesq"]["mean"])
    assert "sample rate: 8 kHz" in (out / "report.md").read_text()

    # A validation list mixed at another rate than the model's is refused in one line.
    with pytest.raises(SystemExit, match="1"):
        evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "v48"), "--set",
                       "stft.sample_rate=48000"])
    assert "the checkpoint's model runs at 8000 Hz" in capsys.readouterr().err

    # inference.py: a 48 kHz file through the 8 kHz model, announced once, written at 8 kHz.
    result = subprocess.run(
        [sys.executable, "inference.py", "--ckpt", str(ckpt), "--mix",
         str(triplets / "a-mixed.wav"), "--ref", str(triplets / "a-ref.wav"), "-o",
         str(tmp_path / "out.wav")], cwd=REPO, check=True, capture_output=True, text=True)
    assert result.stderr.count("resampled to the model's 8000 Hz") == 1, result.stderr
    info = sf.info(tmp_path / "out.wav")
    assert info.samplerate == 8_000
    assert info.frames == round(n * 8_000 / SR)
