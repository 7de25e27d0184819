"""Recoverability experiments: kill runs at chosen points, resume them, compare with the reference.

The recoverability ratio of the essays is R = P_r / P_t. The essay's "performance before the crash"
is ambiguous; here both are measured at the *same step*, the run's last: P_r is the validation
metric of the killed-and-resumed model, P_t that of the uninterrupted reference. R = 1 and an equal
final digest is full recovery; R = 1 with a different digest is recovery within noise only.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from reprokit.checkpoint import CONTENTS_FILE, META_FILE, STATE_FILE, TENSORS_FILE
from reprokit.checkpointreader import list_checkpoints
from reprokit.config import TrainConfig
from reprokit.digests import max_abs_diff
from reprokit.errors import ReprokitError
from reprokit.rundir import MANIFEST, METRICS, read_json, read_metrics
from reprokit.scriptruns import (
    DEFAULT_TIMEOUT,
    ScriptRun,
    command_env,
    kill_command,
    resolve_command,
    run_command,
)
from reprokit.trainer import RunResult, train, verify_builtin

PHASES = ("step", "save", "external")
DAMAGES = ("truncated", "flipped byte", "missing file", "malicious pickle", "other architecture",
           "other config")


class RecoveryError(ReprokitError):
    """A fault-injection run did not die (or resume) the way the experiment needs."""


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: after optimizer step ``step`` ("step"), half-way through the checkpoint of
    ``step`` ("save"), or from outside at a random moment ("external", ``step`` is unused)."""

    step: int
    phase: str = "step"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise RecoveryError(f"kill phase {self.phase!r} is unknown; choose one of {list(PHASES)}")

    @property
    def label(self) -> str:
        return "external" if self.phase == "external" else f"{self.phase} {self.step}"


def kill_plan(
    total_steps: int,
    *,
    steps: Sequence[int] = (),
    saves: Sequence[int] = (),
    random_steps: int = 0,
    seed: int = 0,
    external: int = 0,
) -> list[KillPoint]:
    """The kill points of an experiment: chosen steps, mid-save kills, ``random_steps`` drawn
    with ``seed`` among the steps not chosen, and ``external`` kills from outside at random moments."""
    chosen = [KillPoint(s) for s in steps] + [KillPoint(s, "save") for s in saves]
    if random_steps:
        rest = sorted(set(range(1, total_steps + 1)) - set(steps))
        if random_steps > len(rest):
            raise RecoveryError(f"cannot draw {random_steps} more kill steps from {len(rest)} left")
        chosen += [KillPoint(s) for s in sorted(random.Random(seed).sample(rest, random_steps))]
    chosen += [KillPoint(0, "external")] * external
    if not chosen:
        raise RecoveryError("no kill points; pass steps, saves, random_steps or external")
    return chosen


