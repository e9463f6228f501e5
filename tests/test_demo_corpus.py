"""The synthetic demo corpus: deterministic voices with full-band energy, checked arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.demo_corpus import SAMPLE_RATE, main, random_voice, synthesize


def _utterance(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return synthesize(rng, random_voice(rng), 6)


def test_voices_are_deterministic_and_reach_the_top_band() -> None:
    a, b, other = _utterance(1), _utterance(1), _utterance(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[: len(other)], other[: len(a)])
    power = np.abs(np.fft.rfft(a.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(a), 1 / SAMPLE_RATE)
    above_16k = power[freqs > 16_000].sum() / power.sum()
    assert 1e-6 < above_16k < 0.5, above_16k  # fricatives reach 20 kHz and above


@pytest.mark.parametrize("flag", ["--n-train", "--n-val", "--n-test", "--utts-per-speaker"])
def test_a_split_needs_two_speakers_and_two_utterances(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "corpus"), flag, "1"])
    assert exc.value.code == 2
    assert f"{flag} must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()  # nothing half-written
