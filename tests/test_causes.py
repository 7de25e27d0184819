"""Cause attribution: each planted source of a split is named, with its step and evidence; repeats are not."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import reprokit
from reprokit import TrainConfig, audit_determinism, train
from reprokit.callbacks import Callback, TrainState
from reprokit.compare import compare_runs
from reprokit.relaunch import trusting

FIXTURE = Path(__file__).parent / "fixtures" / "causes_script.py"
ROOT = Path(__file__).resolve().parents[1]


def _entropy_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


class _Points(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """64 samples of shape ``shape``; ``augment``: a random.Random of the dataset's own, which
    reprokit does not seed; ``changed``: one sample moved."""

    def __init__(self, shape: tuple[int, ...] = (6,), augment: random.Random | None = None,
                 changed: int | None = None) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(64, *shape, generator=g)
        if changed is not None:
            self.x[changed] += 1.0
        self.y = (self.x.flatten(1).sum(1) > 0).long()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.augment is not None:
            x = x + 0.1 * self.augment.random()
        return x, self.y[i]


@dataclass(frozen=True)
class Plan:
    """What one run of the loop does differently (defaults: nothing)."""

    seed: int = 3
    lr: float = 0.1
    threads: int = 1
    conv: bool = False
    draw_before_model: bool = False
    plain_loader_seed: int | None = None  # a user DataLoader shuffling from a generator seeded with it
    augment_seed: int | None = None  # the dataset's own random.Random, seeded with it
    changed_sample: int | None = None
    draw_at: int | None = None  # an extra torch draw inside this step, before the forward pass
    noise_from: int | None = None  # OS-entropy noise on a gradient from this step on
    nudge_at: int | None = None  # a change to the parameters right after this step's update
    digest_every: int = 1


def _loop(run_dir: Path, plan: Plan = Plan()) -> None:
    """A user's loop of 8 steps: its own model (with dropout, or a conv net), SGD, one loader."""
    run = reprokit.Run(run_dir, seed=plan.seed, config={"lr": plan.lr}, threads=plan.threads,
                       digest_every=plan.digest_every, progress=False)
    if plan.draw_before_model:
        torch.rand(1)
    if plan.conv:
        conv = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
        model: nn.Module = nn.Sequential(*conv, nn.Flatten(), nn.Linear(1024, 2))
    else:
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr)
    run.track(model=model, optimizer=optimizer)
    augment = random.Random(plan.augment_seed) if plan.augment_seed is not None else None
    data = _Points((1, 8, 8) if plan.conv else (6,), augment, plan.changed_sample)
    loader: Any
    if plan.plain_loader_seed is not None:
        loader = DataLoader(data, batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(plan.plain_loader_seed))
    else:
        loader = run.loader(data, batch_size=16, shuffle=True)
    entropy = torch.Generator().manual_seed(_entropy_seed())
    for _ in run.epochs(2):
        for x, y in loader:
            step = run.global_step + 1
            if step == plan.draw_at:
                torch.rand(1)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if plan.noise_from is not None and step >= plan.noise_from:
                first = next(iter(model.parameters()))
                assert first.grad is not None
                first.grad += 1e-6 * torch.randn(first.shape, generator=entropy)
            optimizer.step()
            if step == plan.nudge_at:
                with torch.no_grad():
                    next(iter(model.parameters())).add_(1e-3)
            run.step(loss=loss)
    run.finish()


