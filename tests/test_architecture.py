"""The shape of the code (issue 15): no import cycles, a data layer free of model code, function-local imports
only where they say why, one FusionModel assembler, run-directory file names spelt in one module, thin
entry points. The layer order itself is import-linter's contract in pyproject.toml (run by .ci/run)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gemma_fusion"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other (directly or through others)."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(group)

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_the_package_has_no_import_cycles():
    imports = grimp.build_graph("gemma_fusion")  # function-local imports count too
    graph = {m: imports.find_modules_directly_imported_by(m) for m in imports.modules}
    cycles = [sorted(group) for group in _strongly_connected(graph) if len(group) > 1]
    cycles += [[m] for m, targets in graph.items() if m in targets]
    assert cycles == []


def test_a_cycle_is_found_when_there_is_one():  # the check above can fail
    groups = _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert sorted(sorted(g) for g in groups if len(g) > 1) == [["a", "b", "c"]]


def test_importing_the_data_layer_loads_no_model_code():
    probe = ("import sys, gemma_fusion.data, gemma_fusion.data.pipeline, gemma_fusion.data.collate, "
             "gemma_fusion.data.sources, gemma_fusion.core.batch; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lightning', 'peft') "
             "or m.startswith('gemma_fusion.models')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _local_imports(tree: ast.Module):
    """Import statements inside a function or class body (not `if TYPE_CHECKING:` blocks at module level)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_function_local_imports_say_why(path):
    """Only optional heavy dependencies are imported inside functions, each with a comment saying why."""
    lines = path.read_text().splitlines()
    silent = []
    for node in _local_imports(_tree(path)):
        text = " ".join(lines[node.lineno - 1:node.end_lineno])
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        if "#" not in text and not above.startswith("#"):
            silent.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
    assert silent == []


def _calls_named(tree: ast.Module, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name:
            yield node


def test_one_function_assembles_a_fusion_model():
    """FusionModel(...) is called nowhere in the package: `FusionModel.from_loaded` (`cls(...)`) is the assembler."""
    callers = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in SOURCES for n in _calls_named(_tree(p), "FusionModel")]
    assert callers == []
    fusion = _tree(PACKAGE / "models" / "fusion.py")
    assemblers = [f.name for f in ast.walk(fusion) if isinstance(f, ast.FunctionDef) and any(_calls_named(f, "cls"))]
    assert assemblers == ["from_loaded"]


RUN_FILE_NAMES = ("trainable.safetensors", "config.yaml", "eval.json", "eval_compare.json", "compute.json",
                  "metrics.csv", "export.json", "projectors.safetensors")


def _code_strings(tree: ast.Module):
    """String constants of the code (docstrings left out: they may describe the layout)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_only_the_run_directory_module_spells_a_runs_file_names():
    found = [f"{p.relative_to(ROOT)}:{node.lineno}: {name}" for p in SOURCES if p.name != "rundir.py"
             for node in _code_strings(_tree(p)) for name in RUN_FILE_NAMES if name in node.value]
    assert found == []


def test_no_code_compares_class_names():
    """Decisions about a part ask its contract, never `type(x).__name__ == "..."`."""
    found = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Compare):
                names = [n for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr == "__name__"]
                if names and not any(isinstance(s, ast.Name) and s.id == "__name__" for s in ast.walk(node)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_top_level_scripts_are_thin_shims(script):
    assert len((ROOT / script).read_text().splitlines()) <= 40


def test_tests_use_the_recipes_not_the_scripts():
    importing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
                 for node in ast.walk(_tree(p)) if isinstance(node, (ast.Import, ast.ImportFrom))
                 and ({a.name for a in node.names} & {"train", "eval"} if isinstance(node, ast.Import)
                      else node.module in ("train", "eval"))]
    assert importing == []


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert 'pip install -e ".[dev]" && python train.py' in readme
    assert 'pip install -e ".[dev]" && pytest -q' in readme
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
