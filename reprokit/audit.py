"""Determinism audit: rerun a config, a user's command or a user's training function over seeds,
repeats and factors; say what changes the bits.

The reference run of a seed has every factor at its base value (a config's own; for a command,
the first value listed for each factor), repeat 0. Every other run of that seed is compared with
it by final digest, largest parameter difference and the first step and tensors at which their
per-step digests part. A command, or a function, runs as a subprocess per run
(:mod:`reprokit.scriptruns`).

Two factors the audit applies itself: ``world_size`` N launches the run under ``torchrun
--standalone --nproc-per-node N`` (a config through ``reprokit train --nproc N``; N = 1 is one plain
process, as ``--nproc 1`` is: :mod:`reprokit.worldruns`), and ``reduction`` (``ddp`` or
``canonical``) sets the config field or, for a command, ``REPROKIT_REDUCTION``
(:mod:`reprokit.overrides`); ``micro_batches`` goes with it.
:func:`world_size_effect` then says, per reduction mode, whether the world size changed the bits.
"""

from __future__ import annotations

import itertools
import multiprocessing
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from reprokit.compare import compare_runs
from reprokit.config import TrainConfig
from reprokit.digests import first_divergence, max_abs_diff
from reprokit.distributed import check_divisible
from reprokit.errors import ConfigError, DistributedError
from reprokit.runreduce import check_reduction
from reprokit.scriptruns import DEFAULT_TIMEOUT, ScriptRun, command_env, factor_variable, resolve_command
from reprokit.trainer import RunResult, show_progress, train
from reprokit.worldruns import launch_command, launch_training

FACTORS = ("threads", "deterministic", "num_workers")  # the factors the issue asks for, at least
# what a command's reduction factors set (the audit passes them itself: ddp takes no micro-batches)
_REDUCTION_VARIABLES = {"reduction": "REPROKIT_REDUCTION", "micro_batches": "REPROKIT_MICRO_BATCHES"}
WORLD_SIZE = "world_size"  # the factor that launches a run under torchrun with that many ranks
NONE = "none"  # the ``changed`` value of runs with every factor at its base value
_RESULT_COLUMNS = ("seed", "repeat", "changed", "final_metric", "metric", "final_digest", "identical",
                   "max_abs_diff", "diverged_step", "diverged_tensors", "cause", "seconds", "losses")


@dataclass(frozen=True)
class _Job:
    seed: int
    repeat: int
    factors: tuple[tuple[str, Any], ...]
    reference: bool  # repeat 0 with every factor at its base value

    @property
    def threads(self) -> int:
        return int(dict(self.factors).get("threads") or 1)

    @property
    def world_size(self) -> int:
        return int(dict(self.factors).get(WORLD_SIZE) or 1)

    @property
    def cores(self) -> int:
        """The run's slots of ``jobs``: each of its ranks pins ``threads``."""
        return self.threads * self.world_size

    @property
    def name(self) -> str:
        """A run directory name: seed, factors, repeat."""
        factors = "".join(f"-{n}{v}" for n, v in self.factors)
        return f"seed{self.seed}{factors}-r{self.repeat}"


