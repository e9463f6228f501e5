"""evaluate.py when things go wrong: odd but valid files are scored, bad samples are skipped and
counted, a metric that crashes (SIGSEGV, SIGABRT) or hangs costs that metric on that row, a
killed run keeps its rows and a rerun scores each remaining ID once, and a long recording goes
through the default metrics."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import evaluate
from config import load_config, model_kwargs
from evaluation import report
from models.registry import build_model, checkpoint_payload

REPO = Path(__file__).resolve().parents[1]
SR = 48_000
SECONDS = 1.2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny generator with 8 bands (fast; no config: files only)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.band_regions=[[0, 24000, 8]]"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny8.pt"
    torch.save(checkpoint_payload(build_model(model_kwargs(cfg)), model_kwargs(cfg)), path)
    return path


@pytest.fixture(scope="module")
def voices(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two RAVDESS actors, each their sentences end to end (about 30 s), at 48 kHz."""
    out = []
    for actor in (1, 2):
        files = sorted((shared_data / "speech" / "ravdess" / f"Actor_{actor:02d}").glob("*.flac"))
        out.append(np.concatenate([sf.read(f, dtype="float32")[0] for f in files[:10]]))
    return out[0], out[1]


def _write(path: Path, wave: np.ndarray, sr: int = SR, subtype: str = "FLOAT") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = wave if sr == SR else soxr.resample(wave, SR, sr)
    sf.write(path, data, sr, subtype=subtype)


def _triplet(folder: Path, name: str, voices: tuple[np.ndarray, np.ndarray], seconds: float,
             offset: float = 0.5) -> dict[str, np.ndarray]:
    target_voice, other_voice = voices
    start, n = round(offset * SR), round(seconds * SR)
    target = target_voice[start : start + n]
    mix = target + 0.7 * other_voice[start : start + n]
    ref = target_voice[start + n : start + n + 2 * SR]
    waves = {"mixed": mix, "ref": ref, "target": target}
    for kind, wave in waves.items():
        _write(folder / f"{name}-{kind}.wav", wave)
    return waves


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _leftovers(out: Path) -> list[Path]:
    """Temporary files or scratch folders an evaluation must not leave behind."""
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".scratch"]


