"""Tests for reprokit.config."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from reprokit.config import TrainConfig
from reprokit.errors import ConfigError

ISSUE_EXAMPLE = {"model": "cnn", "dataset": "digits", "seed": 0, "steps": 60, "threads": 1}


def test_defaults_valid():
    """The default config validates and every field holds its declared default."""
    cfg = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        assert getattr(cfg, f.name) == f.default, f.name


def test_from_dict_round_trips_to_dict():
    """from_dict(to_dict()) gives back an equal config."""
    cfg = TrainConfig(seed=3, steps=10, optimizer="adam")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_issue_example_loads_from_file(tmp_path, suffix):
    """The issue's example loads from JSON and YAML, with every other field at its default."""
    path = tmp_path / f"run{suffix}"
    text = json.dumps(ISSUE_EXAMPLE) if suffix == ".json" else yaml.safe_dump(ISSUE_EXAMPLE)
    path.write_text(text)
    cfg = TrainConfig.from_file(path)
    assert cfg == TrainConfig(**ISSUE_EXAMPLE)
    defaults = TrainConfig().to_dict()
    for name, value in cfg.to_dict().items():
        assert value == ISSUE_EXAMPLE.get(name, defaults[name]), name
    assert cfg.steps == 60 and TrainConfig().steps != 60  # the file's value, not the default


def test_from_file_accepts_str_path(tmp_path):
    """A path given as a string loads too."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"seed": 9}))
    assert TrainConfig.from_file(str(path)).seed == 9


def test_empty_yaml_gives_defaults(tmp_path):
    """An empty YAML file is the default config."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert TrainConfig.from_file(path) == TrainConfig()


def test_unknown_key_named_with_allowed_keys():
    """An unknown key raises ConfigError naming it and listing the allowed keys."""
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]") as info:
        TrainConfig.from_dict({**ISSUE_EXAMPLE, "learning_rate": 0.1})
    allowed = sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert f"allowed keys are {allowed}" in str(info.value)


def test_unknown_key_in_file(tmp_path):
    """An unknown key in a config file is refused the same way."""
    path = tmp_path / "run.yaml"
    path.write_text("model: cnn\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"\['epoch'\].*allowed keys"):
        TrainConfig.from_file(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", "60"), ("lr", "x"), ("deterministic", 1), ("seed", True), ("threads", 1.5),
     ("batch_size", 64.0), ("model", None), ("lr", True)],
)
def test_ill_typed_value_names_field(field, value):
    """An ill-typed value raises ConfigError naming the field and the value."""
    with pytest.raises(ConfigError, match=rf"config field '{field}' = {value!r} is a {type(value).__name__}"):
        TrainConfig(**{field: value})


def test_int_accepted_for_float_field():
    """An int for a float field (lr) is accepted and stored as a float."""
    cfg = TrainConfig(lr=1)
    assert cfg.lr == 1.0
    assert type(cfg.lr) is float


def test_optional_int_accepts_none():
    """steps and threads accept None."""
    cfg = TrainConfig(steps=None, threads=None)
    assert cfg.steps is None and cfg.threads is None


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("seed", -1, r"seed -1 is out of range"),
        ("seed", 2**32, r"seed 4294967296 is out of range"),
        ("split_seed", -1, r"split_seed -1 is out of range"),
        ("batch_size", 0, r"batch_size 0 must be >= 1"),
        ("steps", 0, r"steps 0 must be >= 1"),
        ("threads", 0, r"threads 0 must be >= 1"),
        ("num_workers", -1, r"num_workers -1 must be >= 0"),
        ("val_fraction", 1.0, r"val_fraction 1.0 is outside \(0, 1\)"),
        ("val_fraction", 0, r"val_fraction 0.0 is outside \(0, 1\)"),
        ("lr", 0.0, r"lr 0.0 must be > 0"),
        ("model", "vgg", r"model 'vgg' is not available; choose one of \['cnn', 'mlp', 'resnet18'\]"),
        ("optimizer", "lbfgs", r"optimizer 'lbfgs' is not available"),
        ("dataset", "mnist", r"dataset 'mnist' is not available"),
    ],
)
def test_out_of_range_value_named(field, value, pattern):
    """An out-of-range value raises ConfigError with the field and value in the message."""
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("momentum", -0.5), ("weight_decay", -0.25)])
def test_negative_momentum_or_decay_names_value(field, value):
    """A negative momentum or weight decay raises ConfigError naming the field and the value."""
    with pytest.raises(ConfigError, match=rf"{field} {value}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field", ["momentum", "weight_decay", "lr"])
def test_nan_hyperparameter_refused(field):
    """A NaN momentum, weight decay or learning rate is refused."""
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: math.nan})


def test_missing_file(tmp_path):
    """A missing config file raises ConfigError naming the path."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml' does not exist"):
        TrainConfig.from_file(path)


def test_wrong_suffix(tmp_path):
    """A config file that is not .yaml, .yml or .json raises ConfigError naming it."""
    path = tmp_path / "run.txt"
    path.write_text(json.dumps(ISSUE_EXAMPLE))
    with pytest.raises(ConfigError, match=r"run\.txt' is not \.yaml, \.yml or \.json"):
        TrainConfig.from_file(path)


def test_malformed_yaml(tmp_path):
    """A YAML file that does not parse raises ConfigError (not a YAMLError)."""
    path = tmp_path / "bad.yaml"
    path.write_text("model: [cnn\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' does not parse"):
        TrainConfig.from_file(path)


def test_malformed_json(tmp_path):
    """A JSON file that does not parse raises ConfigError."""
    path = tmp_path / "bad.json"
    path.write_text('{"model": "cnn",')
    with pytest.raises(ConfigError, match=r"bad\.json' does not parse"):
        TrainConfig.from_file(path)


def test_non_mapping_file(tmp_path):
    """A YAML file holding a list, not a mapping, raises ConfigError."""
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- cnn\n")
    with pytest.raises(ConfigError, match=r"must be a mapping.*got list"):
        TrainConfig.from_file(path)


def test_replace_applies_changes():
    """replace() returns a changed copy and leaves the original alone."""
    cfg = TrainConfig()
    other = cfg.replace(seed=5, lr=1)
    assert other.seed == 5 and other.lr == 1.0 and type(other.lr) is float
    assert cfg.seed == 0


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [({"seed": -1}, r"seed -1"), ({"steps": "60"}, r"'steps'"), ({"learning_rate": 1}, r"learning_rate")],
)
def test_replace_validates(changes, pattern):
    """replace() validates values and keys like construction does."""
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig().replace(**changes)


def test_config_is_frozen():
    """Assigning to a field raises FrozenInstanceError and leaves the value alone."""
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    assert cfg.seed == 0