def _pair(tmp_path: Path, a: Plan, b: Plan) -> reprokit.Comparison:
    _loop(tmp_path / "a", a)
    _loop(tmp_path / "b", b)
    return compare_runs(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("plan", [Plan(), Plan(conv=True, threads=2), Plan(plain_loader_seed=7),
                                  Plan(augment_seed=11), Plan(digest_every=3, seed=5)],
                         ids=["mlp", "conv-2-threads", "plain-loader", "seeded-augment", "sparse"])
def test_deterministic_repeats_are_identical(tmp_path: Path, plan: Plan) -> None:
    """Two runs of the same loop are never flagged: cause identical, and the CLI-facing line says so."""
    comparison = _pair(tmp_path, plan, plan)
    assert comparison.identical and comparison.cause.name == "identical"
    assert "cause: identical" in comparison.describe()


def test_model_created_after_an_extra_draw_is_init(tmp_path: Path) -> None:
    """torch.rand before the model in one run: init at step 0, every parameter, torch's stream named."""
    cause = _pair(tmp_path, Plan(), Plan(draw_before_model=True)).cause
    assert cause.name == "init" and cause.step == 0
    assert len(cause.tensors) == 4 and cause.streams == ("torch",)
    assert "create the model right after reprokit.Run" in cause.fix


def test_plain_dataloader_from_an_unseeded_generator_is_data_order(tmp_path: Path) -> None:
    """A user's DataLoader shuffling from differently seeded generators: no batch fingerprint, but the
    step-1 loss moves far beyond rounding with the same parameters and streams: data-order, said so."""
    cause = _pair(tmp_path, Plan(plain_loader_seed=1), Plan(plain_loader_seed=2)).cause
    assert cause.name == "data-order" and cause.step == 1
    assert any("no batch fingerprint" in line for line in cause.evidence)
    assert "run.loader" in cause.fix


def test_dataset_with_its_own_unseeded_random_is_augmentation(tmp_path: Path) -> None:
    """A dataset drawing from random.Random(os.urandom seed): same indices, other bytes at step 1."""
    cause = _pair(tmp_path, Plan(augment_seed=_entropy_seed()), Plan(augment_seed=_entropy_seed())).cause
    assert cause.name == "augmentation" and cause.step == 1
    assert cause.evidence[0].startswith("step 1: batch")


def test_one_vs_two_threads_is_environment(tmp_path: Path) -> None:
    """A conv net with 1 and 2 intra-op threads: same inputs, other gradients, threads named."""
    comparison = _pair(tmp_path, Plan(conv=True, threads=1), Plan(conv=True, threads=2))
    assert not comparison.identical  # the thread count does change this model's bits
    cause = comparison.cause
    assert cause.name == "environment" and cause.step == 1
    assert any(line.startswith("seeding.threads: 1 -> 2") for line in cause.evidence)


def test_extra_draw_inside_a_step_with_dropout_is_rng(tmp_path: Path) -> None:
    """torch.rand inside step 3 (after its batch, before the forward) moves dropout's stream: rng at 3."""
    cause = _pair(tmp_path, Plan(), Plan(draw_at=3)).cause
    assert cause.name == "rng" and cause.step == 3 and cause.streams == ("torch",)


def test_noise_from_os_entropy_is_nondeterminism(tmp_path: Path) -> None:
    """OS-entropy noise on a gradient from step 2: same loss, other gradients, no recorded difference."""
    cause = _pair(tmp_path, Plan(noise_from=2), Plan(noise_from=2)).cause
    assert cause.name == "nondeterminism" and cause.step == 2
    assert "0.weight" in cause.tensors and "backward pass" in cause.explanation


def test_changed_parameters_after_equal_gradients_is_optimizer(tmp_path: Path) -> None:
    """A parameter nudged after step 4's update: same gradients, other parameters: optimizer at 4."""
    cause = _pair(tmp_path, Plan(), Plan(nudge_at=4)).cause
    assert cause.name == "optimizer" and cause.step == 4 and cause.tensors == ("0.weight",)


def test_one_changed_sample_is_data(tmp_path: Path) -> None:
    """One sample of the dataset moved: data, the loader's content digest named."""
    cause = _pair(tmp_path, Plan(), Plan(changed_sample=5)).cause
    assert cause.name == "data" and "loader0" in cause.explanation


def test_another_seed_and_lr_is_config(tmp_path: Path) -> None:
    """Seed 3 -> 4 and lr 0.1 -> 0.2: config, naming both."""
    cause = _pair(tmp_path, Plan(), Plan(seed=4, lr=0.2)).cause
    assert cause.name == "config"
    assert {"config.lr: 0.1 -> 0.2", "seeding.seed: 3 -> 4"} <= set(cause.evidence)


def test_sparse_digests_say_the_split_may_be_earlier(tmp_path: Path) -> None:
    """With digests every 2 steps an extra draw at step 3 shows at step 4; the evidence says so and
    narrows the split with the per-step losses."""
    cause = _pair(tmp_path, Plan(digest_every=2), Plan(digest_every=2, draw_at=3)).cause
    assert cause.step == 4
    assert any("recorded every 2 steps" in line and "first differ at step 3" in line
               for line in cause.evidence)
    assert cause.name in ("rng", "unknown")


def test_runs_without_fingerprints_are_undetermined(tmp_path: Path) -> None:
    """Runs recorded before fingerprints (no fingerprints.csv) still compare: unknown, with the reason
    and the first step the digests show."""
    _loop(tmp_path / "a")
    _loop(tmp_path / "b", Plan(draw_at=3))
    for run in ("a", "b"):
        (tmp_path / run / "fingerprints.csv").unlink()
    comparison = compare_runs(tmp_path / "a", tmp_path / "b")
    assert comparison.first_step == 3
    cause = comparison.cause
    assert cause.name == "unknown" and "fingerprints.csv" in cause.explanation
    assert "digests first differ at step 3" in cause.evidence


# --- a script run, for real: code, the CLI and replay ---------------------------------------------
def _script(tmp_path: Path, *args: str, source: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REPROKIT_PROGRESS": "0", "REPROKIT_LEDGER": str(tmp_path / "ledger.sqlite")}
    env.pop("REPROKIT_RUN_DIR", None)
    done = subprocess.run([sys.executable, str(source or tmp_path / "train.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done


def test_edited_script_line_is_code_and_the_cli_says_so(tmp_path: Path) -> None:
    """The script's LR line edited between two runs: code, the script named; `reprokit compare`
    prints `cause: code` and exits 1."""
    script = tmp_path / "train.py"
    shutil.copy(FIXTURE, script)
    _script(tmp_path, str(tmp_path / "a"))
    script.write_text(script.read_text().replace("LR = 0.1", "LR = 0.2"))
    _script(tmp_path, str(tmp_path / "b"))
    cause = compare_runs(tmp_path / "a", tmp_path / "b").cause
    assert cause.name == "code" and str(script) in cause.explanation
    command = [sys.executable, "-m", "reprokit", "compare", str(tmp_path / "a"), str(tmp_path / "b")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 1, done.stderr
    assert "cause: code" in done.stdout.splitlines()


def test_replay_confirms_nondeterminism_of_a_script(tmp_path: Path) -> None:
    """OS-entropy noise from step 3 of a script: nondeterminism at 3; replayed twice from the step-2
    checkpoint by re-executing the script, the two replays differ too: confirmed."""
    script = tmp_path / "train.py"
    shutil.copy(FIXTURE, script)
    for run in ("a", "b"):
        _script(tmp_path, str(tmp_path / run), "--noise-from", "3")
    with trusting():  # the script lies in tmp_path, outside the project the tests run in
        comparison = compare_runs(tmp_path / "a", tmp_path / "b", replay=True)
    cause = comparison.cause
    assert cause.name == "nondeterminism" and cause.step == 3 and cause.replay == "confirmed"
    assert any("from step-0000002" in line and "replays differ" in line for line in cause.evidence)


class _ForwardNoise(Callback):
    """OS-entropy noise on the model's output from step ``start`` on: the original process only."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._g = torch.Generator().manual_seed(_entropy_seed())

    def on_train_start(self, state: TrainState) -> None:
        self._handle = state.model.register_forward_hook(partial(self._noise, state))

    def _noise(self, state: TrainState, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        if not module.training or state.step + 1 < self.start:
            return out
        return out + 1e-5 * torch.randn(out.shape, generator=self._g)

    def on_train_end(self, state: TrainState) -> None:
        self._handle.remove()


def test_replay_clears_a_step_that_is_deterministic_here(tmp_path: Path) -> None:
    """A built-in run whose process added noise from step 3 (a callback the replay does not redo):
    nondeterminism at 3; two replays from the step-2 checkpoint agree and match run a: cleared."""
    config = TrainConfig(model="mlp", dataset="digits", steps=5, batch_size=32, threads=1,
                         checkpoint_every=2)
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", callbacks=(_ForwardNoise(3),), progress=False)
    cause = compare_runs(tmp_path / "a", tmp_path / "b", replay=True).cause
    assert cause.step == 3 and cause.replay == "cleared"
    assert "deterministic here" in cause.explanation
    assert any("agree bit for bit" in line and "match the original" in line for line in cause.evidence)


def test_audit_table_names_the_cause_of_each_run(tmp_path: Path) -> None:
    """A config audit over 1 and 2 threads: repeats are identical, the 2-thread runs environment."""
    config = TrainConfig(model="cnn", dataset="digits", steps=4, batch_size=32, threads=1)
    audit = audit_determinism(config, [0], repeats=2, vary={"threads": [1, 2]}, progress=False)
    causes = {(int(r.threads), int(r.repeat)): r.cause for r in audit.itertuples()}
    assert causes == {(1, 0): "identical", (1, 1): "identical", (2, 0): "environment", (2, 1): "environment"}


def test_cause_names_stay_importable_from_causes() -> None:
    """The step walk's module (stepcauses) holds Cause; reprokit.causes and reprokit still export it."""
    from reprokit import causes, stepcauses

    assert causes.Cause is stepcauses.Cause is reprokit.Cause
    for name in ("CAUSES", "attribute_cause", "environment_differences", "with_replay"):
        assert callable(getattr(causes, name)) or name == "CAUSES"
    assert "unknown" in causes.CAUSES
    lines = causes.Cause("unknown", 3, ("w",), explanation="undetermined: x", fix="f").describe()
    assert lines == ["cause: unknown", "  undetermined: x", "  step: 3; tensors: w", "  fix: f"]
