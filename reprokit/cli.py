"""The ``reprokit`` command (also ``python -m reprokit``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reprokit.config import TrainConfig
from reprokit.errors import ReprokitError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 with a one-line reason on bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ReprokitError as e:
        print(f"reprokit {args.command}: error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from reprokit.train import train

    config = TrainConfig.from_file(args.config)
    result = train(config, args.run_dir)
    print(f"run dir      {args.run_dir}")
    print(f"steps        {result.steps}")
    print(f"{result.metric_name:<12} {result.final_metric:.4f}")
    print(f"final digest {result.final_digest}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from reprokit.report import run_report

    runs = run_report(args.profile, args.out)
    print(runs[["notebook", "status", "seconds", "error"]].to_string(index=False))
    print(f"index: {args.out}/index.html")
    return 0 if (runs["status"] == "ok").all() else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reprokit", description="Prove a PyTorch training run is reproducible."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a config file into a run directory")
    p.add_argument("--config", required=True, help="a .yaml or .json TrainConfig")
    p.add_argument("--run-dir", required=True, help="a new directory for the run's records")
    p.set_defaults(func=_train)
    p = sub.add_parser("report", help="execute every notebook with papermill and render HTML")
    p.add_argument("--profile", default="smoke", help="a profile in notebooks/profiles.yaml")
    p.add_argument("--out", default="reports", help="where the executed notebooks and HTML go")
    p.set_defaults(func=_report)
    return parser
