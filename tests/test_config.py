"""Config loading: defaults, YAML, overrides, errors that name the key, YAML round trip."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from config import Config, ConfigError, dump_config, from_dict, load_config, model_kwargs
from models.generator import Generator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_recipe_values() -> None:
    cfg = load_config(CONFIGS / "hifi_tse.yaml")
    m = cfg.model
    assert (m.feature_dim, m.lstm_hidden, m.n_blocks, m.n_heads) == (128, 256, 6, 4)
    assert m.reinject_at == [0, 1, 2, 3, 4, 5]
    assert m.use_film
    assert m.grad_checkpoint


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


def test_generator_defaults_match_config_defaults() -> None:
    # The generator's keyword defaults document the recipe; they must not drift from config.py.
    params = inspect.signature(Generator).parameters
    defaults = {name: p.default for name, p in params.items()}
    for name, value in model_kwargs(Config()).items():
        if defaults[name] is not None:  # None stands for "the recipe's list"
            assert defaults[name] == value, name
