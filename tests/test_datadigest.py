"""Content digests of what a user's script trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from reprokit.datadigest import digest_data
from reprokit.errors import DataError


class _Held(Dataset[torch.Tensor]):
    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.transform = x, None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class _Computed(Dataset[torch.Tensor]):
    """No data attributes: digested sample by sample, its random noise seeded per sample."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((2,), float(i)) + torch.randn(2)


def test_equal_content_equal_digest_one_value_changes_it() -> None:
    """Tensors, arrays and the datasets holding them: same bytes, same digest; one value changed, another."""
    x = torch.arange(12.0).reshape(6, 2)
    assert digest_data(TensorDataset(x)) == digest_data(TensorDataset(x.clone()))
    assert digest_data(_Held(x)) != digest_data(_Held(x + 1))
    assert digest_data(np.arange(4)) != digest_data(np.arange(4) * 2)
    assert digest_data(Subset(TensorDataset(x), [0, 1])) != digest_data(Subset(TensorDataset(x), [0, 2]))


def test_sample_by_sample_fallback_is_repeatable_and_draws_nothing() -> None:
    """A dataset with no data attributes is digested the same twice and leaves the global RNG as it was."""
    state = torch.get_rng_state()
    assert digest_data(_Computed()) == digest_data(_Computed())
    assert torch.equal(torch.get_rng_state(), state)


def test_files_and_directories_by_content(tmp_path: Path) -> None:
    """A directory's digest follows its files' bytes, not their times."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"one")
    first = digest_data(tmp_path / "d")
    (tmp_path / "d" / "a.txt").write_bytes(b"two")
    assert digest_data(tmp_path / "d") != first
    with pytest.raises(DataError, match="does not exist"):
        digest_data(tmp_path / "missing")


def test_an_opaque_object_is_refused_with_the_way_out() -> None:
    """An object with no data, no index and no files says to pass Run(data=...)."""
    with pytest.raises(DataError, match=r"pass Run\(data=\.\.\.\)"):
        digest_data(object())
