"""Malformed and hostile run directories (issue 17): every forged file is a one-line CheckpointError
or RunDirError naming the file and the problem; a bad checkpoint falls back to the previous one and
the run still ends bit-exact; a refused relaunch changes no file; nothing outside is read or written."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import xxhash
from torch import nn
from torch.utils.data import TensorDataset

import reprokit
from reprokit.checkpoint import CheckpointError
from reprokit.checkpointreader import latest_pointer, read_checkpoint, verify_run
from reprokit.cli import main
from reprokit.differences import config_differences
from reprokit.errors import ConfigError, RunDirError
from reprokit.rundir import read_digests, read_fingerprints, read_json, read_metrics, read_model
from reprokit.trace import TraceError, Tracer

NEWEST, OLDER = "step-0000006", "step-0000003"


def _loop(run_dir: Path, *, stop_after: int | None = None) -> None:
    """A user's loop (checkpoints every 3 steps); ``stop_after``: leave it as a kill would."""
    run, model, optimizer, loader = _open(run_dir)
    try:
        for _ in run.epochs(2):
            for x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                run.step()
                if run.global_step == stop_after:
                    return
        run.finish()
    finally:
        run.close()


def _open(run_dir: Path) -> tuple[reprokit.Run, nn.Module, torch.optim.Optimizer, Any]:
    """A relaunch of the loop's run, begun: the checkpoint it resumes from is settled."""
    run = reprokit.Run(run_dir, seed=2, config={"lr": 0.1}, checkpoint_every=3, trace_every=2, ledger=False,
                       progress=False)
    try:
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        run.track(model=model, optimizer=optimizer)
        x = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
        loader = run.loader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=6, shuffle=True)
        run.begin()
    except BaseException:
        run.close()
        raise
    return run, model, optimizer, loader


def _resumed(run_dir: Path) -> tuple[int | None, dict[str, str]]:
    """Where a relaunch resumes from and the checkpoints it skipped, with why."""
    run = _open(run_dir)[0]
    run.close()
    return run.resumed_from, dict(run._skipped)


