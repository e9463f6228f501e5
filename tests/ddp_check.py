"""Run under torchrun with 2 processes (tests/test_train.py does). It drives train.py's own step
functions (``build_nets``, ``wrap_ddp``, ``micro_step``, ``update``) under DDP on the CPU (gloo)
and rank 0 writes a JSON report to the path given as the first argument.

``grads`` (default): gradient accumulation over ``ACCUM`` micro-steps. A communication hook
records on which micro-steps the generator's gradient buckets are all-reduced (only the last
micro-step of an update may), and the accumulated gradients must be equal on every rank and
equal to one process running the same micro-steps on the combined batch.

``gan``: the GAN phase, with every batch of rank 0 target-absent and rank 1's mixed. Every rank
must run the same collectives (a rank that skipped the discriminator would hang gloo here and
NCCL on a GPU), and both ranks must end with identical generator and discriminator weights.

``validate``: ``train.validate`` with unequal shares, rank 0 two validation batches and every
swap pair, rank 1 one batch and no pair: its one all-reduce must run on both ranks and give
what one process computes on everything.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import train
from config import load_config
from training.distributed import ranks_in_sync
from training.nets import build_nets, wrap_ddp
from training.step_log import StepLog
from training.validation import validate

REPO = Path(__file__).resolve().parents[1]
ACCUM = 4  # micro-steps per update
PER_RANK = 2  # items per rank and micro-step
N_SAMPLES = 9_600  # 0.2 s at 48 kHz
GAN_UPDATES = 3


def batch_of(mix: torch.Tensor, ref: torch.Tensor, target: torch.Tensor,
             is_ta: torch.Tensor) -> dict[str, torch.Tensor]:
    """A training batch as HiFiTSEDataset collates it (a TA item's target is silence)."""
    target = torch.where(is_ta[:, None], torch.zeros_like(target), target)
    return {"mix": mix, "ref": ref, "target": target, "is_ta": is_ta}


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def check_grads(report: dict, rank: int, world: int) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"optim.grad_accum={ACCUM}"])
    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    nets = build_nets(cfg, device)
    single = build_nets(cfg, device)  # the reference: one process, combined batch
    single.generator.load_state_dict(nets.generator.state_dict())
    wrap_ddp(nets, device)

    calls: list[int] = []  # the micro-step of every bucket all-reduce
    micro = 0

    # No annotations: DDP checks them, and this module's are strings (__future__ annotations).
    def counting_hook(state, bucket):
        calls.append(micro)
        return allreduce_hook(state, bucket)

    nets.gen_ddp.register_comm_hook(None, counting_hook)
    gen = torch.Generator().manual_seed(1)
    shape = (ACCUM, world * PER_RANK, N_SAMPLES)
    mix, ref, target = (torch.randn(shape, generator=gen) for _ in range(3))
    is_ta = torch.zeros(ACCUM, world * PER_RANK, dtype=torch.bool)
    is_ta[1, 0] = True  # one target-absent item, on rank 0, in micro-step 1
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    no_autocast = contextlib.nullcontext()
    for micro in range(ACCUM):
        batch = batch_of(mix[micro, mine], ref[micro, mine], target[micro, mine],
                         is_ta[micro, mine])
        train.micro_step(nets, cfg, batch, step=micro, autocast=no_autocast,
                         step_log=StepLog())
    grads = flat([p.grad for p in nets.generator.parameters()])
    gathered = [torch.zeros_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    # A second update: the hook must again fire on its last micro-step only.
    train.update(nets, cfg, ACCUM)
    for micro in range(ACCUM, 2 * ACCUM):
        batch = batch_of(mix[micro % ACCUM, mine], ref[micro % ACCUM, mine],
                         target[micro % ACCUM, mine], is_ta[micro % ACCUM, mine])
        train.micro_step(nets, cfg, batch, step=micro, autocast=no_autocast,
                         step_log=StepLog())

    for micro in range(ACCUM):
        batch = batch_of(mix[micro], ref[micro], target[micro], is_ta[micro])
        train.micro_step(single, cfg, batch, step=micro, autocast=no_autocast,
                         step_log=StepLog())
    reference = flat([p.grad for p in single.generator.parameters()])
    scale = reference.abs().max().item()
    report.update({
        "world": world,
        "accum": ACCUM,
        "allreduce_micro_steps": sorted(set(calls)),
        "allreduces_per_update": [calls.count(ACCUM - 1), calls.count(2 * ACCUM - 1)],
        "n_allreduces": len(calls),
        "max_diff_between_ranks": max((g - gathered[0]).abs().max().item() for g in gathered),
        "max_diff_vs_single": (grads - reference).abs().max().item() / scale,
        "grad_scale": scale,
    })


def check_gan(report: dict, rank: int, world: int) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "optim.grad_accum=2", "gan.enabled=true", "gan.start_step=0", "gan.d_warmup_steps=2",
        "gan.ramp_steps=2", "gan.periods=[2, 3]", "gan.n_scales=2",  # smaller: same collectives
    ])
    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    nets = build_nets(cfg, device)
    before = {"generator": flat(list(nets.generator.state_dict().values())),
              "disc": flat(list(nets.disc.state_dict().values()))}
    wrap_ddp(nets, device)
    gen = torch.Generator().manual_seed(10 + rank)
    accum = cfg.optim.grad_accum
    for step in range(GAN_UPDATES * accum):
        mix, ref, target = (torch.randn(PER_RANK, N_SAMPLES, generator=gen) for _ in range(3))
        # rank 0: every item target-absent; rank 1: one of each
        is_ta = torch.ones(PER_RANK, dtype=torch.bool) if rank == 0 else \
            torch.arange(PER_RANK) % 2 == 1
        train.micro_step(nets, cfg, batch_of(mix, ref, target, is_ta), step=step,
                         autocast=contextlib.nullcontext(), step_log=StepLog())
        if (step + 1) % accum == 0:
            train.update(nets, cfg, step + 1)
    states = {"generator": nets.generator.state_dict(), "disc": nets.disc.state_dict()}
    diffs = {}
    for name, state in states.items():
        mine = flat(list(state.values()))
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        diffs[name] = max((g - gathered[0]).abs().max().item() for g in gathered)
    report.update({
        "world": world,
        "updates": GAN_UPDATES,
        "max_diff_between_ranks": diffs,
        "in_sync": ranks_in_sync(nets),
        # the GAN phase did train both networks
        "changed": {name: not torch.equal(before[name], flat(list(state.values())))
                    for name, state in states.items()},
    })


