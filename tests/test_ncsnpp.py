"""NCSN++ (models/refiner/ncsnpp.py) at the tiny size: output shapes for any (F, T), the FIR
resampling against upfirdn2d's definition, the time conditioning, equal gradients with checkpointing
on and off, bf16 autocast, the internal padding, a state-dict rebuild and the documented sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.refiner.ncsnpp import (
    FIR_TAPS,
    RECIPE,
    TINY,
    NCSNpp,
    ResBlockBigGAN,
    default_init_,
    fir_downsample,
    fir_kernel,
    fir_upsample,
)

# The numbers written in NCSNpp's docstring.
DEFAULT_PARAMS, RECIPE_PARAMS, TINY_PARAMS = 64_476_034, 16_144_834, 45_314
T_EPS = 0.03  # sgmse's smallest diffusion time


# One torch thread per test (conftest.py): small tensors on shared cores only contend.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(**overrides: object) -> NCSNpp:
    torch.manual_seed(0)
    return NCSNpp(**{**TINY, **overrides})


def unzeroed(model: NCSNpp) -> NCSNpp:
    """``model`` with every conv re-initialised at scale 1. At init the zero-initialised convs
    (the last of each block, the output conv) make the output ~1e-5 and its gradients tiny, so a
    comparison of outputs or gradients would pass whatever the network did."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                default_init_(module.weight)
    return model


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    t = T_EPS + (1 - T_EPS) * torch.rand(shape[0], generator=gen)
    return x, t


def weighted_sum(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A loss linear in the output: its gradients do not shrink with the output's scale."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out.float() * weight).sum()


def test_a_new_block_is_its_skip_path_rescaled() -> None:
    """score_sde's init: the block's last conv starts at ~0 (scale 1e-10), so a block that keeps
    the shape starts as x / sqrt(2), the skip rescaling, whatever the time embedding."""
    torch.manual_seed(0)
    block = ResBlockBigGAN(in_ch=8, out_ch=8, temb_dim=16, dropout=0.0)
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        out = block(x, torch.randn(2, 16))
    torch.testing.assert_close(out, x / math.sqrt(2), atol=1e-4, rtol=0)
    assert float(out.sub(x).abs().max()) > 0.1  # rescaled, not the identity


@pytest.mark.parametrize("ch_mult", [(1, 2), (1, 2, 2)])
@pytest.mark.parametrize(("n_freq", "n_frames"), [(65, 37), (64, 64), (7, 3), (1, 1)])
def test_output_has_the_input_size(ch_mult: tuple[int, ...], n_freq: int, n_frames: int) -> None:
    model = tiny_model(ch_mult=ch_mult)
    x, t = inputs((2, 6, n_freq, n_frames))
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (2, 2, n_freq, n_frames)
    assert torch.isfinite(out).all()


def upfirdn2d_reference(
    x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, down: int = 1, pad: tuple[int, int]
) -> torch.Tensor:
    """upfirdn2d as score_sde (StyleGAN2) defines it: up - 1 zeros after each sample, ``pad``
    zeros before and after, convolution with the kernel, every ``down``-th sample."""
    batch, channels, height, width = x.shape
    stuffed = x.new_zeros(batch, channels, height * up, width * up)
    stuffed[..., ::up, ::up] = x
    stuffed = F.pad(stuffed, (pad[0], pad[1], pad[0], pad[1]))
    flipped = kernel.flip(0, 1).expand(channels, 1, *kernel.shape)  # convolution, not correlation
    return F.conv2d(stuffed, flipped, groups=channels)[..., ::down, ::down]


def test_fir_resampling_is_score_sdes_upfirdn2d() -> None:
    kernel = fir_kernel()
    taps = torch.tensor(FIR_TAPS)
    torch.testing.assert_close(kernel, torch.outer(taps, taps) / taps.sum() ** 2)
    assert float(kernel.sum()) == pytest.approx(1.0)
    x = torch.randn(2, 3, 10, 13, generator=torch.Generator().manual_seed(0))
    # score_sde's downsample_2d / upsample_2d with factor 2, gain 1, a 4-tap kernel.
    torch.testing.assert_close(fir_downsample(x, kernel),
                               upfirdn2d_reference(x, kernel, down=2, pad=(1, 1)))
    torch.testing.assert_close(fir_upsample(x, kernel),
                               upfirdn2d_reference(x, 4 * kernel, up=2, pad=(2, 1)))


def test_fir_resampling_keeps_constants_and_linear_ramps() -> None:
    """Gain 1 both ways away from the zero-padded borders, and no half-sample shift: down then
    up gives a linear ramp back exactly (so also its mean) in the interior."""
    kernel = fir_kernel()
    const = torch.full((1, 1, 16, 16), 2.5)
    down, up = fir_downsample(const, kernel), fir_upsample(const, kernel)
    assert down.shape == (1, 1, 8, 8)
    assert up.shape == (1, 1, 32, 32)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full((1, 1, 6, 6), 2.5))
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.full((1, 1, 30, 30), 2.5))
    assert float(down[..., 0, 0]) < 2.5  # zeros beyond the border
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = (0.3 * rows - 0.7 * cols + 1.0)[None, None]
    back = fir_upsample(fir_downsample(ramp, kernel), kernel)
    torch.testing.assert_close(back[..., 4:-4, 4:-4], ramp[..., 4:-4, 4:-4])


