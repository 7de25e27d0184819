"""DDP on gloo: a DDP step vs a canonical_all_reduce one; verified vs bare DCP saves; Run vs a plain DDP loop.

One ``torchrun --standalone --nproc-per-node N`` launch (the script starts it itself; N = 2 by default),
one intra-op thread per rank, everything measured in that launch, interleaved (the order alternates every
step or save), medians reported:

(a) A training step of an MLP with Adam at global batch G, split into ``n_micro`` micro-batches of which
    each rank owns a contiguous block (``distributed.micro_batches_of``). The DDP step accumulates its
    micro-batches under ``no_sync`` and lets DDP's bucketed all-reduce (overlapped with the last
    backward) average the gradients; the canonical step runs the same forwards and backwards on the bare
    module, flattens each micro-batch's gradient sum and reduces them with
    ``distributed.canonical_all_reduce`` (an ``all_gather`` of N·P floats, then a fixed-order tree)
    instead. Both compute the mean gradient over G, so they train the same model up to the last bits;
    checked: each mode's ranks agree, every repeat of a mode ends on the same digest, and the canonical
    result is bitwise the one-process canonical step's (rank 0 recomputes it alone, untimed). The
    reduction alone is timed too: ``all_reduce`` of P floats vs ``canonical_all_reduce`` of the rank's
    micro-batch sums.
(b) ``distcheckpoint.save`` (DCP's files fsynced and never overwritten, then every file digested into
    contents.json, fsynced, and ``latest`` moved) vs bare ``torch.distributed.checkpoint.save`` of the same
    state (model + Adam) into a new folder each time, both with DCP's default ``sync_files=True``; each
    timed from a barrier to a barrier after it. Two states: the step's model (the verified save's fixed
    costs, a few fsyncs and broadcasts, show) and a wider one (``--save-width``, tens of MB: the digests'
    cost per byte shows). Checked: both load back (``dcp.load``, ``distcheckpoint.load_latest``) to the
    saved state's digest. Target: verified / bare <= 1.15.
(c) ``reprokit.Run`` in reduction mode "ddp" on a user's loop (the model wrapped in DDP after Run,
    ``run.loader``, one forward and backward per step, ``run.step(loss=loss)``) vs the same loop bare:
    the same MLP, Adam, data (a fixed TensorDataset of ``--run-steps`` global batches) and global batch
    G, one epoch. Run as in its defaults: digests and fingerprints every step (``digest_every=1``), with
    no checkpoints, no progress bar, no ledger row, each in a new run directory. The plain loop does
    what Run does that changes bits (benchmarks/ddploops.py), so both end on the same final digest,
    checked before a ratio is printed. Timed per run: the epoch loop between barriers (median over
    repeats of the per-repeat ratio) and Run() to finish() ("whole"); in-run, the seconds inside Run's
    hooks (``run.hook_seconds``: ``run.step``, the loader's yield, the optimizer's pre-hook) per step,
    at the slowest rank, and their share of the loop (``run.step`` includes its collectives, the replica
    check and the stop flag, so a rank's wait for the other counts there). Target: Run / plain <= 1.05.
(d) Run in mode "canonical" (a plain model, ``run.micro_batches`` of ``n_micro``, the reduction in
    the optimizer's pre-hook) vs Run in mode "ddp", same loop otherwise; no target. Checked: its final
    digest is a one-process canonical Run's (a child process of rank 0 without torchrun's variables,
    after the timed part). The three kinds of run alternate, the order rotating every repeat, after
    one untimed warm-up run of each.

Run: ``python benchmarks/bench_ddp.py [--quick] [--repeats R] [--steps S] [--saves K] [--nproc N]
[--width W] [--save-width W] [--run-steps S] [--json PATH]``; the JSON holds every figure and check.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import verdict
from ddploops import KINDS, Loop, dataset, plain_loop, run_loop
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from reprokit import distcheckpoint
from reprokit.digests import max_abs_diff, model_digest
from reprokit.distributed import (
    World,
    all_equal_to_rank0,
    canonical_all_reduce,
    flatten_grads,
    init_process_group,
    leave_process_group,
    micro_batches_of,
    unflatten_into_grads,
)

TARGET_SAVE = 1.15  # verified DCP save / bare dcp.save (issue 16)
TARGET_RUN = 1.05  # Run in mode "ddp" / the same plain DDP loop, loop wall time
IN, OUT, N_MICRO = 64, 10, 8  # n_micro / N must be a power of two for the canonical tree
MODES = ("ddp", "canonical")
WARMUP = 2  # steps of each run left out of its median: DDP rebuilds its buckets after the first
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_TIMEOUT = 900.0  # seconds for the whole torchrun launch; the ranks' own timeout is shorter


@dataclass
class StepResult:
    width: int
    params: int
    global_batch: int
    n_micro: int
    steps: int
    repeats: int
    ddp_ms: float  # median over repeats of each run's median step time (max over ranks)
    canonical_ms: float
    ratio: float  # median over repeats of canonical / ddp
    ratios: list[float]
    all_reduce_floats: int  # what the reduction moves: DDP all-reduces P floats,
    gathered_floats: int  # the canonical reduction gathers N·P at every rank
    reduce_all_reduce_ms: float  # the reduction alone, medians
    reduce_canonical_ms: float
    reduce_ratio: float
    ddp_digest: str
    canonical_digest: str
    one_process_digest: str
    canonical_matches_one_process: bool
    ranks_agree: bool
    repeatable: bool
    max_abs_diff_ddp_vs_canonical: float


@dataclass
class SaveResult:
    width: int
    params: int
    saves: int
    state_bytes: int  # the .distcp and .metadata files of one bare save
    bare_ms: float
    verified_ms: float
    ratio: float  # median over repeats of verified / bare
    ratios: list[float]
    target: float
    met: bool
    saved_digest: str
    bare_loaded_digest: str
    verified_loaded_digest: str
    digests_match: bool


@dataclass
class RunResult:
    width: int
    global_batch: int
    n_micro: int  # canonical mode's micro-batches
    steps: int
    repeats: int
    plain_ms: float  # per step: median over repeats of the loop's wall time / steps
    ddp_ms: float  # Run in mode "ddp"
    canonical_ms: float  # Run in mode "canonical"
    ratio: float  # median over repeats of Run ddp / plain loop
    ratios: list[float]
    target: float
    met: bool
    whole_ratio: float  # the same for Run() to finish() (the plain loop: seeding to its final digest)
    canonical_ratio: float  # median over repeats of Run canonical / Run ddp; no target
    canonical_ratios: list[float]
    hook_ms: dict[str, float]  # Run ddp, run.hook_seconds per step ("step", "yield", "update"), medians
    hook_share: float  # their sum / the loop, median over repeats (each repeat's slowest rank)
    plain_digest: str
    ddp_digest: str
    run_matches_plain: bool  # Run ddp ends bitwise where the plain loop ends
    canonical_digest: str
    one_process_digest: str
    canonical_matches_one_process: bool
    ranks_agree: bool
    repeatable: bool  # every repeat of a kind ends on the same digest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="width 256, 12 steps, 3 repeats, 3 saves")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved step runs (default 7)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 30)")
    parser.add_argument("--saves", type=int, default=None, help="interleaved saves of each kind (default 7)")
    parser.add_argument("--width", type=int, default=None, help="MLP hidden width (default 512)")
    parser.add_argument("--save-width", type=int, default=None,
                        help="hidden width of the second saved state (default 2048)")
    parser.add_argument("--run-steps", type=int, default=None,
                        help="steps of each Run and plain loop in (c) and (d) (default 100)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (N)")
    parser.add_argument("--json", type=Path, default=Path("bench_ddp.json"), help="where the results go")
    parser.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)  # the launcher's scratch
    # rank 0's child: one canonical Run in one process, its final digest written to this file
    parser.add_argument("--alone", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _settings(args: argparse.Namespace) -> tuple[int, int, int, int, int, int]:
    """(repeats, steps, saves, width, save width, run steps)."""
    def pick(value: int | None, quick: int, full: int) -> int:
        return value if value is not None else (quick if args.quick else full)
    return (pick(args.repeats, 3, 7), pick(args.steps, 12, 30), pick(args.saves, 3, 7),
            pick(args.width, 256, 512), pick(args.save_width, 1024, 2048), pick(args.run_steps, 20, 100))


def _mlp(width: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights at every rank and in every run
    return _build_mlp(width)


def _build_mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(IN, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, OUT))


def _micro_batches(step: int, global_batch: int, owned: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches ``owned`` of global batch ``step`` of a fixed synthetic dataset."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(global_batch, IN, generator=g), torch.randint(0, OUT, (global_batch,), generator=g)
    size = global_batch // N_MICRO
    return [(x[m * size:(m + 1) * size], y[m * size:(m + 1) * size]) for m in owned]


def _ddp_step(model: DistributedDataParallel, opt: torch.optim.Optimizer,
              micros: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
    opt.zero_grad(set_to_none=False)
    for i, (x, y) in enumerate(micros):
        # DDP all-reduces at the last backward only, and averages over the N ranks: scale = N / G
        sync = contextlib.nullcontext() if i == len(micros) - 1 else model.no_sync()
        with sync:
            (F.cross_entropy(model(x), y, reduction="sum") * scale).backward()
    opt.step()


def _canonical_step(net: torch.nn.Module, opt: torch.optim.Optimizer,
                    micros: list[tuple[torch.Tensor, torch.Tensor]], global_batch: int, world: World) -> None:
    partials = []
    for x, y in micros:
        net.zero_grad(set_to_none=False)
        (F.cross_entropy(net(x), y, reduction="sum") / global_batch).backward()
        partials.append(flatten_grads(net))
    unflatten_into_grads(net, canonical_all_reduce(partials, N_MICRO, world))
    opt.step()


def _max_over_ranks(values: list[float]) -> list[float]:
    """Each step's time at its slowest rank (the ranks' clocks agree at the collectives)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t]


