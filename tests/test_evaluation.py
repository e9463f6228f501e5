"""What evaluation/ adds to the scores of test_evaluate.py: the full-band LSD, speaker
confusion, the two SI-SDR conventions, loudness normalisation, chunked (streaming) extraction,
the three-folder layout with interferers and transcripts, recordings with no target, and the
model-based metrics in a run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

import evaluate
from config import load_config, model_kwargs
from dsp.audio import load_audio
from evaluation import report
from evaluation.metrics import (
    STREAM_PREFIX,
    MetricSettings,
    lsd_highband,
    si_sdr_db,
    speaker_confusion,
)
from evaluation.runner import RunSettings, extract_all, load_sample, mixture_loudness
from evaluation.scoring import row_of
from evaluation.sources import (
    TA,
    TP,
    UNKNOWN,
    EvalInputError,
    Sample,
    SampleSource,
    read_transcripts,
    triplet_samples,
    with_transcripts,
)
from extraction.extractor import Extractor
from models.layers.conditioning import encode_references
from models.registry import build_model, checkpoint_payload

REPO = Path(__file__).resolve().parents[1]
SR = 48_000
STATEMENTS = {"01": "kids are talking by the door", "02": "dogs are sitting by the door"}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ravdess(shared: Path, actor: int, index: int, seconds: float = 2.0) -> tuple[np.ndarray, str]:
    """A RAVDESS utterance from 0.5 s on, and its words (the statement in the file name)."""
    path = sorted((shared / "speech" / "ravdess" / f"Actor_{actor:02d}").glob("*.flac"))[index]
    wave = load_audio(path)[SR // 2: SR // 2 + round(seconds * SR)]
    return wave, STATEMENTS[path.stem.split("-")[4]]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_lsd_highband_known_values(shared_data: Path) -> None:
    speech, _ = ravdess(shared_data, 1, 0)
    assert lsd_highband(speech, speech) == pytest.approx(0.0, abs=1e-9)
    # A gain g changes every bin's power by 20 log10 g dB: the LSD is that, up to the power
    # floor 120 dB below the loudest bin (2e-4 dB here).
    assert lsd_highband(0.5 * speech, speech) == pytest.approx(20 * math.log10(2), abs=1e-3)
    # Band-limited to 8 kHz (what a 16 kHz model gives back): tens of dB.
    spec = np.fft.rfft(speech)
    spec[np.fft.rfftfreq(len(speech), 1 / SR) > 7_900] = 0
    lowpassed = np.fft.irfft(spec, len(speech)).astype(np.float32)
    assert lsd_highband(lowpassed, speech) > 20.0
    # Only the 8-24 kHz band counts: removing everything below 8 kHz changes nothing much.
    spec = np.fft.rfft(speech)
    spec[np.fft.rfftfreq(len(speech), 1 / SR) < 7_000] = 0
    highpassed = np.fft.irfft(spec, len(speech)).astype(np.float32)
    assert lsd_highband(highpassed, speech) < 1.0


def test_speaker_confusion_and_si_sdr_conventions(shared_data: Path) -> None:
    target, _ = ravdess(shared_data, 1, 0)
    other, _ = ravdess(shared_data, 2, 0)
    heard = np.stack([target, other])
    assert speaker_confusion(target + 0.05 * other, heard)[1] == 0.0
    best, confused = speaker_confusion(other + 0.05 * target, heard)
    assert confused == 1.0
    assert best == pytest.approx(si_sdr_db(other + 0.05 * target, other))

    offset = target + 0.3 * other + 0.01  # a DC offset separates the conventions
    as64 = [torch.from_numpy(x.astype(np.float64)) for x in (offset, target)]
    for zero_mean in (True, False):
        expected = float(scale_invariant_signal_distortion_ratio(*as64, zero_mean=zero_mean))
        assert si_sdr_db(offset, target, zero_mean=zero_mean) == pytest.approx(expected, abs=1e-6)
    assert si_sdr_db(offset, target) - si_sdr_db(offset, target, zero_mean=False) > 1.0


def test_score_rows_per_condition(shared_data: Path) -> None:
    target, _ = ravdess(shared_data, 1, 0)
    other, _ = ravdess(shared_data, 2, 0)
    mix = target + other
    settings = MetricSettings(groups=("core",), stream=True)
    tp = Sample("tp", mix, target, target, TP, heard=np.stack([target, other]))
    row = row_of({"": target, STREAM_PREFIX: other}, tp, settings)
    assert set(row) == {*settings.columns(), "notes"}
    assert (row["confusion"], row["stream_confusion"]) == (0.0, 1.0)
    assert row["si_sdri"] > 20 > row["stream_si_sdri"]
    assert row["lsd_hb"] == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(row["lsd_hb_mix"])
    unknown = Sample("real", mix, target, None, UNKNOWN)
    row = row_of({"": target}, unknown, MetricSettings(groups=("core",)))
    assert all(math.isnan(v) for k, v in row.items() if k != "notes"), row
    ta = row_of({"": 0.1 * mix}, Sample("ta", mix, target, None, TA),
               MetricSettings(groups=("core",)))
    assert ta["ta_suppression_db"] == pytest.approx(20.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Loudness, chunks
# ---------------------------------------------------------------------------------------------


def test_loudness_normalisation(shared_data: Path) -> None:
    # ITU-R BS.1770-4: a full-scale 997 Hz sine in one channel reads -3.01 LUFS.
    t = np.arange(5 * SR) / SR
    assert mixture_loudness(np.sin(2 * np.pi * 997 * t)) == pytest.approx(-3.01, abs=0.05)
    target, _ = ravdess(shared_data, 1, 0)
    other, _ = ravdess(shared_data, 2, 0)
    sample = Sample("x", target + other, target, target, TP, heard=np.stack([target, other]))
    source = SampleSource("x", lambda: sample)
    scaled, row = load_sample(source, RunSettings(lufs=-20.0))
    assert row["mix_lufs"] == pytest.approx(
        pyloudnorm.Meter(SR).integrated_loudness(sample.mix.astype(np.float64)))
    assert mixture_loudness(scaled.mix) == pytest.approx(-20.0, abs=0.01)
    gain = scaled.mix[SR] / sample.mix[SR]
    assert row["mix_lufs"] < -25, "RAVDESS is quiet: the gain is large"
    np.testing.assert_allclose(scaled.target, gain * sample.target, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scaled.heard, gain * sample.heard, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(scaled.ref, sample.ref)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    cfg = load_config(REPO / "configs" / "td_speakerbeam_tiny.yaml")
    torch.manual_seed(0)
    return build_model(model_kwargs(cfg)).eval()


def test_chunked_extraction_processes_each_chunk_alone(
    shared_data: Path, tiny_model: torch.nn.Module
) -> None:
    mix, _ = ravdess(shared_data, 1, 0, seconds=2.0)
    ref, _ = ravdess(shared_data, 1, 5, seconds=2.0)
    extractor = Extractor(tiny_model)
    with torch.inference_mode():
        z_ref = tiny_model.encode_reference(torch.from_numpy(ref)[None])

    def alone(part: np.ndarray) -> np.ndarray:  # the model on one chunk, at its own level
        with torch.inference_mode():
            return tiny_model.extract(torch.from_numpy(part)[None], z_ref)[0].numpy()

    whole = extractor.extract_chunked(mix, ref, chunk_seconds=4.0, overlap_seconds=0.0)
    np.testing.assert_allclose(whole, alone(mix), rtol=0, atol=1e-6)
    chunked = extractor.extract_chunked(mix, ref, chunk_seconds=0.5, overlap_seconds=0.1)
    assert chunked.shape == mix.shape
    first = alone(mix[: SR // 2])
    np.testing.assert_allclose(chunked[: round(0.4 * SR)], first[: round(0.4 * SR)], atol=1e-6)
    # Not the whole-file extraction: each chunk has its own level.
    assert np.abs(chunked - extractor.extract_array(mix, ref)).max() > 1e-4
    with pytest.raises(ValueError, match="overlap"):
        extractor.extract_chunked(mix, ref, chunk_seconds=0.5, overlap_seconds=0.5)


# ---------------------------------------------------------------------------------------------
# Sources and a whole run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def homework(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SpEx+ homework layout: mix/ refs/ targets/, with interferers for one sample, a
    transcript beside one mixture and one sample without a target."""
    root = tmp_path_factory.mktemp("homework")
    for name in ("mix", "refs", "targets"):
        (root / name).mkdir()
    target, words = ravdess(shared_data, 1, 0)
    other, _ = ravdess(shared_data, 2, 1)
    ref, _ = ravdess(shared_data, 1, 7)
    quiet = 0.1 * (target + 0.8 * other)  # a quiet recording: --lufs has work to do
    files = {"mix/a-mixed.wav": quiet, "refs/a-ref.wav": ref, "targets/a-target.wav": 0.1 * target,
             "targets/a-interferer1.wav": 0.08 * other,
             "mix/b-mixed.wav": quiet, "refs/b-ref.wav": ref, "targets/b-target.wav": 0.1 * target,
             "mix/c-mixed.wav": quiet, "refs/c-ref.wav": ref}
    for rel, wave in files.items():
        sf.write(root / rel, wave, SR, subtype="FLOAT")
    (root / "mix" / "a.txt").write_text(words.upper() + ".\n")
    return root