def _final(run_dir: Path) -> str:
    return str(read_json(run_dir, "result.json")["final_digest"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run killed after step 7 (checkpoints at 3 and 6) and the final digest of an uninterrupted one."""
    root = tmp_path_factory.mktemp("hostile")
    _loop(root / "reference")
    _loop(root / "killed", stop_after=7)
    return root / "killed", _final(root / "reference")


def _copy(runs: tuple[Path, str], tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(runs[0], target, symlinks=True)
    return target


def _files(run_dir: Path) -> dict[str, str]:
    """Digest of every file below ``run_dir`` (not following links), the lock file aside."""
    return {str(p.relative_to(run_dir)): xxhash.xxh3_128_hexdigest(p.read_bytes()) if not p.is_symlink()
            else f"-> {os.readlink(p)}" for p in sorted(run_dir.rglob("*"))
            if (p.is_file() or p.is_symlink()) and p.name != ".lock"}


def _forge(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file as a forger would: contents.json updated to match."""
    (ckpt / name).write_bytes(data)
    contents = json.loads((ckpt / "contents.json").read_text())
    contents["files"][name] = {"bytes": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    (ckpt / "contents.json").write_text(json.dumps(contents))


def _meta(**fields: Any) -> Callable[[Path], None]:
    def forge(ckpt: Path) -> None:
        meta = json.loads((ckpt / "meta.json").read_text())
        _forge(ckpt, "meta.json", json.dumps({**meta, **fields}).encode())
    return forge


def _contents(files: Any) -> Callable[[Path], None]:
    def forge(ckpt: Path) -> None:
        contents = json.loads((ckpt / "contents.json").read_text())
        listed = files(contents["files"]) if callable(files) else files
        (ckpt / "contents.json").write_text(json.dumps({"files": listed}))
    return forge


def _tensors(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda ckpt: _forge(ckpt, "tensors.safetensors", edit((ckpt / "tensors.safetensors").read_bytes()))


def _huge_shape(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["0"]["shape"] = [10**9, 10**9]  # 4 EB asked for: refused before anything is allocated
    forged = json.dumps(header).encode()
    return struct.pack("<Q", len(forged)) + forged + data[8 + length:]


def _symlinked_dir(ckpt: Path) -> None:
    outside = ckpt.parents[2] / "elsewhere"
    shutil.move(ckpt, outside)
    ckpt.symlink_to(outside, target_is_directory=True)


def _leaking_member(ckpt: Path) -> None:
    secret = ckpt.parents[2] / "secret.txt"
    secret.write_text("not the run's")
    (ckpt / "leak").symlink_to(secret)
    listed = {"bytes": 13, "xxh3_128": xxhash.xxh3_128_hexdigest(b"x")}
    _contents(lambda files: {**files, "leak": listed})(ckpt)


def _not_a_dict(ckpt: Path) -> None:
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    _forge(ckpt, "state.pt", buffer.getvalue())


# each forges the newest checkpoint; (forgery, what read_checkpoint's CheckpointError says)
CHECKPOINT_CASES = {
    "meta step a string": (_meta(step="6"), r"meta\.json: field 'step' is '6' \(str\); expected an int"),
    "meta step negative": (_meta(step=-6), r"field 'step' is -6 \(int\); expected an int in \[0, 2\*\*63\)"),
    "meta step of another dir": (_meta(step=60), r"says step 60, but the directory is step-0000006"),
    "meta epoch a float": (_meta(epoch=0.5), r"field 'epoch' is 0\.5 \(float\)"),
    "meta config a string": (_meta(config="lr=0.1"),
                             r"field 'config' is 'lr=0\.1' \(str\); expected an object"),
    "meta run_files negative": (_meta(run_files={"metrics.csv": -1}),
                                r"run_files: field 'metrics\.csv' is -1"),
    "meta run_files a string": (_meta(run_files={"metrics.csv": "big"}), r"field 'metrics\.csv' is 'big'"),
    "meta unknown field": (_meta(command="rm -rf /"), r"unknown fields \['command'\]"),
    "meta newer format": (_meta(format_version=99), r"field 'format_version' is 99 \(int\)"),
    "meta architecture shape": (_meta(architecture={"weight": ["torch.float32", ["2"]]}), r"shape: item 0"),
    "meta nested too deep": (_meta(config={"a": json.loads("[" * 80 + "]" * 80)}), r"nested deeper than 64"),
    "meta not UTF-8": (lambda c: _forge(c, "meta.json", b'{"step": "\xff"}'), r"meta\.json: not UTF-8"),
    "meta not JSON": (lambda c: _forge(c, "meta.json", b"{step: 6"), r"meta\.json: not JSON"),
    "meta a list": (lambda c: _forge(c, "meta.json", b"[6]"), r"meta\.json: holds list, not a JSON object"),
    "contents names ../": (_contents(lambda f: {**f, "../manifest.json": f["meta.json"]}),
                           r"'\.\./manifest\.json' \(str\) is a path or a name with a NUL byte"),
    "contents names /etc": (_contents(lambda f: {**f, "/etc/passwd": f["meta.json"]}),
                            r"'/etc/passwd' \(str\)"),
    "contents symlink out": (_leaking_member,
                             r"'leak' \(str\) is a symbolic link to .*secret\.txt', outside"),
    "contents files a list": (_contents(["state.pt"]), r"contents\.json: field 'files' is \['state\.pt'\]"),
    "contents bytes a string": (_contents(lambda f: {**f, "state.pt": {**f["state.pt"], "bytes": "1"}}),
                                r"'state\.pt': field 'bytes' is '1' \(str\)"),
    "tensors header too long": (_tensors(lambda d: struct.pack("<Q", 2**40) + d[8:]),
                                r"header length 1099511627776 exceeds the \d+ bytes after it"),
    "tensors huge shape": (_tensors(_huge_shape), r"do not fit its shape and dtype \(shape \[1000000000, "),
    "tensors cut short": (_tensors(lambda d: d[:-4]),
                          r"tensors\.safetensors: .*data_offsets: item 1 \(of 2\) is \d+ \(int\)"),
    "state not a dict": (_not_a_dict, r"state\.pt: holds list, not a dict"),
    "checkpoint a symlink": (_symlinked_dir, r"step-0000006: a symbolic link, not a checkpoint directory"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_forged_checkpoint_is_named_and_the_run_falls_back(runs: tuple[Path, str], tmp_path: Path,
                                                             case: str) -> None:
    """The forged newest checkpoint is a CheckpointError naming file and problem; a relaunch skips
    it, resumes from the one before, and ends with the uninterrupted run's final digest."""
    forge, message = CHECKPOINT_CASES[case]
    run_dir = _copy(runs, tmp_path)
    forge(run_dir / "checkpoints" / NEWEST)
    with pytest.raises(CheckpointError, match=message) as refused:
        read_checkpoint(run_dir / "checkpoints" / NEWEST)
    assert "\n" not in str(refused.value)
    assert verify_run(run_dir).set_index("checkpoint")["status"].to_dict() == {NEWEST: "bad", OLDER: "ok"}
    at, skipped = _resumed(run_dir)
    assert at == 3 and list(skipped) == [NEWEST]
    _loop(run_dir)
    assert _final(run_dir) == runs[1]


def test_a_forged_position_is_skipped(runs: tuple[Path, str], tmp_path: Path) -> None:
    """A state.pt whose loader position is not what a Run writes is passed over with why."""
    run_dir = _copy(runs, tmp_path)
    ckpt = run_dir / "checkpoints" / NEWEST
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["position"]["tracked"] = 5
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _forge(ckpt, "state.pt", buffer.getvalue())
    at, skipped = _resumed(run_dir)
    assert at == 3 and "position['tracked'] is 5, expected a list" in skipped[NEWEST]


def _manifest(**fields: Any) -> Callable[[Path], None]:
    def forge(run_dir: Path) -> None:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        (run_dir / "manifest.json").write_text(json.dumps({**manifest, **fields}))
    return forge


def _outside_link(name: str) -> Callable[[Path], None]:
    def forge(run_dir: Path) -> None:
        outside = run_dir.parent / f"outside-{name}"
        shutil.move(run_dir / name, outside)
        (run_dir / name).symlink_to(outside)
    return forge


# (forgery of the run directory, what the relaunch's RunDirError / CheckpointError says)
RUN_CASES = {
    "manifest config a string": (_manifest(config="lr=0.1"),
                                 r"manifest\.json: field 'config' is 'lr=0\.1' \(str\); expected dict"),
    "manifest config missing": (lambda d: (d / "manifest.json").write_text('{"kind": "script"}'),
                                r"manifest\.json: field 'config' is missing"),
    "manifest data a number": (_manifest(data=5), r"field 'data' is 5 \(int\); expected dict or null"),
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{"), r"manifest\.json: not JSON"),
    "manifest a list": (lambda d: (d / "manifest.json").write_text("[]"), r"holds list .*not a JSON object"),
    "manifest a symlink out": (_outside_link("manifest.json"),
                               r"manifest\.json: cannot be opened \(a symbolic"),
    "manifest factories a list": (lambda d: _manifest(code={**read_json(d, "manifest.json")["code"],
                                                            "factories": ["x"]})(d),
                                  r"field 'code\.factories' is \['x'\] \(list\); expected an object"),
    "result digest a number": (lambda d: (d / "result.json").write_text('{"final_digest": 5}'),
                               r"result\.json: field 'final_digest' is 5 \(int\); expected str"),
    "metrics.csv shorter than recorded": (lambda d: (d / "metrics.csv").write_bytes(b"step,epoch\n"),
                                          r"metrics\.csv: has 11 bytes, fewer than the \d+ the checkpoint"),
    "metrics.csv a symlink out": (_outside_link("metrics.csv"),
                                  r"metrics\.csv: cannot be opened \(a symbolic"),
    "checkpoints a symlink out": (_outside_link("checkpoints"),
                                  r"checkpoints: a symbolic link \(to '.*outside"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_a_forged_run_file_refuses_the_relaunch_and_changes_nothing(runs: tuple[Path, str], tmp_path: Path,
                                                                    case: str) -> None:
    """A relaunch on a forged run file is refused with one line naming it; no file of the run
    directory, nor the file a link points to outside it, changes."""
    forge, message = RUN_CASES[case]
    run_dir = _copy(runs, tmp_path)
    forge(run_dir)
    before = _files(tmp_path)
    with pytest.raises((RunDirError, CheckpointError), match=message) as refused:
        _open(run_dir)
    assert "\n" not in str(refused.value)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(("pointer", "message"), [
    (b"../../other/checkpoints/step-0000006\n",
     r"latest: names '\.\./\.\./other/.*', not a checkpoint of this"),
    (b"/etc/passwd\n", r"latest: names '/etc/passwd'"),
    (b"step-0000006" * 100, r"latest: names 'step-0000006step-"),
    (None, r"latest: cannot be opened \(a symbolic link\)"),
    (b"", r"latest: not a plain file"),
])
def test_a_hostile_latest_is_named_by_readers_and_ignored_by_the_relaunch(
        runs: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], pointer: bytes | None,
        message: str) -> None:
    """``latest`` must name a checkpoint of this run: otherwise verify says so in one line (exit 2),
    and a relaunch, which never trusts it, resumes from the newest checkpoint that verifies, and
    its saves write ``latest`` again (a directory there swept first); the run ends bit-exact."""
    run_dir = _copy(runs, tmp_path)
    latest = run_dir / "checkpoints" / "latest"
    latest.unlink()
    if pointer is None:
        latest.symlink_to(tmp_path / "run" / "manifest.json")
    elif not pointer:
        latest.mkdir()
    else:
        latest.write_bytes(pointer)
    with pytest.raises(CheckpointError, match=message):
        latest_pointer(run_dir)
    assert main(["verify", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "latest" in err
    assert _resumed(run_dir)[0] == 6
    _loop(run_dir)
    assert _final(run_dir) == runs[1] and latest_pointer(run_dir) == "step-0000015"


def test_forged_csv_and_model_files_are_run_dir_errors(runs: tuple[Path, str], tmp_path: Path) -> None:
    """metrics.csv, digests.csv, fingerprints.csv and model.pt that are not what reprokit wrote are
    one-line RunDirErrors from their readers, never a pandas, json or pickle traceback."""
    run_dir = _copy(runs, tmp_path)
    (run_dir / "metrics.csv").write_text('step,metrics\n1,"{not json"\n')
    with pytest.raises(RunDirError, match=r"metrics\.csv: a metrics cell '\{not json' is not a JSON object"):
        read_metrics(run_dir)
    (run_dir / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RunDirError, match=r"metrics\.csv: not a CSV file reprokit wrote"):
        read_metrics(run_dir)
    (run_dir / "digests.csv").write_text("step,tensor,digest\nsix,weight,abc\n")
    with pytest.raises(RunDirError, match=r"digests\.csv: columns .* expected \['step', 'tensor', 'dig"):
        read_digests(run_dir)
    (run_dir / "fingerprints.csv").write_text("step,batch\nsix,abc\n")
    with pytest.raises(RunDirError, match=r"fingerprints\.csv: its step column is missing or not integers"):
        read_fingerprints(run_dir)
    (run_dir / "model.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RunDirError, match=r"model\.pt: cannot be loaded as a state_dict of tensors"):
        read_model(run_dir)


def test_a_config_that_is_not_a_mapping_is_a_config_error() -> None:
    """config_differences of a forged config (a string) names it, not AttributeError: 'str' ... 'get'."""
    with pytest.raises(ConfigError, match=r"the first config is 'lr=0\.1' \(str\), not a mapping"):
        config_differences("lr=0.1", {"lr": 0.1})  # type: ignore[arg-type]


def test_a_trace_shorter_than_recorded_is_a_run_dir_error(runs: tuple[Path, str], tmp_path: Path) -> None:
    """trace.csv cut below the size the checkpoint recorded: the relaunch stops with a RunDirError
    naming it (it was an OSError from os.truncate for a size past the end), the file as it was."""
    run_dir = _copy(runs, tmp_path)
    (run_dir / "trace.csv").write_bytes(b"step,tensor\n")
    with pytest.raises(RunDirError, match=r"trace\.csv: has 12 bytes, fewer than the \d+ the checkpoint"):
        _loop(run_dir)
    assert (run_dir / "trace.csv").read_bytes() == b"step,tensor\n"


def test_a_linked_spare_tensors_file_is_not_written_through(runs: tuple[Path, str], tmp_path: Path) -> None:
    """A spare tensors file that is a link out of the run directory (the next save overwrites the
    spare in place) is dropped, not written through: the file it names is unchanged, the run ends
    bit-exact."""
    run_dir = _copy(runs, tmp_path)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 1000)
    (run_dir / "checkpoints" / ".tmp-spare-tensors.safetensors").symlink_to(victim)
    _loop(run_dir)
    assert victim.read_bytes() == b"precious" * 1000
    assert _final(run_dir) == runs[1]


def test_a_forged_trace_state_is_a_trace_error() -> None:
    """A checkpoint's Tracer state with a trace_bytes that is not an int is refused by name."""
    with pytest.raises(TraceError, match=r"trace state .* is not a trace_bytes int"):
        Tracer(None).load_state_dict({"trace_bytes": "99", "totals": None, "traced": 0})
