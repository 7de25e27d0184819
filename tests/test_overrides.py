"""reprokit.overrides: REPROKIT_REDUCTION and REPROKIT_MICRO_BATCHES parse, refuse bad values naming
the variable, win over the script's reduction mode, and are recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import reprokit
from reprokit.errors import ConfigError
from reprokit.overrides import VARIABLES, Overrides, read_overrides


def test_reduction_variables_parse() -> None:
    """The two variables parse into the mode and the count; unset or empty means not set."""
    env = {"REPROKIT_REDUCTION": "canonical", "REPROKIT_MICRO_BATCHES": "8"}
    assert read_overrides(env).to_dict() == {"reduction": "canonical", "micro_batches": 8}
    assert read_overrides({"REPROKIT_REDUCTION": ""}).reduction is None
    assert {"REPROKIT_REDUCTION", "REPROKIT_MICRO_BATCHES"} <= set(VARIABLES)
    doc = reprokit.overrides.__doc__ or ""
    assert "REPROKIT_REDUCTION" in doc and "REPROKIT_MICRO_BATCHES" in doc


@pytest.mark.parametrize(("env", "message"), [
    ({"REPROKIT_REDUCTION": "allreduce"},
     r"REPROKIT_REDUCTION='allreduce' is not one of \['ddp', 'canonical'\]; set REPROKIT_REDUCTION=ddp or"),
    ({"REPROKIT_MICRO_BATCHES": "0"}, r"REPROKIT_MICRO_BATCHES=0 is below 1"),
    ({"REPROKIT_MICRO_BATCHES": "four"}, r"REPROKIT_MICRO_BATCHES='four' is not an integer"),
])
def test_bad_reduction_values_name_the_variable(env: dict[str, str], message: str) -> None:
    """A mode that is not ddp or canonical, or a count that is not an int >= 1, is refused."""
    with pytest.raises(ConfigError, match=message):
        read_overrides(env)


@pytest.mark.parametrize(("overrides", "script", "expected"), [
    (Overrides(), ("canonical", 8), ("canonical", 8)),  # nothing set: the script's
    (Overrides(reduction="ddp"), ("canonical", 8), ("ddp", None)),  # ddp has no micro-batches
    (Overrides(reduction="canonical", micro_batches=4), ("ddp", None), ("canonical", 4)),
    (Overrides(reduction="canonical"), ("canonical", 8), ("canonical", 8)),
    (Overrides(micro_batches=2), ("canonical", 8), ("canonical", 2)),
])
def test_the_variables_win_over_the_script(overrides: Overrides, script: tuple[str, int | None],
                                           expected: tuple[str, int | None]) -> None:
    """The override's mode and count replace the script's; mode ddp drops the script's count."""
    assert overrides.reduce(*script) == expected


def test_canonical_without_a_count_names_the_fix() -> None:
    """REPROKIT_REDUCTION=canonical on a script that passes no micro_batches asks for the count."""
    with pytest.raises(ConfigError, match=r"set REPROKIT_MICRO_BATCHES too, e.g. REPROKIT_MICRO_BATCHES=8"):
        Overrides(reduction="canonical").reduce("ddp", None)


def test_a_run_honours_and_records_the_reduction_override(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A Run written for ddp mode runs in canonical mode under the variables (one process, no
    launch), and its manifest records both the overrides and the mode."""
    monkeypatch.setenv("REPROKIT_REDUCTION", "canonical")
    monkeypatch.setenv("REPROKIT_MICRO_BATCHES", "2")
    run = reprokit.Run(tmp_path / "run", ledger=False, progress=False)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.track(model=model, optimizer=optimizer)
    assert (run.reduction, run.micro_batch_count) == ("canonical", 2)
    x, y = torch.ones(4, 2), torch.zeros(4, 1)
    for mx, my in run.micro_batches(x, y):
        nn.functional.mse_loss(model(mx), my).backward()
    optimizer.step()
    run.step()
    run.finish()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["overrides"]["reduction"] == "canonical" and manifest["overrides"]["micro_batches"] == 2
    entry = manifest["distributed"]
    assert (entry["reduction"], entry["micro_batches"]) == ("canonical", 2)