def kill_run(config: TrainConfig, run_dir: Path, kill: KillPoint, *, seed: int = 0) -> None:
    """Train ``config`` into ``run_dir`` in a child process that gets SIGKILLed at ``kill``."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg = run_dir.parent / f".{run_dir.name}.config.json"
    cfg.write_text(json.dumps(config.to_dict()))
    cmd = [sys.executable, "-m", "reprokit", "train", "--config", str(cfg), "--run-dir", str(run_dir)]
    if kill.phase != "external":
        cmd += [f"--crash-{'at-step' if kill.phase == 'step' else 'during-save'}", str(kill.step)]
    env = {**os.environ, "REPROKIT_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill.phase == "external":
        _kill_from_outside(proc, run_dir, config, seed)
    _, err = proc.communicate(timeout=600)
    cfg.unlink(missing_ok=True)
    if proc.returncode != -signal.SIGKILL:
        tail = err.strip().splitlines()[-1:] or ["(no output)"]
        raise RecoveryError(
            f"the run in {str(run_dir)!r} was to be killed at {kill.label} but exited with "
            f"{proc.returncode}: {tail[0]}"
        )


def _kill_from_outside(proc: subprocess.Popen[str], run_dir: Path, config: TrainConfig, seed: int) -> None:
    """SIGKILL ``proc`` at a random moment once training has begun (start-up time excluded)."""
    metrics = run_dir / METRICS
    while proc.poll() is None and not (metrics.exists() and metrics.stat().st_size > 80):
        time.sleep(0.01)
    # a cnn step on digits takes a few ms; aim inside the run, not after it
    steps = config.steps or 100
    time.sleep(random.Random(seed).uniform(0.0, 0.003 * steps))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


def fault_matrix(
    target: TrainConfig | Sequence[str] | str | Callable[[], object],
    kill_points: Sequence[KillPoint],
    work_dir: str | Path,
    *,
    resume_threads: Sequence[int | None] = (None,),
    jobs: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[pd.DataFrame, RunResult | ScriptRun]:
    """Run the reference, kill a run at each point, resume each and compare with the reference.

    Args:
        target: the run: a :class:`TrainConfig` (needs ``checkpoint_every`` or
            ``checkpoint_seconds``), or the command of a script that uses :class:`reprokit.Run` and
            saves checkpoints, or such a training function (``"mypkg.train:main"`` or the function
            itself), run as a ``python -c`` command. A command is killed through
            ``REPROKIT_CRASH_AT_STEP`` / ``REPROKIT_CRASH_DURING_SAVE``, or from outside once
            metrics.csv shows the kill point's step (an external point's step, or one drawn at
            random when it is 0), and resumed by relaunching it unchanged.
        kill_points: where to kill.
        work_dir: a directory for the reference and the killed runs.
        resume_threads: resume every killed run once per entry; ``None`` resumes as the run started,
            an int resumes with that many intra-op threads (a cross-environment resume, forced).
        jobs: killed runs to start at once (each is a child process).
        timeout: seconds one run of a command may take.

    Returns:
        The fault table (one row per kill point and resume setting) and the reference result. A
        command's ``resume_latency_s`` is NaN: the relaunch's start-up is the script's own.
    """
    if not isinstance(target, TrainConfig):
        command = resolve_command(target)
        return _command_matrix(command, kill_points, Path(work_dir), resume_threads, jobs, timeout)
    from reprokit.resumer import resume  # resume imports train; kept local so train can import us

    config = target
    if not (config.checkpoint_every or config.checkpoint_seconds):
        raise RecoveryError("the config saves no checkpoints; set checkpoint_every (e.g. 10)")
    work = Path(work_dir)
    reference = train(config, work / "reference", progress=False)
    killed = [work / f"killed-{i:02d}-{k.phase}-{k.step}" for i, k in enumerate(kill_points)]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(lambda ik: kill_run(config, killed[ik[0]], ik[1], seed=ik[0]), enumerate(kill_points)))
    rows = []
    for i, (kill, run_dir) in enumerate(zip(kill_points, killed, strict=True)):
        for threads in resume_threads:
            target_dir = run_dir.with_name(f"{run_dir.name}-t{threads or config.threads}")
            shutil.copytree(run_dir, target_dir)
            changes = {"threads": threads} if threads is not None else None
            result = resume(target_dir, changes=changes, force=threads is not None, progress=False)
            assert result.resume is not None
            rows.append({
                **_kill_columns(i, kill, run_dir),
                "resumed_from": result.resume.from_step,
                "skipped": len(result.resume.skipped),
                "resume_latency_s": result.resume.latency_seconds,
                **_outcome(reference, result, config.threads, threads or config.threads, target_dir),
            })
    return pd.DataFrame(rows), reference


def _command_matrix(command: list[str], kill_points: Sequence[KillPoint], work: Path,
                    resume_threads: Sequence[int | None], jobs: int, timeout: float,
                    ) -> tuple[pd.DataFrame, ScriptRun]:
    """:func:`fault_matrix` of a user's command: every run is a subprocess, resumed by relaunching."""
    reference = run_command(command, command_env(work / "reference"), timeout=timeout)
    if not list_checkpoints(reference.run_dir):
        raise RecoveryError(f"`{shlex.join(command)}` saved no checkpoints in {reference.run_dir}, so a "
                            "killed run could only restart; pass checkpoint_every to reprokit.Run, or set "
                            "REPROKIT_CHECKPOINT_EVERY")
    killed = [work / f"killed-{i:02d}-{k.phase}-{k.step}" for i, k in enumerate(kill_points)]

    def kill(i: int) -> None:
        point = kill_points[i]
        variable = {"step": "REPROKIT_CRASH_AT_STEP", "save": "REPROKIT_CRASH_DURING_SAVE"}.get(point.phase)
        env = command_env(killed[i], extra={variable: str(point.step)} if variable else None)
        # from outside: once the chosen step is on disk (drawn short of the end, so the run is still going)
        after = None if variable else point.step or random.Random(i).randint(1, max(1, reference.steps - 1))
        kill_command(command, env, after_step=after, timeout=timeout)

    start = reference.threads

    def relaunch(i: int) -> list[ScriptRun]:
        # one copy at a time: copies of one run share its ledger row, which only one may finish
        runs = []
        for threads in resume_threads:
            target_dir = killed[i].with_name(f"{killed[i].name}-t{threads or start}")
            shutil.copytree(killed[i], target_dir)
            other = {"REPROKIT_THREADS": str(threads), "REPROKIT_FORCE": "1"} if threads is not None else None
            runs.append(run_command(command, command_env(target_dir, extra=other), timeout=timeout))
        return runs

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(kill, range(len(kill_points))))
        results = list(pool.map(relaunch, range(len(kill_points))))
    rows = []
    for i, runs in enumerate(results):
        for threads, result in zip(resume_threads, runs, strict=True):
            entry = (read_json(result.run_dir, MANIFEST).get("resumes") or [{}])[-1]  # none: killed before
            rows.append({
                **_kill_columns(i, kill_points[i], killed[i]),
                "resumed_from": int(entry.get("from_step") or 0),
                "skipped": len(entry.get("skipped") or []),
                "resume_latency_s": math.nan,
                **_outcome(reference, result, start, threads or start, result.run_dir),
            })
    return pd.DataFrame(rows), reference