def audit_determinism(
    target: TrainConfig | Sequence[str] | str | Callable[[], object],
    seeds: Sequence[int],
    repeats: int = 2,
    vary: Mapping[str, Sequence[Any]] | None = None,
    *,
    vary_seeds: Sequence[int] | None = None,
    jobs: int = 1,
    progress: bool | None = None,
    work_dir: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> pd.DataFrame:
    """Run every seed ``repeats`` times for each combination of the ``vary`` factors.

    Args:
        target: the base run: a :class:`TrainConfig` (each factor's base value is the config's own),
            a command such as ``[sys.executable, "train.py", "--epochs", "1"]`` whose script
            uses :class:`reprokit.Run` (each factor's base value is the first one listed), or a
            training function that uses it, as ``"mypkg.train:main"`` or the function itself,
            called with no arguments in a fresh ``python -c`` process per run, as a command is.
        seeds: training seeds to study.
        repeats: runs per (seed, factor combination), at least 1 (2 to test repeatability).
        vary: factor -> values to try, e.g. ``{"threads": [1, 2]}``; all combinations run. A config
            varies any field but the seed; a command or function ``threads``, ``deterministic``
            and ``num_workers``, passed as ``REPROKIT_THREADS`` etc. One seed source alone:
            ``seed.init``, ``seed.data_order``, ``seed.augmentation``, ``seed.dropout`` (a
            config's ``init_seed`` etc.; a command's ``REPROKIT_SEED_INIT`` etc.). Both vary
            ``world_size`` (N > 1 ranks under torchrun; its base is the first value listed) and
            ``reduction``/``micro_batches`` (a command's ``REPROKIT_REDUCTION`` and
            ``REPROKIT_MICRO_BATCHES``, whose loop must branch on ``run.reduction``); in mode ddp
            ``micro_batches`` is dropped, mode canonical needs one.
        vary_seeds: the seeds on which the ``vary`` combinations run (default: all); the other
            seeds run the base settings only, which keeps a many-seed variance study affordable.
        jobs: runs at once; results do not depend on it (each run pins its own threads).
        progress: one bar over runs; ``None`` follows ``REPROKIT_PROGRESS``.
        work_dir: a command's runs go to a new directory in it (default: a temporary directory,
            deleted afterwards).
        timeout: seconds a command's run (or a config's at N > 1 ranks) may take before the audit
            stops it, torchrun and every rank included, with an error.

    Returns:
        One row per run: seed, repeat, the factors, ``changed`` (factors off their base value),
        final metric and digest, ``identical`` to the seed's reference, ``max_abs_diff``,
        ``diverged_step`` and ``diverged_tensors`` (where the per-step digests first part),
        ``cause`` (:class:`reprokit.Cause` name against the reference: :func:`reprokit.compare_runs`),
        ``seconds`` and ``losses`` (the per-step loss curve).
    """
    config = target if isinstance(target, TrainConfig) else None
    # a bad function is refused before any run starts
    command = resolve_command(target) if not isinstance(target, TrainConfig) else []
    jobs_list = _plan(config, seeds, repeats, vary or {}, vary_seeds)
    cores = [j.cores for j in jobs_list]
    with tempfile.TemporaryDirectory(prefix="reprokit-audit-") as scratch:
        root = Path(work_dir if work_dir is not None else scratch)
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="audit-", dir=root))  # always fresh: a used run dir resumes
        if config is not None:  # into run directories too: the cause column compares them
            calls = [partial(_run_one, _job_config(config, j), work / j.name, j.world_size, timeout)
                     for j in jobs_list]
            return _table(jobs_list, _run_all(calls, cores, jobs, progress, _spawn_pool))
        runs = [partial(launch_command, command, _job_env(work / j.name, j), j.world_size, timeout=timeout)
                for j in jobs_list]
        return _table(jobs_list, _run_all(runs, cores, jobs, progress, ThreadPoolExecutor))


def _job_config(config: TrainConfig, job: _Job) -> TrainConfig:
    """The job's config: its seed and factors (world_size is how it is launched, not a field);
    mode ddp has no micro-batches."""
    fields = {**config.to_dict(), **{n: v for n, v in job.factors if n != WORLD_SIZE}, "seed": job.seed}
    if fields["reduction"] == "ddp":
        fields["micro_batches"] = None
    return TrainConfig.from_dict(fields)


def _job_env(run_dir: Path, job: _Job) -> dict[str, str]:
    """A command's environment: the contract's variables for the seed and factors, and the reduction
    mode's (mode ddp with no micro-batch count)."""
    factors = {n: v for n, v in job.factors if n != WORLD_SIZE and n not in _REDUCTION_VARIABLES}
    reduction = dict(job.factors)
    if reduction.get("reduction") == "ddp":
        reduction.pop("micro_batches", None)
    extra = {_REDUCTION_VARIABLES[n]: str(v) for n, v in reduction.items() if n in _REDUCTION_VARIABLES}
    return command_env(run_dir, seed=job.seed, factors=factors, extra=extra)


