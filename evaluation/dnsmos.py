"""Non-intrusive speech quality: DNSMOS P.835 (Reddy et al., ICASSP 2022), plain and personalized.

DNSMOS predicts, from the estimate alone, the three ratings of an ITU-T P.835 listening test:
SIG (speech distortion), BAK (background intrusiveness) and OVRL (overall quality), each a MOS on
1-5. The models are Microsoft's ONNX files that ship inside the ``speechmos`` wheel
(``speechmos/dnsmos_models/sig_bak_ovr.onnx`` and ``speechmos/pdnsmos_models/sig_bak_ovr.onnx``),
so nothing is downloaded.

*Personalized* DNSMOS (pDNSMOS) is the variant released for the personalized tracks of the
ICASSP 2022 and 2023 DNS challenges (DNS 4 and 5): trained so that speech from anyone but the
primary talker counts as background, it lowers BAK and OVRL when an interfering talker remains
audible, which plain DNSMOS scores as clean speech. For target speaker extraction it is the
variant that sees a leaked interferer.

The scores are those of ``speechmos.dnsmos.run`` (Microsoft's ``dnsmos_local.py``): the signal
at 16 kHz is tiled to at least 9.01 s, scored on 9.01 s windows every second, each window's raw
outputs mapped by the challenge's polynomials and the mapped scores averaged. This module calls
the ONNX models itself instead of ``run`` for three reasons: the sessions run on one thread
(``run``'s sessions take every core, which oversubscribes the CPU when the evaluation runs one
metric worker per core), both variants stay loaded (``run`` reloads its models whenever the
variant changes), and the P.808 model, which ``run`` also evaluates on every window, is skipped
(its score is not used).
``tests/test_eval_models.py`` checks that the numbers equal ``run``'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from importlib.resources import files

import numpy as np
import onnxruntime as ort

from evaluation.signal import energy as signal_energy
from evaluation.signal import resample_into

DNSMOS_SR = 16_000  # the models' input rate
INPUT_SECONDS = 9.01  # window length of the P.835 model (speechmos: INPUT_LENGTH)
HOP_SECONDS = 1  # one window per second
_MODEL_FILES = {
    False: ("dnsmos_models", "sig_bak_ovr.onnx"),
    True: ("pdnsmos_models", "sig_bak_ovr.onnx"),
}
# Polynomials (highest power first) from the raw model outputs to MOS, per variant and score, as
# in DNS-Challenge/DNSMOS/dnsmos_local.py (identical in speechmos.dnsmos.DNSMOS.get_polyfit_val).
_POLYFIT = {
    False: {
        "sig": (-0.08397278, 1.22083953, 0.0052439),
        "bak": (-0.13166888, 1.60915514, -0.39604546),
        "ovrl": (-0.06766283, 1.11546468, 0.04602535),
    },
    True: {
        "sig": (-0.01019296, 0.02751166, 1.19576786, -0.24348726),
        "bak": (-0.04976499, 0.44276479, -0.1644611, 0.96883132),
        "ovrl": (-0.00533021, 0.005101, 1.18058466, -0.11236046),
    },
}
SCORES = ("sig", "bak", "ovrl")  # the order of the model's three outputs


@functools.cache
def _get_session(personalized: bool) -> ort.InferenceSession:
    """The process's ONNX session of one variant, created on first use on one CPU thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    folder, name = _MODEL_FILES[personalized]
    path = files("speechmos").joinpath(folder, name)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _windows(audio: np.ndarray) -> Iterator[np.ndarray]:
    """The 9.01 s windows of a 16 kHz signal, as speechmos cuts them, one at a time (views of
    ``audio`` once it is long enough: nothing is stacked).

    Shape:
        audio (T,) -> (INPUT_SECONDS * DNSMOS_SR,) each
    """
    len_samples = int(INPUT_SECONDS * DNSMOS_SR)
    # The reference doubles a short clip until it covers one window (a 4 s clip becomes 16 s,
    # scored on 7 windows that wrap around) rather than zero-padding it.
    while len(audio) < len_samples:
        audio = np.append(audio, audio)
    num_hops = int(np.floor(len(audio) / DNSMOS_SR) - INPUT_SECONDS) + 1
    for i in range(num_hops):
        segment = audio[int(i * HOP_SECONDS * DNSMOS_SR) :
                        int((i * HOP_SECONDS + INPUT_SECONDS) * DNSMOS_SR)]
        if len(segment) >= len_samples:
            yield segment


