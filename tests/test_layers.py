"""The package's layers (DESIGN.md): imports point down only, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reprokit"
# the primitives know nothing of TrainConfig, the registries or the bundled data
LAYERS: dict[int, set[str]] = {
    0: {"errors", "diskerrors", "seeding", "globalrng", "stateview", "fingerprints", "digests", "rundir",
        "ledger", "ledgerentry",
        "faults", "trace", "flatsums", "flatkernels", "checkpoint", "checkpointer", "checkpointreader",
        "tensorfile", "directio", "fsio", "provenance", "checkout", "overrides", "entrypoint", "datadigest",
        "callbacks", "differences", "distributed", "distcheckpoint", "runlock", "untrusted"},
    1: {"run", "runloader", "runresume", "runrecorder", "runtracked", "runsettings", "runstart", "runstop",
        "runsnapshot", "runworld", "runreduce", "loaderoptions", "runend"},
    2: {"config", "data", "models", "trainer", "resumer", "finetuning", "transfer", "audit", "compare",
        "stepcauses",
        "causes", "replay", "reproduction", "recovery", "relaunch", "scriptruns", "factories", "study",
        "worldruns"},
    3: {"cli", "torchlaunch", "report", "display", "plots", "trace_plots", "__main__", "__init__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "reprokit":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("reprokit."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("reprokit."))
    return found


def test_every_module_has_a_layer() -> None:
    """Each module of the package is placed in one layer (a new module must say where it belongs)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - set(LAYER_OF) == set()


def test_imports_point_down_only() -> None:
    """No module imports one of a higher layer, not even lazily inside a function."""
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        layer = LAYER_OF.get(path.stem, 3)
        if path.stem == "__init__":
            continue  # the lazy export table names every layer by design
        for target in _imports(path):
            if target in LAYER_OF and LAYER_OF[target] > layer:
                upward.append(f"{path.stem} (L{layer}) imports {target} (L{LAYER_OF[target]})")
    assert upward == []
