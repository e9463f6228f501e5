"""The model-based metrics of ``evaluation/`` on real recordings: speaker similarity (Resemblyzer),
DNSMOS P.835 (speechmos's models), word errors (PocketSphinx + jiwer), ViSQOL v3 audio mode.

Each model is loaded once per process (the modules cache them). The thresholds come from values
measured on these files, quoted beside each test, with a margin, so that a broken pipeline (wrong
rate, wrong level handling, a swapped model) fails them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from scipy.signal import butter, resample_poly, sosfiltfilt

from evaluation import asr, dnsmos, speaker_similarity, visqol

SR = 48_000
STATEMENTS = {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"}
# DNSMOS tiles a clip shorter than its 9.01 s window by doubling it: 4.6 s becomes 9.2 s, one
# window; RAVDESS's 3.7 s would become 14.8 s, five windows, five times the cost.
DNSMOS_SECONDS = 4.6
DNSMOS_LEVEL_DBFS = -25.0  # the DNS challenge's default clip level (see evaluation/dnsmos.py)


@pytest.fixture(autouse=True)
def one_torch_thread() -> None:
    """As in the evaluation's metric workers (and the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ravdess(data: Path, actor: int, statement: int = 1) -> np.ndarray:
    """A neutral RAVDESS sentence (emotion 01, intensity 01, repetition 01), float64 at 48 kHz,
    shape (T,), about 3.7 s."""
    name = f"03-01-01-01-{statement:02d}-01-{actor:02d}.flac"
    wave, sr = sf.read(data / "speech" / "ravdess" / f"Actor_{actor:02d}" / name, dtype="float64")
    assert sr == SR
    return wave


def noise(data: Path, name: str, n_samples: int) -> np.ndarray:
    """The first ``n_samples`` at 48 kHz of a 16 kHz noise recording, shape (n_samples,)."""
    wave, sr = sf.read(data / "noise" / f"{name}.flac", dtype="float64")
    return soxr.resample(wave, sr, SR)[:n_samples]


def fit(wave: np.ndarray, seconds: float) -> np.ndarray:
    """``wave`` cut or zero-padded to ``seconds`` at 48 kHz."""
    n = round(seconds * SR)
    return np.pad(wave[:n], (0, max(0, n - len(wave))))


