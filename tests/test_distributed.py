"""reprokit.distributed: the process group, topology-free seeds, the batch split, the canonical reduction.

The multi-process tests rendezvous through a FileStore in tmp_path or ``torchrun --standalone`` (never
a fixed TCP port: two jobs on one port hang), with a process-group timeout, and each launch is bounded
by a subprocess deadline that kills every rank it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from reprokit.distributed import (
    World,
    all_equal_to_rank0,
    canonical_all_reduce,
    canonical_world_sizes,
    check_divisible,
    flatten_grads,
    init_process_group,
    micro_batches_of,
    microbatch_seed,
    nccl_env,
    rank_seed,
    shard_batch,
    tree_sum,
    unflatten_into_grads,
    world_from_env,
)
from reprokit.errors import DistributedError

FIXTURES = Path(__file__).parent / "fixtures" / "dist"
DEADLINE = 60.0  # seconds for a whole launch; the ranks' own process-group timeouts are shorter
N_MICRO = 8
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
Proc = subprocess.Popen[bytes]


def _leaves(n_micro: int = N_MICRO) -> list[torch.Tensor]:
    # the fixture canonical_worker.py builds the same ones: magnitudes over 8 decades show the order
    data = torch.randn(n_micro, 1000, generator=torch.Generator().manual_seed(0))
    return list(data * torch.logspace(-4, 4, 1000))


def _left_to_right(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total = total + part
    return total


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _DIST_VARS:
        monkeypatch.delenv(name, raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@contextmanager
def _ranks(tmp_path: Path, script: str, world_size: int, *args: str) -> Iterator[list[Proc]]:
    """Start one process per rank (each its own process group, logs in tmp_path); kill them all at the end."""
    procs: list[Proc] = []
    try:
        for rank in range(world_size):
            with open(tmp_path / f"n{world_size}-rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(FIXTURES / script), *args], stdout=log, stderr=subprocess.STDOUT,
                    env=_env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)),
                    start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(procs: list[Proc], deadline: float, logs: Path) -> list[int]:
    try:
        return [proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("ranks still running at the deadline:\n" +
                    "\n".join(p.read_text()[-2000:] for p in sorted(logs.glob("*.log"))))


# --- the world and the process group -------------------------------------------------------------

def test_world_defaults_to_one_process(no_torchrun: None) -> None:
    """Without torchrun's variables the world is rank 0 of 1, and init creates no group."""
    assert world_from_env() == World(0, 1, 0, None, initialized_here=False)
    world = init_process_group()
    assert (world.world_size, world.initialized_here, world.is_main) == (1, False, True)
    assert not torch.distributed.is_initialized()


