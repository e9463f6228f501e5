"""The score-based refiner (models/refiner/refiner.py) as a two-stage model: its spectral
transform, a first stage taken from a checkpoint and frozen, a refiner checkpoint that rebuilds
both stages alone, the trainer's handling of a family with its own objective, and the config's
refusals. The registry contract (length, scale, windows, bf16) is tests/test_families.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

import inference
import train
from config import ConfigError, load_config, model_kwargs
from models import registry
from models.refiner.refiner import CompressedSpectrogram, SGMSERefiner
from models.registry import build_model, checkpoint_payload, load_model
from tests.packed_data import packed_subset
from training.nets import build_nets
from training.step_log import log_events

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sgmse_refiner_tiny.yaml"


# One torch thread per test (conftest.py): small tensors on shared cores only contend.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def first_stage_ckpt(tmp_path: Path, seed: int = 3) -> tuple[Path, torch.nn.Module]:
    """A 'trained' first stage: the tiny config's first stage with weights of its own seed."""
    args = dict(load_config(TINY).model.first_stage)
    torch.manual_seed(seed)
    model = build_model(args)
    path = tmp_path / "first_stage.pt"
    torch.save(checkpoint_payload(model, registry.normalised_args(args)) | {"ema": None}, path)
    return path, model.eval()


def signals(batch: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, n, generator=gen), 0.1 * torch.randn(batch, n, generator=gen)


@pytest.mark.parametrize(("n_fft", "hop"), [(1534, 384), (254, 64)])
def test_compressed_spectrogram_round_trips(n_fft: int, hop: int) -> None:
    spec = CompressedSpectrogram(n_fft=n_fft, hop_length=hop, factor=0.065, exponent=0.667)
    wave = torch.randn(2, 9_601, dtype=torch.float32)
    x = spec(wave)
    assert x.shape[1] == n_fft // 2 + 1
    torch.testing.assert_close(spec.inverse(x, wave.shape[-1]), wave, atol=2e-5, rtol=1e-4)
    # The compression itself: |alpha |X|^beta| = alpha |X|^beta, the phase kept.
    raw = spec.stft(wave)
    torch.testing.assert_close(x.abs(), 0.065 * raw.abs().pow(0.667), atol=1e-6, rtol=1e-4)
    big = raw.abs() > 1e-3
    torch.testing.assert_close(x.angle()[big], raw.angle()[big], atol=1e-4, rtol=0)


def test_the_refiner_checkpoint_rebuilds_both_stages_alone(tmp_path: Path) -> None:
    path, trained = first_stage_ckpt(tmp_path)
    cfg = load_config(TINY, [f"model.first_stage_ckpt={path}", "model.first_stage={}"])
    args = model_kwargs(cfg)
    # The first stage's arguments come from its checkpoint ...
    assert args["first_stage"] == registry.normalised_args(
        torch.load(path, weights_only=True)["model_args"])
    torch.manual_seed(0)
    nets = build_nets(cfg, torch.device("cpu"))
    refiner = nets.generator
    assert isinstance(refiner, SGMSERefiner)
    mix, ref = signals(1, 4_800)
    with torch.no_grad():
        # ... its weights are loaded when a run starts, into the EMA copy too ...
        for model in (refiner, nets.ema):
            torch.testing.assert_close(model.first_stage(mix, ref), trained(mix, ref),
                                       atol=0, rtol=0)
        # ... frozen: the optimizer holds the score network alone.
        in_opt = {id(p) for g in nets.opt_g.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in refiner.net.parameters()}
        # ... and a refiner checkpoint needs no first-stage file.
        out = tmp_path / "refiner.pt"
        torch.save(checkpoint_payload(refiner, args) | {"ema": None}, out)
        path.unlink()
        again = load_model(out).eval()
        torch.testing.assert_close(again(mix, ref), refiner.eval()(mix, ref), atol=0, rtol=0)


