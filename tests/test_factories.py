"""A TrainConfig naming the user's own model and dataset factories by import path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

import reprokit
from reprokit.errors import ConfigError
from reprokit.rundir import read_json

FACTORY = '''
import torch
from torch import nn


def make_net(input_shape, outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), outputs))


def load():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g)
    return x, (x[:, 0] > 0).long()
'''


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    module = tmp_path / "userfactories.py"
    module.write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    sys.modules.pop("userfactories", None)


def test_a_run_of_user_factories_records_their_source(factories: Path, tmp_path: Path) -> None:
    """train() builds the factories' model and data; the manifest records their source digests."""
    config = reprokit.TrainConfig(model="userfactories:make_net", dataset="userfactories:load", steps=6)
    result = reprokit.train(config, tmp_path / "run")
    assert isinstance(reprokit.build_model(config.model, (5,), 2), nn.Sequential)
    manifest = read_json(tmp_path / "run", "manifest.json")
    assert set(manifest["code"]["factories"]) == {"model", "dataset"}
    assert result.steps == 6 and result.metric_name == "val_accuracy"


def test_an_edited_factory_is_refused_on_resume(factories: Path, tmp_path: Path) -> None:
    """An unfinished run whose factory module was edited since is refused, naming the factory's code."""
    config = reprokit.TrainConfig(model="userfactories:make_net", dataset="userfactories:load", steps=8,
                                  checkpoint_every=2)
    reprokit.train(config, tmp_path / "run")
    (tmp_path / "run" / "result.json").unlink()  # as a kill after the last checkpoint leaves it
    factories.write_text(FACTORY + "\n# edited\n")
    with pytest.raises(reprokit.ResumeError, match="factory's code version"):
        reprokit.resume(tmp_path / "run")


def test_malformed_or_missing_factories_are_errors_naming_them(factories: Path) -> None:
    """A reference without 'module:function' form, or one that does not import, names the field."""
    with pytest.raises(ConfigError, match=r"model 'nets:' is not an import path"):
        reprokit.TrainConfig(model="nets:")
    with pytest.raises(ConfigError, match=r"dataset 'nowhere\.mod:load': cannot import 'nowhere\.mod'"):
        reprokit.train(reprokit.TrainConfig(dataset="nowhere.mod:load", steps=1))