def mix_at_snr(speech: np.ndarray, other: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech + g * other`` with g setting their energy ratio to ``snr_db`` (same length)."""
    other = other[: len(speech)]
    gain = math.sqrt(np.sum(speech**2) / (np.sum(other**2) * 10.0 ** (snr_db / 10.0)))
    return speech + gain * other


# ---------------------------------------------------------------- speaker similarity


def test_cosine_similarity_values() -> None:
    cos = speaker_similarity.cosine_similarity
    assert cos(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == 1.0
    assert cos(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == 0.0
    assert cos(np.array([1.0, 1.0]), np.array([-1.0, 0.0])) == pytest.approx(-1 / math.sqrt(2))
    assert math.isnan(cos(np.zeros(2), np.ones(2)))


def test_embedding_is_unit_norm_and_rate_independent(shared_data: Path) -> None:
    """Measured: cosine 0.9999994 between the 48 kHz sentence and its 16 kHz copy."""
    wave = ravdess(shared_data, 3)
    e48 = speaker_similarity.speaker_embedding(wave, SR)
    # scipy's polyphase filter, not soxr, makes the 16 kHz copy: the two inputs reach the
    # encoder through different resamplers.
    e16 = speaker_similarity.speaker_embedding(resample_poly(wave, 1, 3), 16_000)
    assert e48.shape == (speaker_similarity.EMBEDDING_DIM,)
    assert np.linalg.norm(e48) == pytest.approx(1.0, abs=1e-5)
    assert speaker_similarity.cosine_similarity(e48, e16) > 0.99


def test_embedding_is_gain_invariant(shared_data: Path) -> None:
    """The encoder reads a power mel spectrogram: fed unnormalised, a 30x louder copy of this
    sentence measured cosine 0.65 against the original, and 0.77 after Resemblyzer's own
    ``preprocess_wav`` (which only raises quiet signals); with the module's normalisation, 1.0."""
    wave = ravdess(shared_data, 4)  # peaks near -28 dBFS: 30x stays below full scale
    quiet = speaker_similarity.speaker_embedding(wave, SR)
    loud = speaker_similarity.speaker_embedding(30.0 * wave, SR)
    assert speaker_similarity.cosine_similarity(quiet, loud) > 0.999


def test_silent_input_gives_nan() -> None:
    e = speaker_similarity.speaker_embedding(np.zeros(SR), SR)
    assert e.shape == (speaker_similarity.EMBEDDING_DIM,)
    assert np.isnan(e).all()
    assert math.isnan(speaker_similarity.cosine_similarity(e, e))


def test_voiceless_input_is_embedded_whole(shared_data: Path) -> None:
    """The VAD keeps nothing of white noise or of a 1 kHz tone, so each is embedded whole. Were
    the empty trimmed signal embedded instead, both would get the same vector (measured: cosine
    0.43 between them; 0.45 between the noise and actor 1's sentence, where same-speaker pairs
    score 0.75-0.90)."""
    rng = np.random.default_rng(0)
    white = 0.01 * rng.standard_normal(2 * SR)
    tone = 0.01 * np.sin(2 * np.pi * 1000.0 * np.arange(2 * SR) / SR)
    e_white = speaker_similarity.speaker_embedding(white, SR)
    e_tone = speaker_similarity.speaker_embedding(tone, SR)
    voice = speaker_similarity.speaker_embedding(ravdess(shared_data, 1), SR)
    assert np.linalg.norm(e_white) == pytest.approx(1.0, abs=1e-5)
    assert speaker_similarity.cosine_similarity(e_white, e_tone) < 0.9
    assert speaker_similarity.cosine_similarity(e_white, voice) < 0.6


@pytest.mark.slow
def test_same_speaker_is_most_similar(shared_data: Path) -> None:
    """Sentence 1 of each of 8 actors (4 male, 4 female) against sentence 2 of all 8: different
    words, so only the voice makes the same-actor pair closest. Measured on actors 1-16: every
    actor identified; same-actor cosine 0.75-0.90 (mean 0.84), other actors 0.30-0.79 (mean
    0.54), each actor's best impostor 0.02-0.26 below the actor; on actors 1-8 the means are
    0.28 apart."""
    actors = range(1, 9)
    emb = {
        (a, s): speaker_similarity.speaker_embedding(ravdess(shared_data, a, s), SR)
        for a in actors
        for s in (1, 2)
    }
    sims = np.array(
        [
            [speaker_similarity.cosine_similarity(emb[a, 1], emb[b, 2]) for b in actors]
            for a in actors
        ]
    )
    same = np.diag(sims)
    others = sims[~np.eye(len(actors), dtype=bool)]
    assert (sims.argmax(axis=1) == np.arange(len(actors))).all()
    assert same.mean() - others.mean() > 0.15


# ---------------------------------------------------------------- DNSMOS


@pytest.mark.slow
@pytest.mark.parametrize("personalized", [False, True])
def test_dnsmos_equals_speechmos(shared_data: Path, personalized: bool) -> None:
    """The module's own ONNX sessions give exactly ``speechmos.dnsmos.run``'s scores."""
    from speechmos import dnsmos as reference  # imports librosa; only this test needs it

    # 5.5 s, doubled to 11 s: two windows, so the tiling and the hop are both exercised
    wave = soxr.resample(fit(ravdess(shared_data, 1), 5.5), SR, dnsmos.DNSMOS_SR)
    ours = dnsmos.dnsmos(wave, dnsmos.DNSMOS_SR, personalized=personalized)
    model_type = "dnsmos_personalized" if personalized else "dnsmos"
    theirs = reference.run(wave, dnsmos.DNSMOS_SR, model_type=model_type)
    for name in dnsmos.SCORES:
        assert ours[name] == pytest.approx(float(theirs[f"{name}_mos"]), abs=1e-9)


def test_dnsmos_scores_and_input_handling(shared_data: Path) -> None:
    wave = fit(ravdess(shared_data, 2), DNSMOS_SECONDS)
    scores = dnsmos.dnsmos(wave, SR, level_dbfs=DNSMOS_LEVEL_DBFS)
    assert set(scores) == {"sig", "bak", "ovrl"}
    assert all(1.0 <= v <= 5.0 for v in scores.values())
    # level_dbfs removes the gain...
    quieter = dnsmos.dnsmos(0.1 * wave, SR, level_dbfs=DNSMOS_LEVEL_DBFS)
    assert quieter == pytest.approx(scores, abs=1e-4)
    # ...which otherwise matters (measured: OVRL 2.75 at the file's level, 3.24 at -25 dBFS).
    assert dnsmos.dnsmos(wave, SR)["ovrl"] < scores["ovrl"] - 0.1
    # Beyond full scale: clipped, not refused.
    loud = 100.0 * wave
    assert dnsmos.dnsmos(loud, SR) == dnsmos.dnsmos(np.clip(loud, -1.0, 1.0), SR)
    with pytest.raises(ValueError, match="non-empty"):
        dnsmos.dnsmos(np.zeros(0), SR)


@pytest.mark.slow
def test_dnsmos_penalises_noise(shared_data: Path) -> None:
    """Speech against speech + running tap at 0 dB SNR, both at -25 dBFS. Measured on actors
    1-16: OVRL 1.13-1.72 lower, BAK 2.12-2.71 lower with the noise."""
    for actor in (1, 2):
        speech = fit(ravdess(shared_data, actor), DNSMOS_SECONDS)
        noisy = mix_at_snr(speech, noise(shared_data, "running_tap", len(speech)), 0.0)
        clean_scores = dnsmos.dnsmos(speech, SR, level_dbfs=DNSMOS_LEVEL_DBFS)
        noisy_scores = dnsmos.dnsmos(noisy, SR, level_dbfs=DNSMOS_LEVEL_DBFS)
        assert noisy_scores["ovrl"] < clean_scores["ovrl"] - 0.7
        assert noisy_scores["bak"] < clean_scores["bak"] - 1.0


@pytest.mark.slow
def test_personalized_dnsmos_penalises_interfering_talker(shared_data: Path) -> None:
    """Speech against speech + another actor's sentence 5 dB below it, both at -25 dBFS.
    Measured on these three pairs: personalized BAK 0.67-1.98 lower, OVRL 0.83-1.19 lower,
    while plain DNSMOS, which takes the interferer for speech, lost 0.07-0.33 BAK. Not every
    pair is caught: over 8 pairs the personalized BAK drop ranged 0.02-2.16, and for actors 1
    and 2 (drop 0.02) the personalized OVRL even rose by 0.23."""
    for target, interferer in ((3, 4), (6, 8), (15, 16)):
        speech = fit(ravdess(shared_data, target, 1), DNSMOS_SECONDS)
        mixture = mix_at_snr(speech, fit(ravdess(shared_data, interferer, 2), DNSMOS_SECONDS), 5.0)
        scores = {
            (name, personalized): dnsmos.dnsmos(
                x, SR, personalized=personalized, level_dbfs=DNSMOS_LEVEL_DBFS
            )
            for name, x in (("clean", speech), ("mixture", mixture))
            for personalized in (False, True)
        }
        drop = {
            (p, k): scores["clean", p][k] - scores["mixture", p][k]
            for p in (False, True)
            for k in ("bak", "ovrl")
        }
        assert drop[True, "bak"] > 0.35
        assert drop[True, "ovrl"] > 0.4
        assert drop[True, "bak"] > drop[False, "bak"] + 0.3


# ---------------------------------------------------------------- word errors


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("Kids are talking by the door.", "kids are talking by the door", (0, 6)),
        # talking -> walking (S), "the" dropped (D), "now" added (I)
        ("Kids are talking by the door.", "kids are walking by door now", (3, 6)),
        # reversed: no word stays in place, and keeping one costs an insertion and a deletion
        ("Dogs are sitting by the door", "door the by sitting are dogs", (6, 6)),
        ("Don't stop", "dont stop", (0, 2)),
        ("well-known   DOOR", "well known door", (0, 3)),
        ("", "some words", (2, 0)),
        ("three words here", "", (3, 3)),
        ("", "", (0, 0)),
    ],
)
def test_word_errors_counts(reference: str, hypothesis: str, expected: tuple[int, int]) -> None:
    assert asr.word_errors(reference, hypothesis) == expected


