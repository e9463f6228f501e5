"""The level a model divides its input by, so that it sees unit-RMS signals whatever the
recording's gain."""

from __future__ import annotations

import torch

RMS_EPS = 1e-8  # float32 waveforms only, so this never underflows


def rms_scale(wave: torch.Tensor) -> torch.Tensor:
    """The level a family divides a waveform by: its RMS (+ ``RMS_EPS``), in float32.

    Shape:
        (B, N) -> (B, 1)
    """
    return wave.float().pow(2).mean(-1, keepdim=True).sqrt() + RMS_EPS
