"""The training state and its checkpoints: networks, optimisers, counters and every rank's RNG
states, written atomically and read back exactly."""

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from config import ConfigError
from dsp.files import atomic_path
from models.registry import ARCH_KEY, CheckpointError, normalised_args, read_checkpoint
from training.nets import Nets, disc_kind

CKPT_PREFIX = "step_"


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
    """Atomic and durable (``atomic_path``): a killed write or a power cut leaves the previous
    file intact, never half a checkpoint. A full disk raises ``OSError`` (``errno.ENOSPC``):
    written through a Python file, as torch's own path writer reports it as a bare
    ``RuntimeError`` ("unexpected pos")."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def read_resume_checkpoint(path: Path, model_args: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint a run resumes from, refused (``CheckpointError``, naming ``path`` and both
    sides) when it cannot be read or holds another model than ``model_args`` describes."""
    ckpt = read_checkpoint(path)
    saved = normalised_args(ckpt["model_args"])
    if saved[ARCH_KEY] != model_args[ARCH_KEY]:
        raise CheckpointError(f"{path}: it holds a {saved[ARCH_KEY]} model, the config builds "
                              f"{model_args[ARCH_KEY]}: resume with the config it was trained "
                              "with (its run's config.yaml) or another run_dir")
    diffs = [k for k in sorted({*saved, *model_args}) if saved.get(k) != model_args.get(k)]
    if diffs:
        shown = "; ".join(f"model.{k}: checkpoint {saved.get(k)!r}, config "
                          f"{model_args.get(k)!r}" for k in diffs[:4])
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise CheckpointError(f"{path}: its {saved[ARCH_KEY]} model differs from the "
                              f"config's ({shown}{more})")
    return ckpt


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
    # Training time (s) up to the checkpoint, over every restart: train.max_minutes spans them.
    # The time between a checkpoint and a crash is lost with the steps it trained.
    train_seconds: float = 0.0
    _rng: dict[str, Any] | None = None  # a checkpoint's RNG states, until restore_rng()

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "step", "best_si_sdri", "bad_validations", "nonfinite_total", "train_seconds",
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
        for name in self.COUNTERS:  # a counter added since the checkpoint keeps its default
            setattr(self, name, ckpt.get(name, getattr(self, name)))
        self._rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]

    def restore_rng(self) -> None:
        """Set the RNG states ``load`` read, if any. Call it where the saving run was when it
        took them, the top of the loop: what the set-up draws in between (a DataLoader
        iterator draws its base seed from torch's RNG) must not shift the stream that dropout
        (MetricGAN's discriminator) draws from."""
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