def _train_both(world: World, width: int, steps: int, global_batch: int,
                flip: bool) -> dict[str, tuple[torch.nn.Module, float]]:
    """One run of each mode, side by side: step s of one, then step s of the other, which goes first
    alternating (a neighbour's burst of load hits both); per mode, (the trained module, its median
    step seconds)."""
    nets = {mode: _mlp(width) for mode in MODES}
    ddp = DistributedDataParallel(nets["ddp"])
    opts = {"ddp": torch.optim.Adam(ddp.parameters(), lr=1e-3),
            "canonical": torch.optim.Adam(nets["canonical"].parameters(), lr=1e-3)}
    owned = micro_batches_of(world.rank, world.world_size, N_MICRO)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for step in range(steps):
        micros = _micro_batches(step, global_batch, owned)
        for mode in (MODES[::-1] if (step % 2 == 0) == flip else MODES):
            dist.barrier()  # both start from ranks in step
            began = time.perf_counter()
            if mode == "ddp":
                _ddp_step(ddp, opts[mode], micros, world.world_size / global_batch)
            else:
                _canonical_step(nets[mode], opts[mode], micros, global_batch, world)
            times[mode].append(time.perf_counter() - began)
    return {mode: (nets[mode], statistics.median(_max_over_ranks(times[mode])[WARMUP:])) for mode in MODES}


