"""inference.py: the three modes, formats and rates, lengths, windowed streaming against one pass,
the in-memory entry point against the file one, bounded buffering and reference cache, refused
voiceless references, one-line errors without leftovers, and refused pickles."""

from __future__ import annotations

import itertools
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from config import load_config, model_kwargs
from dsp.audio import (
    SAMPLE_RATE,
    AudioError,
    fit_length,
    load_audio,
    resample_stream,
    resampled_length,
)
from extraction.extractor import Extractor, InferenceError, Job
from extraction.reference import MIN_REF_PEAK_DBFS, REF_FRAME_SECONDS, check_reference
from extraction.windows import overlap_add, plan_windows
from inference import main
from models.layers.conditioning import pool_references
from models.registry import build_model, checkpoint_payload, load_model

REPO = Path(__file__).resolve().parents[1]
RAVDESS = "speech/ravdess"
FRAME = SAMPLE_RATE // 50  # 20 ms level frames
# The extractor sums the level in float64, the generator in float32: one ulp apart, which the
# untrained tiny network turns into ~1e-4 relative differences (93 dB SNR on the test file).
# A wrong scale, a seam or a lost tail is tens of dB worse.
SAME_AS_FORWARD_SNR_DB = 80.0


def tiny_checkpoint(path: Path, *, seed: int = 0, ema_seed: int | None = None) -> Path:
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(seed)
    model = build_model(model_kwargs(cfg))
    ema = None
    if ema_seed is not None:
        torch.manual_seed(ema_seed)
        ema = build_model(model_kwargs(cfg)).state_dict()
    torch.save(checkpoint_payload(model, model_kwargs(cfg)) | {"ema": ema}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def audio(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real recordings in odd formats, cropped so that the tiny model runs in a fraction of a
    second per file."""
    root = tmp_path_factory.mktemp("audio")
    speech = sorted((shared_data / RAVDESS / "Actor_02").glob("*.flac"))
    other = sorted((shared_data / RAVDESS / "Actor_03").glob("*.flac"))
    files = {
        "ref": speech[10],  # 48 kHz 16-bit FLAC, ~3.5 s
        "stereo_44k_24bit": shared_data / "rir" / "auralizr_st.wav",  # 3 s
        "short_ref": shared_data / "rir" / "auralizr_s1.wav",  # 0.7 s
    }
    # A real mixture: target + interferer + tap noise, 1.5 s, 48 kHz float.
    target, interferer = load_audio(speech[0]), load_audio(other[0])
    noise = load_audio(shared_data / "noise" / "running_tap.flac")
    n = round(1.5 * SAMPLE_RATE)
    mix = target[:n] + 0.7 * interferer[:n] + 0.1 * noise[:n] * target.std() / noise.std()
    files["mix"] = root / "mix.wav"
    sf.write(files["mix"], mix, SAMPLE_RATE, subtype="FLOAT")
    # 16 kHz 16-bit FLAC of an odd length (the noise recording, cropped).
    noise_16k, sr = sf.read(shared_data / "noise" / "running_tap.flac", frames=2 * 16_000 + 7)
    assert sr == 16_000
    files["noise_16k"] = root / "noise_16k.flac"
    sf.write(files["noise_16k"], noise_16k, sr, subtype="PCM_16")
    return files


def run_cli(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Windows, cross-fades, streaming
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "window", "overlap", "block"),
    [(1000, 300, 50, 77), (1000, 300, 0, 1000), (299, 300, 50, 10), (301, 300, 50, 300),
     (12_345, 1000, 250, 333)],
)
def test_overlap_add_of_identity_is_exact(n: int, window: int, overlap: int, block: int) -> None:
    """The cross-fade gains sum to one: no level change at any seam, no lost or muted tail."""
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    blocks = (x[i : i + block] for i in range(0, n, block))
    seen: list[int] = []

    def identity(seg: np.ndarray) -> np.ndarray:
        seen.append(seg.shape[0])
        return seg.copy()

    y = np.concatenate(list(overlap_add(blocks, n, identity, window=window, overlap=overlap)))
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-6)
    assert max(seen) == min(window, n), "every window is full length, the last one too"


def test_windows_cover_everything_and_overlap() -> None:
    for n in (1, 299, 300, 301, 1000, 4321):
        plan = plan_windows(n, 300, 60)
        assert plan[0][0] == 0
        assert plan[-1][1] == n
        for (s0, e0), (s1, _) in itertools.pairwise(plan):
            assert s1 < s0 + 300
            assert e0 - s1 >= 60, "neighbours overlap by at least the cross-fade"


def test_overlap_add_streams_in_bounded_memory() -> None:
    """The first output leaves before more than one window of input has been read."""
    block, window, overlap = 100, 1000, 200
    pulled = 0

    def source():
        nonlocal pulled
        for _ in range(10_000):  # 1 M samples
            pulled += 1
            yield np.ones(block, dtype=np.float32)

    stream = overlap_add(source(), 10_000 * block, lambda s: s, window=window, overlap=overlap)
    next(stream)
    assert pulled * block <= window + block
    total = sum(chunk.shape[0] for chunk in stream) + window - overlap
    assert total == 10_000 * block


def test_resampled_length_matches_soxr() -> None:
    for sr_in, n in ((44_100, 132_301), (16_000, 32_007), (22_050, 1), (96_000, 96_001)):
        blocks = resample_stream([np.zeros(n, np.float32)], sr_in, SAMPLE_RATE)
        assert sum(b.shape[0] for b in blocks) == resampled_length(n, sr_in, SAMPLE_RATE)
    assert sum(b.shape[0] for b in fit_length([np.ones(5, np.float32)] * 3, 12)) == 12


# ---------------------------------------------------------------------------------------------
# The three modes, rates and lengths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_sr", [False, True])
@pytest.mark.parametrize("name", ["stereo_44k_24bit", "noise_16k"])
def test_single_file_rate_and_length(
    ckpt: Path,
    audio: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    keep_sr: bool,
) -> None:
    out = tmp_path / "out.wav"
    args = ["--ckpt", ckpt, "--mix", audio[name], "--ref", audio["ref"], "-o", out]
    code, stdout, _ = run_cli([*args, "--keep-sr"] if keep_sr else args, capsys)
    assert code == 0
    assert "RTF" in stdout
    info_in, info_out = sf.info(audio[name]), sf.info(out)
    sr_out = info_in.samplerate if keep_sr else SAMPLE_RATE
    assert info_out.samplerate == sr_out
    assert info_out.channels == 1
    assert info_out.frames == resampled_length(info_in.frames, info_in.samplerate, sr_out)
    est, mix = sf.read(out)[0], load_audio(audio[name], sr=None)
    assert np.isfinite(est).all()
    last_in, last_out = mix[-info_in.samplerate :], est[-sr_out:]
    assert np.mean(last_in**2) > 0
    assert np.mean(last_out**2) > 0, "the last second is not muted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"], "no temporary files left"


def test_folder_mode_triplet_naming(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "triplets"
    folder.mkdir()
    shutil.copy(audio["mix"], folder / "a-mixed.wav")
    shutil.copy(audio["ref"], folder / "a-ref.flac")
    shutil.copy(audio["mix"], folder / "a-target.wav")  # ignored: not a mixture
    shutil.copy(audio["noise_16k"], folder / "b-mixed.flac")
    shutil.copy(audio["ref"], folder / "b-ref.flac")
    out_dir = tmp_path / "out"
    code, stdout, _ = run_cli(
        ["--ckpt", ckpt, "--mix-dir", folder, "--ref-dir", folder, "--out-dir", out_dir], capsys
    )
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["a-extracted.wav", "b-extracted.wav"]
    assert stdout.count("RTF") == 2
    assert sf.info(out_dir / "b-extracted.wav").frames == resampled_length(
        2 * 16_000 + 7, 16_000, SAMPLE_RATE
    )


def test_folder_mode_same_name_and_unpaired(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixes, refs, out_dir = tmp_path / "mixes", tmp_path / "refs", tmp_path / "out"
    mixes.mkdir()
    refs.mkdir()
    shutil.copy(audio["mix"], mixes / "talk.wav")
    shutil.copy(audio["ref"], refs / "talk.flac")  # same stem, other extension
    shutil.copy(audio["mix"], mixes / "lonely.wav")  # no reference
    code, _, err = run_cli(
        ["--ckpt", ckpt, "--mix-dir", mixes, "--ref-dir", refs, "--out-dir", out_dir], capsys
    )
    assert code == 1, "a mixture without a reference fails the run"
    assert err.strip() == f"error: {mixes / 'lonely.wav'}: no reference named lonely.* in {refs}"
    assert sorted(p.name for p in out_dir.iterdir()) == ["talk.wav"], "the others still run"


def test_folder_mode_one_reference_for_all(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixes, out_dir = tmp_path / "mixes", tmp_path / "out"
    mixes.mkdir()
    shutil.copy(audio["mix"], mixes / "one.wav")
    shutil.copy(audio["noise_16k"], mixes / "two.flac")
    (mixes / "notes.txt").write_text("not audio")
    code, _, _ = run_cli(
        ["--ckpt", ckpt, "--mix-dir", mixes, "--ref", audio["ref"], "--out-dir", out_dir], capsys
    )
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["one.wav", "two.wav"]


def test_csv_mode(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(audio["mix"], tmp_path / "m.wav")
    rows = ["mix,ref,out", f"m.wav,{audio['ref']},out/first.wav",
            f"{audio['noise_16k']},{audio['ref']},out/second.flac"]
    (tmp_path / "jobs.csv").write_text("\n".join(rows) + "\n")
    code, stdout, _ = run_cli(["--ckpt", ckpt, "--list", tmp_path / "jobs.csv"], capsys)
    assert code == 0
    assert stdout.count("RTF") == 2
    assert sf.info(tmp_path / "out" / "first.wav").frames == round(1.5 * SAMPLE_RATE)
    assert sf.info(tmp_path / "out" / "second.flac").format == "FLAC"


def test_folder_mode_voiceless_reference_fails_its_pair_only(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, out_dir = tmp_path / "triplets", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(audio["mix"], folder / f"{name}-mixed.wav")
    sf.write(folder / "a-ref.wav", np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    shutil.copy(audio["ref"], folder / "b-ref.flac")
    code, stdout, err = run_cli(
        ["--ckpt", ckpt, "--mix-dir", folder, "--ref-dir", folder, "--out-dir", out_dir], capsys
    )
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {folder / 'a-ref.wav'}: no voice in the reference (")
    assert stdout.count("RTF") == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["b-extracted.wav"]


def test_csv_without_columns_is_one_line_error(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "jobs.csv"
    bad.write_text("mixture,reference\na.wav,b.wav\n")
    code, _, err = run_cli(["--ckpt", ckpt, "--list", bad], capsys)
    assert code == 1
    assert err.strip() == f"error: {bad}: missing column(s) mix, ref, out"


# ---------------------------------------------------------------------------------------------
# Windowed processing against one pass
# ---------------------------------------------------------------------------------------------


def levels_db(x: np.ndarray) -> np.ndarray:
    frames = x[: x.shape[0] // FRAME * FRAME].reshape(-1, FRAME)  # (n_frames, FRAME)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)


def snr_db(estimate: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((estimate - reference) ** 2)))


def test_one_window_equals_forward(ckpt: Path, audio: dict[str, Path], tmp_path: Path) -> None:
    """From a file and from memory, a recording that fits in one window comes out as
    ``Generator.forward`` makes it (up to the last bit of the scale)."""
    model = load_model(ckpt)
    out = tmp_path / "out.wav"
    extractor = Extractor(model)
    extractor.run(Job(mix=audio["stereo_44k_24bit"], ref=audio["ref"], out=out))
    mix, ref = load_audio(audio["stereo_44k_24bit"]), load_audio(audio["ref"])
    with torch.inference_mode():
        expected = model(torch.from_numpy(mix)[None], torch.from_numpy(ref)[None])[0].numpy()
    from_file, sr = sf.read(out, dtype="float32")
    assert sr == SAMPLE_RATE
    from_memory = extractor.extract_array(mix, ref)
    for got in (from_file, from_memory):
        assert got.shape == expected.shape
        assert snr_db(got, expected) > SAME_AS_FORWARD_SNR_DB


def test_extract_array_is_run_in_memory(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path
) -> None:
    """The same windows, cross-fades and level from memory as from a file: the same bits."""
    extractor = Extractor(load_model(ckpt), window_seconds=0.5, overlap_seconds=0.125)
    job = Job(mix=audio["mix"], ref=audio["ref"], out=tmp_path / "out.wav")  # 1.5 s: 4 windows
    extractor.run(job)
    from_file, _ = sf.read(job.out, dtype="float32")
    from_memory = extractor.extract_array(load_audio(audio["mix"]), load_audio(audio["ref"]))
    assert from_memory.dtype == np.float32
    np.testing.assert_array_equal(from_memory, from_file)


def test_several_references_are_pooled(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ref`` twice: the model gets both references pooled (encode_references); the same
    file given three times is that file alone."""
    model = load_model(ckpt).eval()
    mix = load_audio(audio["mix"])
    ref, other = load_audio(audio["ref"]), load_audio(audio["stereo_44k_24bit"])
    out = tmp_path / "two.wav"
    code, _, err = run_cli(["--ckpt", ckpt, "--mix", audio["mix"], "--ref", audio["ref"],
                            "--ref", audio["stereo_44k_24bit"], "-o", out], capsys)
    assert code == 0, err
    # References of different lengths: each encoded alone, then pooled.
    with torch.inference_mode():
        one_by_one = pool_references([model.encode_reference(torch.from_numpy(r)[None])
                                      for r in (ref, other)])
        expected = model.extract(torch.from_numpy(mix)[None], one_by_one)[0].numpy()
    got, _ = sf.read(out, dtype="float32")
    assert snr_db(got, expected) > SAME_AS_FORWARD_SNR_DB
    alone = Extractor(model).extract_array(mix, ref)
    thrice = Extractor(model).extract_array(mix, ref, extra_refs=[ref, ref])
    assert snr_db(thrice, alone) > SAME_AS_FORWARD_SNR_DB
    assert snr_db(got, alone) < SAME_AS_FORWARD_SNR_DB  # the second reference counts


@pytest.mark.slow
def test_windows_match_one_pass_without_level_jumps(
    ckpt: Path, shared_data: Path, tmp_path: Path
) -> None:
    """9.5 s of real speech + interferer + noise in 3 s windows (1 s cross-fades, a longer last
    overlap) against the same model on the whole recording at once."""
    speech = sorted((shared_data / RAVDESS / "Actor_02").glob("*.flac"))
    other = sorted((shared_data / RAVDESS / "Actor_03").glob("*.flac"))
    n = round(9.5 * SAMPLE_RATE)
    target = np.concatenate([load_audio(p) for p in speech[:3]])[:n]
    interferer = np.concatenate([load_audio(p) for p in other[:3]])[:n]
    noise = load_audio(shared_data / "noise" / "doing_the_dishes.flac")[:n]
    mix = target + 0.7 * interferer + 0.1 * noise * target.std() / noise.std()
    sf.write(tmp_path / "long.wav", mix, SAMPLE_RATE, subtype="FLOAT")
    model = load_model(ckpt)
    job = Job(mix=tmp_path / "long.wav", ref=speech[10], out=tmp_path / "one.wav")
    Extractor(model, window_seconds=10.0).run(job)
    job.out = tmp_path / "windows.wav"
    Extractor(model, window_seconds=3.0, overlap_seconds=1.0).run(job)
    one, _ = sf.read(tmp_path / "one.wav", dtype="float32")
    win, _ = sf.read(tmp_path / "windows.wav", dtype="float32")

    assert win.shape == one.shape == (n,)
    snr = 10 * np.log10(np.sum(one**2) / np.sum((one - win) ** 2))
    assert snr > 15.0, f"windowed output only {snr:.1f} dB from the one-pass output"
    # Same level as the one-pass output in every 20 ms frame, seams included.
    diff = levels_db(win) - levels_db(one)
    assert np.abs(diff).max() < 1.5
    seams = [b // FRAME for s, e in plan_windows(n, 3 * SAMPLE_RATE, SAMPLE_RATE) for b in (s, e)]
    seam_jumps = [abs(diff[i] - diff[i - 1]) for i in seams if 0 < i < diff.shape[0]]
    assert max(seam_jumps) < 0.5, "no level jump where a window starts or ends"
    # The tail is there: the last second carries the one-pass output's energy.
    last = slice(-SAMPLE_RATE, None)
    assert np.mean(mix[last] ** 2) > 0
    assert np.mean(win[last] ** 2) > 0.5 * np.mean(one[last] ** 2) > 0


def test_failure_mid_stream_leaves_nothing(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(ckpt)
    calls = 0
    extract = model.extract

    def broken(mix: torch.Tensor, z_ref: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        est = extract(mix, z_ref, scale)
        return est * float("nan") if calls == 2 else est

    monkeypatch.setattr(model, "extract", broken)
    extractor = Extractor(model, window_seconds=1.0, overlap_seconds=0.25)
    with pytest.raises(InferenceError, match="non-finite"):
        extractor.run(Job(mix=audio["mix"], ref=audio["ref"], out=tmp_path / "out.wav"))
    assert calls == 2, "the first window was already written when the second failed"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Checkpoints, devices
# ---------------------------------------------------------------------------------------------


def test_ema_weights_unless_no_ema(tmp_path: Path) -> None:
    path = tiny_checkpoint(tmp_path / "ema.pt", seed=0, ema_seed=1)
    saved = torch.load(path, weights_only=True)
    name = next(k for k, v in saved["generator"].items() if not torch.equal(v, saved["ema"][k]))
    ema = load_model(path).state_dict()[name]
    raw = load_model(path, use_ema=False).state_dict()[name]
    torch.testing.assert_close(ema, saved["ema"][name])
    torch.testing.assert_close(raw, saved["generator"][name])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_error(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--ckpt", ckpt, "--mix", audio["mix"], "--ref", audio["ref"], "-o", tmp_path / "o.wav"]
    code, _, err = run_cli([*args, "--device", "cuda"], capsys)
    assert code == 1
    assert err.strip() == "error: --device cuda: CUDA is not available on this machine"
    assert list(tmp_path.iterdir()) == []


def test_reference_cache_keeps_the_most_recently_used(
    ckpt: Path, audio: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --ref-dir run keeps ``ref_cache_size`` embeddings, not one per reference it met."""
    refs = [tmp_path / f"ref{i}.flac" for i in range(4)]
    for ref in refs:
        shutil.copy(audio["ref"], ref)
    model = load_model(ckpt)
    encoded: list[int] = []
    encode = model.encode_reference

    def counted(ref: torch.Tensor) -> torch.Tensor:
        encoded.append(ref.shape[-1])
        return encode(ref)

    monkeypatch.setattr(model, "encode_reference", counted)
    extractor = Extractor(model, ref_cache_size=2)
    first = extractor.reference(refs[0])
    extractor.reference(refs[1])
    assert extractor.reference(refs[0]) is first, "a hit is not recomputed"
    extractor.reference(refs[2])  # drops refs[1], used less recently than refs[0]
    assert list(extractor._refs) == [refs[0], refs[2]]
    extractor.reference(refs[3])  # more distinct references than the cache holds
    assert len(extractor._refs) == 2
    assert len(encoded) == 4
    extractor.reference(refs[3])
    assert len(encoded) == 4, "the most recently used reference is still cached"
    extractor.reference(refs[1])
    assert len(encoded) == 5, "a dropped one is computed again"


def test_half_on_cpu_warns_and_runs_fp32(ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        extractor = Extractor(load_model(ckpt), device="cpu", half=True)
    assert extractor.amp_dtype is None
    assert "--half needs a CUDA device" in caplog.text


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit code 1, no output
# ---------------------------------------------------------------------------------------------


class Bomb:
    """Would touch ``marker`` if anything ever unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, str]) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


def make_bad(kind: str, tmp: Path, audio: dict[str, Path], ckpt: Path) -> dict[str, Path]:
    """Arguments with one bad input; ``bad`` is the file the error must name."""
    args = {"ckpt": ckpt, "mix": audio["mix"], "ref": audio["ref"]}
    bad = tmp / "bad.wav"
    if kind == "missing mix":
        args["mix"] = bad
    elif kind == "missing ref":
        args["ref"] = bad
    elif kind == "unreadable mix":
        bad.write_text("this is not audio")
        args["mix"] = bad
    elif kind == "empty mix":
        sf.write(bad, np.zeros(0, np.float32), SAMPLE_RATE)
        args["mix"] = bad
    elif kind == "non-finite mix":
        wave = load_audio(audio["mix"])
        wave[len(wave) // 2] = np.nan
        sf.write(bad, wave, SAMPLE_RATE, subtype="FLOAT")
        args["mix"] = bad
    elif kind == "non-finite ref":
        wave = load_audio(audio["ref"])
        wave[-1] = np.inf
        sf.write(bad, wave, SAMPLE_RATE, subtype="FLOAT")
        args["ref"] = bad
    elif kind == "short ref":
        bad = args["ref"] = audio["short_ref"]
    elif kind == "silent ref":
        sf.write(bad, np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
        args["ref"] = bad
    elif kind == "dither ref":  # 16-bit dither and nothing else: no voice
        sf.write(bad, dither(2 * SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
        args["ref"] = bad
    elif kind == "missing ckpt":
        bad = args["ckpt"] = tmp / "none.pt"
    elif kind == "junk ckpt":
        bad = args["ckpt"] = tmp / "junk.pt"
        bad.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "foreign ckpt":
        bad = args["ckpt"] = tmp / "foreign.pt"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    elif kind == "bad model_args":
        bad = args["ckpt"] = tmp / "args.pt"
        torch.save({"model_args": {"no_such_arg": 1}, "generator": {}}, bad)
    elif kind == "pickle bomb":
        bad = args["ckpt"] = tmp / "bomb.pt"
        torch.save({"model_args": {}, "generator": Bomb(tmp / "unpickled")}, bad)
    return {**args, "bad": bad}


BAD_KINDS = [
    "missing mix", "missing ref", "unreadable mix", "empty mix", "non-finite mix",
    "non-finite ref", "short ref", "silent ref", "dither ref", "missing ckpt", "junk ckpt",
    "foreign ckpt", "bad model_args", "pickle bomb",
]


def dither(n: int) -> np.ndarray:
    """Triangular dither of one 16-bit step: what a silent 16-bit recording holds."""
    rng = np.random.default_rng(0)
    return ((rng.random(n) - rng.random(n)) / 2**15).astype(np.float32)


def scaled_to_loudest_frame(wave: np.ndarray, dbfs: float) -> np.ndarray:
    """``wave`` scaled so that its loudest ``REF_FRAME_SECONDS`` frame is at ``dbfs`` RMS."""
    frame = round(REF_FRAME_SECONDS * SAMPLE_RATE)
    frames = wave[: wave.shape[0] // frame * frame].reshape(-1, frame)  # (n_frames, frame)
    loudest = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1).max())
    return (wave * 10 ** (dbfs / 20) / loudest).astype(np.float32)


def test_voiceless_references_are_refused(audio: dict[str, Path]) -> None:
    """The rule: the loudest 100 ms decides, not the level of the whole file."""
    speech = load_audio(audio["ref"])
    check_reference(scaled_to_loudest_frame(speech, MIN_REF_PEAK_DBFS + 5), SAMPLE_RATE, "soft")
    # A soft voice in 30 s of silence: under -60 dBFS over the whole file, and still a voice.
    sparse = np.zeros(30 * SAMPLE_RATE, np.float32)
    sparse[: speech.shape[0]] = scaled_to_loudest_frame(speech, MIN_REF_PEAK_DBFS + 10)
    assert 10 * np.log10(np.mean(sparse.astype(np.float64) ** 2)) < MIN_REF_PEAK_DBFS
    check_reference(sparse, SAMPLE_RATE, "sparse")
    refused = {
        "silence": np.zeros(2 * SAMPLE_RATE, np.float32),
        "dither": dither(2 * SAMPLE_RATE),
        "whisper": scaled_to_loudest_frame(speech, MIN_REF_PEAK_DBFS - 5),
    }
    for name, wave in refused.items():
        with pytest.raises(AudioError, match=rf"^{name}: no voice in the reference \(") as err:
            check_reference(wave, SAMPLE_RATE, name)
        assert "the target cannot be identified from it" in str(err.value)
    with pytest.raises(AudioError, match="digital silence"):
        check_reference(refused["silence"], SAMPLE_RATE, "silence")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_one_line_error_and_no_output(
    kind: str,
    ckpt: Path,
    audio: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = make_bad(kind, tmp_path, audio, ckpt)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cli = ["--ckpt", args["ckpt"], "--mix", args["mix"], "--ref", args["ref"]]
    code, stdout, err = run_cli([*cli, "-o", out_dir / "out.wav"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {args['bad']}: "), lines[0]
    assert stdout == ""
    assert list(out_dir.iterdir()) == [], "no output and no temporary file"
    assert not (tmp_path / "unpickled").exists(), "the checkpoint was never unpickled"


@pytest.mark.slow
def test_cli_exit_code_and_pickle_refusal(
    audio: dict[str, Path], ckpt: Path, tmp_path: Path
) -> None:
    """The real command line: a pickled object in a checkpoint is refused, exit code 1."""
    args = make_bad("pickle bomb", tmp_path, audio, ckpt)
    proc = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), "--ckpt", str(args["ckpt"]),
         "--mix", str(args["mix"]), "--ref", str(args["ref"]), "-o", str(tmp_path / "o.wav")],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {args['bad']}: not a HiFi-TSE checkpoint (it holds pickled")
    assert "Unsupported global" in line
    assert "Bomb" in line
    assert not (tmp_path / "o.wav").exists()
    assert not (tmp_path / "unpickled").exists()
