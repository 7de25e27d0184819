"""reprokit.Run in reduction mode "canonical" under ``torchrun --standalone``: the user's loop of
tests/fixtures/canonical/canonical_digits.py gives the same bits in one process and at 2 and 4 ranks
(every step's digests, on every rank), where ddp mode gives a different model per world size
(tests/test_ddp_run.py).

Two torchrun launches; each is bounded by a deadline that kills torchrun and every rank it started.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launching import launch, torchrun

FIXTURE = Path(__file__).parent / "fixtures" / "canonical" / "canonical_digits.py"
DEADLINE = 180.0  # seconds for one launch (~5 s at 2 ranks, ~11 s at 4 on an idle 2-core machine)


def _launch(run_dir: Path, *args: str, nproc: int | None, restarts: int = 0, **env: str) -> tuple[int, str]:
    """The fixture under torchrun with ``nproc`` ranks (plain python when None): exit status, output."""
    command = torchrun(nproc, restarts=restarts) if nproc else [sys.executable]
    return launch([*command, str(FIXTURE), str(run_dir), *args], deadline=DEADLINE,
                  env={"OMP_NUM_THREADS": "1", **env})


def _rank_dirs(run_dir: Path, n: int) -> list[Path]:
    return [run_dir] + [run_dir / "ranks" / f"rank-{r}" for r in range(1, n)]


def _result(run_dir: Path) -> dict[str, object]:
    return dict(json.loads((run_dir / "result.json").read_text()))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("canonical") / "n1"
    status, output = _launch(run_dir, nproc=None)
    assert status == 0, output
    return run_dir


@pytest.mark.parametrize("nproc", [2, 4])
def test_canonical_mode_gives_the_one_process_bits_at_every_world_size(one_process: Path, tmp_path: Path,
                                                                       nproc: int) -> None:
    """At N ranks every rank's digests.csv (every step, step 0 included) is the one-process run's,
    byte for byte; the replicas never differ; the manifests share one fingerprint and name the mode."""
    run_dir = tmp_path / f"n{nproc}"
    status, output = _launch(run_dir, nproc=nproc)
    assert status == 0, output
    reference = (one_process / "digests.csv").read_bytes()
    for rank_dir in _rank_dirs(run_dir, nproc):
        assert (rank_dir / "digests.csv").read_bytes() == reference, rank_dir
        assert _result(rank_dir)["final_digest"] == _result(one_process)["final_digest"]
    assert _result(run_dir)["replica_mismatch"] == []
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one_process, run_dir)]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]
    entry = manifests[1]["distributed"]
    assert (entry["reduction"], entry["micro_batches"], entry["world_size"]) == ("canonical", 8, nproc)
    assert entry["owned"] == [0, 8 // nproc]  # rank 0's block of micro-batches


@pytest.mark.parametrize(("before", "after"), [(None, 2), (2, 4), (2, None)])
def test_a_killed_canonical_run_resumes_at_another_world_size_bit_exact(
    one_process: Path, tmp_path: Path, before: int | None, after: int | None
) -> None:
    """Killed after step 10 (checkpoints at 4 and 8) at one world size, relaunched at another: the run
    continues from its newest checkpoint and rank 0's digests.csv is the uninterrupted one-process
    run's, byte for byte. A rank new to the run (the world grew) continues from rank 0's checkpoint,
    recorded in its manifest with the torch seed it was given; rank 0's resume log names the new
    world size. (None: one process, no torchrun.)"""
    run_dir = tmp_path / "run"
    status, output = _launch(run_dir, nproc=before, REPROKIT_CRASH_AT_STEP="6" if before else "10")
    assert status != 0 and not (run_dir / "result.json").exists(), output
    status, output = _launch(run_dir, nproc=after)
    assert status == 0, output
    assert (run_dir / "digests.csv").read_bytes() == (one_process / "digests.csv").read_bytes()
    final = _result(one_process)["final_digest"]
    for rank_dir in _rank_dirs(run_dir, after or 1):
        assert _result(rank_dir)["final_digest"] == final, rank_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumes"][-1]["from_step"] == (4 if before else 8)
    if after:
        assert manifest["resumes"][-1]["world_size"] == after
        newcomer = json.loads((run_dir / "ranks" / f"rank-{after - 1}" / "manifest.json").read_text())
        assert newcomer["borrowed"]["step"] == manifest["resumes"][-1]["from_step"]
        assert isinstance(newcomer["borrowed"]["torch_seed"], int)


def test_torchrun_max_restarts_after_a_killed_rank_finishes_bit_exact(one_process: Path,
                                                                      tmp_path: Path) -> None:
    """Both ranks SIGKILLed at step 6 under ``torchrun --max-restarts 1``: torchrun's restart continues
    from step 4 and ends on the one-process digests. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as Run's
    warning says (without it the restarted gloo group fails to connect: pytorch/pytorch#135712)."""
    run_dir = tmp_path / "run"
    status, output = _launch(run_dir, nproc=2, restarts=1, REPROKIT_CRASH_AT_STEP="6",
                             TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert status == 0, output
    assert "resuming" in output and "from step-0000004" in output
    assert (run_dir / "digests.csv").read_bytes() == (one_process / "digests.csv").read_bytes()
