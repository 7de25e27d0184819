"""Tracing overhead: ``train`` with a ``Tracer`` (every step, every 10 steps) vs the same run untraced.

All variants train the cnn on digits with the same config (seed, SGD, batch 64, one intra-op thread,
per-step digests as by default) into a fresh run directory, so they do the same training work bit
for bit and differ only in the tracer, which writes trace.csv and importance.csv there. Timed is
the training loop itself, from ``on_train_start`` of a first callback to ``on_train_end`` of a last
one, so the setup all variants share (seeding, data, manifest) does not dilute the ratio; the whole
``train`` call is timed too. Runs are interleaved, the order rotates every repeat, and the medians
of the per-repeat ratios to the untraced run are reported, in wall and in process CPU time. On a
shared machine both swing with the neighbours' load, so the time spent inside the tracer's own hooks
is also reported as a share of the rest of the same run's loop: the direct cost, measured in-run.

Targets: loop time traced / untraced <= 1.10 tracing every step and <= 1.02 every 10 steps.

Run: ``python benchmarks/bench_trace.py [--quick] [--repeats N] [--steps N] [--digest-every K]``.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import repeats_and_steps, training_parser, verdict

from reprokit.callbacks import Callback, TrainState
from reprokit.config import TrainConfig
from reprokit.trace import Tracer
from reprokit.trainer import train

TARGETS = {1: 1.10, 10: 1.02}  # trace interval -> largest acceptable loop-time ratio
THREADS = 1


class Clock(Callback):
    """Notes the time at train start and end; one goes first and one last among the callbacks."""

    def __init__(self) -> None:
        self.start = self.end = self.cpu_start = self.cpu_end = 0.0

    def on_train_start(self, state: TrainState) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_end(self, state: TrainState) -> None:
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


class TimedTracer(Tracer):
    """A Tracer that adds up the wall time spent in its own hooks."""

    hook_seconds = 0.0

    def on_train_start(self, state: TrainState) -> None:
        start = time.perf_counter()
        super().on_train_start(state)
        self.hook_seconds += time.perf_counter() - start

    def on_step_end(self, state: TrainState) -> None:
        start = time.perf_counter()
        super().on_step_end(state)
        self.hook_seconds += time.perf_counter() - start

    def on_train_end(self, state: TrainState) -> None:
        start = time.perf_counter()
        super().on_train_end(state)
        self.hook_seconds += time.perf_counter() - start


@dataclass(frozen=True)
class Outcome:
    loop_seconds: float  # first on_train_start to last on_train_end: steps, evaluation, tracer files
    loop_cpu_seconds: float  # the same span in process CPU time: less sensitive to a busy machine
    hook_seconds: float  # wall time inside the tracer's hooks: its direct cost, within the same run
    seconds: float  # the whole train() call
    final_digest: str


def run(config: TrainConfig, every: int | None, root: Path) -> Outcome:
    run_dir = Path(tempfile.mkdtemp(dir=root)) / "run"
    first, last = Clock(), Clock()
    tracer = TimedTracer(run_dir, every=every) if every else None
    gc.collect()  # start every run from the same garbage state
    start = time.perf_counter()
    callbacks = (first, tracer, last) if tracer else (first, last)
    result = train(config, run_dir, callbacks=callbacks, progress=False)
    return Outcome(last.end - first.start, last.cpu_end - first.cpu_start,
                   tracer.hook_seconds if tracer else 0.0, time.perf_counter() - start, result.final_digest)


def main() -> None:
    parser = training_parser(__doc__)
    parser.add_argument("--digest-every", type=int, default=1,
                        help="the loop's own per-step digests in every variant (default 1, 0 = off)")
    args = parser.parse_args()
    repeats, steps = repeats_and_steps(args)
    torch.set_num_threads(THREADS)
    config = TrainConfig(dataset="digits", model="cnn", optimizer="sgd", batch_size=64, steps=steps,
                         seed=0, threads=THREADS, digest_every=args.digest_every)
    variants: list[tuple[str, int | None]] = [("untraced", None), ("traced every step", 1),
                                              ("traced every 10 steps", 10)]
    outcomes: dict[str, list[Outcome]] = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for _, every in variants:  # warm-up: imports, allocator, the digits file in the page cache
            run(config.replace(steps=min(steps, 20)), every, root)
        for i in range(repeats):
            for name, every in variants[i % 3:] + variants[: i % 3]:
                outcomes[name].append(run(config, every, root))

    base = outcomes["untraced"]
    digests = {o.final_digest for runs in outcomes.values() for o in runs}
    print(f"cnn on digits, {steps} steps, batch 64, {THREADS} thread, digest_every={args.digest_every}; "
          f"{repeats} interleaved repeats; loop = training loop seconds (wall, median), paired = median "
          f"of per-repeat ratios to the untraced run, cpu = loop process CPU seconds, whole = train()")
    header = (f"{'variant':<22} {'loop s':>7} {'min s':>7} {'max s':>7} {'ms/step':>8} {'paired':>7} "
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
        print(f"{name:<22} {median:>7.3f} {min(loops):>7.3f} {max(loops):>7.3f} "
              f"{1000 * median / steps:>8.3f} {wall[name]:>6.3f}x {cpu_median:>7.3f} "
              f"{cpu[name]:>6.3f}x {whole:>6.3f}x")
    share: dict[str, float] = {}
    for name in ("traced every step", "traced every 10 steps"):
        runs = outcomes[name]
        share[name] = statistics.median(o.hook_seconds / (o.loop_seconds - o.hook_seconds) for o in runs)
        per_step = 1000 * statistics.median(o.hook_seconds for o in runs) / steps
        print(f"{name}: {per_step:.3f} ms per step inside the tracer's hooks, {100 * share[name]:.1f}% of "
              "the rest of the same run's loop (median)")
    base_loops = [o.loop_seconds for o in base]
    spread = max(base_loops) / min(base_loops)
    if spread > 1.05:
        print(f"note: the untraced runs themselves spread {spread:.2f}x in wall time (max/min); the "
              "machine was busy, so trust the cpu column more, or rerun idle or with more --repeats")
    same = "all variants end with the same final digest" if len(digests) == 1 else "DIGESTS DIFFER"
    print(f"sanity: {same} (tracing must not change a bit)")
    every1, every10 = "traced every step", "traced every 10 steps"
    print(f"SUMMARY: traced/untraced median loop wall time: every step {wall[every1]:.3f}x "
          f"({verdict(wall[every1], TARGETS[1])}), every 10 steps {wall[every10]:.3f}x "
          f"({verdict(wall[every10], TARGETS[10])}); loop CPU time {cpu[every1]:.3f}x and "
          f"{cpu[every10]:.3f}x; time in the tracer's hooks {1 + share[every1]:.3f}x and "
          f"{1 + share[every10]:.3f}x")


if __name__ == "__main__":
    main()
