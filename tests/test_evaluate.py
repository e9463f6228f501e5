"""evaluate.py on an untrained tiny checkpoint and real recordings: the three sample sources,
reproducibility, metric values against the reference implementations, outputs, one read of the
checkpoint, memory that does not grow with a recording's length, bad inputs."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pesq
import pytest
import soundfile as sf
import soxr
import torch
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

import evaluate
from config import load_config, model_kwargs, to_dict
from evaluation import report
from evaluation.metrics import COLUMNS, MetricSettings
from evaluation.scoring import row_of
from evaluation.sources import TA, TP, Sample, csv_samples
from models.registry import build_model, checkpoint_payload
from tests.packed_data import packed_subset

REPO = Path(__file__).resolve().parents[1]
SR = 48_000
SEGMENT_SECONDS = 1.0  # PESQ needs >= ~0.25 s of speech, STOI ~0.4 s; 1 s keeps the model fast
N_VAL = 4
TRIPLET_SECONDS = 1.5
SI_SDR_TOL_DB = 1e-3  # the CSV keeps 6 decimals; float64 both sides
PESQ_TOL = 1e-4


@pytest.fixture(autouse=True)
def one_torch_thread() -> None:
    """The cores are shared: two intra-op threads of a tiny LSTM fight other processes and run
    many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """An untrained tiny generator whose stored config points at the packed subset."""
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    cfg.data = packed_subset(tmp_path_factory, shared_data)
    cfg.data.segment_seconds = SEGMENT_SECONDS
    cfg.data.ref_seconds = SEGMENT_SECONDS
    cfg.data.ta_prob = 0.5  # both conditions among a handful of samples
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    payload = {**checkpoint_payload(model, model_kwargs(cfg)), "ema": None, "config": to_dict(cfg)}
    torch.save(payload, path)
    return path


def _speech(shared: Path, actor: int, index: int, seconds: float, offset: float) -> np.ndarray:
    files = sorted((shared / "speech" / "ravdess" / f"Actor_{actor:02d}").glob("*.flac"))
    wave, sr = sf.read(files[index], dtype="float32")
    assert sr == SR
    start = round(offset * SR)
    return wave[start : start + round(seconds * SR)]