def test_three_folder_layout_interferers_and_transcripts(homework: Path, tmp_path: Path) -> None:
    sources, _ = triplet_samples(homework, missing_target="unknown")
    assert [s.id for s in sources] == ["a", "b", "c"]
    assert [s.transcribed for s in sources] == [True, False, False]
    a, b, c = (s.load() for s in sources)
    assert a.heard.shape == (2, len(a.mix))
    assert b.heard is None
    assert a.transcript == "KIDS ARE TALKING BY THE DOOR."
    assert (a.condition, b.condition, c.condition) == (TP, TP, UNKNOWN)
    assert triplet_samples(homework)[0][2].load().condition == TA  # the default: absent

    text = tmp_path / "text"
    text.write_text("b dogs are sitting by the door\nc kids are talking\n")
    updated = with_transcripts(sources, read_transcripts(text), text)
    assert [s.transcribed for s in updated] == [True, True, True]
    assert updated[2].load().transcript == "kids are talking"
    text.write_text("d nothing\n")
    with pytest.raises(EvalInputError, match="transcripts of unknown samples: d"):
        with_transcripts(sources, read_transcripts(text), text)


def test_extra_references_are_read_and_pooled(
    shared_data: Path, tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    """``ID-ref2.wav``, ``ID-ref3.wav`` beside ``ID-ref.wav``: more references of the target,
    in order, pooled by the extraction (the same as the model on the pooled encodings)."""
    target, _ = ravdess(shared_data, 1, 0)
    other, _ = ravdess(shared_data, 2, 1)
    refs = [ravdess(shared_data, 1, k)[0] for k in (7, 9, 11)]
    files = {"a-mixed.wav": target + 0.8 * other, "a-target.wav": target, "a-ref.wav": refs[0],
             "a-ref3.wav": refs[2], "a-ref2.wav": refs[1], "b-mixed.wav": target,
             "b-ref.wav": refs[0]}
    for name, wave in files.items():
        sf.write(tmp_path / name, wave, SR, subtype="FLOAT")
    sources, skipped = triplet_samples(tmp_path)
    assert not skipped
    a, b = (s.load() for s in sources)
    assert len(a.extra_refs) == 2
    assert b.extra_refs == ()
    np.testing.assert_allclose(a.extra_refs[1], refs[2], atol=1e-7)  # ordered by K
    estimate = extract_all(Extractor(tiny_model), a, RunSettings())[""]
    with torch.inference_mode():
        pooled = encode_references(tiny_model, torch.from_numpy(np.stack(refs))[None])
        expected = tiny_model.extract(torch.from_numpy(a.mix)[None], pooled)[0].numpy()
    np.testing.assert_allclose(estimate, expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_model: torch.nn.Module) -> Path:
    cfg = load_config(REPO / "configs" / "td_speakerbeam_tiny.yaml")
    path = tmp_path_factory.mktemp("ckpt") / "td.pt"
    torch.save(checkpoint_payload(tiny_model, model_kwargs(cfg)) | {"ema": None}, path)
    return path


def rows_of(out: Path) -> dict[str, dict[str, str]]:
    with (out / report.CSV_NAME).open() as f:
        return {r["id"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_run_with_lufs_chunks_and_torchmetrics_convention(
    tiny_ckpt: Path, homework: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    evaluate.main(["--ckpt", str(tiny_ckpt), "--out-dir", str(out), "--triplets", str(homework),
                   "--metrics", "core", "--lufs", "--chunk", "0.5", "--overlap", "0.1",
                   "--si-sdr", "torchmetrics", "--missing-target", "unknown", "--jobs", "0"])
    rows = rows_of(out)
    assert {k: r["condition"] for k, r in rows.items()} == {"a": TP, "b": TP, "c": UNKNOWN}
    assert float(rows["a"]["mix_lufs"]) < -30
    assert rows["a"]["confusion"] in ("0.000000", "1.000000")
    assert rows["b"]["confusion"] == ""
    for name in ("si_sdr", "si_sdri", "pesq", "lsd_hb", "confusion"):
        assert math.isfinite(float(rows["a"][STREAM_PREFIX + name])), name
    assert rows["a"]["stream_si_sdr"] != rows["a"]["si_sdr"]
    assert rows["c"]["si_sdr"] == rows["c"]["ta_suppression_db"] == ""
    summary = json.loads((out / report.SUMMARY_NAME).read_text())
    assert summary["n_unknown"] == 1
    assert "no mean removal" in summary["settings"]["si_sdr"]
    text = (out / report.REPORT_NAME).read_text()
    assert "## Chunked (streaming) extraction: 0.5 s chunks, 0.1 s overlap" in text
    assert "| chunked (0.5 s chunks, 0.1 s overlap) |" in text
    assert "speaker confusion" in text


@pytest.mark.slow
def test_pcs_is_applied_to_every_estimate(tiny_ckpt: Path, homework: Path, tmp_path: Path) -> None:
    """--pcs: the whole-file and the chunked estimates both go through PCS (inference.py's)."""
    common = ["--ckpt", str(tiny_ckpt), "--triplets", str(homework), "--metrics", "core",
              "--chunk", "0.5", "--jobs", "0"]
    evaluate.main([*common, "--out-dir", str(tmp_path / "plain")])
    evaluate.main([*common, "--out-dir", str(tmp_path / "pcs"), "--pcs"])
    plain, stretched = rows_of(tmp_path / "plain"), rows_of(tmp_path / "pcs")
    for name in ("si_sdr", "stream_si_sdr"):
        assert plain["a"][name] != stretched["a"][name], name
    assert plain["a"]["si_sdr_mix"] == stretched["a"]["si_sdr_mix"]
    summary = json.loads((tmp_path / "pcs" / report.SUMMARY_NAME).read_text())
    assert "PCS400" in summary["settings"]["pcs"]


@pytest.mark.slow
def test_model_metrics_in_a_run(tiny_ckpt: Path, homework: Path, tmp_path: Path) -> None:
    """The groups that need a packaged model, through evaluate.py: every column that applies
    is a number, the rest empty, and the report has the wrong-speaker / no-target table."""
    out = tmp_path / "out"
    evaluate.main(["--ckpt", str(tiny_ckpt), "--out-dir", str(out), "--triplets", str(homework),
                   "--metrics", "similarity,dnsmos,wer,visqol", "--missing-target", "unknown",
                   "--jobs", "1"])
    rows = rows_of(out)
    a, c = rows["a"], rows["c"]
    for name in ("spk_sim_ref", "spk_sim_target", "spk_sim_mix", "dnsmos_ovrl", "pdnsmos_bak",
                 "dnsmos_ovrl_mix", "pdnsmos_ovrl_mix", "wer", "wer_mix", "visqol"):
        assert math.isfinite(float(a[name])), name
    assert -1 <= float(a["spk_sim_ref"]) <= 1
    assert 1 <= float(a["dnsmos_ovrl"]) <= 5
    assert a["words"] == "6"
    assert float(a["wer_target"]) <= 0.5, "the clean target's words are mostly recognised"
    assert float(a["visqol"]) <= 4.74  # audio mode's maximum, a signal against itself
    for name in ("spk_sim_ref", "dnsmos_ovrl", "pdnsmos_ovrl"):  # no target needed
        assert math.isfinite(float(c[name])), name
    assert c["spk_sim_target"] == c["visqol"] == c["wer"] == ""  # no target, no transcript
    summary = json.loads((out / report.SUMMARY_NAME).read_text())
    assert summary["wer"]["wer_target"] == pytest.approx(float(a["wer_target"]))
    text = (out / report.REPORT_NAME).read_text()
    assert "| WER (corpus: all errors / all reference words) |" in text
    assert "| DNSMOS OVRL |" in text
