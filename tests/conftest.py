"""Shared fixtures: every test leaves torch's global knobs as it found them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_knobs() -> Iterator[None]:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of examples/train_digits_reprokit.py (test_example*.py compare with it)."""
    from test_example import _run

    run_dir = tmp_path_factory.mktemp("example") / "reference"
    done = _run(run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir
