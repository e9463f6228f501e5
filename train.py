"""Train HiFi-TSE. One loop, read top to bottom.

    python train.py --config configs/hifi_tse.yaml [--set section.key=value ...]
    torchrun --nproc_per_node 4 train.py --config configs/hifi_tse.yaml     # several GPUs
    python train.py --config ... --resume runs/x/step_000100000.pt        # a given checkpoint
    python train.py --config ... --init runs/x/best.pt                    # weights only

A run resumes by itself from RUN_DIR/last.pt. Every step count is in micro-steps (one batch);
the optimizer updates every ``optim.grad_accum`` micro-steps. Log lines are ``key=value``
(doc/log_format.md); monitor_training.sh parses them.

This file is the loop: the step (``micro_step``), the update and ``main``. What they are made
of (the nets and their building, schedules, loss assembly, the step log, the training state and
its checkpoints, DDP sync, validation) is in training/.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from config import Config, ConfigError, dump_config, load_config, model_kwargs, to_dict
from data.dataset import HiFiTSEDataset, dataset_kwargs, seed_worker
from data.standard_dataset import StandardSetDataset, standard_dataset
from dsp.files import write_text_atomic
from losses.adversarial import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    metric_discriminator_loss,
    metric_generator_loss,
)
from losses.pesq_target import PESQ_OFFSET, PESQ_SPAN
from losses.separation import weighted_mean
from models.hifi_tse.tf_gridnet import bf16_lstm_works, use_float32_lstms
from models.registry import CheckpointError, one_line, read_checkpoint
from training.distributed import ddp_sync, ranks_in_sync
from training.loss_assembly import (
    ALL_ITEM_TERMS,
    TA_TERMS,
    loss_terms,
    loss_weights,
    objective_of,
    teacher_estimate,
    weighted_sum,
)
from training.nets import Nets, autocast_dtype, build_nets, resolve_device, wrap_ddp
from training.schedules import StepSampler, gan_weight, lr_factor, phase_probs, sir_boost_db
from training.state import (
    CKPT_PREFIX,
    TrainState,
    read_resume_checkpoint,
    rng_state,
    save_checkpoint,
)
from training.step_log import StepLog
from training.stopping import StopRequest, free_space, refuse
from training.validation import swap_pairs_on, validate, write_examples

log = logging.getLogger("train")
# Logged, not weighted; pesq: the raw wide-band PESQ of the training estimates (gan.kind metric)
LOG_ONLY_TERMS = ("loss", "rms_ratio", "disc", "adv", "feat_match", "pesq")
RMS_FLOOR = 1e-8  # target norm floor of the logged rms_ratio (TA targets are all zeros)


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
    if cfg.standard.layout:
        # A standard set's fixed mixtures have no target-absent items and no dynamic mixing:
        # the schedules that act on them would train nothing (evaluate.py may still score any
        # checkpoint on a set, so this is a rule of training only).
        for key, value in (("data.ta_prob", cfg.data.ta_prob),
                           ("loss.ta_energy", cfg.loss.ta_energy),
                           ("train.sir_boost_db", t.sir_boost_db),
                           ("train.selection_steps", t.selection_steps),
                           ("train.twin_steps", t.twin_steps),
                           ("train.noisy_ref_max_prob", t.noisy_ref_max_prob),
                           ("data.val_noisy_ref_prob", cfg.data.val_noisy_ref_prob)):
            if value:
                raise ConfigError(f"config key '{key}': must be 0 with standard.layout "
                                  f"{cfg.standard.layout!r} (its fixed mixtures have no "
                                  "target-absent items and no dynamic mixing)")


def _dataset(cfg: Config, split: str, rank: int) -> HiFiTSEDataset | StandardSetDataset:
    """The ``split`` ("train" or "val") of the data: dynamic mixing from the packed corpora, or
    a standard set's fixed mixtures when ``standard.layout`` names one."""
    s, d, rate = cfg.standard, cfg.data, cfg.stft.sample_rate
    if not s.layout:
        return HiFiTSEDataset(**dataset_kwargs(d, split, rank=rank, sample_rate=rate))
    train = split == "train"
    try:
        return standard_dataset(s, s.train_split if train else s.val_split, train=train,
                                length=d.samples_per_epoch if train else d.n_val_samples,
                                seed=d.seed, rank=rank,
                                segment_seconds=d.segment_seconds, ref_seconds=d.ref_seconds,
                                sample_rate=rate)
    except ValueError as err:  # SetLayoutError, a choice the layout lacks, another rate
        raise ConfigError(f"standard: {err}") from None


