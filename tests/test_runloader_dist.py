"""reprokit.runloader under a process group: one global order per epoch, each global batch split by rank.

One launch runs the loop of tests/fixtures/ddploader/loop.py in FileStore groups of 1, 2 and 4 gloo
ranks side by side (the store in tmp_path, never a fixed port; a 30 s process-group timeout; a
subprocess deadline that kills every rank it started); each rank also runs it as one process first.
Run refuses a relaunch at another world size until its checkpoints go through DCP, so the resume at
another N is checked on the loader's sampler here, and the relaunch at the same N through Run.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from reprokit.runloader import _PassSampler

FIXTURES = Path(__file__).parent / "fixtures" / "ddploader"
DEADLINE = 90.0  # seconds for the whole launch (7 processes on a small machine)
SIZES = (1, 2, 4)
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _load_loop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddploader_loop", FIXTURES / "loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loop = _load_loop()


def _launch(tmp: Path) -> dict[int, list[dict[str, Any]]]:
    """Every rank of every world size in SIZES at once; their reports by world size, in rank order."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    procs: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + DEADLINE
    try:
        for n in SIZES:
            (tmp / f"n{n}").mkdir()
            for rank in range(n):
                with open(tmp / f"n{n}-rank{rank}.log", "wb") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, str(FIXTURES / "loader_worker.py"), str(tmp / f"store{n}"),
                         str(tmp / f"n{n}")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                        env={**env, "OMP_NUM_THREADS": "1", "REPROKIT_PROGRESS": "0", "RANK": str(rank),
                             "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank)}))
        codes = [proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = []
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if codes != [0] * len(procs):
        pytest.fail(f"ranks exited {codes or 'past the deadline'}:\n" +
                    "\n".join(p.read_text()[-2000:] for p in sorted(tmp.glob("*.log"))))
    return {n: [torch.load(tmp / f"n{n}" / f"rank{r}.pt") for r in range(n)] for n in SIZES}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    return _launch(tmp_path_factory.mktemp("ddploader"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The loop in this process, no process group: what every world size is compared with."""
    steps: list[dict[str, Any]] = loop.run_loop(tmp_path_factory.mktemp("reference") / "run")
    assert len(steps) == loop.EPOCHS * (loop.SIZE // loop.GLOBAL_BATCH)
    return steps


def _global(ranks: list[dict[str, Any]], part: str, step: int) -> torch.Tensor:
    """The ranks' rows of one step, in rank order: the global batch as the ranks saw it."""
    return torch.cat([report[part][step]["rows"] for report in ranks])


def test_shards_in_rank_order_are_the_one_process_batches() -> None:
    """Without a group: the sampler's shards at N = 2 and 4, in rank order, are its N = 1 batches;
    under N > 1 the incomplete last global batch is dropped even without drop_last."""
    def batches(rank: int, n: int) -> list[list[int]]:
        sampler = _PassSampler(20, 4 * 2, shuffle=True, drop_last=False)
        sampler.pass_seed, sampler.rank, sampler.world_size, sampler.whole_only = 5, rank, n, n > 1
        return [[i for _, i in keys] for keys in sampler]
    whole = batches(0, 1)
    assert [len(b) for b in whole] == [8, 8, 4]
    for n in (2, 4):
        shards = [batches(r, n) for r in range(n)]
        assert [[i for s in shards for i in s[b]] for b in range(2)] == whole[:2]
        assert all(len(s) == 2 and len(s[0]) == 8 // n for s in shards)


def test_a_position_continues_at_the_same_global_batch_at_any_world_size() -> None:
    """A sampler started at global batch b (a resumed position) yields, at N = 2 and 4, the shards
    of the one-process batches from b on."""
    def batches(rank: int, n: int, start: int) -> list[list[int]]:
        sampler = _PassSampler(40, 8, shuffle=True, drop_last=True)
        sampler.pass_seed, sampler.rank, sampler.world_size, sampler.start = 7, rank, n, start
        sampler.whole_only = n > 1
        return [[i for _, i in keys] for keys in sampler]
    whole = batches(0, 1, 0)
    for n in (2, 4):
        for start in (1, 3):
            shards = [batches(r, n, start) for r in range(n)]
            assert [[i for s in shards for i in s[b]] for b in range(5 - start)] == whole[start:], (n, start)


def test_each_global_batch_is_the_same_samples_at_every_world_size(
        jobs: dict[int, list[dict[str, Any]]], reference: list[dict[str, Any]]) -> None:
    """At N = 1, 2, 4 the ranks' samples of each global step are disjoint, G/N each, and together the
    one-process batch, fetched with the same numpy and torch draws."""
    for n, ranks in jobs.items():
        for s, ref in enumerate(reference):
            indices = [report["full"][s]["rows"][:, 0].tolist() for report in ranks]
            assert all(len(mine) == loop.GLOBAL_BATCH // n for mine in indices), (n, s)
            assert len({i for mine in indices for i in mine}) == loop.GLOBAL_BATCH, (n, s)  # disjoint
            rows = _global(ranks, "full", s)
            assert torch.equal(rows[:, [0, 2, 3]], ref["rows"][:, [0, 2, 3]]), (n, s)
            assert [report["full"][s]["step"] for report in ranks] == [ref["step"]] * n


def test_a_group_of_one_is_the_no_group_loader(
        jobs: dict[int, list[dict[str, Any]]], reference: list[dict[str, Any]]) -> None:
    """At N = 1, in or out of a group, every rank's one-process loop and the 1-rank group's loop are
    bitwise the reference: python's draws included."""
    def same(steps: list[dict[str, Any]]) -> bool:
        return all(torch.equal(a["rows"], b["rows"]) for a, b in zip(steps, reference, strict=True))
    assert all(same(report["alone"]) for ranks in jobs.values() for report in ranks)
    assert same(jobs[1][0]["full"])


def test_python_draws_are_per_sample_under_ranks(
        jobs: dict[int, list[dict[str, Any]]], reference: list[dict[str, Any]]) -> None:
    """Under N > 1 python's random is seeded per sample: the same draws at N = 2 and 4; each global
    batch's first sample draws what it draws at N = 1 (seeded from it there too), the others differ."""
    for s, ref in enumerate(reference):
        two, four = _global(jobs[2], "full", s), _global(jobs[4], "full", s)
        assert torch.equal(two, four), s
        assert two[0, 1] == ref["rows"][0, 1] and not torch.equal(two[1:, 1], ref["rows"][1:, 1]), s


def test_position_is_the_same_global_counter_at_every_rank_and_world_size(
        jobs: dict[int, list[dict[str, Any]]], reference: list[dict[str, Any]]) -> None:
    """The loader's state after each step is the same at every rank of every N: the global batch."""
    for n, ranks in jobs.items():
        for report in ranks:
            assert [step["state"] for step in report["full"]] == [ref["state"] for ref in reference], n


def test_a_relaunch_under_ranks_continues_at_the_same_global_batch(
        jobs: dict[int, list[dict[str, Any]]], reference: list[dict[str, Any]]) -> None:
    """Killed after global step KILL_AT at N ranks and relaunched, each rank continues with the
    uninterrupted N-rank run's shards and positions, nothing replayed."""
    for n, ranks in jobs.items():
        for report in ranks:
            assert len(report["killed"]) == loop.KILL_AT
            steps = [step["step"] for step in report["resumed"]]
            assert steps == [r["step"] for r in reference[loop.KILL_AT:]], n
            for got, want in zip(report["resumed"], report["full"][loop.KILL_AT:], strict=True):
                assert torch.equal(got["rows"], want["rows"]) and got["state"] == want["state"], n


def test_incomplete_global_batch_dropped_and_non_divisible_batch_refused(
        jobs: dict[int, list[dict[str, Any]]]) -> None:
    """36 samples in global batches of 8: 5 batches at N = 1 without drop_last, 4 under N > 1; a
    global batch of 9 is refused at N = 2 and 4, naming G, N and the valid world sizes."""
    for n, ranks in jobs.items():
        for report in ranks:
            assert tuple(report["lengths"]) == ((5, 4) if n == 1 else (4, 4)), n
            if n == 1:
                assert report["refused"] == ""
            else:
                assert report["refused"] == (
                    f"DistributedError: run.loader: batch_size is the global batch, split over the ranks: "
                    f"global batch 9 is not divisible by world size {n}; valid world sizes: 1, 3, 9")