def _one_process_canonical(width: int, steps: int, global_batch: int) -> str:
    """The canonical run computed by this process alone over all N_MICRO micro-batches."""
    net = _mlp(width)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    alone = World(0, 1, 0, None, initialized_here=False)
    for step in range(steps):
        _canonical_step(net, opt, _micro_batches(step, global_batch, range(N_MICRO)), global_batch, alone)
    return model_digest(net)


def _time_reductions(net: torch.nn.Module, world: World, repeats: int) -> tuple[float, float]:
    """Median seconds of an all_reduce of P floats and of canonical_all_reduce of this rank's sums."""
    flat = flatten_grads(net)
    partials = [flat.clone() for _ in micro_batches_of(world.rank, world.world_size, N_MICRO)]
    plain, canonical = [], []
    for i in range(repeats):
        for kind in (("plain", "canonical") if i % 2 == 0 else ("canonical", "plain")):
            dist.barrier()
            began = time.perf_counter()
            if kind == "plain":
                dist.all_reduce(flat.clone())
                plain.append(time.perf_counter() - began)
            else:
                canonical_all_reduce(partials, N_MICRO, world)
                canonical.append(time.perf_counter() - began)
    return statistics.median(_max_over_ranks(plain)), statistics.median(_max_over_ranks(canonical))