def _kill_columns(i: int, kill: KillPoint, run_dir: Path) -> dict[str, Any]:
    return {"kill": f"external {i}" if kill.phase == "external" else kill.label, "phase": kill.phase,
            "kill_step": kill.step if kill.phase != "external" else _last_step_written(run_dir)}


def _outcome(reference: RunResult | ScriptRun, result: RunResult | ScriptRun, threads_start: int | None,
             threads_resume: int | None, run_dir: Path) -> dict[str, Any]:
    return {
        "threads_start": threads_start,
        "threads_resume": threads_resume,
        "identical": result.final_digest == reference.final_digest,
        "max_abs_diff": max_abs_diff(reference.final_state, result.final_state),
        "P_t": reference.final_metric,
        "P_r": result.final_metric,
        "R": result.final_metric / reference.final_metric,
        "run_dir": str(run_dir),
    }


def _last_step_written(run_dir: Path) -> int:
    """The last step whose metrics row reached the disk before the kill."""
    steps = pd.to_numeric(read_metrics(run_dir)["step"], errors="coerce").dropna()
    return int(steps.max()) if len(steps) else 0


def recovery_curves(table: pd.DataFrame, reference: RunResult | ScriptRun) -> pd.DataFrame:
    """Training loss per step of the reference and of every resumed run, in long form
    (run, kill, threads_resume, step, loss), read from the run directories."""
    threads = table["threads_start"].iloc[0] if len(table) else None
    frames = [pd.DataFrame({"run": "reference", "kill": "", "threads_resume": threads,
                            "step": range(len(reference.losses)), "loss": reference.losses})]
    for row in table.itertuples():
        metrics = read_metrics(str(row.run_dir))
        frames.append(pd.DataFrame({"run": Path(str(row.run_dir)).name, "kill": row.kill,
                                    "threads_resume": row.threads_resume, "step": metrics["step"],
                                    "loss": metrics["loss"]}))
    return pd.concat(frames, ignore_index=True).dropna(subset=["loss"])


def recovery_verdict(table: pd.DataFrame) -> pd.DataFrame:
    """Per resume thread count: how many resumes are bitwise identical, and the range of R."""
    out = table.groupby(["threads_start", "threads_resume"]).agg(
        resumes=("identical", "size"), identical=("identical", "sum"),
        R_min=("R", "min"), R_max=("R", "max"), max_abs_diff=("max_abs_diff", "max"),
        latency_median_s=("resume_latency_s", "median"),
    ).reset_index()
    out["verdict"] = [f"{int(i)}/{int(n)} resumes bitwise identical" for i, n in
                      zip(out["identical"], out["resumes"], strict=True)]
    return out


