"""Pre-flight check of a CUDA machine before the first long HiFi-TSE job.

    python bench/gpu_check.py                   # on the CUDA machine: about 3 min on one GPU
    python bench/gpu_check.py --cpu             # the CPU variant (tests/test_gpu_check.py)
    python bench/gpu_check.py --log-dir DIR     # keep every child's output and train.log

Run it once on a new GPU machine (or after a driver, CUDA or PyTorch upgrade) before starting
``train.py`` on the real data. It needs nothing but this repository: no download, no
``../shared/data``; the training corpus is synthesised (``data/demo_corpus.py``) and packed
(``data/prepare_manifest.py``) into a temporary folder, once, for (c) and (d).

(a) The recipe generator (configs/hifi_tse.yaml), batch 2 x 4 s of random 48 kHz input, bf16
    autocast, gradient checkpointing on: median forward+backward time over a few runs after a
    warm-up (``torch.cuda.synchronize`` around each) and ``torch.cuda.max_memory_allocated``,
    which must stay within bench/bench_model.py's ``BUDGET_GIB`` (12 GiB: half a 24 GB GPU).
    AdamW states and an EMA copy are allocated too, so the peak is a training step's.
(b) The same without checkpointing: passes if it runs; out of memory is that row's failure.
(c) ``train.py`` for 20 micro-steps on the synthetic corpus in bf16 and in fp16, with the GAN
    phase (discriminator warm-up and adversarial ramp) and half of the items target-absent from
    step 0: exit status 0, every logged loss term finite, the GAN terms logged; steps/s.
(d) With two GPUs or more: the same under ``torchrun --nproc_per_node 2``, gradient accumulation
    2 and a time budget (its all-reduce runs at every update); the ranks' generator and
    discriminator weights must be identical at the end (train.py's ``ranks ... in_sync=1`` line,
    a fingerprint of every tensor all-reduced at each checkpoint). With one GPU it is skipped.
(e) ``inference.py --half`` on a 60 s synthetic mixture with a 4 s reference through a
    random-weight recipe generator: real-time factor = processing seconds / 60.
(f) train.py's ``micro_step`` (bf16, GAN phase, a target-absent item in the batch) under
    ``torch.cuda.set_sync_debug_mode("error")``: no op in it may make the host wait for the GPU.
    CUDA only (skipped in the CPU variant).

Output: a table (item, result, measured numbers), then one JSON line, always the last line, with
every item and ``"passed"``. On CUDA the table also goes to the ``gpu_check`` section of
doc/benchmarks.md (``--no-write`` leaves it alone). The exit status is 1 when an item failed.
Every child process has a timeout and the whole run a budget (9 min), so a hang costs its item,
not the report; an item that fails does not stop the others.

``--cpu`` runs the same items on the CPU, so that the test suite keeps this script working: the
tiny config instead of the recipe in (a), (b) and (e), 2 x 0.5 s in (a) and (b), no memory
threshold, 4 micro-steps of 0.1 s crops, fp32 (with the GAN phase) and bf16 (without it) in (c)
since fp16 needs CUDA in train.py, (d) with gloo on two CPU processes, a 5 s file in (e). The
discriminator is cut to one period and one scale, and the crops are short, because HiFi-GAN's
scale discriminator costs seconds per step on a CPU; the bf16 run leaves the GAN phase out
because bf16 convolutions on a CPU without native bf16 took over a minute per discriminator
step. 50-65 s on the 2-core AMD EPYC that runs the tests, up to 2.5 min while other jobs load
those cores (measured). Without CUDA and without ``--cpu`` it prints "no CUDA device: nothing to
check" and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from bench.bench_model import BUDGET_GIB  # noqa: E402
from bench.report import machine, markdown_table, print_json, write_section  # noqa: E402
from config import Config, LossConfig, load_config, model_kwargs  # noqa: E402
from data.demo_corpus import coloured_noise, random_voice, synthesize  # noqa: E402
from dsp.audio import SAMPLE_RATE  # noqa: E402
from losses.separation import si_sdr_loss  # noqa: E402
from models.registry import build_model, checkpoint_payload  # noqa: E402
from training.nets import build_nets  # noqa: E402
from training.step_log import StepLog, log_events  # noqa: E402

RECIPE_CONFIG = REPO / "configs" / "hifi_tse.yaml"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
GIB = 1024**3
FWD_BATCH = 2  # the recipe's train.batch_size
BATCH_SIZE = 2  # of the train.py runs
TA_PROB = 0.5  # target-absent share from step 0: all-TA micro-batches occur (1 in 4 at batch 2)
DDP_WORLD = 2
DDP_ACCUM = 2
DDP_MAX_MINUTES = 10.0  # far beyond the run: the budget all-reduce runs, never ends it
CORPUS_ARGS = ["--n-train", "6", "--n-val", "2", "--n-test", "2", "--utts-per-speaker", "3"]
VAL_FRACTION = 0.25  # 2 of the corpus's 8 training speakers validate (they sort last)
REF_SECONDS = 4.0
SYNC_SECONDS = 1.0  # input length of (f)
SYNTH_SECONDS = 10  # synthesised speech repeated to the inference file's length
MIX_SNR_DB = 10.0
MIX_PEAK = 0.5
MIN_TIMEOUT_S = 10.0  # below this the item is not started at all
# Per-child limits; the run's budget (Variant.budget_s) caps them further.
TIMEOUT_S = {"fwd_bwd": 180, "corpus": 240, "pack": 180, "train": 240, "ddp": 300,
             "inference": 180}
GAN_KEYS = ("disc", "adv")  # the discriminator loss, then the generator's adversarial term
# The loss terms of a train.log step line (doc/log_format.md): the total, the named weights and
# the GAN terms. Not grad_norm: a skipped fp16 update's is inf, which the GradScaler handles.
LOSS_KEYS = frozenset({"loss", "feat_match", *GAN_KEYS, *(f.name for f in fields(LossConfig))})
TABLE_LEAVES_OUT = ("times_s", "gpu", "gpu_gib")  # in the JSON line; the GPU is in the header
RTF_LINE = re.compile(r": ([\d.]+) s in ([\d.]+) s, RTF ([\d.]+)")
RANK_PREFIX = re.compile(r"^\[(default)?rank\d+\]:")
ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b|^error:")


@dataclass(frozen=True)
class Variant:
    """Everything that differs between the CUDA check and its CPU stand-in."""

    name: str  # "cuda" | "cpu"
    model_config: Path  # the generator of (a), (b), (e)
    fwd_seconds: float  # input length of (a), (b)
    fwd_warmup: int
    fwd_runs: int
    mem_budget_gib: float | None  # (a)'s threshold on max_memory_allocated
    train_runs: tuple[tuple[str, bool], ...]  # (c): (precision, GAN phase on)
    ddp_precision: str
    steps: int  # micro-steps of every train.py run
    segment_seconds: float  # training crops and references
    gan: dict[str, Any]  # gan section overrides besides the schedule
    data_workers: int
    n_val_samples: int
    inference_seconds: int
    budget_s: float  # the whole run; children get what is left of it at most


CUDA = Variant(
    name="cuda", model_config=RECIPE_CONFIG, fwd_seconds=4.0, fwd_warmup=2, fwd_runs=5,
    mem_budget_gib=BUDGET_GIB, train_runs=(("bf16", True), ("fp16", True)), ddp_precision="bf16",
    steps=20, segment_seconds=2.0, gan={}, data_workers=2, n_val_samples=8,
    inference_seconds=60, budget_s=540.0,
)
CPU = Variant(
    name="cpu", model_config=TINY_CONFIG, fwd_seconds=0.5, fwd_warmup=1, fwd_runs=2,
    mem_budget_gib=None, train_runs=(("fp32", True), ("bf16", False)), ddp_precision="fp32",
    steps=4, segment_seconds=0.1, gan={"periods": [2], "n_scales": 1}, data_workers=0,
    n_val_samples=4, inference_seconds=5, budget_s=600.0,
)


@dataclass
class Item:
    """One row of the report. ``passed`` None: skipped (neither pass nor fail)."""

    key: str
    label: str
    passed: bool | None = False
    numbers: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    @property
    def result(self) -> str:
        return {True: "pass", False: "FAIL", None: "skipped"}[self.passed]


class Clock:
    """The run's budget: every child's timeout is the smaller of its own and what is left."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.perf_counter() + budget_s

    def limit(self, timeout_s: float) -> float | None:
        left = self.deadline - time.perf_counter()
        return min(timeout_s, left) if left >= MIN_TIMEOUT_S else None