def bench_steps(world: World, repeats: int, steps: int, width: int, global_batch: int) -> StepResult:
    seconds: dict[str, list[float]] = {"ddp": [], "canonical": []}
    digests: dict[str, set[str]] = {"ddp": set(), "canonical": set()}
    agree, last = True, dict[str, torch.nn.Module]()
    for r in range(repeats):
        for mode, (net, median) in _train_both(world, width, steps, global_batch, flip=r % 2 == 1).items():
            seconds[mode].append(median)
            digest = model_digest(net)
            agree = agree and not all_equal_to_rank0(digest, world)
            digests[mode].add(digest)
            last[mode] = net
    one = _one_process_canonical(width, steps, global_batch) if world.is_main else ""
    reduce_plain, reduce_canonical = _time_reductions(last["canonical"], world, 5 * repeats)
    ratios = [c / d for c, d in zip(seconds["canonical"], seconds["ddp"], strict=True)]
    params = sum(p.numel() for p in last["ddp"].parameters())
    ddp_digest, canonical_digest = sorted(digests["ddp"])[0], sorted(digests["canonical"])[0]
    return StepResult(
        width, params, global_batch, N_MICRO, steps, repeats, 1e3 * statistics.median(seconds["ddp"]),
        1e3 * statistics.median(seconds["canonical"]), statistics.median(ratios), ratios, params,
        world.world_size * params, 1e3 * reduce_plain, 1e3 * reduce_canonical,
        reduce_canonical / reduce_plain,
        ddp_digest, canonical_digest, one, one == canonical_digest, agree,
        len(digests["ddp"]) == len(digests["canonical"]) == 1,
        max_abs_diff(last["ddp"].state_dict(), last["canonical"].state_dict()))


def _timed(call: Callable[[], object]) -> float:
    dist.barrier()
    began = time.perf_counter()
    call()
    dist.barrier()
    return time.perf_counter() - began


def _fresh_state(width: int) -> dict[str, Any]:
    model = DistributedDataParallel(_mlp(width))
    return distcheckpoint.model_state(model, torch.optim.Adam(model.parameters(), lr=1e-3))


def bench_saves(world: World, root: Path, saves: int, width: int, global_batch: int) -> SaveResult:
    model = DistributedDataParallel(_mlp(width))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    owned = micro_batches_of(world.rank, world.world_size, N_MICRO)
    for step in range(3):  # an optimizer state worth saving
        _ddp_step(model, opt, _micro_batches(step, global_batch, owned), world.world_size / global_batch)
    state = distcheckpoint.model_state(model, opt)
    saved = distcheckpoint.loaded_digest(state)
    verified_root, bare_root = root / f"verified-{width}", root / f"bare-{width}"
    bare: list[float] = []
    verified: list[float] = []
    def save_bare(i: int) -> None:
        state_dict_saver.save(state, checkpoint_id=bare_root / f"step-{i:07d}")

    def save_verified(i: int) -> None:
        distcheckpoint.save(verified_root, i, state, world_size=world.world_size, recipe_digest="bench",
                            keep_last=None)

    for i in range(saves + 1):  # save 0 of each kind is a warm-up (DCP's first plan), not timed
        for kind in (("bare", "verified") if i % 2 == 0 else ("verified", "bare")):
            if kind == "bare":
                bare.append(_timed(functools.partial(save_bare, i)))
            else:
                verified.append(_timed(functools.partial(save_verified, i)))
    bare, verified = bare[1:], verified[1:]
    last_bare = bare_root / f"step-{saves:07d}"
    state_bytes = sum(p.stat().st_size for p in last_bare.iterdir())
    back = _fresh_state(width)
    state_dict_loader.load(back, checkpoint_id=last_bare)
    bare_loaded = distcheckpoint.loaded_digest(back)
    back = _fresh_state(width)
    distcheckpoint.load_latest(verified_root, back, recipe_digest="bench")
    verified_loaded = distcheckpoint.loaded_digest(back)
    bare, verified = _max_over_ranks(bare), _max_over_ranks(verified)
    ratios = [v / b for v, b in zip(verified, bare, strict=True)]
    ratio = statistics.median(ratios)
    params = sum(p.numel() for p in model.parameters())
    return SaveResult(width, params, saves, state_bytes, 1e3 * statistics.median(bare),
                      1e3 * statistics.median(verified), ratio, ratios, TARGET_SAVE, ratio <= TARGET_SAVE,
                      saved, bare_loaded, verified_loaded, bare_loaded == verified_loaded == saved)