def _at_16k(wave: np.ndarray, sr: int, level_dbfs: float | None) -> np.ndarray:
    """The float32 16 kHz signal the models read: scaled to ``level_dbfs`` (RMS at ``sr``),
    clipped to [-1, 1], resampled with soxr and clipped again. Blockwise in float64
    (``evaluation.signal``), the same numbers as whole-signal float64 operations followed by
    the float32 cast of the windows; the only whole-signal array is the result.

    Shape:
        wave (T,) -> (T * DNSMOS_SR / sr,)
    """
    gain = 1.0
    if level_dbfs is not None:
        rms = math.sqrt(signal_energy(wave) / len(wave))
        if rms > 0:
            gain = 10.0 ** (level_dbfs / 20.0) / rms
    # The second clip catches the resampler's overshoot near full scale (Gibbs ripple).
    return resample_into(wave, sr, DNSMOS_SR, np.float32,
                         before=lambda b: np.clip(b * gain, -1.0, 1.0),
                         after=lambda y: np.clip(y, -1.0, 1.0))


def dnsmos(
    wave: np.ndarray, sr: int, *, personalized: bool = False, level_dbfs: float | None = None
) -> dict[str, float]:
    """DNSMOS P.835 scores of a mono signal.

    Args:
        wave: (T,) float signal at ``sr`` Hz. The models were trained on signals in [-1, 1]
            (``speechmos.dnsmos.run`` refuses anything else), so samples beyond full scale are
            clipped at ``sr``, as writing the estimate to a 16-bit file would.
        sr: its sample rate; resampled to 16 kHz with soxr.
        personalized: the pDNSMOS models, which also penalise interfering talkers.
        level_dbfs: if given, the signal is first scaled to this RMS level (dBFS, before the
            clipping). The models read the raw waveform and the scores depend on the level:
            8 RAVDESS sentences at their own level (around -48 dBFS RMS) scored OVRL 2.5-3.2,
            the same sentences 20 dB louder 3.1-3.2. The DNS challenge's data synthesizer
            (``audiolib.snr_mixer``) sets clips between -35 and -15 dBFS (-25 by default), so
            -25 puts a signal of arbitrary gain, such as an estimate, where the models were
            trained. None (the default) scores the signal as it is, as published DNSMOS numbers
            are.

    Returns:
        ``{"sig", "bak", "ovrl"}``: mean opinion scores, nominally 1-5 (the polynomials can
        overshoot a little).

    Cost: one model run per 9.01 s window, one window per second of the (tiled) signal, about
    0.12-0.13 s of one core each (measured with one thread on 31 windows, either variant): ~0.13
    s of CPU per second of audio, so an hour (3,592 windows) costs ~8 CPU-minutes per signal per
    variant. The tiling makes it uneven in the length: a 4.6 s clip is doubled to 9.2 s (one
    window), a 4 s clip to 16 s (seven windows).
    Long signals: the same rule as short ones, every window of the whole signal scored and
    averaged. The windows are views scored one at a time, so memory beyond the float32 16 kHz
    signal (4 bytes per sample: 230 MB for an hour) is one window's.
    """
    if np.ndim(wave) != 1 or np.size(wave) == 0:
        raise ValueError(f"expected a non-empty mono signal of shape (T,), got {np.shape(wave)}")
    x = _at_16k(wave, sr, level_dbfs)
    session = _get_session(personalized)
    # (n_windows, 3) raw outputs; the polynomials are evaluated in float64 as the reference's are.
    raw = np.stack([session.run(None, {"input_1": w[np.newaxis]})[0][0] for w in _windows(x)])
    raw = raw.astype(np.float64)
    return {
        name: float(np.mean(np.polyval(_POLYFIT[personalized][name], raw[:, k])))
        for k, name in enumerate(SCORES)
    }
