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
    from reprokit.config import TrainConfig
    from reprokit.trainer import RunResult


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 with a one-line reason on bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "yes", False):  # run the code a run directory names without asking
            from reprokit.relaunch import trusting

            with trusting():
                code: int = args.func(args)
        else:
            code = args.func(args)
        return code
    except ReprokitError as e:
        print(f"reprokit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused a path given (a name too long, a file as a folder...)
        print(f"reprokit {args.command}: error: {_os_reason(e)}", file=sys.stderr)
        return 2


def _os_reason(e: OSError) -> str:
    """``'PATH': why`` on one line, the path cut to 100 characters."""
    if e.filename is None or not e.strerror:
        return " ".join(str(e).split()) or type(e).__name__
    name = str(e.filename)
    shown = repr(name if len(name) <= 100 else f"{name[:97]}...")
    return f"{shown}: {e.strerror}; pass a path that exists and fits the file system"


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reprokit.config import TrainConfig, config_differences
    from reprokit.faults import Faults
    from reprokit.resumer import resume
    from reprokit.rundir import MANIFEST, RESULT, read_json
    from reprokit.torchlaunch import launch_train
    from reprokit.trainer import train

    config = TrainConfig.from_file(args.config)
    launch_train(args, config)  # torchrun's ranks run this command without --nproc
    faults = Faults(crash_at_step=args.crash_at_step, crash_during_save=args.crash_during_save)
    run_dir = Path(args.run_dir)
    # under torchrun every rank decides here, before Run joins the process group: rank 0 cannot write
    # a new run's manifest before every rank has looked
    if not (run_dir / MANIFEST).is_file():  # a new run (or one killed before its manifest was written)
        _print_result(train(config, run_dir, faults=faults))
        return 0
    # relaunch = resume: the cluster-requeue idiom (the same command, run again after a kill)
    if (run_dir / RESULT).is_file():
        digest = read_json(run_dir, RESULT).get("final_digest")
        if _rank() == "0":
            print(f"run {str(run_dir)!r} already finished (final digest {digest}); nothing to do")
        return 0
    recorded = read_json(run_dir, MANIFEST).get("config")
    if not isinstance(recorded, dict) or read_json(run_dir, MANIFEST).get("kind") == "script":
        raise ReprokitError(f"{str(run_dir)!r} holds a run of a script, not of the built-in trainer; "
                            f"continue it with `reprokit resume {run_dir}`")
    differences = config_differences(recorded, config.to_dict())
    if differences and not args.force:
        raise ReprokitError(f"{str(run_dir)!r} holds an unfinished run of another config: "
                            f"{'; '.join(differences)}; pass the same config, a new --run-dir, or --force")
    changes = {k: v for k, v in config.to_dict().items() if recorded.get(k) != v}
    _print_resumed(resume(run_dir, changes=changes, force=args.force))
    return 0


def _resume(args: argparse.Namespace) -> int:
    from reprokit.relaunch import is_script_run, run_recorded
    from reprokit.resumer import resume
    from reprokit.torchlaunch import launch_resume

    if is_script_run(args.run_dir):  # re-execute the recorded command: its reprokit.Run resumes
        if args.set or args.threads is not None:
            raise ReprokitError("--set/--threads apply to built-in runs; a script run resumes with its "
                                "own recorded command (set REPROKIT_THREADS and --force to change threads)")
        env = {"REPROKIT_PROGRESS": "0"} if not sys.stderr.isatty() else {}
        return run_recorded(args.run_dir, args.run_dir, force=args.force, env=env)
    changes: dict[str, Any] = dict(_assignment(a) for a in args.set)
    if args.threads is not None:
        changes["threads"] = args.threads
    launch_resume(args, changes)
    _print_resumed(resume(args.run_dir, changes=changes, force=args.force))
    return 0


def _rank() -> str:
    """This process's rank under torchrun ("0" outside it): rank 0 speaks for the run (one model)."""
    import os

    return os.environ.get("RANK", "0")


def _print_resumed(result: RunResult) -> None:
    info = result.resume
    assert info is not None
    if _rank() != "0":
        return
    for name, why in info.skipped:
        print(f"skipped      {name}: {why}")
    where = f"{info.checkpoint} (step {info.from_step})" if info.checkpoint else "step 0 (nothing valid)"
    print(f"resumed from {where} in {info.latency_seconds:.2f} s")
    for diff in info.differences:
        print(f"forced       {diff}")
    _print_result(result)


def _verify(args: argparse.Namespace) -> int:
    import pandas as pd

    from reprokit.checkpointreader import verify_run
    from reprokit.rundir import MANIFEST, read_json
    from reprokit.trainer import verify_builtin

    manifest = read_json(args.run_dir, MANIFEST)
    # a built-in run's checkpoints are also checked against the model its config builds
    script = manifest.get("kind") == "script"
    table = verify_run(args.run_dir) if script else verify_builtin(args.run_dir)
    if table.empty:
        print(f"{args.run_dir}: no checkpoints")
        return 1
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        print(table.to_string(index=False))
    bad = int((table["status"] != "ok").sum())
    print(f"{len(table) - bad}/{len(table)} checkpoints verify")
    return 0 if bad == 0 else 1


def _runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from reprokit.ledger import default_ledger_path, rebuild, runs

    if args.rebuild:
        root = Path(args.root) if args.root else (Path(args.ledger).parent if args.ledger else Path("runs"))
        path = args.ledger or default_ledger_path(root)
        print(f"rebuilt {path} from {root}: {rebuild(root, path)} runs")
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

    comparison = compare_runs(args.a, args.b, replay=args.replay)
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
    from pathlib import Path

    from reprokit.relaunch import is_script_run
    from reprokit.reproduction import reproduce, reproduce_script

    changes: dict[str, Any] = dict(_assignment(a) for a in args.set)
    if args.threads is not None:
        changes["threads"] = args.threads
    if is_script_run(args.run_dir):
        if args.set:
            raise ReprokitError("--set applies to built-in runs; a script run is reproduced with its own "
                                "recorded command (--threads sets REPROKIT_THREADS)")
        env = {"REPROKIT_THREADS": str(args.threads)} if args.threads is not None else {}
        out = args.out or f"{Path(args.run_dir)}-reproduced"
        rep = reproduce_script(args.run_dir, out, tolerance=args.tolerance, env=env)
    else:
        rep = reproduce(args.run_dir, args.out, changes=changes, tolerance=args.tolerance)
    print(rep.describe())
    return 0 if rep.verdict != "failed" else 1


def _audit(args: argparse.Namespace) -> int:
    import pandas as pd

    from reprokit.audit import audit_determinism, determinism_verdict, world_size_effect
    from reprokit.config import TrainConfig
    from reprokit.scriptruns import function_command

    command = list(args.train_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if [bool(command), bool(args.config), bool(args.function)].count(True) != 1:
        raise ConfigError("pass one of --config CFG, --function MODULE:FUNCTION or a command after --, "
                          "e.g. `reprokit audit --vary threads=1,2 -- python train.py`")
    if args.function:
        command = function_command(args.function)  # refuses a bad MODULE:FUNCTION, naming it
    target: TrainConfig | list[str] = TrainConfig.from_file(args.config) if args.config else command
    vary = dict(_factor(text) for text in args.vary)
    audit = audit_determinism(target, args.seeds, args.repeats, vary, jobs=args.jobs, work_dir=args.work_dir,
                              timeout=args.timeout)
    verdict = determinism_verdict(audit)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 40):
        print(audit.drop(columns=["losses"]).to_string(index=False))
        print()
        print(verdict.to_string(index=False))
        if "world_size" in audit.columns:  # per reduction mode: do the world sizes give one model?
            print()
            print(world_size_effect(audit).to_string(index=False))
    repeats_identical = verdict["bitwise_identical"].iloc[0] == "yes"
    print("repeats: " + ("every repeat is bitwise identical" if repeats_identical else
                         "repeats with the same settings differ: the run is not deterministic"))
    return 0 if repeats_identical else 1


def _factor(text: str) -> tuple[str, list[Any]]:
    """``name=v1,v2`` with each value read as YAML (so 2 is an int, true a bool)."""
    import yaml

    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise ConfigError(f"--vary {text!r} is not name=value,value; pass e.g. --vary threads=1,2")
    return name.strip(), [yaml.safe_load(v) for v in values.split(",")]


def _print_result(result: RunResult) -> None:
    if _rank() != "0":
        return
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
    p.add_argument("--run-dir", required=True, help="the run's directory: new, or a killed run of the "
                   "same config to resume (relaunching the same command resumes; finished: exit 0)")
    p.add_argument("--force", action="store_true",
                   help="resume a run of another config (the differences are recorded in the manifest)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes: become `torchrun --standalone --nproc-per-node N -m "
                   "reprokit train ...` with OMP_NUM_THREADS=threads; the config's reduction says how "
                   "gradients are combined ('ddp', or 'canonical': the bits of one process); default 1")
    p.add_argument("--crash-at-step", type=int, metavar="K",
                   help="fault injection: SIGKILL right after optimizer step K")
    p.add_argument("--crash-during-save", type=int, metavar="K",
                   help="fault injection: SIGKILL half-way through writing the checkpoint of step K")
    p.set_defaults(func=_train)
    p = sub.add_parser("resume", help="finish a killed run from its newest valid checkpoint (a script "
                       "run: re-execute its recorded command; a built-in run trained with --nproc N: "
                       "under torchrun at N ranks)")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--threads", type=int, help="resume with this many intra-op threads (needs --force)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a config field on resume (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="resume despite config/data/code differences (recorded in the manifest)")
    p.add_argument("--yes", action="store_true", help="a script run: run its recorded command even if it "
                   "lies outside this project (shown first; asked at a terminal)")
    p.set_defaults(func=_resume)
    p = sub.add_parser("verify", help="check every checkpoint of a run and print a table")
    p.add_argument("run_dir", help="the run directory")
    p.set_defaults(func=_verify)
    p = sub.add_parser("runs", help="the run ledger as a table")
    p.add_argument("--ledger", help="the ledger file (default: $REPROKIT_LEDGER, else runs/ledger.sqlite)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep rows whose column equals the value (repeatable), e.g. --where status=finished")
    p.add_argument("--rebuild", action="store_true", help="write the ledger again from the run directories "
                   "under --root (the old file is set aside)")
    p.add_argument("--root", help="with --rebuild: the directory holding the run directories (default: the "
                   "ledger's directory, else runs/)")
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
    p.add_argument("--yes", action="store_true", help="a script run: run its recorded command even if it "
                   "lies outside this project (shown first; asked at a terminal)")
    p.set_defaults(func=_reproduce)
    p = sub.add_parser("compare", help="are two runs identical? if not, where, when and why they split "
                       "(exit 0 identical, 1 not)")
    p.add_argument("a", help="a run directory")
    p.add_argument("b", help="another run directory")
    p.add_argument("--gap", action="store_true", help="also print the gap table, one row per step")
    p.add_argument("--plot", metavar="FILE.png", help="save the divergence plot")
    p.add_argument("--replay", action="store_true", help="confirm a nondeterminism/environment cause: "
                   "replay the first differing step twice here from a's checkpoint before it")
    p.add_argument("--yes", action="store_true", help="a script run: run its recorded command even if it "
                   "lies outside this project (shown first; asked at a terminal)")
    p.set_defaults(func=_compare)
    p = sub.add_parser("audit", help="rerun a config or a command over seeds, repeats and factors; which "
                       "change the bits? (exit 0 if every repeat is bitwise identical, 1 if not)")
    p.add_argument("--config", help="a .yaml or .json TrainConfig (or give a command after --)")
    p.add_argument("--function", metavar="MODULE:FUNCTION", help="a training function that uses "
                   "reprokit.Run, e.g. mypkg.train:main, called with no arguments in a fresh process per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="seeds (default: 0)")
    p.add_argument("--repeats", type=int, default=2, metavar="N", help="runs per setting (default 2)")
    p.add_argument("--vary", action="append", default=[], metavar="NAME=V1,V2",
                   help="a factor and its values, the first a command's base (repeatable), e.g. threads=1,2")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at once (default 1)")
    p.add_argument("--work-dir", help="where a command's run directories go (default: a temporary "
                   "directory, deleted afterwards)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop a command's run after this long, with an error (default 600)")
    p.add_argument("train_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="after --: the training command, e.g. -- python train.py --epochs 1")
    p.set_defaults(func=_audit)
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
