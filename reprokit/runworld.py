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

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from reprokit.distributed import World, init_process_group, nccl_env, world_from_env
from reprokit.errors import DistributedError
from reprokit.runresume import RunFinished

__all__ = ["RANKS_DIR", "StepAgreement", "agree_after_step", "agree_step", "agreed_step", "ddp_settings",
           "join_world", "manifest_entry", "open_in_rank_order", "rank_path", "stop_signal", "track_ddp"]

RANKS_DIR = "ranks"  # RUN_DIR/ranks/rank-R: rank R's private run directory (readers skip it)
PROCESS_GROUP_TIMEOUT_S = 120.0  # a stalled rank fails the job in 2 minutes, not torch's 30
_MIB = 1024 * 1024  # DDP's bucket_cap_mb is in MiB (torch/nn/parallel/distributed.py, _MB_TO_BYTES)

T = TypeVar("T")


def join_world() -> World:
    """The world this process is in: a group the user made is accepted; torchrun's variables with
    WORLD_SIZE > 1 create one (gloo on CPU, NCCL on CUDA); otherwise one process, no group."""
    if dist.is_available() and dist.is_initialized():
        return init_process_group()  # joins it; initialized_here=False, so the user keeps its teardown
    if world_from_env().world_size > 1:
        _warn_shared_store()
        return init_process_group(PROCESS_GROUP_TIMEOUT_S)
    return world_from_env()


def _warn_shared_store() -> None:
    """Under ``torchrun --max-restarts K`` with the agent's store shared (torch's default), a
    restarted round can read the last round's gloo/NCCL addresses and fail to connect
    (pytorch/pytorch#135712; seen here: "Gloo connectFullMesh failed ... Connection refused")."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and restarts.isdigit() and int(restarts) > 0 and os.environ.get("RANK") == "0":
        print("reprokit: warning: torchrun --max-restarts shares its store with the process group, so a "
              "restart may fail to connect (pytorch/pytorch#135712); launch with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...", file=sys.stderr, flush=True)


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
    # the NCCL (and cuBLAS) variables decide NCCL's algorithm and so the bits; gloo reads none
    entry["nccl_env"] = nccl_env() if world.backend == "nccl" else {}
    return entry


def ddp_settings(ddp: DistributedDataParallel) -> dict[str, Any]:
    """What a DDP wrapper was built with that decides how it all-reduces: the bucket size (bytes,
    and the MiB it came from), the first bucket's size, per-bucket caps when given, and the flags.
    Read from the wrapper's attributes (torch 2.14's names); one a torch lacks is recorded as None."""
    cap = getattr(ddp, "bucket_bytes_cap", None)
    return {
        "bucket_bytes_cap": cap,
        "bucket_cap_mb": cap / _MIB if isinstance(cap, int) else None,
        # the default (bucket_cap_mb=None) starts with a small first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES)
        "first_bucket_bytes_cap": getattr(getattr(ddp, "_bucket_config", None), "first_bucket_bytes_cap",
                                          None),
        "bucket_bytes_cap_list": list(getattr(ddp, "bucket_bytes_cap_list", None) or []),
        "gradient_as_bucket_view": getattr(ddp, "gradient_as_bucket_view", None),
        "find_unused_parameters": getattr(ddp, "find_unused_parameters", None),
        "static_graph": getattr(ddp, "static_graph", None),
        # torch 2.14 renamed broadcast_buffers; the attribute is forward_sync_buffers
        "forward_sync_buffers": getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)),
    }


def track_ddp(objects: Mapping[str, Any], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """``run.track``'s objects with each DistributedDataParallel replaced by the module it wraps
    (what is digested and saved: the keys without DDP's ``module.`` prefix, the same at every world
    size), its :func:`ddp_settings` put in ``manifest``'s ``distributed`` entry under ``ddp`` by the
    tracked name. ``manifest`` None (a relaunch: the first launch's manifest stands) records nothing."""
    wrapped = {n: o for n, o in objects.items() if isinstance(o, DistributedDataParallel)}
    entry = manifest.get("distributed") if manifest is not None else None
    if wrapped and isinstance(entry, dict):
        entry.setdefault("ddp", {}).update({n: ddp_settings(o) for n, o in wrapped.items()})
    return {n: o.module if n in wrapped else o for n, o in objects.items()}


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


def stop_signal(signum: int | None) -> int | None:
    """The stop signal any rank received (SIGTERM/SIGINT reach one rank, or all at different
    moments): every rank stops after the same step, or none does. One 8-byte all-reduce a step."""
    flag = torch.tensor([signum or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


@dataclass(frozen=True)
class StepAgreement:
    """What the ranks agree on after a step: the stop signal any rank received, rank 0's answer to
    "is a time-based checkpoint due?" (the ranks' clocks differ; their checkpoint steps must not),
    and the ranks whose parameter digest differs from rank 0's."""

    signal: int | None
    due: bool
    mismatched: list[int]


def agree_after_step(world: World, step: int, signum: int | None, due: bool, digest: str | None
                     ) -> StepAgreement:
    """One ``all_gather`` of 4 int64 per rank a step (the signal, the due flag, the 128-bit digest)
    rather than a collective for each: on a busy machine every collective waits for the slowest
    rank's turn on a core. A rank that differs is named in a warning on stderr (every rank gets
    the same answer; ``digest`` is None at a step without digests, the same at every rank)."""
    words = _digest_words(digest) if digest is not None else (0, 0)
    mine = torch.tensor([signum or 0, int(due), *words], dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(world.world_size)]
    dist.all_gather(gathered, mine)
    rows = [g.tolist() for g in gathered]
    bad = [r for r, row in enumerate(rows) if row[2:] != rows[0][2:]] if digest is not None else []
    if bad and world.rank == 0:
        for rank in bad:
            print(f"reprokit: warning: rank {rank}'s parameters differ from rank 0's after step {step}; the "
                  "replicas diverged (a rank-dependent update, or parameters changed outside DDP)",
                  file=sys.stderr, flush=True)
    return StepAgreement(max(row[0] for row in rows) or None, bool(rows[0][1]), bad)


def _digest_words(digest: str) -> tuple[int, int]:
    raw = bytes.fromhex(digest)
    return (int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:16], "little", signed=True))
