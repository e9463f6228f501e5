"""Generator cost on CPU: parameters, forward and forward+backward time, activation memory saved
for backward with and without gradient checkpointing, the estimated training memory, and the two
TF-GridNet sequence layers (``model.sequence_layer`` lstm and mamba) side by side.

    python bench/bench_model.py [--config configs/hifi_tse.yaml] [--runs 3] [--threads 2]
    python bench/bench_model.py --config configs/tiny.yaml --seconds 0.5 --runs 1 --no-write

(the second: a smoke run in seconds).

Activation memory is the bytes of every distinct storage autograd saves for backward, counted
with ``torch.autograd.graph.saved_tensors_hooks``. With checkpointing, autograd keeps the tensors
saved outside the checkpointed blocks plus each block's input, and during backward recomputes
one block at a time, so the peak is those plus the largest single block's saved tensors.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section
from config import Config, load_config, model_kwargs
from models.hifi_tse.generator import Generator
from models.hifi_tse.tf_gridnet import SEQUENCE_LAYERS
from models.registry import build_model

SEGMENT_SECONDS = 4.0
GIB = 1024**3
BYTES_FP32 = 4
ADAMW_STATES = 2  # exp_avg and exp_avg_sq
BUDGET_GIB = 12.0  # the recipe must leave half of a 24 GB GPU free (issue 2)
# Measured by the author on this kind of machine (2 threads, batch 1 x 4 s at 48 kHz):
# ESPnet TFGridNetV2 blocks alone on the same 53-band x 401-frame grid (D 128, H 256, 6 blocks).
ESPNET_FWD_S, ESPNET_FWD_BWD_S = 5.0, 17.4


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Run ``fn`` and count the bytes of the distinct storages saved for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def activation_memory(model: Generator, mix: torch.Tensor, ref: torch.Tensor) -> dict[str, int]:
    """Saved-for-backward bytes without checkpointing, and the checkpointed peak estimate."""
    model.train()
    model.grad_checkpoint = False
    plain, _ = saved_bytes(lambda: model(mix, ref))

    model.grad_checkpoint = True
    outside, _ = saved_bytes(lambda: model(mix, ref))
    # One block's own saved tensors (re-injection included), as recomputed in backward.
    with torch.no_grad():
        z_ref = model.encoder(model.stft(ref))
        z = model.usef(model.encoder(model.stft(mix)), z_ref)
    block_inputs = z.nbytes * len(model.blocks)
    z = z.requires_grad_()
    block, _ = saved_bytes(lambda: model._block(0, z, z_ref))
    return {
        "plain": plain,
        "ckpt_outside": outside,
        "ckpt_block_inputs": block_inputs,
        "ckpt_one_block": block,
        "ckpt_peak": outside + block_inputs + block,
    }


def scan_working_set(cfg: Config, n_samples: int, batch: int) -> int:
    """Bytes of the three (B, L, E, N) float32 tensors one Mamba scan holds at once in its
    backward pass (models/layers/mamba.py); the same number of positions for both paths, B*T*K."""
    frames = n_samples // cfg.stft.hop_length + 1  # centred STFT
    positions = batch * frames * sum(n for *_, n in cfg.model.band_regions)
    inner = cfg.model.mamba_expand * cfg.model.feature_dim
    return 3 * positions * inner * cfg.model.mamba_d_state * BYTES_FP32


def median_time(fn: Callable[[], None], runs: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(
    model: Generator, mix: torch.Tensor, ref: torch.Tensor, *, ckpt: bool
) -> Callable[[], None]:
    def run() -> None:
        model.train()
        model.grad_checkpoint = ckpt
        model.zero_grad(set_to_none=True)
        model(mix, ref).pow(2).mean().backward()

    return run


def measure_sequence_layer(
    config: str, layer: str, n_samples: int, runs: int, threads: int
) -> dict[str, float]:
    """One sequence layer, the config otherwise unchanged: parameters, forward+backward time and
    saved activations at batch 1 (plain, and the checkpointed peak), for Mamba the transient
    working set of one scan, and the peak RSS of the process that measured all of it."""
    torch.set_num_threads(threads)
    cfg = load_config(config, [f"model.sequence_layer={layer}"])
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg))
    mix, ref = torch.randn(1, n_samples), torch.randn(1, n_samples)
    fwd_bwd = median_time(forward_backward(model, mix, ref, ckpt=False), runs)
    mem = activation_memory(model, mix, ref)
    scan = scan_working_set(cfg, n_samples, batch=1) if layer == "mamba" else 0
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "fwd_bwd_s": round(fwd_bwd, 3),
        "act_plain_gib": round(mem["plain"] / GIB, 3),
        "act_ckpt_peak_gib": round(mem["ckpt_peak"] / GIB, 3),
        "scan_working_set_gib": round(scan / GIB, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
    }


def compare_sequence_layers(
    config: str, n_samples: int, runs: int, threads: int
) -> dict[str, dict[str, float]]:
    """``measure_sequence_layer`` for each layer, each in a fresh process. In one process the
    allocator keeps the high-water mark of whatever ran before: after the main table's batch 2 x
    4 s LSTM pass (19.4 GiB saved) the Mamba pass at 4 s (~13 GiB) was OOM-killed at 24.3 GB
    RSS (2026-12-01), although each fits alone. Run before the main table, while this process
    is small."""
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for layer in SEQUENCE_LAYERS:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results[layer] = pool.submit(measure_sequence_layer, config, layer, n_samples, runs,
                                         threads).result()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/hifi_tse.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=SEGMENT_SECONDS, help="segment length")
    parser.add_argument("--no-write", action="store_true", help="do not touch doc/benchmarks.md")
    # Opt-in, at its own length (minutes at 4 s on 2 CPU cores: the Mamba variant runs the
    # PyTorch scan).
    parser.add_argument("--sequence-layers", type=float, metavar="SECONDS",
                        help="also compare model.sequence_layer lstm and mamba at batch 1 x "
                        "SECONDS (its own doc/benchmarks.md section)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    layers = None
    if args.sequence_layers:  # first: each in a fresh process while this one is small
        layers = compare_sequence_layers(
            args.config, round(args.sequence_layers * cfg.stft.sample_rate), args.runs,
            args.threads)
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    n_samples = round(args.seconds * cfg.stft.sample_rate)
    seg = f"{args.seconds:g} s"
    mix1, ref1 = torch.randn(1, n_samples), torch.randn(1, n_samples)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(mix1, ref1)

    fwd = median_time(forward, args.runs)
    fwd_bwd = median_time(forward_backward(model, mix1, ref1, ckpt=False), args.runs)
    fwd_bwd_ckpt = median_time(forward_backward(model, mix1, ref1, ckpt=True), args.runs)

    batch = cfg.train.batch_size
    mem = activation_memory(model, torch.randn(batch, n_samples), torch.randn(batch, n_samples))
    # Parameters, gradients, AdamW's two states and the EMA copy, all float32.
    states = n_params * BYTES_FP32 * (1 + 1 + ADAMW_STATES + 1)
    train_plain = (states + mem["plain"]) / GIB
    train_ckpt = (states + mem["ckpt_peak"]) / GIB

    # The ESPnet figures were measured at 4 s only.
    espnet = args.seconds == SEGMENT_SECONDS
    rows = [
        ["generator parameters", f"{n_params / 1e6:.2f} M"],
        [
            f"forward, batch 1 x {seg} (no grad)",
            f"{fwd:.2f} s" + (f" (ESPnet V2 blocks alone: {ESPNET_FWD_S} s)" if espnet else ""),
        ],
        [
            f"forward+backward, batch 1 x {seg}",
            f"{fwd_bwd:.2f} s"
            + (f" (ESPnet V2 blocks alone: {ESPNET_FWD_BWD_S} s)" if espnet else ""),
        ],
        ["forward+backward with checkpointing", f"{fwd_bwd_ckpt:.2f} s"],
        [
            f"activations saved, batch {batch} x {seg}, no checkpointing",
            f"{mem['plain'] / GIB:.2f} GiB",
        ],
        [
            f"activations peak, batch {batch} x {seg}, checkpointing",
            f"{mem['ckpt_peak'] / GIB:.2f} GiB "
            f"(outside blocks {mem['ckpt_outside'] / GIB:.2f} + block inputs "
            f"{mem['ckpt_block_inputs'] / GIB:.2f} + one block {mem['ckpt_one_block'] / GIB:.2f})",
        ],
        ["params + grads + AdamW + EMA", f"{states / GIB:.2f} GiB"],
        ["estimated training memory, no checkpointing", f"{train_plain:.2f} GiB"],
        [
            "estimated training memory, checkpointing",
            f"{train_ckpt:.2f} GiB (budget {BUDGET_GIB:g} GiB)",
        ],
    ]
    table = markdown_table(["generator (" + args.config + ")", "measured"], rows)
    print(table)

    if layers is not None:
        seq_seg = f"{args.sequence_layers:g} s"
        layer_rows = [
            [
                name,
                f"{r['params'] / 1e6:.2f} M",
                f"{r['fwd_bwd_s']:.2f}",
                f"{r['act_plain_gib']:.2f}",
                f"{r['act_ckpt_peak_gib']:.2f}",
                f"{r['scan_working_set_gib']:.2f}" if name == "mamba" else "-",
                f"{r['peak_rss_gib']:.2f}",
            ]
            for name, r in layers.items()
        ]
        layer_table = markdown_table(
            [
                "model.sequence_layer",
                "parameters",
                f"forward+backward, batch 1 x {seq_seg} (s)",
                "activations saved, no checkpointing (GiB)",
                "activations peak, checkpointing (GiB)",
                "one scan's backward working set (GiB)",
                "peak RSS of its process (GiB)",
            ],
            layer_rows,
        )
        print(layer_table)
    if not args.no_write:
        write_section(
            "bench_model",
            f"## Generator speed and memory (`bench/bench_model.py`)\n\n"
            f"{machine()}; fp32; median of {args.runs} runs after a warm-up.\n\n{table}\n\n"
            "Activation bytes count every distinct storage autograd saves (saved_tensors_hooks); "
            "they are CPU (oneDNN LSTM) numbers, a CUDA run saves cuDNN workspaces instead. "
            "The ESPnet figures were measured on the same kind of machine by the issue's author.",
        )
    if layers is not None and not args.no_write:
        write_section(
            "bench_model_sequence_layers",
            f"## Sequence layers: BiLSTM vs bidirectional Mamba (`bench/bench_model.py "
            f"--sequence-layers {args.sequence_layers:g}`)\n\n"
            f"{machine()}; fp32; the same config ({args.config}) with only "
            f"`model.sequence_layer` changed, batch 1 x {seq_seg}; Mamba on the PyTorch parallel "
            f"scan (models/layers/mamba.py; a CUDA machine with mamba_ssm would use the fused "
            f"kernel).\n\n{layer_table}\n\n"
            "The Mamba scan keeps only its (B, L, ED) inputs for backward and recomputes its "
            "(B, L, ED, N) states there: the working-set column is the transient memory of "
            "the one scan running in backward (three such float32 tensors), on top of the saved "
            "activations. "
            "Each layer is measured in a fresh process (the allocator keeps a process's "
            "high-water mark: measured after the main table's batch-2 pass, the Mamba variant at "
            "4 s was OOM-killed at 24.3 GB); the last column is that process's peak RSS over "
            "the timing and both memory passes.",
        )
    print_json(
        {
            "bench": "bench_model",
            "config": args.config,
            "params": n_params,
            "fwd_s": round(fwd, 3),
            "fwd_bwd_s": round(fwd_bwd, 3),
            "fwd_bwd_ckpt_s": round(fwd_bwd_ckpt, 3),
            "act_plain_gib": round(mem["plain"] / GIB, 3),
            "act_ckpt_peak_gib": round(mem["ckpt_peak"] / GIB, 3),
            "train_mem_plain_gib": round(train_plain, 3),
            "train_mem_ckpt_gib": round(train_ckpt, 3),
            "fits_budget": train_ckpt <= BUDGET_GIB,
            "sequence_layers": layers,
        }
    )


if __name__ == "__main__":
    main()
