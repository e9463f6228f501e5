"""A synthetic 48 kHz multi-speaker corpus for the demo: no download, deterministic from a seed.

    python -m data.demo_corpus --out exp/demo/corpus [--seed 0]

Layout (the generic layouts that ``data/prepare_manifest.py`` scans, so the real scanners and
packer are the ones the demo uses):

    speech/<speaker>/<utt>.wav          training + validation speakers (validation sorts last)
    test_speech/<speaker>/<utt>.wav     unseen test speakers
    noise/*.wav, test_noise/*.wav       coloured noise, babble, hum, transients
    rir/*.wav, test_rir/*.wav           shoebox rooms (pyroomacoustics image-source method)

Voices come from a source-filter model: a glottal pulse train (speaker pitch range, jitter,
shimmer, open quotient, breathiness) through a cascade of formant resonators scaled by the
speaker's vocal-tract length, with unvoiced fricatives and bursts of shaped noise reaching
20 kHz and above. Utterances are phoneme-like syllable sequences at the speaker's rate with a
declining, accented pitch contour. Speakers differ in all of these, so a target can be told
apart from an interferer by voice, not by words.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from dsp.audio import SAMPLE_RATE, save_audio

log = logging.getLogger(__name__)

NYQUIST = SAMPLE_RATE / 2
FRAME = SAMPLE_RATE // 200  # 5 ms: formant filters are updated per frame
PEAK_DBFS = -3.0  # utterances are normalised to this peak before writing

# Vowel formants (F1..F4, Hz) of an adult male vocal tract (Peterson & Barney style values).
VOWELS = {
    "a": (730, 1090, 2440, 3400), "i": (270, 2290, 3010, 3700), "u": (300, 870, 2240, 3300),
    "e": (530, 1840, 2480, 3500), "o": (570, 840, 2410, 3300), "ae": (660, 1720, 2410, 3450),
    "uh": (520, 1190, 2390, 3350), "er": (490, 1350, 1690, 3300),
}
FORMANT_BW = (80.0, 100.0, 140.0, 200.0)  # Hz
# Unvoiced consonants: (low Hz, high Hz, relative level dB) of the shaped noise.
FRICATIVES = {"s": (4500, 22000, 0.0), "sh": (2000, 9000, 0.0), "f": (1500, 23000, -10.0),
              "th": (3000, 23000, -14.0), "h": (400, 6000, -12.0)}
PLOSIVES = {"p": (500, 4000), "t": (3000, 16000), "k": (1500, 5000)}
NASALS = {"m": (250, 1100), "n": (250, 1600)}  # (F1, F2) of the nasal murmur


@dataclass
class Voice:
    """Everything that makes one synthetic speaker sound like themselves."""

    f0: float  # median pitch, Hz
    f0_range: float  # semitones of accent excursion
    vtl: float  # formant scale: 1 = adult male, 1.2 = shorter (female/child-like) tract
    breathiness: float  # aspiration noise share
    open_quotient: float  # share of the glottal cycle the glottis is open
    tilt_db: float  # extra spectral tilt per octave above 1 kHz
    rate: float  # syllables per second
    jitter: float  # cycle-to-cycle pitch perturbation (fraction)
    shimmer: float  # cycle-to-cycle amplitude perturbation (fraction)
    fricative_gain_db: float


def random_voice(rng: np.random.Generator) -> Voice:
    kind = rng.choice(["low", "mid", "high"])
    f0 = {"low": rng.uniform(85, 140), "mid": rng.uniform(140, 200),
          "high": rng.uniform(190, 290)}[kind]
    vtl = {"low": rng.uniform(0.9, 1.05), "mid": rng.uniform(1.0, 1.15),
           "high": rng.uniform(1.1, 1.3)}[kind]
    return Voice(
        f0=float(f0), f0_range=float(rng.uniform(1.5, 6.0)), vtl=float(vtl),
        breathiness=float(rng.uniform(0.0, 0.35)), open_quotient=float(rng.uniform(0.4, 0.75)),
        tilt_db=float(rng.uniform(-4.0, 1.0)), rate=float(rng.uniform(3.0, 6.0)),
        jitter=float(rng.uniform(0.002, 0.02)), shimmer=float(rng.uniform(0.01, 0.1)),
        fricative_gain_db=float(rng.uniform(-8.0, 2.0)),
    )


def _resonator(freq: float, bw: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-pole resonator with unit gain at DC-normalised peak."""
    r = np.exp(-np.pi * bw / SAMPLE_RATE)
    theta = 2 * np.pi * min(freq, NYQUIST * 0.95) / SAMPLE_RATE
    a = np.array([1.0, -2 * r * np.cos(theta), r * r])
    return np.array([a.sum()]), a


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    sos = signal.butter(4, [low, min(high, NYQUIST * 0.98)], btype="band", fs=SAMPLE_RATE,
                        output="sos")
    return signal.sosfilt(sos, rng.standard_normal(n))