@pytest.fixture(scope="module")
def triplets(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Two TP triplets (one at 16 / 44.1 kHz, one at 48 kHz) and one TA triplet (no target)."""
    folder = tmp_path_factory.mktemp("triplets")
    target = _speech(shared_data, 1, 0, TRIPLET_SECONDS, 0.8)
    other = _speech(shared_data, 2, 0, TRIPLET_SECONDS, 0.8)
    ref = _speech(shared_data, 1, 3, TRIPLET_SECONDS, 0.5)
    mix = target + 0.7 * other
    for name, wave, sr in [
        ("a-mixed", mix, 16_000), ("a-ref", ref, 44_100), ("a-target", target, 44_100),
        ("b-mixed", mix, SR), ("b-ref", ref, 16_000), ("b-target", target, SR),
        ("c-mixed", other, 44_100), ("c-ref", ref, SR),
    ]:
        sf.write(folder / f"{name}.wav", soxr.resample(wave, SR, sr) if sr != SR else wave, sr)
    return folder


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def run(*argv: str | Path) -> None:
    """evaluate.py's command line; the core metrics unless the call names others (the model-based
    ones have their own tests: tests/test_eval_models.py and test_model_metrics_in_a_run)."""
    argv = [str(a) for a in argv]
    evaluate.main(argv if "--metrics" in argv else [*argv, "--metrics", "core"])


CORE = MetricSettings(groups=("core",))
TP_CORE = [n for n in CORE.columns() if COLUMNS[n].conditions == (TP,)]


def core_metrics(estimate: np.ndarray, target: np.ndarray | None,
                 mix: np.ndarray) -> dict[str, object]:
    """The core columns of one estimate (a TA sample when ``target`` is None)."""
    sample = Sample("x", mix, mix, target, TP if target is not None else TA)
    return row_of({"": estimate}, sample, CORE)


# ---------------------------------------------------------------------------------------------
# The three sources
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_validation_set_is_reproducible_and_broken_down(ckpt: Path, tmp_path: Path) -> None:
    # Worker processes the first time, the main process the second: the same bytes.
    run("--ckpt", ckpt, "--out-dir", tmp_path / "a", "--n-samples", N_VAL, "--jobs", 2)
    run("--ckpt", ckpt, "--out-dir", tmp_path / "b", "--n-samples", N_VAL, "--jobs", 0)
    text = (tmp_path / "a" / report.CSV_NAME).read_text()
    assert text == (tmp_path / "b" / report.CSV_NAME).read_text()

    rows = read_rows(tmp_path / "a" / report.CSV_NAME)
    assert list(rows) == [f"val{i:05d}" for i in range(N_VAL)]
    conditions = {r["condition"] for r in rows.values()}
    assert conditions == {"TP", "TA"}, "ta_prob 0.5 over the fixed list gives both"
    summary = json.loads((tmp_path / "a" / report.SUMMARY_NAME).read_text())
    edges = summary["settings"]["snr_band_edges_db"]
    sir_edges = summary["settings"]["sir_band_edges_db"]
    expected = {"all"} | conditions
    for r in rows.values():
        n = int(r["n_interferers"])
        expected.add(f"{n} interferer{'s' if n != 1 else ''}")
        expected.add(f"SNR {report.snr_band(float(r['snr_db']), edges)} dB")
        expected.add("noisy ref" if r["ref_noisy"] == "1" else "clean ref")
        if r["condition"] == "TP":  # the validation set knows every TP sample's interferers
            expected.add(f"SIR {report.snr_band(float(r['sir_db']), sir_edges)} dB")
    breakdown = summary["breakdown"]
    assert set(breakdown) == expected
    assert breakdown["all"]["n"] == N_VAL
    assert breakdown["TP"]["n_ta"] == 0
    assert breakdown["TA"]["n_tp"] == 0
    for r in rows.values():  # the metrics that apply to each condition, and only those
        tp = r["condition"] == "TP"
        assert (r["si_sdri"] != "") == tp
        assert (r["ta_suppression_db"] != "") == (not tp)
        # Run again with another validation speaker's reference: an untrained model's two
        # outputs still differ (its reference path is random, not ignored).
        assert (r["ref_sens_db"] != "") == tp
        assert (r["si_sdri_wrong_ref"] != "") == tp
        if tp:
            assert -100.0 < float(r["ref_sens_db"]) < 10.0
    n_tp = sum(r["condition"] == "TP" for r in rows.values())
    assert summary["metrics"]["si_sdri"]["n"] == n_tp == summary["n_tp"]
    text = (tmp_path / "a" / report.REPORT_NAME).read_text()
    assert "| this checkpoint |" in text
    assert "| SNR [" in text
    assert "| SIR " in text
    assert "reference swap (" in text
    assert "seed v2, 1.5 M steps" in text


@pytest.mark.slow
def test_triplets_outputs_and_reference_metrics(ckpt: Path, triplets: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run("--ckpt", ckpt, "--out-dir", out, "--triplets", triplets, "--jobs", 1)
    rows = read_rows(out / report.CSV_NAME)
    assert {k: r["condition"] for k, r in rows.items()} == {"a": "TP", "b": "TP", "c": "TA"}
    assert rows["a"]["n_interferers"] == rows["a"]["snr_db"] == ""
    assert math.isfinite(float(rows["c"]["ta_suppression_db"]))
    assert rows["c"]["pesq"] == ""
    summary = json.loads((out / report.SUMMARY_NAME).read_text())
    assert list(summary["breakdown"]) == ["all", "TP", "TA"]  # no conditions beyond TP/TA

    for name in (report.REPORT_NAME, report.HIST_NAME):
        assert (out / name).stat().st_size > 0
    checked = 0
    for label, example in summary["examples"].items():
        assert (out / example["spectrogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        waves = {k: sf.read(out / v, dtype="float32")[0] for k, v in example["audio"].items()}
        assert set(waves) == {"mix", "ref", "estimate", "target"}, label
        row = rows[example["id"]]
        est, tgt = (torch.from_numpy(waves[k]).double() for k in ("estimate", "target"))
        reference = scale_invariant_signal_distortion_ratio(est, tgt, zero_mean=True)
        assert float(row["si_sdr"]) == pytest.approx(float(reference), abs=SI_SDR_TOL_DB)
        deg, ref = (soxr.resample(waves[k].astype(np.float64), SR, 16_000)
                    for k in ("estimate", "target"))
        assert float(row["pesq"]) == pytest.approx(pesq.pesq(16_000, ref, deg, "wb"), abs=PESQ_TOL)
        checked += 1
    assert checked == len(report.EXAMPLE_LABELS)
    # The 16/44.1 kHz triplet and the 48 kHz one hold the same signals: close metrics.
    assert float(rows["a"]["si_sdr_mix"]) == pytest.approx(float(rows["b"]["si_sdr_mix"]), abs=0.5)


@pytest.mark.slow
def test_csv_mode(ckpt: Path, triplets: Path, tmp_path: Path) -> None:
    list_file = tmp_path / "list.csv"
    list_file.write_text(
        "id,mix,ref,target\n"
        f"one,{triplets / 'a-mixed.wav'},{triplets / 'a-ref.wav'},{triplets / 'a-target.wav'}\n"
        f"two,{triplets / 'c-mixed.wav'},{triplets / 'c-ref.wav'},\n"
    )
    run("--ckpt", ckpt, "--out-dir", tmp_path / "out", "--csv", list_file, "--jobs", 0)
    rows = read_rows(tmp_path / "out" / report.CSV_NAME)
    assert {k: r["condition"] for k, r in rows.items()} == {"one": "TP", "two": "TA"}
    assert math.isfinite(float(rows["one"]["pesq"]))


@pytest.mark.slow
def test_ema_weights_unless_no_ema(ckpt: Path, triplets: Path, tmp_path: Path) -> None:
    payload = torch.load(ckpt, weights_only=True)
    torch.manual_seed(1)  # EMA weights that differ from the generator's
    payload["ema"] = build_model(payload["model_args"]).state_dict()
    with_ema = tmp_path / "ema.pt"
    torch.save(payload, with_ema)
    list_file = tmp_path / "list.csv"
    list_file.write_text(f"{triplets / 'b-mixed.wav'},{triplets / 'b-ref.wav'},"
                         f"{triplets / 'b-target.wav'}\n")
    outputs = {}
    for name, flags in {"ema": [], "raw": ["--no-ema"]}.items():
        out = tmp_path / name
        run("--ckpt", with_ema, "--out-dir", out, "--csv", list_file, "--jobs", 0, *flags)
        outputs[name] = json.loads((out / report.SUMMARY_NAME).read_text())
    assert outputs["ema"]["weights"] == "EMA"
    assert outputs["raw"]["weights"] == "generator"
    si_sdr = {k: v["metrics"]["si_sdr"]["mean"] for k, v in outputs.items()}
    assert si_sdr["ema"] != si_sdr["raw"]


def test_checkpoint_is_read_once(
    ckpt: Path, triplets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read gives the model, the EMA choice (here turned off by the config) and the config."""
    payload = torch.load(ckpt, weights_only=True)
    payload["ema"] = build_model(payload["model_args"]).state_dict()
    with_ema = tmp_path / "ema.pt"
    torch.save(payload, with_ema)
    list_file = tmp_path / "list.csv"
    list_file.write_text(f"{triplets / 'b-mixed.wav'},{triplets / 'b-ref.wav'},\n")
    reads: list[Path] = []
    load = torch.load

    def counted(path: Path, *args: object, **kwargs: object) -> object:
        reads.append(Path(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    run("--ckpt", with_ema, "--out-dir", tmp_path / "out", "--csv", list_file, "--jobs", 0,
        "--set", "eval.use_ema=false")
    assert reads == [with_ema]
    summary = json.loads((tmp_path / "out" / report.SUMMARY_NAME).read_text())
    assert summary["weights"] == "generator"


# The memory check: the evaluation's own steps (one read of the checkpoint, the sample as
# evaluate.py loads it, its extraction) in a fresh process that reports its peak RSS. The metrics
# are left out: they hold float64 copies of whole signals, which grow with the length on purpose.
MEMORY_CHILD = """
import json, resource, sys
import torch
import evaluate
from evaluation.runner import RunSettings, extract_all
from evaluation.sources import triplet_samples
from extraction.extractor import Extractor
torch.set_num_threads(1)
args = evaluate.build_parser().parse_args(sys.argv[1:])
extractor = Extractor(evaluate.load_checkpoint(args).model, device="cpu")
(source,), _ = triplet_samples(args.triplets)
estimate = extract_all(extractor, source.load(), RunSettings())[""]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"samples": len(estimate), "peak": peak}))
"""
# 10 minutes against 1: the mixture and the estimate (float32 at 48 kHz) add 0.2 GB to a process
# of about 0.6 GB; the whole file in one forward tried to allocate 29 GB for the attention alone.
MEMORY_RATIO = 1.5
NOISE_DBFS = -20.0


def _write_noise(path: Path, seconds: int, rng: np.random.Generator) -> None:
    """White noise written one second at a time (loud enough to pass the reference check)."""
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(10 ** (NOISE_DBFS / 20) * rng.standard_normal(SR))


@pytest.mark.slow
def test_memory_does_not_grow_with_length(tmp_path: Path) -> None:
    """Extracting a 10-minute recording the way evaluate.py does peaks within 1.5x of a
    1-minute one (attention is quadratic in frames: windows, not the whole file at once)."""
    # The tiny model with 8 bands instead of 53: 6x faster, and the band count does not change
    # how memory grows with the length.
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.band_regions=[[0, 24000, 8]]"])
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg))
    path = tmp_path / "tiny8.pt"
    torch.save(checkpoint_payload(model, model_kwargs(cfg)), path)
    rng = np.random.default_rng(0)
    peaks = {}
    for minutes in (1, 10):
        folder = tmp_path / f"{minutes}min"
        folder.mkdir()
        _write_noise(folder / "x-mixed.wav", 60 * minutes, rng)  # no target file: TA
        _write_noise(folder / "x-ref.wav", 3, rng)
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, "--ckpt", str(path), "--out-dir",
             str(tmp_path / "unused"), "--triplets", str(folder)],
            capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["samples"] == 60 * minutes * SR
        peaks[minutes] = result["peak"]
        shutil.rmtree(folder)
    assert peaks[10] < MEMORY_RATIO * peaks[1], peaks


