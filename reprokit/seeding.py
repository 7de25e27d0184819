"""Seeding: one call that sets every source of randomness and every determinism knob.

Modelled on torchtune's ``training/seed.py`` and Lightning Fabric's ``utilities/seed.py``, with two
additions: the thread count is a knob (on CPU, 1 vs 2 intra-op threads give different bits), and
the call returns a record of everything it set, so a run can say exactly how it was seeded.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from reprokit.errors import SeedError

SEED_MAX = 2**32 - 1  # numpy's legacy seeding accepts exactly [0, 2**32-1]
# cuBLAS needs a fixed workspace to be deterministic; the value comes from the CUDA docs
# (https://docs.nvidia.com/cuda/cublas/#results-reproducibility) and must be set before CUDA starts.
CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class SeedRecord:
    """Every knob :func:`seed_everything` set, and the values in force afterwards."""

    seed: int
    deterministic: bool
    use_deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    cublas_workspace_config: str | None
    threads: int
    threads_pinned: bool
    interop_threads: int
    pythonhashseed: str | None
    cuda_available: bool
    torch_version: str
    sources: dict[str, int] | None = None  # per-source seeds (Seeds.to_dict), when the run has them

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if record["sources"] is None:  # one int seed: the record as it always was
            del record["sources"]
        return record


SOURCES = ("init", "data_order", "augmentation", "dropout")


@dataclass(frozen=True)
class Seeds:
    """Which seed feeds which stream.

    ``init``: python, numpy and torch (+CUDA) at construction, so the weights a model created
    after ``Run()`` draws; ``data_order``: ``run.loader``'s order; ``augmentation``: the per-sample
    seeds of ``run.loader``'s fetches; ``dropout``: torch's global stream once the run begins,
    what the model's own random ops draw from. One int seed feeds all four as it always did (the
    loader derives order and augmentation from it, dropout continues the init stream); the
    per-source form re-seeds torch for dropout when the run begins, so that changing one source
    leaves the other streams untouched.
    """

    init: int
    data_order: int
    augmentation: int
    dropout: int
    per_source: bool = False

    @classmethod
    def parse(cls, value: object) -> Seeds:
        """An int, or a mapping of :data:`SOURCES` (plus ``base`` filling those not given)."""
        if isinstance(value, Seeds):
            return value
        if not isinstance(value, Mapping):
            seed = check_seed(value)
            return cls(seed, seed, seed, seed)
        given = dict(value)
        unknown = sorted(set(given) - {*SOURCES, "base"})
        if unknown:
            raise SeedError(f"seed: unknown source(s) {unknown}; the sources are {list(SOURCES)} "
                            "(and 'base' for the ones not given)")
        missing = [s for s in SOURCES if s not in given]
        if missing and "base" not in given:
            raise SeedError(f"seed: no seed for {missing}; give them or a 'base' seed, e.g. "
                            "seed={'base': 0, 'dropout': 1}")
        values = {s: check_seed(given[s] if s in given else given["base"]) for s in SOURCES}
        return cls(**values, per_source=True)

    def replace(self, **sources: int) -> Seeds:
        """These sources changed (``REPROKIT_SEED_*``): the per-source form from then on."""
        values = {s: check_seed(sources.get(s, getattr(self, s))) for s in SOURCES}
        return Seeds(**values, per_source=self.per_source or bool(sources))

    def to_dict(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in SOURCES}


def check_seed(seed: object) -> int:
    """Return ``seed`` if it is a valid seed, else raise :class:`SeedError` saying why."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise SeedError(
            f"seed {seed!r} has type {type(seed).__name__}; pass a non-negative int below 2**32"
        )
    if not 0 <= int(seed) <= SEED_MAX:
        raise SeedError(
            f"seed {seed} is out of range [0, 2**32-1]; pass a non-negative int below 2**32"
        )
    return int(seed)


def seed_everything(seed: int, *, deterministic: bool = True, threads: int | None = None) -> SeedRecord:
    """Seed python, numpy and torch (CPU and CUDA) and set the determinism knobs.

    Args:
        seed: an int in [0, 2**32-1].
        deterministic: ask torch for deterministic algorithms (an error if an op has none).
        threads: pin ``torch.set_num_threads`` to this count; ``None`` leaves it as it is (and
            the record still says how many are in force).

    Returns:
        A :class:`SeedRecord` with every value set.
    """
    seed = check_seed(seed)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SeedError(f"threads {threads!r} is not a positive int; pass e.g. threads=1")
        torch.set_num_threads(threads)
    if deterministic:
        _set_cublas_workspace()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device, lazily
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels by timing
    return SeedRecord(
        seed=seed,
        deterministic=deterministic,
        use_deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        threads=torch.get_num_threads(),
        threads_pinned=threads is not None,
        interop_threads=torch.get_num_interop_threads(),
        pythonhashseed=os.environ.get("PYTHONHASHSEED"),
        cuda_available=torch.cuda.is_available(),
        torch_version=torch.__version__,
    )


def _set_cublas_workspace() -> None:
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current is not None:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        warnings.warn(
            "CUDA is already initialised, so setting CUBLAS_WORKSPACE_CONFIG now has no effect and "
            "cuBLAS may be nondeterministic; call seed_everything before any CUDA work or export "
            f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} before starting Python",
            RuntimeWarning,
            stacklevel=3,
        )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader workers: derive python and numpy seeds from torch's.

    torch seeds each worker with ``base_seed + worker_id`` but leaves python and numpy alone, so
    without this every worker would draw the same numpy numbers (pytorch.org/docs/stable/notes/
    randomness.html#dataloader).
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (checked), independent of the global one."""
    return torch.Generator().manual_seed(check_seed(seed))


def derive_seed(seed: int, *keys: int | str) -> int:
    """A seed in [0, 2**32-1] derived from ``seed`` and ``keys`` (e.g. the epoch number).

    Derived rather than ``seed + epoch`` so that seed 0 epoch 1 and seed 1 epoch 0 differ.
    """
    # typed and NUL-separated, so ("a:b",) and ("a", "b"), or 1 and "1", derive different seeds
    text = "\0".join(f"{type(k).__name__}={k}" for k in (check_seed(seed), *keys))
    return xxhash.xxh3_64_intdigest(text.encode()) & SEED_MAX


@dataclass(frozen=True)
class RngState:
    """Every RNG state as plain tensors and numbers, safe for ``torch.load(weights_only=True)``."""

    python: dict[str, Any]
    numpy: dict[str, Any]
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]
    generators: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RngState:
        return cls(**data)


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> RngState:
    """Capture python, numpy, torch CPU/CUDA and the named generators' states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return RngState(
        python={"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                "gauss": gauss},
        numpy={"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
               "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        torch_cpu=torch.get_rng_state(),
        torch_cuda=list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        generators={name: g.get_state() for name, g in (generators or {}).items()},
    )


def restore_rng_state(state: RngState, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back every state captured by :func:`capture_rng_state`."""
    gens = generators or {}
    missing = sorted(set(state.generators) - set(gens))
    if missing:  # checked first, so a refused restore changes nothing
        raise SeedError(
            f"the saved RNG state has generators {missing} that were not passed; pass them in "
            f"`generators` by the same names"
        )
    py = state.python
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    npy = state.numpy
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    for name, g_state in state.generators.items():
        gens[name].set_state(g_state)
