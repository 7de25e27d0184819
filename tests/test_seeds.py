"""Per-source seeds: one int as always, or init / data order / augmentation / dropout apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reprokit
from reprokit.config import TrainConfig
from reprokit.errors import ReprokitError, SeedError
from reprokit.rundir import read_digests, read_fingerprints
from reprokit.seeding import Seeds


class _Augmented(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(48, 6, generator=g), torch.randint(0, 2, (48,), generator=g)

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(6), self.y[i]


def _run(run_dir: Path, seed: Any, steps: int = 6) -> dict[str, Any]:
    """A loop with dropout and an augmentation; what each source would move."""
    run = reprokit.Run(run_dir, seed=seed, steps=steps, progress=False)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.track(model=model, optimizer=optimizer)
    batches = []
    loader = run.loader(_Augmented(), batch_size=8, shuffle=True)
    for _ in run.epochs(2):
        for x, y in loader:
            batches.append(x.clone())
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            run.step()
    summary = run.finish()
    prints = read_fingerprints(run_dir)
    return {"final": summary.final_digest, "init": read_digests(run_dir)[0][1],
            "order": list(prints["indices"]), "batches": batches, "torch": list(prints["torch"])[1:]}


def test_parsing_and_errors() -> None:
    assert Seeds.parse(3) == Seeds(3, 3, 3, 3, per_source=False)
    assert Seeds.parse({"base": 1, "dropout": 4}) == Seeds(1, 1, 1, 4, per_source=True)
    with pytest.raises(SeedError, match="unknown source"):
        Seeds.parse({"init": 1, "shuffle": 2})
    with pytest.raises(SeedError, match="no seed for"):
        Seeds.parse({"init": 1})
    with pytest.raises(SeedError, match="type str"):
        Seeds.parse({"base": "1"})


def test_changing_one_source_moves_only_its_stream(tmp_path: Path) -> None:
    base = {"init": 1, "data_order": 2, "augmentation": 3, "dropout": 4}
    ref = _run(tmp_path / "ref", base)
    assert _run(tmp_path / "again", base)["final"] == ref["final"]
    init = _run(tmp_path / "init", {**base, "init": 9})
    assert init["init"] != ref["init"] and init["order"] == ref["order"] and init["torch"] == ref["torch"]
    order = _run(tmp_path / "order", {**base, "data_order": 9})
    assert order["init"] == ref["init"] and order["order"] != ref["order"] and order["torch"] == ref["torch"]
    dropout = _run(tmp_path / "dropout", {**base, "dropout": 9})
    assert dropout["init"] == ref["init"] and dropout["order"] == ref["order"]
    assert dropout["torch"] != ref["torch"] and dropout["final"] != ref["final"]
    assert all(torch.equal(a, b) for a, b in zip(dropout["batches"], ref["batches"], strict=True))
    aug = _run(tmp_path / "aug", {**base, "augmentation": 9})
    assert aug["init"] == ref["init"] and aug["order"] == ref["order"] and aug["torch"] == ref["torch"]
    assert not torch.equal(aug["batches"][0], ref["batches"][0])


def test_int_seed_and_manifest_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One int feeds every source as before (no sources in the manifest); the per-source form is
    recorded; REPROKIT_SEED_DROPOUT changes one source and is recorded; a relaunch with another
    seed is another recipe."""
    one = _run(tmp_path / "int", 2)
    assert "sources" not in json.loads((tmp_path / "int/manifest.json").read_text())["seeding"]
    same = _run(tmp_path / "same", {"base": 2})
    assert same["init"] == one["init"] and same["order"] == one["order"]  # (dropout is re-seeded)
    seeding = json.loads((tmp_path / "same/manifest.json").read_text())["seeding"]
    assert seeding["sources"] == {"init": 2, "data_order": 2, "augmentation": 2, "dropout": 2}
    monkeypatch.setenv("REPROKIT_SEED_DROPOUT", "7")
    env = _run(tmp_path / "env", {"base": 2})
    manifest = json.loads((tmp_path / "env/manifest.json").read_text())
    assert manifest["seeding"]["sources"]["dropout"] == 7 and manifest["overrides"]["seed_dropout"] == 7
    assert env["init"] == same["init"] and env["torch"] != same["torch"]
    monkeypatch.delenv("REPROKIT_SEED_DROPOUT")
    run = reprokit.Run(tmp_path / "x", seed={"base": 2}, steps=6, progress=False)
    run.track(model=nn.Linear(1, 1))
    run.close()
    with pytest.raises(ReprokitError, match=r"seeding\.sources"):
        reprokit.Run(tmp_path / "x", seed={"base": 2, "init": 5}, steps=6, progress=False)


def test_per_source_resume_is_bit_exact(tmp_path: Path) -> None:
    seed = {"base": 1, "dropout": 8}
    ref = _run(tmp_path / "ref", seed, steps=10)
    run = reprokit.Run(tmp_path / "x", seed=seed, steps=10, checkpoint_every=3, progress=False)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.track(model=model, optimizer=optimizer)
    loader = run.loader(_Augmented(), batch_size=8, shuffle=True)
    for _ in run.epochs(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            run.step()
            if run.global_step == 5:
                run.close()
                break
        break
    assert _run(tmp_path / "x", seed, steps=10)["final"] == ref["final"]


def test_builtin_config_fields_and_the_audit_vary_one_source(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, model="mlp", digest_every=1)
    assert cfg.seeds() == 0 and cfg.replace(init_seed=3).seeds() == {"base": 0, "init": 3}
    frame = reprokit.audit_determinism(cfg, seeds=[0], repeats=1, vary={"seed.init": [None, 3]},
                                       progress=False, work_dir=tmp_path)
    assert len(frame) == 2 and frame["final_digest"].nunique() == 2