def test_normalise_text() -> None:
    assert (
        asr.normalise_text("  Kids, ARE talking\tby the door!\n") == "kids are talking by the door"
    )
    assert asr.normalise_text("It\u2019s a well-known fact.") == "its a well known fact"
    assert asr.normalise_text("...") == ""


@pytest.mark.slow
def test_transcribe_clean_speech(shared_data: Path) -> None:
    """Corpus WER of 4 clean sentences. Measured on all 32 neutral sentences of actors 1-16:
    28 % (PocketSphinx is weak; 16 of 32 perfect, the worst 6 of 6 wrong); on these 4, 0 %."""
    errors = words = 0
    for actor in (2, 3):
        for statement, text in STATEMENTS.items():
            hypothesis = asr.transcribe(ravdess(shared_data, actor, statement), SR)
            e, n = asr.word_errors(text, hypothesis)
            errors, words = errors + e, words + n
    assert words == 24
    assert errors / words <= 0.2


@pytest.mark.slow
def test_transcribe_noise_only(shared_data: Path) -> None:
    """Measured: nothing recognised in 2 s of running tap or of dishes (WER 1.0); from 4 s, one
    word of the tap and three of the miaowing recording (WER 1.0 as well). Noise is slow to
    decode (about 1.2 s of CPU per second of noise), hence the short excerpts."""
    for name in ("running_tap", "doing_the_dishes"):
        hypothesis = asr.transcribe(noise(shared_data, name, 2 * SR), SR)
        errors, words = asr.word_errors(STATEMENTS[1], hypothesis)
        assert errors / words >= 0.8
    assert asr.transcribe(np.zeros(SR), SR) == ""


