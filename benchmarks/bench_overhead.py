"""Training-loop overhead: reprokit's ``train`` vs a hand-written PyTorch loop doing the same work.

Both train the cnn on digits with the same seed, initial weights, SGD with momentum, learning rate,
batch size, step count and one intra-op thread; both load the data, build the model, evaluate on
the validation set at step 0 and at the end and call ``loss.item()`` every step. They also see the
same batches: reprokit's ``run.loader`` shuffles epoch ``e`` with a generator seeded from
``derive_seed(seed, "loader", 0, e, 0)`` (reprokit/runloader.py), so that any epoch can be reached without
drawing the ones before it, and the hand loop draws each epoch's permutation the same way (one
seeding per epoch, nothing per step). A hand loop that shuffled every epoch from one generator
seeded once trained on another batch order and ended at another val loss. So both do the same
arithmetic, and the bench checks that every run ends with the same final digest before it prints
a ratio. Runs are interleaved (hand, reprokit with digests off, reprokit with digests every step)
and repeated; the median wall time of each is reported.

Targets: reprokit/hand <= 1.03x with digests off (``digest_every=0``) and <= 1.10x with digests
on (``digest_every=1``).

Run: ``python benchmarks/bench_overhead.py [--quick] [--repeats N] [--steps N]``.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import repeats_and_steps, training_parser, verdict
from torch import nn

from reprokit.config import TrainConfig
from reprokit.data import load_dataset
from reprokit.digests import model_digest
from reprokit.models import build_model
from reprokit.seeding import derive_seed
from reprokit.trainer import train

TARGET_OFF = 1.03
TARGET_ON = 1.10
SEED = 0
BATCH = 64
THREADS = 1


@dataclass(frozen=True)
class Outcome:
    seconds: float  # wall time
    cpu_seconds: float  # this process's CPU time: less sensitive to other load on the machine
    final_loss: float  # training loss of the last step
    val_loss: float
    val_accuracy: float
    final_digest: str  # of the final weights: equal exactly when two runs did the same arithmetic


def config(steps: int, digest_every: int) -> TrainConfig:
    return TrainConfig(
        dataset="digits", model="cnn", optimizer="sgd", batch_size=BATCH, steps=steps, seed=SEED,
        threads=THREADS, digest_every=digest_every, eval_every=0, num_workers=0,
    )


@torch.no_grad()
def hand_evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    model.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(dim=1) == y).double().mean())


def hand_loop(cfg: TrainConfig) -> Outcome:
    """A typical plain PyTorch loop with the same model, data, optimizer and steps as ``cfg``."""
    assert cfg.steps is not None
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.set_num_threads(THREADS)
    # reprokit's default config turns this on; mirror it so only the loop machinery differs (it is
    # process-global, so it would otherwise leak in from the reprokit runs anyway)
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset)
    x, y = data.x_train, data.y_train
    model = build_model(cfg.model, data.input_shape, data.num_outputs)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    model.train()
    hand_evaluate(model, data.x_val, data.y_val)  # step 0, as reprokit does
    step, epoch, loss_value = 0, 0, math.nan
    while step < cfg.steps:
        # reprokit's batch order: one generator per epoch, seeded from (seed, loader 0, epoch, pass 0)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "loader", 0, epoch, 0))
        order = torch.randperm(len(x), generator=gen)
        epoch += 1
        for idx in torch.split(order, cfg.batch_size):  # the last batch may be short, as in reprokit
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            torch.autograd.backward(loss)  # what loss.backward() calls; typed, so mypy --strict passes
            optimizer.step()
            loss_value = loss.item()
            step += 1
            if step == cfg.steps:
                break
    val_loss, val_acc = hand_evaluate(model, data.x_val, data.y_val)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return Outcome(seconds, cpu_seconds, loss_value, val_loss, val_acc, model_digest(model))


def reprokit_loop(cfg: TrainConfig) -> Outcome:
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train(cfg, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return Outcome(seconds, cpu_seconds, result.losses[-1], result.final_val_loss, result.final_metric,
                   result.final_digest)


def timed(fn: Callable[[TrainConfig], Outcome], cfg: TrainConfig) -> Outcome:
    gc.collect()  # start every run from the same garbage state
    return fn(cfg)


def paired_ratio(runs: list[Outcome], hand: list[Outcome]) -> float:
    """Median over repeats of (this run / the hand run of the same repeat): runs of one repeat are
    adjacent in time, so slow drifts in machine speed cancel."""
    return statistics.median(r.seconds / h.seconds for r, h in zip(runs, hand, strict=True))


def main() -> None:
    parser = training_parser(__doc__)
    args = parser.parse_args()
    repeats, steps = repeats_and_steps(args)
    torch.set_num_threads(THREADS)

    variants: list[tuple[str, Callable[[TrainConfig], Outcome], TrainConfig]] = [
        ("hand loop", hand_loop, config(steps, 0)),
        ("reprokit, digests off", reprokit_loop, config(steps, 0)),
        ("reprokit, digests on", reprokit_loop, config(steps, 1)),
    ]
    for _, fn, cfg in variants:  # warm-up: imports, allocator, sklearn's digits file in the page cache
        fn(cfg.replace(steps=min(steps, 20)))
    outcomes: dict[str, list[Outcome]] = {name: [] for name, _, _ in variants}
    for i in range(repeats):
        # interleaved, and the order rotates so that no variant always runs first (or last)
        for name, fn, cfg in variants[i % 3:] + variants[: i % 3]:
            outcomes[name].append(timed(fn, cfg))

    hand_runs = outcomes["hand loop"]
    digests = {o.final_digest for runs in outcomes.values() for o in runs}
    if len(digests) != 1:
        by_variant = {name: sorted({o.final_digest[:16] for o in runs}) for name, runs in outcomes.items()}
        sys.exit(f"REFUSED: the runs end with different final digests {by_variant}, so the hand loop did "
                 "other work than reprokit's train and no ratio is meaningful")
    medians = {name: statistics.median(o.seconds for o in runs) for name, runs in outcomes.items()}
    cpu = {name: statistics.median(o.cpu_seconds for o in runs) for name, runs in outcomes.items()}
    paired = {name: paired_ratio(runs, hand_runs) for name, runs in outcomes.items()}
    hand, hand_cpu = medians["hand loop"], cpu["hand loop"]

    print(f"cnn on digits, {steps} steps, batch {BATCH}, {THREADS} thread, seed {SEED}; "
          f"{repeats} interleaved repeats; wall = median wall seconds, paired = median of per-repeat "
          f"ratios, cpu = median process CPU seconds")
    header = (f"{'variant':<22} {'wall s':>7} {'min s':>7} {'max s':>7} {'ms/step':>8} {'vs hand':>8} "
              f"{'paired':>7} {'cpu s':>7} {'cpu vs hand':>11}")
    print(header)
    print("-" * len(header))
    for name, runs in outcomes.items():
        secs = [o.seconds for o in runs]
        print(f"{name:<22} {medians[name]:>7.3f} {min(secs):>7.3f} {max(secs):>7.3f} "
              f"{1000 * medians[name] / steps:>8.3f} {medians[name] / hand:>7.3f}x {paired[name]:>6.3f}x "
              f"{cpu[name]:>7.3f} {cpu[name] / hand_cpu:>10.3f}x")
    hand_secs = [o.seconds for o in hand_runs]
    spread = max(hand_secs) / min(hand_secs)
    if spread > 1.10:
        print(f"note: the hand loop's own runs spread {spread:.2f}x (max/min), more than the overhead "
              f"measured; the machine was busy or noisy, so rerun on an idle machine or with more --repeats")

    h, r = hand_runs[-1], outcomes["reprokit, digests off"][-1]
    print(f"sanity: every run ends with final digest {digests.pop()[:16]}…, so both do the same work; "
          f"final val loss / accuracy hand {h.val_loss:.4f} / {h.val_accuracy:.3f}, reprokit "
          f"{r.val_loss:.4f} / {r.val_accuracy:.3f}; last train loss hand {h.final_loss:.4f}, reprokit "
          f"{r.final_loss:.4f}")

    off = medians["reprokit, digests off"] / hand
    on = medians["reprokit, digests on"] / hand
    print(f"SUMMARY: reprokit/hand median wall time: digests off {off:.3f}x ({verdict(off, TARGET_OFF)}), "
          f"digests on {on:.3f}x ({verdict(on, TARGET_ON)})")


if __name__ == "__main__":
    main()