def test_csv_without_header_and_relative_paths(tmp_path: Path, triplets: Path) -> None:
    for name in ("a-mixed.wav", "a-ref.wav", "a-target.wav", "c-mixed.wav", "c-ref.wav"):
        (tmp_path / name).symlink_to(triplets / name)
    (tmp_path / "list.csv").write_text(
        "a-mixed.wav,a-ref.wav,a-target.wav\nc-mixed.wav,c-ref.wav\n")
    sources, _ = csv_samples(tmp_path / "list.csv")
    assert [s.id for s in sources] == ["a", "c"]
    samples = [s.load() for s in sources]
    assert samples[0].target is not None
    assert samples[1].target is None
    assert len(samples[0].mix) == len(samples[0].target) == round(TRIPLET_SECONDS * SR)


# ---------------------------------------------------------------------------------------------
# Metrics and summaries without the model
# ---------------------------------------------------------------------------------------------


def test_metrics_match_reference_implementations(shared_data: Path) -> None:
    target = _speech(shared_data, 3, 0, 1.0, 0.8)
    noise = np.random.default_rng(0).standard_normal(len(target)).astype(np.float32)
    mix = target + 0.01 * noise
    estimate = (0.8 * target + 0.002 * noise).astype(np.float32)
    m = core_metrics(estimate, target, mix)
    as64 = [torch.from_numpy(x.astype(np.float64)) for x in (estimate, target, mix)]
    ref_si_sdr = float(scale_invariant_signal_distortion_ratio(as64[0], as64[1], zero_mean=True))
    ref_mix = float(scale_invariant_signal_distortion_ratio(as64[2], as64[1], zero_mean=True))
    assert m["si_sdr"] == pytest.approx(ref_si_sdr, abs=1e-6)
    assert m["si_sdri"] == pytest.approx(ref_si_sdr - ref_mix, abs=1e-6)
    deg, ref = (soxr.resample(x.astype(np.float64), SR, 16_000) for x in (estimate, target))
    assert m["pesq"] == pesq.pesq(16_000, ref, deg, "wb")
    assert m["stoi"] > 0.9
    assert m["estoi"] > 0.8
    assert math.isnan(m["ta_suppression_db"])
    assert m["notes"] == ""

    ta = core_metrics(0.1 * mix, None, mix)
    assert ta["ta_suppression_db"] == pytest.approx(20.0, abs=1e-4)
    assert all(math.isnan(ta[k]) for k in TP_CORE)


