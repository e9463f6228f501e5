"""Word error rate with an offline recogniser: PocketSphinx (CMU Sphinx) and jiwer.

PocketSphinx 5 ships its US English model in the wheel (continuous-density HMM acoustic model,
a 3-gram language model ``en-us.lm.bin`` and the CMU pronouncing dictionary), so nothing is
downloaded. It is a weak recogniser by today's standards (tens of percent WER on read speech):
its WER is a *relative* intelligibility measure, for comparing an estimate with the clean target
under the same recogniser, not an absolute one.

    errors, words = word_errors(transcript, transcribe(estimate, 48_000))
    corpus_wer = sum(all errors) / sum(all words)   # not the mean of per-file WERs
"""

from __future__ import annotations

import functools
import re
import unicodedata

import jiwer
import numpy as np
from pocketsphinx import Decoder

from evaluation.signal import level_at, resample_into, segment_bounds

ASR_SR = 16_000  # the rate of PocketSphinx's en-us acoustic model
INT16_SCALE = 32_767
# The front end (log mel cepstra with cepstral mean normalisation) hardly depends on the level,
# but a very quiet estimate would lose precision in 16 bits and a loud one would clip: every
# signal is set to this RMS (-25 dBFS) before the conversion.
TARGET_RMS = 10.0 ** (-25.0 / 20.0)
SILENT_RMS = 1e-5  # -100 dBFS: nothing to recognise, the transcript is empty
APOSTROPHES = "'\u2019"  # ASCII and typographic


@functools.cache
def _get_decoder() -> Decoder:
    """The process's decoder, built on first use (about a second: the language model and the
    134k-word dictionary are read); its log output below fatal errors is silenced."""
    return Decoder(samprate=ASR_SR, loglevel="FATAL")


def _decode(pcm: np.ndarray) -> str:
    """PocketSphinx's best hypothesis for one utterance of 16-bit PCM at ``ASR_SR``, normalised.

    Shape:
        pcm (T,) int16
    """
    decoder = _get_decoder()
    decoder.start_utt()
    # One block that is the whole utterance: cepstral mean normalisation then uses the mean of
    # the whole utterance instead of a running estimate, as in batch decoding.
    decoder.process_raw(pcm.tobytes(), no_search=False, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return normalise_text(hyp.hypstr) if hyp is not None else ""


def transcribe(wave: np.ndarray, sr: int) -> str:
    """PocketSphinx's best hypothesis for a mono float signal, as ``normalise_text`` returns it.

    Args:
        wave: (T,) float signal at ``sr`` Hz, any level (it is normalised to -25 dBFS RMS).
        sr: its sample rate; resampled to 16 kHz with soxr and converted to 16-bit PCM, the
            input PocketSphinx expects.

    Returns:
        The words, lower case, separated by single spaces; empty for a silent input or when
        nothing is recognised.

    Long signals: the 16 kHz PCM (level set over the whole signal) is decoded as consecutive
    utterances of at most ``LONG_SEGMENT_SECONDS`` (``segment_bounds``: equal lengths, no short
    tail), each with its own cepstral mean, and the hypotheses are joined with a space; a word
    that straddles a cut may be lost or split. Up to 60 s it is one utterance, as before. The
    resampling runs blockwise (a level pass, then the 16-bit signal: 2 bytes per sample at 16
    kHz, 115 MB for an hour, is the only whole-signal array).
    """
    _, rms = level_at(wave, sr, ASR_SR)
    if rms < SILENT_RMS:
        return ""
    gain = TARGET_RMS / rms
    pcm = resample_into(wave, sr, ASR_SR, np.int16,
                        after=lambda y: np.round(np.clip(y * gain, -1.0, 1.0) * INT16_SCALE))
    hyps = (_decode(pcm[start:stop]) for start, stop in segment_bounds(len(pcm), ASR_SR))
    return " ".join(h for h in hyps if h)


def normalise_text(text: str) -> str:
    """The form in which a reference and a hypothesis are compared.

    Unicode NFKC, then lower case (``str.casefold``); apostrophes are deleted (``don't`` and
    ``dont`` are the same word, whichever a transcript uses); every other punctuation or symbol
    character becomes a space (``door.`` -> ``door``, ``well-known`` -> ``well known``); runs of
    whitespace become one space, with none at either end. Digits are kept as they are: a
    transcript that writes numbers as digits will not match a recogniser that spells them out.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(
        "" if ch in APOSTROPHES else " " if unicodedata.category(ch)[0] in "PS" else ch
        for ch in text
    )
    return re.sub(r"\s+", " ", text).strip()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Word-level edit distance between two transcripts, after ``normalise_text``.

    Returns:
        (substitutions + deletions + insertions, number of reference words), from jiwer's
        Levenshtein alignment. A corpus WER is ``sum(errors) / sum(words)``; an empty reference
        gives (number of hypothesis words, 0), every hypothesis word counting as an insertion.
    """
    ref = normalise_text(reference)
    hyp = normalise_text(hypothesis)
    n_ref = len(ref.split())
    # jiwer refuses empty strings; their alignments are trivial.
    if not ref or not hyp:
        return len(hyp.split()) + n_ref, n_ref
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, n_ref
