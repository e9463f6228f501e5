"""The refiner's diffusion (models/refiner/sdes.py, models/refiner/samplers.py): closed-form
marginals against numerical integration of their defining equations, samplers driven by oracle
networks of one known clean spectrogram, the losses at the oracle, reproducible and
batch-independent noise, gradients and bf16 autocast."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from scipy import integrate
from torch import Tensor, nn

from models.refiner.samplers import sample_pc, sample_sb
from models.refiner.sdes import OUVESDE, SBVESDE, Noise

C128 = torch.complex128
SHAPE = (2, 8, 10)  # (B, F, T): 160 complex bins, enough for mean-square errors to concentrate
# 8192 bins: their noise's mean square is within 6% of its variance (5.4 standard deviations).
LARGE = (2, 64, 64)
MS_RTOL = 0.06
# OUVE as sgmse's defaults and as its 48 kHz EARS models (sgmse README: --theta 2.0
# --sigma-min 0.1 --sigma-max 1.0).
OUVE_PARAMS = [{}, {"theta": 2.0, "sigma_min": 0.1, "sigma_max": 1.0}]


# One torch thread per test (conftest.py): small tensors on shared cores only contend.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded_noise(seeds: list[int]) -> Noise:
    """Complex standard normal draws from one generator per batch item, as the refiner draws."""
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]

    def noise(x: Tensor) -> Tensor:
        return torch.stack([torch.randn(x.shape[1:], dtype=x.dtype, generator=g) for g in gens])

    return noise


def pair(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[Tensor, Tensor]:
    """A clean x0 and a first-stage estimate y = x0 + error, complex128 (B, F, T)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, dtype=C128, generator=gen)
    return x0, x0 + 0.7 * torch.randn(shape, dtype=C128, generator=gen)


