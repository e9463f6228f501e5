"""The contract every registered model family keeps (models/registry.py), checked on each
family's tiny config: exact output length, independent batch items, scale equivariance, encode
once then windows, checkpoint round trip, finite gradients, bf16 autocast; and a few real
train.py steps per family."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

import evaluate
import inference
import train
from config import Config, ConfigError, load_config, model_kwargs
from dsp.audio import load_audio
from dsp.level import rms_scale
from evaluation import report
from models import registry
from models.layers.conditioning import encode_references
from models.registry import build_model, checkpoint_payload, load_model
from tests.packed_data import packed_subset
from training.step_log import log_events

REPO = Path(__file__).resolve().parents[1]
TINY = {"hifi_tse": "tiny.yaml", "td_speakerbeam": "td_speakerbeam_tiny.yaml",
        "spex_plus": "spex_plus_tiny.yaml", "semamba": "semamba_tiny.yaml",
        "sgmse_refiner": "sgmse_refiner_tiny.yaml"}
N_SPEAKERS = 5  # the head of families that have one, in these unit tests
# Every family that takes a pretrained speaker embedding, once more with it (models/layers/ge2e.py).
WITH_GE2E = ["hifi_tse+ge2e", "td_speakerbeam+ge2e", "spex_plus+ge2e", "semamba+ge2e"]
ARCHS = sorted(registry.FAMILIES) + WITH_GE2E


# One torch thread per test (conftest.py): small tensors on shared cores only contend.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_family_has_a_tiny_config() -> None:
    assert set(TINY) == set(registry.FAMILIES)


def tiny_config(name: str) -> Config:
    """The tiny config of ``arch`` or ``arch+ge2e`` (with ``model.speaker_embedding: ge2e``)."""
    arch, _, extra = name.partition("+")
    cfg = load_config(REPO / "configs" / TINY[arch],
                      [f"model.speaker_embedding={extra}"] if extra else [])
    assert registry.arch_of(cfg.model) == arch
    return cfg


def tiny(name: str) -> torch.nn.Module:
    cfg = tiny_config(name)
    if hasattr(cfg.model, "n_speakers"):
        cfg.model.n_speakers = N_SPEAKERS
    torch.manual_seed(0)
    return build_model(model_kwargs(cfg))


def signals(batch: int, n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, n, generator=gen), 0.1 * torch.randn(batch, m, generator=gen)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("n", "m"), [(9_601, 7_203), (4_799, 12_001)])
def test_output_has_exactly_the_mixture_length(arch: str, n: int, m: int) -> None:
    model = tiny(arch).eval()
    mix, ref = signals(2, n, m)
    with torch.no_grad():
        est, aux = model(mix, ref, with_aux=True)
    assert est.shape == (2, n)
    assert torch.isfinite(est).all()
    for name, value in aux.items():
        if name.startswith("est_"):
            assert value.shape == (2, n), name


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_items_are_independent_in_eval(arch: str) -> None:
    model = tiny(arch).eval()
    mix, ref = signals(2, 9_600, 9_600)
    loud = torch.cat([mix[:1], 50 * mix[1:]])
    with torch.no_grad():
        both = model(loud, ref)
        alone = model(mix[:1], ref[:1])
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_equivariance(arch: str) -> None:
    model = tiny(arch).eval()
    mix, ref = signals(1, 9_600, 9_600)
    with torch.no_grad():
        est = model(mix, ref)
        for a in (1e-3, 7.0):
            torch.testing.assert_close(model(a * mix, ref), a * est, atol=1e-5 * a, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_once_then_extract_equals_forward(arch: str) -> None:
    model = tiny(arch).eval()
    mix, ref = signals(1, 9_600, 7_200)
    with torch.no_grad():
        whole = model(mix, ref)
        z_ref = model.encode_reference(ref)
        # One window holding the whole mixture, with the scale a windowed caller passes.
        windowed = model.extract(mix, z_ref, rms_scale(mix))
        again = model.extract(mix, z_ref)  # the embedding is reusable
    torch.testing.assert_close(windowed, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_three_copies_of_one_reference_give_that_reference(arch: str) -> None:
    model = tiny(arch).eval()
    mix, ref = signals(2, 9_600, 7_200)
    other = signals(2, 9_600, 7_200, seed=1)[1]
    with torch.no_grad():
        alone = model.extract(mix, model.encode_reference(ref))
        three = model.extract(mix, encode_references(model, ref[:, None].repeat(1, 3, 1)))
        mixed = model.extract(mix, encode_references(model, torch.stack([ref, other], 1)))
    # Float rounding only: attention and statistics over three times the frames.
    torch.testing.assert_close(three, alone, atol=1e-5, rtol=1e-3)
    assert not torch.allclose(mixed, alone, atol=1e-4)  # another reference does count


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_through_the_registry(arch: str, tmp_path: Path) -> None:
    cfg = tiny_config(arch)
    torch.manual_seed(0)
    args = model_kwargs(cfg)
    model = build_model(args).eval()
    path = tmp_path / "model.pt"
    torch.save(checkpoint_payload(model, args), path)
    again = load_model(path).eval()
    assert type(again) is type(model)
    mix, ref = signals(1, 4_800, 4_800)
    with torch.no_grad():
        torch.testing.assert_close(again(mix, ref), model(mix, ref), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_finite_gradients_in_float32_and_bf16_autocast(arch: str, dtype: torch.dtype) -> None:
    model = tiny(arch).train()
    mix, ref = signals(2, 4_800, 4_800)
    # A family with an objective of its own (the refiner) trains through it, from the target.
    target = {"target": 0.5 * mix} if registry.family(arch.split("+")[0]).objective else {}
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        est, aux = model(mix, ref, with_aux=True, **target)
    loss = est.float().square().mean() + sum(v.float().square().mean() for v in aux.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_family_loss_terms_are_refused_for_other_families() -> None:
    with pytest.raises(ConfigError, match=r"loss\.speaker_ce.*semamba"):
        load_config(REPO / "configs" / "semamba_tiny.yaml", ["loss.speaker_ce=0.5"])
    # The speaker head exists in the families that provide it.
    for name in ("tiny.yaml", "td_speakerbeam_tiny.yaml", "spex_plus_tiny.yaml"):
        load_config(REPO / "configs" / name, ["loss.speaker_ce=0.5"])
    with pytest.raises(ConfigError, match=r"model\.lstm_hidden.*spex_plus"):
        load_config(REPO / "configs" / "spex_plus_tiny.yaml", ["model.lstm_hidden=8"])
    with pytest.raises(ConfigError, match=r"model\.arch"):
        load_config(None, ["model.arch=wavenet"])


@pytest.fixture(scope="module")
def data_section(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    d = packed_subset(tmp_path_factory, shared_data)
    return {"manifest_dir": d.manifest_dir, "segment_seconds": 0.5, "ref_seconds": 0.5,
            "n_val_samples": 4, "num_workers": 0, "val_fraction": d.val_fraction}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["td_speakerbeam", "spex_plus", "semamba"])
def test_train_py_steps_with_falling_loss(arch: str, tmp_path: Path, data_section: dict) -> None:
    cfg = yaml.safe_load((REPO / "configs" / TINY[arch]).read_text())
    cfg["data"] = dict(data_section)
    cfg["optim"] = {"lr": 3e-3, "warmup_steps": 2, "grad_accum": 1}
    cfg["train"].update(run_dir=str(tmp_path / "run"), total_steps=24, log_every=1,
                        val_every=24, ckpt_every=24, deterministic=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(path)])
    rows = log_events(tmp_path / "run" / "train.log")
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 24
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8, losses
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["model_args"]["arch"] == arch
    if arch == "spex_plus":  # the head's size came from the training speakers
        assert ckpt["model_args"]["n_speakers"] > 1
        assert all("speaker_ce" in r and "si_sdr_long" in r for r in rows)
    if arch == "semamba":  # its own terms reach the loss and the log
        assert all("consistency" in r and "antiwrap_phase" in r for r in rows)
    assert type(load_model(tmp_path / "run" / "last.pt")).__name__ == type(
        build_model(ckpt["model_args"])).__name__


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["td_speakerbeam", "spex_plus", "semamba", "sgmse_refiner"])
def test_evaluate_and_inference_run_any_family(arch: str, tmp_path: Path,
                                               shared_data: Path) -> None:
    """evaluate.py and inference.py are given only the file: the checkpoint rebuilds its family,
    and both scripts give what that family's own forward gives (hifi_tse: test_evaluate.py,
    test_inference.py)."""
    cfg = load_config(REPO / "configs" / TINY[arch])
    args = {**model_kwargs(cfg), **({"n_speakers": N_SPEAKERS} if arch == "spex_plus" else {})}
    if arch == "sgmse_refiner":
        # Untrained, its sampler's noise at sigma_max 1 drowns the target (SI-SDR near -80 dB,
        # where float32 metrics differ by hundredths of a dB); small sigmas keep it near the
        # first stage's estimate, where the SI-SDR comparison below means something.
        args.update(sigma_min=1e-3, sigma_max=1e-2)
    torch.manual_seed(0)
    model = build_model(args).eval()
    ckpt = tmp_path / f"{arch}.pt"
    torch.save(checkpoint_payload(model, args) | {"ema": None}, ckpt)

    speech = [sorted((shared_data / "speech" / "ravdess" / f"Actor_{a:02d}").glob("*.flac"))
              for a in (1, 2)]
    n = round(1.5 * 48_000)
    target, other = load_audio(speech[0][0])[:n], load_audio(speech[1][0])[:n]
    ref = load_audio(speech[0][3])
    triplets = tmp_path / "triplets"
    triplets.mkdir()
    for name, wave in [("a-mixed", target + 0.7 * other), ("a-ref", ref), ("a-target", target),
                       ("b-mixed", other), ("b-ref", ref)]:
        sf.write(triplets / f"{name}.wav", wave, 48_000, subtype="FLOAT")

    evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "eval"),
                   "--triplets", str(triplets), "--jobs", "0"])
    with (tmp_path / "eval" / report.CSV_NAME).open() as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    assert {k: r["condition"] for k, r in rows.items()} == {"a": "TP", "b": "TA"}
    assert math.isfinite(float(rows["b"]["ta_suppression_db"]))
    with torch.no_grad():  # on the files' float32 samples, which is what evaluate.py reads
        mix = torch.from_numpy(sf.read(triplets / "a-mixed.wav", dtype="float32")[0])[None]
        file_ref = torch.from_numpy(sf.read(triplets / "a-ref.wav", dtype="float32")[0])[None]
        expected = model(mix, file_ref)[0].double()
    own = scale_invariant_signal_distortion_ratio(expected, torch.from_numpy(target).double(),
                                                  zero_mean=True)
    assert float(rows["a"]["si_sdr"]) == pytest.approx(float(own), abs=0.01)

    # inference.py over several windows: the mixture's length, and a seamless estimate (one
    # window of the whole mixture gives the same up to the cross-fades' small differences).
    out_one, out_win = tmp_path / "one.wav", tmp_path / "windows.wav"
    common = ["--ckpt", str(ckpt), "--mix", str(triplets / "a-mixed.wav"),
              "--ref", str(triplets / "a-ref.wav")]
    assert inference.main([*common, "-o", str(out_one)]) == 0
    assert inference.main([*common, "-o", str(out_win), "--window", "0.5",
                           "--overlap", "0.125"]) == 0
    one, windows = (sf.read(p, dtype="float64")[0] for p in (out_one, out_win))
    assert one.shape == windows.shape == (n,)
    assert np.isfinite(windows).all()
    residual = np.sum((one - expected.numpy()) ** 2) / np.sum(expected.numpy() ** 2)
    assert residual < 1e-8, "one window is the family's own forward (80 dB SNR or better)"
