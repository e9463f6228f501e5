"""The loss assembly: every weighted term of a batch (separation, spectral, a family's own aux
terms), masked by target presence without a branch, and their per-item weighted sum."""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from losses.mag_phase import mag_phase_terms
from losses.separation import (
    level_loss,
    phase_sensitive_loss,
    si_sdr_loss,
    snr_loss,
    ta_energy_loss,
    weighted_mean,
)
from losses.stft_loss import amplitude_loss, waveform_l1_loss
from models.registry import (
    arch_of,
    family,
)
from training.nets import Nets

TA_TERMS = ("ta_energy",)  # averaged over target-absent items


# Averaged over every item: the speaker head (it classifies the reference) and a family's own
# objective (the refiner learns silence from TA items too); the other terms over TP items.
ALL_ITEM_TERMS = ("speaker_ce", "score_matching")


def objective_of(cfg: Config) -> str | None:
    """The configured family's own training objective (models/registry.py), if it has one."""
    return family(arch_of(cfg.model)).objective


def loss_weights(cfg: Config) -> dict[str, float]:
    """The named loss weights, {term: weight} (the loss section alone: this runs every
    micro-step)."""
    return dataclasses.asdict(cfg.loss)


def teacher_estimate(nets: Nets, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The frozen teacher's estimate of the batch, (B, N) float32 without a graph; None without
    a teacher. Call it inside the autocast the student's forward runs in."""
    if nets.teacher is None:
        return None
    with torch.no_grad():
        return nets.teacher(batch["mix"], batch["ref"]).float()


def loss_terms(
    est: torch.Tensor,
    batch: dict[str, torch.Tensor],
    nets: Nets,
    weights: dict[str, float],
    aux: dict[str, torch.Tensor] | None = None,
    teacher_est: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every weighted term; TP terms average over target-present items, the TA term over
    target-absent ones (masked means: no branch or host sync on what the batch holds).
    ``aux``: a family's auxiliary outputs (models/registry.py), for its own terms;
    ``teacher_est`` (B, N): the distillation teacher's estimate (``teacher_estimate``)."""
    target, mix = batch["target"], batch["mix"]
    tp = (~batch["is_ta"]).float()
    terms = {"si_sdr": si_sdr_loss(est, target, weights=tp),
             "snr": snr_loss(est, target, weights=tp),
             "level": level_loss(est, target, weights=tp),
             "ta_energy": ta_energy_loss(est, mix, weights=1 - tp)}
    if teacher_est is not None:
        # TP items only: a TA item's teacher output is near silence, whose waveform shape (all
        # SI-SDR sees) is noise; ta_energy alone trains those.
        terms["teacher_si_sdr"] = si_sdr_loss(est, teacher_est, weights=tp)
    if weights["phase_sensitive"] or weights["amplitude"]:
        stft = nets.stft
        est_spec, target_spec = stft(est), stft(target)
        terms["phase_sensitive"] = phase_sensitive_loss(est_spec, target_spec, weights=tp)
        terms["amplitude"] = amplitude_loss(est_spec, target_spec, weights=tp)
    if weights["multi_res_stft"]:
        terms["multi_res_stft"] = nets.mr_stft(est, target, weights=tp)
    if weights["l1"]:
        terms["l1"] = waveform_l1_loss(est, target, weights=tp)
    for scale in ("middle", "long"):  # SpEx+'s extra decoders
        if f"est_{scale}" in (aux or {}):
            terms[f"si_sdr_{scale}"] = si_sdr_loss(aux[f"est_{scale}"].float(), target, weights=tp)
    if "speaker_logits" in (aux or {}):
        # The head classifies the reference, whose speaker is known for TA items too.
        labels = batch["speaker_class"]
        ce = F.cross_entropy(aux["speaker_logits"].float(), labels.clamp(min=0),
                             reduction="none")
        terms["speaker_ce"] = weighted_mean(ce, (labels >= 0).float())
    if "score_matching" in (aux or {}):  # the refiner's objective, over every item
        terms["score_matching"] = aux["score_matching"].float().mean()
    if "compressed_mag" in (aux or {}):  # SEMamba's terms, on the model's own compressed STFT
        terms.update(mag_phase_terms(est, target, aux, spectrum=nets.generator.spectrum,
                                     weights=tp))
    return terms


def weighted_sum(
    terms: dict[str, torch.Tensor], is_ta: torch.Tensor, weights: dict[str, float]
) -> torch.Tensor:
    """Each term is a mean over the items it covers; weighting it by their share of the
    batch makes the total a per-item mean (20 % TA items weigh 20 %, not 50 %)."""
    ta_share = is_ta.float().mean()
    share = {k: ta_share if k in TA_TERMS else 1 - ta_share for k in terms}
    share.update({k: 1.0 for k in ALL_ITEM_TERMS if k in terms})
    return sum(w * share[k] * terms[k] for k, w in weights.items() if w and k in terms)


def objective_terms(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Config,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """A family's own objective on a validation batch (its aux), with the diffusion times and
    noise drawn from ``train.seed`` every time: the validation loss is then comparable from one
    validation to the next, and the training RNG stream is left where it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        return model(batch["mix"], batch["ref"], with_aux=True, target=batch["target"])[1]
