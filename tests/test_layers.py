"""The architecture, checked: dependencies point one way, and each outside library stays in its layer.

    orchestrator.cli  ->  orchestrator.runs, orchestrator.backends, orchestrator.evolution
    orchestrator.backends  ->  orchestrator.runs
    orchestrator.runs  ->  orchestrator.evolution (the journal it reads for status)
    orchestrator.evolution  ->  the trainer's torch-free modules (its objective adapter: training)
    trainer  ->  nothing of orchestrator

Every import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("trainer", "orchestrator")


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            # `from orchestrator import cli` imports the module orchestrator.cli
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{module_of(path)} imports {module}" for path in files for module in imported_modules(path)
            if any(is_within(module, name) for name in forbidden)]


def test_the_walker_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from orchestrator.evolution import journal\n    import docker.types\n")
    assert set(imported_modules(sample)) >= {"orchestrator.evolution", "orchestrator.evolution.journal",
                                             "docker.types"}


def test_the_trainer_is_a_leaf_library() -> None:
    assert violations(source_files("trainer"), ("orchestrator",)) == []


def test_only_the_docker_backend_imports_the_docker_sdk() -> None:
    files = [path for package in PACKAGES for path in source_files(package)
             if not is_within(module_of(path), "orchestrator.backends.docker")]
    assert violations(files, ("docker",)) == []


def test_only_the_terminal_layers_import_rich() -> None:
    """The CLI layer, and the trainer's own terminal output (its progress bars and log setup)."""
    terminal = ("orchestrator.cli", "trainer.progress")
    files = [path for package in PACKAGES for path in source_files(package)
             if not any(is_within(module_of(path), layer) for layer in terminal)]
    assert violations(files, ("rich",)) == []


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("orchestrator.runs", ("orchestrator.cli", "orchestrator.backends")),
    ("orchestrator.backends", ("orchestrator.cli",)),
    ("orchestrator.evolution", ("orchestrator.cli", "orchestrator.backends", "orchestrator.runs")),
])
def test_dependencies_point_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    files = [path for path in source_files("orchestrator") if is_within(module_of(path), layer)]
    assert files, f"no modules in {layer}"
    assert violations(files, forbidden) == []


# The evolution's entry point and its objective adapter run training; the rest is its core.
EVOLUTION_EDGES = ("orchestrator.evolution.objective", "orchestrator.evolution.command",
                   "orchestrator.evolution.__main__")


def test_only_the_objective_adapter_imports_training() -> None:
    core = [path for path in source_files("orchestrator")
            if is_within(module_of(path), "orchestrator.evolution") and module_of(path) != EVOLUTION_EDGES[0]]
    assert violations(core, ("trainer.train", "trainer.engine")) == []


def test_the_evolution_core_runs_without_torch() -> None:
    core = [module_of(path) for path in source_files("orchestrator")
            if is_within(module_of(path), "orchestrator.evolution") and module_of(path) not in EVOLUTION_EDGES]
    code = (f"import importlib, sys\nfor name in {core!r}:\n    importlib.import_module(name)\n"
            "assert 'torch' not in sys.modules, 'the evolution core imports torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