# ---------------------------------------------------------------------------------------------
# The training step: one micro-step (forward, losses, backward) and one optimizer update. The
# loop in main() and tests/ddp_check.py run these same functions.
# ---------------------------------------------------------------------------------------------


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
            # The same batch through the frozen teacher (distillation), without a graph: it
            # adds a forward, not a backward, and no collective (it is not wrapped in DDP).
            teacher_est = teacher_estimate(nets, batch)
        est = est.float()
        if metric_gan:
            # PESQ of this batch starts now in worker processes (losses/pesq_target.py) and
            # overlaps everything up to the discriminator loss below: the separation losses,
            # both discriminator forwards and the generator's whole backward, enqueued by this
            # thread and run by the device meanwhile.
            pesq_future = nets.pesq.submit(est, batch["target"])
        terms = loss_terms(est, batch, nets, weights, aux, teacher_est)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train HiFi-TSE.")
    parser.add_argument("--config", required=True, action="append",
                        help="YAML file (only what differs); repeat it to layer files")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--resume", help="checkpoint to resume from (default: RUN_DIR/last.pt)")
    parser.add_argument("--init", help="checkpoint whose generator weights start a new run")
    parser.add_argument("--print-run-dir", action="store_true",
                        help="check the config, print its train.run_dir and exit "
                             "(run_training.sh finds the run's log and checkpoints so)")
    args = parser.parse_args(argv)
    # SIGTERM / SIGINT / SIGHUP from here on: stop after the current update (training/stopping)
    stop = StopRequest()
    try:
        train(args, stop)
    finally:
        stop.restore()