def _run_dir(world: World, root: Path) -> Path:
    """A new run directory under ``root/runs``, the same path at every rank (rank 0 makes it)."""
    chosen: list[Path | None] = [None]
    if world.is_main:
        (root / "runs").mkdir(parents=True, exist_ok=True)
        chosen = [Path(tempfile.mkdtemp(dir=root / "runs")) / "run"]
    if world.world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    assert chosen[0] is not None
    return chosen[0]


def _loop(kind: str, world: World, root: Path, width: int, data: TensorDataset, global_batch: int) -> Loop:
    build = functools.partial(_build_mlp, width)
    if kind == "plain":
        return plain_loop(world, build, data, global_batch)
    micro = N_MICRO if kind == "canonical" else None
    return run_loop(world, build, data, global_batch, _run_dir(world, root), micro)


def _one_process_run(root: Path, width: int, run_steps: int, global_batch: int) -> str:
    """Rank 0's child process (no torchrun variables: one process, no group) runs the canonical Run
    alone; its final digest."""
    out = root / "alone-digest.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--width", str(width), "--run-steps",
           str(run_steps), "--global-batch", str(global_batch), "--dir", str(root), "--alone", str(out)]
    env = {k: v for k, v in os.environ.items()
           if k not in _TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    subprocess.run(cmd, env=env, check=True, timeout=300)
    return out.read_text().strip()


def alone(args: argparse.Namespace) -> None:
    """The canonical Run of (d) in this one process; its final digest into ``args.alone``."""
    _, _, _, width, _, run_steps = _settings(args)
    torch.set_num_threads(1)
    one = World(0, 1, 0, None, initialized_here=False)
    data = dataset(run_steps * args.global_batch, IN, OUT)
    loop = _loop("canonical", one, args.dir, width, data, args.global_batch)
    args.alone.write_text(loop.digest + "\n")


def _median_over_repeats(world: World, loops: list[Loop], value: Callable[[Loop], float]) -> float:
    """The median over repeats of ``value`` at each repeat's slowest rank."""
    return statistics.median(_max_over_ranks([value(loop) for loop in loops]))


def bench_runs(world: World, root: Path, repeats: int, run_steps: int, width: int,
               global_batch: int) -> RunResult:
    data = dataset(run_steps * global_batch, IN, OUT)
    for kind in KINDS:  # warm-up: imports, DDP's first buckets, the allocator
        _loop(kind, world, root, width, dataset(3 * global_batch, IN, OUT), global_batch)
    loops: dict[str, list[Loop]] = {kind: [] for kind in KINDS}
    for r in range(repeats):
        for kind in KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]:
            loops[kind].append(_loop(kind, world, root, width, data, global_batch))
    digests = {kind: {loop.digest for loop in loops[kind]} for kind in KINDS}
    agree = all(not all_equal_to_rank0(loop.digest, world) for kind in KINDS for loop in loops[kind])
    dist.barrier()
    one = _one_process_run(root, width, run_steps, global_batch) if world.is_main else ""
    dist.barrier()  # the other ranks wait for rank 0's child
    plain, ddp, canonical = (loops[kind] for kind in KINDS)
    ratios = [d.seconds / p.seconds for d, p in zip(ddp, plain, strict=True)]
    canonical_ratios = [c.seconds / d.seconds for c, d in zip(canonical, ddp, strict=True)]
    whole = statistics.median(d.whole / p.whole for d, p in zip(ddp, plain, strict=True))
    steps = plain[0].steps
    per_step = {kind: 1e3 * statistics.median(loop.seconds for loop in loops[kind]) / steps for kind in KINDS}
    hook_ms = {name: 1e3 * _median_over_repeats(world, ddp, lambda loop: loop.hooks[name]) / steps  # noqa: B023
               for name in ("step", "yield", "update")}
    share = _median_over_repeats(world, ddp, lambda loop: sum(loop.hooks.values()) / loop.seconds)
    ratio = statistics.median(ratios)
    plain_digest, ddp_digest, canonical_digest = (sorted(digests[kind])[0] for kind in KINDS)
    return RunResult(
        width, global_batch, N_MICRO, steps, repeats, per_step["plain"], per_step["ddp"],
        per_step["canonical"], ratio, ratios, TARGET_RUN, ratio <= TARGET_RUN, whole,
        statistics.median(canonical_ratios), canonical_ratios, hook_ms, share, plain_digest, ddp_digest,
        digests["plain"] == digests["ddp"] and len(digests["ddp"]) == 1, canonical_digest, one,
        one == canonical_digest, agree, all(len(d) == 1 for d in digests.values()))


