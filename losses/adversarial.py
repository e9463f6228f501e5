"""Least-squares GAN losses and feature matching for the HiFi-GAN discriminators.

LSGAN (Mao et al., 2017) with the targets HiFi-GAN uses (Kong et al., 2020): real -> 1,
fake -> 0 for the discriminator, fake -> 1 for the generator. The inputs are the outputs of
``models.discriminator.HiFiGANDiscriminator``: one logits tensor per sub-discriminator and, per
sub-discriminator, one list of feature maps. The training step calls the discriminator on the
target and on ``estimate.detach()`` for :func:`discriminator_loss`, and on the target and the
(attached) estimate for the generator terms.

Every term is computed in float32 with autocast disabled, like the other losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.separation import autocast_off, to_float32

REAL_LABEL = 1.0
FAKE_LABEL = 0.0


def _check_same_length(real: list, fake: list, what: str) -> None:
    if len(real) != len(fake) or not real:
        raise ValueError(f"expected equal, non-empty {what} lists, got {len(real)} and {len(fake)}")


def discriminator_loss(real_logits: list[Tensor], fake_logits: list[Tensor]) -> Tensor:
    """``sum_k mean((1 - D_k(real))^2) + mean(D_k(fake)^2)`` over sub-discriminators ``k``.

    Shape:
        real_logits, fake_logits: one tensor per sub-discriminator, any shape, matching in
            count (real and fake of one ``k`` may differ in shape).
        returns: scalar.
    """
    _check_same_length(real_logits, fake_logits, "logit")
    with autocast_off(real_logits[0]):
        total = real_logits[0].new_zeros((), dtype=torch.float32)
        for real, fake in zip(real_logits, fake_logits, strict=True):
            real_term = (REAL_LABEL - to_float32(real)).square().mean()
            fake_term = (to_float32(fake) - FAKE_LABEL).square().mean()
            total = total + real_term + fake_term
        return total


def generator_adversarial_loss(fake_logits: list[Tensor]) -> Tensor:
    """``sum_k mean((1 - D_k(fake))^2)`` over sub-discriminators ``k``.

    Shape:
        fake_logits: one tensor per sub-discriminator, any shape.
        returns: scalar.
    """
    if not fake_logits:
        raise ValueError("expected at least one sub-discriminator's logits")
    with autocast_off(fake_logits[0]):
        total = fake_logits[0].new_zeros((), dtype=torch.float32)
        for fake in fake_logits:
            total = total + (REAL_LABEL - to_float32(fake)).square().mean()
        return total


def feature_matching_loss(
    real_features: list[list[Tensor]], fake_features: list[list[Tensor]]
) -> Tensor:
    """L1 between the discriminator's feature maps of the target and of the estimate.

    ``sum_k (1 / L_k) sum_l mean|F_kl(real) - F_kl(fake)|``: the mean absolute difference per
    layer (averaged over every element of the map), averaged over the ``L_k`` layers of
    sub-discriminator ``k``, summed over the sub-discriminators.

    Averaging over layers (HiFi-GAN sums them) keeps the term's size independent of how deep
    each sub-discriminator is, so MPD branches (6 maps) and MSD scales (8 maps) count the same;
    summing over sub-discriminators matches the adversarial terms. With the default 5 periods
    and 3 scales this is about 1/6.75 of HiFi-GAN's sum over all 54 maps, so HiFi-GAN's weight
    of 2 corresponds to about 13.5 here.

    The real features are detached: the target is not being generated, and the discriminator
    must not be trained by the generator's loss through them.

    Shape:
        real_features, fake_features: per sub-discriminator, a list of maps of any shape; the
            real and fake maps at each position must have the same shape.
        returns: scalar.
    """
    _check_same_length(real_features, fake_features, "feature")
    with autocast_off(fake_features[0][0]):
        total = fake_features[0][0].new_zeros((), dtype=torch.float32)
        for real_maps, fake_maps in zip(real_features, fake_features, strict=True):
            _check_same_length(real_maps, fake_maps, "feature-map")
            per_layer = []
            for real, fake in zip(real_maps, fake_maps, strict=True):
                if real.shape != fake.shape:  # broadcasting would hide a mismatch
                    raise ValueError(
                        f"feature maps differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}"
                    )
                per_layer.append((to_float32(real).detach() - to_float32(fake)).abs().mean())
            total = total + torch.stack(per_layer).mean()
        return total


__all__ = ["discriminator_loss", "feature_matching_loss", "generator_adversarial_loss"]
