"""Reverse-time samplers of the score-based refiner: predictor-corrector sampling of the OUVE SDE
and the first-order Schrödinger-bridge samplers (ODE and SDE) of the SBVE bridge.

The algorithms follow sgmse (sp-uhh/sgmse, MIT, Universität Hamburg): ``get_pc_sampler`` with the
``reverse_diffusion`` predictor and the ``ald`` corrector (``sgmse/sampling/__init__.py``,
``predictors.py``, ``correctors.py``), as in Richter et al. 2023, "Speech Enhancement and
Dereverberation with Diffusion-based Generative Models" and StoRM (Lemercier et al. 2023), and
``get_sb_sampler`` (itself from NVIDIA NeMo) for Jukić et al. 2024, "Schrödinger Bridge for
Generative Speech Enhancement". See ``models/refiner/sdes.py`` for the SDEs and conventions.

Each step calls the network once (the PC sampler once more per corrector step), and nothing in
the loops reads a device tensor on the host: the time grid and the bridge's step weights are
Python floats computed up front in float64, so the loops queue CUDA work without a sync.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import Tensor

from dsp.precision import autocast_off
from models.refiner.sdes import (
    OUVESDE,
    SBVESDE,
    NetworkFn,
    Noise,
    _b,
    _full_t,
    _working,
    randn_like,
)


@torch.no_grad()
def sample_pc(sde: OUVESDE, score_fn: NetworkFn, y: Tensor, *, n_steps: int = 30,
              snr: float = 0.5, corrector_steps: int = 1, noise: Noise = randn_like) -> Tensor:
    """Predictor-corrector sampling of the reverse OUVE SDE from x_T = y + std(T) z.

    As sgmse's ``get_pc_sampler("reverse_diffusion", "ald", ..., denoise=True)``: times
    linspace(T, t_eps, n_steps); at each time t_i, ``corrector_steps`` annealed-Langevin steps
    (0 turns the corrector off) and then one reverse-diffusion step of length t_i - t_{i+1}, the
    last one of length t_eps (to t = 0). The result is the last predictor step's mean, without its
    noise (sgmse's denoise=True). Defaults as sgmse's ``enhance`` (model.py:426-427: N = 30,
    snr = 0.5, one corrector step).

    ``score_fn(x_t, t)`` is the score of p_t(x_t | y); ``noise`` draws every random tensor.
    Shape: y (B, F, T) complex -> (B, F, T) complex64 (complex128 for a complex128 ``y``).
    """
    if n_steps < 1 or corrector_steps < 0 or snr <= 0.0:
        raise ValueError(f"need n_steps >= 1, corrector_steps >= 0 and snr > 0, got "
                         f"n_steps={n_steps}, corrector_steps={corrector_steps}, snr={snr}")
    with autocast_off(y):
        (y,) = _working(y)
        x = sde.prior_sample(y, noise)
    times = torch.linspace(sde.T, sde.t_eps, n_steps, dtype=torch.float64).tolist()
    # Step i runs from times[i] to times[i + 1]; the last from t_eps to 0 (sgmse's stepsize).
    steps = [a - b for a, b in itertools.pairwise(times)] + [times[-1]]
    x_mean = x
    for i, (t_i, dt) in enumerate(zip(times, steps, strict=True)):
        t = _full_t(y, t_i)
        # Annealed Langevin dynamics (NCSN, sgmse ``ald``): a step size set by the target snr and
        # the marginal std at t, the same for every corrector step at this time.
        for _ in range(corrector_steps):
            score = score_fn(x, t)
            with autocast_off(y):
                step = _b(2.0 * (snr * sde.std(t)).square())
                x = x + step * score.to(x.dtype) + (2.0 * step).sqrt() * noise(x).to(x.dtype)
        # Reverse diffusion (Euler-Maruyama of the reverse SDE, sgmse ``reverse_diffusion``):
        # x - (f - g^2 score) dt, plus g sqrt(dt) z.
        score = score_fn(x, t)
        with autocast_off(y):
            drift, g = sde.drift_diffusion(x, y, t)
            x_mean = x - drift * dt + _b(g.square() * dt) * score.to(x.dtype)
            if i < n_steps - 1:  # the last step's noise would be discarded (denoise=True)
                x = x_mean + _b(g * math.sqrt(dt)) * noise(x).to(x.dtype)
    return x_mean


@torch.no_grad()
def sample_sb(sde: SBVESDE, data_fn: NetworkFn, y: Tensor, *, n_steps: int = 50,
              kind: Literal["ode", "sde"] = "ode", noise: Noise = randn_like) -> Tensor:
    """First-order sampling of the Schrödinger bridge from x_T = y down to t = sample_eps.

    As sgmse's ``get_sb_sampler`` (sampling/__init__.py:145-249, adapted there from NVIDIA NeMo's
    SBSampler for Jukić et al. 2024): times linspace(T, sample_eps, n_steps + 1); at each step
    the network predicts x0 from the state, and the state moves from t_prev to t as a weighted
    sum of the state, that estimate and y (``ode``, deterministic) or fresh noise (``sde``, none
    on the last step). The network is given the state's own time t_prev, the pairs (x_t, t) it
    was trained on (NeMo's default ``estimator_time='previous'``; sgmse passes the new time t,
    NeMo's 'current', one step off what its network learnt). The ``ode`` step
    regroups sgmse's weights (see the comment there). Defaults as sgmse: N = 50 (sdes.py:239),
    sampler_type "ode" (sdes.py:243).

    ``data_fn(x_t, t)`` estimates x0; ``noise`` draws the ``sde`` variant's random tensors.
    Shape: y (B, F, T) complex -> (B, F, T) complex64 (complex128 for a complex128 ``y``).
    """
    if n_steps < 1 or kind not in ("ode", "sde"):
        raise ValueError(f"need n_steps >= 1 and kind 'ode' or 'sde', got n_steps={n_steps}, "
                         f"kind={kind!r}")
    with autocast_off(y):
        (y,) = _working(y)
        x = sde.prior_sample(y, noise)
    grid = torch.linspace(sde.T, sde.sample_eps, n_steps + 1, dtype=torch.float64)
    times = grid.tolist()
    sigma_t, sigma_bar_t = (s.tolist() for s in sde.sigmas(grid))
    sigma_T2, eps = sde.sigma_T**2, sde.eps
    for i in range(1, n_steps + 1):
        s, sb, s_prev, sb_prev = sigma_t[i], sigma_bar_t[i], sigma_t[i - 1], sigma_bar_t[i - 1]
        x0_hat = data_fn(x, _full_t(y, times[i - 1]))  # the state's time
        with autocast_off(y):
            x0_hat = x0_hat.to(x.dtype)
            if kind == "ode":
                # x_t = mean_t + r (x_prev - mean_prev), mean_t = y + a_t (x0_hat - y): the step of
                # sgmse / NeMo with r their weight of the state, written relative to y so that
                # nothing cancels in float32 (r ~ 2e3 on the first step, as sigma_bar_T =
                # sqrt(eps)). Their weights of x0_hat and y regularise their divisions apart
                # from r's and then sum with r to 1.02 on the first step (to 1 within 1e-9 after
                # it), which leaves ~6e-4 |y| in the output even with an exact x0_hat; here
                # the three weights sum to 1 exactly and agree with theirs within 1e-6 after the
                # first step.
                r = s * sb / (s_prev * sb_prev + eps)
                w_est = (sb**2 - r * sb_prev**2) / (sigma_T2 + eps)
                x = y + r * (x - y) + w_est * (x0_hat - y)
            else:
                w_prev = s**2 / (s_prev**2 + eps)
                x = w_prev * x + (1.0 - w_prev) * x0_hat
                if i < n_steps:  # sgmse draws no noise into the last step
                    x = x + s * math.sqrt(1.0 - w_prev) * noise(x).to(x.dtype)
    return x
