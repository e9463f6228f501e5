"""train.py end to end on the tiny config and real recordings: learning, GAN phase, exact resume
after SIGKILL, non-finite skipping, config errors, and DDP gradient equivalence."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import train
from config import ConfigError, load_config, model_kwargs
from data.dataset import HiFiTSEDataset, dataset_kwargs
from losses.separation import si_sdr, ta_energy_loss
from models.registry import build_model, load_model
from tests.packed_data import packed_subset
from training.loss_assembly import loss_weights
from training.nets import autocast_dtype, build_nets, resolve_device
from training.schedules import StepSampler, sir_boost_db
from training.step_log import StepLog, log_events
from training.stopping import EXIT_NO_RESTART

REPO = Path(__file__).resolve().parents[1]
SEGMENT_SECONDS = 1.0  # short mixtures keep a CPU step well under a second


@pytest.fixture(scope="module")
def data_section(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    d = packed_subset(tmp_path_factory, shared_data)
    return {"manifest_dir": d.manifest_dir, "segment_seconds": SEGMENT_SECONDS,
            "ref_seconds": SEGMENT_SECONDS, "n_val_samples": 8, "num_workers": 0,
            "val_fraction": d.val_fraction}


def write_config(path: Path, data: dict, base: str = "tiny.yaml", **sections: dict) -> Path:
    """``base`` (a tiny config) + the packed data + the given overrides, as one YAML file."""
    cfg = yaml.safe_load((REPO / "configs" / base).read_text())
    cfg["data"] = dict(data)
    cfg.setdefault("optim", {}).update(lr=3e-3, warmup_steps=2, grad_accum=1)
    cfg["train"].update(run_dir=str(path.parent / "run"), log_every=1, val_every=1000,
                        ckpt_every=1000, deterministic=True)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def log_lines(run_dir: Path, first_word: str = "step") -> list[dict[str, str]]:
    """The key=value events of the run's train.log that start with ``first_word``."""
    return log_events(run_dir / "train.log", first_word)


@pytest.mark.slow
def test_a_few_steps_run_with_finite_falling_loss(tmp_path: Path, data_section: dict) -> None:
    cfg = write_config(tmp_path / "c.yaml", data_section,
                       train={"total_steps": 30, "val_every": 15, "ckpt_every": 15})
    train.main(["--config", str(cfg)])
    run = tmp_path / "run"
    losses = [float(r["loss"]) for r in log_lines(run)]
    assert len(losses) == 30
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    vals = log_lines(run, "val")
    assert len(vals) == 2
    assert all("si_sdri" in v and "ta_supp_db" in v for v in vals)
    assert (run / "last.pt").is_file()
    assert (run / "best.pt").is_file()
    assert "training finished" in (run / "train.log").read_text()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 30
    assert load_model(run / "last.pt") is not None  # rebuilds on its own


@pytest.mark.slow
def test_generator_overfits_one_batch(data_section: dict) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    for k, v in data_section.items():
        setattr(cfg.data, k, v)
    dataset = HiFiTSEDataset(**dataset_kwargs(cfg.data, "train"))
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mix, ref, target = batch["mix"], batch["ref"], batch["target"]
    start = si_sdr(model(mix, ref), target).mean().item()
    for _ in range(150):
        opt.zero_grad()
        loss = -si_sdr(model(mix, ref), target).mean()
        loss.backward()
        opt.step()
    end = si_sdr(model(mix, ref), target).mean().item()
    mix_sdr = si_sdr(mix, target).mean().item()
    assert end > 10.0, (start, end, mix_sdr)
    assert end > mix_sdr + 8.0


