"""Launching the command line's own commands under torchrun: ``reprokit train --nproc N``, and
``reprokit resume`` of a built-in run trained at N ranks.

The process becomes ``torchrun --standalone --nproc-per-node N -m reprokit ...`` (exec, no shell),
and torchrun's ranks run the same command without ``--nproc``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reprokit.errors import ConfigError, ReprokitError

if TYPE_CHECKING:
    from reprokit.config import TrainConfig


def launch_train(args: argparse.Namespace, config: TrainConfig) -> None:
    """``reprokit train --nproc N`` (N != 1): refuse here what every rank would refuse, then become
    torchrun running the same command at N ranks; returns only with ``--nproc 1``."""
    if args.nproc == 1:
        return
    _check_world(config, args.nproc)
    flags = [*(["--force"] if args.force else []), *_flag("--crash-at-step", args.crash_at_step),
             *_flag("--crash-during-save", args.crash_during_save)]
    _torchrun(args.nproc, config.threads, ["train", "--config", args.config, "--run-dir", args.run_dir,
                                           *flags])


def launch_resume(args: argparse.Namespace, changes: dict[str, Any]) -> None:
    """A built-in run trained under torchrun resumes under torchrun at its recorded world size
    (ddp mode refuses another; `reprokit train --nproc N` moves a canonical run to another N)."""
    from reprokit.rundir import MANIFEST, RESULT, read_json

    manifest = read_json(args.run_dir, MANIFEST)
    world_size = (manifest.get("distributed") or {}).get("world_size", 1)
    # one process; a rank of that relaunch; or finished (resume says so, once)
    if world_size == 1 or "WORLD_SIZE" in os.environ or (Path(args.run_dir) / RESULT).exists():
        return
    threads = changes.get("threads", (manifest.get("config") or {}).get("threads"))
    flags = [*(f"--set={a}" for a in args.set), *_flag("--threads", args.threads),
             *(["--force"] if args.force else [])]
    _torchrun(world_size, threads, ["resume", str(args.run_dir), *flags])


def _check_world(config: TrainConfig, nproc: int) -> None:
    """Refuse here, once, what every rank would refuse after writing its manifest."""
    from reprokit.distributed import check_divisible
    from reprokit.errors import DistributedError
    from reprokit.runreduce import check_reduction

    if nproc > 1:
        check_reduction(config.reduction, config.micro_batches, nproc)
        try:
            check_divisible(config.batch_size, nproc, config.micro_batches)
        except DistributedError as e:
            raise ConfigError(f"--nproc {nproc}: batch_size is the global batch, split over the ranks: "
                              f"{e}") from None


def _flag(name: str, value: Any) -> list[str]:
    return [name, str(value)] if value is not None else []


def _torchrun(nproc: Any, threads: Any, argv: list[str]) -> None:
    """Become ``torchrun --standalone --nproc-per-node N -m reprokit ARGV`` (this interpreter's
    torchrun, no shell): exec, so a scheduler's SIGTERM reaches torchrun, which passes it to the
    ranks, and the exit status is torchrun's."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc {nproc!r} is not a number of processes; pass an int >= 1 "
                          "(1: train in this process)")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError(f"--nproc {nproc} launches torchrun, and this process runs under torchrun already "
                          f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); drop --nproc")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        raise ReprokitError(f"--nproc {nproc} needs torchrun next to this interpreter, and {torchrun} does "
                            "not exist; install torch into this environment (it ships torchrun), or pass "
                            "--nproc 1")
    # the ranks' intra-op threads: the config's (torchrun would set 1, with a warning)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if isinstance(threads, int) else {})}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(torchrun, [str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "-m", "reprokit",
                         *argv], env)