def test_time_embedding_embeds_log_t_and_conditions_the_output() -> None:
    model = tiny_model()
    x, t = inputs((2, 6, 16, 12))
    t_high, t_low = torch.full((2,), 0.9), torch.full((2,), 0.05)
    # log(t), as sgmse: the features of t are sin/cos of 2 pi log(t) times the frequencies.
    phase = 2 * torch.pi * torch.log(t_low)[:, None] * model.fourier_freqs
    features = torch.cat([phase.sin(), phase.cos()], dim=-1)
    torch.testing.assert_close(model.time_embedding(t_low), F.silu(model.temb_mlp(features)))
    with torch.no_grad():
        out_high = model(x, t_high)
    # Zero-initialised output conv: the untrained output is ~0 whatever t.
    assert out_high.abs().max() < 1e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(2, 2, 16, 12, generator=torch.Generator().manual_seed(1))
    (model(x, t) - target).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        out_high, out_low = model(x, t_high), model(x, t_low)
    # After one step: a change with t far above rounding (at init it is ~1e-10).
    assert (out_high - out_low).abs().max() > 1e-2 * out_high.abs().max()


@pytest.mark.parametrize("autocast", [False, True])
def test_grad_checkpoint_gives_the_same_gradients(autocast: bool) -> None:
    model = unzeroed(tiny_model(dropout=0.1)).train()  # dropout: the recompute must replay it
    x, t = inputs((2, 6, 12, 10))

    def gradients_and_saved(grad_checkpoint: bool) -> tuple[list[torch.Tensor], int]:
        model.grad_checkpoint = grad_checkpoint
        model.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        saved = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(tensor)
            return tensor

        torch.manual_seed(1)  # the same dropout masks in both runs
        with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
              torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)):
            out = model(x_in, t)
        weighted_sum(out).backward()
        return [p.grad for p in model.parameters()] + [x_in.grad], len(saved)

    plain, n_saved_plain = gradients_and_saved(False)
    ckpt, n_saved_ckpt = gradients_and_saved(True)
    # Checkpointed blocks save nothing of their own in forward (checkpoint's own hooks take over).
    assert n_saved_ckpt < n_saved_plain / 4
    torch.testing.assert_close(ckpt, plain)


def test_bf16_autocast_is_finite_and_close_to_float32() -> None:
    model = unzeroed(tiny_model()).train()
    x, t = inputs((2, 6, 33, 20))
    with torch.no_grad():
        ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    weighted_sum(out).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert float((out.detach().float() - ref).norm() / ref.norm()) < 0.05  # measured 0.014


def test_padding_is_zeros_at_the_end_of_both_axes() -> None:
    """What the model does to a 13 x 10 input is what it does to that input zero-padded by hand
    to 16 x 12 (a multiple of 4, so it pads nothing more), cropped back. A pad elsewhere (at the
    start, centred) or of other values (reflection) changes the output."""
    model = unzeroed(tiny_model(ch_mult=(1, 2, 2)))
    x, t = inputs((2, 6, 13, 10))
    with torch.no_grad():
        out = model(x, t)
        by_hand = model(F.pad(x, (0, 2, 0, 3)), t)[..., :13, :10]
        reflected = model(F.pad(x, (0, 2, 0, 3), mode="reflect"), t)[..., :13, :10]
    torch.testing.assert_close(out, by_hand)
    assert not torch.allclose(out, reflected, atol=1e-4)


def test_state_dict_rebuilds_the_model() -> None:
    """The Fourier frequencies are random at construction: they must travel with the weights
    (and the FIR kernels, derived from a constant, need not)."""
    model = unzeroed(tiny_model())
    torch.manual_seed(1)
    rebuilt = NCSNpp(**TINY)
    assert not torch.equal(rebuilt.fourier_freqs, model.fourier_freqs)
    assert not any(key.endswith(".fir") for key in model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    x, t = inputs((1, 6, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), model(x, t))


@pytest.mark.parametrize(
    ("size", "n_params"), [({}, DEFAULT_PARAMS), (RECIPE, RECIPE_PARAMS), (TINY, TINY_PARAMS)]
)
def test_parameter_counts_are_the_documented_ones(size: dict, n_params: int) -> None:
    with torch.device("meta"):  # no memory, no init cost at the larger sizes
        model = NCSNpp(**size)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert f"{n_params:,}" in NCSNpp.__doc__