@pytest.mark.parametrize("sde", ["ouve", "sbve"])
def test_training_forward_returns_the_objective_per_item(sde: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_kwargs(load_config(TINY, [f"model.sde={sde}"]))).train()
    mix, ref = signals(3, 4_800)
    target = 0.5 * mix
    est, aux = model(mix, ref, with_aux=True, target=target)
    assert est.shape == mix.shape
    assert not est.requires_grad
    loss = aux["score_matching"]
    assert loss.shape == (3,)
    assert torch.isfinite(loss).all()
    assert (loss > 0).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in model.net.parameters())
    assert all(p.grad is None for p in model.first_stage.parameters())
    assert not model.first_stage.training  # frozen in eval mode, dropout and all


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_the_schroedinger_bridge_refiner_keeps_the_contract(sampler: str) -> None:
    """The SBVE path end to end (the registry's contract tests run the tiny OUVE config):
    exact length, deterministic, batch items independent, scale-equivariant."""
    torch.manual_seed(0)
    cfg = load_config(TINY, ["model.sde=sbve", f"model.sb_sampler={sampler}", "model.n_steps=3"])
    model = build_model(model_kwargs(cfg)).eval()
    mix, ref = signals(2, 9_601)
    with torch.no_grad():
        est = model(mix, ref)
        assert est.shape == mix.shape
        assert torch.isfinite(est).all()
        torch.testing.assert_close(model(mix, ref), est, atol=0, rtol=0)
        torch.testing.assert_close(model(mix[:1], ref[:1]), est[:1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(7 * mix, ref), 7 * est, atol=7e-5, rtol=1e-4)


def test_validation_samples_val_steps() -> None:
    torch.manual_seed(0)
    cfg = load_config(TINY, ["model.n_steps=5", "model.val_steps=2", "model.corrector_steps=0"])
    model = build_model(model_kwargs(cfg)).eval()
    calls = []
    model.net.register_forward_hook(lambda *_: calls.append(1))
    mix, ref = signals(1, 4_800)
    with torch.no_grad():
        model(mix, ref)
        full = len(calls)
        with registry.validation_context(model):
            model(mix, ref)
    assert (full, len(calls) - full) == (5, 2)
    assert model.n_steps == 5  # restored


@pytest.mark.parametrize(("override", "match"), [
    ("loss.si_sdr=1.0", r"loss\.si_sdr.*score_matching alone"),
    ("loss.score_matching=0", r"loss\.score_matching.*must be > 0"),
    ("gan.enabled=true", r"gan\.enabled.*no GAN phase"),
])
def test_config_refuses_terms_that_would_train_nothing(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_a_missing_first_stage_is_one_clear_line(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"model.first_stage_ckpt={tmp_path / 'nope.pt'}"])
    with pytest.raises(registry.CheckpointError, match=r"nope\.pt: no such file"):
        model_kwargs(cfg)


@pytest.mark.slow
def test_train_py_trains_the_refiner_alone(tmp_path: Path, shared_data: Path,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """A refiner run through train.py: the SDE's loss falls, the first stage does not move,
    the validation samples, and the run's checkpoint loads with the first stage's file gone."""
    path, trained = first_stage_ckpt(tmp_path)
    d = packed_subset(tmp_path_factory, shared_data)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"].update(first_stage_ckpt=str(path), first_stage={})
    cfg["data"] = {"manifest_dir": d.manifest_dir, "segment_seconds": 0.5, "ref_seconds": 0.5,
                   "n_val_samples": 4, "num_workers": 0, "val_fraction": d.val_fraction}
    cfg["optim"] = {"lr": 3e-3, "warmup_steps": 2, "grad_accum": 1}
    cfg["train"].update(run_dir=str(tmp_path / "run"), total_steps=30, log_every=1,
                        val_every=30, ckpt_every=30, deterministic=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(config)])
    rows = log_events(tmp_path / "run" / "train.log")
    losses = [float(r["score_matching"]) for r in rows if "score_matching" in r]
    assert len(losses) == 30
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    path.unlink()
    refiner = load_model(tmp_path / "run" / "last.pt", use_ema=False)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(refiner.first_stage.state_dict()[name], value, atol=0, rtol=0)
    # inference.py with that file alone (the first stage's is gone)
    wave = 0.1 * torch.randn(72_000).numpy()
    sf.write(tmp_path / "mix.wav", wave[:24_000], 48_000, subtype="FLOAT")
    sf.write(tmp_path / "ref.wav", wave, 48_000, subtype="FLOAT")  # references: 1 s or more
    out = tmp_path / "out.wav"
    assert inference.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--mix",
                           str(tmp_path / "mix.wav"), "--ref", str(tmp_path / "ref.wav"),
                           "-o", str(out)]) == 0
    assert sf.info(str(out)).frames == 24_000