@pytest.mark.slow
def test_gan_phase_updates_both_networks(tmp_path: Path, data_section: dict) -> None:
    # HiFi-GAN's discriminators hold 70.7 M parameters: half-second clips keep this bearable.
    short = {**data_section, "segment_seconds": 0.5, "ref_seconds": 0.5}
    cfg = write_config(
        tmp_path / "c.yaml", short,
        train={"total_steps": 4, "ckpt_every": 2},
        gan={"enabled": True, "start_step": 0, "d_warmup_steps": 2, "ramp_steps": 2},
    )
    train.main(["--config", str(cfg)])
    run = tmp_path / "run"
    rows = log_lines(run)
    assert [r["phase"] for r in rows] == ["3"] * 4
    assert "disc" in rows[0]
    assert "adv" not in rows[1]  # discriminator-only warm-up
    assert "adv" in rows[-1]
    assert "feat_match" in rows[-1]
    early = torch.load(run / "step_000000002.pt", weights_only=True)
    late = torch.load(run / "step_000000004.pt", weights_only=True)
    for net in ("generator", "disc"):
        changed = [not torch.equal(early[net][k], late[net][k]) for k in early[net]
                   if early[net][k].is_floating_point()]
        assert sum(changed) > len(changed) // 2, net


def _run_train(cfg: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(cfg),
                             *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sir_curriculum_schedule_reaches_the_sampler() -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["train.sir_boost_db=6.0", "train.sir_boost_steps=100"])
    assert [sir_boost_db(cfg, s) for s in (0, 50, 100, 500)] == [6.0, 3.0, 0.0, 0.0]
    stream = iter(StepSampler(start_step=50, batch_size=2, cfg=cfg))
    assert [next(stream) for _ in range(3)] == [(100, 0.0, 0.0, 3.0, 0.0, 0.0),
                                               (101, 0.0, 0.0, 3.0, 0.0, 0.0),
                                               (102, 0.0, 0.0, pytest.approx(2.94), 0.0, 0.0)]
    # The selection curriculum flags the items of its first steps.
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.selection_steps=3"])
    stream = iter(StepSampler(start_step=2, batch_size=2, cfg=cfg))
    assert [next(stream)[4] for _ in range(4)] == [1.0, 1.0, 0.0, 0.0]
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.twin_steps=2"])
    stream = iter(StepSampler(start_step=1, batch_size=2, cfg=cfg))
    assert [next(stream)[4:] for _ in range(4)] == [(0.0, 1.0)] * 2 + [(0.0, 0.0)] * 2
    with pytest.raises(ConfigError, match="twin_steps"):
        train.check_config(load_config(REPO / "configs" / "tiny.yaml", [
            "train.twin_steps=5", "train.batch_size=3"]))
    off = load_config(REPO / "configs" / "tiny.yaml")
    assert sir_boost_db(off, 0) == 0.0
    with pytest.raises(ConfigError, match="sir_boost_steps"):
        train.check_config(load_config(REPO / "configs" / "tiny.yaml",
                                       ["train.sir_boost_steps=-1"]))


# The speaker-selection options (a frozen GE2E encoder, a speaker head and its loss, the
# selection curriculum, twins, virtual speakers) on top of a base config.
SELECTION_OPTIONS = {"model": {"speaker_embedding": "ge2e"}, "loss": {"speaker_ce": 0.5},
                     "train": {"selection_steps": 6, "twin_steps": 10},
                     "data": {"virtual_speakers": [0.85]}}


def assert_resume_is_exact(tmp_path: Path, data: dict, base: str, settings: dict,
                           *, kill_at: int) -> tuple[dict, dict]:
    """Train one config twice, in ``tmp_path/a`` straight through and in ``tmp_path/b`` killed
    (SIGKILL) once its ``step_{kill_at}`` checkpoint exists and rerun; assert the two final
    checkpoints hold the same weights, EMA and optimizer state, and return both (a, b).
    ``settings`` must set ``train.total_steps`` above ``kill_at`` and a ``ckpt_every`` that
    divides it."""
    total = settings["train"]["total_steps"]
    straight = write_config(tmp_path / "a" / "c.yaml", data, base, **settings)
    killed = write_config(tmp_path / "b" / "c.yaml", data, base, **settings)
    proc = _run_train(straight)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    proc = _run_train(killed)
    marker = tmp_path / "b" / "run" / f"step_{kill_at:09d}.pt"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run, without any chance to clean up
    proc.wait()
    assert marker.exists()
    ckpt = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] < total, "the kill must land before the run ends"
    proc = _run_train(killed)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == total
    for part in ("generator", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    state_a, state_b = a["opt_g"]["state"], b["opt_g"]["state"]
    for i in state_a:
        assert torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"])
    assert "resumed step=" in (tmp_path / "b" / "run" / "train.log").read_text()
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny.yaml", "td_speakerbeam_tiny.yaml",
                                  "spex_plus_tiny.yaml", "tiny.yaml+selection",
                                  "td_speakerbeam_tiny.yaml+selection"])
