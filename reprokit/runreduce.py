"""Reduction mode ``"canonical"`` of a :class:`reprokit.Run`: gradients, dropout and the final model
that do not depend on the world size.

DDP's all-reduce adds the ranks' gradients in an order set by the topology, so 1, 2 and 4 ranks
give three different models. In canonical mode the global batch is cut into ``micro_batches``
equal micro-batches; rank r owns the contiguous block r of them (:func:`micro_batches_of`), the
script runs forward and backward once per micro-batch through ``run.micro_batches(x, y)``, and
before the update the per-micro-batch gradients are added in one fixed balanced tree
(:func:`reprokit.distributed.canonical_all_reduce`) and divided by the micro-batch count, which is
the gradient of the global batch's mean loss. Torch's global generator is seeded for each
micro-batch from (seed, global step, micro-batch index) (:func:`microbatch_seed`), so dropout
draws the same masks at every world size, and put back after the last one. The same code runs in
one process (no process group): the bits are those of every world size that splits the tree
into whole subtrees (:func:`canonical_world_sizes`).

The model is not wrapped in ``DistributedDataParallel``: the replicas stay equal because every
rank applies the same reduced gradient, which the per-step replica check confirms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from reprokit.digests import model_digest
from reprokit.distributed import (
    World,
    all_equal_to_rank0,
    canonical_all_reduce,
    canonical_world_sizes,
    micro_batches_of,
    microbatch_seed,
)
from reprokit.errors import ConfigError, DistributedError, ReprokitError

__all__ = ["REDUCTIONS", "CanonicalReduction", "check_reduction"]

REDUCTIONS = ("ddp", "canonical")


def check_reduction(reduction: str, micro_batches: int | None, world_size: int) -> None:
    """Refuse a reduction mode this world cannot run, naming the value and the fix."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction {reduction!r} is not one of {list(REDUCTIONS)}; pass 'ddp' "
                          "(DistributedDataParallel's all-reduce) or 'canonical' (the same bits at every "
                          "world size)")
    if reduction == "ddp":
        if micro_batches is not None:
            raise ConfigError(f"micro_batches={micro_batches!r} applies to reduction='canonical' only; "
                              "drop it, or pass reduction='canonical'")
        return
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"reduction='canonical' needs micro_batches, the number of micro-batches a "
                          f"global batch is cut into (an int >= 1), not {micro_batches!r}; e.g. "
                          "micro_batches=8 for world sizes 1, 2, 4 and 8")
    valid = canonical_world_sizes(micro_batches)
    if world_size not in valid:
        raise DistributedError(f"reduction='canonical' with {micro_batches} micro-batches cannot run at "
                               f"world size {world_size}: each rank must own a whole subtree of the "
                               f"reduction tree; valid world sizes: {valid}")


class CanonicalReduction:
    """One run's canonical reduction: the micro-batch loop and the reduction before each update."""

    def __init__(self, world: World, micro_batches: int, seed: int) -> None:
        self.world, self.count, self.seed = world, micro_batches, seed
        self.owned = micro_batches_of(world.rank, world.world_size, micro_batches)
        self._partials: list[torch.Tensor] = []  # this rank's per-micro-batch gradients, flattened
        self._params: list[nn.Parameter] = []
        self._reduced = False  # this step's gradients are reduced (a second optimizer's pre-hook)

    def split(self, step: int, params: list[nn.Parameter], tensors: Sequence[Any]) -> Iterator[Any]:
        """This rank's micro-batches of its share of the global batch, each a slice along dim 0 of
        every tensor; after each one's backward its gradients are taken and cleared."""
        if self._partials:
            raise ReprokitError("run.micro_batches() began again before optimizer.step() used the "
                                "gradients of the last one; call optimizer.step() once after each "
                                "micro-batch loop")
        chunks = self._chunks(tensors)
        for p in params:  # every micro-batch's backward starts from no gradient (no accumulation)
            p.grad = None
        self._params, self._reduced = params, False
        cpu = torch.random.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            for j, index in enumerate(self.owned):
                torch.manual_seed(microbatch_seed(self.seed, step, index))  # dropout's masks
                yield chunks[j] if len(tensors) > 1 else chunks[j][0]
                self._partials.append(_take_grads(params))
        finally:
            torch.random.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def _chunks(self, tensors: Sequence[Any]) -> list[tuple[torch.Tensor, ...]]:
        if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
            kinds = [type(t).__name__ for t in tensors]
            raise ReprokitError(f"run.micro_batches(...) takes the batch's tensors (e.g. x, y), each with "
                                f"the samples along dim 0; got {kinds or 'nothing'}")
        sizes = {len(t) for t in tensors}
        k = len(self.owned)
        if len(sizes) != 1 or next(iter(sizes)) % k:
            raise ReprokitError(f"run.micro_batches: the tensors hold {sorted(sizes)} samples; each must "
                                f"hold this rank's share of the global batch, cut into {k} equal micro-"
                                "batches: pass the batch run.loader yielded")
        per = next(iter(sizes)) // k
        return [tuple(t[j * per:(j + 1) * per] for t in tensors) for j in range(k)]

    def reduce(self) -> None:
        """The optimizer's step pre-hook: the micro-batch gradients of every rank, added in the
        tree's order and averaged, become the parameters' ``.grad``."""
        if not self._partials:
            if self._reduced:
                return
            raise ReprokitError("reduction='canonical': optimizer.step() came without a run.micro_batches() "
                                "loop; run forward and backward inside `for mb in run.micro_batches(x, y):` "
                                "so the gradients are reduced the same way at every world size")
        partials, self._partials = self._partials, []
        flat = canonical_all_reduce(partials, self.count, self.world)
        flat.div_(self.count)  # the mean over micro-batches: the global batch's mean-loss gradient
        offset = 0
        for p in self._params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._reduced = True

    def stepped(self) -> None:
        """run.step(): the next micro-batch loop belongs to the next step."""
        self._reduced = False

    def check_replicas(self, state: dict[str, torch.Tensor]) -> None:
        """At step 0 under N > 1 ranks the replicas must start equal (nothing broadcasts them)."""
        if self.world.world_size == 1:
            return
        bad = all_equal_to_rank0(model_digest(state), self.world)
        if bad:
            raise DistributedError(f"reduction='canonical': rank(s) {bad} start from other initial weights "
                                   "than rank 0; create the model after reprokit.Run(...), which seeds every "
                                   "rank alike (canonical mode does not broadcast weights as DDP does)")

    def manifest(self) -> dict[str, Any]:
        return {"micro_batches": self.count, "owned": [self.owned.start, self.owned.stop]}


def _take_grads(params: list[nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients as one flat copy (zeros where a parameter got none), then cleared."""
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                        device=p.device) for p in params]
    for p in params:
        p.grad = None
    if not parts:
        raise ReprokitError("reduction='canonical': the tracked model has no parameter that requires a "
                            "gradient; nothing to reduce")
    return torch.cat(parts)
