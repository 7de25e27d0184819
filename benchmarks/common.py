"""What the training benchmarks share: the command line and the verdict line.

Imported by the scripts in this folder, which run as ``python benchmarks/NAME.py`` (so this
folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse


def training_parser(doc: str | None) -> argparse.ArgumentParser:
    """``--quick``, ``--repeats`` and ``--steps``; resolve them with :func:`repeats_and_steps`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="100 steps and 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    return parser


def repeats_and_steps(args: argparse.Namespace) -> tuple[int, int]:
    repeats: int = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    steps: int = args.steps if args.steps is not None else (100 if args.quick else 300)
    return repeats, steps


def verdict(ratio: float, target: float) -> str:
    return f"target <= {target:.2f}x: {'MET' if ratio <= target else 'MISSED'}"