def test_metric_failures_become_nan_with_a_reason() -> None:
    noise = np.random.default_rng(1).standard_normal(SR).astype(np.float32)
    silent = core_metrics(noise, np.zeros(SR, dtype=np.float32), noise)
    assert math.isnan(silent["pesq"])
    assert "pesq: NoUtterancesError: No utterances detected" in silent["notes"]
    click = np.zeros(SR, dtype=np.float32)
    click[:100] = noise[:100]  # 2 ms of signal: too little for STOI's 30 frames
    short = core_metrics(noise, click, noise)
    assert math.isnan(short["stoi"])
    assert math.isnan(short["estoi"])
    assert "stoi: too little non-silent speech" in short["notes"]
    bad = core_metrics(np.full(SR, np.nan, dtype=np.float32), noise, noise)
    assert bad["notes"] == "non-finite estimate"
    assert math.isnan(bad["si_sdr"])


def test_summaries() -> None:
    edges = [-5.0, 0.0, 5.0, 10.0, 15.0]
    assert [report.snr_band(x, edges) for x in (-7, -5, 0, 9.9, 15, 16)] == [
        "<-5", "[-5,0)", "[0,5)", "[5,10)", "[10,15]", ">15"]
    stats = report.describe([1.0, 2.0, 3.0, 4.0, math.nan])
    assert (stats["n"], stats["mean"], stats["median"]) == (4, 2.5, 2.5)
    assert stats["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert (stats["p5"], stats["p95"]) == pytest.approx((1.15, 3.85))
    rows = [
        {"id": str(i), "condition": "TP", "n_interferers": 1 + i % 2, "snr_db": 3.0 * i,
         "ref_noisy": i % 2 == 0, **dict.fromkeys(CORE.columns(), math.nan),
         "si_sdri": float(3 * (i - 2))}
        for i in range(5)
    ]
    summary = report.summarize(rows, CORE.columns(), edges)
    assert summary["bad_si_sdri"] == {"n_tp": 5, "below_0_db": {"count": 2, "share": 0.4},
                                      "below_-5_db": {"count": 1, "share": 0.2}}
    assert list(summary["breakdown"]) == [
        "all", "TP", "1 interferer", "2 interferers", "SNR [0,5) dB", "SNR [5,10) dB",
        "SNR [10,15] dB", "clean ref", "noisy ref"]
    assert report.pick_examples(rows) == {"best": 4, "median": 2, "worst": 0}


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, non-zero exit
# ---------------------------------------------------------------------------------------------


def _bad_inputs(tmp: Path, ckpt: Path, triplets: Path) -> dict[str, tuple[list, str]]:
    junk = tmp / "junk.pt"
    junk.write_text("not a checkpoint")
    foreign = tmp / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "x-mixed.wav").write_bytes(b"RIFF garbage, not audio")
    (broken / "x-ref.wav").symlink_to(triplets / "a-ref.wav")
    empty = tmp / "empty"
    empty.mkdir()
    no_ref = tmp / "no_ref"
    no_ref.mkdir()
    (no_ref / "y-mixed.wav").symlink_to(triplets / "a-mixed.wav")
    bad_csv = tmp / "bad.csv"
    bad_csv.write_text(f"mix,ref,target\n{triplets / 'a-mixed.wav'},{tmp / 'gone.wav'},\n")
    silent = tmp / "silent"
    silent.mkdir()
    (silent / "z-mixed.wav").symlink_to(triplets / "a-mixed.wav")
    sf.write(silent / "z-ref.wav", np.zeros(2 * SR, np.float32), SR)
    hiss = tmp / "hiss.wav"  # noise 80 dB below full scale and nothing else
    noise = np.random.default_rng(0).standard_normal(2 * SR) * 10 ** (-80 / 20)
    sf.write(hiss, noise.astype(np.float32), SR, subtype="FLOAT")
    hiss_csv = tmp / "hiss.csv"
    hiss_csv.write_text(f"{triplets / 'a-mixed.wav'},{hiss},\n")
    return {
        "missing checkpoint": (["--ckpt", tmp / "missing.pt"], "missing.pt"),
        "not a checkpoint": (["--ckpt", junk], "junk.pt"),
        "foreign checkpoint": (["--ckpt", foreign], "not a HiFi-TSE checkpoint"),
        "unreadable audio": (["--ckpt", ckpt, "--triplets", broken], "x-mixed.wav"),
        "no triplets": (["--ckpt", ckpt, "--triplets", empty], "no triplets"),
        "no reference": (["--ckpt", ckpt, "--triplets", no_ref], "y-ref.wav"),
        "missing csv file": (["--ckpt", ckpt, "--csv", bad_csv], "gone.wav"),
        "silent reference": (["--ckpt", ckpt, "--triplets", silent],
                             f"{silent / 'z-ref.wav'}: no voice in the reference (digital"),
        "voiceless reference": (["--ckpt", ckpt, "--csv", hiss_csv],
                                f"{hiss}: no voice in the reference (its loudest"),
    }