def damage_checkpoint(path: Path, damage: str, *, foreign: Path | None = None) -> None:
    """Damage one checkpoint directory the way ``damage`` says (for tests and the corruption table).

    ``other architecture`` and ``other config`` copy in ``foreign``, a checkpoint of another run.
    ``malicious pickle`` replaces ``state.pt`` by a pickle whose loading would create the file
    ``pwned`` next to it, and records its digest in contents.json as an attacker would.
    """
    data_file = path / (TENSORS_FILE if (path / TENSORS_FILE).exists() else STATE_FILE)  # the big one
    if damage == "truncated":
        data = data_file.read_bytes()
        data_file.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        flipped = bytearray(data_file.read_bytes())
        flipped[len(flipped) // 2] ^= 0x01
        data_file.write_bytes(bytes(flipped))
    elif damage == "missing file":
        (path / META_FILE).unlink()
    elif damage == "malicious pickle":
        import pickle

        _forge(path, STATE_FILE, pickle.dumps(_Exploit(str(path / "pwned")), protocol=2))
    elif damage in ("other architecture", "other config"):
        if foreign is None:
            raise RecoveryError(f"damage {damage!r} needs `foreign`, a checkpoint of another run")
        config = json.loads((path / META_FILE).read_text())["config"]
        shutil.rmtree(path)
        shutil.copytree(foreign, path)
        if damage == "other architecture":
            # same config, other weights layout: what a changed model definition in the code gives
            meta = json.loads((path / META_FILE).read_text())
            _forge(path, META_FILE, json.dumps({**meta, "config": config}).encode())
    else:
        raise RecoveryError(f"damage {damage!r} is unknown; choose one of {list(DAMAGES)}")


def _forge(path: Path, fname: str, data: bytes) -> None:
    """Replace one file and record its digest in contents.json, as a deliberate forger would."""
    import xxhash

    (path / fname).write_bytes(data)
    contents = json.loads((path / CONTENTS_FILE).read_text())
    contents["files"][fname] = {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    (path / CONTENTS_FILE).write_text(json.dumps(contents))


class _Exploit:
    """Unpickling this creates a file: the canary for "loading runs no code"."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (Path(self.marker),))


def corruption_table(config: TrainConfig, work_dir: str | Path) -> pd.DataFrame:
    """Damage the newest checkpoint of a run in each way of ``DAMAGES``; say what verify and
    resume make of it. ``config`` must save at least two checkpoints."""
    from reprokit.resumer import pick_checkpoint

    work = Path(work_dir)
    base = work / "base"
    train(config, base, progress=False)
    if len(list_checkpoints(base)) < 2:
        raise RecoveryError("the config must leave at least 2 checkpoints; lower checkpoint_every")
    other_model = "mlp" if config.model != "mlp" else "cnn"
    foreign_arch = train(config.replace(model=other_model), work / "foreign-arch", progress=False)
    foreign_cfg = train(config.replace(lr=config.lr * 2), work / "foreign-config", progress=False)
    foreigns = {"other architecture": foreign_arch, "other config": foreign_cfg}
    rows = []
    for damage in DAMAGES:
        run = work / damage.replace(" ", "-")
        shutil.copytree(base, run)
        (run / "result.json").unlink()  # make it resumable: as if killed after its last checkpoint
        newest = list_checkpoints(run)[0]
        foreign = foreigns.get(damage)
        foreign_ckpt = list_checkpoints(foreign.run_dir)[0] if foreign and foreign.run_dir else None
        damage_checkpoint(newest, damage, foreign=foreign_ckpt)
        verdict = verify_builtin(run)
        bad = verdict[verdict["checkpoint"] == newest.name].iloc[0]
        chosen, skipped = pick_checkpoint(run)
        fallback = f"{chosen} (skips {len(skipped)})" if chosen else "step 0 (nothing valid)"
        rows.append({
            "damage": damage,
            "checkpoint": newest.name,
            "verify": bad["status"],
            "problem": bad["problem"].replace(str(run) + "/", ""),
            "resume_uses": fallback,
            "code_ran": (newest / "pwned").exists(),
        })
    return pd.DataFrame(rows)

