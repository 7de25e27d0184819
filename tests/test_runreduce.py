"""Reduction mode "canonical" (reprokit/runreduce.py): the same bits at every world size.

One process here (the checks, the micro-batch loop, the reduction); tests/test_canonical_run.py
runs the same loop under torchrun at 2 and 4 ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import reprokit
from reprokit.distributed import tree_sum
from reprokit.errors import ConfigError, DistributedError, ReprokitError
from reprokit.runreduce import check_reduction


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))


def _run(path: Path, **kwargs: object) -> reprokit.Run:
    return reprokit.Run(path, seed=1, progress=False, ledger=False, **kwargs)  # type: ignore[arg-type]


def test_check_reduction_names_the_value_and_the_valid_world_sizes() -> None:
    """An unknown mode, a missing or ill-typed micro-batch count, micro_batches in ddp mode and a world
    size that does not split the tree into whole subtrees are refused with the fix."""
    with pytest.raises(ConfigError, match="'tree' is not one of"):
        check_reduction("tree", None, 1)
    with pytest.raises(ConfigError, match="needs micro_batches"):
        check_reduction("canonical", None, 1)
    with pytest.raises(ConfigError, match="needs micro_batches"):
        check_reduction("canonical", True, 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="applies to reduction='canonical' only"):
        check_reduction("ddp", 4, 1)
    with pytest.raises(DistributedError, match=r"world size 3: .* valid world sizes: \[1, 2, 4, 8\]"):
        check_reduction("canonical", 8, 3)
    check_reduction("canonical", 12, 3)  # 12 / 3 = 4 leaves per rank: whole subtrees


def test_canonical_step_is_the_mean_of_the_micro_batch_gradients_added_in_the_tree(tmp_path: Path) -> None:
    """One step with 4 micro-batches: the gradient the optimizer sees is tree_sum of the four
    micro-batch gradients / 4, computed here by hand; dropout draws per micro-batch, and torch's
    global RNG is put back after the loop."""
    run = _run(tmp_path / "a", reduction="canonical", micro_batches=4, steps=1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step keeps the weights
    run.track(model=model, optimizer=optimizer)
    loader = run.loader(_data(), batch_size=16, shuffle=False)
    seen: list[torch.Tensor] = []
    for _ in run.epochs(1):
        for x, y in loader:
            before = torch.random.get_rng_state()
            for mx, my in run.micro_batches(x, y):
                assert mx.shape == (4, 6) and my.shape == (4,)
                F.cross_entropy(model(mx), my).backward()
                seen.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))  # type: ignore[union-attr]
            assert torch.equal(torch.random.get_rng_state(), before)
            optimizer.step()
            reduced = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
            run.step(loss=0.0)
    run.finish()
    assert len(seen) == 4 and not torch.equal(seen[0], seen[1])
    assert torch.equal(reduced, tree_sum(seen) / 4)


def test_canonical_one_process_repeats_and_records_its_mode(tmp_path: Path) -> None:
    """Two canonical runs in one process end on one digest; the manifest's distributed entry names the
    mode and the micro-batch count, and the fingerprint holds them (a ddp run's differs)."""
    digests, manifests = [], []
    for name in ("a", "b"):
        run = _run(tmp_path / name, reduction="canonical", micro_batches=2)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        run.track(model=model, optimizer=optimizer)
        loader = run.loader(_data(), batch_size=8, shuffle=True)
        for _ in run.epochs(2):
            for x, y in loader:
                for mx, my in run.micro_batches(x, y):
                    F.cross_entropy(model(mx), my).backward()
                optimizer.step()
                run.step()
        digests.append(run.finish().final_digest)
        manifests.append(json.loads((tmp_path / name / "manifest.json").read_text()))
    assert digests[0] == digests[1]
    entry = manifests[0]["distributed"]
    assert (entry["reduction"], entry["micro_batches"], entry["world_size"]) == ("canonical", 2, 1)
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def test_canonical_misuse_is_refused_with_the_fix(tmp_path: Path) -> None:
    """optimizer.step() without a micro-batch loop, run.micro_batches in ddp mode, a global batch the
    micro-batches do not divide, and a non-tensor argument each raise naming the fix."""
    run = _run(tmp_path / "a", reduction="canonical", micro_batches=4)
    model = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.track(model=model, optimizer=optimizer)
    with pytest.raises(DistributedError, match="micro-batches do not split global batch 10"):
        run.loader(_data(), batch_size=10)
    loader = run.loader(_data(), batch_size=8)
    for _ in run.epochs(1):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            with pytest.raises(ReprokitError, match=r"without a run\.micro_batches"):
                optimizer.step()
            with pytest.raises(ReprokitError, match="takes the batch's tensors"):
                next(iter(run.micro_batches(x, [1, 2])))
            with pytest.raises(ReprokitError, match=r"hold \[7\] samples"):
                next(iter(run.micro_batches(x[:7])))
            break
        break
    plain = _run(tmp_path / "b")
    plain.track(model=nn.Linear(6, 3))
    with pytest.raises(ReprokitError, match="belongs to reduction='canonical'"):
        plain.micro_batches(torch.zeros(4, 6))