def _table(jobs_list: list[_Job], results: Sequence[RunResult | ScriptRun]) -> pd.DataFrame:
    references = {j.seed: (j, r) for j, r in zip(jobs_list, results, strict=True) if j.reference}
    rows = []
    for job, result in zip(jobs_list, results, strict=True):
        ref_job, ref = references[job.seed]
        base = dict(ref_job.factors)
        div = first_divergence(ref.tensor_digests, result.tensor_digests)
        rows.append({
            "seed": job.seed,
            "repeat": job.repeat,
            **dict(job.factors),
            "changed": ",".join(n for n, v in job.factors if v != base[n]) or NONE,
            "final_metric": result.final_metric,
            "metric": result.metric_name,
            "final_digest": result.final_digest,
            "identical": result.final_digest == ref.final_digest,
            "max_abs_diff": max_abs_diff(ref.final_state, result.final_state),
            "diverged_step": div.step if div else None,
            "diverged_tensors": ", ".join(div.tensors) if div else "",
            "cause": _cause(ref.run_dir, result.run_dir) if result.final_digest != ref.final_digest
            else "identical",
            "seconds": result.seconds,
            "losses": result.losses[1:],  # step 0 has no loss
        })
    frame = pd.DataFrame(rows)
    frame["diverged_step"] = frame["diverged_step"].astype("Int64")  # None stays <NA>, not NaN
    return frame


def _plan(
    config: TrainConfig | None, seeds: Sequence[int], repeats: int, vary: Mapping[str, Sequence[Any]],
    vary_seeds: Sequence[int] | None = None,
) -> list[_Job]:
    """The runs, each seed's reference first; ``config`` None plans a command's runs."""
    _check_runs(seeds, repeats, vary_seeds)
    if config is not None:  # one seed source, "seed.init": the config field init_seed
        vary = {(f"{n[5:]}_seed" if n.startswith("seed.") else n): v for n, v in vary.items()}
    _check_vary(config, vary)
    names = list(vary)
    if config is not None and config.threads is None:
        # pin what this process uses, so runs in fresh worker processes use the same count
        config = config.replace(threads=torch.get_num_threads())
    # a config's own value is each factor's base; a command's (and the world size's) the first listed
    base = tuple(next(iter(vary[n])) if config is None or n == WORLD_SIZE else getattr(config, n)
                 for n in names)
    # the base combination first, so each seed's reference run is planned before the others
    combos = [base] + [c for c in itertools.product(*(list(vary[n]) for n in names)) if c != base]
    jobs = [
        _Job(seed, repeat, tuple(zip(names, combo, strict=True)), reference=repeat == 0 and i == 0)
        for seed in seeds
        for i, combo in enumerate(combos if vary_seeds is None or seed in vary_seeds else combos[:1])
        for repeat in range(repeats)
    ]
    for job in jobs:  # a bad value is refused now, not in the middle of the audit
        _check_world(_job_config(config, job) if config is not None else None, job.world_size)
    return jobs


def _check_world(config: TrainConfig | None, world_size: int) -> None:
    """A config's world size must split its batch (and micro-batches), as ``--nproc`` checks; a
    command's script checks its own when it starts."""
    if config is None or world_size == 1:
        return
    try:
        check_reduction(config.reduction, config.micro_batches, world_size)
        check_divisible(config.batch_size, world_size, config.micro_batches)
    except DistributedError as e:
        raise ConfigError(f"vary world_size {world_size}: {e}") from None


def _check_runs(seeds: Sequence[int], repeats: int, vary_seeds: Sequence[int] | None) -> None:
    if not seeds:
        raise ConfigError("seeds is empty; pass at least one seed, e.g. seeds=[0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {list(seeds)} has duplicates; pass each seed once")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats {repeats!r} must be an int >= 1; pass e.g. repeats=2")
    if vary_seeds is not None and not set(vary_seeds) <= set(seeds):
        raise ConfigError(
            f"vary_seeds {sorted(set(vary_seeds) - set(seeds))} are not among seeds {list(seeds)}; "
            "pass a subset of seeds"
        )


