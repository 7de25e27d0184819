"""The ``reprokit`` command (also ``python -m reprokit``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# each command imports what it needs (torch, pandas, yaml) in its body, so that building the parser
# and `--help` stay fast; tests/test_packaging.py checks --help loads no torch
from reprokit.errors import ConfigError, ReprokitError

if TYPE_CHECKING:
    from reprokit.trainer import RunResult


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
    from reprokit.config import TrainConfig
    from reprokit.faults import Faults
    from reprokit.trainer import train

    config = TrainConfig.from_file(args.config)
    faults = Faults(crash_at_step=args.crash_at_step, crash_during_save=args.crash_during_save)
    _print_result(train(config, args.run_dir, faults=faults))
    return 0


def _resume(args: argparse.Namespace) -> int:
    from reprokit.resumer import resume

    changes: dict[str, Any] = dict(_assignment(a) for a in args.set)
    if args.threads is not None:
        changes["threads"] = args.threads
    result = resume(args.run_dir, changes=changes, force=args.force)
    info = result.resume
    assert info is not None
    for name, why in info.skipped:
        print(f"skipped      {name}: {why}")
    where = f"{info.checkpoint} (step {info.from_step})" if info.checkpoint else "step 0 (nothing valid)"
    print(f"resumed from {where} in {info.latency_seconds:.2f} s")
    for diff in info.differences:
        print(f"forced       {diff}")
    _print_result(result)
    return 0


def _verify(args: argparse.Namespace) -> int:
    import pandas as pd

    from reprokit.checkpoint import verify_run
    from reprokit.rundir import MANIFEST, read_json

    table = verify_run(args.run_dir, config=read_json(args.run_dir, MANIFEST)["config"])
    if table.empty:
        print(f"{args.run_dir}: no checkpoints")
        return 1
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        print(table.to_string(index=False))
    bad = int((table["status"] != "ok").sum())
    print(f"{len(table) - bad}/{len(table)} checkpoints verify")
    return 0 if bad == 0 else 1


def _runs(args: argparse.Namespace) -> int:
    import pandas as pd

    from reprokit.ledger import runs

    filters: dict[str, Any] = dict(_assignment(a) for a in args.where)
    table = runs(args.ledger, **filters)
    if table.empty:
        print("no runs recorded" + (f" matching {filters}" if filters else ""))
        return 0
    with pd.option_context("display.max_colwidth", 40, "display.width", 250, "display.max_columns", 20):
        print(table.to_string(index=False))
    return 0


def _lineage(args: argparse.Namespace) -> int:
    import pandas as pd

    from reprokit.finetuning import lineage

    table = lineage(args.run_dir)
    with pd.option_context("display.max_colwidth", 60, "display.width", 250, "display.max_columns", 20):
        print(table.to_string(index=False))
    return 0 if table["verified"].ne(False).all() else 1


def _compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from reprokit.compare import compare_runs

    comparison = compare_runs(args.a, args.b)
    print(comparison.describe())
    if args.plot:
        from reprokit.trace_plots import plot_divergence

        plot_divergence(comparison).savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    if args.gap:
        with pd.option_context("display.width", 200, "display.max_rows", 60):
            print(comparison.gap.to_string(index=False))
    return 0 if comparison.identical else 1


def _reproduce(args: argparse.Namespace) -> int:
    from reprokit.reproduction import reproduce

    changes: dict[str, Any] = dict(_assignment(a) for a in args.set)
    if args.threads is not None:
        changes["threads"] = args.threads
    rep = reproduce(args.run_dir, args.out, changes=changes, tolerance=args.tolerance)
    print(rep.describe())
    return 0 if rep.verdict != "failed" else 1


def _print_result(result: RunResult) -> None:
    print(f"run dir      {result.run_dir}")
    print(f"steps        {result.steps}")
    print(f"{result.metric_name:<12} {result.final_metric:.4f}")
    print(f"final digest {result.final_digest}")


def _assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so 2 is an int, true a bool, 1e-3 a float)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r} is not key=value; pass e.g. --set checkpoint_every=10")
    return key.strip(), yaml.safe_load(value)


def _report(args: argparse.Namespace) -> int:
    from reprokit.report import NOTEBOOKS_DIR, NotebookRun, run_report

    def done(run: NotebookRun) -> None:
        where = f" at cell {run.error_cell}" if run.error_cell is not None else ""
        print(f"{run.status:<6} {run.seconds:7.1f} s  {run.notebook}"
              + (f"  ({run.error}{where})" if run.error else ""), flush=True)

    code = "removed" if args.no_input else "hidden" if args.hide_input else "shown"
    runs = run_report(args.profile, args.out, notebooks_dir=args.notebooks_dir or NOTEBOOKS_DIR,
                      only=args.notebook, jobs=args.jobs, code=code,
                      cell_timeout=args.cell_timeout or None, on_done=done)
    failed = int((runs["status"] != "ok").sum())
    print(f"{len(runs) - failed}/{len(runs)} notebooks ok; index: {args.out}/index.html")
    return 0 if failed == 0 else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reprokit", description="Prove a PyTorch training run is reproducible."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a config file into a run directory")
    p.add_argument("--config", required=True, help="a .yaml or .json TrainConfig")
    p.add_argument("--run-dir", required=True, help="a new directory for the run's records")
    p.add_argument("--crash-at-step", type=int, metavar="K",
                   help="fault injection: SIGKILL right after optimizer step K")
    p.add_argument("--crash-during-save", type=int, metavar="K",
                   help="fault injection: SIGKILL half-way through writing the checkpoint of step K")
    p.set_defaults(func=_train)
    p = sub.add_parser("resume", help="finish a killed run from its newest valid checkpoint")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--threads", type=int, help="resume with this many intra-op threads (needs --force)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a config field on resume (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="resume despite config/data/code differences (recorded in the manifest)")
    p.set_defaults(func=_resume)
    p = sub.add_parser("verify", help="check every checkpoint of a run and print a table")
    p.add_argument("run_dir", help="the run directory")
    p.set_defaults(func=_verify)
    p = sub.add_parser("runs", help="the run ledger as a table")
    p.add_argument("--ledger", help="the ledger file (default: $REPROKIT_LEDGER, else runs/ledger.sqlite)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep rows whose column equals the value (repeatable), e.g. --where status=finished")
    p.set_defaults(func=_runs)
    p = sub.add_parser("lineage", help="a run and its parents, child first (exit 1 if a parent changed)")
    p.add_argument("run_dir", help="the run directory")
    p.set_defaults(func=_lineage)
    p = sub.add_parser("reproduce", help="rerun a finished run from its manifest; verdict and "
                       "environment differences (exit 1 if the metric moved beyond the tolerance)")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--out", help="where the rerun goes (default: RUN_DIR-reproduced)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="largest |metric difference| still counted as reproduced (default 0.01)")
    p.add_argument("--threads", type=int, help="reproduce with this many intra-op threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a config field for the rerun (repeatable)")
    p.set_defaults(func=_reproduce)
    p = sub.add_parser("compare", help="are two runs identical? if not, where, when and why they split "
                       "(exit 0 identical, 1 not)")
    p.add_argument("a", help="a run directory")
    p.add_argument("b", help="another run directory")
    p.add_argument("--gap", action="store_true", help="also print the gap table, one row per step")
    p.add_argument("--plot", metavar="FILE.png", help="save the divergence plot")
    p.set_defaults(func=_compare)
    p = sub.add_parser("report", help="execute every notebook with papermill and render HTML")
    p.add_argument("--profile", default="smoke", help="a profile in notebooks/profiles.yaml")
    p.add_argument("--out", default="reports", help="where the executed notebooks and HTML go")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="notebooks to run at once, each "
                   "in its own process")
    p.add_argument("--notebook", action="append", default=[], metavar="NAME",
                   help="run only this notebook (name or number, e.g. 03; repeatable)")
    p.add_argument("--notebooks-dir", help="where the notebooks and profiles.yaml are (default: notebooks/)")
    p.add_argument("--cell-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="fail a notebook whose cell runs longer than this (default 1800; 0: no limit)")
    code = p.add_mutually_exclusive_group()
    code.add_argument("--hide-input", action="store_true",
                      help="pages open with code hidden (default: shown; a button toggles it)")
    code.add_argument("--no-input", action="store_true", help="render pages without code cells' input")
    p.set_defaults(func=_report)
    return parser