def train(args: argparse.Namespace, stop: StopRequest) -> None:
    """The run ``main`` parsed: set-up, resume, the loop, the end; exits under the contract of
    training/stopping.py (a refusal: ``EXIT_NO_RESTART``)."""
    # ---------------------------------------------------------------------------------------
    # Config, distributed set-up, device, precision
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
        refuse(str(err))
    if args.print_run_dir:
        sys.stdout.write(f"{cfg.train.run_dir}\n")
        return
    run_dir = Path(cfg.train.run_dir)
    resume = Path(args.resume) if args.resume else run_dir / "last.pt"
    if args.resume and not resume.is_file():
        refuse(f"{resume}: no such checkpoint")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    # The console only, until the run is known to be valid: a refused run writes nothing in
    # run_dir (a wrong --resume must not touch the run it names).
    logging.basicConfig(level=logging.INFO if master else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler()], force=True)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to each data worker: oversubscribed OpenMP threads spin at every LSTM
        # time step's barrier, and a step then takes 10-40x longer (measured on 2 cores).
        cores = max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(max(1, cores - cfg.data.num_workers))
    try:  # both splits before anything is written: a set that cannot be read is refused
        train_set = _dataset(cfg, "train", rank)
        val_set = _dataset(cfg, "val", rank)
    except ConfigError as err:
        refuse(str(err))
    if getattr(cfg.model, "n_speakers", None) == 0 and cfg.loss.speaker_ce:
        # A classification head over the training speakers (the batch's speaker_class): its
        # size comes from the data, and the resolved config and model_args record it.
        cfg.model.n_speakers = len(train_set.speaker_names)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    random.seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)  # noqa: NPY002
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # ---------------------------------------------------------------------------------------
    # The checkpoint to resume from, checked against the config; networks, optimisers, scaler
    # ---------------------------------------------------------------------------------------
    try:
        margs = model_kwargs(cfg)  # reads a refiner's first-stage checkpoint
    except CheckpointError as err:
        refuse(f"model.first_stage_ckpt: {err}")
    try:
        ckpt = read_resume_checkpoint(resume, margs) if resume.is_file() else None
    except CheckpointError as err:
        refuse(str(err))
    try:
        nets = build_nets(cfg, device, load_parts=ckpt is None)
    except ConfigError as err:  # a teacher (distill.teacher_ckpt) that cannot teach this run
        refuse(str(err))
    lstms_in_float32 = 0
    if amp_dtype == torch.bfloat16 and not bf16_lstm_works(device):
        lstms_in_float32 = use_float32_lstms(nets.generator)
        for frozen in (nets.ema, nets.teacher):
            if frozen is not None:
                use_float32_lstms(frozen)
    generator, ema = nets.generator, nets.ema

    # ---------------------------------------------------------------------------------------
    # Resume (exact) or initialise from weights
    # ---------------------------------------------------------------------------------------
    state = TrainState(nets)
    if ckpt is not None:
        try:
            state.load(ckpt, rank=rank)
        except ConfigError as err:
            refuse(f"{resume}: {err}")
    elif args.init:
        try:
            init = read_checkpoint(Path(args.init))
            generator.load_state_dict(init["generator"])
        except (CheckpointError, RuntimeError) as err:  # RuntimeError: other weights' shapes
            refuse(f"--init {args.init}: {one_line(str(err))}")
        if ema is not None:
            ema.load_state_dict(init["generator"])

    # ---------------------------------------------------------------------------------------
    # The run is valid: from here on it writes into run_dir (log, config, TensorBoard)
    # ---------------------------------------------------------------------------------------
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(run_dir / "train.log")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(file_log)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    if ckpt is not None:
        log.info("resumed step=%d from=%s", state.step, resume)
        del ckpt  # its tensors are memory-mapped: let the file go
    elif args.init:
        log.info("initialised weights from=%s", args.init)
    if lstms_in_float32:
        log.warning("bf16_lstm=unsupported device=%s lstms=%d run_in=float32 (the rest of the "
                    "network stays bf16)", device, lstms_in_float32)
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
    # Each loader draws its workers' base seed from a generator of its own, not from torch's
    # global RNG: a fresh process's first validation would otherwise draw at another step than
    # the run it resumes did, and shift what dropout (MetricGAN's discriminator) draws after.
    # The items do not depend on it (their seeds are (seed, rank, epoch, index)).
    train_loader = DataLoader(
        train_set, sampler=StepSampler(start_step=state.step, batch_size=batch_size, cfg=cfg),
        generator=torch.Generator().manual_seed(cfg.train.seed + rank), **loader_args,
    )
    val_loader = DataLoader(val_set, sampler=range(rank, len(val_set), world),
                            generator=torch.Generator().manual_seed(cfg.train.seed + rank),
                            **loader_args)
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
    trained_before = state.train_seconds  # in earlier processes of this run (restarts)
    stop_reason, refused, signalled = "total_steps reached", False, False
    # Under a time budget total_steps is only a cap, and its ETA would mislead.
    bar = tqdm(total=None if cfg.train.max_minutes else cfg.train.total_steps, initial=state.step,
               unit="step", dynamic_ncols=True,
               disable=not (master and cfg.train.progress_bar))
    data_iter = iter(train_loader)
    state.restore_rng()  # after the iterator's seed draw: as the saving run stood at its save
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
                stop_reason, refused = f"{nonfinite_run} non-finite updates in a row", True
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

        # ---- end of run? A stop signal (to any rank) or the time budget (over every restart):
        # every rank must stop at the same update, so both flags are all-reduced, always, on
        # the training device (NCCL all-reduces only device tensors). The .tolist() adds no
        # wait of its own, as update() has just synchronised with the device.
        final = step >= cfg.train.total_steps
        state.train_seconds = trained_before + time.perf_counter() - t_start
        over_budget = bool(cfg.train.max_minutes) and (
            state.train_seconds > 60 * cfg.train.max_minutes)
        flags = torch.tensor([float(over_budget), float(stop.requested)], device=device)
        if ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        over_budget, signalled = (bool(f) for f in flags.tolist())
        if over_budget:
            final, stop_reason = True, f"time budget of {cfg.train.max_minutes:g} min used"
        if signalled:
            final, stop_reason = True, "signal"

        # ---- validation, best checkpoint, early stopping (a stop on a signal validates only
        # when validation is due: the grace period before torchrun's SIGKILL is 30 s)
        is_best = False
        if step % cfg.train.val_every == 0 or (final and not signalled):
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
                stop_reason, refused = "ranks hold different weights", True
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
                saves = ([run_dir / f"{CKPT_PREFIX}{step:09d}.pt", run_dir / "last.pt"]
                         if periodic else []) + ([run_dir / "best.pt"] if is_best else [])
                for path in saves:
                    try:
                        save_checkpoint(path, payload)
                    except OSError as err:
                        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        # The previous file is intact (save_checkpoint is atomic); restarting
                        # would only fill the disk again.
                        log.error("stopping step=%d reason=disk_full path=%s", step, path)
                        refuse(f"{path}: no space left on device while writing the checkpoint "
                               f"({free_space(path.parent)}); the previous one is intact")
                    if path.name.startswith(CKPT_PREFIX):
                        for old in sorted(run_dir.glob(f"{CKPT_PREFIX}*.pt"))[
                            : -cfg.train.keep_checkpoints or None
                        ]:
                            old.unlink()
                log.info("saved step=%d files=%s", step, ",".join(p.name for p in saves))
        if final:
            break

    bar.close()
    if nets.pesq is not None:
        nets.pesq.close()
    if master:
        if signalled:
            log.info("stopped step=%d reason=signal signal=%s", state.step,
                     stop.name or "on_another_rank")
        else:
            log.info("training finished step=%d best_si_sdri=%.3f reason=%s", state.step,
                     state.best_si_sdri, stop_reason.replace(" ", "_"))
        if writer is not None:
            writer.close()
    if ddp:
        dist.destroy_process_group()
    if refused:
        refuse(f"training stopped: {stop_reason} (see {run_dir / 'train.log'})")


def cli() -> None:
    """The command line: ``main``, with an uncaught exception logged before it ends the process
    (exit status 1: a crash, safe to restart)."""
    try:
        main()
    except Exception:
        # Into train.log as well as the console, so monitor_training.sh sees the traceback
        # (CUDA out-of-memory included).
        log.exception("crashed")
        raise


if __name__ == "__main__":
    cli()
