"""Tests for the HiFi-GAN discriminators in models/discriminators/hifigan.py (CPU, a few
seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.discriminators.hifigan import (
    MPD_PERIODS,
    MSD_N_SCALES,
    HiFiGANDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    PeriodDiscriminator,
    ScaleDiscriminator,
)

# HiFi-GAN's MPD + MSD size as quoted in the project's v1 report.
EXPECTED_PARAMS = 70.7e6
PARAM_REL_TOL = 0.01
N_PERIOD_FEATURES = 6  # 5 convs + post conv
N_SCALE_FEATURES = 8  # 7 convs + post conv
BATCH = 2


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sub_discriminators(model: HiFiGANDiscriminator) -> list[nn.Module]:
    return [*model.mpd.discriminators, *model.msd.discriminators]


@pytest.fixture(scope="module")
def model() -> HiFiGANDiscriminator:
    torch.manual_seed(0)
    return HiFiGANDiscriminator()


def test_parameter_count(model: HiFiGANDiscriminator) -> None:
    total = _n_params(model)
    assert total == _n_params(model.mpd) + _n_params(model.msd)
    assert math.isclose(total, EXPECTED_PARAMS, rel_tol=PARAM_REL_TOL), total


def test_default_layout(model: HiFiGANDiscriminator) -> None:
    assert tuple(d.period for d in model.mpd.discriminators) == MPD_PERIODS
    assert len(model.msd.discriminators) == MSD_N_SCALES
    # Spectral norm on the finest scale only (single "original"); weight norm, split into
    # magnitude "original0" and direction "original1", on every other conv.
    finest = model.msd.discriminators[0]
    for disc in _sub_discriminators(model):
        for conv in [*disc.convs, disc.conv_post]:
            weight = conv.parametrizations.weight
            if disc is finest:
                assert hasattr(weight, "original")
                assert not hasattr(weight, "original0")
            else:
                assert hasattr(weight, "original0")
                assert hasattr(weight, "original1")


@pytest.mark.parametrize("n_samples", [8000, 7919])  # 7919 is prime: every period needs padding
def test_output_structure(model: HiFiGANDiscriminator, n_samples: int) -> None:
    wave = torch.randn(BATCH, n_samples)
    with torch.no_grad():
        logits, features = model(wave)

    n_disc = len(MPD_PERIODS) + MSD_N_SCALES
    assert len(logits) == n_disc
    assert len(features) == n_disc
    for score, fmaps in zip(logits, features, strict=True):
        assert score.dim() == 2
        assert score.shape[0] == BATCH
        assert score.shape[1] > 0
        assert torch.isfinite(score).all()
        assert all(f.shape[0] == BATCH for f in fmaps)

    mpd_features = features[: len(MPD_PERIODS)]
    for period, fmaps in zip(MPD_PERIODS, mpd_features, strict=True):
        assert len(fmaps) == N_PERIOD_FEATURES
        folded = math.ceil(n_samples / period)
        assert fmaps[0].shape == (BATCH, 32, math.ceil(folded / 3), period)
        assert fmaps[-1].shape[1] == 1

    msd_features = features[len(MPD_PERIODS) :]
    length = n_samples
    for scale, fmaps in enumerate(msd_features):
        if scale > 0:
            length = length // 2 + 1  # AvgPool1d(4, 2, padding=2)
        assert len(fmaps) == N_SCALE_FEATURES
        assert fmaps[0].shape == (BATCH, 128, length)
        assert fmaps[-1].shape[1] == 1


def test_accepts_channel_dim(model: HiFiGANDiscriminator) -> None:
    wave = torch.randn(BATCH, 3000)
    model.eval()  # freeze spectral norm's power iteration so two calls are comparable
    try:
        with torch.no_grad():
            logits_2d, _ = model(wave)
            logits_3d, _ = model(wave.unsqueeze(1))
    finally:
        model.train()
    for a, b in zip(logits_2d, logits_3d, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(3000,), (BATCH, 2, 3000), (BATCH, 1, 1, 3000)])
def test_rejects_bad_shapes(model: HiFiGANDiscriminator, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected a waveform"):
        model(torch.randn(shape))


def test_rejects_too_short_for_period() -> None:
    with pytest.raises(ValueError, match="too short"):
        PeriodDiscriminator(11)(torch.randn(1, 5))


def test_gradients_reach_first_conv(model: HiFiGANDiscriminator) -> None:
    model.zero_grad(set_to_none=True)
    wave = torch.randn(BATCH, 4001, requires_grad=True)
    logits, features = model(wave)
    # Touch logits and a feature map so both paths the GAN losses use carry gradient.
    loss = sum(s.square().mean() for s in logits) + sum(f[0].abs().mean() for f in features)
    loss.backward()

    for disc in _sub_discriminators(model):
        params = list(disc.convs[0].parameters())
        assert params
        for p in params:
            assert p.grad is not None
            assert torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0
    # The generator is trained through D, so the input must receive gradient too.
    assert wave.grad is not None
    assert torch.isfinite(wave.grad).all()
    assert wave.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_custom_configuration() -> None:
    torch.manual_seed(0)
    model = HiFiGANDiscriminator(periods=(2, 3), n_scales=1)
    logits, features = model(torch.randn(1, 1, 1000))
    assert len(logits) == len(features) == 3
    assert isinstance(model.mpd, MultiPeriodDiscriminator)
    assert isinstance(model.msd, MultiScaleDiscriminator)
    assert isinstance(model.msd.discriminators[0], ScaleDiscriminator)


@pytest.mark.parametrize("kwargs", [{"periods": ()}, {"n_scales": 0}])
def test_rejects_empty_configuration(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must"):
        HiFiGANDiscriminator(**kwargs)
