"""Everything that is a function of the step alone: the data stream with its curricula baked
in (``StepSampler``), the phases, the SIR curriculum, the learning rate and the GAN ramp. A
resumed run therefore sees exactly what an uninterrupted run saw."""

import math
from collections.abc import Iterator

from torch.utils.data import Sampler

from config import Config


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