def test_resume_after_sigkill_is_exact(tmp_path: Path, data_section: dict, base: str) -> None:
    # The SIR curriculum is still running at the kill: the resumed stream must continue it.
    base, _, options = base.partition("+")
    extra = SELECTION_OPTIONS if options else {}
    settings = {**extra, "train": {"total_steps": 16, "ckpt_every": 4, "val_every": 8,
                                   "keep_checkpoints": 10, "sir_boost_db": 6.0,
                                   "sir_boost_steps": 12, **extra.get("train", {})}}
    data = {**data_section, **extra.get("data", {})}
    settings.pop("data", None)
    a, _ = assert_resume_is_exact(tmp_path, data, base, settings, kill_at=8)
    if options:  # the options were on: the head trained, on the virtual speakers' classes too
        assert "speaker_ce" in log_lines(tmp_path / "b" / "run")[-1]
        copies = 1 + len(SELECTION_OPTIONS["data"]["virtual_speakers"])
        assert a["model_args"]["n_speakers"] % copies == 0
        assert a["model_args"]["n_speakers"] >= 2 * copies


@pytest.mark.slow
def test_injected_nan_is_skipped(
    tmp_path: Path, data_section: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = HiFiTSEDataset.__getitem__
    poisoned = {6, 7}  # both items of micro-step 3

    def getitem(self: HiFiTSEDataset, item: tuple) -> dict:
        sample = original(self, item)
        if self.split == "train" and item[0] in poisoned:
            sample["mix"][100] = float("nan")
        return sample

    monkeypatch.setattr(HiFiTSEDataset, "__getitem__", getitem)
    cfg = write_config(tmp_path / "c.yaml", data_section,
                       train={"total_steps": 6, "ckpt_every": 6})
    train.main(["--config", str(cfg)])
    run = tmp_path / "run"
    text = (run / "train.log").read_text()
    assert re.search(r"nonfinite step=4 count=1 in_a_row=1", text), text
    assert "training finished step=6" in text
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values()
               if v.is_floating_point())
    assert ckpt["nonfinite_total"] == 1

    poisoned.update(range(100))  # every step: the run must stop with a clear message
    cfg = write_config(tmp_path / "d.yaml", data_section,
                       train={"total_steps": 20, "max_nonfinite": 3, "run_dir":
                              str(tmp_path / "run2")})
    with pytest.raises(SystemExit) as err:
        train.main(["--config", str(cfg)])
    assert err.value.code == EXIT_NO_RESTART  # do not restart
    assert "stopping step=3 reason=3_non-finite_updates_in_a_row" in (
        tmp_path / "run2" / "train.log"
    ).read_text()


def test_unknown_config_key_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as err:
        train.main(["--config", str(REPO / "configs" / "tiny.yaml"),
                    "--set", "train.totl_steps=10"])
    assert err.value.code == EXIT_NO_RESTART
    assert "train.totl_steps" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(SystemExit) as err:
        train.main(["--config", str(bad)])
    assert err.value.code == EXIT_NO_RESTART
    assert "optim.learning_rate" in capsys.readouterr().err


def _run_ddp_check(tmp_path: Path, mode: str, timeout: int = 600) -> dict:
    out = tmp_path / f"ddp_{mode}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(REPO / "tests" / "ddp_check.py"), str(out), mode]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_allreduces_once_per_update_and_matches_single_process(tmp_path: Path) -> None:
    report = _run_ddp_check(tmp_path, "grads")
    accum = report["accum"]
    assert accum == 4
    # Only the last micro-step of each of the two updates all-reduces, once per bucket.
    assert report["allreduce_micro_steps"] == [accum - 1, 2 * accum - 1], report
    per_update = report["allreduces_per_update"]
    assert per_update[0] == per_update[1] >= 1
    assert report["n_allreduces"] == sum(per_update)
    assert report["max_diff_between_ranks"] == 0.0
    assert report["max_diff_vs_single"] < 1e-5, report  # relative to the largest gradient


