"""Train HiFi-TSE. One loop, read top to bottom.

    python train.py --config configs/hifi_tse.yaml [--set section.key=value ...]
    torchrun --nproc_per_node 4 train.py --config configs/hifi_tse.yaml     # several GPUs
    python train.py --config ... --resume runs/x/step_000100000.pt        # a given checkpoint
    python train.py --config ... --init runs/x/best.pt                    # weights only

A run resumes by itself from RUN_DIR/last.pt. Every step count is in micro-steps (one batch);
the optimizer updates every ``optim.grad_accum`` micro-steps. Log lines are ``key=value``
(doc/log_format.md); monitor_training.sh parses them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from config import Config, ConfigError, dump_config, load_config, model_kwargs, to_dict
from data.dataset import HiFiTSEDataset, dataset_kwargs, seed_worker
from data.manifest import ManifestError
from dsp.files import atomic_path
from dsp.stft import STFT
from evaluation.selection import swap_batch, swap_scores
from losses.adversarial import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    metric_discriminator_loss,
    metric_generator_loss,
)
from losses.mag_phase import mag_phase_terms
from losses.pesq_target import PESQ_OFFSET, PESQ_SPAN, PesqScorer
from losses.separation import (
    level_loss,
    phase_sensitive_loss,
    si_sdr,
    si_sdr_loss,
    snr_loss,
    ta_energy_loss,
    ta_suppression_db,
    weighted_mean,
)
from losses.stft_loss import MultiResolutionSTFTLoss, amplitude_loss, waveform_l1_loss
from models.discriminators.hifigan import HiFiGANDiscriminator
from models.discriminators.metric_gan import MetricDiscriminator
from models.hifi_tse.tf_gridnet import bf16_lstm_works, use_float32_lstms
from models.registry import (
    CheckpointError,
    arch_of,
    build_model,
    family,
    load_first_stage,
    normalised_args,
    validation_context,
)

log = logging.getLogger("train")
CKPT_PREFIX = "step_"
# Logged, not weighted; pesq: the raw wide-band PESQ of the training estimates (gan.kind metric)
LOG_ONLY_TERMS = ("loss", "rms_ratio", "disc", "adv", "feat_match", "pesq")
TA_TERMS = ("ta_energy",)  # averaged over target-absent items
# Averaged over every item: the speaker head (it classifies the reference) and a family's own
# objective (the refiner learns silence from TA items too); the other terms over TP items.
ALL_ITEM_TERMS = ("speaker_ce", "score_matching")
GAN_BETAS = (0.8, 0.99)  # HiFi-GAN's AdamW betas for the discriminators
DDP_ARGS = inspect.signature(DDP.__init__).parameters
RMS_FLOOR = 1e-8  # target norm floor of the logged rms_ratio (TA targets are all zeros)


def log_events(path: Path, first_word: str = "step") -> list[dict[str, str]]:
    """The ``key=value`` events of a train.log (doc/log_format.md) whose first word is
    ``first_word``: ``step=N ...`` lines for "step", ``val step=N ...`` lines for "val"."""
    rows = []
    for line in path.read_text().splitlines():
        event = line.split(" ", 3)[-1]  # drop date, time, level
        if event.startswith(f"{first_word}="):
            rows.append(dict(kv.split("=", 1) for kv in event.split() if "=" in kv))
        elif event.startswith(f"{first_word} "):
            rows.append(dict(kv.split("=", 1) for kv in event.split()[1:] if "=" in kv))
    return rows


class StepSampler(Sampler):
    """An endless stream of ``(index, ta_prob, noisy_ref_prob, sir_boost_db, selection,
    twins)`` for ``HiFiTSEDataset`` (``selection``: 1.0 in the selection curriculum's steps;
    ``twins``: 1.0 in ``twin_steps``).

    Sample ``i`` belongs to micro-step ``i // batch_size``, and the phase schedule of that step
    is baked into the index, so the stream is a function of the step alone: a resumed run (or a
    DataLoader worker far ahead of the loop) sees exactly what an uninterrupted run saw.
    """

    def __init__(self, *, start_step: int, batch_size: int, cfg: Config) -> None:
        self.start = start_step * batch_size
        self.batch_size = batch_size
        self.cfg = cfg

    def __iter__(self) -> Iterator[tuple[int, float, float, float, float, float]]:
        index = self.start
        while True:
            step = index // self.batch_size
            ta_prob, noisy_ref_prob = phase_probs(self.cfg, step)
            selection = float(step < self.cfg.train.selection_steps)
            twins = float(step < self.cfg.train.twin_steps)
            yield index, ta_prob, noisy_ref_prob, sir_boost_db(self.cfg, step), selection, twins
            index += 1


def linear_ramp(step: int, start: int, end: int) -> float:
    """0 before ``start``, 1 from ``end`` on, linear in between (1 throughout if end <= start)."""
    if end <= start:
        return 1.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def phase_probs(cfg: Config, step: int) -> tuple[float, float]:
    """Phase 1: target always present, clean references. Phase 2 (from ``phase2_step``):
    target-absent samples, and noisy references ramped 0 -> max over ``noisy_ref_ramp``."""
    if step < cfg.train.phase2_step:
        return 0.0, 0.0
    ramp = linear_ramp(step, *cfg.train.noisy_ref_ramp)
    return cfg.data.ta_prob, ramp * cfg.train.noisy_ref_max_prob


def sir_boost_db(cfg: Config, step: int) -> float:
    """The SIR curriculum: ``sir_boost_db`` at step 0, linearly down to 0 at
    ``sir_boost_steps``, 0 after."""
    t = cfg.train
    return t.sir_boost_db * (1.0 - linear_ramp(step, 0, t.sir_boost_steps))


def lr_factor(cfg: Config, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min((step - o.warmup_steps) / max(1, cfg.train.total_steps - o.warmup_steps), 1.0)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def gan_weight(cfg: Config, step: int) -> float | None:
    """None before the GAN phase (no discriminator at all); 0 during the D-only warm-up; then
    the adversarial weight ramps linearly to 1 over ``ramp_steps``."""
    g = cfg.gan
    if not g.enabled or step < g.start_step:
        return None
    into = step - g.start_step - g.d_warmup_steps
    return 0.0 if into < 0 else min(1.0, (into + 1) / max(1, g.ramp_steps))


def check_config(cfg: Config) -> None:
    t, accum = cfg.train, cfg.optim.grad_accum
    for name in ("log_every", "val_every", "ckpt_every"):
        if getattr(t, name) % accum:
            raise ConfigError(f"train.{name}={getattr(t, name)} is not a multiple of "
                              f"optim.grad_accum={accum}")
    for name in ("sir_boost_steps", "selection_steps", "twin_steps"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.twin_steps and t.batch_size % 2:
        raise ConfigError(f"train.twin_steps pairs the items of a batch: batch_size must be "
                          f"even, got {t.batch_size}")
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {t.precision!r}")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain lists and numbers: they pass through
    ``all_gather_object`` and load with ``weights_only=True``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": [kind, key.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: a killed write leaves the previous file intact, never half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# ---------------------------------------------------------------------------------------------
# The training step: one micro-step (forward, losses, backward) and one optimizer update. The
# loop in main() and tests/ddp_check.py run these same functions.
# ---------------------------------------------------------------------------------------------


@dataclass
class Nets:
    """What a training step updates. ``gen_ddp`` / ``disc_ddp`` are the DDP wrappers under
    torchrun and the plain modules otherwise; the plain modules are what is saved."""

    generator: nn.Module  # any registered family (models/registry.py)
    ema: nn.Module | None
    opt_g: torch.optim.Optimizer
    disc: HiFiGANDiscriminator | MetricDiscriminator | None  # gan.kind hifigan | metric
    opt_d: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler
    mr_stft: MultiResolutionSTFTLoss
    stft: STFT  # the stft section's: spectral losses and TensorBoard images, for any family
    gen_ddp: nn.Module
    disc_ddp: nn.Module | None
    pesq: PesqScorer | None = None  # the metric discriminator's targets (gan.kind metric)


def disc_kind(disc: nn.Module | None) -> str | None:
    """The ``gan.kind`` of a discriminator (None for none)."""
    if disc is None:
        return None
    return "metric" if isinstance(disc, MetricDiscriminator) else "hifigan"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the trained parameters (a frozen part, such as a refiner's
    first stage, is left out), with ``weight_decay`` except those tagged ``_no_weight_decay``
    (Mamba's A_log and D, as mamba-ssm). The second group exists only when something is
    tagged, so that an optimizer state saved with one group still resumes."""
    trained = [p for p in model.parameters() if p.requires_grad]
    exempt = [p for p in trained if getattr(p, "_no_weight_decay", False)]
    ids = {id(p) for p in exempt}
    groups = [{"params": [p for p in trained if id(p) not in ids], "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


def build_nets(cfg: Config, device: torch.device, *, load_parts: bool = True) -> Nets:
    """Generator (+ EMA), discriminator when the GAN phase is configured, optimisers, scaler.
    Call ``torch.manual_seed`` first: every rank must build the same initial weights.
    ``load_parts``: load the weights of parts that other checkpoints hold (a refiner's first
    stage), as a new run does; a resumed run reads them from its own checkpoint."""
    generator = build_model(model_kwargs(cfg))
    if load_parts:
        load_first_stage(generator)  # before the EMA copy below, which must hold them too
    generator = generator.to(device)
    generator.grad_checkpoint = cfg.train.grad_checkpoint
    opt_g = torch.optim.AdamW(
        param_groups(generator, cfg.optim.weight_decay), lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
    )
    g, s = cfg.gan, cfg.stft
    disc = opt_d = pesq = None
    if g.enabled and g.kind == "metric":
        disc = MetricDiscriminator(sample_rate=s.sample_rate, n_fft=s.n_fft,
                                   win_length=s.win_length, hop_length=s.hop_length,
                                   channels=g.metric_channels)
        pesq = PesqScorer(sample_rate=s.sample_rate, workers=g.pesq_workers)
    elif g.enabled:
        disc = HiFiGANDiscriminator(periods=tuple(g.periods), n_scales=g.n_scales)
    if disc is not None:
        disc = disc.to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=g.lr, betas=GAN_BETAS)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.optim.ema_decay else None
    # GradScaler only for fp16: bf16 has float32's range and needs no loss scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    return Nets(generator=generator, ema=ema, opt_g=opt_g, disc=disc, opt_d=opt_d,
                scaler=scaler, mr_stft=MultiResolutionSTFTLoss().to(device),
                stft=STFT(n_fft=s.n_fft, win_length=s.win_length,
                          hop_length=s.hop_length).to(device),
                gen_ddp=generator, disc_ddp=disc, pesq=pesq)