def check_validate(report: dict, rank: int, world: int) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    nets = build_nets(cfg, device)
    gen = torch.Generator().manual_seed(3)
    batches = []
    for b in range(3):
        mix, ref, target = (torch.randn(PER_RANK, N_SAMPLES, generator=gen) for _ in range(3))
        batches.append(batch_of(mix, ref, target, torch.arange(PER_RANK) == b % 2))
    n_pairs = 3
    pairs = {"mix": torch.randn(n_pairs, N_SAMPLES, generator=gen),
             "refs": torch.randn(n_pairs, 2, N_SAMPLES, generator=gen),
             "sources": torch.randn(n_pairs, 2, N_SAMPLES, generator=gen)}
    no_pairs = {k: v[:0] for k, v in pairs.items()}
    mine = batches[:2] if rank == 0 else batches[2:]
    shared, _ = validate(nets, cfg, mine, autocast=contextlib.nullcontext(), ddp=True,
                               pairs=pairs if rank == 0 else no_pairs)
    alone, _ = validate(nets, cfg, batches, autocast=contextlib.nullcontext(), ddp=False,
                              pairs=pairs)
    report.update({"world": world, "shared": shared, "alone": alone})


def main() -> None:
    out, mode = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "grads")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    report: dict = {"mode": mode}
    {"grads": check_grads, "gan": check_gan, "validate": check_validate}[mode](report, rank,
                                                                               world)
    if rank == 0:
        out.write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
