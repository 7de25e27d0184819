"""``reprokit.Run`` on a user's own loop: examples/train_digits.py with ``run.step()`` vs the same loop bare.

The loop is the example's: its ``Net`` (conv net with dropout), Adadelta, StepLR per epoch,
``nll_loss``, the digits with the ``RandomAffine`` augmentation, batch 32 and a test pass after every
epoch. ``Digits``, ``Net`` and ``test`` are imported from examples/train_digits.py (by file path,
with importlib) rather than copied, so the bench times the example as it is and follows it when it
changes; the settings are the example's defaults. One intra-op thread and ``num_workers=0``: the
loader's work then happens in the timed process, and a second thread or a worker would mostly add
scheduling noise on a small machine.

The variants are the reprokit loop (the example's loop with ``reprokit.Run``, ``run.track``,
``run.loader``, ``run.epochs``, ``run.step`` and ``run.log``) with digests every step, digests off,
tracing every step, digests every step without the per-tensor gradient digests
(``grad_digest_every=0``: what a cheaper default would cost in evidence, measured, not the default),
and the bare loop. The bare loop does the same arithmetic, bit for bit,
and the bench checks that every run ends with the same final digest (``model_digest``) before it
prints a ratio. What that takes:

- the same initial weights: threads, deterministic algorithms and ``torch.manual_seed`` set before
  ``Net()``, as ``Run()`` does (it seeds python and numpy too; nothing in this loop draws from them);
- the same batches: ``run.loader`` shuffles epoch ``e`` with a generator seeded from
  ``derive_seed(seed, "loader", 0, e, 0)``; the bare loop's sampler draws the same permutation;
- the same augmentation bits: ``run.loader`` fetches each sample with the global RNGs seeded from
  (that seed, the sample's index) and puts them back after each batch. The bare loop does the same
  for torch's RNG, the only one ``RandomAffine`` draws from, so a user who wanted the example's bits
  without reprokit would have to do this work too;
- the same dropout stream: the fetches put the global RNG back, and the train DataLoader gets its
  own generator, because a DataLoader without one draws its base seed from the global RNG at every
  ``iter()`` (torch/utils/data/dataloader.py, ``_BaseDataLoaderIter``). The test loader has none in
  both loops, as in the example, so both draw that seed at the same points.

Timed is the loop from the ``run.epochs()`` call to after the last epoch's scheduler step
(``Run()`` and ``finish()`` write the manifest and model files once: they are in "whole").
Runs are interleaved, the order rotates every repeat, and the medians of the per-repeat ratios to
the bare run are reported, in wall and in process CPU time. On a shared machine both swing with the
neighbours' load, so the time inside reprokit's hooks is measured in-run too: ``run.step()`` is
timed with ``perf_counter``, and so is the train loader's ``iter()``/``next()`` in both loops, with
the example dataset's ``__getitem__`` (the augmentation) and the collate function timed inside it;
the loader's time besides those two is its own machinery (reprokit's per-sample seeding, the
sampler, DataLoader's fetcher), and the hook share is ``run.step()`` plus the reprokit loader's
excess of that over the bare loader's, relative to the loop. It leaves out indirect costs, such as
the augmentation itself running slower between reprokit's seeding calls: the fetch column shows it.

Target: loop wall time with digests every step / bare <= 1.03.

Run: ``python benchmarks/bench_run.py [--repeats N] [--epochs N]``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
import xxhash
from common import verdict
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

import reprokit
from reprokit.digests import model_digest
from reprokit.overrides import VARIABLES
from reprokit.seeding import SEED_MAX, derive_seed

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
TARGET = 1.03  # digests every step / bare, loop wall time
THREADS = 1
# the example's defaults (examples/train_digits.py, main)
SEED, BATCH, TEST_BATCH, LR, GAMMA = 1, 32, 256, 1.0, 0.7


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Clocks:
    """Seconds spent in the parts of one run's loop; the same instruments in every variant."""

    loader: float = 0.0  # inside the train loader's iter() and next()
    fetch: float = 0.0  # inside the example dataset's __getitem__ (the augmentation), within loader
    collate: float = 0.0  # inside the collate function, within loader
    step: float = 0.0  # inside run.step()
    fingerprint: float = 0.0  # inside the run's fingerprint hooks: a loader's yield, the optimizer's pre-hook
    yields: float = 0.0  # of which at the loader's yield (within loader)

    def reset(self) -> None:
        self.loader = self.fetch = self.collate = self.step = self.fingerprint = self.yields = 0.0


class TimedDataset(Dataset[Any]):
    """The example's dataset with the time inside its ``__getitem__`` added up."""

    def __init__(self, dataset: Any, clocks: Clocks) -> None:
        self.dataset, self.clocks = dataset, clocks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        start = time.perf_counter()
        item = self.dataset[index]
        self.clocks.fetch += time.perf_counter() - start
        return item


