"""Distributed primitives: the process group, topology-free seeds, the batch split and a reduction
whose bits do not depend on the world size.

DDP's all-reduce adds the ranks' gradients in an order set by the backend and the topology, so world
sizes 1, 2 and 4 at the same global batch give different models. :func:`canonical_all_reduce` instead
fixes the order: the gradient is the sum of ``n_micro`` per-micro-batch gradient sums, added as one
balanced pairwise tree (:func:`tree_sum`); each rank owns a contiguous block of micro-batches that is a
whole subtree, computes that node, ``all_gather``s it, and every rank adds the gathered nodes in the
tree's order. Every world size that divides the tree into whole subtrees
(:func:`canonical_world_sizes`) therefore performs the same float additions on the same operands.

Plain values only (ranks, ints, tensors, a live model): the run object builds on this module.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from reprokit.errors import DistributedError
from reprokit.seeding import CUBLAS_WORKSPACE

# torchrun's variables (https://pytorch.org/docs/stable/elastic/run.html#environment-variables)
RANK, WORLD_SIZE, LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"
_ENV_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")  # what init_method env:// reads besides the two above
# Set when the backend is NCCL and the user has not set them. They are read when NCCL builds its
# communicators and cuBLAS its handles, so they must be in the environment before CUDA work starts:
# call init_process_group first, or export them in the launch command. NCCL_ALGO=Ring stops NCCL from
# choosing ring or tree per message size; NCCL_NVLS_ENABLE=0 turns off NVLink SHARP's in-switch sums,
# whose order is not ours (https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html).
NCCL_DEFAULTS = {"NCCL_ALGO": "Ring", "NCCL_NVLS_ENABLE": "0", "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE}
_SEED_BITS = 63  # derived seeds fit a signed 64-bit int: torch.manual_seed and numpy both take them


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, how many there are, and who set the group up."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None when no process group exists (one process, no torchrun)
    initialized_here: bool  # True when init_process_group created the group (it then owns its teardown)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the manifest and the ledger row."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an int; unset it or "
                               "launch with torchrun, which sets it") from None


def world_from_env() -> World:
    """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (one process when absent)."""
    rank, world_size = _env_int(RANK, 0), _env_int(WORLD_SIZE, 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} with WORLD_SIZE={world_size}: the rank must lie in "
                               f"[0, {world_size - 1}]; launch with torchrun, which sets both")
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    return World(rank, world_size, _env_int(LOCAL_RANK, rank), backend, initialized_here=False)


def _check_env(init_method: str | None) -> None:
    given = [name for name in (RANK, WORLD_SIZE) if name in os.environ]
    if len(given) == 1:
        other = WORLD_SIZE if given == [RANK] else RANK
        raise DistributedError(f"{given[0]} is set but {other} is not; set both, or launch with "
                               "torchrun --standalone --nproc-per-node N, which sets them")
    if init_method is None:  # env://
        missing = [name for name in _ENV_RENDEZVOUS if name not in os.environ]
        if missing:
            raise DistributedError(f"RANK is set but {', '.join(missing)} is not: the env:// rendezvous "
                                   "needs MASTER_ADDR and MASTER_PORT; launch with torchrun --standalone "
                                   "(which picks a free port), or export them")


def nccl_env() -> dict[str, str]:
    """The NCCL and cuBLAS variables in force, for the manifest (empty on CPU unless the user set some)."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("NCCL_") or k == "CUBLAS_WORKSPACE_CONFIG"}


def _pick_backend(backend: str | None) -> str:
    # the NCCL path stays behind is_available(): a CPU machine never touches it
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("backend 'nccl' needs CUDA, which is not available here; "
                                   "pass backend='gloo' (or None to choose)")
        for name, value in NCCL_DEFAULTS.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(_env_int(LOCAL_RANK, 0))
    return backend


