"""Provenance: the manifest records environment, code, data and lineage; one fingerprint per recipe."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

import reprokit
from reprokit import checkout, provenance
from reprokit.checkout import CODE_DIFF, NOT_A_CHECKOUT, code_state, save_code_diff
from reprokit.config import TrainConfig
from reprokit.data import load_dataset
from reprokit.differences import manifest_differences, recipe_differences
from reprokit.provenance import ProvenanceError, build_manifest, fingerprint, manifest_table
from reprokit.seeding import seed_everything

CONFIG = TrainConfig(model="mlp", steps=5, threads=1)
DATA = load_dataset("digits")


@pytest.fixture
def outside_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory git will not look above, so it is outside any checkout wherever tmp lives."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    project = tmp_path / "project"
    project.mkdir()
    return project


def _git(repo: Path, *args: str) -> str:
    run = subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t",
                          *args], capture_output=True, text=True, check=True)
    return run.stdout.strip()


@pytest.fixture
def repo(outside_git: Path) -> Path:
    """A git checkout with one commit of one file, ``train.py``."""
    _git(outside_git, "-c", "init.defaultBranch=main", "init", "-q")
    (outside_git / "train.py").write_text("lr = 0.05\n")
    _git(outside_git, "add", "train.py")
    _git(outside_git, "commit", "-q", "-m", "first")
    return outside_git


def _manifest(config: TrainConfig = CONFIG, threads: int = 1, **kwargs: Any) -> dict[str, Any]:
    seeds = seed_everything(config.seed, threads=threads)
    return build_manifest(config, seeds, DATA, **kwargs)


def test_manifest_records_environment_data_seeding_and_lineage(
    outside_git: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every section is present, correct and survives a JSON round trip unchanged."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("REPROKIT_PROBE", "yes")
    monkeypatch.setenv("UNRELATED_SETTING", "no")
    manifest = _manifest(repo_dir=outside_git)
    env = manifest["environment"]
    assert (env["torch"], env["numpy"], env["threads"]) == (torch.__version__, np.__version__, 1)
    assert env["torchvision"] and env["python"] and env["platform"] and env["cpu"]
    assert env["variables"]["OMP_NUM_THREADS"] == "1" and env["variables"]["REPROKIT_PROBE"] == "yes"
    assert "UNRELATED_SETTING" not in env["variables"]
    packages = env["packages"]
    assert packages == sorted(set(packages)) and f"numpy=={np.__version__}" in packages
    assert env["packages_digest"] == xxhash.xxh3_128_hexdigest("\n".join(packages).encode())
    assert manifest["data"] == {"name": "digits", "task": "classification",
                                "split": {"split_seed": 0, "val_fraction": 0.2},
                                "train_size": 1438, "val_size": 359, "digest": DATA.digest}
    assert manifest["config"] == CONFIG.to_dict() and manifest["seeding"]["threads"] == 1
    assert manifest["lineage"] == {"parent": None}
    assert manifest["fingerprint"] == fingerprint(manifest)
    assert json.loads(json.dumps(manifest)) == manifest
    assert _manifest(repo_dir=outside_git)["run_id"] != manifest["run_id"]


def test_rng_state_digest_is_the_state_right_after_seeding(outside_git: Path) -> None:
    """Reseeding gives the same RNG digest; drawing one number before the manifest changes it."""
    first = _manifest(repo_dir=outside_git)["rng_state_digest"]
    assert _manifest(repo_dir=outside_git)["rng_state_digest"] == first
    seeds = seed_everything(0, threads=1)
    torch.rand(1)
    assert build_manifest(CONFIG, seeds, DATA, repo_dir=outside_git)["rng_state_digest"] != first


def test_clean_checkout_is_recorded_with_commit_and_branch(repo: Path) -> None:
    """A clean checkout: its HEAD commit and branch, dirty False, no diff digest, no code.diff."""
    code = code_state(repo)
    assert (code.commit, code.branch, code.dirty, code.diff_digest) == (
        _git(repo, "rev-parse", "HEAD"), "main", False, None)
    save_code_diff(repo, code)
    assert not (repo / CODE_DIFF).exists()


def test_dirty_checkout_is_detected_and_its_diff_saved(repo: Path, tmp_path: Path) -> None:
    """An edit makes the checkout dirty; another edit changes the diff digest; code.diff restores it."""
    (repo / "train.py").write_text("lr = 0.1\n")
    first = code_state(repo)
    assert first.dirty and first.diff_digest and "+lr = 0.1" in first.diff
    (repo / "train.py").write_text("lr = 0.2\n")
    _git(repo, "add", "train.py")  # staged changes count too
    second = code_state(repo)
    assert second.dirty and second.diff_digest not in (None, first.diff_digest)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_code_diff(run_dir, second)
    _git(repo, "reset", "-q", "--hard")
    _git(repo, "apply", str(run_dir / CODE_DIFF))
    assert (repo / "train.py").read_text() == "lr = 0.2\n"
    manifest_code = _manifest(repo_dir=repo)["code"]
    assert manifest_code["dirty"] and manifest_code["diff_digest"] == second.diff_digest


def test_untracked_files_are_counted_but_do_not_make_the_checkout_dirty(repo: Path) -> None:
    """A new file the checkout does not track raises the untracked count and leaves dirty False."""
    (repo / "notes.txt").write_text("scratch\n")
    code = code_state(repo)
    assert (code.untracked, code.dirty) == (1, False)


def test_outside_git_is_a_clear_entry_not_an_error(outside_git: Path) -> None:
    """Outside any checkout the code entry says "not a git checkout" and the fingerprint still works."""
    manifest = _manifest(repo_dir=outside_git)
    assert manifest["code"]["git"] == NOT_A_CHECKOUT
    assert "not a git repository" in manifest["code"]["reason"]
    assert manifest["code"]["reprokit_source"] and manifest["fingerprint"] == fingerprint(manifest)


def test_missing_git_and_ignored_directories_count_as_outside_git(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed copy inside an ignored directory, or no git at all, gives a reason, not a commit."""
    (repo / ".gitignore").write_text(".venv/\n")
    installed = repo / ".venv" / "reprokit"
    installed.mkdir(parents=True)
    ignored = code_state(installed)
    assert ignored.commit is None and ignored.reason and "ignored" in ignored.reason
    monkeypatch.setenv("PATH", str(repo))
    missing = code_state(repo)
    assert missing.to_dict() == {"git": NOT_A_CHECKOUT, "reason": "git is not installed (not on PATH)"}