def wrap_ddp(nets: Nets, device: torch.device) -> None:
    """DDP wrappers for the trained networks. No buffer broadcast: the generator's buffers
    are constants (STFT window, band grid), and the discriminators' spectral-norm vectors are
    updated from the weights alone, which every rank holds identically."""
    ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.13 renames the switch (the old name warns); older CUDA builds know only it.
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in DDP_ARGS else "broadcast_buffers"
    nets.gen_ddp = DDP(nets.generator, device_ids=ids, **{no_sync: False})
    if nets.disc is not None:
        nets.disc_ddp = DDP(nets.disc, device_ids=ids, **{no_sync: False})


def objective_of(cfg: Config) -> str | None:
    """The configured family's own training objective (models/registry.py), if it has one."""
    return family(arch_of(cfg.model)).objective


def loss_weights(cfg: Config) -> dict[str, float]:
    """The named loss weights, {term: weight} (the loss section alone: this runs every
    micro-step)."""
    return dataclasses.asdict(cfg.loss)


def loss_terms(
    est: torch.Tensor,
    batch: dict[str, torch.Tensor],
    nets: Nets,
    weights: dict[str, float],
    aux: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every weighted term; TP terms average over target-present items, the TA term over
    target-absent ones (masked means: no branch or host sync on what the batch holds).
    ``aux``: a family's auxiliary outputs (models/registry.py), for its own terms."""
    target, mix = batch["target"], batch["mix"]
    tp = (~batch["is_ta"]).float()
    terms = {"si_sdr": si_sdr_loss(est, target, weights=tp),
             "snr": snr_loss(est, target, weights=tp),
             "level": level_loss(est, target, weights=tp),
             "ta_energy": ta_energy_loss(est, mix, weights=1 - tp)}
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


class StepLog:
    """Unbiased running means of the logged terms, kept on the device: each term adds its
    mean times the number of items it covers, and that number (a batch without TA items adds
    nothing to ``ta_energy``). ``.item()`` happens only in :meth:`reduce`, at log steps."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.micro_steps = 0

    def add(self, name: str, mean: torch.Tensor, count: torch.Tensor) -> None:
        count = count.detach().to(torch.float64)
        value = mean.detach().to(torch.float64) * count
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0.0) + count

    def reduce(self, keys: list[str], device: torch.device, ddp: bool) -> dict[str, float]:
        """Means over every rank; ``keys`` is fixed so that every rank all-reduces the same
        vector, whatever its batches held."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        packed = torch.stack([torch.stack([torch.as_tensor(self.sums.get(k, zero)),
                                           torch.as_tensor(self.counts.get(k, zero))])
                              for k in keys]).to(device)  # (K, 2)
        if ddp:
            dist.all_reduce(packed)
        return {k: s / n for k, (s, n) in zip(keys, packed.tolist(), strict=True) if n}


