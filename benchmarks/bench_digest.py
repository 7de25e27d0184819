"""Digest throughput: reprokit's xxh3-128 ``tensor_digest`` vs ``hashlib.sha256`` over the same bytes.

Cases: one large float32 tensor (256 MiB; 32 MiB with ``--quick``) and the ``state_dict`` of the
digits-sized resnet18 (digested tensor by tensor via ``state_digests``, as training does), plus the
small cnn that ``train`` digests every step by default. sha256 hashes the same header and tensor
bytes that ``tensor_digest`` hashes. Each timing is the median of several repeats, interleaved.

Target: xxh3 at least 5x the throughput of sha256 (ratio >= 5x) on the large-tensor and resnet18 cases.

Run: ``python benchmarks/bench_digest.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from reprokit.digests import state_digests, tensor_digest
from reprokit.models import build_model

TARGET_RATIO = 5.0
GB = 1e9  # throughput in decimal GB/s
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One workload: named tensors hashed by both digests; ``targeted`` cases count for the target."""

    name: str
    tensors: dict[str, torch.Tensor]
    targeted: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Result:
    case: Case
    xxh3_seconds: float
    sha256_seconds: float

    @property
    def xxh3_gbps(self) -> float:
        return self.case.nbytes / self.xxh3_seconds / GB

    @property
    def sha256_gbps(self) -> float:
        return self.case.nbytes / self.sha256_seconds / GB

    @property
    def ratio(self) -> float:
        return self.sha256_seconds / self.xxh3_seconds


def sha256_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 over exactly what :func:`tensor_digest` hashes: the same header, then the raw bytes."""
    t = tensor.detach()
    h = hashlib.sha256()
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def sha256_state_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The sha256 counterpart of :func:`state_digests`: one digest per tensor."""
    return {name: sha256_digest(name, t) for name, t in tensors.items()}


def xxh3_run(case: Case) -> None:
    if len(case.tensors) == 1:
        ((name, t),) = case.tensors.items()
        tensor_digest(name, t)
    else:
        state_digests(case.tensors)


def sha256_run(case: Case) -> None:
    if len(case.tensors) == 1:
        ((name, t),) = case.tensors.items()
        sha256_digest(name, t)
    else:
        sha256_state_digests(case.tensors)


def seconds(fn: Callable[[Case], None], case: Case, inner: int) -> float:
    """Wall time of one call, averaged over ``inner`` back-to-back calls (for sub-millisecond cases)."""
    start = time.perf_counter()
    for _ in range(inner):
        fn(case)
    return (time.perf_counter() - start) / inner


def measure(case: Case, repeats: int) -> Result:
    """Median seconds per digest for each hash, xxh3 and sha256 interleaved within every repeat."""
    # small cases repeat inside each timing so that one timing spans at least ~20 ms of sha256
    inner = max(1, int(20e6 // max(case.nbytes, 1)))
    xxh3_run(case)  # warm-up: first-touch page faults, lazy imports, caches
    sha256_run(case)
    xs: list[float] = []
    ss: list[float] = []
    for _ in range(repeats):
        xs.append(seconds(xxh3_run, case, inner))
        ss.append(seconds(sha256_run, case, inner))
    return Result(case, statistics.median(xs), statistics.median(ss))


def build_cases(quick: bool) -> list[Case]:
    big_mib = 32 if quick else 256
    g = torch.Generator().manual_seed(0)
    big = torch.rand(big_mib * MIB // 4, generator=g, dtype=torch.float32)
    torch.manual_seed(0)
    resnet = build_model("resnet18", (1, 8, 8), 10)
    cnn = build_model("cnn", (1, 8, 8), 10)
    return [
        Case(f"float32 {big_mib} MiB", {"big": big}, targeted=True),
        Case("resnet18 state_dict", dict(resnet.state_dict()), targeted=True),
        Case("cnn state_dict (info)", dict(cnn.state_dict()), targeted=False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="32 MiB tensor and 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 7)")
    args = parser.parse_args()
    repeats: int = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    torch.set_num_threads(1)  # hashing is single-threaded either way; keep torch out of the picture

    cases = build_cases(args.quick)
    print(f"digest throughput, median of {repeats} repeats (GB = 1e9 bytes), target ratio >= "
          f"{TARGET_RATIO:g}x")
    header = f"{'case':<24} {'tensors':>7} {'bytes':>13} {'xxh3 GB/s':>10} {'sha256 GB/s':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    results: list[Result] = []
    for case in cases:
        r = measure(case, repeats)
        results.append(r)
        print(f"{case.name:<24} {len(case.tensors):>7} {case.nbytes:>13,} {r.xxh3_gbps:>10.2f} "
              f"{r.sha256_gbps:>12.2f} {r.ratio:>6.1f}x")

    targeted = [r for r in results if r.case.targeted]
    worst = min(targeted, key=lambda r: r.ratio)
    verdict = "MET" if worst.ratio >= TARGET_RATIO else "MISSED"
    parts = ", ".join(f"{r.case.name} {r.ratio:.1f}x" for r in targeted)
    print(f"SUMMARY: xxh3/sha256 speed ratio min {worst.ratio:.1f}x ({parts}); "
          f"target >= {TARGET_RATIO:g}x: {verdict}")


if __name__ == "__main__":
    main()
