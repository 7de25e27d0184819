"""``run.loader``: a DataLoader whose batches and augmentations are a pure function of (seed, epoch).

The order of a pass comes from a generator seeded with (seed, loader, epoch, pass); the position
is a batch counter, so a resume starts at batch b without drawing the batches before it. Each
sample is fetched with torch's and numpy's global RNGs seeded from (that pass's seed, its index),
and python's ``random`` from (that pass's seed, the batch's first index) once per batch (a batch
is always fetched whole, by one process, so this is as exact); a stream the dataset never draws
from is watched instead of seeded (``_SeededDataset``). A random crop or flip in ``__getitem__``
thus gives the same bits in the main process or in any worker, with any ``num_workers``, before
and after a resume. In the main process the three states are put back after each batch, so the
training's own RNG streams (dropout) are untouched by the fetch; a worker's need not be.

Under a process group of N > 1 ranks (read from torch.distributed when the loader is built, its
length taken and each pass begun) ``batch_size`` is the global batch G: each pass's one order is cut
into global batches of G, an incomplete last one is dropped, and rank r gets its contiguous slice of
each (``distributed.shard_batch``), so a global batch is the same sample set at every N; a G that N
does not divide is refused. The position stays a global batch counter, the same at every rank and
every N, so a run resumed at another world size continues at the same global batch. The samples'
seeds are (pass seed, index) as before, and python's ``random`` is seeded per sample too (a rank no
longer fetches the global batch whole); at N == 1 everything is as without a group.

What a user's DataLoader (or a dataset with DataLoader arguments) gives it, and what is refused,
is :mod:`reprokit.loaderoptions`.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from reprokit.distributed import check_divisible, shard_batch
from reprokit.errors import DistributedError
from reprokit.globalrng import FetchGuard, GlobalStreams
from reprokit.seeding import SEED_MAX, derive_seed

_STREAMS = frozenset(GlobalStreams.NAMES)
_BATCH = 0x9E3779B9  # sets python's per-batch seed apart from the first sample's torch/numpy seed


_PAIR = struct.Struct("<QQ")


def _sample_seed(pass_seed: int, index: int) -> int:
    return xxhash.xxh3_64_intdigest(_PAIR.pack(pass_seed, index)) & SEED_MAX


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group in force; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SeededDataset(Dataset[Any]):
    """Fetches sample ``(pass_seed, index)`` of the wrapped dataset with the global RNGs it draws
    from seeded from both, and puts them back afterwards.

    Seeding numpy's global stream costs more than a small augmentation (python's too), so a stream
    is seeded only once the dataset has been seen to draw from it: every batch is fetched with the
    streams in ``seeded`` seeded and the others watched (a fingerprint of their state before the
    batch, compared after it: ``globalrng.FetchGuard``). A batch that drew from a watched stream
    is fetched again with that stream seeded too, and from then on it is seeded in this process.
    Each sample is thus fetched as if every stream it draws from had been seeded: the same bits in
    the main process and in any worker, whenever each learnt which streams to seed. The cost: the
    first batch that draws from a stream is fetched twice in each process that fetches.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset
        # a TensorDataset's __getitem__ draws no randomness: nothing to seed, nothing to put back;
        # with the default collate its batch is one gather per tensor (``gather``), not a stack
        self._plain = type(dataset) is TensorDataset
        self.gather = False
        self.seeded: frozenset[str] = frozenset()
        # python's random per sample, not per batch: under N > 1 ranks a rank fetches a slice of the
        # global batch, whose first index is not the global batch's
        self.python_each = False
        self._guard: FetchGuard | None = None  # its copies of the streams serve the next batch

    def __getstate__(self) -> dict[str, Any]:  # to a worker: the copies stay here
        return {**self.__dict__, "_guard": None}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        if self.gather:
            assert isinstance(self.dataset, TensorDataset)
            index = torch.tensor([i for _, i in keys])
            return [[t[index] for t in self.dataset.tensors]]  # what default_collate would stack
        if self._plain:
            return [self.dataset[index] for _, index in keys]
        guard, self._guard = self._guard or FetchGuard(), None  # taken: a nested fetch has its own
        guard.before()  # in a worker too: the watch needs it
        touched = self.seeded  # the streams this fetch may have moved, to put back
        try:
            out = self._fetch(keys)
            drawn = guard.drawn(_STREAMS - self.seeded)
            touched = self.seeded | drawn
            if drawn:
                self.seeded = touched
                guard.restore(touched)
                out = self._fetch(keys)
            return out
        except BaseException:
            touched = _STREAMS  # an error mid-fetch: whatever drew, all go back
            raise
        finally:
            guard.restore(touched)
            self._guard = guard

    def _fetch(self, keys: list[tuple[int, int]]) -> list[Any]:
        seeded = self.seeded
        python_each = "python" in seeded and self.python_each
        if "python" in seeded and not python_each:
            random.seed(_sample_seed(keys[0][0], keys[0][1]) ^ _BATCH)
        torch_seeded, numpy_seeded = "torch" in seeded, "numpy" in seeded
        dataset = self.dataset
        if not (torch_seeded or numpy_seeded or python_each):
            return [dataset[index] for _, index in keys]
        out = []
        generator, digest, pack = torch.default_generator, xxhash.xxh3_64_intdigest, _PAIR.pack
        for pass_seed, index in keys:
            seed = digest(pack(pass_seed, index)) & SEED_MAX  # _sample_seed, inlined: once per sample
            if python_each:
                random.seed(seed ^ _BATCH)
            if torch_seeded:
                generator.manual_seed(seed)
            if numpy_seeded:
                np.random.seed(seed)
            out.append(dataset[index])
        return out


