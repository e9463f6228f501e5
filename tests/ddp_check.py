"""Run under torchrun with 2 processes (tests/test_train.py does): DDP gradients with gradient
accumulation (``no_sync`` on all but the last micro-step, as train.py does) must be equal on
every rank and equal to one process training on the combined batch. Rank 0 writes a JSON report
to the path given as the only argument."""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import load_config, model_kwargs
from losses.separation import si_sdr_loss
from models.generator import Generator

ACCUM = 2  # micro-steps per update
PER_RANK = 2  # items per rank and micro-step
N_SAMPLES = 9_600


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = Generator(**model_kwargs(cfg)).train()
    single = copy.deepcopy(model)
    ddp = DDP(model)
    gen = torch.Generator().manual_seed(1)
    shape = (ACCUM, world * PER_RANK, N_SAMPLES)
    mix, ref, target = (torch.randn(shape, generator=gen) for _ in range(3))

    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for micro in range(ACCUM):
        sync = contextlib.nullcontext() if micro == ACCUM - 1 else ddp.no_sync()
        with sync:
            est = ddp(mix[micro, mine], ref[micro, mine])
            (si_sdr_loss(est, target[micro, mine]) / ACCUM).backward()
    grads = flat_grads(model)
    gathered = [torch.zeros_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)

    for micro in range(ACCUM):  # the same updates in one process on the combined batch
        (si_sdr_loss(single(mix[micro], ref[micro]), target[micro]) / ACCUM).backward()
    reference = flat_grads(single)
    scale = reference.abs().max().item()
    if rank == 0:
        report = {
            "world": world,
            "max_diff_between_ranks": max((g - gathered[0]).abs().max().item() for g in gathered),
            "max_diff_vs_single": (grads - reference).abs().max().item() / scale,
            "grad_scale": scale,
        }
        Path(sys.argv[1]).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
