"""Tests for reprokit.data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reprokit.data import (
    DATASETS,
    EpochBatchSampler,
    batches_per_epoch,
    load_dataset,
    make_loader,
)
from reprokit.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DIGITS_SIZE = 1797  # scikit-learn's bundled digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_sizes_and_classes(digits):
    """Digits has 1,797 samples in all, 10 classes, and 1x8x8 images."""
    assert len(digits.x_train) + len(digits.x_val) == DIGITS_SIZE
    assert len(digits.y_train) == len(digits.x_train) and len(digits.y_val) == len(digits.x_val)
    assert digits.num_outputs == 10 and digits.task == "classification"
    labels = torch.cat([digits.y_train, digits.y_val])
    assert labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert digits.input_shape == (1, 8, 8)
    assert digits.x_val.shape[1:] == (1, 8, 8)


def test_digits_scaled_to_unit_interval(digits):
    """Digit pixels lie in [0, 1] and use the whole range."""
    x = torch.cat([digits.x_train, digits.x_val])
    assert x.dtype == torch.float32
    assert x.min().item() == 0.0 and x.max().item() == 1.0


def test_digits_split_sizes(digits):
    """The validation set holds round(n * val_fraction) samples, training the rest."""
    assert len(digits.x_val) == round(DIGITS_SIZE * 0.2)
    assert len(digits.x_train) == DIGITS_SIZE - round(DIGITS_SIZE * 0.2)


def test_digits_split_is_a_partition(digits):
    """Train and validation together hold every (image, label) of the source exactly once."""
    from sklearn.datasets import load_digits

    source = load_digits()
    expected = sorted(
        (*row, label) for row, label in zip(source.data.tolist(), source.target.tolist(), strict=True)
    )
    x = torch.cat([digits.x_train, digits.x_val]).reshape(DIGITS_SIZE, -1) * 16.0
    y = torch.cat([digits.y_train, digits.y_val])
    got = sorted((*row, label) for row, label in zip(x.tolist(), y.tolist(), strict=True))
    assert got == expected


def test_digits_digest_stable_across_loads(digits):
    """Loading twice gives the same digest and the same tensors."""
    again = load_dataset("digits")
    assert again.digest == digits.digest
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_val, digits.y_val)


def test_digits_digest_stable_across_processes(digits):
    """A fresh Python process computes the same digest."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "from reprokit.data import load_dataset; print(load_dataset('digits').digest)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True,
        timeout=120,
    )
    assert out.stdout.strip() == digits.digest


def test_digest_changes_with_split_seed(digits):
    """Another split seed gives another split and another digest."""
    other = load_dataset("digits", split_seed=1)
    assert other.digest != digits.digest
    assert not torch.equal(other.y_val, digits.y_val)


def test_digest_changes_with_val_fraction(digits):
    """Another validation fraction gives another digest."""
    assert load_dataset("digits", val_fraction=0.25).digest != digits.digest


def test_regression_shapes():
    """Regression has 800/200 samples of 10 features and a 1-wide target."""
    data = load_dataset("regression")
    assert data.task == "regression" and data.num_outputs == 1
    assert data.x_train.shape == (800, 10) and data.y_train.shape == (800, 1)
    assert data.x_val.shape == (200, 10) and data.y_val.shape == (200, 1)
    assert data.input_shape == (10,)


def test_regression_deterministic_in_split_seed():
    """The synthetic set is the same for a split seed and different for another."""
    a, b, c = load_dataset("regression"), load_dataset("regression"), load_dataset("regression", split_seed=1)
    assert a.digest == b.digest and torch.equal(a.x_train, b.x_train)
    assert a.digest != c.digest


def test_unknown_dataset_lists_choices():
    """An unknown dataset name raises DataError naming it and listing the choices."""
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'.*'digits', 'digits_0_4', 'digits_5_9', "
                                        r"'regression'"):
        load_dataset("mnist")
    assert set(DATASETS) == {"digits", "digits_0_4", "digits_5_9", "regression"}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(fraction):
    """A validation fraction outside (0, 1) raises DataError naming it."""
    with pytest.raises(DataError, match=rf"val_fraction {fraction} is outside \(0, 1\)"):
        load_dataset("digits", val_fraction=fraction)