@dataclass
class Proc:
    rc: int | None  # None: killed at its timeout (or never started: no time left)
    out: str
    err: str
    seconds: float
    limit: float | None

    def failure(self) -> str:
        """One line saying why the child failed."""
        if self.limit is None:
            return "not started: the run's time budget is used up"
        if self.rc is None:
            return f"timed out after {self.limit:.0f} s"
        # torchrun prefixes its workers' lines with "[rankN]:" and ends with its own
        # ChildFailedError, which names no cause: the workers' exception is the message.
        lines = [RANK_PREFIX.sub("", ln).strip() for ln in self.err.splitlines()]
        lines = [ln for ln in lines if ln]
        errors = [ln for ln in lines if ERROR_LINE.search(ln)]
        causes = [ln for ln in errors if "ChildFailedError" not in ln]
        last = (causes or errors or lines or ["(no output)"])[-1]
        return f"exit {self.rc}: {last[:200]}"


def run_proc(cmd: list[str], *, name: str, clock: Clock, timeout_s: float, log_dir: Path,
             env: dict[str, str] | None = None) -> Proc:
    """Run ``cmd`` in the repository with a timeout; its output goes to ``log_dir/name.log``."""
    limit = clock.limit(timeout_s)
    if limit is None:
        return Proc(None, "", "", 0.0, None)
    start = time.perf_counter()
    # A session of its own, so that a timeout kills torchrun's workers and DataLoader workers
    # too: an orphan would keep holding the GPU for the items after it.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    seconds = time.perf_counter() - start
    (log_dir / f"{name}.log").write_text(
        f"$ {shlex.join(cmd)}\n# exit {rc} after {seconds:.1f} s\n"
        f"# ---- stdout\n{out}\n# ---- stderr\n{err}"
    )
    return Proc(rc, out, err, seconds, limit)