@pytest.mark.slow
def test_ddp_gan_phase_with_an_all_target_absent_rank(tmp_path: Path) -> None:
    # Rank 0 sees only target-absent batches, rank 1 mixed ones: a data-dependent skip of the
    # discriminator on one rank would hang here (the subprocess timeout) or split the weights.
    report = _run_ddp_check(tmp_path, "gan", timeout=900)
    assert report["max_diff_between_ranks"] == {"generator": 0.0, "disc": 0.0}, report
    assert report["in_sync"]
    assert report["changed"] == {"generator": True, "disc": True}


@pytest.mark.slow
def test_ddp_validation_with_a_rank_without_swap_pairs(tmp_path: Path) -> None:
    # Rank 1 holds one validation batch and no swap pair: validation's one all-reduce still
    # runs on both ranks (else gloo hangs), and the figures are those of one process on all.
    report = _run_ddp_check(tmp_path, "validate")
    shared, alone = report["shared"], report["alone"]
    assert set(shared) == set(alone)
    for key, value in alone.items():
        assert shared[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert 0.0 <= shared["select_acc"] <= 1.0


@pytest.mark.slow
def test_gan_phase_survives_all_target_absent_batches(tmp_path: Path, data_section: dict) -> None:
    short = {**data_section, "segment_seconds": 0.5, "ref_seconds": 0.5, "ta_prob": 1.0}
    cfg = write_config(
        tmp_path / "c.yaml", short,
        train={"total_steps": 4, "ckpt_every": 4, "batch_size": 1, "phase2_step": 0,
               "noisy_ref_ramp": [0, 0]},
        gan={"enabled": True, "start_step": 0, "d_warmup_steps": 1, "ramp_steps": 1,
             "periods": [2, 3], "n_scales": 2},
    )
    train.main(["--config", str(cfg)])
    run = tmp_path / "run"
    rows = log_lines(run)
    assert [r["phase"] for r in rows] == ["3"] * 4
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    assert all("ta_energy" in r for r in rows)
    assert "training finished step=4" in (run / "train.log").read_text()


def _tiny_nets(*overrides: str) -> tuple:
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["optim.grad_accum=1", *overrides])
    torch.manual_seed(0)
    return cfg, build_nets(cfg, torch.device("cpu"))


def _batch(is_ta: list[bool], n: int = 4_800, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mix, ref, target = (torch.randn(len(is_ta), n, generator=gen) for _ in range(3))
    ta = torch.tensor(is_ta)
    return {"mix": mix, "ref": ref, "target": torch.where(ta[:, None], 0.0, target),
            "is_ta": ta}


def test_update_with_a_gradient_free_discriminator_under_a_gradscaler() -> None:
    cfg, nets = _tiny_nets("gan.enabled=true", "gan.periods=[2]", "gan.n_scales=1")
    nets.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=4.0)
    # What GradScaler does with an optimizer that got no gradient (the old GAN branch skipped
    # the discriminator on all-TA batches): an assertion at step().
    bare = torch.amp.GradScaler("cpu", enabled=True)
    bare.scale(torch.ones(()))  # the generator's loss was scaled in this update
    bare.unscale_(nets.opt_d)
    with pytest.raises(AssertionError, match="No inf checks"):
        bare.step(nets.opt_d)
    assert train.unscale_and_clip(nets.opt_d, nets.scaler, 1.0) is None
    est = nets.generator(*(_batch([False, True])[k] for k in ("mix", "ref")))
    nets.scaler.scale(est.square().mean()).backward()
    before = [p.detach().clone() for p in nets.generator.parameters()]
    _, grad_norm, applied = train.update(nets, cfg, step=1)
    assert applied
    assert torch.isfinite(grad_norm)
    changed = [not torch.equal(a, p) for a, p in zip(before, nets.generator.parameters(),
                                                      strict=True)]
    assert sum(changed) > len(changed) // 2


