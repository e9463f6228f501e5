"""Forward SDEs of the score-based refiner: the Ornstein-Uhlenbeck SDE with variance-exploding
diffusion (OUVE) and the variance-exploding Schrödinger bridge (SBVE), with their training losses.

The formulas follow sgmse (sp-uhh/sgmse, MIT, Universität Hamburg): ``sgmse/sdes.py`` for the
SDEs and ``ScoreModel._loss`` / ``_step`` in ``sgmse/model.py`` for the losses. The papers:

- OUVE: Richter, Welker, Lemercier, Lay, Gerkmann, 2023, "Speech Enhancement and Dereverberation
  with Diffusion-based Generative Models" (IEEE/ACM TASLP 31), the SDE that StoRM (Lemercier,
  Richter, Welker, Gerkmann, 2023, "StoRM: A Diffusion-based Stochastic Regeneration Model for
  Speech Enhancement and Dereverberation", IEEE/ACM TASLP 31) regenerates with;
- SBVE: Jukić, Korostik, Balam, Ginsburg, 2024, "Schrödinger Bridge for Generative Speech
  Enhancement" (Interspeech), Table 1 and Eqs. (9) and (11).

Both processes run from the clean spectrogram ``x0`` at t = 0 to ``y`` at t = T, here the first
stage's estimate (StoRM's predictive output). Spectrograms are complex ``(B, F, T)``, complex64
(complex128 keeps its precision); time ``t`` is a real ``(B,)`` tensor. Every random draw goes
through a ``noise`` callable, so the caller decides the generators (one per batch item keeps
items independent and sampling reproducible); a draw is complex standard normal, real and
imaginary parts of variance 1/2 each (``torch.randn_like`` on a complex tensor, as sgmse).

The SDE and loss arithmetic runs with autocast disabled, in at least float32; only the network
(``score_fn`` / ``data_fn``) runs under the caller's autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dsp.precision import autocast_off, to_float32

# A complex standard normal tensor shaped like its argument (see the module docstring).
Noise = Callable[[Tensor], Tensor]
# score_fn(x_t, t) -> score and data_fn(x_t, t) -> x0 estimate; (B, F, T), (B,) -> (B, F, T).
NetworkFn = Callable[[Tensor, Tensor], Tensor]

# sgmse halves the squared error of both losses (``0.5 * torch.sum(...)``, model.py:146, 167).
LOSS_SCALE = 0.5


def randn_like(x: Tensor) -> Tensor:
    """The default ``noise``: ``torch.randn_like`` (complex: E|z|^2 = 1), from the global RNG."""
    return torch.randn_like(x)


def _b(t: Tensor) -> Tensor:
    """Broadcast a per-item value over a spectrogram: (B,) -> (B, 1, 1)."""
    return t[:, None, None]


def _working(x: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``x`` and ``others`` in one complex working dtype, at least complex64."""
    dtype = to_float32(x).dtype
    for other in others:
        dtype = torch.promote_types(dtype, to_float32(other).dtype)
    return tuple(v.to(dtype) for v in (x, *others))


def _full_t(like: Tensor, value: float) -> Tensor:
    """A (B,) time tensor of ``value`` in ``like``'s real dtype, on its device (no host sync)."""
    return torch.full(like.shape[:1], value, dtype=like.real.dtype, device=like.device)


def _check(x0: Tensor, y: Tensor, t: Tensor) -> None:
    if x0.ndim != 3 or not x0.is_complex() or x0.shape != y.shape:
        raise ValueError(f"expected complex (B, F, T) x0 and y of one shape, got {x0.dtype} "
                         f"{tuple(x0.shape)} and {y.dtype} {tuple(y.shape)}")
    if t.shape != x0.shape[:1]:
        raise ValueError(f"expected t of shape ({x0.shape[0]},), got {tuple(t.shape)}")