class TimedCollate:
    def __init__(self, clocks: Clocks) -> None:
        self.clocks = clocks

    def __call__(self, samples: list[Any]) -> Any:
        start = time.perf_counter()
        batch = default_collate(samples)
        self.clocks.collate += time.perf_counter() - start
        return batch


def timed_batches(loader: Iterable[Any], clocks: Clocks) -> Iterator[Any]:
    start = time.perf_counter()
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            clocks.loader += time.perf_counter() - start
            return
        clocks.loader += time.perf_counter() - start
        yield batch
        start = time.perf_counter()


class EpochOrder(Sampler[list[int]]):
    """The bare loop's batches: ``run.loader``'s order for pass 0 of an epoch (a permutation from a
    generator seeded with the pass seed, as ``_PassSampler`` in reprokit/runloader.py draws it)."""

    def __init__(self, size: int, batch_size: int) -> None:
        self.size, self.batch_size, self.pass_seed = size, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.pass_seed = derive_seed(SEED, "loader", 0, epoch, 0)  # loader 0, pass 0 of the epoch

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.pass_seed)).tolist()
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class SeededFetch(Dataset[Any]):
    """Fetches a batch's samples with torch's global RNG seeded from (pass seed, index), as
    ``_SeededDataset`` in reprokit/runloader.py does, and puts the RNG back afterwards."""

    def __init__(self, dataset: Dataset[Any], order: EpochOrder) -> None:
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        saved = torch.default_generator.get_state()
        out = []
        for index in indices:
            seed = xxhash.xxh3_64_intdigest(struct.pack("<QQ", self.order.pass_seed, index)) & SEED_MAX
            torch.default_generator.manual_seed(seed)
            out.append(self.dataset[index])
        torch.default_generator.set_state(saved)
        return out


@dataclass(frozen=True)
class Variant:
    name: str
    reprokit: bool
    digest_every: int = 0
    trace_every: int = 0
    run_loader: bool = True  # False: the bare loop's loader, to tell run.step's cost from run.loader's
    grad_every: int | None = None  # Run's grad_digest_every (None: the default, digest_every)


BARE = Variant("bare loop", reprokit=False)
VARIANTS = (BARE, Variant("digests every step", True, digest_every=1),
            Variant("digests off", True, digest_every=0),
            Variant("tracing every step", True, digest_every=1, trace_every=1),
            Variant("digests, bare loader", True, digest_every=1, run_loader=False),
            Variant("no grad digests", True, digest_every=1, grad_every=0))


@dataclass(frozen=True)
class Outcome:
    loop_seconds: float  # first epoch to the last scheduler step: steps, fetches, test passes
    loop_cpu_seconds: float  # the same span in process CPU time: less sensitive to a busy machine
    seconds: float  # the whole run: Run() (or seeding) to finish() (or the final digest)
    steps: int
    clocks: Clocks = field(repr=False)
    final_digest: str

    @property
    def loader_own(self) -> float:
        """The train loader's time besides the example's fetches, the collate and the run's
        fingerprint of each batch it yields (counted with the hooks)."""
        return self.clocks.loader - self.clocks.fetch - self.clocks.collate - self.clocks.yields


@dataclass(frozen=True)
class Loop:
    seconds: float
    cpu_seconds: float
    steps: int
    final_digest: str


def train_epoch(model: Any, optimizer: torch.optim.Optimizer, batches: Iterator[Any],
                run: reprokit.Run | None, clocks: Clocks) -> int:
    """The example's ``train`` without its print, and with ``run.step`` (timed) when there is a run."""
    model.train()
    steps = 0
    for data, target in batches:
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        steps += 1
        if run is not None:
            start = time.perf_counter()
            run.step(loss=loss)
            clocks.step += time.perf_counter() - start
    return steps


