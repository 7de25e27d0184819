"""The loops bench_ddp.py times in (c) and (d): a plain DDP loop, and a user's loop with ``reprokit.Run``
in reduction mode "ddp" or "canonical".

The plain loop does the Run-ddp loop's arithmetic bit for bit, by doing itself what ``Run`` does that
changes bits (the bench checks it on the final digests):

- threads and deterministic algorithms: ``seed_everything`` in reprokit/seeding.py (the worker pins
  one thread for every part of the bench already);
- ``torch.manual_seed(seed)`` before the model is built (DDP broadcasts rank 0's weights anyway);
- rank r > 0 re-seeds torch with ``rank_seed(seed, r)`` before step 0 (``RunStart._begin_at_zero``:
  its own dropout masks). The MLP has no dropout, so it changes no bit here; done to stay exact;
- ``run.loader``'s batches: pass 0 of epoch 0 of loader 0 shuffles with a generator seeded from
  ``derive_seed(seed, "loader", 0, 0, 0)`` and rank r takes its contiguous slice of each global
  batch (``_PassSampler`` in reprokit/runloader.py, ``shard_batch``); an incomplete last batch is
  dropped. For a TensorDataset without transforms the per-sample seeding draws nothing, and the
  batch is one gather per tensor, as here.

Imported by bench_ddp.py (this folder is on ``sys.path`` when it runs).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

import reprokit
from reprokit.digests import model_digest
from reprokit.distributed import World, rank_seed, shard_batch
from reprokit.seeding import derive_seed

SEED, LR = 3, 1e-3
KINDS = ("plain", "ddp", "canonical")  # the plain DDP loop, Run in mode "ddp", Run in mode "canonical"


@dataclass(frozen=True)
class Loop:
    seconds: float  # from a barrier before the epoch loop to a barrier after it (every rank's)
    whole: float  # Run() (the plain loop: its seeding) to finish() (its final digest)
    steps: int
    digest: str  # model_digest of the trained module
    hooks: dict[str, float] = field(default_factory=dict)  # run.hook_seconds; empty for the plain loop


def dataset(samples: int, n_in: int, n_out: int) -> TensorDataset:
    """A fixed synthetic classification set (run.loader digests it into each Run's manifest)."""
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(samples, n_in, generator=g)
    return TensorDataset(x, torch.randint(0, n_out, (samples,), generator=g))


def _sync(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()


def plain_loop(world: World, build: Callable[[], nn.Module], data: TensorDataset, global_batch: int) -> Loop:
    """One epoch of a user's DDP loop with Run's bits (see the module docstring), without Run."""
    gc.collect()
    began = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    net = build()
    ddp = DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    if world.rank:
        torch.manual_seed(rank_seed(SEED, world.rank))
    x, y = data.tensors
    _sync(world)
    start = time.perf_counter()
    shuffle = torch.Generator().manual_seed(derive_seed(SEED, "loader", 0, 0, 0))  # loader 0, epoch 0, pass 0
    order = torch.randperm(len(x), generator=shuffle)
    steps = len(x) // global_batch
    for b in range(steps):
        index = torch.tensor(shard_batch(order[b * global_batch:(b + 1) * global_batch].tolist(), world.rank,
                                         world.world_size))
        loss = F.cross_entropy(ddp(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(world)
    seconds = time.perf_counter() - start
    return Loop(seconds, time.perf_counter() - began, steps, model_digest(net))


def run_loop(world: World, build: Callable[[], nn.Module], data: TensorDataset, global_batch: int,
             run_dir: Path, micro_batches: int | None = None) -> Loop:
    """The same epoch with ``reprokit.Run``: digests and fingerprints every step (the defaults), no
    checkpoints, no progress bar, no ledger row; mode "canonical" when ``micro_batches`` is given."""
    gc.collect()
    began = time.perf_counter()
    run = reprokit.Run(run_dir, seed=SEED, config={"lr": LR, "batch_size": global_batch}, checkpoint_every=0,
                       progress=False, ledger=False, overrides=False,
                       reduction="canonical" if micro_batches else "ddp", micro_batches=micro_batches)
    net = build()
    model = net if micro_batches or world.world_size == 1 else DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    run.track(model=net, optimizer=opt)
    loader = run.loader(data, batch_size=global_batch, shuffle=True)
    _sync(world)
    start = time.perf_counter()
    for _ in run.epochs(1):
        for x, y in loader:
            if micro_batches:
                for mx, my in run.micro_batches(x, y):
                    loss = F.cross_entropy(net(mx), my)
                    loss.backward()
            else:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
            opt.step()
            run.step(loss=loss)
    _sync(world)
    seconds = time.perf_counter() - start
    hooks, steps, digest = dict(run.hook_seconds), run.global_step, model_digest(net)
    run.finish()
    return Loop(seconds, time.perf_counter() - began, steps, digest, hooks)