def _glottal_source(rng: np.random.Generator, f0: np.ndarray, voice: Voice) -> np.ndarray:
    """Pulse train following the per-sample pitch ``f0`` (0 = unvoiced), shaped into glottal
    pulses (Rosenberg-like: a raised-cosine opening and a faster closing), with jitter and
    shimmer."""
    period = SAMPLE_RATE / max(voice.f0, 1.0)
    open_len = max(4, int(voice.open_quotient * period))
    rise = int(open_len * 0.7)
    pulse = np.concatenate([0.5 - 0.5 * np.cos(np.pi * np.arange(rise) / rise),
                            np.cos(0.5 * np.pi * np.arange(open_len - rise) / (open_len - rise))])
    pulse = np.diff(pulse, prepend=0.0)  # radiation at the lips: a differentiator
    # Jitter: a slowly varying pitch perturbation; a pulse starts where the phase wraps.
    wobble = signal.sosfilt(signal.butter(2, 30, fs=SAMPLE_RATE, output="sos"),
                            rng.standard_normal(len(f0)))
    wobble *= voice.jitter / (wobble.std() + 1e-12)
    phase = np.cumsum(f0 * (1 + wobble) / SAMPLE_RATE)
    starts = np.flatnonzero((np.diff(np.floor(phase), prepend=0.0) > 0) & (f0 > 0))
    impulses = np.zeros(len(f0))
    impulses[starts] = 1.0 + voice.shimmer * rng.standard_normal(len(starts))
    return signal.oaconvolve(impulses, pulse)[: len(f0)]