def reprokit_loop(example: ModuleType, variant: Variant, epochs: int, run_dir: Path, train_set: Dataset[Any],
                  test_loader: DataLoader[Any], clocks: Clocks) -> Loop:
    """The loop of examples/train_digits_reprokit.py, with the variant's settings and no checkpoints."""
    run = reprokit.Run(run_dir, seed=SEED, threads=THREADS, config={"batch_size": BATCH, "lr": LR,
                       "gamma": GAMMA, "epochs": epochs}, digest_every=variant.digest_every,
                       trace_every=variant.trace_every, checkpoint_every=0, progress=False,
                       grad_digest_every=variant.grad_every)
    model = example.Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=LR)
    scheduler = StepLR(optimizer, step_size=1, gamma=GAMMA)
    run.track(model=model, optimizer=optimizer, scheduler=scheduler)
    order: EpochOrder | None = None
    loader: Iterable[Any]
    if variant.run_loader:
        loader = run.loader(DataLoader(train_set, batch_size=BATCH, shuffle=True, num_workers=0,
                                       collate_fn=TimedCollate(clocks)))
    else:
        loader, order = exact_loader(train_set, clocks)
    clocks.reset()  # the loop only
    start, cpu_start, steps, accuracy = time.perf_counter(), time.process_time(), 0, 0.0
    for epoch in run.epochs(epochs):
        if order is not None:
            order.set_epoch(epoch)
        steps += train_epoch(model, optimizer, timed_batches(loader, clocks), run, clocks)
        accuracy = example.test(model, test_loader)
        run.log(test_accuracy=accuracy)
        scheduler.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    clocks.yields = run.hook_seconds["yield"]
    clocks.fingerprint = run.hook_seconds["yield"] + run.hook_seconds["update"]
    return Loop(seconds, cpu_seconds, steps, run.finish(test_accuracy=accuracy).final_digest)


def exact_loader(train_set: Dataset[Any], clocks: Clocks) -> tuple[DataLoader[Any], EpochOrder]:
    """A plain DataLoader giving ``run.loader``'s batches, bit for bit; ``set_epoch`` before each epoch."""
    order = EpochOrder(len(train_set), BATCH)  # type: ignore[arg-type]
    loader = DataLoader(SeededFetch(train_set, order), batch_sampler=order, collate_fn=TimedCollate(clocks),
                        generator=torch.Generator())  # its own generator: the global one is dropout's
    return loader, order


def bare_loop(example: ModuleType, epochs: int, train_set: Dataset[Any], test_loader: DataLoader[Any],
              clocks: Clocks) -> Loop:
    """The loop of examples/train_digits.py, with the batches and augmentation bits of ``run.loader``."""
    torch.set_num_threads(THREADS)  # what Run() sets that changes the bits
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    model = example.Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=LR)
    scheduler = StepLR(optimizer, step_size=1, gamma=GAMMA)
    loader, order = exact_loader(train_set, clocks)
    clocks.reset()
    start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
    for epoch in range(epochs):
        order.set_epoch(epoch)
        steps += train_epoch(model, optimizer, timed_batches(loader, clocks), None, clocks)
        example.test(model, test_loader)
        scheduler.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return Loop(seconds, cpu_seconds, steps, model_digest(model))


def run_once(example: ModuleType, variant: Variant, epochs: int, root: Path) -> Outcome:
    clocks = Clocks()
    train_set = TimedDataset(example.Digits(True, v2.RandomAffine(degrees=10, translate=(0.1, 0.1))), clocks)
    test_loader = DataLoader(example.Digits(False), batch_size=TEST_BATCH)
    gc.collect()  # start every run from the same garbage state
    began = time.perf_counter()
    if variant.reprokit:
        run_dir = Path(tempfile.mkdtemp(dir=root)) / "run"
        loop = reprokit_loop(example, variant, epochs, run_dir, train_set, test_loader, clocks)
    else:
        loop = bare_loop(example, epochs, train_set, test_loader, clocks)
    return Outcome(loop.seconds, loop.cpu_seconds, time.perf_counter() - began, loop.steps, clocks,
                   loop.final_digest)


