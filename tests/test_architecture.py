"""The shape of the code base, checked: no import cycles, configuration above compute, imports at the top.

The graph is read from the source with :mod:`ast` (no module is imported), so these tests
fail as soon as a change adds an arrow the layout forbids.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cemcurate", "pretrain", "finetune")
CONFIG_MODULES = {
    "finetune.config",
    "pretrain.config",
    "cemcurate.build.config",
    "cemcurate.common.config",
    "cemcurate.filtering.config",
}
# Command-level modules: they read configs and call compute. Everything else is compute or
# infrastructure and must not import a config or CLI module.
COMMAND_MODULES = {
    "cemcurate.cli",
    "cemcurate.filtering.cli",
    "cemcurate.filtering.train",
    "cemcurate.common.runstate",
    "pretrain.cli",
    "pretrain.train",
    "finetune.cli",
    "finetune.train",
    "finetune.training_model",
    "finetune.benchmark",
    "finetune.benchmark_cli",
    "finetune.benchmark_transfer",
    "finetune.evaluate",
    "finetune.predict.command",
}
BUILD_STAGE = "cemcurate.build"  # the build stage's own modules read BuildConfig (except cut, its compute)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[ast.stmt, str]]:
    """``(node, imported project module)`` for every import statement in the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs or [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((node, target))
    return found


GRAPH = {name: {target for _, target in _imports(name, path)} for name, path in MODULES.items()}


def test_the_graph_sees_every_package():
    assert {"cemcurate.build.orchestrate", "pretrain.train", "finetune.predict.windows"} <= set(MODULES)
    assert "finetune.config" in GRAPH["finetune.train"]


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_compute_imports_no_config_and_no_cli():
    bad = []
    for name, targets in GRAPH.items():
        if name in COMMAND_MODULES or name in CONFIG_MODULES or name.endswith(".cli"):
            continue
        in_build = name == BUILD_STAGE or name.startswith(BUILD_STAGE + ".")
        if in_build and name != "cemcurate.build.cut":
            continue
        bad += [f"{name} -> {t}" for t in targets if t in CONFIG_MODULES or t.endswith(".cli")]
    assert not bad, bad
    # Named in the issue that set this layout: the 3D and prediction compute stays below the config.
    for name in ("finetune.predict.sliding", "finetune.augment2d", "finetune.augment3d", "finetune.data3d"):
        assert not GRAPH[name] & {"finetune.config"}, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_are_at_the_top(name):
    """No import inside a function or class: optional heavy dependencies use cemcurate.common.lazy."""
    tree = ast.parse(MODULES[name].read_text())
    top = set()
    for stmt in tree.body:  # module level, including module-level try/if blocks
        top.update(
            id(n) for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        )
    inner = [
        f"line {n.lineno}: {ast.unparse(n)}"
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
    ]
    assert not inner, inner