def oracle_score(sde: OUVESDE, x0: Tensor, y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact score of p_t(x | y) when the data is the single point x0 (one per item)."""

    def score(x: Tensor, t: Tensor) -> Tensor:
        return -(x - sde.mean(x0, y, t)) / sde.std(t)[:, None, None] ** 2

    return score


def times(values: list[float], batch: int = 1) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).repeat_interleave(batch)


def rms(x: Tensor) -> float:
    return x.abs().square().mean().sqrt().item()


# ---------------------------------------------------------------------------------------------
# Closed-form marginals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", OUVE_PARAMS)
def test_ouve_marginal_solves_the_moment_odes_of_its_own_drift_and_diffusion(params: dict) -> None:
    # The mean and variance of dx = f dt + g dw obey dm/dt = f(m) and dS/dt = -2 theta S + g^2
    # from m(0) = x0, S(0) = 0: integrated with the sampler's f and g, they must give the
    # closed forms the loss and the ALD corrector use.
    sde = OUVESDE(**params)
    x0, y = torch.tensor([[[0.3 + 0.7j]]], dtype=C128), torch.tensor([[[-1.2 + 0.4j]]], dtype=C128)
    t_eval = [0.01, sde.t_eps, 0.1, 0.5, 0.9, 1.0]

    def rhs(s: float, state: list[complex]) -> list[complex]:
        drift, g = sde.drift_diffusion(torch.tensor([[[state[0]]]], dtype=C128), y, times([s]))
        return [drift.item(), -2 * sde.theta * state[1] + g.item() ** 2]

    sol = integrate.solve_ivp(rhs, (0.0, 1.0), [complex(x0.item()), 0j], method="DOP853",
                              t_eval=t_eval, rtol=1e-12, atol=1e-14)
    assert sol.success
    t = times(t_eval)
    mean = sde.mean(x0.expand(len(t_eval), 1, 1), y.expand(len(t_eval), 1, 1), t)
    torch.testing.assert_close(mean.flatten(), torch.from_numpy(sol.y[0]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sde.std(t), torch.from_numpy(sol.y[1].real).sqrt(), rtol=1e-9,
                               atol=0)


def test_sbve_marginal_is_the_gaussian_conditional_of_the_ve_process() -> None:
    # Independently of the closed forms: X_s = x0 + int_0^s g dw with g^2 = c k^{2s} (Jukić et
    # al. 2024, Table 1) has Var X_t = Cov(X_t, X_T) = int_0^t g^2 (independent increments) and
    # Var X_T = int_0^T g^2; the bridge's marginal is X_t given X_T = y, by the Gaussian
    # conditioning formula, with the integrals done by quadrature.
    sde = SBVESDE()
    x0, y = torch.tensor([[[0.3 + 0.7j]]], dtype=C128), torch.tensor([[[-1.2 + 0.4j]]], dtype=C128)

    def g2_integral(t: float) -> float:
        return integrate.quad(lambda s: sde.c * sde.k ** (2 * s), 0.0, t, epsabs=0, epsrel=1e-13)[0]

    var_T = g2_integral(sde.T)
    for t in [1e-4, sde.t_eps, 0.2, 0.5, 0.9, 0.999]:
        var_t = g2_integral(t)
        gain = var_t / var_T  # Sigma_12 Sigma_22^-1
        cond_mean = x0 + gain * (y - x0)
        cond_std = math.sqrt(var_t - gain * var_t)
        torch.testing.assert_close(sde.mean(x0, y, times([t])), cond_mean, rtol=1e-7, atol=1e-12)
        # sgmse's eps under the root of sigma_bar_t^2 = var_T - var_t moves the std by eps / 2
        # of it, relatively: 2e-6 at t = 0.999.
        rtol = sde.eps / (var_T - var_t) + 1e-9
        torch.testing.assert_close(sde.std(times([t])).item(), cond_std, rtol=rtol, atol=0)

    # Pinned at both ends: x0 at t = 0; y at T, up to sgmse's eps = 1e-8 (std sqrt(eps)).
    assert sde.std(times([0.0])).item() == 0.0
    torch.testing.assert_close(sde.mean(x0, y, times([0.0])), x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(sde.mean(x0, y, times([sde.T])), y, rtol=0, atol=1e-7)
    assert sde.std(times([sde.T])).item() <= 1.01 * math.sqrt(sde.eps)


# ---------------------------------------------------------------------------------------------
# Samplers with oracle networks
# ---------------------------------------------------------------------------------------------


def pc_error_law(sde: OUVESDE, n_steps: int, snr: float, corrector_steps: int
                 ) -> tuple[float, float]:
    """(q, v) with sample_pc's output = x0 + q (y - x0) + noise of variance v per bin, for the
    oracle score of x0. The oracle makes every step affine in (x, x0, y) with Gaussian noise, so
    the law follows from scalar recursions of sgmse's step formulas, written here in float64
    with x0-relative coordinates (the score is -(x - m_t) / S_t, m_t - x0 = (1 - a_t)(y - x0))."""
    grid = torch.linspace(sde.T, sde.t_eps, n_steps, dtype=torch.float64).tolist()
    q, v = 1.0, sde.std(times([sde.T])).item() ** 2  # the prior y + std(T) z
    for i, t in enumerate(grid):
        dt = grid[i] - grid[i + 1] if i < n_steps - 1 else grid[-1]
        var_t = sde.std(times([t])).item() ** 2
        shift = 1.0 - math.exp(-sde.theta * t)  # m_t - x0 in units of y - x0
        for _ in range(corrector_steps):  # x + s score + sqrt(2 s) z, s = 2 (snr std)^2
            k = 2.0 * snr**2  # s / S_t
            q, v = (1.0 - k) * q + k * shift, (1.0 - k) ** 2 * v + 2.0 * k * var_t
        g2 = sde.drift_diffusion(torch.zeros(1, 1, 1, dtype=C128), torch.zeros(1, 1, 1, dtype=C128),
                                 times([t]))[1].item() ** 2
        k = g2 * dt / var_t  # x - theta (y - x) dt + g^2 dt score, then + g sqrt(dt) z
        q = (1.0 + sde.theta * dt - k) * q - sde.theta * dt + k * shift
        v = (1.0 + sde.theta * dt - k) ** 2 * v + (g2 * dt if i < n_steps - 1 else 0.0)
    return q, v


def assert_gaussian_error(error: Tensor, bias: Tensor, var: float) -> None:
    """``error`` = ``bias`` + complex normal noise of variance ``var`` per bin, over LARGE's
    bins: the noise's mean square within MS_RTOL of ``var``, and no further multiple of the
    bias direction beyond 5 standard deviations of its projection."""
    noise = error - bias
    torch.testing.assert_close(rms(noise) ** 2, var, rtol=MS_RTOL, atol=0)
    if bias.abs().max() > 0:
        extra = (noise * bias.conj()).sum() / bias.abs().square().sum()
        assert extra.abs().item() < 5 * math.sqrt(var) / bias.norm().item()


@pytest.mark.parametrize("params", OUVE_PARAMS)
@pytest.mark.parametrize("n_steps", [30, 5])
@pytest.mark.parametrize("corrector_steps", [0, 1, 2])
def test_pc_sampler_with_the_oracle_score_has_the_law_of_sgmse_steps(
        params: dict, n_steps: int, corrector_steps: int) -> None:
    # At sgmse's 30 steps the last step's contraction hides most of the corrector; 5 steps show
    # it (its step size and noise scale each move v by more than 10% there).
    sde = OUVESDE(**params)
    x0, y = pair(shape=LARGE)
    out = sample_pc(sde, oracle_score(sde, x0, y), y, n_steps=n_steps,
                    corrector_steps=corrector_steps, noise=seeded_noise([1, 2]))
    assert out.dtype == C128
    q, v = pc_error_law(sde, n_steps=n_steps, snr=0.5, corrector_steps=corrector_steps)
    assert_gaussian_error(out - x0, q * (y - x0), v)


@pytest.mark.parametrize("params", OUVE_PARAMS)
@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_pc_sampler_with_the_oracle_score_ends_at_x0(params: dict, corrector_steps: int) -> None:
    sde = OUVESDE(**params)
    x0, y = pair()
    out = sample_pc(sde, oracle_score(sde, x0, y), y, corrector_steps=corrector_steps,
                    noise=seeded_noise([1, 2]))
    # The error law above, x0 + q (y - x0) + noise of variance v, bounds the error; with sgmse's
    # 30 steps both parts are far below the std left at t_eps: the last step denoises to t = 0.
    q, v = pc_error_law(sde, n_steps=30, snr=0.5, corrector_steps=corrector_steps)
    std_eps = sde.std(times([sde.t_eps])).item()
    # The bias plus the noise, whose mean square over 160 bins stays below 1.4 v (5 standard
    # deviations).
    bound = abs(q) * rms(y - x0) + math.sqrt(1.4 * v)
    assert rms(out - x0) <= bound < 0.3 * std_eps


def test_pc_sampler_follows_the_score_it_is_given() -> None:
    # An oracle of another point x0' leads to x0', not to the x0 that y was made from.
    sde = OUVESDE()
    x0, y = pair()
    other = x0 + 0.5 * pair(seed=3)[0]
    out = sample_pc(sde, oracle_score(sde, other, y), y, noise=seeded_noise([1, 2]))
    std_eps = sde.std(times([sde.t_eps])).item()
    assert rms(out - other) < 0.3 * std_eps
    assert rms(out - x0) > 0.9 * rms(other - x0)


def test_sb_ode_with_the_oracle_ends_at_x0() -> None:
    sde = SBVESDE()
    x0, y = pair()
    out = sample_sb(sde, lambda x, t: x0, y, kind="ode")
    assert out.dtype == C128
    # With an exact x0 estimate the ODE stays on the marginal mean. Its only error is sgmse's eps
    # regularisation at the pinned end (sigma_bar_T = sqrt(eps)): a first step off by ~r eps /
    # sigma_T^2 ~ 2e-5 of |y - x0| (r ~ 2e3), shrunk ~30x by the later steps.
    end = sde.mean(x0, y, times([sde.sample_eps], 2))
    assert rms(out - end) < 1e-5 * rms(y - x0)
    assert (end - x0).abs().max() <= 4e-5 * (y - x0).abs().max()  # sigma^2(1e-4) / sigma_T^2


def test_sb_sde_with_the_oracle_ends_at_x0() -> None:
    sde = SBVESDE()
    n_steps = 50
    x0, y = pair(shape=LARGE)
    out = sample_sb(sde, lambda x, t: x0, y, kind="sde", n_steps=n_steps,
                    noise=seeded_noise([1, 2]))
    # With an exact x0 estimate each step draws x_t given (x_prev, x0) of the VE process, so the
    # state before the noiseless last step is exactly N(mean, std^2) at t_prev, the grid's
    # second-to-last time, and the last step returns x0 + r (x_prev - x0), r = sigma_t^2 /
    # sigma_prev^2.
    t_prev, t_last = torch.linspace(sde.T, sde.sample_eps, n_steps + 1, dtype=torch.float64)[-2:]
    (s_prev, s_last), _ = sde.sigmas(torch.stack([t_prev, t_last]))
    r = (s_last / s_prev).item() ** 2
    t = t_prev.repeat(2)
    assert_gaussian_error(out - x0, r * (sde.mean(x0, y, t) - x0), r**2 * sde.std(t)[0].item() ** 2)
    assert rms(out - x0) < 1e-3 * rms(x0)


@pytest.mark.parametrize(("kind", "n_steps", "corrector_steps"),
                         [("pc", 7, 0), ("pc", 7, 2), ("ode", 9, 0), ("sde", 9, 0)])
def test_samplers_call_the_network_once_per_step(kind: str, n_steps: int,
                                                 corrector_steps: int) -> None:
    y = pair()[1]
    seen: list[Tensor] = []

    def net(x: Tensor, t: Tensor) -> Tensor:
        seen.append(t)
        return torch.zeros_like(x)

    if kind == "pc":
        sde = OUVESDE()
        sample_pc(sde, net, y, n_steps=n_steps, corrector_steps=corrector_steps)
        grid = torch.linspace(sde.T, sde.t_eps, n_steps, dtype=torch.float64)
    else:
        sde = SBVESDE()
        sample_sb(sde, net, y, n_steps=n_steps, kind=kind)  # type: ignore[arg-type]
        # The state at grid[i - 1] goes to the network with its own time (not sgmse's grid[i]).
        grid = torch.linspace(sde.T, sde.sample_eps, n_steps + 1, dtype=torch.float64)[:-1]
    assert all(t.shape == (2,) and t.dtype == torch.float64 for t in seen)
    expected = grid.repeat_interleave(1 + corrector_steps)
    torch.testing.assert_close(torch.stack([t[0] for t in seen]), expected, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", OUVE_PARAMS)
def test_dsm_loss_vanishes_at_the_oracle_score(params: dict) -> None:
    sde = OUVESDE(**params)
    x0, y = pair()
    t = sde.train_t(torch.tensor([0.0, 0.6], dtype=torch.float64))
    # For a single point, std * oracle score = -z exactly.
    loss = sde.loss(oracle_score(sde, x0, y), x0, y, t, seeded_noise([1, 2]))
    assert loss.shape == (2,)
    assert loss.dtype == torch.float64
    assert loss.max().item() < 1e-25
    # A zero score leaves 0.5 |z|^2, with z the one draw the loss makes.
    loss = sde.loss(lambda x, t: torch.zeros_like(x), x0, y, t, seeded_noise([1, 2]))
    z = seeded_noise([1, 2])(x0)
    torch.testing.assert_close(loss, 0.5 * z.abs().square().mean(dim=(1, 2)))


def test_sb_loss_vanishes_at_the_oracle_and_is_the_half_mean_square_error() -> None:
    sde = SBVESDE()
    x0, y = pair()
    t = sde.train_t(torch.tensor([0.0, 0.6], dtype=torch.float64))
    assert t[0].item() == sde.t_eps
    loss = sde.loss(lambda x, t: x0, x0, y, t, seeded_noise([1, 2]))
    assert loss.shape == (2,)
    assert loss.max().item() == 0.0
    # Returning the bridge state itself (error std z + w_y (y - x0)): sgmse's 0.5 mean square.
    seen: list[Tensor] = []

    def identity(x: Tensor, t: Tensor) -> Tensor:
        seen.append(x)
        return x

    loss = sde.loss(identity, x0, y, t, seeded_noise([1, 2]))
    torch.testing.assert_close(loss, 0.5 * (seen[0] - x0).abs().square().mean(dim=(1, 2)))
    assert loss.min().item() > 0.0


# ---------------------------------------------------------------------------------------------
# Noise, gradients, autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pc", "sb_sde", "ouve_loss", "sb_loss"])
def test_items_are_reproducible_and_independent_of_the_batch(kind: str) -> None:
    x0, y = pair()
    ouve, sb = OUVESDE(), SBVESDE()
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)

    def run(batch: int, seeds: list[int]) -> Tensor:
        a, b, noise = x0[:batch], y[:batch], seeded_noise(seeds)
        if kind == "pc":
            return sample_pc(ouve, oracle_score(ouve, a, b), b, n_steps=5, noise=noise)
        if kind == "sb_sde":
            return sample_sb(sb, lambda x, t: 0.5 * (x + a), b, n_steps=5, kind="sde",
                             noise=noise)
        if kind == "ouve_loss":
            return ouve.loss(lambda x, t: -x, a, b, t[:batch], noise)
        return sb.loss(lambda x, t: 0.5 * x, a, b, t[:batch], noise)

    both = run(2, [11, 12])
    torch.testing.assert_close(run(2, [11, 12]), both, rtol=0, atol=0)
    torch.testing.assert_close(run(1, [11]), both[:1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(run(2, [11, 13])[1], both[1])


class TinyNet(nn.Module):
    """A score / x0 network with a scalar gain and a 2 x 2 linear map of (re, im), the map in
    bf16 under autocast. Shape: (B, F, T) complex, (B,) -> (B, F, T) complex64."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(-0.5))
        self.mix = nn.Linear(2, 2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        ri = self.mix(torch.view_as_real(x.to(torch.complex64)))  # (B, F, T, 2), bf16 in autocast
        return self.gain * t[:, None, None] * torch.view_as_complex(ri.float().contiguous())


@pytest.mark.parametrize("sde", [OUVESDE(), SBVESDE()], ids=["ouve", "sbve"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_gradients_reach_the_network_and_everything_is_finite(sde: OUVESDE | SBVESDE,
                                                              bf16: bool) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    x0, y = (v.to(torch.complex64) for v in pair())
    t = sde.train_t(torch.rand(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = sde.loss(net, x0, y, t)
        assert loss.dtype == torch.float32
        assert loss.isfinite().all()
        loss.mean().backward()
        if isinstance(sde, OUVESDE):
            out = sample_pc(sde, net, y, n_steps=4)
        else:
            out = sample_sb(sde, net, y, n_steps=4, kind="sde")
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and g.isfinite().all() and g.abs().sum() > 0 for g in grads)
    assert out.dtype == torch.complex64
    assert out.isfinite().all()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        OUVESDE(sigma_min=0.5, sigma_max=0.05)
    with pytest.raises(ValueError, match="t_eps"):
        SBVESDE(t_eps=0.0)
    with pytest.raises(ValueError, match="kind"):
        sample_sb(SBVESDE(), lambda x, t: x, pair()[1], kind="pc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        OUVESDE().loss(lambda x, t: x, *pair(), torch.zeros(3))
