"""Cause attribution: why two runs split, from the first fingerprint that differs.

The manifests decide first (a different recipe, code or data is a cause before any step: here);
then the steps both runs recorded are walked in order (:mod:`reprokit.stepcauses`, over digests.csv,
fingerprints.csv and grads.csv: see :mod:`reprokit.fingerprints`), and at the first step where
something differs the inputs of that step are looked at in the order they were made: sample indices,
batch bytes, RNG streams, loss and gradients, updated parameters. What differs first names the cause:

    identical       every digest equal, both runs finished with the same final digest
    config          recipe fields differ (seed, lr, ...)
    code            the user's script, its checkout or reprokit's source differ
    data            a dataset content digest differs
    init            the step-0 parameters differ with the same recipe
    data-order      the first differing step drew other samples
    augmentation    same samples, other batch bytes
    rng             same batch and parameters, but an RNG stream was drawn differently
    environment     same inputs, other loss or gradients; the manifests differ in threads,
                    versions, hardware or determinism flags
    nondeterminism  the same, with no recorded difference
    optimizer       same gradients, other updated parameters
    unknown         the records cannot tell (no fingerprints, a split between recorded steps)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from reprokit.differences import manifest_differences
from reprokit.provenance import CODE_DIFF
from reprokit.stepcauses import Cause as Cause
from reprokit.stepcauses import step_cause

CAUSES = ("identical", "config", "code", "data", "init", "data-order", "augmentation", "rng",
          "environment", "nondeterminism", "optimizer", "unknown")
_CODE_KEYS = ("code.commit", "code.diff_digest", "code.reprokit_source", "code.factories",
              "entry.script_digest", "entry.module")
# environment.variables that change bits (REPROKIT_PROGRESS or REPROKIT_RUN_DIR do not)
_BIT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED",
                  "CUDA_VISIBLE_DEVICES", "REPROKIT_THREADS", "REPROKIT_DETERMINISTIC")
# config fields that are also seeding knobs (TrainConfig's): recorded under seeding, they count as
# the environment, whose evidence is a step with the same inputs and other arithmetic
_KNOBS = frozenset({"threads", "deterministic"})


def attribute_cause(a: Path, b: Path, manifest_a: Mapping[str, Any], manifest_b: Mapping[str, Any],
                    digests_a: Sequence[tuple[int, Mapping[str, str]]],
                    digests_b: Sequence[tuple[int, Mapping[str, str]]], *, identical: bool) -> Cause:
    """The cause of the split between run directories ``a`` and ``b`` (their manifests and
    per-step parameter digests already read), in the precedence of :data:`CAUSES`."""
    if identical:
        return Cause("identical", None, explanation="every recorded digest and the final digest are equal",
                     fix="nothing to fix")
    diffs = manifest_differences(manifest_a, manifest_b)
    for check in (_config_cause, _code_cause, _data_cause):
        found = check(a, b, manifest_a, manifest_b, diffs)
        if found is not None:
            return found
    return step_cause(a, b, dict(digests_a), dict(digests_b), environment_differences(diffs))


def environment_differences(diffs: pd.DataFrame) -> list[str]:
    """``key: a -> b`` for the manifest entries that can change bits outside the recipe: threads,
    library versions, platform and hardware, determinism flags, bit-relevant variables."""
    out = []
    for row in diffs.itertuples():
        key = str(row.key)
        section, _, rest = key.partition(".")
        relevant = (section == "seeding" and rest != "seed") or (
            section == "environment" and rest != "reprokit"
            and (not rest.startswith("variables.") or rest.split(".", 1)[1] in _BIT_VARIABLES))
        if relevant:
            out.append(f"{key}: {row.a!r} -> {row.b!r}")
    return out


def with_replay(cause: Cause, equal: bool, detail: str, environment: Sequence[str]) -> Cause:
    """``cause`` with what replaying its step twice in this process found (see :mod:`reprokit.replay`)."""
    evidence = (*cause.evidence, f"replay: {detail}")
    if not equal:
        return replace(cause, name="nondeterminism", replay="confirmed", evidence=evidence,
                       explanation=f"step {cause.step} replayed twice from the same state gives two "
                                   "different results: confirmed nondeterminism in this process")
    where = "the environment (" + "; ".join(environment) + ")" if environment else \
        "the environment, or from something the other run's process did that the recorded command does " \
        "not (a callback, another machine)"
    return replace(cause, replay="cleared", evidence=evidence,
                   explanation=f"step {cause.step} is deterministic here (two replays agree bit for bit), "
                               f"so the difference came from {where}")


# --- run-level causes: the manifests ------------------------------------------------------------
def _config_cause(a: Path, b: Path, ma: Mapping[str, Any], mb: Mapping[str, Any],
                  diffs: pd.DataFrame) -> Cause | None:
    recording = set(ma.get("recording_fields", ())) | set(mb.get("recording_fields", ()))
    same_parent = ((ma.get("lineage") or {}).get("parent") or {}).get("digest") == \
        ((mb.get("lineage") or {}).get("parent") or {}).get("digest")
    fields = []
    for row in diffs.itertuples():
        key = str(row.key)
        name = key.split(".")[1] if key.startswith("config.") else None
        counted = name is not None and name not in recording | _KNOBS \
            and not (name == "init_from" and same_parent)
        if counted or key == "seeding.seed":
            fields.append(f"{key}: {row.a!r} -> {row.b!r}")
    if not fields:
        return None
    return Cause("config", None, explanation=f"the recipes differ in {len(fields)} field(s): another recipe "
                 "gives other bits by design", fix="compare two runs of the same recipe",
                 evidence=tuple(fields))


def _code_cause(a: Path, b: Path, ma: Mapping[str, Any], mb: Mapping[str, Any],
                diffs: pd.DataFrame) -> Cause | None:
    rows = [r for r in diffs.itertuples() if any(str(r.key) == k or str(r.key).startswith(f"{k}.")
                                                 for k in _CODE_KEYS)]
    if not rows:
        return None
    evidence, files, diff = [], [], ""
    for row in rows:
        key = str(row.key)
        evidence.append(f"{key}: {row.a!r} -> {row.b!r}")
        if key == "entry.script_digest":
            scripts = {str((m.get("entry") or {}).get("script")) for m in (ma, mb)}
            files += sorted(scripts)
            evidence.append(f"the script {' / '.join(sorted(scripts))} was edited between the runs; only its "
                            "digest is kept, so diff the two versions yourself (or commit the script, so "
                            "the checkout's diff is kept)")
        elif key == "code.reprokit_source":
            files.append("reprokit (its own source)")
        elif key == "code.commit":
            files.append(f"the checkout: commit {str(row.a)[:12]} -> {str(row.b)[:12]}")
        elif key == "code.diff_digest":
            changed, diff = _diff_between(a, b)
            files += changed
            if not diff:
                evidence.append(f"neither run kept a {CODE_DIFF} to show")
        elif key.startswith("code.factories"):
            files.append(key.split(".")[2] if key.count(".") >= 2 else key)
    files = list(dict.fromkeys(files))
    return Cause("code", None, explanation=f"the code differs: {', '.join(files) or 'see evidence'}",
                 fix="run the same code: restore the edited file(s) or check out the commit the other run "
                     "used, then compare again", evidence=tuple(evidence), diff=diff)


def _diff_between(a: Path, b: Path) -> tuple[list[str], str]:
    """The files whose uncommitted changes differ between the runs' kept ``code.diff``, and a
    unified diff of those two diffs ("" when neither run kept one)."""
    texts = [(p / CODE_DIFF).read_text(errors="replace") if (p / CODE_DIFF).is_file() else "" for p in (a, b)]
    if not any(texts):
        return [], ""
    per_file = [_split_diff(t) for t in texts]
    changed = sorted(n for n in per_file[0].keys() | per_file[1].keys()
                     if per_file[0].get(n) != per_file[1].get(n))
    lines = difflib.unified_diff(texts[0].splitlines(), texts[1].splitlines(), f"{a}/{CODE_DIFF}",
                                 f"{b}/{CODE_DIFF}", lineterm="", n=1)
    return changed, "\n".join(lines)


def _split_diff(text: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        match = re.match(r"diff --git a/(\S+) b/", line)
        if match:
            name = match.group(1)
        if name is not None:
            parts[name] = parts.get(name, "") + line
    return parts


def _data_cause(a: Path, b: Path, ma: Mapping[str, Any], mb: Mapping[str, Any],
                diffs: pd.DataFrame) -> Cause | None:
    rows = [r for r in diffs.itertuples()
            if str(r.key) == "data.digest" or str(r.key).startswith("data.sources.")]
    if not rows:
        return None
    sources = sorted({str(r.key).split(".")[2] for r in rows if str(r.key).startswith("data.sources.")})
    what = f"the content digest of {', '.join(sources)}" if sources else "the dataset's content digest"
    return Cause("data", None, explanation=f"the data differs: {what}",
                 fix="train both runs on the same data (the digests say which source changed)",
                 evidence=tuple(f"{r.key}: {r.a!r} -> {r.b!r}" for r in rows))