# ---------------------------------------------------------------- ViSQOL


@pytest.mark.slow
def test_visqol_identity_and_degradations(shared_data: Path) -> None:
    """Identity gives the audio mode's maximum, Google's conformance value 4.7321 (castanets
    against itself; any signal against itself scores the same). Measured on actors 1 and 2:
    3.36-3.54 low-passed at 3.5 kHz, 4.22-4.36 with running tap at 20 dB SNR, 3.45-3.49 at 0 dB,
    and 3.27-3.32 for another actor's sentence: the audio mode compresses speech degradations
    into the top of its scale."""
    lowpass = butter(8, 3500, fs=SR, output="sos")
    for actor in (1, 2):
        target = ravdess(shared_data, actor)
        tap = noise(shared_data, "running_tap", len(target))
        identity = visqol.visqol_audio(target, target, SR)
        assert identity == pytest.approx(4.732101253042348, abs=1e-6)
        # ViSQOL scales the degraded signal to the reference's level
        assert visqol.visqol_audio(0.1 * target, target, SR) == pytest.approx(identity, abs=1e-6)
        mild = visqol.visqol_audio(mix_at_snr(target, tap, 20.0), target, SR)
        harsh = visqol.visqol_audio(mix_at_snr(target, tap, 0.0), target, SR)
        low_passed = visqol.visqol_audio(sosfiltfilt(lowpass, target), target, SR)
        assert identity - 0.2 > mild > harsh + 0.4
        assert low_passed < identity - 0.8
