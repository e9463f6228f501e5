"""Validation during training: SI-SDR(i), TA suppression and the loss over the fixed
validation list, the swap test of speaker selection, and example audio for TensorBoard."""

import contextlib
import logging

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from config import Config
from data.dataset import HiFiTSEDataset
from data.manifest import ManifestError
from evaluation.selection import swap_batch, swap_scores
from losses.separation import (
    si_sdr,
    ta_suppression_db,
)
from models.registry import (
    validation_context,
)
from training.loss_assembly import (
    loss_terms,
    loss_weights,
    objective_of,
    objective_terms,
    teacher_estimate,
    weighted_sum,
)
from training.nets import Nets

log = logging.getLogger("train")  # one logger for the run: train.log holds it all


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
            teacher_est = teacher_estimate(nets, batch)  # the loss's, as in training
        est = est.float()
        tp = ~batch["is_ta"]
        # Masked sums: a TA item's SI-SDR (or a TP item's suppression) is dropped by
        # torch.where, so its inf or NaN cannot reach the sums.
        sdr = si_sdr(est, batch["target"])
        sdr_mix = si_sdr(batch["mix"], batch["target"])
        supp = ta_suppression_db(est, batch["mix"])
        loss = weighted_sum(loss_terms(est, batch, nets, weights, aux, teacher_est),
                            batch["is_ta"], weights)
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
