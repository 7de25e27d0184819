"""reprokit.Run in one process: a plain 20-line loop reprokit did not write, its errors, and resume logic.

The kill-from-outside tests of a real script are in test_example.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import reprokit
from reprokit.checkpointreader import list_checkpoints
from reprokit.errors import ConfigError, DataError, ReprokitError
from reprokit.rundir import read_metrics


class _Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset with a random augmentation in __getitem__ drawing from the global torch RNG."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(6), self.y[i]


def _loop(run_dir: Path, *, epochs: int = 2, stop_after: int | None = None, track: str = "all",
          **run_kwargs: Any) -> reprokit.RunSummary | None:
    """A user's loop: its own model with dropout, optimizer, scheduler and an eval loader."""
    run = reprokit.Run(run_dir, seed=3, config={"lr": 0.1, "epochs": epochs}, **run_kwargs)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    objects: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if track == "no-scheduler":
        objects.pop("scheduler")
    run.track(**objects)
    train = run.loader(_Noisy(), batch_size=16, shuffle=True)
    evaluation = DataLoader(_Noisy(32), batch_size=8, shuffle=True)  # draws from the global RNG
    for _ in run.epochs(epochs):
        for x, y in train:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            run.step(loss=loss)
            if stop_after is not None and run.global_step == stop_after:
                run._close("crashed")  # what a kill leaves: rows and checkpoints on disk, no result
                return None
        with torch.no_grad():
            hits = [float((model(x).argmax(1) == y).float().mean()) for x, y in evaluation]
        acc = sum(hits) / len(hits)
        run.log(val_accuracy=acc)
        scheduler.step()
    return run.finish(val_accuracy=acc)


def test_two_runs_of_a_plain_loop_are_bitwise_identical(tmp_path: Path) -> None:
    """The same loop twice gives the same final digest and the same digests.csv."""
    a, b = _loop(tmp_path / "a"), _loop(tmp_path / "b")
    assert a is not None and b is not None
    assert a.final_digest == b.final_digest
    assert (tmp_path / "a/digests.csv").read_bytes() == (tmp_path / "b/digests.csv").read_bytes()
    assert a.steps == 12 and a.metric_name == "val_accuracy"