def _report(world: World, steps: StepResult, saves: list[SaveResult], runs: RunResult, path: Path) -> None:
    n = world.world_size
    print(f"bench_ddp: {n} ranks (gloo, 1 thread each), MLP {IN}-{steps.width}-{steps.width}-{OUT} "
          f"({steps.params:,} params), Adam, global batch {steps.global_batch} in {steps.n_micro} "
          "micro-batches, "
          f"{steps.steps} steps x {steps.repeats} interleaved runs (first {WARMUP} steps of each left out)")
    header = f"{'':<34} {'baseline ms':>11} {'reprokit ms':>11} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    print(f"{'step: DDP vs canonical reduction':<34} {steps.ddp_ms:>11.3f} {steps.canonical_ms:>11.3f} "
          f"{steps.ratio:>6.3f}x")
    print(f"{'reduction alone: all_reduce vs':<34} {steps.reduce_all_reduce_ms:>11.3f} "
          f"{steps.reduce_canonical_ms:>11.3f} {steps.reduce_ratio:>6.3f}x")
    for save in saves:
        what = f"save {save.state_bytes / 2**20:.1f} MiB: dcp.save vs verified"
        print(f"{what:<34} {save.bare_ms:>11.3f} {save.verified_ms:>11.3f} {save.ratio:>6.3f}x   "
              f"{verdict(save.ratio, TARGET_SAVE)}")
    print(f"{'Run ddp vs plain DDP loop':<34} {runs.plain_ms:>11.3f} {runs.ddp_ms:>11.3f} "
          f"{runs.ratio:>6.3f}x   {verdict(runs.ratio, TARGET_RUN)}")
    print(f"{'Run canonical vs Run ddp':<34} {runs.ddp_ms:>11.3f} {runs.canonical_ms:>11.3f} "
          f"{runs.canonical_ratio:>6.3f}x")
    hooks = ", ".join(f"{name} {ms:.3f}" for name, ms in runs.hook_ms.items())
    print(f"Run ddp vs plain ({runs.steps} steps of global batch {runs.global_batch}, ms per step above, "
          f"{runs.repeats} interleaved repeats): in Run's hooks per step (ms, slowest rank) {hooks} = "
          f"{100 * runs.hook_share:.1f}% of the loop; Run() to finish() vs the plain loop "
          f"{runs.whole_ratio:.3f}x")
    print(f"floats per step: all-reduce of P = {steps.all_reduce_floats:,}; canonical all_gather of N·P = "
          f"{steps.gathered_floats:,} at every rank ({4 * steps.gathered_floats / 2**20:.1f} MiB)")
    print(f"checks: ranks agree {steps.ranks_agree}; every run of a mode bitwise the same "
          f"{steps.repeatable}; canonical at {n} ranks == canonical in one process "
          f"{steps.canonical_matches_one_process}; DDP vs canonical max |diff| "
          f"{steps.max_abs_diff_ddp_vs_canonical:.3g} (not bitwise: another order); "
          f"both checkpoints load back to the saved state {all(s.digests_match for s in saves)} "
          f"({saves[0].saves} saves of each kind and size); Run ddp ends on the plain DDP loop's final "
          f"digest {runs.run_matches_plain} ({runs.ddp_digest[:16]}…); Run canonical at {n} ranks == a "
          f"one-process canonical Run {runs.canonical_matches_one_process} ({runs.canonical_digest[:16]}…); "
          f"every Run and plain run: ranks agree {runs.ranks_agree}, repeats bitwise the same "
          f"{runs.repeatable}")
    results = {"world_size": n, "backend": world.backend, "threads_per_rank": torch.get_num_threads(),
               "step": asdict(steps), "saves": [asdict(s) for s in saves], "run": asdict(runs)}
    path.write_text(json.dumps(results, indent=2) + "\n")
    ratios = ", ".join(f"{s.ratio:.3f}x at {s.state_bytes / 2**20:.1f} MiB" for s in saves)
    print(f"SUMMARY: canonical/DDP step {steps.ratio:.3f}x; verified/bare DCP save {ratios} "
          f"(target <= {TARGET_SAVE:.2f}x); Run(ddp)/plain DDP loop {runs.ratio:.3f}x "
          f"({verdict(runs.ratio, TARGET_RUN)}), hooks {100 * runs.hook_share:.1f}% of the loop; "
          f"Run canonical/Run ddp {runs.canonical_ratio:.3f}x; results in {path}")


