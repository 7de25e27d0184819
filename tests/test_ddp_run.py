"""reprokit.Run under ``torchrun --standalone --nproc-per-node 2`` in reduction mode "ddp": a user's own
DDP loop (tests/fixtures/ddprun/ddp_digits.py) repeats bitwise, every rank's digests are recorded and
compared with rank 0's, and a killed run relaunched at the same world size finishes with the
uninterrupted model; a relaunch at another world size is refused.

Four torchrun launches in all (the reference run is shared by the module); each is bounded by a
deadline that kills torchrun and every rank it started.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import reprokit
from reprokit.runworld import ddp_settings, track_ddp

FIXTURE = Path(__file__).parent / "fixtures" / "ddprun" / "ddp_digits.py"
REPO = Path(__file__).parents[1]
DEADLINE = 180.0  # seconds for one launch (~10 s on an idle 2-core machine)
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _launch(run_dir: Path, *args: str, nproc: int | None = 2, **env: str) -> tuple[int, str]:
    """The fixture under torchrun with ``nproc`` ranks (plain python when None): exit status, output."""
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node",
                str(nproc)] if nproc else [sys.executable]
    environ = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("REPROKIT_")}
    proc = subprocess.Popen([*torchrun, str(FIXTURE), str(run_dir), *args], cwd=REPO, text=True,
                            env={**environ, "OMP_NUM_THREADS": "1", "REPROKIT_PROGRESS": "0", **env},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
        output, _ = proc.communicate()
        pytest.fail(f"the launch did not finish in {DEADLINE} s:\n{output}")
    return proc.returncode, output


def _result(run_dir: Path) -> dict[str, object]:
    return dict(json.loads((run_dir / "result.json").read_text()))


def _rank1(run_dir: Path) -> Path:
    return run_dir / "ranks" / "rank-1"


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def _files(run_dir: Path) -> dict[Path, bytes]:
    """Every file's bytes but the lock's (a refused relaunch takes a killed run's stale lock, frees it)."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run at 2 ranks."""
    run_dir = tmp_path_factory.mktemp("ddp") / "a"
    status, output = _launch(run_dir)
    assert status == 0, output
    return run_dir


def test_two_ranks_repeat_bitwise_and_agree(reference: Path, tmp_path: Path) -> None:
    """Two launches at N=2 give the same final digest; each rank records digests equal to rank 0's in its
    own directory, draws its own dropout stream, and rank 0's manifest names the distributed setup (the
tracked DDP wrapper's bucket size and flags included). The
    second launch also checkpoints every 0.01 s (rank 0 decides: every rank saves the same steps) and
    changes rank 1's weights outside DDP for step 5 only (reported, then put back)."""
    again = tmp_path / "b"
    status, output = _launch(again, "--seconds", "0.01", "--perturb-at", "5")
    assert status == 0, output
    assert _result(again)["replica_mismatch"] == [[5, 1]]
    assert "rank 1's parameters differ from rank 0's after step 5" in output
    assert _checkpoints(again) == _checkpoints(_rank1(again))
    finals = {_result(d)["final_digest"] for d in (reference, _rank1(reference), again, _rank1(again))}
    assert len(finals) == 1
    assert (reference / "digests.csv").read_bytes() == (_rank1(reference) / "digests.csv").read_bytes()
    assert _result(reference)["replica_mismatch"] == []
    manifest = json.loads((reference / "manifest.json").read_text())
    keys = ("backend", "world_size", "threads_per_rank", "reduction")
    recorded = {k: manifest["distributed"][k] for k in keys}
    assert recorded == {"backend": "gloo", "world_size": 2, "threads_per_rank": 1, "reduction": "ddp"}
    # the tracked DistributedDataParallel's settings, as torch built it (bucket_cap_mb=None: 25 MiB)
    assert manifest["distributed"]["ddp"] == {"model": {
        "bucket_bytes_cap": 25 * 2**20, "bucket_cap_mb": 25.0, "first_bucket_bytes_cap": 2**20,
        "bucket_bytes_cap_list": [], "gradient_as_bucket_view": False, "find_unused_parameters": False,
        "static_graph": False, "forward_sync_buffers": True}}
    assert manifest["distributed"]["nccl_env"] == {}  # gloo reads no NCCL variable
    assert manifest["tracked"]["model"] == "Sequential"  # the module inside the wrapper is saved
    torch_streams = [[row["torch"] for row in csv.DictReader((d / "fingerprints.csv").open())]
                     for d in (reference, _rank1(reference))]
    assert all(a != b for a, b in zip(*torch_streams, strict=True))  # rank 1 re-seeded: other dropout masks
    verified = subprocess.run([sys.executable, "-m", "reprokit", "verify", str(reference)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "2/2 checkpoints verify" in verified.stdout  # ranks/ is not mistaken for a checkpoint


def test_killed_run_resumes_at_the_same_world_size(reference: Path, tmp_path: Path) -> None:
    """Killed at step 10 with rank 1's newest checkpoint damaged: a relaunch at N=1 is refused naming both
    world sizes, changing nothing; the same torchrun command settles every rank at step 4 (the newest
    step all ranks hold) and finishes with the uninterrupted final digest, the replica mismatch of step
    3 (rank 1 perturbed for that step) still reported."""
    run_dir = tmp_path / "c"
    status, output = _launch(run_dir, "--perturb-at", "3", REPROKIT_CRASH_AT_STEP="10")
    assert status != 0 and not (run_dir / "result.json").exists(), output
    assert _checkpoints(run_dir) == _checkpoints(_rank1(run_dir)) == ["step-0000004", "step-0000008"]
    damaged = _rank1(run_dir) / "checkpoints" / "step-0000008" / "tensors.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x01
    damaged.write_bytes(bytes(data))
    before = _files(run_dir)

    status, output = _launch(run_dir, "--perturb-at", "3", nproc=None)
    assert status != 0
    assert "was run at world size 2, this launch has world size 1" in output
    assert "in reduction mode 'ddp' the bits depend on the world size" in output
    assert _files(run_dir) == before

    status, output = _launch(run_dir, "--perturb-at", "3")
    assert status == 0, output
    assert _result(run_dir)["replica_mismatch"] == [[3, 1]]  # found before the kill, kept by checkpoint 4
    assert "skipped step-0000008: step 8 is newer than step 4" in output  # rank 0 falls back
    for d in (run_dir, _rank1(run_dir)):
        assert (_result(d)["final_digest"], _result(d)["resumed_from_step"]) == \
            (_result(reference)["final_digest"], 4)
    assert (run_dir / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()


def test_a_sigterm_at_one_rank_stops_every_rank_after_the_same_step(reference: Path, tmp_path: Path) -> None:
    """Rank 1 alone gets SIGTERM during step 6: both ranks stop after step 6 with a checkpoint (exit
    status 75, none left in a collective), and the same command then finishes bit-exact."""
    run_dir = tmp_path / "t"
    status, output = _launch(run_dir, "--sigterm-at", "6")
    assert status != 0 and not (run_dir / "result.json").exists(), output
    assert output.count("stopped by SIGTERM at step 6 with a checkpoint") == 2, output
    assert _checkpoints(run_dir) == _checkpoints(_rank1(run_dir)) == ["step-0000004", "step-0000006"]
    status, output = _launch(run_dir, "--sigterm-at", "6")  # the same command (step 6 is behind it now)
    assert status == 0, output
    assert (_result(run_dir)["final_digest"], _result(run_dir)["resumed_from_step"]) == \
        (_result(reference)["final_digest"], 6)
    assert (run_dir / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()

def test_one_process_records_no_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchrun a Run makes no process group and its manifest and result are as before."""
    for name in _DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    run = reprokit.Run(tmp_path / "one", ledger=False, progress=False, overrides=False)
    run.track(model=nn.Linear(2, 1))
    run.step()
    run.finish()
    assert (run.world.world_size, run.world.backend, run.path) == (1, None, tmp_path / "one")
    assert "distributed" not in json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert "replica_mismatch" not in _result(tmp_path / "one")
    assert not (tmp_path / "one" / "ranks").exists()


def test_ddp_settings_are_read_from_the_wrapper(tmp_path: Path) -> None:
    """A DDP built with non-default settings is recorded as built: 3 MiB buckets (the first one too),
    gradients as bucket views, a static graph; tracking it yields the module inside (one process, a
    FileStore group: no launch)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Linear(4, 2)
        ddp = DistributedDataParallel(model, bucket_cap_mb=3, gradient_as_bucket_view=True, static_graph=True)
        assert ddp_settings(ddp) == {
            "bucket_bytes_cap": 3 * 2**20, "bucket_cap_mb": 3.0, "first_bucket_bytes_cap": 3 * 2**20,
            "bucket_bytes_cap_list": [], "gradient_as_bucket_view": True, "find_unused_parameters": False,
            "static_graph": True, "forward_sync_buffers": True}
        manifest: dict[str, object] = {"distributed": {"world_size": 1}}
        assert track_ddp({"model": ddp, "n": 1}, manifest) == {"model": model, "n": 1}
        assert manifest["distributed"] == {"world_size": 1, "ddp": {"model": ddp_settings(ddp)}}
        assert track_ddp({"model": ddp}, None) == {"model": model}  # a relaunch records nothing
    finally:
        dist.destroy_process_group()
