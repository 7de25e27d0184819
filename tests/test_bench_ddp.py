"""benchmarks/bench_ddp.py at tiny sizes: one torchrun launch of 2 ranks writes every figure and check.

No timing is asserted (STYLE 9): only that the figures exist and that both sides of each comparison
did the same work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_ddp.py"
DEADLINE = 90.0  # the launch; the script stops its own torchrun past its timeout too
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_bench_ddp_writes_its_figures_and_both_sides_match(tmp_path: Path) -> None:
    """The JSON holds the step, reduction, save and Run figures; the canonical step at 2 ranks is bitwise
    the one-process one, every rank and run agree, both checkpoints load back to the saved state, the
    Run in mode "ddp" ends on the plain DDP loop's digest and the canonical Run on a one-process one's."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    tiny = ["--width", "16", "--steps", "3", "--repeats", "1", "--saves", "1", "--save-width", "32",
            "--run-steps", "4"]
    agent = subprocess.Popen([sys.executable, str(BENCH), *tiny, "--json", str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = agent.communicate(timeout=DEADLINE)
    finally:  # SIGTERM: torchrun tears its workers down (they are in their own sessions)
        if agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=30)
    assert agent.returncode == 0, log.decode()[-3000:]
    results = json.loads(out.read_text())
    assert (results["world_size"], results["backend"], results["threads_per_rank"]) == (2, "gloo", 1)
    step = results["step"]
    for key in ("ddp_ms", "canonical_ms", "ratio", "reduce_all_reduce_ms", "reduce_canonical_ms"):
        assert step[key] > 0, key
    assert step["gathered_floats"] == 2 * step["all_reduce_floats"] == 2 * step["params"]
    assert step["canonical_matches_one_process"] and step["ranks_agree"] and step["repeatable"]
    assert step["canonical_digest"] == step["one_process_digest"]
    assert step["max_abs_diff_ddp_vs_canonical"] < 1e-4  # the same training, another summation order
    assert [save["width"] for save in results["saves"]] == [16, 32]
    for save in results["saves"]:
        assert save["bare_ms"] > 0 and save["verified_ms"] > 0 and save["state_bytes"] > 0
        assert save["digests_match"] and save["saved_digest"] == save["verified_loaded_digest"]
    run = results["run"]
    for key in ("plain_ms", "ddp_ms", "canonical_ms", "ratio", "canonical_ratio", "whole_ratio"):
        assert run[key] > 0, key
    assert set(run["hook_ms"]) == {"step", "yield", "update"} and run["hook_ms"]["step"] > 0
    assert (run["steps"], run["repeats"], run["n_micro"]) == (4, 1, 8)
    assert run["run_matches_plain"] and run["ddp_digest"] == run["plain_digest"]
    assert run["canonical_matches_one_process"] and run["canonical_digest"] == run["one_process_digest"]
    assert run["ranks_agree"] and run["repeatable"]
    assert "SUMMARY: canonical/DDP step" in log.decode() and "Run(ddp)/plain DDP loop" in log.decode()