def worker(args: argparse.Namespace) -> None:
    repeats, steps, saves, width, save_width, run_steps = _settings(args)
    torch.set_num_threads(1)  # the thread count changes the bits on CPU
    world = init_process_group(timeout_s=300.0, backend="gloo")
    # a torchrun launched by hand gets a scratch folder next to the JSON, removed at the end
    root = args.dir or args.json.resolve().parent / f"bench_ddp-scratch-{os.environ.get('MASTER_PORT', '0')}"
    step_result = bench_steps(world, repeats, steps, width, args.global_batch)
    save_results = [bench_saves(world, root, saves, w, args.global_batch) for w in (width, save_width)]
    run_result = bench_runs(world, root, repeats, run_steps, width, args.global_batch)  # Run sets determinism
    if world.is_main:
        _report(world, step_result, save_results, run_result, args.json)
    leave_process_group(world)
    if world.is_main and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    # no interpreter finalization (tests/fixtures/dist/canonical_worker.py: gloo aborts a rank now and then)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(args: argparse.Namespace) -> int:
    """Run this script under torchrun --standalone (a free port) with a scratch folder; its exit code."""
    scratch = Path(tempfile.mkdtemp(prefix="bench_ddp-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           str(Path(__file__).resolve()), *sys.argv[1:], "--json", str(args.json.resolve()),
           "--dir", str(scratch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return agent.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"bench_ddp: still running after {LAUNCH_TIMEOUT:.0f} s; stopped", file=sys.stderr)
        agent.terminate()  # torchrun tears its workers (in their own sessions) down on SIGTERM
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    args = _parser().parse_args()
    if args.alone is not None:
        alone(args)
    elif "WORLD_SIZE" in os.environ:
        worker(args)
    else:
        sys.exit(launch(args))


if __name__ == "__main__":
    main()
