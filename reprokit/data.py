"""Data: real bundled digits and a synthetic regression set, each with a content digest, and a
DataLoader whose batch order depends only on (seed, epoch), with or without worker processes.

The batch order is computed, not replayed: epoch ``e`` of seed ``s`` always shuffles with a
generator seeded from ``(s, e)``, so any batch of any epoch can be reached without drawing the
ones before it (the checkpoint issue resumes mid-epoch this way).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import xxhash
from torch.utils.data import DataLoader, Dataset, Sampler

from reprokit.digests import tensor_digest
from reprokit.errors import DataError
from reprokit.factories import is_factory, resolve
from reprokit.seeding import derive_seed, make_generator, seed_worker

DATASETS = ("digits", "digits_0_4", "digits_5_9", "regression")
# transfer pair: pretrain on digits 0-4, fine-tune on 5-9 (relabelled 0-4); same pixels, new classes
DIGIT_SUBSETS = {"digits_0_4": range(0, 5), "digits_5_9": range(5, 10)}
# the essay's MLP example: 1,000 samples of 10 features; unlike the essay's y = randn (nothing
# to learn), the target here is a noisy linear function, so a model's fit means something
REGRESSION_SIZE = 1000
REGRESSION_FEATURES = 10
REGRESSION_NOISE = 0.1


@dataclass(frozen=True)
class DatasetBundle:
    """One dataset split into train and validation tensors, with its content digest."""

    name: str
    task: str  # "classification" or "regression"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_outputs: int  # classes for classification, target width for regression
    digest: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(
    name: str, *, split_seed: int = 0, val_fraction: float = 0.2, train_limit: int | None = None
) -> DatasetBundle:
    """Load a bundled dataset and split it with a generator seeded by ``split_seed``.

    Args:
        name: ``"digits"`` (scikit-learn's 1,797 real 8x8 handwritten digits, as 1x8x8 images
            scaled to [0, 1]), ``"digits_0_4"`` / ``"digits_5_9"`` (only those digits, labelled
            0-4: the upstream and downstream halves of a transfer experiment) or ``"regression"``
            (synthetic, 1,000 x 10 features).
        split_seed: seeds the train/validation permutation (and the synthetic data).
        val_fraction: share of samples held out for validation, in (0, 1).
        train_limit: keep only the first ``train_limit`` training samples of the (shuffled) split,
            for a low-data task; the validation set stays whole. ``None`` keeps them all.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is outside (0, 1); pass e.g. 0.2")
    if name == "digits":
        x, y, task, outputs = *_digits(), "classification", 10
    elif name in DIGIT_SUBSETS:
        digits = DIGIT_SUBSETS[name]
        x, y = _digits()
        keep = (y >= digits.start) & (y < digits.stop)
        x, y, task, outputs = x[keep], y[keep] - digits.start, "classification", len(digits)
    elif name == "regression":
        x, y = _regression(split_seed)
        task, outputs = "regression", 1
    elif is_factory(name):
        x, y, task, outputs = _from_factory(name)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)} or a factory "
                        "'package.module:function' returning (x, y)")
    order = torch.randperm(len(x), generator=make_generator(split_seed))
    n_val = max(1, round(len(x) * val_fraction))
    val, tr = order[:n_val], order[n_val:]
    if train_limit is not None:
        if not 1 <= train_limit <= len(tr):
            raise DataError(
                f"train_limit {train_limit} is outside [1, {len(tr)}], the training samples of "
                f"{name!r}; pass at most {len(tr)}, or None for all of them"
            )
        tr = tr[:train_limit]
    parts = {"x_train": x[tr], "y_train": y[tr], "x_val": x[val], "y_val": y[val]}
    h = xxhash.xxh3_128(f"{name}\0{split_seed}\0{val_fraction}\0".encode())
    for key, t in parts.items():
        h.update(tensor_digest(key, t).encode())
    return DatasetBundle(name=name, task=task, num_outputs=outputs, digest=h.hexdigest(), **parts)


def _from_factory(name: str) -> tuple[torch.Tensor, torch.Tensor, str, int]:
    """The user's ``(x, y)``: integer targets are classes, float targets a regression."""
    factory = resolve("dataset", name)
    try:
        x, y = factory()
    except (TypeError, ValueError) as e:
        raise DataError(f"dataset factory {name!r} must return (x, y), tensors or arrays ({e})") from e
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if len(x) != len(y) or len(x) < 2:
        raise DataError(f"dataset factory {name!r} returned {len(x)} inputs and {len(y)} targets; "
                        "return as many of each, at least 2")
    if y.is_floating_point():
        y = y.reshape(len(y), -1).float()
        return x.float(), y, "regression", y.shape[1]
    return x.float(), y.long(), "classification", int(y.max()) + 1


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def _regression(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = make_generator(seed)
    x = torch.randn(REGRESSION_SIZE, REGRESSION_FEATURES, generator=g)
    w = torch.randn(REGRESSION_FEATURES, 1, generator=g)
    y = x @ w + REGRESSION_NOISE * torch.randn(REGRESSION_SIZE, 1, generator=g)
    return x, y


class _Batches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Indexed by a whole batch of indices: one tensor gather per batch, not one per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(idx)
        return self.x[index], self.y[index]


class EpochBatchSampler(Sampler[list[int]]):
    """Yields the batches of epoch ``epoch`` from batch ``start`` on; order depends only on
    (seed, epoch), so it is the same in the main process, in workers and after a resume."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return batches_per_epoch(self.size, self.batch_size) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = make_generator(derive_seed(self.seed, "epoch", self.epoch))
        order = torch.randperm(self.size, generator=g).tolist()
        for b in range(self.start, batches_per_epoch(self.size, self.batch_size)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


def batches_per_epoch(size: int, batch_size: int) -> int:
    """Batches in one epoch; the last one may be short (nothing is dropped)."""
    return -(-size // batch_size)


def make_loader(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int, num_workers: int = 0
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader over ``(x, y)`` whose batches are the same for a seed with any ``num_workers``.

    Call ``loader.sampler.set_epoch(e)`` before each epoch.
    """
    sampler = EpochBatchSampler(len(x), batch_size, seed)
    return DataLoader(
        _Batches(x, y),
        sampler=sampler,
        batch_size=None,  # the sampler yields whole batches
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers else None,
        generator=make_generator(seed),
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context() if num_workers else None,
    )


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Fork workers where the platform can: they start in milliseconds, where a spawned worker
    re-imports torch (seconds). A process started by spawn (an audit worker) would otherwise pass
    spawn on to its DataLoader. torch pins each worker to one thread, so no OpenMP pool is
    used after the fork."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None
