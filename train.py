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
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from config import Config, ConfigError, dump_config, load_config, model_kwargs, to_dict
from data.dataset import HiFiTSEDataset, dataset_kwargs, seed_worker
from losses.adversarial import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from losses.separation import (
    level_loss,
    phase_sensitive_loss,
    si_sdr,
    si_sdr_loss,
    snr_loss,
    ta_energy_loss,
    ta_suppression_db,
)
from losses.stft_loss import MultiResolutionSTFTLoss, amplitude_loss, waveform_l1_loss
from models.discriminator import HiFiGANDiscriminator
from models.generator import Generator

log = logging.getLogger("train")
CKPT_PREFIX = "step_"
LOG_ONLY_TERMS = ("loss", "rms_ratio", "disc", "adv", "feat_match")  # logged, not weighted
TA_TERMS = ("ta_energy",)  # averaged over target-absent items; every other term over TP items


class StepSampler(Sampler):
    """An endless stream of ``(index, ta_prob, noisy_ref_prob, sir_boost_db)`` for
    ``HiFiTSEDataset``.

    Sample ``i`` belongs to micro-step ``i // batch_size``, and the phase schedule of that step
    is baked into the index, so the stream is a function of the step alone: a resumed run (or a
    DataLoader worker far ahead of the loop) sees exactly what an uninterrupted run saw.
    """

    def __init__(self, *, start_step: int, batch_size: int, cfg: Config) -> None:
        self.start = start_step * batch_size
        self.batch_size = batch_size
        self.cfg = cfg

    def __iter__(self) -> Iterator[tuple[int, float, float, float]]:
        index = self.start
        while True:
            step = index // self.batch_size
            ta_prob, noisy_ref_prob = phase_probs(self.cfg, step)
            yield index, ta_prob, noisy_ref_prob, sir_boost_db(self.cfg, step)
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
    if t.sir_boost_steps < 0:
        raise ConfigError(f"train.sir_boost_steps must be >= 0, got {t.sir_boost_steps}")
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
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train HiFi-TSE.")
    parser.add_argument("--config", required=True, help="YAML file (only what differs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--resume", help="checkpoint to resume from (default: RUN_DIR/last.pt)")
    parser.add_argument("--init", help="checkpoint whose generator weights start a new run")
    args = parser.parse_args(argv)

    # ---------------------------------------------------------------------------------------
    # Config, distributed set-up, device, logging
    # ---------------------------------------------------------------------------------------
    try:
        cfg = load_config(args.config, args.set)
        check_config(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    ddp = "RANK" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.train.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.train.device)
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
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    else:
        logging.basicConfig(level=logging.WARNING, force=True)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to each data worker: oversubscribed OpenMP threads spin at every LSTM
        # time step's barrier, and a step then takes 10-40x longer (measured on 2 cores).
        cores = max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(max(1, cores - cfg.data.num_workers))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    random.seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)  # noqa: NPY002

    precision = cfg.train.precision
    if precision == "fp16" and device.type != "cuda":
        sys.exit("error: train.precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    # GradScaler only for fp16: bf16 has float32's range and needs no loss scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---------------------------------------------------------------------------------------
    # Model, EMA, optimisers, losses
    # ---------------------------------------------------------------------------------------
    margs = model_kwargs(cfg)
    generator = Generator(**margs).to(device)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.optim.ema_decay else None
    opt_g = torch.optim.AdamW(
        generator.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    disc = opt_d = None
    if cfg.gan.enabled:
        disc = HiFiGANDiscriminator(periods=tuple(cfg.gan.periods), n_scales=cfg.gan.n_scales)
        disc = disc.to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.gan.lr, betas=(0.8, 0.99))
    mr_stft = MultiResolutionSTFTLoss().to(device)
    weights = to_dict(cfg)["loss"]  # named weights: {term: weight}

    # ---------------------------------------------------------------------------------------
    # Resume (exact) or initialise from weights
    # ---------------------------------------------------------------------------------------
    step, best, bad_vals, nonfinite_total = 0, -math.inf, 0, 0
    resume = Path(args.resume) if args.resume else run_dir / "last.pt"
    if args.resume and not resume.is_file():
        sys.exit(f"error: {resume}: no such checkpoint")
    if resume.is_file():
        ckpt = torch.load(resume, map_location=device, weights_only=True)
        if ckpt["model_args"] != margs:
            sys.exit(f"error: {resume}: its model section differs from the config's")
        generator.load_state_dict(ckpt["generator"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        opt_g.load_state_dict(ckpt["opt_g"])
        if disc is not None and ckpt.get("disc") is not None:
            disc.load_state_dict(ckpt["disc"])
            opt_d.load_state_dict(ckpt["opt_d"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best, bad_vals = ckpt["step"], ckpt["best_si_sdri"], ckpt["bad_validations"]
        nonfinite_total = ckpt["nonfinite_total"]
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        log.info("resumed step=%d from=%s", step, resume)
    elif args.init:
        ckpt = torch.load(args.init, map_location=device, weights_only=True)
        generator.load_state_dict(ckpt["generator"])
        if ema is not None:
            ema.load_state_dict(ckpt["generator"])
        log.info("initialised weights from=%s", args.init)
    gen_module = generator
    if ddp:
        generator = DDP(generator, device_ids=[device.index] if device.type == "cuda" else None)
        disc_ddp = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) \
            if disc is not None else None
    else:
        disc_ddp = disc
    n_params = sum(p.numel() for p in gen_module.parameters())
    log.info("generator params=%d device=%s world=%d precision=%s", n_params, device, world,
             precision)

    # ---------------------------------------------------------------------------------------
    # Data: the stream position is the step (see StepSampler)
    # ---------------------------------------------------------------------------------------
    batch_size = cfg.train.batch_size
    train_set = HiFiTSEDataset(**dataset_kwargs(cfg.data, "train", rank=rank))
    loader_args = {
        "batch_size": batch_size,
        "num_workers": cfg.data.num_workers,
        "worker_init_fn": seed_worker,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.data.num_workers > 0,
    }
    train_loader = DataLoader(
        train_set, sampler=StepSampler(start_step=step, batch_size=batch_size, cfg=cfg),
        **loader_args,
    )
    val_set = HiFiTSEDataset(**dataset_kwargs(cfg.data, "val"))
    val_loader = DataLoader(val_set, sampler=range(rank, len(val_set), world), **loader_args)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=step) if master else None

    # ---------------------------------------------------------------------------------------
    # Losses and validation, shared by training and validation
    # ---------------------------------------------------------------------------------------
    def loss_terms(est: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every weighted term; TP terms average over target-present items, the TA term over
        target-absent ones."""
        target, mix = batch["target"], batch["mix"]
        tp = (~batch["is_ta"]).float()
        stft = gen_module.stft
        terms = {"si_sdr": si_sdr_loss(est, target, weights=tp),
                 "snr": snr_loss(est, target, weights=tp),
                 "level": level_loss(est, target, weights=tp),
                 "ta_energy": ta_energy_loss(est, mix, weights=1 - tp)}
        if weights["phase_sensitive"] or weights["amplitude"]:
            est_spec, target_spec = stft(est), stft(target)
            terms["phase_sensitive"] = phase_sensitive_loss(est_spec, target_spec, weights=tp)
            terms["amplitude"] = amplitude_loss(est_spec, target_spec, weights=tp)
        if weights["multi_res_stft"]:
            terms["multi_res_stft"] = mr_stft(est, target, weights=tp)
        if weights["l1"]:
            terms["l1"] = waveform_l1_loss(est, target, weights=tp)
        return terms

    def weighted_sum(terms: dict[str, torch.Tensor], is_ta: torch.Tensor) -> torch.Tensor:
        """Each term is a mean over the items it covers; weighting it by their share of the
        batch makes the total a per-item mean (20 % TA items weigh 20 %, not 50 %)."""
        ta_share = is_ta.float().mean()
        share = {k: ta_share if k in TA_TERMS else 1 - ta_share for k in terms}
        return sum(w * share[k] * terms[k] for k, w in weights.items() if w and k in terms)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        model = ema if ema is not None else gen_module
        model.eval()
        # sums: si_sdr, si_sdri, n_tp, ta_supp, n_ta, loss, n_batches
        sums = torch.zeros(7, dtype=torch.float64, device=device)
        examples: list[tuple[torch.Tensor, ...]] = []
        for batch in val_loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast:
                est = model(batch["mix"], batch["ref"])
            est = est.float()
            tp = ~batch["is_ta"]
            sdr = si_sdr(est[tp], batch["target"][tp])
            sdr_mix = si_sdr(batch["mix"][tp], batch["target"][tp])
            supp = ta_suppression_db(est[~tp], batch["mix"][~tp])
            loss = weighted_sum(loss_terms(est, batch), batch["is_ta"])
            sums += torch.tensor([sdr.sum(), (sdr - sdr_mix).sum(), tp.sum(), supp.sum(),
                                  (~tp).sum(), loss, 1], dtype=torch.float64, device=device)
            if len(examples) < cfg.train.n_val_audio:
                examples.append((batch["mix"][0], batch["ref"][0], est[0], batch["target"][0]))
        if ddp:
            dist.all_reduce(sums)
        s_sdr, s_sdri, n_tp, s_supp, n_ta, s_loss, n_b = sums.tolist()
        generator.train()
        if writer is not None:
            for i, (mix, ref, est, target) in enumerate(examples):
                for name, wave in (("mix", mix), ("ref", ref), ("est", est), ("target", target)):
                    peak = max(wave.abs().max().item(), 1e-6)
                    writer.add_audio(f"val{i}/{name}", (wave / max(peak, 1.0)).cpu()[None],
                                     step, sample_rate=cfg.stft.sample_rate)
                    if name != "ref":
                        spec = gen_module.stft(wave[None].float())[0].abs()
                        image = (20 * torch.log10(spec + 1e-5)).clamp(min=-100).flip(0)
                        image = (image - image.min()) / (image.max() - image.min() + 1e-9)
                        writer.add_image(f"val{i}/{name}_spec", image.cpu(), step,
                                         dataformats="HW")
        return {"si_sdr": s_sdr / max(n_tp, 1), "si_sdri": s_sdri / max(n_tp, 1),
                "ta_supp_db": s_supp / n_ta if n_ta else float("nan"),
                "loss": s_loss / max(n_b, 1), "n_tp": n_tp, "n_ta": n_ta}

    # ---------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------
    accum = cfg.optim.grad_accum
    generator.train()
    log_sums: dict[str, torch.Tensor] = {}  # summed on the device; .item() only at log steps
    log_counts: dict[str, int] = {}
    log_count, nonfinite_run, corrupt = 0, 0, 0
    t_start = t_log = time.perf_counter()
    stop_reason = "total_steps reached"
    # Under a time budget total_steps is only a cap, and its ETA would mislead.
    bar = tqdm(total=None if cfg.train.max_minutes else cfg.train.total_steps, initial=step,
               unit="step", dynamic_ncols=True,
               disable=not (master and cfg.train.progress_bar))
    data_iter = iter(train_loader)
    while step < cfg.train.total_steps:
        batch = next(data_iter)
        corrupt += int(batch["n_corrupt"].sum())
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        last_micro = (step + 1) % accum == 0
        gan_w = gan_weight(cfg, step)

        # ---- generator forward and its loss terms
        with autocast:
            est = generator(batch["mix"], batch["ref"])
        est = est.float()
        tp = ~batch["is_ta"]
        terms = loss_terms(est, batch)
        # ---- GAN phase: discriminator on real targets vs detached estimates (TP items only)
        if gan_w is not None and tp.any():
            real, fake = batch["target"][tp], est[tp]
            n_real = real.shape[0]
            no_sync = contextlib.nullcontext() if last_micro or not ddp else disc_ddp.no_sync()
            with no_sync, autocast:
                # One forward over real and detached fake: DDP expects one forward per backward.
                logits, feats = disc_ddp(torch.cat([real, fake.detach()]))
                d_loss = discriminator_loss(
                    [x[:n_real] for x in logits], [x[n_real:] for x in logits]
                )
            scaler.scale(d_loss / accum).backward()
            terms["disc"] = d_loss.detach()
            if gan_w > 0:
                # Through the plain module with frozen weights: the generator's adversarial
                # gradient must not reach the discriminator's parameters.
                disc.requires_grad_(False)
                with autocast:
                    fake_logits, fake_feats = disc(fake)
                    real_feats = [[f[:n_real].detach() for f in fs] for fs in feats]
                    terms["adv"] = generator_adversarial_loss(fake_logits)
                    terms["feat_match"] = feature_matching_loss(real_feats, fake_feats)
                disc.requires_grad_(True)
        loss = weighted_sum(terms, batch["is_ta"])
        if gan_w:
            loss = loss + gan_w * (cfg.gan.adv_weight * terms["adv"]
                                   + cfg.gan.fm_weight * terms["feat_match"])

        # ---- generator backward; DDP all-reduces only on the last micro-step of an update
        with contextlib.nullcontext() if last_micro or not ddp else generator.no_sync():
            scaler.scale(loss / accum).backward()
        terms["loss"] = loss
        if tp.any():  # estimate / target RMS: < 1 means the model is muting the target
            terms["rms_ratio"] = est[tp].norm() / batch["target"][tp].norm().clamp(min=1e-8)
        for k, v in terms.items():
            log_sums[k] = log_sums.get(k, 0.0) + v.detach()
            log_counts[k] = log_counts.get(k, 0) + 1
        log_count += 1
        step += 1
        bar.update(1)
        if not last_micro:
            continue

        # ---- optimizer update: clip, skip non-finite, step, EMA
        lr = cfg.optim.lr * lr_factor(cfg, step)
        for group in opt_g.param_groups:
            group["lr"] = lr
        scaler.unscale_(opt_g)
        grad_norm = torch.nn.utils.clip_grad_norm_(gen_module.parameters(), cfg.optim.grad_clip)
        if torch.isfinite(grad_norm):  # identical on every rank: gradients are all-reduced
            scaler.step(opt_g)
            nonfinite_run = 0
            if ema is not None:
                with torch.no_grad():
                    ema_p, gen_p = list(ema.parameters()), list(gen_module.parameters())
                    torch._foreach_lerp_(ema_p, gen_p, 1 - cfg.optim.ema_decay)
        else:
            nonfinite_run += 1
            nonfinite_total += 1
            log.warning("nonfinite step=%d count=%d in_a_row=%d", step, nonfinite_total,
                        nonfinite_run)
            if nonfinite_run >= cfg.train.max_nonfinite:
                stop_reason = f"{nonfinite_run} non-finite updates in a row"
                log.error("stopping step=%d reason=%s", step, stop_reason.replace(" ", "_"))
                break
        if opt_d is not None and gan_w is not None:
            scaler.unscale_(opt_d)
            d_norm = torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.optim.grad_clip)
            if torch.isfinite(d_norm):
                scaler.step(opt_d)
            opt_d.zero_grad(set_to_none=True)
        scaler.update()
        opt_g.zero_grad(set_to_none=True)

        # ---- logging (the .item() calls sync the device, so only here)
        if step % cfg.train.log_every == 0:
            elapsed = time.perf_counter() - t_log
            # A fixed key list: every rank must all-reduce the same vector, even a rank whose
            # batches held no target-present item (no rms_ratio, no GAN terms).
            keys = sorted({*weights, *LOG_ONLY_TERMS})
            packed = torch.tensor([[float(log_sums.get(k, 0.0)), log_counts.get(k, 0)]
                                   for k in keys], dtype=torch.float64, device=device)
            if ddp:
                dist.all_reduce(packed)
            stats = {k: s / n for k, (s, n) in zip(keys, packed.tolist(), strict=True) if n}
            ta_prob, nref_prob = phase_probs(cfg, step)
            stats.update(lr=lr, grad_norm=float(grad_norm), step_time=elapsed / log_count,
                         samples_per_s=log_count * batch_size * world / elapsed)
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
            phase = 3 if gan_w is not None else (2 if step >= cfg.train.phase2_step else 1)
            keys = ["loss", "si_sdr", *(k for k in stats if k not in ("loss", "si_sdr"))]
            log.info("step=%d phase=%d %s nonfinite=%d corrupt=%d", step, phase,
                     " ".join(f"{k}={stats[k]:.4g}" for k in keys), nonfinite_total, corrupt)
            log_sums, log_counts, log_count, t_log = {}, {}, 0, time.perf_counter()

        # ---- end of run? (every rank must agree, so the budget decision is all-reduced)
        final = step >= cfg.train.total_steps
        if cfg.train.max_minutes:
            over = torch.tensor(float(time.perf_counter() - t_start > 60 * cfg.train.max_minutes))
            if ddp:
                dist.all_reduce(over, op=dist.ReduceOp.MAX)
            if over.item():
                final, stop_reason = True, f"time budget of {cfg.train.max_minutes:g} min used"

        # ---- validation, best checkpoint, early stopping
        is_best = False
        if step % cfg.train.val_every == 0 or final:
            val = validate()
            if writer is not None:
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, step)
            log.info("val step=%d si_sdr=%.3f si_sdri=%.3f ta_supp_db=%.2f loss=%.4f n_tp=%d "
                     "n_ta=%d", step, val["si_sdr"], val["si_sdri"], val["ta_supp_db"],
                     val["loss"], val["n_tp"], val["n_ta"])
            if val["si_sdri"] > best:
                best, bad_vals, is_best = val["si_sdri"], 0, True
                log.info("best step=%d si_sdri=%.3f", step, best)
            else:
                bad_vals += 1
            bar.set_postfix(val_si_sdri=f"{val['si_sdri']:.2f}")
            if cfg.train.early_stop_patience and bad_vals >= cfg.train.early_stop_patience:
                final, stop_reason = True, f"no better si_sdri in {bad_vals} validations"
        # ---- checkpoints: last (always at an interval), best, rotation of step_*.pt
        periodic = step % cfg.train.ckpt_every == 0 or final
        if periodic or is_best:
            rngs = [None] * world
            if ddp:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if master:
                payload = {
                    "model_args": margs,
                    "config": to_dict(cfg),
                    "generator": gen_module.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "opt_g": opt_g.state_dict(),
                    "disc": disc.state_dict() if disc is not None else None,
                    "opt_d": opt_d.state_dict() if opt_d is not None else None,
                    "scaler": scaler.state_dict(),
                    "step": step,  # also the data position (StepSampler)
                    "best_si_sdri": best,
                    "bad_validations": bad_vals,
                    "nonfinite_total": nonfinite_total,
                    "rng": rngs,
                }
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
    if master:
        log.info("training finished step=%d best_si_sdri=%.3f reason=%s", step, best,
                 stop_reason.replace(" ", "_"))
        if writer is not None:
            writer.close()
    if ddp:
        dist.destroy_process_group()
    if stop_reason.endswith("in a row"):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        # Into train.log as well as the console, so monitor_training.sh sees the traceback
        # (CUDA out-of-memory included).
        log.exception("crashed")
        raise