def child_env(threads: int, variant: Variant, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), **extra}
    if variant.name == "cpu":
        # Spinning OpenMP threads stall on shared cores (see bench/bench_inference.py).
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def threads_per_process(n_processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // n_processes)


# ---------------------------------------------------------------------------------------------
# (a), (b): the recipe generator's forward+backward, in a child process of its own
# ---------------------------------------------------------------------------------------------


def build_generator(cfg: Config, *, grad_checkpoint: bool) -> tuple[nn.Module, dict[str, Any]]:
    """``cfg``'s generator with gradient checkpointing on or off (``train.grad_checkpoint``),
    and the keyword arguments it was built with (what a checkpoint's ``model_args`` holds)."""
    kwargs = model_kwargs(cfg)
    model = build_model(kwargs)
    model.grad_checkpoint = grad_checkpoint
    return model, kwargs


def run_child(args: list[str], item: Item, variant: Variant, clock: Clock,
              log_dir: Path) -> dict[str, Any] | None:
    """This script with ``args`` in a child process; its last output line as JSON, or None
    with the failure in ``item.message``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = run_proc(cmd, name=item.key, clock=clock, timeout_s=TIMEOUT_S["fwd_bwd"],
                    log_dir=log_dir, env=child_env(threads_per_process(1), variant))
    lines = proc.out.strip().splitlines()
    if proc.rc != 0 or not lines:
        item.message = proc.failure()
        return None
    return json.loads(lines[-1])


def fwd_bwd_child(variant: Variant, grad_checkpoint: bool) -> dict[str, Any]:
    """Forward+backward timings and peak memory of one configuration, as a JSON-able dict."""
    device = torch.device("cuda" if variant.name == "cuda" else "cpu")
    cuda = device.type == "cuda"
    cfg = load_config(variant.model_config)
    torch.manual_seed(0)
    model, _ = build_generator(cfg, grad_checkpoint=grad_checkpoint)
    model = model.to(device).train()
    result: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()),
                              "grad_checkpoint": bool(getattr(model, "grad_checkpoint", None))}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        result.update(gpu=props.name, gpu_gib=round(props.total_memory / GIB, 1))
    n = round(variant.fwd_seconds * cfg.stft.sample_rate)
    mix, ref, target = (0.1 * torch.randn(FWD_BATCH, n, device=device) for _ in range(3))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        # A training step's memory: AdamW's two states and the EMA copy beside the model.
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> float:
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                est = model(mix, ref)
            si_sdr_loss(est.float(), target).backward()
            sync()
            took = time.perf_counter() - start
            opt.step()
            opt.zero_grad(set_to_none=True)
            return took

        for _ in range(variant.fwd_warmup):  # allocation, cuDNN's algorithm search
            step()
        times = [step() for _ in range(variant.fwd_runs)]
        del ema
    except torch.cuda.OutOfMemoryError:
        result.update(ok=False, message="OOM")
    else:
        result.update(ok=True, fwd_bwd_s=statistics.median(times),
                      times_s=[round(t, 4) for t in times])
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return result


def fwd_bwd_item(variant: Variant, grad_checkpoint: bool, clock: Clock, log_dir: Path) -> Item:
    model = "recipe" if variant.name == "cuda" else "tiny"
    seconds = f"{FWD_BATCH} x {variant.fwd_seconds:g} s"
    if grad_checkpoint:
        item = Item("a_checkpointing", f"(a) {model} fwd+bwd {seconds}, bf16, checkpointing")
    else:
        item = Item("b_no_checkpointing", f"(b) {model} fwd+bwd {seconds}, bf16, no checkpointing")
    child = run_child(["--child-fwd-bwd", "on" if grad_checkpoint else "off",
                       *(["--cpu"] if variant.name == "cpu" else [])], item, variant, clock,
                      log_dir)
    if child is None:
        return item
    item.numbers = {k: round(v, 4) if isinstance(v, float) else v for k, v in child.items()
                    if k not in ("ok", "message")}
    if not child["ok"]:
        item.message = child["message"]
        return item
    budget = variant.mem_budget_gib if grad_checkpoint else None
    if budget is not None:
        item.numbers["budget_gib"] = budget
    if budget is not None and child["peak_gib"] > budget:
        item.message = f"peak {child['peak_gib']:.2f} GiB > {budget:g} GiB"
        return item
    item.passed = True
    return item


# ---------------------------------------------------------------------------------------------
# (f): no host-device synchronisation inside train.py's micro-step
# ---------------------------------------------------------------------------------------------


def sync_child() -> dict[str, Any]:
    """train.py's ``micro_step`` (tiny model, GAN phase with its generator terms, one TA item in
    the batch) under ``torch.cuda.set_sync_debug_mode("error")``: any op that makes the host
    wait for the GPU (``.item()``, boolean indexing, ``tp.any()``) raises, naming itself."""
    device = torch.device("cuda")
    cfg = load_config(TINY_CONFIG, ["optim.grad_accum=2", "gan.enabled=true",
                                    "gan.start_step=0", "gan.d_warmup_steps=0",
                                    "gan.periods=[2, 3]", "gan.n_scales=2"])
    torch.manual_seed(0)
    nets = build_nets(cfg, device)
    n = round(SYNC_SECONDS * cfg.stft.sample_rate)
    mix, ref, target = (0.1 * torch.randn(FWD_BATCH, n, device=device) for _ in range(3))
    is_ta = torch.arange(FWD_BATCH, device=device) == 0
    batch = {"mix": mix, "ref": ref, "target": torch.where(is_ta[:, None], 0.0, target),
             "is_ta": is_ta}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    step_log = StepLog()
    # A first micro-step outside the check: lazy initialisation (cuDNN handles, allocator).
    train.micro_step(nets, cfg, batch, step=0, autocast=autocast, step_log=step_log)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        # step 1 is the last micro-step of its update, so the same code as on every update
        train.micro_step(nets, cfg, batch, step=1, autocast=autocast, step_log=step_log)
    except RuntimeError as err:
        return {"ok": False, "message": str(err).splitlines()[0][:200]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"ok": True, "micro_steps_checked": 1}


def sync_item(variant: Variant, clock: Clock, log_dir: Path) -> Item:
    item = Item("f_no_sync", "(f) train.py micro_step without host-device sync (bf16, GAN)")
    if variant.name == "cpu":
        item.passed, item.message = None, "skipped (CUDA only)"
        return item
    child = run_child(["--child-sync"], item, variant, clock, log_dir)
    if child is None:
        return item
    item.passed, item.message = child["ok"], child.get("message", "")
    return item


# ---------------------------------------------------------------------------------------------
# The synthetic corpus, packed once for (c) and (d)
# ---------------------------------------------------------------------------------------------


def write_train_config(variant: Variant, work: Path) -> Path:
    """tiny.yaml (its model, and wherever it keeps the checkpointing switch) + the corpus in
    ``work`` + what every run shares: phase 2 and the GAN phase from step 0."""
    corpus = work / "corpus"
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg["data"] = {
        "speech_sources": [{"layout": "generic", "root": str(corpus / "speech"), "name": "demo"}],
        "noise_dirs": [str(corpus / "noise")],
        "rir_dirs": [str(corpus / "rir")],
        "manifest_dir": str(work / "manifests"),
        "hdf5_dir": str(work / "hdf5"),
        "pack_workers": min(4, threads_per_process(1)),
        "val_fraction": VAL_FRACTION,
        "segment_seconds": variant.segment_seconds,
        "ref_seconds": variant.segment_seconds,
        "min_interferers": 1,
        "max_interferers": 1,
        "n_val_samples": variant.n_val_samples,
        "num_workers": variant.data_workers,
        "ta_prob": TA_PROB,
    }
    cfg.setdefault("optim", {}).update(warmup_steps=2)
    cfg.setdefault("train", {}).update(
        batch_size=BATCH_SIZE, phase2_step=0, noisy_ref_ramp=[0, 1], early_stop_patience=0,
        keep_checkpoints=1, deterministic=False, progress_bar=False,
        device="auto" if variant.name == "cuda" else "cpu",
    )
    # The discriminator trains alone for a quarter of the run, then the adversarial weight
    # ramps in over another quarter: both branches of the GAN step run.
    schedule = max(1, variant.steps // 4)
    cfg["gan"] = {"enabled": True, "start_step": 0, "d_warmup_steps": schedule,
                  "ramp_steps": schedule, **variant.gan}
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def prepare_item(variant: Variant, work: Path, clock: Clock, log_dir: Path) -> Item:
    item = Item("corpus", "synthetic corpus + packing (for c, d)")
    env = child_env(1, variant)  # beside (a) and (b), which have the cores
    config = write_train_config(variant, work)
    steps = [
        ("corpus", [sys.executable, "-m", "data.demo_corpus", "--out", str(work / "corpus"),
                    *CORPUS_ARGS]),
        ("pack", [sys.executable, "-m", "data.prepare_manifest", "--config", str(config),
                  "--no-progress"]),
    ]
    for name, cmd in steps:
        proc = run_proc(cmd, name=name, clock=clock, timeout_s=TIMEOUT_S[name], log_dir=log_dir,
                        env=env)
        item.numbers[f"{name}_s"] = round(proc.seconds, 1)
        if proc.rc != 0:
            item.message = f"{name}: {proc.failure()}"
            return item
    item.passed = True
    return item


# ---------------------------------------------------------------------------------------------
# (c), (d): the real train.py
# ---------------------------------------------------------------------------------------------


def nonfinite_terms(rows: list[dict[str, str]]) -> list[str]:
    """``step=N key=value`` for every loss term that is not a finite number (or is missing:
    the total is on every line)."""
    bad = []
    for row in rows:
        if "loss" not in row:
            bad.append(f"step={row.get('step')} loss missing")
        for key, value in row.items():
            if key not in LOSS_KEYS:
                continue
            try:
                finite = math.isfinite(float(value))
            except ValueError:
                finite = False
            if not finite:
                bad.append(f"step={row.get('step')} {key}={value}")
    return bad


def train_item(variant: Variant, work: Path, clock: Clock, log_dir: Path, *, precision: str,
               gan: bool, ddp: bool) -> Item:
    steps = variant.steps
    accum = DDP_ACCUM if ddp else 1
    if ddp:
        key = f"d_ddp_{precision}"
        label = (f"(d) torchrun x{DDP_WORLD} train.py, {precision}, accum {accum}, GAN, "
                 f"{steps} micro-steps")
    else:
        key = f"c_train_{precision}"
        label = f"(c) train.py {precision}, {'GAN' if gan else 'no GAN'}, {steps} micro-steps"
    item = Item(key, label)
    run_dir = work / key
    sets = {
        "train.run_dir": str(run_dir),
        "train.precision": precision,
        "train.total_steps": steps,
        "train.log_every": accum,  # every update logged: every loss is checked
        "train.val_every": steps,
        "train.ckpt_every": steps,
        "optim.grad_accum": accum,
        "gan.enabled": gan,
    }
    if ddp:
        sets["train.max_minutes"] = DDP_MAX_MINUTES
    train_args = ["train.py", "--config", str(work / "train.yaml")]
    for name, value in sets.items():
        train_args += ["--set", f"{name}={json.dumps(value)}"]  # JSON is YAML: true, 1e-3, "x"
    if ddp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(DDP_WORLD), *train_args]
    else:
        cmd = [sys.executable, *train_args]
    n_proc = DDP_WORLD if ddp else 1
    proc = run_proc(cmd, name=key, clock=clock, timeout_s=TIMEOUT_S["ddp" if ddp else "train"],
                    log_dir=log_dir, env=child_env(threads_per_process(n_proc), variant))
    item.numbers["wall_s"] = round(proc.seconds, 1)
    log = run_dir / "train.log"
    rows = log_events(log) if log.is_file() else []
    if log.is_file():
        shutil.copyfile(log, log_dir / f"{key}.train.log")
    times = [float(r["step_time"]) for r in rows if "step_time" in r]
    if times:
        # The first interval pays for cuDNN's algorithm search and the data workers' start.
        timed = times[1:] or times
        item.numbers["steps_per_s"] = round(1 / statistics.mean(timed), 2)
    if rows:
        item.numbers["nonfinite_updates"] = int(rows[-1].get("nonfinite", 0))
        item.numbers["last_loss"] = rows[-1].get("loss")
    vals = log_events(log, "val") if log.is_file() else []
    if vals:
        item.numbers["val_n_ta"] = vals[-1].get("n_ta")

    if proc.rc != 0:
        item.message = proc.failure()
        return item
    expected = steps // accum
    if len(rows) != expected:
        item.message = f"{len(rows)} step lines in train.log, expected {expected}"
        return item
    bad = nonfinite_terms(rows)
    if bad:
        item.message = f"{len(bad)} non-finite loss values, first {bad[0]}"
        return item
    if gan and not all(any(k in r for r in rows) for k in GAN_KEYS):
        item.message = f"no {'/'.join(GAN_KEYS)} terms logged: the GAN phase did not run"
        return item
    if ddp:
        if f"world={DDP_WORLD}" not in log.read_text():
            item.message = f"train.log does not say world={DDP_WORLD}"
            return item
        # train.py's own check at every periodic checkpoint: a fingerprint (sum and sum of
        # squares of every generator and discriminator tensor) compared across the ranks.
        checks = log_events(log, "ranks")
        if not checks:
            item.message = "train.py logged no `ranks ... in_sync=` line"
            return item
        if any(r.get("in_sync") != "1" for r in checks):
            item.message = "train.py logged ranks out of sync (in_sync=0)"
            return item
        item.numbers["ranks_identical"] = True
    item.passed = True
    return item


# ---------------------------------------------------------------------------------------------
# (e): inference.py --half on a long file
# ---------------------------------------------------------------------------------------------


def speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Utterances of one synthetic voice (data/demo_corpus.py) back to back."""
    voice = random_voice(rng)
    n = round(seconds * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    while sum(p.shape[0] for p in parts) < n:
        parts.append(synthesize(rng, voice, int(rng.integers(10, 22))))
    return np.concatenate(parts)[:n]


def write_inference_inputs(work: Path, seconds: int) -> tuple[Path, Path]:
    """A ``seconds`` long mixture (two synthetic voices + coloured noise, a 10 s stretch repeated:
    the model's cost does not depend on the content) and a 4 s reference of the first voice."""
    rng = np.random.default_rng(0)
    target = speech(rng, SYNTH_SECONDS + REF_SECONDS)
    target, ref = target[: SYNTH_SECONDS * SAMPLE_RATE], target[SYNTH_SECONDS * SAMPLE_RATE :]
    interferer = speech(rng, SYNTH_SECONDS)
    noise = coloured_noise(rng, target.shape[0])
    noise *= np.sqrt(np.mean(target**2) / np.mean(noise**2)) * 10 ** (-MIX_SNR_DB / 20)
    mix = np.resize(target + 0.7 * interferer + noise, seconds * SAMPLE_RATE)
    if not np.sqrt(np.mean(ref**2)) > 0:
        raise ValueError("the synthesised reference is silent")
    paths = (work / "mix.wav", work / "ref.wav")
    for path, wave in zip(paths, (mix, ref), strict=True):
        wave = MIX_PEAK * wave / np.abs(wave).max()
        sf.write(path, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return paths


def inference_item(variant: Variant, work: Path, clock: Clock, log_dir: Path) -> Item:
    model_name = "recipe" if variant.name == "cuda" else "tiny"
    item = Item("e_inference", f"(e) inference.py --half, {model_name}, "
                f"{variant.inference_seconds} s file")
    cfg = load_config(variant.model_config)
    torch.manual_seed(0)
    model, kwargs = build_generator(cfg, grad_checkpoint=False)
    ckpt = work / "inference.pt"
    torch.save(checkpoint_payload(model, kwargs) | {"ema": None}, ckpt)
    mix, ref = write_inference_inputs(work, variant.inference_seconds)
    out = work / "extracted.wav"
    cmd = [sys.executable, "inference.py", "--ckpt", str(ckpt), "--mix", str(mix), "--ref",
           str(ref), "-o", str(out), "--half"]
    threads = threads_per_process(1)
    if variant.name == "cpu":
        cmd += ["--device", "cpu", "--threads", str(threads)]
    proc = run_proc(cmd, name=item.key, clock=clock, timeout_s=TIMEOUT_S["inference"],
                    log_dir=log_dir, env=child_env(threads, variant))
    item.numbers["wall_s"] = round(proc.seconds, 1)
    if proc.rc != 0:
        item.message = proc.failure()
        return item
    match = RTF_LINE.search(proc.out)
    if match is None:
        item.message = "no 'RTF' line in inference.py's output"
        return item
    duration, processing, rtf = map(float, match.groups())
    item.numbers.update(audio_s=duration, processing_s=processing, rtf=rtf)
    est, sr = sf.read(out, dtype="float32")
    if sr != SAMPLE_RATE or est.shape[0] != sf.info(mix).frames:
        item.message = f"output is {est.shape[0]} samples at {sr} Hz, not the mixture's length"
        return item
    if not np.isfinite(est).all():
        item.message = "non-finite samples in the output"
        return item
    item.passed = True
    return item


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def guarded(item_key: str, label: str, fn: Callable[[], Item]) -> Item:
    """An exception in this script's own code fails its item, not the run."""
    try:
        return fn()
    except Exception as err:
        return Item(item_key, label, message=f"{type(err).__name__}: {err}"[:300])


def run_checks(variant: Variant, work: Path, log_dir: Path) -> list[Item]:
    clock = Clock(variant.budget_s)
    done: list[Item] = []

    def record(item: Item) -> None:
        done.append(item)
        detail = f" ({item.message})" if item.message else ""
        print(f"gpu_check: {item.label}: {item.result}{detail}", flush=True)

    # The corpus is CPU work: it is built while (a) and (b) hold the accelerator.
    with ThreadPoolExecutor(max_workers=1) as pool:
        prep = pool.submit(guarded, "corpus", "synthetic corpus + packing",
                           lambda: prepare_item(variant, work, clock, log_dir))
        for key, ckpt in (("a_checkpointing", True), ("b_no_checkpointing", False)):
            record(guarded(key, f"({key[0]}) fwd+bwd",
                           lambda ckpt=ckpt: fwd_bwd_item(variant, ckpt, clock, log_dir)))
        corpus = prep.result()
    record(corpus)

    train_runs: list[tuple[str, bool, bool]] = [(p, gan, False) for p, gan in variant.train_runs]
    train_runs.append((variant.ddp_precision, True, True))
    for precision, gan, ddp in train_runs:
        key = f"{'d_ddp' if ddp else 'c_train'}_{precision}"
        label = f"({'d' if ddp else 'c'}) train.py {precision}"
        if ddp and variant.name == "cuda" and torch.cuda.device_count() < DDP_WORLD:
            record(Item(key, f"(d) torchrun x{DDP_WORLD} train.py", None,
                        message=f"skipped ({torch.cuda.device_count()} GPU)"))
        elif not corpus.passed:
            record(Item(key, label, message="no corpus"))
        else:
            record(guarded(key, label, lambda p=precision, g=gan, d=ddp: train_item(
                variant, work, clock, log_dir, precision=p, gan=g, ddp=d)))
    record(guarded("e_inference", "(e) inference.py --half",
                   lambda: inference_item(variant, work, clock, log_dir)))
    record(guarded("f_no_sync", "(f) micro_step without sync",
                   lambda: sync_item(variant, clock, log_dir)))
    return done


def measured(item: Item) -> str:
    parts = [f"{k}={v}" for k, v in item.numbers.items() if k not in TABLE_LEAVES_OUT]
    if item.message:
        parts.insert(0, item.message)
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU variant (tests)")
    parser.add_argument("--log-dir", type=Path, help="keep every child's output here")
    parser.add_argument("--no-write", action="store_true", help="do not touch doc/benchmarks.md")
    parser.add_argument("--child-fwd-bwd", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--child-sync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variant = CPU if args.cpu else CUDA
    if args.child_fwd_bwd:
        print(json.dumps(fwd_bwd_child(variant, args.child_fwd_bwd == "on")))
        return 0
    if args.child_sync:
        print(json.dumps(sync_child()))
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        print_json({"bench": "gpu_check", "cuda": False, "variant": "cuda", "items": {},
                    "passed": False})
        return 0

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        log_dir = args.log_dir or work / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        items = run_checks(variant, work, log_dir)
    seconds = time.perf_counter() - start
    passed = all(item.passed is not False for item in items)

    device = "CPU" if variant.name == "cpu" else (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    table = markdown_table(["item", "result", "measured"],
                           [[item.label, item.result, measured(item)] for item in items])
    print(table)
    print(f"{device}; {machine()}; {seconds:.0f} s; {'passed' if passed else 'FAILED'}")
    if variant.name == "cuda" and not args.no_write:
        write_section(
            "gpu_check",
            f"## GPU pre-flight check (`bench/gpu_check.py`)\n\n"
            f"{device}; {machine()}; {seconds:.0f} s in all.\n\n{table}\n\n"
            "(a)/(b): median of "
            f"{variant.fwd_runs} forward+backward passes after {variant.fwd_warmup} warm-up "
            "ones, bf16 autocast, random input; peak is `torch.cuda.max_memory_allocated` with "
            "AdamW states and an EMA copy allocated. (c)/(d): the real `train.py` on a small "
            f"synthetic corpus, tiny model, {variant.segment_seconds:g} s crops, batch "
            f"{BATCH_SIZE}, half the items target-absent, GAN phase from step 0; steps/s from "
            "train.log's `step_time` without the first interval. (e): `inference.py --half`, "
            "random-weight recipe generator, RTF = processing time / audio duration.",
        )
    print_json({
        "bench": "gpu_check",
        "cuda": variant.name == "cuda",
        "variant": variant.name,
        "device": device,
        "seconds": round(seconds, 1),
        "items": {item.key: {"label": item.label, "result": item.result,
                             "message": item.message, **item.numbers} for item in items},
        "passed": passed,
    })
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
