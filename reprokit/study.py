"""The nondeterminism-sources study: vary one source of randomness at a time, train N models each,
and measure how different the models are.

After Summers & Dinneen, "Nondeterminism and Instability in Neural Network Optimization" (ICML
2021, https://arxiv.org/abs/2103.04514): each source alone (initialisation, data order,
augmentation, low-level nondeterminism) gave about the diversity of all of them together, and so did
flipping one bit of one initial weight. Each :data:`SOURCES` entry is one row of their table:

    init, data_order, augmentation, dropout   run i sets that source's seed to base + i
    threads                                   run i trains with 1 + i intra-op threads
    flip_bit                                  run i flips bit 0 of element i of the first weight tensor
    all                                       run i sets every seed to base + i and 1 + i threads

Diversity is read from the models' predictions on the validation set: the spread (std) of the
accuracy and loss, the mean pairwise disagreement of the predicted classes, and the accuracy of the
ensemble (mean of the members' softmax) against the mean member's. A source that does nothing to
a model (the built-in cnn has no dropout; the bundled data no augmentation) leaves every run
bitwise identical, and the summary says so instead of reporting zero diversity.

Targets are a :class:`TrainConfig` (trained in this process by :func:`reprokit.train`) or a
user's command whose script uses :class:`reprokit.Run` (one subprocess per run through the
``REPROKIT_*`` contract, :mod:`reprokit.scriptruns`), with a ``predict`` function that reads a run
directory's model back: :func:`script_predictor` builds one from the script's model class and
evaluation dataset.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from reprokit.config import TrainConfig
from reprokit.errors import ConfigError
from reprokit.faults import Faults
from reprokit.models import build_model
from reprokit.rundir import read_model
from reprokit.scriptruns import DEFAULT_TIMEOUT, check_command, command_env, run_command
from reprokit.seeding import SOURCES as SEED_SOURCES
from reprokit.trainer import EVAL_BATCH, load_data, show_progress, train

SOURCES = (*SEED_SOURCES, "threads", "flip_bit", "all")
ALL = "all"
NO_EFFECT = "no effect: all {n} runs bitwise identical"
AS_DIVERSE, LESS_DIVERSE, NONE = "as diverse as all together", "less diverse", "no effect"  # verdicts
_MARKER = ".reprokit-study"  # a directory the study made and may clear on the next study
# a study records the runs only as far as it reads them: the final model and digest
_QUIET = {"REPROKIT_DIGEST_EVERY": "0", "REPROKIT_CHECKPOINT_EVERY": "0"}

Predict = Callable[[Path], tuple[torch.Tensor, torch.Tensor]]  # run dir -> (log-probs, labels)


@dataclass(frozen=True)
class Variant:
    """How one run of the study differs from the base run."""

    source: str
    run: int
    seeds: dict[str, int]  # every source's seed, always all four (Run's per-source form)
    threads: int
    flip: int | None  # the element of the first weight tensor whose lowest bit is flipped


def plan(source: str, runs: int, base_seed: int = 0) -> list[Variant]:
    """The ``runs`` variants of ``source`` (one of :data:`SOURCES`)."""
    if source not in SOURCES:
        raise ConfigError(f"source {source!r} is not one of {list(SOURCES)}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise ConfigError(f"runs {runs!r} must be an int >= 2: diversity needs at least two models")
    variants = []
    for i in range(runs):
        seeds = {s: base_seed + i if source in (s, ALL) else base_seed for s in SEED_SOURCES}
        threads = 1 + i if source in ("threads", ALL) else 1
        variants.append(Variant(source, i, seeds, threads, i if source == "flip_bit" else None))
    return variants


# ---- the seeds: the one place that knows how a run is told its per-source seeds ----------------


def _config_for(config: TrainConfig, variant: Variant) -> TrainConfig:
    return config.replace(threads=variant.threads, **{f"{s}_seed": v for s, v in variant.seeds.items()})


def _env_for(variant: Variant) -> dict[str, str]:
    env = {f"REPROKIT_SEED_{s.upper()}": str(v) for s, v in variant.seeds.items()}
    if variant.flip is not None:
        env["REPROKIT_FLIP_BIT"] = f":{variant.flip}:0"
    return {**env, **_QUIET}


# ---- running ---------------------------------------------------------------------------------


def study_sources(
    target: TrainConfig | Sequence[str],
    runs: int = 3,
    sources: Sequence[str] = SOURCES,
    *,
    name: str | None = None,
    predict: Predict | None = None,
    work_dir: str | Path,
    base_seed: int = 0,
    jobs: int = 1,
    progress: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> pd.DataFrame:
    """Train ``runs`` models for each source varied alone, and read back their predictions.

    Args:
        target: a :class:`TrainConfig`, or a command such as ``[sys.executable, "train.py"]`` whose
            script uses :class:`reprokit.Run` (then ``predict`` is required).
        runs: models per source, at least 2.
        sources: which of :data:`SOURCES` to vary.
        name: the target's label in the table (default: the config's model, the script's file name).
        predict: a command's run directory -> (log-probabilities or logits, labels) on its
            evaluation set, e.g. :func:`script_predictor`. A config's are the trainer's own
            (its model on its validation split).
        work_dir: the runs go to ``work_dir/name``, cleared first if an earlier study made it.
        base_seed: every seed of run 0, and the seed the varied source counts up from.
        jobs: a command's runs at once (a run with more than one thread runs alone); a config's
            runs train one after another in this process.
        progress: one bar over runs; ``None`` follows ``REPROKIT_PROGRESS``.
        timeout: seconds a command's run may take.

    Returns:
        One row per run: model, source, run, the seeds, threads, flip, final_digest, accuracy,
        loss and ``probs`` (the softmax on the evaluation set, samples x classes) and ``labels``.
    """
    if isinstance(target, TrainConfig):
        label = name or target.model
        predict = partial(_builtin_predictions, target)
    else:
        command = check_command(target)
        if predict is None:
            raise ConfigError("a command's study needs predict=, a function from a run directory to "
                              "(log-probs, labels); e.g. predict=script_predictor('train.py')")
        label = name or Path(next((a for a in command if a.endswith(".py")), command[0])).stem
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs {jobs!r} must be an int >= 1; pass e.g. jobs=2")
    variants = [v for source in sources for v in plan(source, runs, base_seed)]
    root = _fresh_dir(Path(work_dir) / label)
    dirs = [root / f"{v.source}-{v.run}" for v in variants]
    if isinstance(target, TrainConfig):
        calls = [partial(_train_one, target, v, d) for v, d in zip(variants, dirs, strict=True)]
        digests = _run_all(calls, [v.threads for v in variants], 1, progress)
    else:
        calls = [partial(_command_one, command, v, d, timeout) for v, d in zip(variants, dirs, strict=True)]
        digests = _run_all(calls, [v.threads for v in variants], jobs, progress)
    return pd.DataFrame([_row(label, v, d, digest, predict(d))
                         for v, d, digest in zip(variants, dirs, digests, strict=True)])


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        if not (path / _MARKER).is_file():
            raise ConfigError(f"work directory {str(path)!r} exists and was not made by a study; pass "
                              "another work_dir, or remove it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / _MARKER).touch()
    return path


def _train_one(config: TrainConfig, variant: Variant, run_dir: Path) -> str:
    faults = Faults(flip_bit=("", variant.flip, 0)) if variant.flip is not None else Faults()
    return train(_config_for(config, variant), run_dir, progress=False, faults=faults).final_digest


def _command_one(command: list[str], variant: Variant, run_dir: Path, timeout: float) -> str:
    env = command_env(run_dir, factors={"threads": variant.threads}, extra=_env_for(variant))
    return run_command(command, env, timeout=timeout).final_digest


def _run_all(calls: Sequence[Callable[[], str]], threads: Sequence[int], jobs: int,
             progress: bool | None) -> list[str]:
    """Every call's result, in order: one-thread runs ``jobs`` at a time, the others alone (two
    multi-threaded runs on 2 cores spin their OpenMP threads against each other)."""
    results: list[str] = [""] * len(calls)
    alone = [i for i, t in enumerate(threads) if t > 1 or jobs == 1]
    shared = [i for i in range(len(calls)) if i not in set(alone)]
    with tqdm(total=len(calls), desc="study runs", disable=not show_progress(progress)) as bar:
        if shared:
            with ThreadPoolExecutor(jobs) as pool:
                futures = {i: pool.submit(calls[i]) for i in shared}
                for i, future in futures.items():
                    results[i] = future.result()
                    bar.update()
        for i in alone:
            results[i] = calls[i]()
            bar.update()
    return results


def _row(label: str, variant: Variant, run_dir: Path, digest: str,
         predictions: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    log_probs, labels = predictions
    log_probs = F.log_softmax(log_probs.double(), dim=1)  # idempotent on log-probs already
    return {
        "model": label, "source": variant.source, "run": variant.run,
        **{f"seed_{s}": v for s, v in variant.seeds.items()},
        "threads": variant.threads, "flip": variant.flip, "final_digest": digest,
        "accuracy": float((log_probs.argmax(1) == labels).double().mean()),
        "loss": float(F.nll_loss(log_probs, labels)),
        "probs": log_probs.exp().numpy(), "labels": labels.numpy(), "run_dir": str(run_dir),
    }


# ---- predictions -----------------------------------------------------------------------------


@torch.no_grad()
def _builtin_predictions(config: TrainConfig, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in run's final model (built as the trainer builds it) on the trainer's validation split."""
    data = load_data(config)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights we overwrite
        model = build_model(config.model, data.input_shape, data.num_outputs)
    model.load_state_dict(read_model(run_dir))
    return _outputs(model, data.x_val.split(EVAL_BATCH)), data.y_val