def _epochs(loader, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for e in range(epochs):
        loader.sampler.set_epoch(e)
        batches.extend(loader)
    return batches


@pytest.fixture(scope="module")
def small():
    """200 digits: enough for several batches, small enough that worker start-up dominates."""
    data = load_dataset("digits")
    return data.x_train[:200], data.y_train[:200]


def test_loader_same_batches_with_and_without_workers(small):
    """num_workers=0 and num_workers=2 give bitwise-identical batches over two epochs."""
    x, y = small
    serial = _epochs(make_loader(x, y, batch_size=32, seed=3, num_workers=0))
    loader = make_loader(x, y, batch_size=32, seed=3, num_workers=2)
    parallel = _epochs(loader)
    del loader  # stop the persistent workers
    assert len(serial) == len(parallel) == 2 * batches_per_epoch(200, 32)
    for (xs, ys), (xp, yp) in zip(serial, parallel, strict=True):
        assert torch.equal(xs, xp) and torch.equal(ys, yp)


def test_loader_batches_are_rows_of_the_data(small):
    """Each batch pairs images with their own labels."""
    x, y = small
    xb, yb = next(iter(make_loader(x, y, batch_size=16, seed=0)))
    for xi, yi in zip(xb, yb, strict=True):
        (rows,) = torch.where((x == xi).flatten(1).all(dim=1))
        assert yi.item() in y[rows].tolist()


def test_loader_different_seeds_different_orders(small):
    """Two seeds give different batch orders."""
    x, y = small
    a = _epochs(make_loader(x, y, batch_size=32, seed=0), epochs=1)
    b = _epochs(make_loader(x, y, batch_size=32, seed=1), epochs=1)
    assert not torch.equal(torch.cat([xb for xb, _ in a]), torch.cat([xb for xb, _ in b]))


def test_sampler_epochs_differ_and_repeat():
    """Epoch 0 and epoch 1 shuffle differently; an epoch replays identically."""
    sampler = EpochBatchSampler(100, 10, seed=0)
    sampler.set_epoch(0)
    e0 = list(sampler)
    sampler.set_epoch(1)
    e1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == e0
    assert e0 != e1


@pytest.mark.parametrize("start", [0, 1, 4, 6, 7])
def test_sampler_resume_yields_tail(start):
    """set_epoch(e, start=k) yields exactly the full epoch's batches from batch k on."""
    sampler = EpochBatchSampler(50, 8, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=start)
    tail = list(sampler)
    assert tail == full[start:]
    assert len(sampler) == len(full) - start


def test_loader_resume_mid_epoch(small):
    """A loader resumed at batch k gives the same tensors as batches k.. of the full epoch."""
    x, y = small
    loader = make_loader(x, y, batch_size=32, seed=4)
    loader.sampler.set_epoch(1)
    full = list(loader)
    loader.sampler.set_epoch(1, start=3)
    tail = list(loader)
    assert len(tail) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(("size", "batch_size"), [(10, 4), (100, 10), (7, 1), (3, 5)])
def test_every_epoch_covers_every_index_once(size, batch_size):
    """Each epoch visits every training index exactly once, in batches of batch_size."""
    sampler = EpochBatchSampler(size, batch_size, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(size))
        assert all(len(b) == batch_size for b in batches[:-1])
        assert len(batches) == len(sampler) == batches_per_epoch(size, batch_size)


def test_last_batch_may_be_short():
    """Nothing is dropped: 10 samples in batches of 4 make 3 batches, the last of 2."""
    assert batches_per_epoch(10, 4) == 3
    assert batches_per_epoch(12, 4) == 3
    sampler = EpochBatchSampler(10, 4, seed=0)
    assert [len(b) for b in sampler] == [4, 4, 2]