def test_logged_terms_average_over_the_items_they_cover() -> None:
    cfg, nets = _tiny_nets()
    no_amp = contextlib.nullcontext()
    step_log = StepLog()
    train.micro_step(nets, cfg, _batch([False, False], seed=1), step=0, autocast=no_amp,
                     step_log=step_log)
    with_ta = _batch([True, False], seed=2)
    train.micro_step(nets, cfg, with_ta, step=1, autocast=no_amp, step_log=step_log)
    stats = step_log.reduce([*sorted(loss_weights(cfg)), "loss"], torch.device("cpu"),
                            ddp=False)
    with torch.no_grad():
        est = nets.generator(with_ta["mix"], with_ta["ref"])
        ta_only = ta_energy_loss(est[:1], with_ta["mix"][:1]).item()
    # The TA term covers one item in two micro-steps: its mean is that item's value, not half.
    assert stats["ta_energy"] == pytest.approx(ta_only, rel=1e-4, abs=1e-4)
    assert step_log.micro_steps == 2


def test_fallback_runs_the_lstms_in_float32_inside_bf16_autocast() -> None:
    _, nets = _tiny_nets()
    model = nets.generator
    assert train.use_float32_lstms(model) == 2 * len(model.blocks)
    seen: dict[str, set] = {"lstm": set(), "proj": set()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LSTM):
            module.register_forward_hook(lambda m, i, o: seen["lstm"].add(o[0].dtype))
        elif name.endswith(".proj") and "intra" in name:
            module.register_forward_hook(lambda m, i, o: seen["proj"].add(o.dtype))
    mix, ref = _batch([False])["mix"], _batch([False])["ref"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est = model(mix, ref)
    est.float().square().mean().backward()
    assert seen == {"lstm": {torch.float32}, "proj": {torch.bfloat16}}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_bf16_probe_failure_switches_lstms_to_float32(
    tmp_path: Path, data_section: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "bf16_lstm_works", lambda device: False)
    cfg = write_config(tmp_path / "c.yaml", data_section,
                       train={"total_steps": 2, "ckpt_every": 2, "precision": "bf16"})
    train.main(["--config", str(cfg)])
    text = (tmp_path / "run" / "train.log").read_text()
    assert re.search(r"bf16_lstm=unsupported device=cpu lstms=4 run_in=float32", text), text
    assert text.count("bf16_lstm=") == 1
    assert "training finished step=2" in text


def test_bf16_lstm_probe_passes_on_this_cpu() -> None:
    # The generator trains under CPU bf16 autocast here, so the probe must say so.
    assert train.bf16_lstm_works(torch.device("cpu"))


def test_device_and_precision_mistakes_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.device=cuda"])
    with pytest.raises(ConfigError, match="every rank on GPU 0"):
        resolve_device(cfg, ddp=True, local_rank=1)
    assert resolve_device(cfg, ddp=False, local_rank=0) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    bf16 = load_config(REPO / "configs" / "tiny.yaml", ["train.precision=bf16"])
    with pytest.raises(ConfigError, match="fp16"):
        autocast_dtype(bf16, torch.device("cuda", 0))
    assert autocast_dtype(bf16, torch.device("cpu")) == torch.bfloat16
    fp16 = load_config(REPO / "configs" / "tiny.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="needs CUDA"):
        autocast_dtype(fp16, torch.device("cpu"))


@pytest.mark.slow
def test_train_py_under_torchrun(tmp_path: Path, data_section: dict) -> None:
    # max_minutes: the time-budget flag is all-reduced at every update (on the device: NCCL
    # takes device tensors only); grad_accum 2: the sync happens on every second micro-step.
    cfg = write_config(tmp_path / "c.yaml", data_section,
                       train={"total_steps": 4, "val_every": 4, "ckpt_every": 4,
                              "log_every": 2, "max_minutes": 60.0}, optim={"grad_accum": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(REPO / "train.py"), "--config", str(cfg)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    text = (run / "train.log").read_text()
    assert "world=2" in text
    assert text.count("training finished") == 1, "only rank 0 writes"
    assert len(log_lines(run)) == 2
    assert len(log_lines(run, "val")) == 1
    assert "ranks step=4 world=2 in_sync=1" in text
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