def script_predictor(script: str | Path, model: str = "Net", dataset: str = "Digits",
                     dataset_args: Sequence[Any] = (False,)) -> Predict:
    """A ``predict`` for a script's runs: the script is imported from its file (its ``main`` does
    not run), ``model`` is the class of its network (built with no arguments, the run's model.pt
    loaded into it) and ``dataset(*dataset_args)`` its evaluation set (e.g. the example's
    ``Digits(False)``: the test split)."""
    path = Path(script).resolve()
    if not path.is_file():
        raise ConfigError(f"script {str(path)!r} does not exist; pass the path of the training script")
    spec = importlib.util.spec_from_file_location(f"_reprokit_study_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # as when the script runs: its own directory imports first
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    for attr in (model, dataset):
        if not hasattr(module, attr):
            raise ConfigError(f"script {path.name} defines no {attr!r}; pass model= and dataset= names "
                              "it defines")
    data = getattr(module, dataset)(*dataset_args)
    batches = list(torch.utils.data.DataLoader(data, batch_size=EVAL_BATCH))
    labels = torch.cat([y for _, y in batches])
    net_class = getattr(module, model)

    @torch.no_grad()
    def predict(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
        net = net_class()
        net.load_state_dict(read_model(run_dir))
        return _outputs(net, [x for x, _ in batches]), labels

    return predict


def _outputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x in batches])


