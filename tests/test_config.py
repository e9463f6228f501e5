"""Config loading: defaults, YAML, overrides, errors that name the key, YAML round trip."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from config import ConfigError, LossConfig, dump_config, from_dict, load_config, model_kwargs
from models import registry
from models.registry import build_model, checkpoint_payload, load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_recipe_values() -> None:
    cfg = load_config(CONFIGS / "hifi_tse.yaml")
    m = cfg.model
    assert (m.feature_dim, m.lstm_hidden, m.n_blocks, m.n_heads) == (128, 256, 6, 4)
    assert m.reinject_at == [0, 1, 2, 3, 4, 5]
    assert m.use_film
    assert cfg.train.grad_checkpoint


def test_grad_checkpoint_moved_to_train_and_old_places_still_load(tmp_path: Path) -> None:
    assert "grad_checkpoint" not in model_kwargs(load_config(CONFIGS / "hifi_tse.yaml"))
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  grad_checkpoint: false\n")
    assert load_config(old).train.grad_checkpoint is False
    assert load_config(None, ["model.grad_checkpoint=false"]).train.grad_checkpoint is False
    # A checkpoint written before the move: its model_args and stored config still load.
    stored = load_config(CONFIGS / "tiny.yaml")
    # ... and, older still, before model families: no "arch" key.
    legacy_args = {**model_kwargs(stored), "grad_checkpoint": True}
    del legacy_args["arch"]
    ckpt = tmp_path / "old.pt"
    torch.save(checkpoint_payload(build_model(model_kwargs(stored)), legacy_args), ckpt)
    model = load_model(ckpt)
    assert model.grad_checkpoint is False
    raw = yaml.safe_load(dump_config(stored))
    raw["model"]["grad_checkpoint"] = True
    del raw["train"]["grad_checkpoint"]
    assert from_dict(raw).train.grad_checkpoint is True


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.sir_db=[5, -5]", "data.sir_db"),
        ("data.snr_db=[0]", "data.snr_db"),
        ("data.level_db=[-35, -15, 0]", "data.level_db"),
        ("data.ref_level_db=[-10, -20]", "data.ref_level_db"),
        ("data.ref_snr_db=[20, 0]", "data.ref_snr_db"),
        ("data.speed_perturb=[1.1, 0.9]", "data.speed_perturb"),
        ("train.noisy_ref_ramp=[150000, 100000]", "train.noisy_ref_ramp"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ],
)
def test_ranges_are_checked_at_load(override: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "tiny.yaml", [override])
    bad = tmp_path / "bad.yaml"
    section, rest = override.split(".", 1)
    name, value = rest.split("=")
    bad.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(bad)


def test_misspelt_key_is_rejected_and_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  lstm_hiden: 256\n")
    with pytest.raises(ConfigError, match=r"model\.lstm_hiden") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_section_and_wrong_type() -> None:
    with pytest.raises(ConfigError, match="modle"):
        from_dict({"modle": {"n_blocks": 2}})
    with pytest.raises(ConfigError, match=r"model\.n_blocks"):
        from_dict({"model": {"n_blocks": "six"}})
    with pytest.raises(ConfigError, match=r"model\.n_blocks"):
        from_dict({"model": {"n_blocks": True}})  # a bool is not an int here
    with pytest.raises(ConfigError, match=r"model\.reinject_at\[1\]"):
        from_dict({"model": {"reinject_at": [0, "x"]}})


def test_overrides() -> None:
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["model.n_blocks=3", "optim.lr=3e-4", "model.reinject_at=[0, 2]", "gan.enabled=true"],
    )
    assert cfg.model.n_blocks == 3
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.reinject_at == [0, 2]
    assert cfg.gan.enabled is True
    assert cfg.model.feature_dim == 16  # from the YAML, untouched
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["n_blocks=3"])
    with pytest.raises(ConfigError, match=r"train\.nope"):
        load_config(None, ["train.nope=1"])


def test_int_is_accepted_for_float() -> None:
    cfg = from_dict({"optim": {"lr": 1}})
    assert isinstance(cfg.optim.lr, float)


def test_dump_and_load_back_identical(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "hifi_tse.yaml", ["data.snr_db=[0, 10]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(dump_config(again)) == yaml.safe_load(path.read_text())


@pytest.mark.parametrize("arch", sorted(registry.FAMILIES))
def test_model_defaults_match_config_defaults(arch: str) -> None:
    # A family's keyword defaults document its recipe; they must not drift from its dataclass.
    fam = registry.family(arch)
    # A family trained by its own objective refuses the default loss weights.
    loss = [f"loss.{k}=0" for k, w in dataclasses.asdict(LossConfig()).items() if w]
    objective = [*loss, f"loss.{fam.objective}=1"] if fam.objective else []
    cfg = load_config(None, [f"model.arch={arch}", *objective])
    params = inspect.signature(fam.model).parameters
    defaults = {name: p.default for name, p in params.items()}
    args = model_kwargs(cfg)
    assert args.pop("arch") == arch
    for name, value in args.items():
        # None stands for "the recipe's list"; a required argument (the refiner's first stage,
        # from its checkpoint) has no default to drift from.
        if defaults[name] not in (None, inspect.Parameter.empty):
            assert defaults[name] == value, name