def ddp_sync(nets: Nets, sync: bool) -> contextlib.AbstractContextManager[object]:
    """``no_sync`` on every DDP module unless ``sync``. It must enclose the forward as well as
    the backward: DDP decides whether a backward all-reduces when the forward runs."""
    stack = contextlib.ExitStack()
    if not sync:
        for module in (nets.gen_ddp, nets.disc_ddp):
            if isinstance(module, DDP):
                stack.enter_context(module.no_sync())
    return stack


def micro_step(
    nets: Nets,
    cfg: Config,
    batch: dict[str, torch.Tensor],
    *,
    step: int,
    autocast: contextlib.AbstractContextManager[object],
    step_log: StepLog,
) -> None:
    """Forward, losses and backward of micro-step ``step``; gradients accumulate, and under
    DDP they are all-reduced only on the last micro-step of an update.

    Every rank runs the same forwards, backwards and collectives whatever its batch holds:
    target-absent items are left out of the TP and GAN terms by weights, never by a branch.
    """
    accum = cfg.optim.grad_accum
    weights = loss_weights(cfg)
    gan_w = gan_weight(cfg, step)  # a function of the step: the same on every rank
    metric_gan = gan_w is not None and cfg.gan.kind == "metric"
    tp = (~batch["is_ta"]).float()  # (B,) 1 = target present
    n_tp, n_ta = tp.sum(), (1 - tp).sum()
    with ddp_sync(nets, sync=(step + 1) % accum == 0):
        with autocast:
            # A family with an objective of its own (the refiner) computes it from the target.
            target = {"target": batch["target"]} if objective_of(cfg) else {}
            est, aux = nets.gen_ddp(batch["mix"], batch["ref"], with_aux=True, **target)
        est = est.float()
        if metric_gan:
            # PESQ of this batch starts now in worker processes (losses/pesq_target.py) and
            # overlaps everything up to the discriminator loss below: the separation losses,
            # both discriminator forwards and the generator's whole backward, enqueued by this
            # thread and run by the device meanwhile.
            pesq_future = nets.pesq.submit(est, batch["target"])
        terms = loss_terms(est, batch, nets, weights, aux)
        loss = weighted_sum(terms, batch["is_ta"], weights)
        if metric_gan:
            # ---- GAN phase, MetricGAN: the discriminator predicts the normalised PESQ of
            # (target, estimate) pairs and scores (target, target) pairs 1
            target = batch["target"]
            n_items = target.shape[0]
            with autocast:
                # One forward over both pairs: DDP expects one forward per backward.
                pred = nets.disc_ddp(torch.cat([target, target]),
                                     torch.cat([target, est.detach()]))  # (2B,)
            if gan_w > 0:
                # Through the plain module with frozen weights, as for HiFi-GAN below.
                nets.disc.requires_grad_(False)
                with autocast:
                    pred_g = nets.disc(target, est)  # (B,)
                nets.disc.requires_grad_(True)
                terms["adv"] = metric_generator_loss(pred_g, weights=tp)
                loss = loss + gan_w * tp.mean() * cfg.gan.adv_weight * terms["adv"]
        elif gan_w is not None:
            # ---- GAN phase, HiFi-GAN: the discriminator on real targets vs detached estimates
            real = batch["target"]
            n_real = real.shape[0]
            with autocast:
                # One forward over real and fake: DDP expects one forward per backward.
                logits, feats = nets.disc_ddp(torch.cat([real, est.detach()]))
            d_loss = discriminator_loss([x[:n_real] for x in logits],
                                        [x[n_real:] for x in logits], weights=tp)
            # Scaled by the TP share like the other TP terms: an all-TA batch adds an exact
            # zero gradient, and the DDP average is the mean over every rank's TP items.
            nets.scaler.scale(tp.mean() * d_loss / accum).backward()
            terms["disc"] = d_loss
            if gan_w > 0:
                # Through the plain module with frozen weights: the generator's adversarial
                # gradient must not reach the discriminator's parameters.
                nets.disc.requires_grad_(False)
                with autocast:
                    fake_logits, fake_feats = nets.disc(est)
                nets.disc.requires_grad_(True)
                real_feats = [[f[:n_real] for f in maps] for maps in feats]
                terms["adv"] = generator_adversarial_loss(fake_logits, weights=tp)
                terms["feat_match"] = feature_matching_loss(real_feats, fake_feats, weights=tp)
                g = cfg.gan
                loss = loss + gan_w * tp.mean() * (g.adv_weight * terms["adv"]
                                                   + g.fm_weight * terms["feat_match"])
        nets.scaler.scale(loss / accum).backward()
        if metric_gan:
            # The step's one wait on the host, which the metric needs by nature: PESQ runs on
            # the CPU, on estimates that had to come off the device. It ends as soon as the
            # workers are done (usually during the generator's backward above). The scores go
            # back through pinned memory without a device sync; an item whose PESQ failed (NaN:
            # no utterance found) or whose target is absent gets weight 0 in the estimate term.
            scores = torch.from_numpy(pesq_future.result())  # (B,) float32, NaN: no score
            host = torch.stack([scores.nan_to_num(0.0), scores.isfinite().float()])  # (2, B)
            if est.is_cuda:
                host = host.pin_memory()
            metric, scored = host.to(est.device, non_blocking=True)
            scored = tp * scored
            terms["disc"] = metric_discriminator_loss(pred[:n_items], pred[n_items:], metric,
                                                      clean_weights=tp, estimate_weights=scored)
            # Scaled by the TP share as HiFi-GAN's is: an all-TA batch adds an exact zero
            # gradient, through the same forward, backward and all-reduce as any other.
            nets.scaler.scale(tp.mean() * terms["disc"] / accum).backward()
            step_log.add("pesq", weighted_mean(PESQ_OFFSET + PESQ_SPAN * metric, scored),
                         scored.sum())

    # estimate / target RMS per TP item: < 1 means the model is muting the target
    ratio = est.norm(dim=-1) / batch["target"].norm(dim=-1).clamp(min=RMS_FLOOR)
    terms["rms_ratio"] = weighted_mean(ratio, tp)
    step_log.add("loss", loss, torch.ones_like(n_tp) * tp.numel())
    for k, v in terms.items():
        count = n_ta if k in TA_TERMS else (n_tp + n_ta if k in ALL_ITEM_TERMS else n_tp)
        step_log.add(k, v, count)
    step_log.micro_steps += 1