def init_process_group(timeout_s: float = 120.0, backend: str | None = None,
                       init_method: str | None = None) -> World:
    """Join the process group torchrun describes, creating it if nobody has.

    Args:
        timeout_s: how long a collective (and the rendezvous) waits for a stalled rank before it
            raises; torch's default is 30 minutes.
        backend: ``"gloo"`` or ``"nccl"``; None picks NCCL when CUDA is available, gloo otherwise.
            NCCL also sets :data:`NCCL_DEFAULTS` where unset (see :func:`nccl_env`).
        init_method: a rendezvous URL such as ``file:///shared/store``; None is torchrun's env://.

    Returns:
        The world; ``initialized_here`` is False when a group already existed (the call is then a
        no-op) or when there is no group to create (RANK unset: one process, ``backend`` None).
    """
    if timeout_s <= 0:
        raise DistributedError(f"timeout_s={timeout_s} must be positive; pass seconds, e.g. 120.0")
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int(LOCAL_RANK, dist.get_rank()),
                     dist.get_backend(), initialized_here=False)
    if RANK not in os.environ and WORLD_SIZE not in os.environ:
        return world_from_env()
    _check_env(init_method)
    env = world_from_env()
    chosen = _pick_backend(backend)
    dist.init_process_group(backend=chosen, init_method=init_method or "env://",
                            timeout=timedelta(seconds=timeout_s), rank=env.rank, world_size=env.world_size)
    return World(env.rank, env.world_size, env.local_rank, chosen, initialized_here=True)


def leave_process_group(world: World) -> None:
    """Destroy the process group if ``world`` created it; a group the caller made is left alone.

    A barrier first: a rank that destroys its group while a peer is still receiving the last broadcast
    closes the pair under it, and gloo aborts that peer ("terminate called without an active exception")."""
    if world.initialized_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _derive_seed(*parts: object) -> int:
    # blake2b over the tuple's text: stable across processes and Python versions (hash() is salted)
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - _SEED_BITS)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for state that is truly per rank (never for data, augmentation or dropout)."""
    return _derive_seed("reprokit.rank", seed, rank)


def microbatch_seed(seed: int, step: int, microbatch: int) -> int:
    """The seed of one micro-batch's random stream: a function of (seed, global step, micro-batch
    index) only, so dropout and augmentation draw the same numbers whatever the world size."""
    return _derive_seed("reprokit.microbatch", seed, step, microbatch)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sizes(sizes: Sequence[int]) -> str:
    return ", ".join(map(str, sizes))


def check_divisible(global_batch: int, world_size: int, micro_batches: int | None = None) -> None:
    """Refuse a global batch (or micro-batch count) that ``world_size`` ranks cannot split evenly.

    Raises:
        DistributedError: naming G, N and the world sizes that would work.
    """
    if global_batch < 1 or world_size < 1:
        raise DistributedError(f"global batch {global_batch} and world size {world_size} must both be "
                               "positive")
    if global_batch % world_size:
        raise DistributedError(f"global batch {global_batch} is not divisible by world size {world_size}; "
                               f"valid world sizes: {_sizes(_divisors(global_batch))}")
    if micro_batches is None:
        return
    if micro_batches < 1 or global_batch % micro_batches:
        raise DistributedError(f"{micro_batches} micro-batches do not split global batch {global_batch} "
                               f"evenly; valid counts: {_sizes(_divisors(global_batch))}")
    if micro_batches % world_size:
        raise DistributedError(f"{micro_batches} micro-batches are not divisible by world size "
                               f"{world_size}; valid world sizes: {_sizes(_divisors(micro_batches))}")


def shard_batch(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of one global batch: the ranks' slices, in rank order, are
    the global batch, so it is the same sample set whatever the world size."""
    check_divisible(len(indices), world_size)
    per_rank = len(indices) // world_size
    return list(indices[rank * per_rank:(rank + 1) * per_rank])