def _perturbed(sde: OUVESDE | SBVESDE, x0: Tensor, y: Tensor, t: Tensor,
               noise: Noise) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training sample of both losses: x_t = mean(x0, y, t) + std(t) z, in the working
    dtype with autocast off. Returns (x0, t, z, std broadcast (B, 1, 1), x_t)."""
    _check(x0, y, t)
    with autocast_off(x0):
        x0, y = _working(x0, y)
        t = t.to(x0.real.dtype)
        z = noise(x0).to(x0.dtype)
        sigma = _b(sde.std(t))
        return x0, t, z, sigma, sde.mean(x0, y, t) + sigma * z


def _half_mean_square(err: Tensor) -> Tensor:
    """``LOSS_SCALE * |err|^2`` averaged over (F, T) per item. Shape: (B, F, T) -> (B,)."""
    return LOSS_SCALE * (err.real.square() + err.imag.square()).mean(dim=(1, 2))


@dataclass(frozen=True, kw_only=True)
class _TimeRange:
    """The process time [0, T] and the lower end ``t_eps`` of training times (and, for OUVE, of
    the sampling grid): both SDEs are degenerate at t = 0 (std 0), where the score is
    unbounded."""

    t_eps: float = 0.03  # sgmse ScoreModel --t_eps (model.py:27), for both SDEs
    T: float = 1.0  # sgmse's SDE.T (sdes.py:186, 268)

    def __post_init__(self) -> None:
        if not 0.0 < self.t_eps < self.T:
            raise ValueError(f"need 0 < t_eps < T, got t_eps={self.t_eps}, T={self.T}")

    def train_t(self, u: Tensor) -> Tensor:
        """Map ``u ~ U(0, 1)`` to a training time, uniform in [t_eps, T] (sgmse model.py:191).
        Shape: (B,) -> (B,)."""
        return self.t_eps + (self.T - self.t_eps) * u


@dataclass(frozen=True, kw_only=True)
class OUVESDE(_TimeRange):
    """dx = theta (y - x) dt + g(t) dw, g(t) = sigma_min (sigma_max / sigma_min)^t
    sqrt(2 log(sigma_max / sigma_min)) (Richter et al. 2023; sgmse sdes.py:155-219).

    The marginal is x_t ~ N(mean(x0, y, t), std(t)^2) per complex bin: the mean moves from x0
    toward y, and the std grows from 0 to std(1) = 0.39 with the defaults (0.73 with sgmse's
    48 kHz theta = 2, sigma_min = 0.1, sigma_max = 1).
    """

    theta: float = 1.5  # stiffness (sgmse --theta, sdes.py:148)
    sigma_min: float = 0.05  # sgmse --sigma-min (sdes.py:149)
    sigma_max: float = 0.5  # sgmse --sigma-max (sdes.py:150)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta <= 0.0:
            raise ValueError(f"theta must be positive, got {self.theta}")
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")

    @property
    def _logsig(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        """e^{-theta t}, the weight of x0 in the mean. Shape: (B,) -> (B,)."""
        return torch.exp(-self.theta * to_float32(t))

    def mean(self, x0: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """e^{-theta t} x0 + (1 - e^{-theta t}) y (sgmse ``_mean``).
        Shape: (B, F, T), (B, F, T), (B,) -> (B, F, T)."""
        a = _b(self.alpha(t))
        return a * x0 + (1.0 - a) * y

    def std(self, t: Tensor) -> Tensor:
        """The marginal std, the solution of dS/dt = -2 theta S + g(t)^2, S(0) = 0 (sgmse
        ``_std``). Shape: (B,) -> (B,)."""
        t = to_float32(t)
        rate = self.theta + self._logsig
        # expm1 rather than exp(.) - 1: the variance near t_eps is a small difference.
        var = (self.sigma_min**2 * torch.exp(-2.0 * self.theta * t) * torch.expm1(2.0 * rate * t)
               * self._logsig / rate)
        return var.sqrt()

    def drift_diffusion(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The forward SDE's drift theta (y - x) and diffusion g(t) (sgmse ``sde``).
        Shape: (B, F, T), (B, F, T), (B,) -> (B, F, T), (B,)."""
        t = to_float32(t)
        g = self.sigma_min * (self.sigma_max / self.sigma_min) ** t * math.sqrt(2.0 * self._logsig)
        return self.theta * (y - x), g

    def prior_sample(self, y: Tensor, noise: Noise = randn_like) -> Tensor:
        """x_T = y + std(T) z, the start of reverse sampling (sgmse ``prior_sampling``).
        Shape: (B, F, T) -> (B, F, T)."""
        with autocast_off(y):
            (y,) = _working(y)
            return y + _b(self.std(_full_t(y, self.T))) * noise(y).to(y.dtype)

    def loss(self, score_fn: NetworkFn, x0: Tensor, y: Tensor, t: Tensor,
             noise: Noise = randn_like) -> Tensor:
        """Denoising score matching with sigma^2 weighting (Richter et al. 2023, Eq. (7); sgmse
        ``_step`` and ``_loss`` with loss_type ``score_matching``): x_t = mean + std z, loss =
        0.5 |std score(x_t, t) + z|^2, averaged over (F, T) per item. sgmse sums over (F, T)
        instead; the mean keeps the scale independent of the crop, so this is sgmse's value
        divided by F * T.

        Shape: x0, y (B, F, T), t (B,) -> (B,) float32 (float64 for complex128 inputs).
        """
        x0, t, z, sigma, x_t = _perturbed(self, x0, y, t, noise)
        score = score_fn(x_t, t)  # the network, under the caller's autocast
        with autocast_off(x0):
            return _half_mean_square(sigma * score.to(x0.dtype) + z)


