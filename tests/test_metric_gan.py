"""gan.kind metric: the metric discriminator, its PESQ targets (against the pesq package), PESQ
failures dropped by weight, real train.py steps, all-target-absent batches, the resume rule
between discriminator kinds, and DDP with an all-target-absent rank.

Run under torchrun (the DDP test does), this file is the worker of that check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pesq
import pytest
import soxr
import torch
import torch.distributed as dist

import train
from config import ConfigError, load_config
from dsp.audio import SAMPLE_RATE, load_audio
from losses.adversarial import metric_discriminator_loss, metric_generator_loss
from losses.pesq_target import PesqScorer, normalised_pesq
from models.discriminators.metric_gan import MIN_FRAMES, MetricDiscriminator
from tests.packed_data import packed_subset
from tests.test_train import log_lines, write_config
from training.distributed import ranks_in_sync
from training.nets import build_nets, wrap_ddp
from training.state import TrainState, rng_state
from training.step_log import StepLog

REPO = Path(__file__).resolve().parents[1]
RAVDESS = "speech/ravdess"
PESQ_RATE = 16_000
N_SAMPLES = 9_600  # 0.2 s: 21 STFT frames, enough for the discriminator's four halvings
METRIC = ("gan.enabled=true", "gan.kind=metric", "gan.pesq_workers=1")


@pytest.fixture(scope="module")
def utterance(shared_data: Path) -> np.ndarray:
    """A RAVDESS utterance at 48 kHz (about 3.5 s)."""
    return load_audio(sorted((shared_data / RAVDESS / "Actor_05").glob("*.flac"))[0])


@pytest.fixture(scope="module")
def scorer() -> Iterator[PesqScorer]:
    s = PesqScorer(sample_rate=SAMPLE_RATE, workers=1)
    yield s
    s.close()


def tiny_nets(*overrides: str) -> tuple:
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["optim.grad_accum=1", *overrides])
    torch.manual_seed(0)
    return cfg, build_nets(cfg, torch.device("cpu"))


def random_batch(is_ta: list[bool], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mix, ref, target = (0.1 * torch.randn(len(is_ta), N_SAMPLES, generator=gen)
                        for _ in range(3))
    ta = torch.tensor(is_ta)
    return {"mix": mix, "ref": ref, "target": torch.where(ta[:, None], 0.0, target),
            "is_ta": ta}


# ---------------------------------------------------------------------------------------------
# The discriminator and its targets
# ---------------------------------------------------------------------------------------------


def test_discriminator_predicts_one_value_in_the_unit_interval_per_item() -> None:
    torch.manual_seed(0)
    disc = MetricDiscriminator()
    assert disc.n_bins == 342  # 0 to 8 kHz in 23.4 Hz bins
    target, estimate = torch.randn(3, SAMPLE_RATE), torch.randn(3, SAMPLE_RATE)
    pred = disc(target, estimate)
    assert pred.shape == (3,)
    assert ((pred > 0) & (pred < 1)).all()
    # Bias-free convolutions + instance norm: a gain common to both inputs changes nothing.
    disc.eval()
    torch.testing.assert_close(disc(target, estimate), disc(100 * target, 100 * estimate),
                               rtol=1e-4, atol=1e-5)
    # The learnable sigmoid's slope is trained like any weight.
    pred.sum().backward()
    assert disc.head[-1].slope.grad is not None
    short = torch.randn(1, (MIN_FRAMES - 2) * 480)
    with pytest.raises(ValueError, match="at least 16"):
        disc(short, short)


def test_pesq_targets_of_clean_and_noisy_pairs(utterance: np.ndarray) -> None:
    noise = np.random.default_rng(0).standard_normal(utterance.shape).astype(np.float32)
    noisy = utterance + noise * (np.std(utterance) / np.std(noise) * 10 ** (-5 / 20))  # 5 dB
    clean_q = normalised_pesq(utterance, utterance, SAMPLE_RATE)
    noisy_q = normalised_pesq(noisy, utterance, SAMPLE_RATE)
    ref16 = soxr.resample(utterance, SAMPLE_RATE, PESQ_RATE)
    for q, estimate in ((clean_q, utterance), (noisy_q, noisy)):
        direct = pesq.pesq(PESQ_RATE, ref16, soxr.resample(estimate, SAMPLE_RATE, PESQ_RATE),
                           "wb")
        assert q == pytest.approx((direct - 1) / 3.5, abs=1e-6)
    assert clean_q == pytest.approx(1.0, abs=0.05)  # 4.64, the wide-band maximum
    assert noisy_q < clean_q - 0.3


def test_pesq_failures_are_nan_and_drop_out_by_weight(
    utterance: np.ndarray, scorer: PesqScorer
) -> None:
    silent = np.zeros_like(utterance)
    assert math.isnan(normalised_pesq(utterance, silent, SAMPLE_RATE))  # target absent
    blip = utterance[:2_400]  # 50 ms: too short for PESQ
    assert math.isnan(normalised_pesq(blip, blip, SAMPLE_RATE))
    broken = utterance.copy()
    broken[10] = np.nan
    assert math.isnan(normalised_pesq(broken, utterance, SAMPLE_RATE))

    target = torch.from_numpy(np.stack([utterance, silent]))  # (2, N)
    scores = scorer.submit(target, target).result()
    assert np.isfinite(scores[0])
    assert np.isnan(scores[1])

    # In the loss, the unscored item counts for nothing: not its NaN, not its gradient.
    pred_clean = torch.tensor([0.9, 0.8])
    pred_est = torch.tensor([0.6, 0.3], requires_grad=True)
    metric = torch.from_numpy(scores)
    ones = torch.ones(2)
    loss = metric_discriminator_loss(pred_clean, pred_est, metric, clean_weights=ones,
                                     estimate_weights=torch.tensor([1.0, 0.0]))
    loss.backward()
    expected = ((1 - pred_clean) ** 2).mean() + (scores[0] - 0.6) ** 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert pred_est.grad[1] == 0.0
    assert metric_generator_loss(pred_est.detach(), weights=ones).item() == pytest.approx(
        ((1 - pred_est.detach()) ** 2).mean().item())


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------


def test_config_names_a_bad_kind_or_worker_count() -> None:
    with pytest.raises(ConfigError, match=r"gan\.kind.*hifigan, metric"):
        load_config(REPO / "configs" / "tiny.yaml", ["gan.kind=metricgan"])
    with pytest.raises(ConfigError, match=r"gan\.pesq_workers"):
        load_config(REPO / "configs" / "tiny.yaml", ["gan.pesq_workers=0"])
    assert load_config(REPO / "configs" / "tiny.yaml").gan.kind == "hifigan"


@pytest.mark.slow
def test_all_target_absent_batch_runs_the_discriminator_with_zero_weights() -> None:
    cfg, nets = tiny_nets(*METRIC, "gan.start_step=0", "gan.d_warmup_steps=0")
    try:
        assert isinstance(nets.disc, MetricDiscriminator)
        step_log = StepLog()
        train.micro_step(nets, cfg, random_batch([True, True]), step=5,
                         autocast=contextlib.nullcontext(), step_log=step_log)
        grads = [p.grad for p in nets.disc.parameters()]
        assert all(g is not None for g in grads)  # forward and backward ran
        assert all(not g.any() for g in grads)  # with zero weight
        _, grad_norm, applied = train.update(nets, cfg, step=6)
        assert applied
        assert torch.isfinite(grad_norm)
        stats = step_log.reduce(["disc", "adv", "pesq", "loss", "ta_energy"],
                                torch.device("cpu"), ddp=False)
        assert set(stats) == {"loss", "ta_energy"}  # no TP item: no GAN term, no PESQ
        # A mixed batch trains the discriminator.
        train.micro_step(nets, cfg, random_batch([True, False], seed=1), step=6,
                         autocast=contextlib.nullcontext(), step_log=step_log)
        assert any(p.grad.any() for p in nets.disc.parameters())
    finally:
        nets.pesq.close()


def test_a_checkpoint_resumes_only_with_its_discriminator_kind() -> None:
    _, hifigan = tiny_nets("gan.enabled=true", "gan.periods=[2]", "gan.n_scales=1")
    payload = TrainState(hifigan).payload(model_args={}, config={},
                                                rngs=[rng_state()])
    assert payload["disc_kind"] == "hifigan"
    del payload["disc_kind"]  # as written before gan.kind existed
    _, metric = tiny_nets(*METRIC)
    with pytest.raises(ConfigError, match=r"gan\.kind.*hifigan discriminator.*--init"):
        TrainState(metric).load(payload, rank=0)
    TrainState(hifigan).load(payload, rank=0)
    _, plain = tiny_nets()  # no GAN in this run: the discriminator is ignored
    TrainState(plain).load(payload, rank=0)


@pytest.fixture(scope="module")
def data_section(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    d = packed_subset(tmp_path_factory, shared_data)
    return {"manifest_dir": d.manifest_dir, "segment_seconds": 1.0, "ref_seconds": 1.0,
            "n_val_samples": 4, "num_workers": 0, "val_fraction": d.val_fraction}


@pytest.mark.slow
def test_train_py_metric_gan_steps(tmp_path: Path, data_section: dict) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", data_section,
        train={"total_steps": 4, "ckpt_every": 2},
        gan={"enabled": True, "kind": "metric", "start_step": 0, "d_warmup_steps": 2,
             "ramp_steps": 2, "pesq_workers": 1},
    )
    train.main(["--config", str(cfg)])
    run = tmp_path / "run"
    rows = log_lines(run)
    assert [r["phase"] for r in rows] == ["3"] * 4
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "disc"))
    assert "adv" not in rows[1]  # discriminator-only warm-up
    assert "adv" in rows[-1]
    assert "feat_match" not in rows[-1]
    pesq_values = [float(r["pesq"]) for r in rows if "pesq" in r]
    assert pesq_values
    assert all(1.0 <= v <= 4.7 for v in pesq_values)
    early = torch.load(run / "step_000000002.pt", weights_only=True)
    late = torch.load(run / "step_000000004.pt", weights_only=True)
    assert late["disc_kind"] == "metric"
    for net in ("generator", "disc"):
        changed = [not torch.equal(early[net][k], late[net][k]) for k in early[net]
                   if early[net][k].is_floating_point()]
        assert sum(changed) > len(changed) // 2, net
    with pytest.raises(SystemExit, match=r"gan\.kind"):
        train.main(["--config", str(cfg), "--set", "gan.kind=hifigan", "--set",
                    "gan.periods=[2]", "--set", "gan.n_scales=1", "--set",
                    "train.total_steps=6"])


# ---------------------------------------------------------------------------------------------
# DDP: rank 0 sees only target-absent items
# ---------------------------------------------------------------------------------------------


def state_vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in module.state_dict().values()
                      if t.is_floating_point()])


def ddp_worker(out: Path) -> None:
    """Two updates of two micro-steps under gloo, the generator's metric term on from the
    second; rank 0 writes a JSON report to ``out``."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    cfg, nets = tiny_nets(*METRIC, "optim.grad_accum=2", "gan.start_step=0",
                          "gan.d_warmup_steps=1", "gan.ramp_steps=1")
    before = {"generator": state_vector(nets.generator), "disc": state_vector(nets.disc)}
    wrap_ddp(nets, torch.device("cpu"))
    for step in range(4):
        is_ta = [True, True] if rank == 0 else [False, True]
        batch = random_batch(is_ta, seed=10 * rank + step)
        train.micro_step(nets, cfg, batch, step=step, autocast=contextlib.nullcontext(),
                         step_log=StepLog())
        if (step + 1) % 2 == 0:
            train.update(nets, cfg, step + 1)
    nets.pesq.close()
    report = {"in_sync": ranks_in_sync(nets),
              "changed": {name: not torch.equal(before[name], state_vector(getattr(nets, name)))
                          for name in before}}
    if rank == 0:
        out.write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_an_all_target_absent_rank(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(Path(__file__)), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == {"in_sync": True, "changed": {"generator": True, "disc": True}}


if __name__ == "__main__":
    ddp_worker(Path(sys.argv[1]))