def _check_vary(config: TrainConfig | None, vary: Mapping[str, Sequence[Any]]) -> None:
    fields = set(config.to_dict()) if config is not None else set()
    for name, values in vary.items():
        if name == WORLD_SIZE or (config is None and name in _REDUCTION_VARIABLES):
            pass  # the audit applies these itself
        elif config is None:
            try:
                factor_variable(name)  # refuses a factor a command cannot vary, naming those it can
            except ConfigError as e:
                raise ConfigError(f"{e}; or the audit's own {[WORLD_SIZE, *_REDUCTION_VARIABLES]}") from None
        elif name not in fields or name == "seed":
            raise ConfigError(
                f"cannot vary {name!r}; vary config fields other than seed, e.g. {list(FACTORS)}, "
                f"or {WORLD_SIZE!r}"
            )
        if isinstance(values, str) or not isinstance(values, Iterable) or not list(values):
            raise ConfigError(f"vary[{name!r}] = {values!r} must be a non-empty list of values")
        if name == WORLD_SIZE and not all(_positive_int(v) for v in values):
            raise ConfigError(f"vary[{name!r}] = {list(values)!r} must list numbers of ranks, ints >= 1, "
                              "e.g. [1, 2]")
        if config is None and name == "reduction" and not set(values) <= {"ddp", "canonical"}:
            raise ConfigError(f"vary['reduction'] = {list(values)!r}: a reduction mode is 'ddp' or "
                              "'canonical'")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _spawn_pool(workers: int) -> Executor:
    # spawn, not fork: forking a process whose OpenMP pool is running can hang the child
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _run_all(
    calls: Sequence[Callable[[], Any]], threads: Sequence[int], jobs: int, progress: bool | None,
    pool: Callable[[int], Executor],
) -> list[Any]:
    """Run every call, ``jobs`` at a time, results in the order of ``calls``.

    A run pinned to t threads takes t of the ``jobs`` slots: two 2-thread runs on 2 cores spin
    OpenMP threads against each other and run ~10x slower (measured here). So runs are grouped by
    thread count and each group gets ``jobs // threads`` workers.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs {jobs!r} must be an int >= 1; pass e.g. jobs=2")
    results: list[Any] = [None] * len(calls)
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(threads):
        groups.setdefault(t, []).append(i)
    bar = tqdm(total=len(calls), desc="audit runs", disable=not show_progress(progress))
    try:
        for t, indices in sorted(groups.items()):
            workers = max(1, jobs // t)
            if workers == 1 or len(indices) == 1:
                for i in indices:
                    results[i] = calls[i]()
                    bar.update()
                continue
            with pool(workers) as executor:
                futures = {i: executor.submit(calls[i]) for i in indices}
                for i, future in futures.items():
                    results[i] = future.result()
                    bar.update()
    finally:
        bar.close()
    return results


def _run_one(config: TrainConfig, run_dir: Path, world_size: int = 1,
             timeout: float = DEFAULT_TIMEOUT) -> RunResult | ScriptRun:
    """A config's run: here (in a pool worker), or at N > 1 ranks as ``reprokit train --nproc N``."""
    if world_size == 1:
        return train(config, run_dir, progress=False)
    return launch_training(config, run_dir, world_size, timeout=timeout)


def _cause(reference: Path | None, run: Path | None) -> str | None:
    """:attr:`reprokit.causes.Cause.name` of ``run`` against the seed's reference run."""
    if reference is None or run is None:
        return None
    return compare_runs(reference, run).cause.name


def factor_columns(audit: pd.DataFrame) -> list[str]:
    """The factor columns of an audit table (those that are not results)."""
    return [c for c in audit.columns if c not in _RESULT_COLUMNS]