def unscale_and_clip(
    opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float
) -> torch.Tensor | None:
    """Unscale (fp16) and clip the gradients of ``opt``; ``None`` when no parameter has one.
    An optimizer without gradients must not reach ``GradScaler.step``, which asserts
    "No inf checks were recorded for this optimizer"."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return None
    scaler.unscale_(opt)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def update(nets: Nets, cfg: Config, step: int) -> tuple[float, torch.Tensor, bool]:
    """The optimizer update that ends micro-step ``step``: learning rate, clipping, a skip on
    non-finite gradients, AdamW, EMA; the discriminator too during the GAN phase.

    Returns ``(lr, generator grad norm, whether the generator update was applied)``.
    """
    lr = cfg.optim.lr * lr_factor(cfg, step)
    for group in nets.opt_g.param_groups:
        group["lr"] = lr
    g_norm = unscale_and_clip(nets.opt_g, nets.scaler, cfg.optim.grad_clip)
    if g_norm is None:
        raise RuntimeError(f"step {step}: the generator received no gradient")
    d_norm = None
    if nets.opt_d is not None:
        d_norm = unscale_and_clip(nets.opt_d, nets.scaler, cfg.optim.grad_clip)
    norms = torch.stack([g_norm] if d_norm is None else [g_norm, d_norm])
    # The one host sync of an update, unavoidable: whether to apply it is a host decision
    # (skip non-finite gradients, count them, stop after max_nonfinite). The norms are
    # all-reduced gradients', so every rank decides the same.
    finite = torch.isfinite(norms).tolist()
    if finite[0]:
        nets.scaler.step(nets.opt_g)
        if nets.ema is not None:
            with torch.no_grad():
                # Trained parameters only: a frozen part (a refiner's first stage, a
                # pretrained speaker encoder) is the same in both and needs no averaging.
                pairs = [(e, g) for e, g in zip(nets.ema.parameters(),
                                                nets.generator.parameters(), strict=True)
                         if g.requires_grad]
                torch._foreach_lerp_([e for e, _ in pairs], [g for _, g in pairs],
                                     1 - cfg.optim.ema_decay)
    if d_norm is not None and finite[1]:
        nets.scaler.step(nets.opt_d)
    nets.scaler.update()
    nets.opt_g.zero_grad(set_to_none=True)
    if nets.opt_d is not None:
        nets.opt_d.zero_grad(set_to_none=True)
    return lr, g_norm, finite[0]


def weights_fingerprint(nets: Nets) -> torch.Tensor:
    """Sum and sum of squares of every tensor of the generator and discriminator states
    (float64): ranks whose weights differ in any element almost surely differ here."""
    modules = [nets.generator] + ([nets.disc] if nets.disc is not None else [])
    values = [t.detach().double() for m in modules for t in m.state_dict().values()
              if t.is_floating_point()]
    return torch.stack([torch.stack([v.sum(), v.square().sum()]) for v in values]).flatten()


def ranks_in_sync(nets: Nets) -> bool:
    """Whether every rank holds the same generator and discriminator weights (one all-reduce
    of a fingerprint; call it on every rank)."""
    fp = weights_fingerprint(nets)
    low, high = fp.clone(), fp.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


# Parts of Nets a checkpoint holds under their own names (None where a run has none).
SAVED_NETS = ("generator", "ema", "opt_g", "disc", "opt_d", "scaler")


@dataclass
class TrainState:
    """The whole training state: the networks and optimisers, the counters, and (in a
    checkpoint) every rank's RNG states. It writes and reads checkpoints itself, so saving and
    resuming cannot drift apart."""

    nets: Nets
    step: int = 0  # also the data position (StepSampler)
    best_si_sdri: float = -math.inf
    bad_validations: int = 0
    nonfinite_total: int = 0

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "step", "best_si_sdri", "bad_validations", "nonfinite_total",
    )

    def payload(self, *, model_args: dict[str, Any], config: dict[str, Any],
                rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict; ``model_args`` and ``config`` let it rebuild itself."""
        ckpt: dict[str, Any] = {"model_args": model_args, "config": config, "rng": rngs,
                                "disc_kind": disc_kind(self.nets.disc)}
        for name in SAVED_NETS:
            part = getattr(self.nets, name)
            ckpt[name] = part.state_dict() if part is not None else None
        ckpt.update({name: getattr(self, name) for name in self.COUNTERS})
        return ckpt

    def load(self, ckpt: dict[str, Any], *, rank: int) -> None:
        """Restore what ``payload`` wrote; a part this run has and the checkpoint lacks (the
        discriminator of a run that enables the GAN phase on resume) keeps its fresh state.

        A discriminator of the other ``gan.kind`` is refused (ConfigError) before anything is
        restored: a fresh one would skip its warm-up, since the GAN schedule is a function of
        the step, and the generator would train against an untrained critic.
        """
        # Checkpoints written before gan.kind existed hold HiFi-GAN's discriminator.
        saved = ckpt.get("disc_kind", "hifigan") if ckpt.get("disc") is not None else None
        kind = disc_kind(self.nets.disc)
        if saved is not None and kind is not None and saved != kind:
            raise ConfigError(f"config key 'gan.kind' is {kind}, but the checkpoint holds a "
                              f"{saved} discriminator: resume with gan.kind={saved}, or start "
                              "a new run from its generator with --init")
        for name in SAVED_NETS:
            part = getattr(self.nets, name)
            if part is not None and ckpt.get(name) is not None:
                part.load_state_dict(ckpt[name])
        for name in self.COUNTERS:
            setattr(self, name, ckpt[name])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])