# ---------------------------------------------------------------------------------------------
# Odd and bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory,
               voices: tuple[np.ndarray, np.ndarray]) -> tuple[Path, dict[str, str]]:
    """Good, odd-but-valid and bad triplets in one folder; the bad ones with the file and the
    words their skip line must name."""
    folder = tmp_path_factory.mktemp("odd")
    base = _triplet(folder, "good", voices, SECONDS)
    mix, ref, target = base["mixed"], base["ref"], base["target"]
    # Odd but valid: stereo 24-bit 44.1 kHz, 8 kHz and 16 kHz 16-bit, a 35 s reference.
    stereo = np.stack([mix, 0.5 * mix], axis=1)
    sf.write(folder / "stereo-mixed.wav", soxr.resample(stereo, SR, 44_100), 44_100,
             subtype="PCM_24")
    _write(folder / "stereo-ref.wav", ref, 44_100, "PCM_24")
    _write(folder / "stereo-target.wav", target, 44_100, "PCM_24")
    for rate in (8_000, 16_000):
        for kind, wave in (("mixed", mix), ("ref", ref), ("target", target)):
            _write(folder / f"sr{rate}-{kind}.wav", wave, rate, "PCM_16")
    long_ref = np.tile(voices[0], 2)[: 35 * SR]
    for kind, wave in (("mixed", mix), ("ref", long_ref), ("target", target)):
        _write(folder / f"longref-{kind}.wav", wave)
    # Bad.
    bad: dict[str, str] = {}
    _write(folder / "noref-mixed.wav", mix)
    bad["noref"] = "noref-ref.wav: no such file"
    _write(folder / "nomix-ref.wav", ref)
    _write(folder / "nomix-target.wav", target)
    bad["nomix"] = ": no mixture nomix-mixed.wav"
    for kind, wave in (("mixed", mix), ("ref", ref), ("target", target[: SR // 2])):
        _write(folder / f"length-{kind}.wav", wave)
    bad["length"] = "length-target.wav: 0.500 s long, but its mixture length-mixed.wav is 1.200 s"
    nan_mix = mix.copy()
    nan_mix[100] = np.nan
    for kind, wave in (("mixed", nan_mix), ("ref", ref), ("target", target)):
        _write(folder / f"nan-{kind}.wav", wave)
    bad["nan"] = "nan-mixed.wav: non-finite samples"
    sf.write(folder / "empty-mixed.wav", np.zeros(0, np.float32), SR)
    _write(folder / "empty-ref.wav", ref)
    bad["empty"] = "empty-mixed.wav: empty audio"
    for kind, wave in (("mixed", mix[: SR // 4]), ("ref", ref)):
        _write(folder / f"short-{kind}.wav", wave)
    bad["short"] = "short-mixed.wav: 0.250 s long, shorter than the 0.5 s"
    (folder / "junk-mixed.wav").write_bytes(b"RIFF, but not audio at all" * 10)
    _write(folder / "junk-ref.wav", ref)
    bad["junk"] = "junk-mixed.wav: unreadable audio"
    hiss = (np.random.default_rng(0).standard_normal(len(mix)) * 1e-4).astype(np.float32)
    for kind, wave in (("mixed", mix), ("ref", ref), ("target", hiss)):
        _write(folder / f"silent-{kind}.wav", wave)
    bad["silent"] = "silent-target.wav: the target is silent"
    return folder, bad


GOOD_IDS = {"good", "longref", "sr16000", "sr8000", "stereo"}


def _only(folder: Path, sample_id: str, tmp_path: Path) -> Path:
    """A folder holding (links to) one sample's files of ``folder``."""
    one = tmp_path / "one"
    one.mkdir()
    for path in folder.glob(f"{sample_id}-*.wav"):
        (one / path.name).symlink_to(path)
    return one


def test_odd_inputs_are_scored_and_bad_ones_skipped(
    ckpt: Path, odd_folder: tuple[Path, dict[str, str]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, bad = odd_folder
    out = tmp_path / "out"
    result = evaluate.main([
        "--ckpt", str(ckpt), "--out-dir", str(out), "--triplets", str(folder),
        "--metrics", "core", "--jobs", "1"])
    rows = _rows(out / report.CSV_NAME)
    assert set(rows) == GOOD_IDS
    for row in rows.values():
        assert row["condition"] == "TP"
        assert math.isfinite(float(row["si_sdri"])), row
        assert math.isfinite(float(row["pesq"])), row
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("evaluate.py: skipped")]
    assert len(lines) == len(bad), lines
    for sample_id, needle in bad.items():
        (line,) = [x for x in lines if x.startswith(f"evaluate.py: skipped {sample_id}: ")]
        assert needle in line, (sample_id, line)
        assert str(folder) in line
    summary = json.loads((out / report.SUMMARY_NAME).read_text())
    assert summary["n_skipped"] == len(bad) == len(summary["skipped"])
    assert {k["id"] for k in summary["skipped"]} == set(bad)
    assert result["n_samples"] == len(GOOD_IDS)
    assert "## Inputs skipped" in (out / report.REPORT_NAME).read_text()
    assert not _leftovers(out)


def test_duplicate_ids_in_a_csv_are_skipped(
    ckpt: Path, odd_folder: tuple[Path, dict[str, str]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = odd_folder
    listing = tmp_path / "list.csv"
    good = [folder / f"good-{k}.wav" for k in ("mixed", "ref", "target")]
    listing.write_text("mix,ref,target,id\n" + "\n".join(
        ",".join([*map(str, good), sample_id]) for sample_id in ("a", "b", "a")) + "\n")
    out = tmp_path / "out"
    evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--csv", str(listing),
                          "--metrics", "core", "--jobs", "0"])
    assert list(_rows(out / report.CSV_NAME)) == ["a", "b"]
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "skipped" in x]
    assert f"{listing}:4: duplicate ID 'a' (first on line 2" in line


@pytest.mark.parametrize("sample_id", ["nan", "junk", "silent"])
def test_strict_stops_at_the_first_bad_sample(
    ckpt: Path, odd_folder: tuple[Path, dict[str, str]], tmp_path: Path, sample_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, bad = odd_folder
    one = _only(folder, sample_id, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--triplets", str(one),
                       "--metrics", "core", "--jobs", "0", "--strict"])
    assert exc.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("evaluate.py: error: ")
    assert bad[sample_id].split(": ", 1)[1] in line
    assert not (out / report.CSV_NAME).exists()
    assert not (out / report.SUMMARY_NAME).exists()


def test_nothing_scored_exits_non_zero(
    ckpt: Path, odd_folder: tuple[Path, dict[str, str]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = odd_folder
    one = _only(folder, "nan", tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--triplets", str(one),
                       "--metrics", "core", "--jobs", "0"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("evaluate.py: skipped nan: ")
    assert err[-1] == "evaluate.py: error: no sample could be scored (1 skipped, see above)"
    assert not (out / report.CSV_NAME).exists()
    assert not _leftovers(out) if out.exists() else True


# ---------------------------------------------------------------------------------------------
# A metric that crashes or hangs
# ---------------------------------------------------------------------------------------------

# Loaded by every Python process whose PYTHONPATH starts with its folder, so by the spawned
# metric workers of the evaluation under test: PESQ of a target of CRASH_SAMPLES samples dies
# (CRASH_MODE segv or abrt) or never returns (hang), as the pesq C code does on long input.
CRASHING_PESQ = '''
import os, signal, time
import evaluation.scoring as scoring

_pesq = scoring.pesq


def pesq(estimate, target, *args, **kwargs):
    if len(target) == int(os.environ["CRASH_SAMPLES"]):
        mode = os.environ["CRASH_MODE"]
        if mode == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif mode == "abrt":
            os.abort()
        time.sleep(3600)
    return _pesq(estimate, target, *args, **kwargs)


scoring.pesq = pesq
'''
CRASH_SECONDS = 1.5


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "jobs", "reason"), [
    ("segv", 1, "pesq: crashed (signal 11, SIGSEGV)"),
    ("abrt", 0, "pesq: crashed (signal 6, SIGABRT)"),
    ("hang", 1, "pesq: timed out after 8 s"),
])
def test_a_crashing_metric_costs_that_metric_on_that_row(
    ckpt: Path, voices: tuple[np.ndarray, np.ndarray], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, mode: str, jobs: int, reason: str,
) -> None:
    folder = tmp_path / "triplets"
    _triplet(folder, "a", voices, SECONDS)
    _triplet(folder, "b", voices, CRASH_SECONDS)
    _triplet(folder, "c", voices, SECONDS + 0.1)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_PESQ)
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{REPO}")
    monkeypatch.setenv("CRASH_SAMPLES", str(round(CRASH_SECONDS * SR)))
    monkeypatch.setenv("CRASH_MODE", mode)
    out = tmp_path / "out"
    summary = evaluate.main([
        "--ckpt", str(ckpt), "--out-dir", str(out), "--triplets", str(folder),
        "--metrics", "core", "--jobs", str(jobs), "--metric-timeout", "8"])
    rows = _rows(out / report.CSV_NAME)
    assert list(rows) == ["a", "b", "c"]
    assert rows["b"]["pesq"] == ""
    assert rows["b"]["notes"] == reason
    for name in ("si_sdri", "stoi", "estoi", "lsd_hb"):
        assert math.isfinite(float(rows["b"][name])), name
    for sample_id in ("a", "c"):
        assert math.isfinite(float(rows[sample_id]["pesq"]))
        assert rows[sample_id]["notes"] == ""
    assert summary["metric_failures"] == {"n_items": 1, "reasons": {reason: 1}}
    assert summary["metrics"]["pesq"]["n"] == 2
    assert not _leftovers(out)


def test_an_exception_in_a_metric_costs_that_metric(
    ckpt: Path, voices: tuple[np.ndarray, np.ndarray], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A metric library that raises (not crashes): its unit is NaN with the error as a note."""
    import evaluation.scoring as scoring

    def broken(*args: object) -> dict:
        raise ValueError("no band\nat all")

    monkeypatch.setitem(scoring.UNITS, "lsd", scoring.Unit("lsd", "core", broken))
    folder = tmp_path / "triplets"
    _triplet(folder, "a", voices, SECONDS)
    out = tmp_path / "out"
    summary = evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--triplets",
                             str(folder), "--metrics", "core", "--jobs", "0"])
    (row,) = _rows(out / report.CSV_NAME).values()
    assert row["notes"] == "lsd: ValueError: no band at all"
    assert row["lsd_hb"] == ""
    assert math.isfinite(float(row["si_sdri"]))
    assert math.isfinite(float(row["pesq"]))
    assert summary["metric_failures"]["n_items"] == 1


def test_transcripts_of_a_skipped_sample_are_not_an_error(
    ckpt: Path, odd_folder: tuple[Path, dict[str, str]], tmp_path: Path,
) -> None:
    folder, _ = odd_folder
    text = tmp_path / "text"
    text.write_text("good kids are talking by the door\nnan dogs are sitting by the door\n")
    out = tmp_path / "out"
    summary = evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--triplets",
                             str(folder), "--metrics", "core", "--jobs", "0",
                             "--transcripts", str(text)])
    assert summary["n_samples"] == len(GOOD_IDS)


# ---------------------------------------------------------------------------------------------
# Killed and resumed
# ---------------------------------------------------------------------------------------------

N_RESUME = 12


@pytest.mark.slow
def test_killed_run_resumes_each_id_once(
    ckpt: Path, voices: tuple[np.ndarray, np.ndarray], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "triplets"
    for i in range(N_RESUME):
        _triplet(folder, f"s{i:02d}", voices, SECONDS, offset=0.3 + 1.7 * i)
    # Two workers: rows finish out of order, and the CSV still ends in source order.
    argv = ["--ckpt", str(ckpt), "--triplets", str(folder), "--metrics", "core", "--jobs", "2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), *argv,
                             "--out-dir", str(killed)], cwd=REPO, env=env,
                            start_new_session=True, stderr=subprocess.DEVNULL)
    csv_path = killed / report.CSV_NAME
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 1 + 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _rows(csv_path)
    assert 3 <= len(kept) < N_RESUME, len(kept)
    assert not (killed / report.SUMMARY_NAME).exists()
    # A kill in the middle of a line: the cut row is dropped and its ID scored again.
    with csv_path.open("a") as f:
        f.write("s11,TP,,,,1.2000")
    # Other settings are refused, and touch nothing.
    before = csv_path.read_text()
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--out-dir", str(killed), "--si-sdr", "torchmetrics"])
    assert "holds an evaluation with other settings (si_sdr: 'zero-mean' there, " \
           "'torchmetrics' now)" in capsys.readouterr().err
    assert csv_path.read_text() == before

    import evaluation.runner as runner

    loaded: list[str] = []
    load = runner.load_sample

    def counting_load(source, settings):
        loaded.append(source.id)
        return load(source, settings)

    monkeypatch.setattr(runner, "load_sample", counting_load)
    resumed = evaluate.main([*argv, "--out-dir", str(killed)])
    assert sorted(loaded) == sorted({f"s{i:02d}" for i in range(N_RESUME)} - set(kept))
    monkeypatch.setattr(runner, "load_sample", load)
    whole = tmp_path / "whole"
    uninterrupted = evaluate.main([*argv, "--out-dir", str(whole)])
    assert (killed / report.CSV_NAME).read_text() == (whole / report.CSV_NAME).read_text()
    assert resumed == uninterrupted
    assert json.loads((killed / report.SUMMARY_NAME).read_text()) == json.loads(
        (whole / report.SUMMARY_NAME).read_text())
    # A finished folder: only the samples skipped before (silent stretches of the tiled
    # voices: a silent target) are tried again, and the same summary is written.
    skipped = sorted(k["id"] for k in uninterrupted["skipped"])
    assert len(uninterrupted["skipped"]) + uninterrupted["n_samples"] == N_RESUME
    loaded.clear()
    monkeypatch.setattr(runner, "load_sample", counting_load)
    assert evaluate.main([*argv, "--out-dir", str(killed)]) == uninterrupted
    assert sorted(loaded) == skipped


# ---------------------------------------------------------------------------------------------
# A long recording
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_minute_triplet_through_the_default_metrics(
    ckpt: Path, voices: tuple[np.ndarray, np.ndarray], tmp_path: Path,
) -> None:
    """PESQ crashed on a few minutes; now it is scored on 60 s segments, and every default
    metric gives a value."""
    folder = tmp_path / "long"
    folder.mkdir()
    n = 180 * SR
    target = np.tile(voices[0], math.ceil(n / len(voices[0])))[:n]
    other = np.roll(np.tile(voices[1], math.ceil(n / len(voices[1])))[:n], SR // 3)
    _write(folder / "long-mixed.wav", target + 0.7 * other)
    _write(folder / "long-target.wav", target)
    _write(folder / "long-ref.wav", voices[0][-3 * SR :])
    out = tmp_path / "out"
    summary = evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--triplets",
                                    str(folder), "--jobs", "1"])  # eval.metrics' defaults
    (row,) = _rows(out / report.CSV_NAME).values()
    assert row["notes"] == ""
    assert float(row["seconds"]) == pytest.approx(180.0)
    for name in ("si_sdri", "pesq", "stoi", "estoi", "lsd_hb", "spk_sim_ref", "spk_sim_target"):
        assert math.isfinite(float(row[name])), name
    assert "pesq" in summary["settings"]["long_inputs"]
