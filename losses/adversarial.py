"""Least-squares GAN losses: HiFi-GAN's (with feature matching) and MetricGAN's.

LSGAN (Mao et al., 2017) with the targets HiFi-GAN uses (Kong et al., 2020): real -> 1, fake -> 0
for the discriminator, fake -> 1 for the generator. The inputs are the outputs of
``models.discriminators.hifigan.HiFiGANDiscriminator``: one logits tensor per sub-discriminator and,
per sub-discriminator, one list of feature maps. The training step calls the discriminator on the
target and on ``estimate.detach()`` for :func:`discriminator_loss`, and on the target and the
(attached) estimate for the generator terms.

The three functions compute exactly HiFi-GAN's ``discriminator_loss``, ``generator_loss`` and
``feature_loss`` (jik876/hifi-gan, MIT, ``models.py``). HiFi-GAN's generator objective is
``adv + feature_loss + 45 * mel``; here the separation losses take the place of the mel term and
``gan.adv_weight = gan.fm_weight = 1`` (the defaults) keep HiFi-GAN's balance of the other two.

With ``gan.kind: metric`` the least-squares targets are a metric instead
(:func:`metric_discriminator_loss`, :func:`metric_generator_loss`, on the predictions of
``models.discriminators.metric_gan.MetricDiscriminator``).

Each function takes a ``weights`` (B,) 0/1 mask (optional for HiFi-GAN's): the terms are then
computed on the selected items alone (the training step passes the target-present mask, since a
target-absent item has no real target), over the whole batch with no data-dependent branch, so
every DDP rank runs the same operations whatever its batch holds.

Every term is computed in float32 with autocast disabled, like the other losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsp.precision import autocast_off, to_float32
from losses.separation import weighted_mean

REAL_LABEL = 1.0
FAKE_LABEL = 0.0
# The factor inside HiFi-GAN's feature_loss (lambda_fm = 2 in Kong et al., 2020).
HIFIGAN_FM_SCALE = 2.0


def _check_same_length(real: list, fake: list, what: str) -> None:
    if len(real) != len(fake) or not real:
        raise ValueError(f"expected equal, non-empty {what} lists, got {len(real)} and {len(fake)}")


def _mean(x: Tensor, weights: Tensor | None) -> Tensor:
    """``x.mean()`` over every element, or, with ``weights``, the mean over the selected items of
    each item's mean. Every item of a map has as many elements, so all-ones weights give the
    plain mean, and a 0/1 mask gives the plain mean of the selected sub-batch with no
    data-dependent branch (see ``losses.separation.weighted_mean``).

    Shape:
        x: ``(B, ...)``; weights: ``(B,)`` or ``None``; returns a scalar.
    """
    if weights is None:
        return x.mean()
    return weighted_mean(x.flatten(1).mean(1), weights)


def discriminator_loss(
    real_logits: list[Tensor], fake_logits: list[Tensor], *, weights: Tensor | None = None
) -> Tensor:
    """``sum_k mean((1 - D_k(real))^2) + mean(D_k(fake)^2)`` over sub-discriminators ``k``.

    Shape:
        real_logits, fake_logits: one tensor per sub-discriminator, any shape, matching in
            count (real and fake of one ``k`` may differ in shape; with ``weights`` both start
            with the batch axis ``B``).
        weights: ``(B,)`` 0/1 mask of the items that count (the target-present ones: a
            target-absent item has no real target), or ``None`` for every item.
        returns: scalar.
    """
    _check_same_length(real_logits, fake_logits, "logit")
    with autocast_off(real_logits[0]):
        total = real_logits[0].new_zeros((), dtype=torch.float32)
        for real, fake in zip(real_logits, fake_logits, strict=True):
            real_term = _mean((REAL_LABEL - to_float32(real)).square(), weights)
            fake_term = _mean((to_float32(fake) - FAKE_LABEL).square(), weights)
            total = total + real_term + fake_term
        return total


def generator_adversarial_loss(
    fake_logits: list[Tensor], *, weights: Tensor | None = None
) -> Tensor:
    """``sum_k mean((1 - D_k(fake))^2)`` over sub-discriminators ``k``.

    Shape:
        fake_logits: one tensor per sub-discriminator, any shape (``(B, ...)`` with weights).
        weights: ``(B,)`` 0/1 mask of the items that count, or ``None`` for every item.
        returns: scalar.
    """
    if not fake_logits:
        raise ValueError("expected at least one sub-discriminator's logits")
    with autocast_off(fake_logits[0]):
        total = fake_logits[0].new_zeros((), dtype=torch.float32)
        for fake in fake_logits:
            total = total + _mean((REAL_LABEL - to_float32(fake)).square(), weights)
        return total


def feature_matching_loss(
    real_features: list[list[Tensor]],
    fake_features: list[list[Tensor]],
    *,
    weights: Tensor | None = None,
) -> Tensor:
    """L1 between the discriminator's feature maps of the target and of the estimate.

    ``2 * sum_k sum_l mean|F_kl(real) - F_kl(fake)|``: the mean absolute difference per layer
    (averaged over every element of the map), summed over every layer ``l`` of every
    sub-discriminator ``k``, times 2. This is HiFi-GAN's ``feature_loss`` (jik876/hifi-gan,
    MIT, ``models.py``; lambda_fm = 2 in Kong et al., 2020), factor included, so that
    ``gan.fm_weight = 1`` with ``gan.adv_weight = 1`` is HiFi-GAN's generator objective: the
    recipe a user means when enabling HiFi-GAN fine-tuning. With the default 5 periods and 3
    scales the sum runs over 5 * 6 + 3 * 8 = 54 maps.

    The real features are detached: the target is not being generated, and the discriminator
    must not be trained by the generator's loss through them.

    Shape:
        real_features, fake_features: per sub-discriminator, a list of maps of any shape
            (``(B, ...)`` with weights); the real and fake maps at each position must have the
            same shape.
        weights: ``(B,)`` 0/1 mask of the items that count, or ``None`` for every item.
        returns: scalar.
    """
    _check_same_length(real_features, fake_features, "feature")
    with autocast_off(fake_features[0][0]):
        total = fake_features[0][0].new_zeros((), dtype=torch.float32)
        for real_maps, fake_maps in zip(real_features, fake_features, strict=True):
            _check_same_length(real_maps, fake_maps, "feature-map")
            for real, fake in zip(real_maps, fake_maps, strict=True):
                if real.shape != fake.shape:  # broadcasting would hide a mismatch
                    raise ValueError(
                        f"feature maps differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}"
                    )
                diff = (to_float32(real).detach() - to_float32(fake)).abs()
                total = total + _mean(diff, weights)
        return HIFIGAN_FM_SCALE * total


# ---------------------------------------------------------------------------------------------
# MetricGAN (models/discriminators/metric_gan.py): least squares towards a metric, as in MetricGAN+
# and SEMamba (RoyChao19477/SEMamba, MIT, train.py), with per-item weights.
# ---------------------------------------------------------------------------------------------


def metric_discriminator_loss(
    pred_clean: Tensor,
    pred_estimate: Tensor,
    metric: Tensor,
    *,
    clean_weights: Tensor,
    estimate_weights: Tensor,
) -> Tensor:
    """``mean((1 - D(s, s))^2) + mean((q - D(s, s_hat))^2)``: the target paired with itself
    scores 1 (a perfect estimate), the estimate its normalised metric ``q``.

    Each mean runs over the items its weights select (the target-present ones for the clean
    pair; for the estimate, those whose metric could be computed), with no data-dependent
    branch: an item with weight 0 adds an exact zero gradient, whatever its ``metric`` holds.

    Shape:
        pred_clean, pred_estimate, metric, clean_weights, estimate_weights: (B,); returns a
        scalar.
    """
    with autocast_off(pred_clean):
        clean = weighted_mean((REAL_LABEL - to_float32(pred_clean)).square(), clean_weights)
        # torch.where: a NaN placeholder of a dropped item must not reach the product.
        q = torch.where(estimate_weights > 0, to_float32(metric), 0.0)
        fake = weighted_mean((q - to_float32(pred_estimate)).square(), estimate_weights)
        return clean + fake


def metric_generator_loss(pred_estimate: Tensor, *, weights: Tensor) -> Tensor:
    """``mean((1 - D(s, s_hat))^2)`` over the items ``weights`` selects: the estimate is pushed
    towards the score of a perfect one.

    Shape:
        pred_estimate, weights: (B,); returns a scalar.
    """
    with autocast_off(pred_estimate):
        return weighted_mean((REAL_LABEL - to_float32(pred_estimate)).square(), weights)


__all__ = [
    "discriminator_loss",
    "feature_matching_loss",
    "generator_adversarial_loss",
    "metric_discriminator_loss",
    "metric_generator_loss",
]