def test_world_reads_torchrun_variables(no_torchrun: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK, WORLD_SIZE and LOCAL_RANK are read as torchrun sets them; a bad value is named."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == World(3, 4, 1, None, initialized_here=False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedError, match=r"RANK=4 with WORLD_SIZE=4: the rank must lie in \[0, 3\]"):
        world_from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(DistributedError, match="RANK='one' is not an int"):
        world_from_env()


def test_init_names_the_missing_variable(no_torchrun: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK without WORLD_SIZE, or env:// without MASTER_ADDR/MASTER_PORT, is refused naming the variable."""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DistributedError, match="RANK is set but WORLD_SIZE is not"):
        init_process_group()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(DistributedError, match="RANK is set but MASTER_ADDR is not"):
        init_process_group()
    with pytest.raises(DistributedError, match="timeout_s=0 must be positive"):
        init_process_group(timeout_s=0)


def test_nccl_env_lists_only_nccl_and_cublas(monkeypatch: pytest.MonkeyPatch) -> None:
    """nccl_env reports the NCCL_* and CUBLAS_WORKSPACE_CONFIG variables in force, nothing else."""
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env = nccl_env()
    assert env["NCCL_ALGO"] == "Ring" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert all(k.startswith("NCCL_") or k == "CUBLAS_WORKSPACE_CONFIG" for k in env)


# --- seeds ------------------------------------------------------------------------------------------

def test_microbatch_seeds_do_not_depend_on_world_size() -> None:
    """Micro-batch i of step s gets the same seed whichever rank owns it at N = 1, 2, 4 or 8."""
    def seeds(world_size: int) -> list[int]:
        return [microbatch_seed(7, 3, m) for rank in range(world_size)
                for m in micro_batches_of(rank, world_size, N_MICRO)]
    assert seeds(1) == seeds(2) == seeds(4) == seeds(8)
    grid = {microbatch_seed(7, step, m) for step in range(10) for m in range(N_MICRO)}
    assert len(grid) == 10 * N_MICRO and all(0 <= s < 2**63 for s in grid)


def test_derived_seeds_are_stable() -> None:
    """Derived seeds are pinned values (blake2b, not Python's salted hash), distinct per rank."""
    assert microbatch_seed(0, 0, 0) == microbatch_seed(0, 0, 0) != microbatch_seed(0, 0, 1)
    assert microbatch_seed(0, 0, 0) == 6072402650260064896
    assert len({rank_seed(0, rank) for rank in range(8)}) == 8
    assert rank_seed(0, 0) != microbatch_seed(0, 0, 0)


# --- the batch split ---------------------------------------------------------------------------------

def test_non_divisible_batch_names_valid_world_sizes() -> None:
    """A global batch or micro-batch count N cannot split is refused naming G, N and the valid sizes."""
    check_divisible(12, 4, micro_batches=4)
    with pytest.raises(DistributedError, match=r"global batch 12 .* world size 5; valid world sizes: "
                                               r"1, 2, 3, 4, 6, 12$"):
        check_divisible(12, 5)
    with pytest.raises(DistributedError, match=r"8 micro-batches .* world size 3; valid world sizes: "
                                               r"1, 2, 4, 8$"):
        check_divisible(24, 3, micro_batches=8)
    with pytest.raises(DistributedError, match="5 micro-batches do not split global batch 12"):
        check_divisible(12, 1, micro_batches=5)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shards_cover_the_global_batch_once(world_size: int) -> None:
    """The ranks' shards, in rank order, are the global batch: each sample once, whatever N."""
    batch = [17, 3, 9, 0, 42, 5, 8, 11]
    shards = [shard_batch(batch, rank, world_size) for rank in range(world_size)]
    assert [i for shard in shards for i in shard] == batch
    owned = [m for rank in range(world_size) for m in micro_batches_of(rank, world_size, N_MICRO)]
    assert owned == list(range(N_MICRO))
    with pytest.raises(DistributedError, match="valid world sizes: 1, 2, 4, 8"):
        shard_batch(batch, 0, 3)


# --- the canonical reduction ---------------------------------------------------------------------------

def test_tree_sum_adds_in_the_fixed_pairwise_order() -> None:
    """tree_sum is ((p0+p1)+(p2+p3))+p4 exactly, and differs from a left-to-right sum on float32 data."""
    p = _leaves(5)
    assert torch.equal(tree_sum(p), ((p[0] + p[1]) + (p[2] + p[3])) + p[4])
    assert not torch.equal(tree_sum(p), _left_to_right(p))  # so the equality tests below can fail
    assert tree_sum(p[:1]) is not p[0] and torch.equal(tree_sum(p[:1]), p[0])


@pytest.mark.parametrize("n_micro", [6, 8, 12])
def test_rank_blocks_are_subtrees(n_micro: int) -> None:
    """For every valid world size, summing each rank's block then the blocks gives the full tree's bits."""
    leaves = _leaves(n_micro)
    for world_size in canonical_world_sizes(n_micro):
        blocks = [tree_sum([leaves[m] for m in micro_batches_of(r, world_size, n_micro)])
                  for r in range(world_size)]
        assert torch.equal(tree_sum(blocks), tree_sum(leaves)), world_size


def test_canonical_refuses_world_sizes_that_split_a_subtree() -> None:
    """6 micro-batches cannot be split over 2 ranks as whole subtrees; the valid sizes are named."""
    assert canonical_world_sizes(8) == [1, 2, 4, 8]
    assert canonical_world_sizes(12) == [1, 3, 6, 12]
    with pytest.raises(DistributedError, match="world size 2 is not one of the valid world sizes: 1, 3, 6"):
        canonical_all_reduce(_leaves(3), 6, World(0, 2, 0, "gloo", initialized_here=False))
    with pytest.raises(DistributedError, match=r"rank 0 passed 3 micro-batch sums; .* it owns 4 of 8"):
        canonical_all_reduce(_leaves(3), 8, World(0, 2, 0, "gloo", initialized_here=False))


def test_canonical_is_bitwise_the_same_at_every_world_size(tmp_path: Path) -> None:
    """canonical_all_reduce over 8 micro-batches gives the same bits on every rank at N = 1, 2, 4 and 8."""
    single = canonical_all_reduce(_leaves(), N_MICRO, World(0, 1, 0, None, initialized_here=False))
    assert not torch.equal(single, _left_to_right(_leaves()))
    deadline = time.monotonic() + DEADLINE
    sizes = [2, 4, 8]
    with ExitStack() as stack:  # the three jobs run side by side, each with its own FileStore
        procs = []
        for n in sizes:
            (tmp_path / f"n{n}").mkdir()
            args = (str(tmp_path / f"store{n}"), str(tmp_path / f"n{n}"), str(N_MICRO))
            procs += stack.enter_context(_ranks(tmp_path, "canonical_worker.py", n, *args))
        assert _wait(procs, deadline, tmp_path) == [0] * sum(sizes)
    for n in sizes:
        for rank in range(n):
            assert torch.equal(torch.load(tmp_path / f"n{n}" / f"rank{rank}.pt"), single), (n, rank)


def test_grads_round_trip_through_one_flat_tensor() -> None:
    """flatten_grads then unflatten_into_grads restores every gradient; a wrong length is refused."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    flat = flatten_grads(model)
    assert flat.shape == (3 * 4 + 4 + 4 * 2 + 2,)
    model.zero_grad(set_to_none=False)
    unflatten_into_grads(model, flat)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)) and len(after) == 4
    with pytest.raises(DistributedError, match=r"shape \(25,\) does not fit the model's 26 gradient values"):
        unflatten_into_grads(model, flat[:-1])


# --- torchrun and the timeout -------------------------------------------------------------------------------

def test_torchrun_world_and_rank_digests(tmp_path: Path) -> None:
    """Under torchrun --standalone at N=2 the group is gloo, init is idempotent, a differing rank is named."""
    assert all_equal_to_rank0("aa", World(0, 1, 0, None, initialized_here=False)) == []
    # python -m torch.distributed.run is the torchrun console script; --standalone picks a free port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(FIXTURES / "torchrun_check.py"), str(tmp_path)]
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = agent.communicate(timeout=DEADLINE)
    finally:  # torchrun puts its workers in their own sessions and tears them down on SIGTERM
        if agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=30)
    assert agent.returncode == 0, out.decode()[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == [rank, 2, rank, "gloo", True]
        assert report["env"] == [rank, 2, "gloo"]
        assert report["again_initialized_here"] is False
        assert report["agree"] == [] and report["rank1_differs"] == [1]


def test_stalled_rank_fails_within_the_timeout(tmp_path: Path) -> None:
    """With a 5 s process-group timeout, a rank that stops answering makes rank 0's collective raise."""
    with _ranks(tmp_path, "stall_worker.py", 2, str(tmp_path / "store"), "5") as (rank0, _rank1):
        try:
            rank0.wait(timeout=DEADLINE)  # the deadline is the test: 30 minutes by default
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still waiting for the stalled rank at the deadline")
    log = (tmp_path / "n2-rank0.log").read_text()
    assert rank0.returncode != 0
    assert "DistributedError: all_gather of the canonical partial sums failed on rank 0 of 2" in log
    assert "Timed out" in log
