"""Audit: it reports what the machine does, checked against digests computed directly."""

from __future__ import annotations

import pytest

from reprokit import TrainConfig, audit_determinism, determinism_verdict, divergences, seed_variance, train
from reprokit.errors import ConfigError

BASE = TrainConfig(model="cnn", steps=8, batch_size=32, threads=1)


def test_thread_factor_verdict_matches_direct_digests() -> None:
    """The audit's thread verdict equals what comparing 1- and 2-thread digests directly shows."""
    audit = audit_determinism(BASE, seeds=[0], repeats=1, vary={"threads": [1, 2]}, progress=False)
    direct_1 = train(BASE, progress=False).final_digest
    direct_2 = train(BASE.replace(threads=2), progress=False).final_digest
    row = audit[audit["threads"] == 2].iloc[0]
    assert row["final_digest"] == direct_2
    assert bool(row["identical"]) == (direct_1 == direct_2)
    verdict = determinism_verdict(audit).set_index("factor")
    assert verdict.loc["threads", "bitwise_identical"] == ("yes" if direct_1 == direct_2 else "no")
    if direct_1 != direct_2:
        assert row["max_abs_diff"] > 0 and row["diverged_step"] >= 1
        assert len(divergences(audit)) == 1


def test_repeats_and_workers_are_identical() -> None:
    """Repeats with the same settings and a different worker count match the reference bitwise."""
    audit = audit_determinism(BASE, seeds=[0, 1], repeats=2, vary={"num_workers": [0, 2]}, progress=False)
    assert len(audit) == 2 * 2 * 2
    assert audit["identical"].all()
    assert (audit["max_abs_diff"] == 0).all()
    assert audit["diverged_step"].isna().all()
    verdict = determinism_verdict(audit)
    assert verdict["bitwise_identical"].tolist() == ["yes", "yes"]
    assert divergences(audit).empty


def test_reference_digest_equals_a_plain_run() -> None:
    """Each seed's reference row carries the digest a plain train() of that seed gives."""
    audit = audit_determinism(BASE, seeds=[3, 4], repeats=1, progress=False)
    for seed in (3, 4):
        row = audit[audit["seed"] == seed].iloc[0]
        assert row["final_digest"] == train(BASE.replace(seed=seed), progress=False).final_digest


def test_planted_difference_is_found_at_step_zero() -> None:
    """Varying split-independent init (the lr does not touch step 0) diverges at step 1, not 0."""
    audit = audit_determinism(BASE, seeds=[0], repeats=1, vary={"lr": [0.05, 0.1]}, progress=False)
    changed = audit[audit["changed"] == "lr"].iloc[0]
    assert not changed["identical"]
    assert changed["diverged_step"] == 1  # same initial weights, different first update


def test_results_do_not_depend_on_worker_processes() -> None:
    """jobs=2 (spawned processes) gives the same digests, in the same order, as jobs=1."""
    kwargs = {"seeds": [0, 1], "repeats": 1, "vary": {"threads": [1, 2]}, "progress": False}
    serial = audit_determinism(BASE, jobs=1, **kwargs)
    parallel = audit_determinism(BASE, jobs=2, **kwargs)
    assert serial["final_digest"].tolist() == parallel["final_digest"].tolist()
    assert serial["identical"].tolist() == parallel["identical"].tolist()


def test_seed_variance_statistics() -> None:
    """seed_variance gives mean, std and a t-based 95% interval that contains the mean."""
    audit = audit_determinism(BASE, seeds=[0, 1, 2], repeats=1, progress=False)
    stats = seed_variance(audit).iloc[0]
    values = audit["final_metric"]
    assert stats["seeds"] == 3
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["std"] == pytest.approx(values.std(ddof=1))
    assert stats["ci95_low"] <= stats["mean"] <= stats["ci95_high"]
    assert stats["min"] == values.min() and stats["max"] == values.max()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seeds": []}, "seeds is empty"),
        ({"seeds": [1, 1]}, "duplicates"),
        ({"seeds": [0], "repeats": 0}, "repeats 0"),
        ({"seeds": [0], "vary": {"seed": [1, 2]}}, "cannot vary 'seed'"),
        ({"seeds": [0], "vary": {"colour": [1]}}, "cannot vary 'colour'"),
        ({"seeds": [0], "vary": {"threads": []}}, "non-empty list"),
        ({"seeds": [0], "vary": {"threads": [0]}}, "threads 0 must be >= 1"),
        ({"seeds": [0], "jobs": 0}, "jobs 0"),
    ],
)
def test_bad_audit_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    """Bad seeds, repeats, factors or jobs raise ConfigError naming the value."""
    with pytest.raises(ConfigError, match=message):
        audit_determinism(BASE, progress=False, **kwargs)


def test_vary_seeds_sweeps_factors_on_a_subset_only() -> None:
    """Seeds outside vary_seeds run the base settings only; a vary seed not among seeds is refused."""
    config = TrainConfig(steps=3, threads=1)
    audit = audit_determinism(config, [0, 1, 2], 1, {"num_workers": [0, 1]}, vary_seeds=[0], progress=False)
    assert audit.groupby("seed").size().to_dict() == {0: 2, 1: 1, 2: 1}
    with pytest.raises(ConfigError, match=r"vary_seeds \[5\] are not among seeds"):
        audit_determinism(config, [0, 1], 1, {"num_workers": [0, 1]}, vary_seeds=[5], progress=False)