# Bad input that stops the run whatever the flags; every other case is one bad sample.
RUN_STOPPING = ("missing checkpoint", "not a checkpoint", "foreign checkpoint", "no triplets")


def test_bad_inputs_exit_with_one_line(
    ckpt: Path, triplets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--strict: one line and exit 1 at the first bad sample; without it the sample is skipped
    with one line, and a run that scores nothing says so on a second line and exits 1."""
    for case, (argv, needle) in _bad_inputs(tmp_path, ckpt, triplets).items():
        for strict in (True, False):
            with pytest.raises(SystemExit) as exc:
                run(*argv, "--out-dir", tmp_path / "out", *(["--strict"] if strict else []))
            assert exc.value.code != 0, case
            err = capsys.readouterr().err.strip().splitlines()
            if strict or case in RUN_STOPPING:
                assert len(err) == 1, (case, err)
                assert err[0].startswith("evaluate.py: error: "), (case, err)
            else:
                assert len(err) == 2, (case, err)
                assert err[0].startswith("evaluate.py: skipped "), (case, err)
                assert err[1] == ("evaluate.py: error: no sample could be scored (1 skipped, "
                                  "see above)"), (case, err)
            assert needle in err[0], (case, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--ckpt", str(tmp_path / "none.pt"),
         "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, lines
    assert "none.pt" in lines[0]