def refuse_overrides() -> None:
    """The REPROKIT_* variables win over Run's arguments, so one set would change the variants."""
    found = [name for name in VARIABLES if name in os.environ and name != "REPROKIT_PROGRESS"]
    if found:
        sys.exit(f"bench_run: {', '.join(found)} set; they override the variants' settings, so unset "
                 "them to benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3, the example's)")
    args = parser.parse_args()
    if args.repeats < 1 or args.epochs < 1:
        parser.error(f"--repeats {args.repeats} and --epochs {args.epochs} must be >= 1")
    refuse_overrides()
    example = load_example()
    outcomes: dict[str, list[Outcome]] = {v.name: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for variant in VARIANTS:  # warm-up: imports, allocator, the digits file in the page cache
            run_once(example, variant, 1, root)
        for i in range(args.repeats):
            for variant in VARIANTS[i % len(VARIANTS):] + VARIANTS[: i % len(VARIANTS)]:
                outcomes[variant.name].append(run_once(example, variant, args.epochs, root))
    report(outcomes, args.epochs, args.repeats)


def per_step(runs: list[Outcome], seconds: Callable[[Outcome], float]) -> float:
    """The median over ``runs`` of ``seconds(run)`` in milliseconds per step."""
    return statistics.median(1000 * seconds(o) / o.steps for o in runs)


def report(outcomes: dict[str, list[Outcome]], epochs: int, repeats: int) -> None:
    digests = {o.final_digest for runs in outcomes.values() for o in runs}
    if len(digests) != 1:
        by_variant = {name: sorted({o.final_digest[:16] for o in runs}) for name, runs in outcomes.items()}
        sys.exit(f"REFUSED: the runs end with different final digests {by_variant}, so the bare loop "
                 "did other work than the reprokit loop and no ratio is meaningful")
    base = outcomes[BARE.name]
    steps = base[0].steps
    print(f"examples/train_digits.py loop: Net, Adadelta, StepLR, batch {BATCH}, {epochs} epochs = {steps} "
          f"steps, {THREADS} thread, num_workers=0; {repeats} interleaved repeats; loop = loop seconds "
          "(wall, median), paired = median of per-repeat ratios to the bare loop, cpu = loop process CPU "
          "seconds, whole = Run() to finish()")
    header = (f"{'variant':<20} {'loop s':>7} {'min s':>7} {'max s':>7} {'ms/step':>8} {'paired':>7} "
              f"{'cpu s':>7} {'paired':>7} {'whole':>7}")
    print(header)
    print("-" * len(header))
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for name, runs in outcomes.items():
        loops = [o.loop_seconds for o in runs]
        pairs = list(zip(runs, base, strict=True))
        wall[name] = statistics.median(o.loop_seconds / b.loop_seconds for o, b in pairs)
        cpu[name] = statistics.median(o.loop_cpu_seconds / b.loop_cpu_seconds for o, b in pairs)
        whole = statistics.median(o.seconds / b.seconds for o, b in pairs)
        median, cpu_median = statistics.median(loops), statistics.median(o.loop_cpu_seconds for o in runs)
        print(f"{name:<20} {median:>7.3f} {min(loops):>7.3f} {max(loops):>7.3f} "
              f"{1000 * median / steps:>8.3f} {wall[name]:>6.3f}x {cpu_median:>7.3f} "
              f"{cpu[name]:>6.3f}x {whole:>6.3f}x")

    print("in-run, ms per step (medians): inside run.step(); inside the run's fingerprint hooks (the "
          "batch and RNG digests at the loader's yield, the gradient digests in the optimizer's pre-hook: "
          "Run.hook_seconds); inside the train loader besides the example's fetch, the collate and the "
          "yield's fingerprints (its own machinery); inside the example's fetch (the augmentation). "
          "hook share = run.step() + fingerprints + the loader's own time in excess of the bare "
          "loader's, % of the loop")
    print(f"  {BARE.name:<20} run.step     -  loader {per_step(base, lambda o: o.loader_own):.3f}  fetch "
          f"{per_step(base, lambda o: o.clocks.fetch):.3f}")
    share: dict[str, float] = {}
    for name, runs in outcomes.items():
        if name == BARE.name:
            continue
        pairs = list(zip(runs, base, strict=True))
        share[name] = statistics.median(
            (o.clocks.step + o.clocks.fingerprint + o.loader_own - b.loader_own) / o.loop_seconds
            for o, b in pairs)
        step, own = per_step(runs, lambda o: o.clocks.step), per_step(runs, lambda o: o.loader_own)
        prints = per_step(runs, lambda o: o.clocks.fingerprint)
        fetch = per_step(runs, lambda o: o.clocks.fetch)
        print(f"  {name:<20} run.step {step:.3f}  fingerprints {prints:.3f}  loader {own:.3f}  "
              f"fetch {fetch:.3f}  hook share {100 * share[name]:.1f}%")
    base_loops = [o.loop_seconds for o in base]
    spread = max(base_loops) / min(base_loops)
    if spread > 1.05:
        print(f"note: the bare runs themselves spread {spread:.2f}x in wall time (max/min); the machine "
              "was busy, so trust the cpu column and the hook share more, or rerun idle or with more "
              "--repeats")

    print(f"sanity: every run ends with final digest {digests.pop()[:16]}…, so the bare loop does the "
          "same work")
    every, off, trace, plain, nograd = (v.name for v in VARIANTS[1:])
    print(f"SUMMARY: reprokit Run/bare loop median loop wall time: digests every step {wall[every]:.3f}x "
          f"({verdict(wall[every], TARGET)}), digests off {wall[off]:.3f}x, tracing every step "
          f"{wall[trace]:.3f}x, digests every step on the bare loader {wall[plain]:.3f}x, without the "
          f"gradient digests (grad_digest_every=0) {wall[nograd]:.3f}x; loop CPU time {cpu[every]:.3f}x, "
          f"{cpu[off]:.3f}x, {cpu[trace]:.3f}x, {cpu[plain]:.3f}x, {cpu[nograd]:.3f}x; in-run hook share "
          f"{100 * share[every]:.1f}%, {100 * share[off]:.1f}%, {100 * share[trace]:.1f}%, "
          f"{100 * share[plain]:.1f}%, {100 * share[nograd]:.1f}%")


if __name__ == "__main__":
    main()
