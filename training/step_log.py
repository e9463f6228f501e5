"""The step log: running means of the logged terms kept on the device, reduced over ranks at
log steps, and the reader of the ``key=value`` events a run writes (doc/log_format.md)."""

from pathlib import Path

import torch
import torch.distributed as dist


def log_events(path: Path, first_word: str = "step") -> list[dict[str, str]]:
    """The ``key=value`` events of a train.log (doc/log_format.md) whose first word is
    ``first_word``: ``step=N ...`` lines for "step", ``val step=N ...`` lines for "val"."""
    rows = []
    for line in path.read_text().splitlines():
        event = line.split(" ", 3)[-1]  # drop date, time, level
        if event.startswith(f"{first_word}="):
            rows.append(dict(kv.split("=", 1) for kv in event.split() if "=" in kv))
        elif event.startswith(f"{first_word} "):
            rows.append(dict(kv.split("=", 1) for kv in event.split()[1:] if "=" in kv))
    return rows


class StepLog:
    """Unbiased running means of the logged terms, kept on the device: each term adds its
    mean times the number of items it covers, and that number (a batch without TA items adds
    nothing to ``ta_energy``). ``.item()`` happens only in :meth:`reduce`, at log steps."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.micro_steps = 0

    def add(self, name: str, mean: torch.Tensor, count: torch.Tensor) -> None:
        count = count.detach().to(torch.float64)
        value = mean.detach().to(torch.float64) * count
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0.0) + count

    def reduce(self, keys: list[str], device: torch.device, ddp: bool) -> dict[str, float]:
        """Means over every rank; ``keys`` is fixed so that every rank all-reduces the same
        vector, whatever its batches held."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        packed = torch.stack([torch.stack([torch.as_tensor(self.sums.get(k, zero)),
                                           torch.as_tensor(self.counts.get(k, zero))])
                              for k in keys]).to(device)  # (K, 2)
        if ddp:
            dist.all_reduce(packed)
        return {k: s / n for k, (s, n) in zip(keys, packed.tolist(), strict=True) if n}