@dataclass(frozen=True, kw_only=True)
class SBVESDE(_TimeRange):
    """The Schrödinger bridge between x0 (t = 0) and y (t = T) of the VE SDE dx = g(t) dw,
    g(t)^2 = c k^{2t} (Jukić et al. 2024, Table 1; sgmse sdes.py:246-310).

    With sigma_t^2 = int_0^t g^2 = c (k^{2t} - 1) / (2 log k) and sigma_bar_t^2 = sigma_T^2 -
    sigma_t^2, the marginal is x_t ~ N((sigma_bar_t^2 x0 + sigma_t^2 y) / sigma_T^2,
    (sigma_t sigma_bar_t / sigma_T)^2): a Brownian bridge in the time sigma_t^2, pinned at both
    ends. VE has alpha_t = 1, so sgmse's alpha factors are left out; the one place where they
    change a number is its 1 / (1 + eps) on the weight of y, a 1e-8 relative difference.

    Training draws t in [t_eps, T] like OUVE: sgmse's SB recipe keeps ScoreModel's default
    t_eps = 0.03 (model.py:27, 191). Sampling, though, runs down to ``sample_eps`` = 1e-4
    (``get_sb_sampler``'s default eps, sampling/__init__.py:145, which ScoreModel does not
    override); a data-predicting network has no 1 / std that would diverge as t -> 0.
    """

    k: float = 2.6  # base of g(t) (sgmse --k, sdes.py:240)
    c: float = 0.4  # scale of g(t)^2 (sgmse --c, sdes.py:241)
    eps: float = 1e-8  # keeps the sampler's divisions finite (sgmse --eps, sdes.py:242)
    sample_eps: float = 1e-4  # last time of the sampling grid (sgmse sampling/__init__.py:145)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k <= 1.0 or self.c <= 0.0:
            raise ValueError(f"need k > 1 and c > 0, got k={self.k}, c={self.c}")
        if not 0.0 < self.sample_eps < self.T or self.eps <= 0.0:
            raise ValueError(f"need 0 < sample_eps < T and eps > 0, got "
                             f"sample_eps={self.sample_eps}, eps={self.eps}")

    @property
    def sigma_T(self) -> float:
        """sigma_T, the std of the unpinned VE process at t = T."""
        return math.sqrt(self.c * math.expm1(2.0 * self.T * math.log(self.k))
                         / (2.0 * math.log(self.k)))

    def sigmas(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma_t, sigma_bar_t) as sgmse's ``_sigmas_alphas``, with sgmse's eps under the
        square root of sigma_bar_t. Shape: (...) -> (...), (...)."""
        t = to_float32(t)
        sigma = torch.sqrt(self.c * torch.expm1(2.0 * math.log(self.k) * t)
                           / (2.0 * math.log(self.k)))
        sigma_bar = torch.sqrt(self.sigma_T**2 - sigma.square() + self.eps)
        return sigma, sigma_bar

    def mean(self, x0: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """(sigma_bar_t^2 x0 + sigma_t^2 y) / sigma_T^2, eps-regularised as sgmse ``_mean``
        (Jukić et al. 2024, Eq. (11)). Shape: (B, F, T), (B, F, T), (B,) -> (B, F, T)."""
        sigma, sigma_bar = self.sigmas(t)
        denom = self.sigma_T**2 + self.eps
        return _b(sigma_bar.square() / denom) * x0 + _b(sigma.square() / denom) * y

    def std(self, t: Tensor) -> Tensor:
        """sigma_t sigma_bar_t / sigma_T (sgmse ``_std``). Shape: (B,) -> (B,)."""
        sigma, sigma_bar = self.sigmas(t)
        return sigma * sigma_bar / (self.sigma_T + self.eps)

    def prior_sample(self, y: Tensor, noise: Noise = randn_like) -> Tensor:
        """x_T = y: the bridge is pinned at y, so the prior is a point and draws no noise (sgmse
        ``prior_sampling``); ``noise`` is accepted so that both SDEs are called alike.
        Shape: (B, F, T) -> (B, F, T)."""
        del noise
        (y,) = _working(y)
        return y

    def loss(self, data_fn: NetworkFn, x0: Tensor, y: Tensor, t: Tensor,
             noise: Noise = randn_like) -> Tensor:
        """Data prediction (sgmse ``_step`` and ``_loss`` with loss_type ``data_prediction``, its
        time-frequency term): x_t = mean + std z, loss = 0.5 |data_fn(x_t, t) - x0|^2 averaged
        over (F, T) per item, which is exactly sgmse's per-item value (its 1 / (F T) and sum).
        sgmse's time-domain L1 and PESQ terms belong to the caller, which owns the iSTFT.

        Shape: x0, y (B, F, T), t (B,) -> (B,) float32 (float64 for complex128 inputs).
        """
        x0, t, _, _, x_t = _perturbed(self, x0, y, t, noise)
        x0_hat = data_fn(x_t, t)  # the network, under the caller's autocast
        with autocast_off(x0):
            return _half_mean_square(x0_hat.to(x0.dtype) - x0)