def _collated(batch: list[Any]) -> Any:
    """The collate function of a gathered TensorDataset batch: it is collated already."""
    return batch[0]


class _PassSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of the (global) batches of one pass, from batch ``start`` on, as lists of
    ``(pass_seed, index)``."""

    def __init__(self, size: int, batch_size: int, shuffle: bool, drop_last: bool) -> None:
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.pass_seed, self.aug_seed, self.start = 0, 0, 0  # the order's and the samples' seeds
        self.rank, self.world_size = 0, 1
        self.whole_only = False  # an incomplete last batch is dropped (N > 1 ranks, or micro-batches)
        self.order: list[int] = []

    def batches(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        # N > 1 ranks (or M micro-batches) cannot split an incomplete global batch evenly: it is dropped
        return full + (1 if rest and not self.drop_last and not self.whole_only else 0)

    def __len__(self) -> int:
        return self.batches() - self.start

    def indices(self, batch: int) -> list[int]:
        """This rank's sample indices of batch ``batch`` of the pass being iterated."""
        whole = self.order[batch * self.batch_size : (batch + 1) * self.batch_size]
        return whole if self.world_size == 1 else shard_batch(whole, self.rank, self.world_size)

    def begin_pass(self) -> torch.Tensor:
        """The pass's order (from ``pass_seed``), kept for ``indices``; returned as a tensor."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.pass_seed)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        self.order = order.tolist()
        return order

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self.begin_pass()
        seed = self.aug_seed
        for b in range(self.start, self.batches()):
            yield [(seed, i) for i in self.indices(b)]


class RunLoader:
    """What ``run.loader`` returns: iterate it like the DataLoader it replaces.

    ``dataset`` and ``batch_size`` are the user's (the global batch under N > 1 ranks); ``len()``
    is the (global) batches of a whole pass.
    """

    def __init__(self, owner: Any, index: int, dataset: Dataset[Any], *, batch_size: int, shuffle: bool,
                 drop_last: bool, options: dict[str, Any], digest: str | None) -> None:
        self._owner, self.index, self.digest = owner, index, digest
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.num_workers = int(options.get("num_workers", 0))
        self._sampler = _PassSampler(len(dataset), batch_size, shuffle, drop_last)  # type: ignore[arg-type]
        self._generator = torch.Generator()  # DataLoader draws its workers' base seed from it
        seeded = self._seeded = _SeededDataset(dataset)
        if type(dataset) is TensorDataset and options.get("collate_fn") in (None, default_collate):
            seeded.gather, options = True, {**options, "collate_fn": _collated}
        self._loader: DataLoader[Any] = DataLoader(
            seeded, batch_sampler=self._sampler, generator=self._generator, **options)
        # a gathered TensorDataset fetched in this process needs none of DataLoader's machinery
        self._direct = seeded.gather and not self.num_workers and not options.get("pin_memory")
        # position: the epoch and pass of the latest iteration, and batches it has yielded
        self.epoch, self.passes, self.batch, self.active = -1, 0, 0, False
        self._resume_at: tuple[int, int, int] | None = None  # (epoch, pass, batch) of a resumed run
        self._shard()

    def __len__(self) -> int:
        self._shard()
        return self._sampler.batches()

    def _shard(self) -> None:
        """Take this rank's share of each global batch under the process group now in force."""
        rank, world_size = _world()
        micro = getattr(self._owner, "micro_batch_count", None)  # reduction='canonical'
        if world_size > 1 or micro is not None:
            try:
                check_divisible(self.batch_size, world_size, micro)
            except DistributedError as e:
                raise DistributedError(f"run.loader: batch_size is the global batch, split over the "
                                       f"ranks{' and micro-batches' if micro else ''}: {e}") from None
        self._sampler.rank, self._sampler.world_size = rank, world_size
        self._sampler.whole_only = world_size > 1 or micro is not None
        # canonical mode: the same per-sample seeding at every world size, one process included
        self._seeded.python_each = world_size > 1 or micro is not None

    def __getattr__(self, name: str) -> Any:
        # anything else a script reads off its DataLoader (num_workers, collate_fn, pin_memory, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "passes": self.passes, "batch": self.batch, "active": int(self.active)}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.passes = int(state["epoch"]), int(state["passes"])
        self.batch, self.active = 0, False
        if state["active"]:  # the pass that was under way is iterated again, from its batch
            self.passes -= 1
            self._resume_at = (self.epoch, self.passes, int(state["batch"]))

    def __iter__(self) -> Iterator[Any]:
        self._owner._begin()  # the run begins at the first of run.epochs(), an iter() or run.step()
        self._shard()  # after _begin, which may have joined the process group
        epoch = self._owner.epoch
        if epoch != self.epoch:
            self.epoch, self.passes = epoch, 0
        this_pass = self.passes
        self.passes += 1
        start = 0
        resuming = self._resume_at is not None and self._resume_at[:2] == (epoch, this_pass)
        if resuming:
            assert self._resume_at is not None
            start, self._resume_at = self._resume_at[2], None
        sources = self._owner.sources
        pass_seed = derive_seed(sources.data_order, "loader", self.index, epoch, this_pass)
        # the per-sample seeds: the same value as the order's for one int seed
        aug_seed = derive_seed(sources.augmentation, "loader", self.index, epoch, this_pass)
        self._sampler.pass_seed, self._sampler.aug_seed, self._sampler.start = pass_seed, aug_seed, start
        self._generator.manual_seed(pass_seed)
        iterator = self._gathered(start) if self._direct else iter(self._loader)
        self.batch, self.active = start, True
        if resuming:
            # the rest of the state goes back only now: whatever the script did since the epoch
            # began (an iter() of another loader draws from the global RNG) happened before the
            # checkpoint in the uninterrupted run too
            self._owner._restore_now()
        return self._batches(iterator)

    def _gathered(self, start: int) -> Iterator[Any]:
        """What the DataLoader yields for a TensorDataset with the default collate and no workers
        (one gather per tensor a batch, the same bits), without its fetcher and sampler protocol."""
        assert isinstance(self.dataset, TensorDataset)
        tensors, bs, sampler = self.dataset.tensors, self.batch_size, self._sampler
        order = sampler.begin_pass()
        for b in range(start, sampler.batches()):
            whole = sampler.world_size == 1
            index = order[b * bs : (b + 1) * bs] if whole else torch.tensor(sampler.indices(b))
            yield [t[index] for t in tensors]

    def _batches(self, iterator: Iterator[Any]) -> Iterator[Any]:
        owner = self._owner
        for batch in iterator:
            if owner.at_end:  # the run took its steps (Run(steps=...)): the epoch ends here
                break
            if owner._recorder.recording:  # the next step is a recorded one: what goes into it
                owner._recorder.yielded(self.index, self._sampler.indices(self.batch), batch)
            self.batch += 1
            yield batch
        self.active = False