def micro_batches_of(rank: int, world_size: int, n_micro: int) -> range:
    """The micro-batch indices rank ``rank`` owns: the contiguous block ``rank`` of ``n_micro``."""
    if n_micro < 1 or n_micro % world_size:
        raise DistributedError(f"{n_micro} micro-batches are not divisible by world size {world_size}; "
                               f"valid world sizes: {_sizes(_divisors(max(n_micro, 1)))}")
    per_rank = n_micro // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def tree_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The balanced pairwise sum in a fixed order: add pairs (0, 1), (2, 3), ...; an odd last part
    goes up a level unchanged; repeat until one is left. Node j of level k sums parts
    [j·2^k, (j+1)·2^k), which is what lets a rank compute a whole subtree on its own."""
    if not parts:
        raise DistributedError("tree_sum of no tensors; pass at least one")
    level = list(parts)
    while len(level) > 1:
        paired = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
        level = [*paired, level[-1]] if len(level) % 2 else paired
    return level[0] if len(parts) > 1 else level[0].clone()


def canonical_world_sizes(n_micro: int) -> list[int]:
    """World sizes whose ranks' blocks are whole subtrees of the tree over ``n_micro`` leaves: N = 1
    (the root), or N dividing ``n_micro`` with ``n_micro / N`` a power of two."""
    return [n for n in _divisors(n_micro) if n == 1 or (n_micro // n) & (n_micro // n - 1) == 0]


def _collective(what: str, world: World, call: Callable[[], object]) -> None:
    try:
        call()
    except RuntimeError as exc:  # gloo and NCCL raise DistBackendError, a RuntimeError, on timeout
        raise DistributedError(f"{what} failed on rank {world.rank} of {world.world_size}: a rank "
                               f"stalled past the process-group timeout or died ({exc}); the rank whose "
                               "log stops first is the one to look at") from exc


def canonical_all_reduce(local_partials: Sequence[torch.Tensor], n_micro: int, world: World) -> torch.Tensor:
    """The sum of all ranks' per-micro-batch gradient sums, bitwise the same at every world size in
    :func:`canonical_world_sizes`.

    Each rank passes the flattened (1-D) sums of the micro-batches it owns (:func:`micro_batches_of`),
    in order. It adds them into its subtree's node, ``all_gather``s the N nodes and adds those in the
    tree's order. The cost: each rank receives N·P floats (P parameters), where an all-reduce moves
    about 2·P, and it holds them all at once.

    Raises:
        DistributedError: the world size does not split the tree into whole subtrees (naming those
            that do), the partials are not this rank's count, or the gather failed (timeout).
    """
    valid = canonical_world_sizes(n_micro) if n_micro >= 1 else []
    if world.world_size not in valid:
        raise DistributedError(f"canonical reduction of {n_micro} micro-batches needs each rank's block "
                               f"to be a whole subtree; world size {world.world_size} is not one of the "
                               f"valid world sizes: {_sizes(valid)}")
    owned = n_micro // world.world_size
    if len(local_partials) != owned:
        raise DistributedError(f"rank {world.rank} passed {len(local_partials)} micro-batch sums; at world "
                               f"size {world.world_size} it owns {owned} of {n_micro}")
    node = tree_sum(local_partials)
    if world.world_size == 1:
        return node
    nodes = [torch.empty_like(node) for _ in range(world.world_size)]
    _collective("all_gather of the canonical partial sums", world, lambda: dist.all_gather(nodes, node))
    return tree_sum(nodes)


def _with_grad(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for _, p in model.named_parameters() if p.grad is not None]


def flatten_grads(model: torch.nn.Module) -> torch.Tensor:
    """The gradients of the parameters that have one, in ``named_parameters`` order, as one 1-D copy."""
    grads = _with_grad(model)
    if not grads:
        raise DistributedError("the model has no gradients to flatten; call backward() first")
    return torch.cat([g.reshape(-1) for g in grads])


def unflatten_into_grads(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` (as :func:`flatten_grads` laid it out) back into the parameters' gradients."""
    grads = _with_grad(model)
    total = sum(g.numel() for g in grads)
    if flat.dim() != 1 or flat.numel() != total:
        raise DistributedError(f"flat gradient of shape {tuple(flat.shape)} does not fit the model's "
                               f"{total} gradient values; pass flatten_grads' layout (1-D, {total})")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_equal_to_rank0(digest: str, world: World) -> list[int]:
    """The ranks whose ``digest`` (e.g. of their parameters after a step) differs from rank 0's;
    empty when all agree. Every rank must call it; every rank gets the same list."""
    if world.world_size == 1:
        return []
    digests: list[str | None] = [None] * world.world_size
    _collective("all_gather_object of the ranks' digests", world,
                lambda: dist.all_gather_object(digests, digest))
    return [rank for rank, other in enumerate(digests) if other != digests[0]]