def synthesize(rng: np.random.Generator, voice: Voice, n_syllables: int) -> np.ndarray:
    """One utterance: words of 1-3 (C)V(C) syllables separated by short pauses."""
    segments: list[tuple[str, str, int]] = []  # (kind, phone, samples)
    syl = SAMPLE_RATE / voice.rate
    consonants = [*FRICATIVES, *PLOSIVES, *NASALS]
    left = n_syllables
    while left > 0:
        for _ in range(min(left, int(rng.integers(1, 4)))):
            if rng.random() < 0.75:
                c = str(rng.choice(consonants))
                kind = ("fric" if c in FRICATIVES else "plos" if c in PLOSIVES else "nasal")
                segments.append((kind, c, int(syl * rng.uniform(0.2, 0.35))))
            segments.append(("vowel", str(rng.choice(list(VOWELS))), int(syl * rng.uniform(0.45,
                                                                                              0.8))))
            left -= 1
        segments.append(("pause", "", int(SAMPLE_RATE * rng.uniform(0.05, 0.25))))
    n = sum(s[2] for s in segments) + SAMPLE_RATE // 5
    # Pitch: declination over the utterance, an accent per word, voiced segments only.
    t = np.arange(n) / SAMPLE_RATE
    semitones = -2.0 * t / max(t[-1], 1e-3)
    f0 = np.zeros(n)
    formants = np.zeros((n // FRAME + 1, 4))
    noise = np.zeros(n)
    pos = SAMPLE_RATE // 10
    last_vowel = np.array(VOWELS["uh"], dtype=float)
    for kind, phone, length in segments:
        seg = slice(pos, pos + length)
        if kind == "pause":
            semitones[pos:] += voice.f0_range * rng.uniform(-0.5, 0.5) * 0.3
        if kind in ("vowel", "nasal"):
            accent = voice.f0_range * np.sin(np.pi * np.linspace(0, 1, length)) * rng.uniform(
                0, 1)
            f0[seg] = voice.f0 * 2 ** ((semitones[seg] + accent) / 12)
        if kind == "vowel":
            target = np.array(VOWELS[phone], dtype=float)
        elif kind == "nasal":
            target = np.array([*NASALS[phone], 2500, 3300], dtype=float)
        else:
            target = last_vowel
        frames = slice(pos // FRAME, (pos + length) // FRAME + 1)
        n_frames = len(range(*frames.indices(len(formants))))
        glide = np.linspace(0, 1, n_frames)[:, None] ** 0.5  # coarticulation into the target
        formants[frames] = last_vowel + (target - last_vowel) * glide
        if kind == "vowel":
            last_vowel = target
        if kind == "fric":
            low, high, level = FRICATIVES[phone]
            env = np.hanning(length)
            noise[seg] += _band_noise(rng, length, low, high) * env * 10 ** (
                (level + voice.fricative_gain_db) / 20)
        elif kind == "plos":
            low, high = PLOSIVES[phone]
            burst = int(SAMPLE_RATE * 0.015)
            start = pos + length - burst
            noise[start:start + burst] += _band_noise(rng, burst, low, high) * np.exp(
                -np.arange(burst) / (burst / 4)) * 2.0
        pos += length
    formants *= voice.vtl

    source = _glottal_source(rng, f0, voice)
    voiced = (f0 > 0).astype(float)
    # Breathiness: aspiration noise through the same vocal tract, only while voicing.
    source += voice.breathiness * 0.3 * _band_noise(rng, n, 300, 20000) * voiced
    out = np.zeros(n)
    zi = [np.zeros(2) for _ in range(4)]
    for f in range(len(formants)):
        seg = slice(f * FRAME, min(n, (f + 1) * FRAME))
        x = source[seg]
        if x.size == 0:
            break
        for k in range(4):
            freq = formants[f, k] if formants[f, k] > 0 else VOWELS["uh"][k] * voice.vtl
            b, a = _resonator(freq, FORMANT_BW[k] * voice.vtl)
            x, zi[k] = signal.lfilter(b, a, x, zi=zi[k])
        out[seg] = x
    # Higher formants and the voice's own brightness: a gentle tilt above 1 kHz.
    spectrum = np.fft.rfft(out)
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    octaves = np.log2(np.maximum(freqs, 1000.0) / 1000.0)
    spectrum *= 10 ** (voice.tilt_db * octaves / 20)
    out = np.fft.irfft(spectrum, n)
    out = out / (np.abs(out).max() + 1e-9) + noise * 0.3
    return (out * 10 ** (PEAK_DBFS / 20) / (np.abs(out).max() + 1e-9)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Noises and rooms
# ---------------------------------------------------------------------------------------------


def coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    slope = rng.uniform(-2.0, 0.5)  # dB/octave-ish power slope: brown .. slightly blue
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    spectrum *= (freqs / 1000.0) ** (slope / 2)
    return np.fft.irfft(spectrum, n)


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
    base = rng.choice([50.0, 60.0]) * rng.uniform(0.995, 1.005)
    t = np.arange(n) / SAMPLE_RATE
    x = sum(rng.uniform(0.1, 1.0) / k * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3))
            for k in range(1, 12))
    return x + 0.05 * coloured_noise(rng, n) / 3


def transients(rng: np.random.Generator, n: int) -> np.ndarray:
    out = 0.02 * rng.standard_normal(n)
    for _ in range(int(rng.integers(5, 20))):
        length = int(SAMPLE_RATE * rng.uniform(0.01, 0.3))
        start = int(rng.integers(0, n - length))
        low = rng.uniform(100, 3000)
        burst = _band_noise(rng, length, low, low * rng.uniform(2, 10))
        out[start:start + length] += burst * np.exp(-np.arange(length) / (length / 5))
    return out


def babble(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n)
    for _ in range(int(rng.integers(4, 9))):
        voice = random_voice(rng)
        utt = synthesize(rng, voice, int(rng.integers(8, 20))).astype(float)
        start = int(rng.integers(0, max(1, n - len(utt))))
        seg = utt[: n - start]
        out[start:start + len(seg)] += seg
    return out


NOISE_KINDS = {"coloured": coloured_noise, "hum": hum, "transients": transients,
               "babble": babble}


def room_rir(rng: np.random.Generator) -> np.ndarray:
    import pyroomacoustics as pra  # only the corpus builder needs it

    dims = np.array([rng.uniform(3, 10), rng.uniform(3, 8), rng.uniform(2.4, 4)])
    rt60 = rng.uniform(0.15, 0.8)
    absorption, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption),
                       max_order=min(max_order, 17), use_rand_ism=True, max_rand_disp=0.05)
    margin = 0.5
    room.add_source(rng.uniform(margin, dims - margin))
    room.add_microphone(rng.uniform(margin, dims - margin))
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)
    return (rir / np.abs(rir).max()).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


