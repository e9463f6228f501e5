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
    """Atomic: a killed write leaves the previous file intact, never half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


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
