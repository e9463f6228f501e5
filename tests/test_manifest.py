"""Scanning: speaker-id rules of every layout, noise / RIR layouts, the validation split, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from config import ConfigError, load_config
from data.manifest import read_manifest
from data.prepare_manifest import main
from data.scan import assign_splits, n_validation, scan_noise, scan_rir, scan_speech

SR = 48_000
SHORT = 480  # 10 ms of audio: headers are all the scanners look at


def fake(path: Path, channels: int = 1, frames: int = SHORT, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros((frames, channels), dtype=np.float32), sr)
    return path


def speakers(entries: list[dict]) -> dict[str, str]:
    return {Path(e["path"]).name: e["speaker"] for e in entries}


def test_dns4_speaker_from_file_name(tmp_path: Path) -> None:
    root = tmp_path / "clean_fullband" / "read_speech"
    fake(root / "book_11284_chp_0013_reader_05262_9_seg_1.wav")
    fake(root / "book_00001_chp_0002_reader_00017_3_seg_0.wav")
    result = scan_speech([{"layout": "dns4", "root": str(root)}])
    assert speakers(result.entries) == {
        "book_11284_chp_0013_reader_05262_9_seg_1.wav": "dns4_reader_05262",
        "book_00001_chp_0002_reader_00017_3_seg_0.wav": "dns4_reader_00017",
    }
    assert {e["source"] for e in result.entries} == {"dns4"}
    assert result.entries[0]["key"].startswith("dns4/")


def test_ears_speaker_from_folder(tmp_path: Path) -> None:
    root = tmp_path / "ears_dataset"
    fake(root / "p001" / "emo_adoration_freeform.wav")
    fake(root / "p102" / "rainbow_01_regular.wav")
    result = scan_speech([{"layout": "ears", "root": str(root)}])
    assert sorted(e["speaker"] for e in result.entries) == ["ears_p001", "ears_p102"]


def test_vctk_speaker_and_mic(tmp_path: Path) -> None:
    root = tmp_path / "wav48_silence_trimmed"
    for mic in ("mic1", "mic2"):
        fake(root / "p225" / f"p225_001_{mic}.flac")
        fake(root / "s5" / f"s5_001_{mic}.flac")
    default = scan_speech([{"layout": "vctk", "root": str(root)}])
    assert speakers(default.entries) == {
        "p225_001_mic1.flac": "vctk_p225",
        "s5_001_mic1.flac": "vctk_s5",
    }
    mic2 = scan_speech([{"layout": "vctk", "root": str(root), "mic": "mic2"}])
    assert sorted(speakers(mic2.entries)) == ["p225_001_mic2.flac", "s5_001_mic2.flac"]


def test_generic_prefix_and_regex_override(tmp_path: Path) -> None:
    root = tmp_path / "ravdess"
    fake(root / "Actor_01" / "03-01-01-01-01-01-01.wav")
    fake(root / "Actor_02" / "deeper" / "03-01-01-01-01-01-02.flac")
    fake(root / "loose_file.wav")  # no speaker folder: reported, not guessed
    result = scan_speech([{"layout": "generic", "root": str(root)}])
    assert sorted(e["speaker"] for e in result.entries) == ["ravdess_Actor_01", "ravdess_Actor_02"]
    assert [Path(p["path"]).name for p in result.problems] == ["loose_file.wav"]

    prefixed = scan_speech([{"root": str(root), "name": "rav", "speaker_prefix": "x-"}])
    assert sorted(e["speaker"] for e in prefixed.entries) == ["x-Actor_01", "x-Actor_02"]
    # A regex on the path replaces the layout's rule (here: the actor number in the file name).
    by_regex = scan_speech(
        [{"layout": "generic", "root": str(root), "name": "rav", "speaker_regex": r"-(\d+)\.\w+$"}]
    )
    assert sorted(e["speaker"] for e in by_regex.entries) == ["rav_01", "rav_02"]
    assert [Path(p["path"]).name for p in by_regex.problems] == ["loose_file.wav"]


def test_bad_source_options_are_named(tmp_path: Path) -> None:
    fake(tmp_path / "a" / "x.wav")
    with pytest.raises(ConfigError, match=r"speech_sources\[0\].*mikc"):
        scan_speech([{"layout": "vctk", "root": str(tmp_path), "mikc": "mic2"}])
    with pytest.raises(ConfigError, match=r"speech_sources\[0\]\.layout"):
        scan_speech([{"layout": "librispeech", "root": str(tmp_path)}])
    with pytest.raises(ConfigError, match=r"rir_dirs\[0\]\.channels"):
        scan_rir([{"layout": "slr28", "root": str(tmp_path), "channels": "left"}])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_noise([str(tmp_path / "nowhere")])


def test_demand_channel_subset(tmp_path: Path) -> None:
    root = tmp_path / "DEMAND"
    for env in ("DKITCHEN", "STRAFFIC"):
        for ch in range(1, 17):
            fake(root / env / f"ch{ch:02d}.wav")
    default = scan_noise([{"layout": "demand", "root": str(root)}])
    assert sorted(e["key"] for e in default.entries) == [
        "demand/DKITCHEN/ch01",
        "demand/STRAFFIC/ch01",
    ]
    two = scan_noise([{"layout": "demand", "root": str(root), "channels": [1, 16]}])
    assert len(two.entries) == 4
    assert {Path(e["path"]).name for e in two.entries} == {"ch01.wav", "ch16.wav"}


def test_slr26_room_size(tmp_path: Path) -> None:
    root = tmp_path / "simulated_rirs_48k"
    fake(root / "smallroom" / "Room001" / "Room001-00001.wav")
    fake(root / "mediumroom" / "Room002" / "Room002-00001.wav")
    fake(root / "largeroom" / "Room003" / "Room003-00007.wav")
    result = scan_rir([{"layout": "slr26", "root": str(root)}])
    assert sorted(e["room"] for e in result.entries) == ["large", "medium", "small"]
    assert all(e["channel"] is None and e["speaker"] is None for e in result.entries)


def test_slr28_channels_and_noise_files(tmp_path: Path) -> None:
    root = tmp_path / "real_rirs_isotropic_noises"
    fake(root / "RWCP_type1_rir_circle_ane_imp000.wav", channels=4)
    fake(root / "air_type1_air_binaural_aula_carolina_1_1_3_0_1.wav")
    fake(root / "RVB2014_type1_noise_largeroom1_1.wav", channels=8)  # a noise, not an RIR
    first = scan_rir([{"layout": "slr28", "root": str(root)}])
    assert sorted((e["key"], e["channel"]) for e in first.entries) == [
        ("slr28/RWCP_type1_rir_circle_ane_imp000", 0),
        ("slr28/air_type1_air_binaural_aula_carolina_1_1_3_0_1", None),
    ]
    every = scan_rir([{"layout": "slr28", "root": str(root), "channels": "all"}])
    assert sorted(e["key"] for e in every.entries if e["channels"] == 4) == [
        f"slr28/RWCP_type1_rir_circle_ane_imp000_ch{c:02d}" for c in range(4)
    ]
    mixed = scan_rir([str(root)])  # generic folder: multi-channel files are downmixed
    assert all(e["channel"] is None for e in mixed.entries)


def test_scan_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake(tmp_path / "spk" / "a.wav", frames=SR)
    (tmp_path / "spk" / "broken.wav").write_bytes(b"RIFF not really a wave file")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scan decoded audio")

    monkeypatch.setattr(sf, "read", no_decoding)
    result = scan_speech([{"root": str(tmp_path), "name": "t"}])
    assert [e["duration"] for e in result.entries] == [1.0]
    assert result.entries[0]["sample_rate"] == SR
    assert len(result.problems) == 1
    assert "broken.wav" in result.problems[0]["path"]
    assert "unreadable header" in result.problems[0]["error"]


@pytest.mark.parametrize(("n", "expected"), [(0, 0), (1, 0), (2, 1), (16, 1), (40, 2), (1851, 93)])
def test_n_validation(n: int, expected: int) -> None:
    assert n_validation(n, 0.05) == expected


def test_validation_split_last_speakers_per_source() -> None:
    entries = [
        {"key": f"{src}/{spk}/{u}", "source": src, "speaker": f"{src}_{spk:03d}"}
        for src, n_spk in (("a", 40), ("b", 2), ("c", 1))
        for spk in range(n_spk)
        for u in range(3)
    ]
    shuffled = [entries[i] for i in np.random.default_rng(0).permutation(len(entries))]
    assign_splits(shuffled, 0.05)
    val = {e["speaker"] for e in shuffled if e["split"] == "val"}
    assert val == {"a_038", "a_039", "b_001"}
    # every utterance of a speaker is in the same split
    for e in shuffled:
        assert (e["split"] == "val") == (e["speaker"] in val)
    noise = [{"key": f"n/{i}", "source": "n", "speaker": None} for i in range(4)]
    assign_splits(noise, 0.05)
    assert [e["split"] for e in noise] == ["train", "train", "train", "val"]


def test_cli_scan_only_writes_manifests(tmp_path: Path) -> None:
    for spk in ("Actor_01", "Actor_02"):
        fake(tmp_path / "speech" / spk / "u1.wav")
    fake(tmp_path / "noise" / "n.wav", sr=16_000)
    fake(tmp_path / "rir" / "r.wav", channels=2, sr=44_100)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data:\n"
        f"  speech_sources: [{{root: {tmp_path / 'speech'}, name: sp}}]\n"
        f"  noise_dirs: [{tmp_path / 'noise'}]\n"
        f"  rir_dirs: [{tmp_path / 'rir'}]\n"
        f"  manifest_dir: {tmp_path / 'm'}\n"
    )
    assert main(["--config", str(cfg), "--scan-only", "--set", "data.val_fraction=0.5"]) == 0
    speech = read_manifest(tmp_path / "m" / "speaker_manifest.json")
    assert [(e["speaker"], e["split"]) for e in speech] == [("sp_Actor_01", "train"),
                                                             ("sp_Actor_02", "val")]
    rir = json.loads((tmp_path / "m" / "rir_manifest.json").read_text())["entries"]
    assert (rir[0]["sample_rate"], rir[0]["channels"]) == (44_100, 2)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "noise_manifest.json",
        "rir_manifest.json",
        "speaker_manifest.json",
    ]  # no temporary files left behind
    assert load_config(cfg).data.val_fraction == pytest.approx(0.05)  # --set did not write back


def test_val_fraction_one_holds_out_everything() -> None:
    # A held-out test corpus (the demo's test speakers): every speaker is validation.
    assert n_validation(4, 1.0) == 4
    assert n_validation(1, 1.0) == 1
    assert n_validation(4, 0.99) == 3
