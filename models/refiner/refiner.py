"""A score-based generative refiner on top of any extractor (SGMSE / StoRM for TSE).

The first stage, any registered family, picks the speaker; a diffusion model in SGMSE's
compressed complex STFT domain, conditioned on the mixture and on the first stage's estimate,
removes what the first stage leaves (residual noise, artefacts, band-limited highs), as StoRM
(Lemercier et al., "StoRM: A Diffusion-based Stochastic Regeneration Model for Speech
Enhancement and Dereverberation", 2023) does for enhancement:

mix, ref -> first stage (frozen) -> estimate e
mix, e -> ÷RMS x LEVEL -> compressed STFT (alpha |X|^beta e^(j angle X)) -> Y, E
sampler (OUVE: predictor-corrector from E + noise; SBVE: Schrödinger bridge from E), its
    network NCSN++([x_t, Y, E], t) -> compressed iSTFT -> x RMS / LEVEL

The SDE's "noisy" end is the first stage's estimate E (StoRM): the diffusion only has to
travel from what the extractor produced to the clean target. The spectral transform and the
EARS 48 kHz values follow sgmse (github sp-uhh/sgmse, MIT, Copyright (c) 2022 Signal
Processing, Universität Hamburg); the SDEs and samplers are models/refiner/sdes.py and
models/refiner/samplers.py, the network models/refiner/ncsnpp.py.

Training (``train.py``, ``loss.score_matching``): the first stage runs without gradients, and
only the score network learns, from the SDE's loss (denoising score matching for OUVE, data
prediction for SBVE) at a random diffusion time per item. ``forward`` then needs the target:
a family with an objective of its own takes ``target=`` while training (models/registry.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsp.level import rms_scale
from dsp.stft import STFT
from models.refiner.ncsnpp import NCSNpp
from models.refiner.samplers import sample_pc, sample_sb
from models.refiner.sdes import OUVESDE, SBVESDE

SDES = ("ouve", "sbve")
SB_SAMPLERS = ("ode", "sde")
# The RMS the refiner puts every mixture (and its first-stage estimate) at before the
# transform. sgmse normalises each noisy utterance to a peak of 1, and its alpha and sigma
# values were tuned on those spectrogram values; speech peaks sit 15-25 dB above its RMS, so
# an RMS of 0.1 lands in that range while keeping the contract's scale (the RMS of the
# mixture, or of a whole recording when a caller runs windows) and hence scale equivariance.
LEVEL = 0.1
# Floor under |X| before the compression power: |X|^beta (beta < 1) has an infinite slope at 0.
MAG_EPS = 1e-12


@dataclass
class SGMSERefinerArgs:
    """The refiner's arguments besides the sample rate (``model`` section,
    ``arch: sgmse_refiner``). Defaults: SGMSE's EARS 48 kHz transform, its OUVE SDE and PC
    sampler, and a compact NCSN++ for one 24 GB GPU (models/refiner/ncsnpp.py: RECIPE)."""

    # The first stage: a trained extractor's checkpoint of any family. Its model arguments are
    # copied into this model's (``first_stage``) and its (EMA) weights into this model's at
    # the start of training, so a refiner checkpoint rebuilds both stages on its own.
    first_stage_ckpt: str = ""
    # The first stage's model_args ({"arch": ..., ...}). Filled from first_stage_ckpt; written
    # by hand only for tests and smoke runs (an untrained first stage).
    first_stage: dict[str, Any] = field(default_factory=dict)
    # SGMSE's compressed spectrogram, the EARS 48 kHz recipe's values: 1534-point FFT (768
    # bins, 31.3 Hz each, a multiple of 2^8 for the U-Net), hop 384 (8 ms), alpha 0.065,
    # beta 0.667.
    n_fft: int = 1534
    hop_length: int = 384
    spec_factor: float = 0.065
    spec_abs_exponent: float = 0.667
    # The SDE (models/refiner/sdes.py): ouve (score matching, PC sampler) or sbve
    # (Schrödinger bridge, data prediction). OUVE at the EARS 48 kHz recipe's values (sgmse
    # README: theta 2, sigma_min 0.1, sigma_max 1; its 16 kHz defaults are 1.5, 0.05, 0.5), SBVE
    # at sgmse's.
    sde: str = "ouve"
    theta: float = 2.0
    sigma_min: float = 0.1
    sigma_max: float = 1.0
    sb_k: float = 2.6
    sb_c: float = 0.4
    t_eps: float = 0.03  # training and sampling stop short of t = 0 (sgmse)
    # Sampling: n_steps (sgmse: 30 for OUVE, 50 for SBVE), the corrector's SNR and steps (PC),
    # the SB sampler kind; val_steps in train.py's validations, where every update of the
    # best checkpoint waits for them; the seed of the sampling noise (each batch item draws
    # from its own generator, so a result does not depend on its batch).
    n_steps: int = 30
    snr: float = 0.5
    corrector_steps: int = 1
    sb_sampler: str = "ode"
    val_steps: int = 8
    seed: int = 0
    # The score network (models/refiner/ncsnpp.py): its RECIPE, sgmse's 48 kHz layout at half the
    # width (16.1 M parameters; sgmse's nf 128 is 64.5 M)
    nf: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 2, 2, 2])
    num_res_blocks: int = 2
    fourier_scale: float = 16.0
    dropout: float = 0.0


class CompressedSpectrogram(nn.Module):
    """SGMSE's transform: ``alpha |X|^beta e^(j angle X)`` of a centred Hann STFT, and back.

    Shape:
        wave (B, N) -> (B, F, T) complex64; inverse: (B, F, T), length -> (B, N)
    """

    def __init__(self, *, n_fft: int, hop_length: int, factor: float, exponent: float) -> None:
        super().__init__()
        self.stft = STFT(n_fft=n_fft, win_length=n_fft, hop_length=hop_length)
        self.factor, self.exponent = factor, exponent

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.stft(wave)  # float32 whatever the autocast
        mag = spec.abs().clamp_min(MAG_EPS)
        return self.factor * spec * mag.pow(self.exponent - 1)

    def inverse(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        spec = spec.to(torch.complex64) / self.factor
        mag = spec.abs().clamp_min(MAG_EPS)
        return self.stft.inverse(spec * mag.pow(1 / self.exponent - 1), length)


class SGMSERefiner(nn.Module):
    """First stage (frozen) + score-based refiner; the registry's contract
    (models/registry.py), with ``target=`` in training (see the module docstring).

    ``first_stage`` is the extractor it refines, built by the registry from the ``first_stage``
    model_args (a family never imports the registry); ``first_stage_ckpt`` names the file whose
    weights ``models.registry.load_first_stage`` copies into it when a training run starts.
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        first_stage: nn.Module | None,
        first_stage_ckpt: str = "",
        n_fft: int = 1534,
        hop_length: int = 384,
        spec_factor: float = 0.065,
        spec_abs_exponent: float = 0.667,
        sde: str = "ouve",
        theta: float = 2.0,
        sigma_min: float = 0.1,
        sigma_max: float = 1.0,
        sb_k: float = 2.6,
        sb_c: float = 0.4,
        t_eps: float = 0.03,
        n_steps: int = 30,
        snr: float = 0.5,
        corrector_steps: int = 1,
        sb_sampler: str = "ode",
        val_steps: int = 8,
        seed: int = 0,
        nf: int = 64,
        ch_mult: list[int] | None = None,  # None: the recipe's (SGMSERefinerArgs)
        num_res_blocks: int = 2,
        fourier_scale: float = 16.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if sde not in SDES:
            raise ValueError(f"sde {sde!r}: expected one of {', '.join(SDES)}")
        if sb_sampler not in SB_SAMPLERS:
            raise ValueError(f"sb_sampler {sb_sampler!r}: expected one of {', '.join(SB_SAMPLERS)}")
        if first_stage is None:
            raise ValueError("the refiner needs a first stage: set first_stage_ckpt (a trained "
                             "extractor's checkpoint) or first_stage (its model_args)")
        if n_steps < 1 or val_steps < 1:
            raise ValueError(f"n_steps {n_steps} and val_steps {val_steps} must be >= 1")
        self.sample_rate = sample_rate
        self.first_stage_ckpt = first_stage_ckpt
        self.first_stage = first_stage
        if getattr(self.first_stage, "sample_rate", sample_rate) != sample_rate:
            raise ValueError(f"the first stage runs at {self.first_stage.sample_rate} Hz, the "
                             f"refiner at {sample_rate} Hz")
        self.first_stage.requires_grad_(False).eval()
        self.spectrum = CompressedSpectrogram(n_fft=n_fft, hop_length=hop_length,
                                              factor=spec_factor, exponent=spec_abs_exponent)
        self.sde_name = sde
        self.sde = (OUVESDE(theta=theta, sigma_min=sigma_min, sigma_max=sigma_max, t_eps=t_eps)
                    if sde == "ouve" else SBVESDE(k=sb_k, c=sb_c, t_eps=t_eps))
        # Real and imaginary parts of three spectra in (the state, the mixture, the first
        # stage's estimate), of one out (the score for OUVE, the clean spectrum for SBVE).
        ch_mult = SGMSERefinerArgs().ch_mult if ch_mult is None else ch_mult
        self.net = NCSNpp(in_channels=6, out_channels=2, nf=nf, ch_mult=tuple(ch_mult),
                          num_res_blocks=num_res_blocks, fourier_scale=fourier_scale,
                          dropout=dropout)
        self.sampling = {"snr": snr, "corrector_steps": corrector_steps, "kind": sb_sampler}
        self.n_steps = n_steps  # runtime: the sampler's steps (``validation`` lowers it)
        self.val_steps = val_steps
        self.seed = seed

    # -- runtime settings the trainer sets -----------------------------------------------------

    @property
    def grad_checkpoint(self) -> bool:
        return self.net.grad_checkpoint

    @grad_checkpoint.setter
    def grad_checkpoint(self, value: bool) -> None:
        self.net.grad_checkpoint = value

    def train(self, mode: bool = True) -> SGMSERefiner:
        """The first stage stays in eval mode: it is frozen, dropout and all."""
        super().train(mode)
        self.first_stage.eval()
        return self

    @contextlib.contextmanager
    def validation(self) -> Iterator[None]:
        """train.py's validations sample ``val_steps`` steps instead of ``n_steps``."""
        steps, self.n_steps = self.n_steps, self.val_steps
        try:
            yield
        finally:
            self.n_steps = steps

    # -- the network in the spectral domain ----------------------------------------------------

    def _network(self, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """Shape: x, y, e (B, F, T) complex, t (B,) -> (B, F, T) complex64"""
        feats = torch.cat([torch.view_as_real(s.to(torch.complex64)).permute(0, 3, 1, 2)
                           for s in (x, y, e)], dim=1)  # (B, 6, F, T)
        out = self.net(feats, t).float()  # (B, 2, F, T)
        return torch.complex(out[:, 0], out[:, 1])

    def _gain(self, mix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """What puts ``mix`` at RMS ``LEVEL``: 1 / scale, then 1 / the RMS of the result (the
        window's own level). Written in two steps, as models/semamba.py does, so that the
        epsilon in ``rms_scale`` acts on a unit-level signal: the gain of ``a * mix`` is then
        the gain of ``mix`` / a to float precision even for a quiet input.

        Shape: mix (B, N), scale (B, 1) -> (B, 1)
        """
        return LEVEL / (scale * rms_scale(mix.float() / scale))

    def _spectra(self, mix: torch.Tensor, est: torch.Tensor,
                 gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's and the first-stage estimate's spectra at the refiner's level."""
        return self.spectrum(mix.float() * gain), self.spectrum(est.float() * gain)

    def _noise(self, batch: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """Complex standard normal noise, each batch item from its own seeded generator: a
        result is the same alone or in any batch, and the same on every call."""
        gens = [torch.Generator(device=device).manual_seed(self.seed + i) for i in range(batch)]

        def noise(like: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype,
                                            device=like.device) for g in gens])

        return noise

    # -- the contract ----------------------------------------------------------------------------

    def encode_reference(self, ref: torch.Tensor) -> Any:
        """The first stage's reference embedding (its own shape)."""
        with torch.no_grad():
            return self.first_stage.encode_reference(ref)

    def _model_fn(self, y: torch.Tensor, e: torch.Tensor
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """What the SDE's sampler and loss call, ``(x_t, t) -> (B, F, T)``: for OUVE the score,
        ``-net / std(t)``, so that the network predicts the unit noise of x_t (its loss is then
        |z - net|², of the same size at every t; sgmse's 48 kHz NCSN++ divides by t instead);
        for SBVE the clean spectrum itself (sgmse's data prediction, c_skip 0)."""
        if self.sde_name == "ouve":
            return lambda x, t: -self._network(x, y, e, t) / self.sde.std(t)[:, None, None]
        return lambda x, t: self._network(x, y, e, t)

    def _refine(self, mix: torch.Tensor, est: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        gain = self._gain(mix, scale)
        y, e = self._spectra(mix, est, gain)
        noise = self._noise(mix.shape[0], mix.device)
        if self.sde_name == "ouve":
            x0 = sample_pc(self.sde, self._model_fn(y, e), e, n_steps=self.n_steps,
                           snr=self.sampling["snr"],
                           corrector_steps=self.sampling["corrector_steps"], noise=noise)
        else:
            x0 = sample_sb(self.sde, self._model_fn(y, e), e, n_steps=self.n_steps,
                           kind=self.sampling["kind"], noise=noise)
        return self.spectrum.inverse(x0, mix.shape[-1]) / gain

    def extract(self, mix: torch.Tensor, z_ref: Any, scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The first stage's estimate, refined by ``n_steps`` of the sampler.

        ``scale`` (B, 1) is the level the first stage divides the mixture by (default its
        RMS); a caller running a recording window by window passes one for all windows. The
        refiner then puts each window at its own RMS ``LEVEL`` and back (``_gain``).

        Shape:
            mix (B, N) -> (B, N)
        """
        scale = rms_scale(mix) if scale is None else scale.float()
        with torch.no_grad():
            est = self.first_stage.extract(mix, z_ref, scale).float()
        return self._refine(mix, est, scale)

    def forward(
        self,
        mix: torch.Tensor,
        ref: torch.Tensor,
        *,
        with_aux: bool = False,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``extract(mix, encode_reference(ref))``; with ``target`` (training), no sampling:
        the SDE's loss at one random diffusion time per item instead.

        With ``target``, returns ``(first-stage estimate, {"score_matching": (B,) loss})``:
        the estimate (no gradient) is what the trainer logs, the loss what it trains. Without,
        the refined estimate (and an empty aux with ``with_aux``).

        Shape: mix (B, N), ref (B, M), target (B, N) -> (B, N)
        """
        if target is None:
            est = self.extract(mix, self.encode_reference(ref))
            return (est, {}) if with_aux else est
        scale = rms_scale(mix)
        with torch.no_grad():
            first = self.first_stage(mix, ref).float()
        gain = self._gain(mix, scale)
        y, e = self._spectra(mix, first, gain)
        x0 = self.spectrum(target.float() * gain)
        t = self.sde.train_t(torch.rand(mix.shape[0], device=mix.device))
        loss = self.sde.loss(self._model_fn(y, e), x0, e, t, torch.randn_like)
        return (first, {"score_matching": loss}) if with_aux else first
