"""A :class:`reprokit.Run` under ``torchrun``: the process group, the ranks' run directories, and what
the ranks must agree on (how the directory opened, which step a relaunch continues from, when a
time-based checkpoint is due, whether their parameters still match).

Rank 0 owns the run directory as a single process does; rank r > 0 runs the same machinery in
``RUN_DIR/ranks/rank-R`` (no ledger row, no lock, no progress bar), so each rank's digests, metrics
and RNG state are recorded and resumed with the single-process code. Reduction mode ``"ddp"``
(DDP's all-reduce) is bitwise repeatable at one world size only, so this increment resumes at the
world size the run started with and refuses another (resharding goes through DCP, a later step).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from reprokit.distributed import World, all_equal_to_rank0, init_process_group, nccl_env, world_from_env
from reprokit.errors import DistributedError
from reprokit.runresume import RunFinished

__all__ = ["RANKS_DIR", "agree_step", "agreed_step", "due_on_rank0", "join_world", "manifest_entry",
           "open_in_rank_order", "rank_path", "replica_mismatches", "stop_signal"]

RANKS_DIR = "ranks"  # RUN_DIR/ranks/rank-R: rank R's private run directory (readers skip it)
PROCESS_GROUP_TIMEOUT_S = 120.0  # a stalled rank fails the job in 2 minutes, not torch's 30

T = TypeVar("T")


def join_world() -> World:
    """The world this process is in: a group the user made is accepted; torchrun's variables with
    WORLD_SIZE > 1 create one (gloo on CPU, NCCL on CUDA); otherwise one process, no group."""
    if dist.is_available() and dist.is_initialized():
        return init_process_group()  # joins it; initialized_here=False, so the user keeps its teardown
    if world_from_env().world_size > 1:
        return init_process_group(PROCESS_GROUP_TIMEOUT_S)
    return world_from_env()


def rank_path(path: Path, world: World) -> Path:
    """Where rank ``world.rank`` records its run: the run directory for rank 0, its own below it else."""
    return path if world.rank == 0 else path / RANKS_DIR / f"rank-{world.rank}"


def manifest_entry(world: World, threads: int | None, dropout_seed: int | None, reduction: str = "ddp",
                   canonical: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest's ``distributed`` entry; None for one process in ddp mode (the manifest is then
    as before). Canonical mode is recorded at every world size, one process included: it decides
    the bits (``canonical``: the micro-batch count and the block this rank owns)."""
    if world.world_size == 1 and canonical is None:
        return None
    entry: dict[str, Any] = {
        "backend": world.backend, "world_size": world.world_size, "rank": world.rank,
        "threads_per_rank": threads, "reduction": reduction, "rank_dirs": f"{RANKS_DIR}/rank-R",
        # rank r > 0 re-seeds torch before step 0 so the ranks draw different dropout masks
        # (in canonical mode dropout draws from each micro-batch's own stream instead)
        "dropout_reseeded": dropout_seed,
        **(canonical or {}),
    }
    if world.backend == "nccl":
        entry["nccl_env"] = nccl_env()
    return entry


def open_in_rank_order(world: World, opener: Callable[[], T], close: Callable[[T], None]) -> T:
    """Rank 0 opens its run directory first (it may refuse the relaunch or find the run finished:
    every rank then exits the same way), then the others open theirs; a rank that fails fails all."""
    if world.world_size == 1:
        return opener()
    opened, error = _attempt(opener) if world.rank == 0 else (None, None)
    first = [_outcome(error)]
    dist.broadcast_object_list(first, src=0)
    if error is not None:
        raise error
    if first[0] is not None:
        raise _again(*first[0], "rank 0")
    if world.rank != 0:
        opened, error = _attempt(opener)
    outcomes: list[tuple[str, str] | None] = [None] * world.world_size
    dist.all_gather_object(outcomes, _outcome(error))
    if error is not None:
        raise error
    bad = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if bad:
        assert opened is not None
        close(opened)
        raise _again(*bad[0][1], f"rank {bad[0][0]}")
    assert opened is not None
    return opened


def _attempt(opener: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return opener(), None
    except (RunFinished, Exception) as e:  # any refusal: the other ranks must not wait for this one
        return None, e


def _outcome(error: BaseException | None) -> tuple[str, str] | None:
    if error is None:
        return None
    if isinstance(error, RunFinished):
        return "finished", error.message
    return "error", f"{type(error).__name__}: {error}"


def _again(kind: str, message: str, where: str) -> BaseException:
    if kind == "finished":
        return RunFinished(message)
    return DistributedError(f"{where} could not open its run directory ({message}); this rank stops too")


def agree_step(world: World, chosen: T | None, step_of: Callable[[T], int],
               older: Callable[[T, int], T | None]) -> T | None:
    """The checkpoint every rank continues from: each rank's newest valid one, then, while the ranks
    disagree, a rank newer than the oldest falls back to its newest at or below that step (``older``)
    until all hold the same step (0, start over, when some rank has none). A rank new to the run
    directory takes part through :func:`agreed_step` instead."""
    while True:
        mine = step_of(chosen) if chosen is not None else 0
        low, high = _bounds(mine, -mine)
        if low == high:
            return chosen if low else None
        if chosen is not None and mine > low:
            chosen = older(chosen, low)


def agreed_step(world: World) -> int:
    """For a rank whose directory is new (the world grew since the run started): the step the
    other ranks agree on in :func:`agree_step`, without a vote; 0 when no rank holds a run."""
    while True:
        low, high = _bounds(_NO_VOTE, 0)
        if low == _NO_VOTE:
            return 0
        if low == high:
            return low


_NO_VOTE = 2**62  # above any step: a rank without a vote does not pull the minimum down


def _bounds(low: int, minus_high: int) -> tuple[int, int]:
    bounds = torch.tensor([low, minus_high], dtype=torch.int64)
    dist.all_reduce(bounds, op=dist.ReduceOp.MIN)
    return int(bounds[0]), -int(bounds[1])


def due_on_rank0(due: bool) -> bool:
    """Rank 0's answer to "is a time-based checkpoint due?", on every rank: the ranks' clocks differ,
    their checkpoint steps must not."""
    flag = torch.tensor([int(due)], dtype=torch.int64)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def stop_signal(signum: int | None) -> int | None:
    """The stop signal any rank received (SIGTERM/SIGINT reach one rank, or all at different
    moments): every rank stops after the same step, or none does. One 8-byte all-reduce a step."""
    flag = torch.tensor([signum or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def replica_mismatches(world: World, step: int, digest: str) -> list[int]:
    """The ranks whose combined parameter digest after ``step`` differs from rank 0's, each named in a
    warning on stderr (every rank gets the same list)."""
    bad = all_equal_to_rank0(digest, world)
    if bad and world.rank == 0:
        for rank in bad:
            print(f"reprokit: warning: rank {rank}'s parameters differ from rank 0's after step {step}; the "
                  "replicas diverged (a rank-dependent update, or parameters changed outside DDP)",
                  file=sys.stderr, flush=True)
    return bad