def test_default_repo_is_the_package_checkout_not_the_working_directory(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """code_state() describes the checkout holding reprokit, even when run from another checkout."""
    monkeypatch.chdir(repo)
    package = code_state(Path(reprokit.__file__).parent)
    default = code_state()
    assert (default.repo, default.commit, default.reason) == (package.repo, package.commit, package.reason)
    assert default.repo != str(repo)


def test_code_state_names_stay_importable_from_provenance() -> None:
    """The checkout's names are re-exported by provenance, the same objects, for existing callers."""
    for name in ("CODE_DIFF", "NOT_A_CHECKOUT", "CodeState", "code_state", "save_code_diff"):
        assert getattr(provenance, name) is getattr(checkout, name)


def test_fingerprint_is_equal_for_one_recipe_and_differs_with_the_seed(outside_git: Path) -> None:
    """Two manifests of one recipe share a fingerprint; a new seed or parent changes it, a new
    checkpoint cadence does not (it changes no bit)."""
    a, b = _manifest(repo_dir=outside_git), _manifest(repo_dir=outside_git)
    assert a["fingerprint"] == b["fingerprint"] and a["run_id"] != b["run_id"]
    assert _manifest(CONFIG.replace(seed=1), repo_dir=outside_git)["fingerprint"] != a["fingerprint"]
    parent = {"digest": "0" * 32, "run_id": "parent-run"}
    child = _manifest(repo_dir=outside_git, parent=parent)
    assert child["lineage"]["parent"] == parent and child["fingerprint"] != a["fingerprint"]
    recording = _manifest(CONFIG.replace(checkpoint_every=2), repo_dir=outside_git)
    assert recording["fingerprint"] == a["fingerprint"]


def test_the_world_size_is_part_of_the_fingerprint_under_torchrun(outside_git: Path) -> None:
    """A manifest with a 'distributed' entry: another world size or reduction, another fingerprint;
    one without the entry keeps the fingerprint it had (one process's runs are unchanged)."""
    a = _manifest(repo_dir=outside_git)
    assert fingerprint(a) == a["fingerprint"]
    world = {"backend": "gloo", "world_size": 2, "threads_per_rank": 1, "reduction": "ddp"}
    two = fingerprint({**a, "distributed": world})
    assert two != a["fingerprint"]
    assert fingerprint({**a, "distributed": {**world, "world_size": 4}}) != two
    assert fingerprint({**a, "distributed": {**world, "reduction": "canonical"}}) != two
    assert fingerprint({**a, "distributed": {**world, "threads_per_rank": 1}}) == two
    assert recipe_differences({**a, "distributed": world}, {**a, "distributed": {**world, "world_size": 4}}) \
        == ["distributed.world_size: 2 -> 4"]

def test_bad_parent_and_incomplete_manifest_are_errors(outside_git: Path) -> None:
    """A parent without a digest, code plus repo_dir, or a manifest missing a section: clear errors."""
    with pytest.raises(ProvenanceError, match="has no 'digest' string"):
        _manifest(repo_dir=outside_git, parent={"run_id": "x"})
    with pytest.raises(ProvenanceError, match="pass only code"):
        _manifest(repo_dir=outside_git, code=code_state(outside_git))
    with pytest.raises(ProvenanceError, match="manifest has no 'environment' entry"):
        fingerprint({"config": CONFIG.to_dict()})


def test_manifest_differences_list_thread_count_and_packages(outside_git: Path) -> None:
    """Changing threads lists exactly the thread entries; a package change is listed per package."""
    a = _manifest(repo_dir=outside_git)
    b = _manifest(CONFIG.replace(threads=2), threads=2, repo_dir=outside_git)
    diff = manifest_differences(a, b)
    assert list(diff.columns) == ["key", "a", "b"]
    assert diff.set_index("key").to_dict("index") == {
        "config.threads": {"a": 1, "b": 2},
        "environment.threads": {"a": 1, "b": 2},
        "seeding.threads": {"a": 1, "b": 2},
    }
    c = copy.deepcopy(a)
    packages = c["environment"]["packages"]
    c["environment"]["packages"] = [p for p in packages if not p.startswith(("numpy==", "pandas=="))]
    c["environment"]["packages"].append("numpy==0.0")
    rows = manifest_differences(a, c).set_index("key")
    assert rows.loc["environment.packages.numpy"].tolist() == [np.__version__, "0.0"]
    assert rows.loc["environment.packages.pandas", "b"] is None
    assert manifest_differences(a, _manifest(repo_dir=outside_git)).empty


def test_manifest_table_has_one_row_per_leaf_and_summarises_packages() -> None:
    """Every manifest leaf but the package list is one readable row; packages become one count."""
    manifest = {"run_id": "r1", "config": {"seed": 3, "model": "cnn"}, "lineage": {"parent": None},
                "environment": {"threads": 1, "packages": ["numpy==2.0", "torch==2.14.1"]}}
    table = manifest_table(manifest)
    rows = {(r.section, r.field): r.value for r in table.itertuples()}
    assert rows[("config", "seed")] == 3
    assert rows[("lineage", "parent")] is None
    assert rows[("environment", "packages")] == "2 installed (digest below)"
    assert not table["field"].str.startswith("packages.").any()
    assert table["section"].tolist()[0] == "run_id"