@torch.no_grad()
def validate(
    nets: Nets,
    cfg: Config,
    loader: DataLoader,
    *,
    autocast: contextlib.AbstractContextManager[object],
    ddp: bool,
    pairs: dict[str, torch.Tensor],
) -> tuple[dict[str, float], list[tuple[torch.Tensor, ...]]]:
    """SI-SDR(i) of TP items, suppression of TA items and the loss, over every rank's share of
    the fixed validation list (EMA weights where there are some); the swap test on this rank's
    share of the swap ``pairs`` (``swap_pairs_on``; ``select_acc``, ``ref_sens``: NaN without
    pairs); and the first
    ``train.n_val_audio`` examples (mix, ref, estimate, target) of this rank."""
    device = next(nets.generator.parameters()).device
    weights = loss_weights(cfg)
    model = nets.ema if nets.ema is not None else nets.generator
    model.eval()
    # sums: si_sdr, si_sdri, n_tp, ta_supp, n_ta, loss, n_batches
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    examples: list[tuple[torch.Tensor, ...]] = []
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast, validation_context(model):
            est = model(batch["mix"], batch["ref"])
            aux = objective_terms(model, batch, cfg, device) if objective_of(cfg) else None
        est = est.float()
        tp = ~batch["is_ta"]
        # Masked sums: a TA item's SI-SDR (or a TP item's suppression) is dropped by
        # torch.where, so its inf or NaN cannot reach the sums.
        sdr = si_sdr(est, batch["target"])
        sdr_mix = si_sdr(batch["mix"], batch["target"])
        supp = ta_suppression_db(est, batch["mix"])
        loss = weighted_sum(loss_terms(est, batch, nets, weights, aux), batch["is_ta"], weights)
        zero = torch.zeros_like(sdr)
        sums += torch.stack([torch.where(tp, sdr, zero).sum(),
                             torch.where(tp, sdr - sdr_mix, zero).sum(), tp.sum(),
                             torch.where(tp, zero, supp).sum(), (~tp).sum(), loss,
                             torch.ones_like(loss)]).double()
        if len(examples) < cfg.train.n_val_audio:
            examples.append((batch["mix"][0], batch["ref"][0], est[0], batch["target"][0]))
    # sums: correct runs, reference sensitivity, pairs
    swap = torch.zeros(3, dtype=torch.float64, device=device)
    swap[2] = len(pairs["mix"])
    per_call = max(1, cfg.train.batch_size // 2)  # pairs per forward: two runs each
    for start in range(0, len(pairs["mix"]), per_call):
        mix, refs, sources = (pairs[k][start : start + per_call]
                              for k in ("mix", "refs", "sources"))
        with autocast, validation_context(model):
            est = swap_batch(model, mix, refs)
        scores = swap_scores(est, sources, mix)
        swap[:2] += torch.stack([scores["correct"].sum(), scores["ref_sens_db"].sum()])
    sums = torch.cat([sums, swap])
    if ddp:  # one collective on every rank, whatever its share holds
        dist.all_reduce(sums)
    s_sdr, s_sdri, n_tp, s_supp, n_ta, s_loss, n_b, s_right, s_sens, n_pairs = sums.tolist()
    nets.generator.train()
    return {"si_sdr": s_sdr / max(n_tp, 1), "si_sdri": s_sdri / max(n_tp, 1),
            "ta_supp_db": s_supp / n_ta if n_ta else float("nan"),
            "loss": s_loss / max(n_b, 1), "n_tp": n_tp, "n_ta": n_ta,
            "select_acc": s_right / (2 * n_pairs) if n_pairs else float("nan"),
            "ref_sens": s_sens / n_pairs if n_pairs else float("nan")}, examples


def swap_pairs_on(val_set: HiFiTSEDataset, n_pairs: int, rank: int, world: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's share of the validation swap pairs (dry), stacked on the device once: the
    same pairs at every validation. None to share (too few validation speakers, or
    ``n_pairs`` 0): empty tensors, and the swap test reports NaN."""
    try:
        items = [val_set.swap_pair(i, noisy=False) for i in range(rank, n_pairs, world)]
    except ManifestError as err:  # the same split on every rank: every rank skips
        log.warning("no swap test in validation: %s", err)
        items = []
    n, m = val_set.segment_samples, val_set.ref_samples
    shapes = {"mix": (0, n), "refs": (0, 2, m), "sources": (0, 2, n)}
    return {k: torch.stack([torch.from_numpy(p[k]) for p in items]).to(device) if items
            else torch.zeros(shape, device=device) for k, shape in shapes.items()}


def objective_terms(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Config,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """A family's own objective on a validation batch (its aux), with the diffusion times and
    noise drawn from ``train.seed`` every time: the validation loss is then comparable from one
    validation to the next, and the training RNG stream is left where it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        return model(batch["mix"], batch["ref"], with_aux=True, target=batch["target"])[1]


def write_examples(writer: SummaryWriter, examples: list[tuple[torch.Tensor, ...]], nets: Nets,
                   step: int, sample_rate: int) -> None:
    """Validation audio and log spectrograms to TensorBoard."""
    for i, (mix, ref, est, target) in enumerate(examples):
        for name, wave in (("mix", mix), ("ref", ref), ("est", est), ("target", target)):
            peak = max(wave.abs().max().item(), 1e-6)
            writer.add_audio(f"val{i}/{name}", (wave / max(peak, 1.0)).cpu()[None], step,
                             sample_rate=sample_rate)
            if name != "ref":
                spec = nets.stft(wave[None].float())[0].abs()
                image = (20 * torch.log10(spec + 1e-5)).clamp(min=-100).flip(0)
                image = (image - image.min()) / (image.max() - image.min() + 1e-9)
                writer.add_image(f"val{i}/{name}_spec", image.cpu(), step, dataformats="HW")


def resolve_device(cfg: Config, ddp: bool, local_rank: int) -> torch.device:
    """``train.device``; under torchrun each rank must get its own GPU."""
    name = cfg.train.device
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if ddp and device.type == "cuda" and device.index is None:
        raise ConfigError(f"train.device={name} under torchrun would put every rank on GPU 0; "
                          "use train.device=auto (rank r takes cuda:LOCAL_RANK)")
    if ddp and device.type == "cuda" and device.index != local_rank \
            and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
        raise ConfigError(f"train.device={name} under torchrun: every local rank would use "
                          "that one GPU; use train.device=auto")
    return device


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``, or a ConfigError naming what
    to use instead."""
    precision = cfg.train.precision
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {device} does not support bfloat16; use "
                          "train.precision=fp16 (with loss scaling) or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train HiFi-TSE.")
    parser.add_argument("--config", required=True, action="append",
                        help="YAML file (only what differs); repeat it to layer files")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--resume", help="checkpoint to resume from (default: RUN_DIR/last.pt)")
    parser.add_argument("--init", help="checkpoint whose generator weights start a new run")
    args = parser.parse_args(argv)

    # ---------------------------------------------------------------------------------------
    # Config, distributed set-up, device, precision, logging
    # ---------------------------------------------------------------------------------------
    ddp = "RANK" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        cfg = load_config(args.config, args.set)
        check_config(cfg)
        device = resolve_device(cfg, ddp, local_rank)
        amp_dtype = autocast_dtype(cfg, device)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    run_dir = Path(cfg.train.run_dir)
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(message)s",
            handlers=[logging.StreamHandler(), logging.FileHandler(run_dir / "train.log")],
            force=True,
        )
    else:
        logging.basicConfig(level=logging.WARNING, force=True)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to each data worker: oversubscribed OpenMP threads spin at every LSTM
        # time step's barrier, and a step then takes 10-40x longer (measured on 2 cores).
        cores = max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(max(1, cores - cfg.data.num_workers))
    train_set = HiFiTSEDataset(**dataset_kwargs(cfg.data, "train", rank=rank))
    if getattr(cfg.model, "n_speakers", None) == 0 and cfg.loss.speaker_ce:
        # A classification head over the training speakers (the batch's speaker_class): its
        # size comes from the data, and the resolved config and model_args record it.
        cfg.model.n_speakers = len(train_set.speaker_names)
    if master:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    random.seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)  # noqa: NPY002
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # ---------------------------------------------------------------------------------------
    # Networks, optimisers, scaler; the bf16 LSTM probe
    # ---------------------------------------------------------------------------------------
    try:
        margs = model_kwargs(cfg)  # reads a refiner's first-stage checkpoint
    except CheckpointError as err:
        sys.exit(f"error: model.first_stage_ckpt: {err}")
    resume = Path(args.resume) if args.resume else run_dir / "last.pt"
    if args.resume and not resume.is_file():
        sys.exit(f"error: {resume}: no such checkpoint")
    nets = build_nets(cfg, device, load_parts=not resume.is_file())
    if amp_dtype == torch.bfloat16 and not bf16_lstm_works(device):
        count = use_float32_lstms(nets.generator)
        if nets.ema is not None:
            use_float32_lstms(nets.ema)
        log.warning("bf16_lstm=unsupported device=%s lstms=%d run_in=float32 (the rest of the "
                    "network stays bf16)", device, count)
    generator, ema = nets.generator, nets.ema

    # ---------------------------------------------------------------------------------------
    # Resume (exact) or initialise from weights
    # ---------------------------------------------------------------------------------------
    state = TrainState(nets)
    if resume.is_file():
        ckpt = torch.load(resume, map_location=device, weights_only=True)
        if normalised_args(ckpt["model_args"]) != margs:
            sys.exit(f"error: {resume}: its model section differs from the config's")
        try:
            state.load(ckpt, rank=rank)
        except ConfigError as err:
            sys.exit(f"error: {resume}: {err}")
        log.info("resumed step=%d from=%s", state.step, resume)
    elif args.init:
        ckpt = torch.load(args.init, map_location=device, weights_only=True)
        generator.load_state_dict(ckpt["generator"])
        if ema is not None:
            ema.load_state_dict(ckpt["generator"])
        log.info("initialised weights from=%s", args.init)
    if ddp:
        wrap_ddp(nets, device)
    n_params = sum(p.numel() for p in generator.parameters())
    n_trained = sum(p.numel() for p in generator.parameters() if p.requires_grad)
    log.info("generator params=%d trained=%d device=%s world=%d precision=%s "
             "grad_checkpoint=%s", n_params, n_trained, device, world, cfg.train.precision,
             cfg.train.grad_checkpoint)

    # ---------------------------------------------------------------------------------------
    # Data: the stream position is the step (see StepSampler)
    # ---------------------------------------------------------------------------------------
    batch_size = cfg.train.batch_size
    loader_args = {
        "batch_size": batch_size,
        "num_workers": cfg.data.num_workers,
        "worker_init_fn": seed_worker,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.data.num_workers > 0,
    }
    train_loader = DataLoader(
        train_set, sampler=StepSampler(start_step=state.step, batch_size=batch_size, cfg=cfg),
        **loader_args,
    )
    val_set = HiFiTSEDataset(**dataset_kwargs(cfg.data, "val"))
    val_loader = DataLoader(val_set, sampler=range(rank, len(val_set), world), **loader_args)
    swap_pairs = swap_pairs_on(val_set, cfg.train.n_val_pairs, rank, world, device)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step) if master else None
    weights = loss_weights(cfg)

    # ---------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------
    accum = cfg.optim.grad_accum
    generator.train()
    step_log = StepLog()
    log_keys = sorted({*weights, *LOG_ONLY_TERMS})
    nonfinite_run, corrupt = 0, 0
    t_start = t_log = time.perf_counter()
    stop_reason = "total_steps reached"
    # Under a time budget total_steps is only a cap, and its ETA would mislead.
    bar = tqdm(total=None if cfg.train.max_minutes else cfg.train.total_steps, initial=state.step,
               unit="step", dynamic_ncols=True,
               disable=not (master and cfg.train.progress_bar))
    data_iter = iter(train_loader)
    while state.step < cfg.train.total_steps:
        batch = next(data_iter)
        corrupt += int(batch["n_corrupt"].sum())  # a CPU tensor: no device sync
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        gan_active = gan_weight(cfg, state.step) is not None
        micro_step(nets, cfg, batch, step=state.step, autocast=autocast, step_log=step_log)
        state.step += 1
        step = state.step  # the micro-steps done, for the rest of this iteration
        bar.update(1)
        if step % accum:
            continue

        # ---- optimizer update: clip, skip non-finite, step, EMA
        lr, grad_norm, applied = update(nets, cfg, step)
        if applied:
            nonfinite_run = 0
        else:
            nonfinite_run += 1
            state.nonfinite_total += 1
            log.warning("nonfinite step=%d count=%d in_a_row=%d", step, state.nonfinite_total,
                        nonfinite_run)
            if nonfinite_run >= cfg.train.max_nonfinite:
                stop_reason = f"{nonfinite_run} non-finite updates in a row"
                log.error("stopping step=%d reason=%s", step, stop_reason.replace(" ", "_"))
                break

        # ---- logging (the .item() calls sync the device, so only here)
        if step % cfg.train.log_every == 0:
            elapsed = time.perf_counter() - t_log
            stats = step_log.reduce(log_keys, device, ddp)
            ta_prob, nref_prob = phase_probs(cfg, step)
            stats.update(lr=lr, grad_norm=grad_norm.item(),
                         step_time=elapsed / step_log.micro_steps,
                         samples_per_s=step_log.micro_steps * batch_size * world / elapsed)
            if writer is not None:
                for k, v in stats.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/ta_prob", ta_prob, step)
                writer.add_scalar("train/noisy_ref_prob", nref_prob, step)
                writer.add_scalar("train/sir_boost_db", sir_boost_db(cfg, step), step)
                writer.add_scalar("train/corrupt_entries", corrupt, step)
                if device.type == "cuda":
                    writer.add_scalar("train/gpu_mem_gib",
                                      torch.cuda.max_memory_allocated(device) / 2**30, step)
            phase = 3 if gan_active else (2 if step >= cfg.train.phase2_step else 1)
            # loss and si_sdr first; si_sdr is absent after an interval without a TP item
            first = [k for k in ("loss", "si_sdr") if k in stats]
            keys = [*first, *(k for k in stats if k not in first)]
            log.info("step=%d phase=%d %s nonfinite=%d corrupt=%d", step, phase,
                     " ".join(f"{k}={stats[k]:.4g}" for k in keys), state.nonfinite_total, corrupt)
            step_log, t_log = StepLog(), time.perf_counter()

        # ---- end of run? (every rank must agree, so the budget decision is all-reduced)
        final = step >= cfg.train.total_steps
        if cfg.train.max_minutes:
            # On the training device: NCCL all-reduces only device tensors. This .item() adds
            # no wait of its own, as update() has just synchronised with the device.
            elapsed_min = (time.perf_counter() - t_start) / 60
            over = torch.tensor(float(elapsed_min > cfg.train.max_minutes), device=device)
            if ddp:
                dist.all_reduce(over, op=dist.ReduceOp.MAX)
            if over.item():
                final, stop_reason = True, f"time budget of {cfg.train.max_minutes:g} min used"

        # ---- validation, best checkpoint, early stopping
        is_best = False
        if step % cfg.train.val_every == 0 or final:
            val, examples = validate(nets, cfg, val_loader, autocast=autocast, ddp=ddp,
                                     pairs=swap_pairs)
            if writer is not None:
                write_examples(writer, examples, nets, step, cfg.stft.sample_rate)
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, step)
            log.info("val step=%d si_sdr=%.3f si_sdri=%.3f ta_supp_db=%.2f loss=%.4f n_tp=%d "
                     "n_ta=%d select_acc=%.3f ref_sens=%.2f", step, val["si_sdr"],
                     val["si_sdri"], val["ta_supp_db"], val["loss"], val["n_tp"], val["n_ta"],
                     val["select_acc"], val["ref_sens"])
            if val["si_sdri"] > state.best_si_sdri:
                state.best_si_sdri, state.bad_validations, is_best = val["si_sdri"], 0, True
                log.info("best step=%d si_sdri=%.3f", step, state.best_si_sdri)
            else:
                state.bad_validations += 1
            bar.set_postfix(val_si_sdri=f"{val['si_sdri']:.2f}")
            patience = cfg.train.early_stop_patience
            if patience and state.bad_validations >= patience:
                final = True
                stop_reason = f"no better si_sdri in {state.bad_validations} validations"
        # ---- checkpoints: last (always at an interval), best, rotation of step_*.pt
        periodic = step % cfg.train.ckpt_every == 0 or final
        if periodic and ddp:
            # Ranks that drifted apart (a missed all-reduce, non-deterministic kernels) would
            # otherwise train on silently, and only rank 0's weights are saved.
            in_sync = ranks_in_sync(nets)
            log.info("ranks step=%d world=%d in_sync=%d", step, world, in_sync)
            if not in_sync:
                stop_reason = "ranks hold different weights"
                log.error("stopping step=%d reason=%s", step, stop_reason.replace(" ", "_"))
                final = True
        if periodic or is_best:
            rngs = [None] * world
            if ddp:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if master:
                payload = state.payload(model_args=margs, config=to_dict(cfg), rngs=rngs)
                if periodic:
                    save_checkpoint(run_dir / f"{CKPT_PREFIX}{step:09d}.pt", payload)
                    for old in sorted(run_dir.glob(f"{CKPT_PREFIX}*.pt"))[
                        : -cfg.train.keep_checkpoints or None
                    ]:
                        old.unlink()
                    save_checkpoint(run_dir / "last.pt", payload)
                if is_best:
                    save_checkpoint(run_dir / "best.pt", payload)
        if final:
            break

    bar.close()
    if nets.pesq is not None:
        nets.pesq.close()
    if master:
        log.info("training finished step=%d best_si_sdri=%.3f reason=%s", state.step,
                 state.best_si_sdri,
                 stop_reason.replace(" ", "_"))
        if writer is not None:
            writer.close()
    if ddp:
        dist.destroy_process_group()
    if stop_reason.endswith("in a row") or stop_reason.startswith("ranks"):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        # Into train.log as well as the console, so monitor_training.sh sees the traceback
        # (CUDA out-of-memory included).
        log.exception("crashed")
        raise