def build(
    out: Path,
    *,
    seed: int = 0,
    n_train: int = 24,
    n_val: int = 4,
    n_test: int = 6,
    utts_per_speaker: int = 12,
    n_noise: int = 16,
    n_rir: int = 40,
) -> dict:
    """Write the corpus under ``out``; returns (and writes) a summary with every voice."""
    root = np.random.SeedSequence(seed)
    spk_seq, noise_seq, rir_seq = root.spawn(3)
    voices = {}
    names = [f"demo{i:03d}" for i in range(n_train + n_val)]  # validation speakers sort last
    names += [f"test{i:03d}" for i in range(n_test)]
    for name, seq in zip(names, spk_seq.spawn(len(names)), strict=True):
        rng = np.random.default_rng(seq)
        voice = random_voice(rng)
        voices[name] = asdict(voice)
        folder = out / ("test_speech" if name.startswith("test") else "speech") / name
        for u in range(utts_per_speaker):
            wave = synthesize(rng, voice, int(rng.integers(10, 22)))
            save_audio(folder / f"{name}_{u:03d}.wav", wave)
    for i, seq in enumerate(noise_seq.spawn(n_noise)):
        rng = np.random.default_rng(seq)
        kind = list(NOISE_KINDS)[i % len(NOISE_KINDS)]
        wave = NOISE_KINDS[kind](rng, int(SAMPLE_RATE * rng.uniform(8, 15)))
        wave = wave / (np.abs(wave).max() + 1e-9) * 0.5
        # The last clip of every kind is a test noise: unseen, and every kind represented.
        folder = out / ("test_noise" if i >= n_noise - len(NOISE_KINDS) else "noise")
        save_audio(folder / f"{kind}_{i:03d}.wav", wave)
    for i, seq in enumerate(rir_seq.spawn(n_rir)):
        folder = out / ("test_rir" if i >= n_rir * 3 // 4 else "rir")
        save_audio(folder / f"room_{i:03d}.wav", room_rir(np.random.default_rng(seq)))
    _write_example(out, np.random.default_rng(root.spawn(1)[0]))
    summary = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test,
               "utts_per_speaker": utts_per_speaker, "voices": voices}
    (out / "corpus.json").write_text(json.dumps(summary, indent=1))
    return summary


def _write_example(out: Path, rng: np.random.Generator) -> None:
    """One unseen-speaker pair for inference: example/{mix,ref,target}.wav (dry, with noise)."""
    from dsp.audio import load_audio

    speakers = sorted((out / "test_speech").iterdir())
    target_utts = sorted(speakers[0].glob("*.wav"))
    target, ref = load_audio(target_utts[0]), load_audio(target_utts[1])
    other = load_audio(sorted(speakers[1].glob("*.wav"))[0])
    noise = load_audio(sorted((out / "test_noise").glob("*.wav"))[0])
    n = len(target)
    interferer = np.resize(other, n) * 0.8
    noise = np.resize(noise, n)
    noise *= 0.3 * np.sqrt(np.mean(target**2) / (np.mean(noise**2) + 1e-12))  # ~10 dB SNR
    mix = target + interferer + noise
    gain = min(1.0, 0.95 / np.abs(mix).max())
    for name, wave in (("mix", mix * gain), ("target", target * gain), ("ref", ref)):
        save_audio(out / "example" / f"{name}.wav", wave)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=24)
    parser.add_argument("--n-val", type=int, default=4)
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--utts-per-speaker", type=int, default=12)
    args = parser.parse_args(argv)
    # The dataset mixes a target with an interferer of the same split, and the example pair
    # needs two test speakers: every split needs at least two speakers.
    for name in ("n_train", "n_val", "n_test"):
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be at least 2 (a target and an "
                         "interferer of the same split)")
    if args.utts_per_speaker < 2:
        parser.error("--utts-per-speaker must be at least 2 (the reference is another utterance)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.out / "corpus.json").is_file():
        log.info("demo corpus already at %s", args.out)
        return
    build(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
          utts_per_speaker=args.utts_per_speaker)
    log.info("demo corpus written to %s", args.out)


if __name__ == "__main__":
    main()