# ---- metrics ---------------------------------------------------------------------------------


def disagreement(probs: np.ndarray) -> float:
    """Mean over pairs of models of the share of samples whose predicted classes differ
    (``probs``: models x samples x classes)."""
    predicted = np.asarray(probs).argmax(axis=2)
    if len(predicted) < 2:
        raise ConfigError(f"disagreement needs at least 2 models, got {len(predicted)}")
    pairs = itertools.combinations(range(len(predicted)), 2)
    return float(np.mean([(predicted[a] != predicted[b]).mean() for a, b in pairs]))


def ensemble_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the ensemble's prediction: the class of the members' mean softmax."""
    return float((np.asarray(probs).mean(axis=0).argmax(axis=1) == labels).mean())


def member_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """The mean of the members' accuracies."""
    return float((np.asarray(probs).argmax(axis=2) == labels).mean())


def summarize_study(study: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, source): runs, distinct models (final digests), the std of accuracy and
    loss, the mean pairwise disagreement, the ensemble's and the mean member's accuracy, and
    ``effect``: ``"no effect: all N runs bitwise identical"`` when the source changed nothing."""
    rows = []
    for (model, source), group in study.groupby(["model", "source"], sort=False):
        probs, labels = np.stack(list(group["probs"])), group["labels"].iloc[0]
        distinct = group["final_digest"].nunique()
        n = len(group)
        effect = NO_EFFECT.format(n=n) if distinct == 1 else (
            "every run differs" if distinct == n else f"{distinct} distinct models of {n}")
        rows.append({
            "model": model, "source": source, "runs": n, "distinct": distinct,
            "accuracy_mean": group["accuracy"].mean(), "accuracy_std": group["accuracy"].std(ddof=1),
            "loss_std": group["loss"].std(ddof=1), "disagreement": disagreement(probs),
            "ensemble_accuracy": ensemble_accuracy(probs, labels),
            "member_accuracy": member_accuracy(probs, labels), "effect": effect,
        })
    summary = pd.DataFrame(rows)
    summary["ensemble_gain"] = summary["ensemble_accuracy"] - summary["member_accuracy"]
    return summary


def study_verdict(summary: pd.DataFrame, ratio: float = 0.5) -> pd.DataFrame:
    """Each single source against ``all`` of the same model: the ratio of their disagreements and
    accuracy stds, and whether the source alone gives "about the same diversity" as all together,
    taken as a disagreement at least ``ratio`` times that of ``all`` (Summers & Dinneen's claim).
    A source with no effect is said to be one, not compared."""
    rows = []
    for model, group in summary.groupby("model", sort=False):
        together = group[group["source"] == ALL]
        if together.empty:
            raise ConfigError(f"model {model!r}: the summary has no {ALL!r} source to compare with")
        ref = together.iloc[0]
        for _, row in group[group["source"] != ALL].iterrows():
            d_ratio = row["disagreement"] / ref["disagreement"] if ref["disagreement"] else np.nan
            s_ratio = row["accuracy_std"] / ref["accuracy_std"] if ref["accuracy_std"] else np.nan
            verdict = NONE if row["distinct"] == 1 else AS_DIVERSE if d_ratio >= ratio else LESS_DIVERSE
            rows.append({"model": model, "source": row["source"], "disagreement": row["disagreement"],
                         "disagreement_all": ref["disagreement"], "disagreement_ratio": d_ratio,
                         "accuracy_std_ratio": s_ratio, "verdict": verdict})
    return pd.DataFrame(rows)


def study_conclusion(verdict: pd.DataFrame, ratio: float = 0.5) -> str:
    """A markdown paragraph per model stating, from ``verdict``, whether the finding holds."""
    lines = []
    for model, group in verdict.groupby("model", sort=False):
        by = {v: list(g["source"]) for v, g in group.groupby("verdict")}
        same, less, none = (by.get(k, []) for k in (AS_DIVERSE, LESS_DIVERSE, NONE))
        acting = len(same) + len(less)
        holds = "holds" if not less else ("does not hold" if not same else "holds only in part")
        text = (f"**{model}**: the finding {holds} — {len(same)} of the {acting} sources that act on this "
                f"model alone reach at least {ratio:g}x the disagreement of all sources together "
                f"({group['disagreement_all'].iloc[0]:.3f})")
        if same:
            text += ": " + ", ".join(f"{s} ({_ratio(group, s)})" for s in same)
        if less:
            text += "; less diverse: " + ", ".join(f"{s} ({_ratio(group, s)})" for s in less)
        flip = group[group["source"] == "flip_bit"]
        if not flip.empty:
            text += (f". One flipped bit of one initial weight gives {_ratio(group, 'flip_bit')} of the "
                     f"disagreement of all sources together")
        if none:
            text += f". No effect at all (every run bitwise identical): {', '.join(none)}"
        lines.append(text + ".")
    return "\n\n".join(lines)


def _ratio(group: pd.DataFrame, source: str) -> str:
    return f"{group.loc[group['source'] == source, 'disagreement_ratio'].iloc[0]:.2f}x"


def study_headline(verdict: pd.DataFrame) -> dict[str, str]:
    """Per model, one line for the report's index: how many acting sources alone are as diverse
    as all together, and which have no effect."""
    numbers = {}
    for model, group in verdict.groupby("model", sort=False):
        same = (group["verdict"] == AS_DIVERSE).sum()
        none = list(group.loc[group["verdict"] == NONE, "source"])
        numbers[str(model)] = (f"{same}/{len(group) - len(none)} sources alone as diverse as all together"
                               + (f"; no effect: {', '.join(none)}" if none else ""))
    return numbers
