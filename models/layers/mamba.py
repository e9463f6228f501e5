"""Selective state-space layers (Mamba, Gu & Dao 2023, arXiv:2312.00752): ``Mamba`` with
mamba-ssm's parameter names, shapes and initialisation (``mamba_ssm.modules.mamba_simple.Mamba``),
so that a state_dict moves between backends, and ``BiMamba``, a forward and a time-reversed Mamba.

Backends (``backend=``): ``"cuda"`` is mamba-ssm's fused kernel (``selective_scan_fn``), which
needs a CUDA input and an installed ``mamba_ssm``; ``"torch"`` is the parallel scan of this
module, pure PyTorch on any device; ``"auto"`` takes the kernel where it can run and the scan
otherwise. ``mamba_ssm`` is imported lazily, at most once, and never required.

The parallel scan is this module's own rather than the ``mambapy`` package's ``pscan``: mambapy
pads every sequence to the next power of two (401 frames -> 512, 53 bands -> 64: a quarter more
work and memory) and its autograd graph keeps three (B, L, ED, N) tensors per layer for the
backward pass. ``_SelectiveScan`` keeps only its (B, L, ED) and (B, L, N) inputs and recomputes
the states in backward, which is what mamba-ssm's CUDA kernel does too.

Memory: the scan materialises (B, L, ED, N) float32 tensors, ED = expand * d_model and N =
d_state, i.e. 4 * ED * N bytes per sequence position (16 KiB for ED 256, N 16). While one scan
runs, forward holds two of them and backward three; only the running scan's exist at any time.
At the recipe size (4 s: 401 frames x 53 bands = 21,253 positions per batch item, D 128) one
tensor is 0.32 GiB per batch item, so a scan's transient peak is ~1 GiB per batch item in
backward, while what each scan keeps for backward is 2.1 KiB per position (44 MiB per item).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cuda")
# mamba-ssm's defaults: softplus(dt_proj.bias) is log-uniform in [DT_MIN, DT_MAX], floored.
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4
DT_RANK_DIVISOR = 16  # dt_rank "auto" = ceil(d_model / 16)


# ---------------------------------------------------------------------------------------------
# The parallel scan
# ---------------------------------------------------------------------------------------------


def _scan_(a: torch.Tensor, x: torch.Tensor, *, reverse: bool = False) -> None:
    """In place along dim 1: ``x[t] <- a[t] * x[t-1] + x[t]`` for t = 1..L-1 (``a[0]`` unused),
    or with ``reverse``, ``x[t] <- a[t] * x[t+1] + x[t]`` for t = L-2..0 (``a[L-1]`` unused).
    ``a`` is overwritten with partial products.

    Work-efficient (Brent-Kung / Blelloch) scan, 2 log2(L) rounds of elementwise ops on strided
    views, for any L: combine each pair of neighbours, scan the pairs' heads recursively, then
    finish the elements between them from their now-complete predecessor. The algorithm of
    mambapy's ``pscan`` (MIT), written recursively so that no length needs padding.

    Shape:
        a, x (B, L, ...) -> None
    """
    length = x.shape[1]
    if length < 2:
        return
    odd = length % 2
    if reverse:  # the mirror image of the index sets below
        head, tail = slice(odd, length - 1, 2), slice(odd + 1, None, 2)
        rest, done = slice(1 - odd, length - 2, 2), slice(2 - odd, length - 1, 2)
    else:
        head, tail = slice(1, None, 2), slice(0, length - 1, 2)
        rest, done = slice(2, None, 2), slice(1, length - 1, 2)
    x[:, head].addcmul_(a[:, head], x[:, tail])
    a[:, head].mul_(a[:, tail])
    _scan_(a[:, head], x[:, head], reverse=reverse)
    x[:, rest].addcmul_(a[:, rest], x[:, done])


def _states(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The SSM states h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, h_{-1} = 0 (zero-order
    hold for A, Euler for B, as mamba-ssm).

    Shape:
        u, delta (B, L, E), A (E, N), B (B, L, N) -> h (B, L, E, N)
    """
    a = (delta[..., None] * A).exp_()  # (B, L, E, N)
    h = (delta * u)[..., None] * B[:, :, None, :]  # (B, L, E, N)
    _scan_(a, h)
    return h


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t over the states of ``_states``; saves only its inputs and recomputes the
    states in backward, where the adjoint g_t = dL/dh_t = grad_y_t C_t + a_{t+1} g_{t+1} is
    the same scan run backwards in time.

    Shape:
        u, delta (B, L, E), A (E, N), B, C (B, L, N) -> y (B, L, E)
    """

    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(u, delta, A, B, C)
        # Batched matrix products over (B, L) read the states in place; einsum would permute
        # and copy them.
        return (_states(u, delta, A, B) @ C[..., None]).squeeze(-1)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u, delta, A, B, C = ctx.saved_tensors
        # Backward may be called inside an autocast region; the scan's algebra stays in the
        # inputs' dtype regardless.
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_y = grad_y.to(u.dtype).contiguous()  # sets the layout of the (B, L, E, N) g
            h = _states(u, delta, A, B)  # (B, L, E, N)
            grad_C = (grad_y[:, :, None, :] @ h).squeeze(-2)  # (B, L, N)
            # a_{t+1} at position t; the last position's coefficient is never read.
            a_next = (F.pad(delta[:, 1:], (0, 0, 0, 1))[..., None] * A).exp_()  # (B, L, E, N)
            g = grad_y[..., None] * C[:, :, None, :]  # (B, L, E, N)
            _scan_(a_next, g, reverse=True)
            del a_next
            # Through the input term delta_t B_t u_t.
            g_b = (g @ B[..., None]).squeeze(-1)  # (B, L, E)
            grad_u = g_b * delta
            grad_delta = g_b * u
            grad_B = ((delta * u)[:, :, None, :] @ g).squeeze(-2)  # (B, L, N)
            # Through a_t = exp(delta_t A): dL/da_t = g_t h_{t-1}, da_t/d(delta_t A) = a_t.
            s = g[:, 1:].mul_(h[:, :-1])  # (B, L-1, E, N), in place: g is spent
            del h
            s.mul_((delta[:, 1:, :, None] * A).exp_())
            grad_A = (s * delta[:, 1:, :, None]).sum((0, 1))  # (E, N)
            grad_delta[:, 1:] += s.mul_(A).sum(-1)
        return grad_u, grad_delta, grad_A, grad_B, grad_C


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """The selective scan y_t = C_t . h_t + D u_t, h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
    in the inputs' dtype (call it with float32: the exponentials are inaccurate in bf16), with
    autocast off. Channels-last counterpart of mamba-ssm's ``selective_scan_ref`` with ``delta``
    already through its bias and softplus.

    Shape:
        u, delta (B, L, E), A (E, N), B, C (B, L, N), D (E,) -> (B, L, E)
    """
    # Contiguous (B, L, E) inputs give (B, L, E, N) states whose (E, N) rows are contiguous, the
    # layout that the scan's strided views over time run fast on.
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    with torch.autocast(u.device.type, enabled=False):
        return _SelectiveScan.apply(u, delta, A, B, C) + D * u


@functools.cache
def _cuda_selective_scan() -> Callable[..., torch.Tensor] | None:
    """mamba-ssm's fused ``selective_scan_fn``, or None where it does not import; probed once."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as err:  # OSError: an extension built for another torch
        logger.info("mamba_ssm unavailable (%s): Mamba layers use the PyTorch scan", err)
        return None
    return selective_scan_fn


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class Mamba(nn.Module):
    """The Mamba mixer: in_proj -> causal depthwise conv -> SiLU -> selective scan, gated by
    SiLU(z) -> out_proj. Parameters, their names, shapes and initialisation follow mamba-ssm's
    ``Mamba`` (mamba_simple.py, Apache-2.0) closely, so a state_dict loads into either.

    The projections and the convolution run under autocast, if any; the discretisation and the
    scan run in float32 with autocast off, on both backends.

    Shape:
        x (B, L, D) -> (B, L, D)
    """

    def __init__(
        self,
        *,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Mamba backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / DT_RANK_DIVISOR) if dt_rank == "auto" else dt_rank
        # As mamba-ssm: no bias in the projections, a bias in the convolution.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)

        # mamba-ssm's dt initialisation: a weight that preserves variance, and a bias whose
        # softplus (the step size at init) is log-uniform in [DT_MIN, DT_MAX].
        dt_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        log_dt = torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = log_dt.exp().clamp(min=DT_INIT_FLOOR)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # S4D-real initialisation A = -(1..N) for every channel, stored as log(-A), float32.
        # A_log and D are tagged ``_no_weight_decay`` as in mamba-ssm, and train.py's AdamW
        # leaves them undecayed: decay would pull A towards -1 (every channel's memory towards
        # one time scale) and the skip D towards 0, neither of which is a smaller model.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # (E, N)
        self.A_log = nn.Parameter(a.log())
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        # Created last, as in mamba-ssm: the same seed then draws the same weights.
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _fused_kernel(self, x: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        if self.backend == "torch" or (self.backend == "auto" and not x.is_cuda):
            return None
        kernel = _cuda_selective_scan() if x.is_cuda else None
        if kernel is None and self.backend == "cuda":
            raise RuntimeError(
                "Mamba backend 'cuda' needs a CUDA input and an importable mamba_ssm "
                f"(input on {x.device})"
            )
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, E) each
        # Causal: the convolution pads d_conv - 1 on both sides and only the first L are kept.
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length]).transpose(1, 2)  # (B, L, E)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, L, E); the bias joins in float32 below
        # float32 under autocast (bf16 in), float64 for a float64 model.
        dtype = torch.promote_types(u.dtype, torch.float32)
        kernel = self._fused_kernel(x)
        with torch.autocast(x.device.type, enabled=False):
            u, dt, B, C, z = (t.to(dtype) for t in (u, dt, B, C, z))
            A = -self.A_log.to(dtype).exp()  # (E, N)
            D, dt_bias = self.D.to(dtype), self.dt_proj.bias.to(dtype)
            if kernel is not None:
                # mamba-ssm's layout: channels first, (B, E, L) and (B, N, L).
                y = kernel(
                    u.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2),
                    C.transpose(1, 2), D, z=z.transpose(1, 2), delta_bias=dt_bias,
                    delta_softplus=True,
                ).transpose(1, 2)
            else:
                delta = F.softplus(dt + dt_bias)
                y = selective_scan(u, delta, A, B, C, D) * F.silu(z)  # (B, L, E)
        # Back to the input's dtype for a model cast to bf16 or fp16 without autocast.
        return self.out_proj(y.to(x.dtype))


class BiMamba(nn.Module):
    """A Mamba over time and a second Mamba, with its own weights, over reversed time; their
    outputs are concatenated and projected back to d_model.

    Concatenation and a projection, as SEMamba's bidirectional block, rather than a sum: the
    projection weighs each direction per channel instead of forcing both into one basis, for
    2 * d_model^2 parameters (a few percent of the two mixers), and it is what the BiLSTM path
    of TF-GridNet does with its two directions, so the two sequence layers differ only in the
    recurrence.

    Shape:
        x (B, L, D) -> (B, L, D)
    """

    def __init__(
        self,
        *,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        kwargs = {"d_model": d_model, "d_state": d_state, "d_conv": d_conv, "expand": expand,
                  "backend": backend}
        self.fwd = Mamba(**kwargs)
        self.bwd = Mamba(**kwargs)
        self.proj = nn.Linear(2 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_bwd = self.bwd(x.flip(1)).flip(1)
        return self.proj(torch.cat([self.fwd(x), y_bwd], dim=-1))  # (B, L, 2D) -> (B, L, D)
