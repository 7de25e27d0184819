"""Tests for reprokit.seeding."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

from reprokit.errors import SeedError
from reprokit.seeding import (
    CUBLAS_WORKSPACE,
    SEED_MAX,
    RngState,
    capture_rng_state,
    derive_seed,
    restore_rng_state,
    seed_everything,
    seed_worker,
)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Put back every global knob and RNG state a test may change."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_det = torch.backends.cudnn.deterministic
    cudnn_bench = torch.backends.cudnn.benchmark
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.backends.cudnn.deterministic = cudnn_det
    torch.backends.cudnn.benchmark = cudnn_bench
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)


def _draws(generator: torch.Generator | None = None) -> dict[str, object]:
    """One draw from every RNG, including the cached-gaussian paths of python and numpy."""
    out: dict[str, object] = {
        "python": (random.random(), random.gauss(0.0, 1.0)),
        "numpy": np.concatenate([np.random.rand(3), np.random.standard_normal(3)]).tolist(),
        "torch": torch.rand(3).tolist(),
    }
    if generator is not None:
        out["generator"] = torch.rand(3, generator=generator).tolist()
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_seed_record_threads_pinned_match_torch(threads):
    """Pinning threads sets torch's intra-op thread count and the record says so."""
    torch.set_num_threads(3 - threads)  # start from the other count, so the pin has to act
    record = seed_everything(0, threads=threads)
    assert torch.get_num_threads() == threads
    assert record.threads == threads
    assert record.threads_pinned is True


def test_seed_record_threads_unpinned_reports_current_count():
    """threads=None leaves the count alone; the record reports the count in force, unpinned."""
    torch.set_num_threads(1)
    record = seed_everything(0)
    assert torch.get_num_threads() == 1
    assert record.threads == 1
    assert record.threads_pinned is False


def test_seed_record_deterministic_flags_match_torch():
    """deterministic=True turns on deterministic algorithms and cuDNN determinism, and records it."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    record = seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert record.use_deterministic_algorithms is True
    assert record.cudnn_deterministic is True and torch.backends.cudnn.deterministic
    assert record.cudnn_benchmark is False and not torch.backends.cudnn.benchmark


def test_seed_record_nondeterministic_flags_match_torch():
    """deterministic=False turns deterministic algorithms off and records the state in force."""
    torch.use_deterministic_algorithms(True)
    record = seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert record.use_deterministic_algorithms is False
    assert record.cudnn_deterministic is False
    assert record.cudnn_benchmark is True


def test_seed_record_sets_cublas_workspace_when_deterministic(monkeypatch):
    """A deterministic seeding sets CUBLAS_WORKSPACE_CONFIG if unset, and records the value in force."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    record = seed_everything(0, deterministic=True)
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == CUBLAS_WORKSPACE
    assert record.cublas_workspace_config == CUBLAS_WORKSPACE


def test_seed_record_keeps_existing_cublas_workspace(monkeypatch):
    """A CUBLAS_WORKSPACE_CONFIG the user exported is kept, and the record reports it."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    record = seed_everything(0, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert record.cublas_workspace_config == ":16:8"


def test_seed_record_round_trips_seed_and_to_dict():
    """The record holds the seed it was given and to_dict exposes every field."""
    record = seed_everything(1234)
    data = record.to_dict()
    assert data["seed"] == record.seed == 1234
    assert data["torch_version"] == torch.__version__
    assert data["pythonhashseed"] == os.environ.get("PYTHONHASHSEED")


def test_same_seed_gives_same_draws():
    """Seeding twice with one seed gives identical python, numpy and torch draws."""
    seed_everything(123)
    first = _draws()
    random.random(), np.random.rand(), torch.rand(1)  # move every RNG on
    seed_everything(123)
    assert _draws() == first


def test_different_seeds_give_different_draws():
    """Two seeds give different python, numpy and torch draws."""
    seed_everything(0)
    a = _draws()
    seed_everything(1)
    b = _draws()
    for key in a:
        assert a[key] != b[key], key


def test_numpy_integer_seed_accepted():
    """A numpy integer is a valid seed and seeds like the equal python int."""
    seed_everything(np.int64(7))
    a = _draws()
    seed_everything(7)
    assert _draws() == a


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "0", True])
def test_bad_seed_raises_naming_value(seed):
    """An out-of-range or non-int seed raises SeedError naming the value."""
    text = str(seed) if isinstance(seed, int) else repr(seed)
    with pytest.raises(SeedError, match=rf"seed {re.escape(text)} (is out of range|has type)"):
        seed_everything(seed)


def test_bad_seed_changes_nothing():
    """A refused seed leaves the RNGs as they were."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with pytest.raises(SeedError):
        seed_everything(-1)
    assert torch.equal(torch.rand(3), expected)


