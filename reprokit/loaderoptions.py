"""What ``run.loader`` takes: a user's existing DataLoader, taken over (its dataset, batch size,
shuffle, drop_last, collate function, workers and their settings), or a dataset with DataLoader
keyword arguments. What cannot be made exact is refused with the reason: an IterableDataset (no
index to seed or to resume at), a custom sampler or batch sampler.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from reprokit.errors import DataError

# DataLoader arguments taken over from a user's loader, or accepted by run.loader(dataset, ...)
_PASSED = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
           "multiprocessing_context", "prefetch_factor", "persistent_workers", "pin_memory_device",
           "in_order")
_REFUSED = {
    "sampler": "a custom sampler decides the order itself, so reprokit cannot compute it from (seed, "
               "epoch) or start it at a batch; pass shuffle=True/False instead",
    "batch_sampler": "a custom batch sampler decides the order itself; pass batch_size, shuffle and "
                     "drop_last instead",
    "generator": "the order's generator is reprokit's (seeded from seed, epoch and pass); drop it",
}


def loader_arguments(source: DataLoader[Any] | Dataset[Any], kwargs: dict[str, Any]
                     ) -> tuple[Dataset[Any], int, bool, bool, dict[str, Any]]:
    """(dataset, batch_size, shuffle, drop_last, DataLoader options) from a user's DataLoader or a
    dataset with DataLoader keyword arguments; refuses what cannot be made exact."""
    if isinstance(source, DataLoader):
        if kwargs:
            raise DataError(f"run.loader got a DataLoader and keyword arguments {sorted(kwargs)}; pass "
                            "either an existing DataLoader or a dataset with DataLoader arguments")
        return _from_loader(source)
    for key, why in _REFUSED.items():
        if kwargs.get(key) is not None:
            raise DataError(f"run.loader: {key}= cannot be made exact: {why}")
    unknown = sorted(set(kwargs) - {*_PASSED, "batch_size", "shuffle", "drop_last", *_REFUSED})
    if unknown:
        raise DataError(f"run.loader: unknown DataLoader argument(s) {unknown}; pass {sorted(_PASSED)}, "
                        "batch_size, shuffle or drop_last")
    _check_dataset(source)
    batch_size = kwargs.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"run.loader: batch_size {batch_size!r} must be an int >= 1")
    options = {k: kwargs[k] for k in _PASSED if k in kwargs}
    return source, batch_size, bool(kwargs.get("shuffle", False)), bool(kwargs.get("drop_last", False)), \
        options


def _from_loader(loader: DataLoader[Any]) -> tuple[Dataset[Any], int, bool, bool, dict[str, Any]]:
    _check_dataset(loader.dataset)
    if loader.batch_size is None:
        raise DataError("run.loader: a DataLoader with batch_size=None (or a custom batch_sampler) "
                        "cannot be made exact; build it with batch_size, shuffle and drop_last")
    batch_sampler = loader.batch_sampler
    sampler = batch_sampler.sampler if isinstance(batch_sampler, BatchSampler) else None
    if type(batch_sampler) is not BatchSampler or type(sampler) not in (RandomSampler, SequentialSampler):
        name = type(sampler if type(batch_sampler) is BatchSampler else batch_sampler).__name__
        raise DataError(f"run.loader: the DataLoader's {name} decides the order itself, so reprokit "
                        "cannot compute it from (seed, epoch) or start it mid-epoch; build the loader "
                        "with shuffle=True/False instead of a custom sampler")
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
        raise DataError("run.loader: a RandomSampler with replacement or num_samples cannot be taken "
                        "over; build the loader with shuffle=True")
    options: dict[str, Any] = {
        "num_workers": loader.num_workers, "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory,
        "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers:
        options["prefetch_factor"] = loader.prefetch_factor
    return loader.dataset, loader.batch_size, isinstance(sampler, RandomSampler), loader.drop_last, options


def _check_dataset(dataset: Any) -> None:
    if isinstance(dataset, IterableDataset):
        raise DataError(
            f"run.loader: an IterableDataset ({type(dataset).__name__}) has no index, so reprokit can "
            "neither seed its samples nor start it mid-epoch; pass a map-style Dataset (with __len__ "
            "and __getitem__)"
        )
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DataError(f"run.loader: {type(dataset).__name__} is not a map-style Dataset (it needs "
                        "__len__ and __getitem__)")


def with_workers(options: dict[str, Any], num_workers: int | None) -> dict[str, Any]:
    """``options`` with ``num_workers`` overridden (``REPROKIT_NUM_WORKERS``); worker-only options
    are dropped for 0 workers, which DataLoader refuses otherwise."""
    if num_workers is None:
        return options
    out = {**options, "num_workers": num_workers}
    if num_workers == 0:
        out.pop("prefetch_factor", None)
        out["persistent_workers"] = False
    return out