@pytest.mark.parametrize("stop_after", [4, 6, 9])
def test_relaunch_resumes_bit_exact(tmp_path: Path, stop_after: int) -> None:
    """Abandoned mid-epoch or at an epoch's end, a new Run on the directory finishes bit-exact,
    metrics.csv and trace.csv included."""
    ref = _loop(tmp_path / "ref", checkpoint_every=3, trace_every=2)
    assert _loop(tmp_path / "x", checkpoint_every=3, trace_every=2, stop_after=stop_after) is None
    resumed = _loop(tmp_path / "x", checkpoint_every=3, trace_every=2)
    assert ref is not None and resumed is not None
    assert resumed.final_digest == ref.final_digest
    assert resumed.resumed_from_step == stop_after // 3 * 3
    for name in ("metrics.csv", "digests.csv", "trace.csv", "fingerprints.csv", "grads.csv"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_missing_tracked_name_is_an_error(tmp_path: Path) -> None:
    """A relaunch tracking fewer objects than the checkpoint holds names the missing one."""
    _loop(tmp_path / "x", checkpoint_every=3, stop_after=4)
    with pytest.raises(reprokit.ResumeRefused, match="'scheduler' is not tracked now"):
        _loop(tmp_path / "x", checkpoint_every=3, track="no-scheduler")


def test_other_recipe_is_refused_then_forced_and_recorded(tmp_path: Path) -> None:
    """A relaunch with another config is refused naming the field; forced, it is logged."""
    _loop(tmp_path / "x", checkpoint_every=3, stop_after=4)
    with pytest.raises(reprokit.ResumeRefused, match=r"config\.epochs: 2 -> 3"):
        _loop(tmp_path / "x", epochs=3, checkpoint_every=3)
    _loop(tmp_path / "x", epochs=3, checkpoint_every=3, force=True)
    resumes = json.loads((tmp_path / "x/manifest.json").read_text())["resumes"]
    assert resumes[-1]["forced"] and "config.epochs: 2 -> 3" in resumes[-1]["differences"]


def test_finished_run_exits_zero(tmp_path: Path) -> None:
    """Run() on a finished run raises RunFinished, a SystemExit with status 0."""
    _loop(tmp_path / "x")
    with pytest.raises(reprokit.RunFinished) as info:
        _loop(tmp_path / "x")
    assert info.value.code == 0


def test_damaged_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    """A flipped byte in the newest checkpoint: the relaunch resumes from the one before, exactly."""
    ref = _loop(tmp_path / "ref", checkpoint_every=3)
    _loop(tmp_path / "x", checkpoint_every=3, stop_after=7)
    newest = list_checkpoints(tmp_path / "x")[0]
    data = bytearray((newest / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "tensors.safetensors").write_bytes(bytes(data))
    resumed = _loop(tmp_path / "x", checkpoint_every=3)
    assert resumed is not None and ref is not None
    assert resumed.resumed_from_step == 3
    assert resumed.final_digest == ref.final_digest


def test_metrics_rows_hold_steps_logs_and_the_user_metric(tmp_path: Path) -> None:
    """metrics.csv has one row per step, the logged val_accuracy per epoch, and result.json its value."""
    summary = _loop(tmp_path / "x")
    frame = read_metrics(tmp_path / "x")
    assert list(frame["kind"]).count("step") == 12
    logged = frame[frame["kind"] == "log"]
    assert len(logged) == 2 and logged["val_accuracy"].notna().all()
    result = json.loads((tmp_path / "x/result.json").read_text())
    assert summary is not None
    assert result["final_metric"] == pytest.approx(float(logged["val_accuracy"].iloc[-1]))
    manifest = json.loads((tmp_path / "x/manifest.json").read_text())
    assert manifest["kind"] == "script" and manifest["config"] == {"lr": 0.1, "epochs": 2}
    assert manifest["data"]["sources"]["loader0"] and manifest["tracked"]["optimizer"] == "SGD"


def test_step_before_track_is_an_error(tmp_path: Path) -> None:
    """run.step() with nothing tracked says what to call first."""
    run = reprokit.Run(tmp_path / "x")
    with pytest.raises(ReprokitError, match=r"call run.track\(model=..."):
        run.step(loss=1.0)
    run._close("crashed")


def test_untrackable_object_is_an_error(tmp_path: Path) -> None:
    """Tracking an object without state_dict/load_state_dict names it."""
    run = reprokit.Run(tmp_path / "x")
    with pytest.raises(ReprokitError, match=r"run.track\(thing=...\): a list has no state_dict"):
        run.track(thing=[1, 2])
    run._close("crashed")


def test_loaders_reprokit_cannot_make_exact_are_refused(tmp_path: Path) -> None:
    """An IterableDataset and a custom sampler are refused with the reason."""

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Any:
            return iter(range(3))

    run = reprokit.Run(tmp_path / "x")
    with pytest.raises(DataError, match="IterableDataset"):
        run.loader(Stream(), batch_size=2)
    data = TensorDataset(torch.arange(10.0))
    sampler = torch.utils.data.WeightedRandomSampler([1.0] * 10, 10)
    with pytest.raises(DataError, match="WeightedRandomSampler decides the order itself"):
        run.loader(DataLoader(data, batch_size=2, sampler=sampler))
    run._close("crashed")


def test_existing_dataloader_is_taken_over(tmp_path: Path) -> None:
    """run.loader(DataLoader(...)) keeps its dataset, batch size, shuffle and drop_last."""
    run = reprokit.Run(tmp_path / "x")
    data = TensorDataset(torch.arange(10.0))
    loader = run.loader(DataLoader(data, batch_size=3, shuffle=True, drop_last=True, pin_memory=False))
    run.track(model=nn.Linear(1, 1))
    assert loader.pin_memory is False  # other DataLoader attributes read through
    assert loader.dataset is data and loader.batch_size == 3 and loader.shuffle and len(loader) == 3
    batches = [b[0].tolist() for b in loader]
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len({v for b in batches for v in b}) == 9  # a permutation, the last sample dropped
    run._close("crashed")


def test_bad_environment_value_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """REPROKIT_THREADS=two names the variable and an example value."""
    monkeypatch.setenv("REPROKIT_THREADS", "two")
    with pytest.raises(ConfigError, match=r"REPROKIT_THREADS='two' is not an integer"):
        reprokit.Run(tmp_path / "x")


def test_async_save_and_two_modules_resume_bit_exact(tmp_path: Path) -> None:
    """Checkpoints written in the background, of a run tracking two modules, resume as exactly."""

    def loop(run_dir: Path, stop_after: int | None = None) -> reprokit.RunSummary | None:
        run = reprokit.Run(run_dir, seed=5, checkpoint_every=2, async_save=True)
        encoder, head = nn.Linear(6, 8), nn.Linear(8, 2)
        optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=0.01)
        run.track(encoder=encoder, head=head, optimizer=optimizer)
        train = run.loader(_Noisy(64), batch_size=16, shuffle=True)
        for _ in run.epochs(2):
            for x, y in train:
                optimizer.zero_grad()
                F.cross_entropy(head(torch.relu(encoder(x))), y).backward()
                optimizer.step()
                run.step()
                if run.global_step == stop_after:
                    run._checkpointer.wait()
                    run._close("crashed")
                    return None
        return run.finish()

    ref = loop(tmp_path / "ref")
    assert loop(tmp_path / "x", stop_after=5) is None
    resumed = loop(tmp_path / "x")
    assert ref is not None and resumed is not None
    assert resumed.resumed_from_step == 4 and resumed.final_digest == ref.final_digest


def test_a_resumed_loop_outside_run_epochs_is_an_error(tmp_path: Path) -> None:
    """Resuming a loop written with range() instead of run.epochs() is refused, not silently replayed."""
    _loop(tmp_path / "x", checkpoint_every=3, stop_after=4)
    run = reprokit.Run(tmp_path / "x", seed=3, config={"lr": 0.1, "epochs": 2}, checkpoint_every=3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run.track(model=model, optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
    train = run.loader(_Noisy(), batch_size=16, shuffle=True)
    with pytest.raises(ReprokitError, match=r"the loop is not run\.epochs"):
        for _ in range(2):
            for _batch in train:
                pass
    run._close("crashed")


class _ThreeRngs(torch.utils.data.Dataset[torch.Tensor]):
    """An augmentation drawing from python's, numpy's and torch's global RNGs."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([i, random.random(), float(np.random.rand()), float(torch.rand(()))])


def test_augmentations_do_not_depend_on_workers_and_leave_the_main_rngs_alone(tmp_path: Path) -> None:
    """The same batches with 0 and 2 workers; fetching in the main process draws nothing from its RNGs."""
    passes = {}
    for workers in (0, 2):
        run = reprokit.Run(tmp_path / f"w{workers}", seed=9)
        run.track(model=nn.Linear(1, 1))
        loader = run.loader(_ThreeRngs(), batch_size=8, shuffle=True, num_workers=workers)
        before = torch.get_rng_state()
        passes[workers] = torch.cat(list(loader))
        if workers == 0:
            assert torch.equal(torch.get_rng_state(), before)
        run._close("crashed")
    assert torch.equal(passes[0], passes[2])
    assert len(set(passes[0][:, 1].tolist())) > 1  # python's draws differ between samples too


class _SometimesDraws(torch.utils.data.Dataset[torch.Tensor]):
    """Samples 0-9 draw nothing; numpy from sample 10 on, python from 20, torch from 30."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([i, float(np.random.rand()) if i >= 10 else 0.0,
                             random.random() if i >= 20 else 0.0, float(torch.rand(())) if i >= 30 else 0.0])


def test_streams_first_drawn_mid_epoch_are_seeded_as_if_from_the_start(tmp_path: Path) -> None:
    """A stream is seeded only once the dataset is seen to draw from it; the batch that first draws
    is fetched again, so each sample's bits are those of fetching it with every stream seeded, with
    0 or 2 workers, and the main process's streams (numpy's normal cache included) are untouched."""
    import random

    import numpy as np

    from reprokit.runloader import _BATCH, _sample_seed

    passes, orders = {}, {}
    for workers in (0, 2):
        run = reprokit.Run(tmp_path / f"w{workers}", seed=4)
        run.track(model=nn.Linear(1, 1))
        loader = run.loader(_SometimesDraws(), batch_size=4, shuffle=True, num_workers=workers)
        np.random.standard_normal()  # the main process's normal cache is full
        before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        passes[workers] = torch.cat(list(loader))
        after = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        assert after[0] == before[0] and torch.equal(after[2], before[2])
        assert np.array_equal(after[1][1], before[1][1]) and after[1][2:] == before[1][2:]
        orders[workers] = loader._sampler.pass_seed
        run._close("crashed")
    assert torch.equal(passes[0], passes[2])
    pass_seed, rows = orders[0], passes[0]
    for b in range(0, 40, 4):  # the oracle: every stream seeded for every sample
        first = int(rows[b, 0])
        random.seed(_sample_seed(pass_seed, first) ^ _BATCH)
        for row in rows[b:b + 4]:
            i = int(row[0])
            seed = _sample_seed(pass_seed, i)
            np.random.seed(seed), torch.manual_seed(seed)
            expected = _SometimesDraws()[i]
            assert torch.equal(row, expected), (i, row, expected)


def test_fingerprints_record_what_went_into_each_step(tmp_path: Path) -> None:
    """fingerprints.csv: step 0 holds the streams at the start; every step the batch's indices and
    bytes, each stream before the forward pass, the loss bits and one digest over grads.csv's
    per-tensor gradients; two runs agree on every cell, and a planted change shows where it is."""
    from reprokit.fingerprints import loss_bits
    from reprokit.rundir import read_fingerprints, read_grads

    a, b = _loop(tmp_path / "a"), _loop(tmp_path / "b")
    assert a is not None and b is not None
    fa, fb = read_fingerprints(tmp_path / "a"), read_fingerprints(tmp_path / "b")
    assert fa.equals(fb) and list(fa["step"]) == list(range(13))
    first, step = fa.iloc[0], fa.iloc[1]
    assert first["indices"] == "" and first["torch"] != "" and first["loss"] == ""
    assert all(step[c] != "" for c in ("indices", "batch", "python", "numpy", "torch", "loss", "grads"))
    losses = read_metrics(tmp_path / "a").query("kind == 'step'")["loss"].tolist()
    assert fa["loss"].iloc[1:].tolist() == [loss_bits(v) for v in losses]
    grads = read_grads(tmp_path / "a")
    assert [s for s, _ in grads] == list(range(1, 13))
    assert set(grads[0][1]) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert len(set(fa["indices"].iloc[1:])) == 12  # each step its own batch
    # nothing draws between the start and step 1's forward (the fetch puts the streams back);
    # dropout moves torch's stream at every step after
    assert fa["torch"].iloc[0] == fa["torch"].iloc[1] and len(set(fa["torch"].iloc[1:])) == 12


def test_batch_digest_is_order_aware() -> None:
    """Two batches holding the same rows in another order digest differently (an XOR would not)."""
    from reprokit.fingerprints import BatchHasher

    x = torch.arange(12.0).reshape(4, 3)
    one, two = BatchHasher(), BatchHasher()
    one.add(0, [0, 1, 2, 3], (x, torch.arange(4)))
    two.add(0, [0, 1, 2, 3], (x[[1, 0, 2, 3]], torch.arange(4)[[1, 0, 2, 3]]))
    assert one.digests()[0] == two.digests()[0] and one.digests()[1] != two.digests()[1]


def test_one_flipped_bit_of_one_initial_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults(flip_bit=...) or REPROKIT_FLIP_BIT flip exactly one bit of θ_0 before it is digested,
    recorded in the manifest; only that tensor's step-0 digest moves, and the run still finishes."""
    from reprokit.faults import Faults
    from reprokit.rundir import read_digests

    base = _loop(tmp_path / "base")
    flipped = _loop(tmp_path / "flip", faults=Faults(flip_bit=("0.weight", 5, 0)))
    assert base is not None and flipped is not None and base.final_digest != flipped.final_digest
    step0 = {name: read_digests(tmp_path / run)[0][1] for name, run in (("a", "base"), ("b", "flip"))}
    assert [k for k in step0["a"] if step0["a"][k] != step0["b"][k]] == ["0.weight"]
    perturbation = json.loads((tmp_path / "flip/manifest.json").read_text())["perturbation"]
    assert perturbation["tensor"] == "0.weight" and perturbation["bit"] == 0
    assert perturbation["before"] != perturbation["after"]
    monkeypatch.setenv("REPROKIT_FLIP_BIT", "0.weight:5:0")
    env = _loop(tmp_path / "env")
    assert env is not None and env.final_digest == flipped.final_digest
    monkeypatch.setenv("REPROKIT_FLIP_BIT", "0.weight:5")
    with pytest.raises(ConfigError, match="TENSOR:ELEMENT:BIT"):
        _loop(tmp_path / "bad")
