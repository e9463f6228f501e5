"""What a training step updates (``Nets``) and how it is built: the generator of any family and
its EMA, the discriminator of the GAN phase, the optimisers and the loss scaler, the DDP
wrappers, the device and the autocast dtype."""

import copy
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from config import Config, ConfigError, model_kwargs
from dsp.stft import STFT
from losses.pesq_target import PesqScorer
from losses.stft_loss import MultiResolutionSTFTLoss
from models.discriminators.hifigan import HiFiGANDiscriminator
from models.discriminators.metric_gan import MetricDiscriminator
from models.registry import (
    CheckpointError,
    build_model,
    family,
    load_first_stage,
    model_from_payload,
    normalised_args,
    read_checkpoint,
)

GAN_BETAS = (0.8, 0.99)  # HiFi-GAN's AdamW betas for the discriminators


DDP_ARGS = inspect.signature(DDP.__init__).parameters


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
    # distill.teacher_ckpt's model, frozen and in eval mode (None without distillation). Not a
    # submodule of the generator, so the generator's train() leaves it in eval mode; never
    # wrapped in DDP, not averaged into the EMA, not saved (its checkpoint is its own).
    teacher: nn.Module | None = None


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


def load_teacher(cfg: Config, device: torch.device) -> nn.Module | None:
    """The frozen teacher of ``distill.teacher_ckpt`` (its EMA weights) on ``device``, in eval
    mode; None without one. A ConfigError naming the key when the file cannot teach this run:
    unreadable, a family with an objective of its own, or another sample rate."""
    path = cfg.distill.teacher_ckpt
    if not path:
        return None
    key = "config key 'distill.teacher_ckpt'"
    try:
        ckpt = read_checkpoint(Path(path))
        args = normalised_args(ckpt["model_args"])
        teacher_family = family(args["arch"])
    except (CheckpointError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    if teacher_family.objective is not None:
        raise ConfigError(f"{key}: {path} holds arch {teacher_family.name}, which trains by "
                          f"loss.{teacher_family.objective}, not an extractor; any other family "
                          "may teach")
    if args["sample_rate"] != cfg.stft.sample_rate:
        raise ConfigError(f"{key}: {path} runs at {args['sample_rate']} Hz, the student at "
                          f"stft.sample_rate={cfg.stft.sample_rate}")
    # Building it initialises weights the checkpoint then overwrites; forked, so that the
    # training RNG stream is the one a run without a teacher has.
    with torch.random.fork_rng(devices=[]):
        try:
            teacher = model_from_payload(ckpt, use_ema=True, name=path)
        except CheckpointError as err:
            raise ConfigError(f"{key}: {err}") from None
    return teacher.to(device).eval().requires_grad_(False)


def build_nets(cfg: Config, device: torch.device, *, load_parts: bool = True) -> Nets:
    """Generator (+ EMA), discriminator when the GAN phase is configured, optimisers, scaler.
    Call ``torch.manual_seed`` first: every rank must build the same initial weights.
    ``load_parts``: load the weights of parts that other checkpoints hold (a refiner's first
    stage), as a new run does; a resumed run reads them from its own checkpoint. The teacher
    (``distill.teacher_ckpt``) is loaded from its file in either case."""
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
                gen_ddp=generator, disc_ddp=disc, pesq=pesq, teacher=load_teacher(cfg, device))


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