def test_seed_max_is_accepted():
    """The largest seed, 2**32-1, is valid."""
    assert seed_everything(SEED_MAX).seed == SEED_MAX


@pytest.mark.parametrize("threads", [0, True, -2, 1.0])
def test_bad_threads_raise(threads):
    """A non-positive or non-int thread count raises SeedError naming the value."""
    with pytest.raises(SeedError, match=rf"threads {re.escape(repr(threads))} is not a positive int"):
        seed_everything(0, threads=threads)


def test_rng_state_round_trip():
    """Draws after restoring a captured state equal the draws made right after capturing it."""
    gen = torch.Generator().manual_seed(99)
    seed_everything(3)
    random.gauss(0.0, 1.0)  # leave a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    assert np.random.get_state()[3] == 1
    state = capture_rng_state({"g": gen})
    expected = _draws(gen)
    _draws(gen)  # move every RNG further on
    restore_rng_state(state, {"g": gen})
    assert _draws(gen) == expected


def test_restore_missing_generator_raises():
    """Restoring a state with a named generator that is not passed raises SeedError naming it."""
    state = capture_rng_state({"loader": torch.Generator().manual_seed(1)})
    with pytest.raises(SeedError, match=r"\['loader'\].*not passed"):
        restore_rng_state(state, {"other": torch.Generator()})
    with pytest.raises(SeedError, match=r"\['loader'\]"):
        restore_rng_state(state)


def test_rng_state_survives_torch_save_weights_only(tmp_path):
    """The RngState dict loads with weights_only=True and restores the same draws."""
    gen = torch.Generator().manual_seed(42)
    seed_everything(11)
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    state = capture_rng_state({"g": gen})
    expected = _draws(gen)
    path = tmp_path / "rng.pt"
    torch.save(state.to_dict(), path)
    loaded = RngState.from_dict(torch.load(path, weights_only=True))
    seed_everything(12)
    gen.manual_seed(43)
    restore_rng_state(loaded, {"g": gen})
    assert _draws(gen) == expected


def test_derive_seed_is_order_sensitive():
    """derive_seed(0, 1) differs from derive_seed(1, 0), unlike seed + key."""
    assert derive_seed(0, 1) != derive_seed(1, 0)


def test_derive_seed_is_stable_and_keyed():
    """The same inputs give the same seed; a different key gives a different one."""
    assert derive_seed(5, "epoch", 3) == derive_seed(5, "epoch", 3)
    assert derive_seed(5, "epoch", 3) != derive_seed(5, "epoch", 4)


def test_derive_seed_in_range():
    """Derived seeds are valid seeds, in [0, 2**32-1], across many inputs and the extreme seed."""
    values = [derive_seed(s, k) for s in (0, 1, SEED_MAX) for k in range(200)]
    assert all(0 <= v <= SEED_MAX for v in values)
    assert max(values) >= 2**31  # uses the whole range, not a truncated half
    seed_everything(values[-1])  # accepted by the seed check


def test_derive_seed_rejects_bad_seed():
    """derive_seed checks its base seed like seed_everything."""
    with pytest.raises(SeedError, match=r"seed -1\b"):
        derive_seed(-1, 0)


@pytest.mark.parametrize("k", [7, 2**32 + 7])
def test_seed_worker_seeds_numpy_and_python_from_torch(k):
    """seed_worker seeds numpy and python from torch.initial_seed() mod 2**32."""
    np.random.seed(k % 2**32)
    random.seed(k % 2**32)
    expected = (np.random.rand(3).tolist(), random.random())
    np.random.seed(1000)
    random.seed(1000)
    torch.manual_seed(k)
    seed_worker(0)
    assert (np.random.rand(3).tolist(), random.random()) == expected
