"""Float32 islands under mixed precision.

Reductions, FFTs and logs run in float32 even under bf16/fp16 autocast: a sum of 10^5 squared
samples can overflow fp16, and an epsilon such as 1e-8 rounds to zero in both half formats.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def to_float32(x: Tensor) -> Tensor:
    """Promote a real tensor to at least float32 and a complex one to at least complex64.

    Half, bfloat16 and complex32 inputs are upcast; float64/complex128 are left as they are.
    """
    floor = torch.complex64 if x.is_complex() else torch.float32
    return x.to(torch.promote_types(x.dtype, floor))


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """A context with autocast disabled for ``x``'s device type (a no-op where unsupported)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