def determinism_verdict(audit: pd.DataFrame) -> pd.DataFrame:
    """Per factor: does changing it alone (everything else at base) change the bits?

    The first row asks whether plain repeats with identical settings are bitwise identical; each
    further row takes one factor to one non-base value. ``bitwise_identical`` is "yes" when every
    such run matches its seed's reference digest.
    """
    factors = factor_columns(audit)
    rows = []
    groups = audit.groupby(["seed", *factors], dropna=False)["final_digest"].nunique()
    rows.append({
        "factor": "repeat (same settings)", "base": "", "value": "",
        "runs": int(len(audit) - len(groups)), "identical_runs": int(len(audit) - groups.sum()),
        "bitwise_identical": "yes" if (groups == 1).all() else "no",
        "max_abs_diff": _max_diff_within(audit, factors), "first_diverged_step": None,
    })
    reference = audit[(audit["changed"] == NONE) & (audit["repeat"] == 0)]
    for factor in factors:
        base = reference[factor].iloc[0]
        alone = audit[audit["changed"] == factor]
        for value, part in alone.groupby(factor, sort=True):
            steps = part["diverged_step"].dropna()
            rows.append({
                "factor": factor, "base": str(base), "value": str(value), "runs": len(part),
                "identical_runs": int(part["identical"].sum()),
                "bitwise_identical": "yes" if part["identical"].all() else "no",
                "max_abs_diff": float(part["max_abs_diff"].max()),
                "first_diverged_step": int(steps.min()) if len(steps) else None,
            })
    frame = pd.DataFrame(rows)
    frame["first_diverged_step"] = frame["first_diverged_step"].astype("Int64")
    return frame


def _max_diff_within(audit: pd.DataFrame, factors: list[str]) -> float:
    repeats = audit[audit["changed"] == NONE]
    return float(repeats["max_abs_diff"].max()) if len(repeats) else 0.0


def seed_variance(audit: pd.DataFrame) -> pd.DataFrame:
    """Statistics of the final metric over seeds (repeat 0), one row per factor setting.

    The 95% confidence interval of the mean uses Student's t with n-1 degrees of freedom; it is
    NaN with a single seed.
    """
    factors = factor_columns(audit)
    first = audit[audit["repeat"] == 0]
    rows = []
    for key, part in first.groupby(["changed", *factors], sort=False, dropna=False):
        values = part["final_metric"].astype(float)
        n, mean, std = len(values), float(values.mean()), float(values.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1) * std / n**0.5) if n > 1 else float("nan")
        rows.append({
            **dict(zip(["changed", *factors], key, strict=True)),
            "metric": part["metric"].iloc[0], "seeds": n, "mean": mean, "std": std,
            "ci95_low": mean - half, "ci95_high": mean + half,
            "min": float(values.min()), "max": float(values.max()),
        })
    return pd.DataFrame(rows)


def world_size_effect(audit: pd.DataFrame) -> pd.DataFrame:
    """Per seed and setting of the other factors (the reduction mode among them): did the world
    size change the bits? ``final_digests`` counts the distinct final digests over the world sizes
    (repeats included); ``bitwise_identical`` is "yes" when there is one."""
    if WORLD_SIZE not in audit.columns:
        raise ConfigError("the audit did not vary world_size; run it with vary={'world_size': [1, 2]}")
    others = ["seed", *(c for c in factor_columns(audit) if c != WORLD_SIZE)]
    rows = []
    for key, part in audit.groupby(others, sort=False, dropna=False):
        digests = part["final_digest"].nunique()
        rows.append({**dict(zip(others, key, strict=True)),
                     "world_sizes": ", ".join(map(str, sorted(part[WORLD_SIZE].unique()))),
                     "runs": len(part), "final_digests": int(digests),
                     "bitwise_identical": "yes" if digests == 1 else "no"})
    return pd.DataFrame(rows)


def divergences(audit: pd.DataFrame) -> pd.DataFrame:
    """The runs that are not bitwise identical to their seed's reference, and where they split."""
    columns = ["seed", "repeat", *factor_columns(audit), "changed", "diverged_step",
               "diverged_tensors", "max_abs_diff"]
    return audit.loc[~audit["identical"].astype(bool), columns].reset_index(drop=True)
