"""DDP helpers: gradient sync only on the last micro-step of an update, and the weights
fingerprint that checks every rank holds the same networks."""

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from training.nets import Nets


def ddp_sync(nets: Nets, sync: bool) -> contextlib.AbstractContextManager[object]:
    """``no_sync`` on every DDP module unless ``sync``. It must enclose the forward as well as
    the backward: DDP decides whether a backward all-reduces when the forward runs."""
    stack = contextlib.ExitStack()
    if not sync:
        for module in (nets.gen_ddp, nets.disc_ddp):
            if isinstance(module, DDP):
                stack.enter_context(module.no_sync())
    return stack


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
