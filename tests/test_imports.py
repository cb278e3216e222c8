"""Import rules of the package, checked statically so that lazy imports inside functions count too.

The scan: every .py under src/wanrt is parsed (ast); every `import` and `from ... import` anywhere in it (module
scope, class bodies, functions, `if TYPE_CHECKING:` blocks) is collected, and relative imports are resolved
against the module's package. `from a.b import c` names the module `a.b.c` when that is a module of the
package, else `a.b`. Imports by computed name (importlib.import_module) are not seen.

Groups: a module's group is its first name below `wanrt`: `wanrt.runtime.backends.eager` is in `runtime`,
`wanrt.cli` in `cli`, `wanrt.config` in `config`, `wanrt.params` in `params`; the package `wanrt` itself (its
__init__) is the group `wanrt`. An import of a `wanrt.*` module is an edge from the importer's group to the
imported module's group; imports within one group are not edges.

Rules (DESIGN.md, "Layout": data flows one way, api -> jobs -> worker -> runtime -> model):
(a) the group graph has no cycle (no strongly connected set of two or more groups), lazy imports included;
(b) runtime imports neither engine_build nor cli (shared primitives live in runtime, engine_build imports them);
(c) jobs does not import cli; api imports none of torch, runtime, model, engine_build, and neither does any
    wanrt module that api loads at import time (module-scope imports, followed transitively, with the parent
    packages Python runs on the way): the API process never loads torch.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "wanrt"


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (dotted)
    where: str  # file:line
    module_scope: bool  # runs when the importing module is imported (not inside a function)


def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def scan(root: Path = SRC) -> tuple[dict[str, Path], list[Import]]:
    modules = module_names(root)
    imports: list[Import] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, functions) for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            where, module_scope = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}", id(node) not in lazy
            if isinstance(node, ast.Import):
                imports.extend(Import(name, a.name, where, module_scope) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    imports.append(Import(name, target, where, module_scope))
    return modules, imports


def group(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "wanrt":
        return None
    return parts[1] if len(parts) > 1 else "wanrt"


def in_group(target: str, *names: str) -> bool:
    return group(target) in names


def is_external(target: str, *names: str) -> bool:
    return target.split(".")[0] in names


def group_cycles(imports: list[Import]) -> list[str]:
    """One line per cycle (a strongly connected set of groups), with an import that makes each of its edges."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        a, b = group(imp.source), group(imp.target)
        if b is not None and a != b:
            edges.setdefault(a, {}).setdefault(b, imp)
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(set(edges) | {w for targets in edges.values() for w in targets}):
        if v not in index:
            strongconnect(v)
    return [f"cycle between {', '.join(scc)}: " + "; ".join(
        f"{a} -> {b} ({edges[a][b].where}: {edges[a][b].target})"
        for a in scc for b in sorted(edges.get(a, {})) if b in scc) for scc in sccs]


def forbidden(imports: list[Import], source_group: str, *, groups=(), external=()) -> list[str]:
    return sorted({f"{imp.where}: {imp.source} imports {imp.target}" for imp in imports
                   if group(imp.source) == source_group
                   and (in_group(imp.target, *groups) or is_external(imp.target, *external))})


def api_import_time_violations(modules: dict[str, Path], imports: list[Import]) -> list[str]:
    """What the API process loads at import time, followed through module-scope imports of wanrt modules."""
    scope: dict[str, list[Import]] = {}
    for imp in imports:
        if imp.module_scope:
            scope.setdefault(imp.source, []).append(imp)
    loaded = [m for m in modules if group(m) == "api"]
    seen = set(loaded)
    while loaded:
        module = loaded.pop()
        for imp in scope.get(module, []):
            parts = imp.target.split(".")
            for i in range(1, len(parts) + 1):  # `import a.b.c` runs a, a.b, a.b.c
                name = ".".join(parts[:i])
                if name in modules and name not in seen:
                    seen.add(name)
                    loaded.append(name)
    return sorted({f"{imp.where}: {imp.source} (loaded by the API at import time) imports {imp.target}"
                   for module in seen if group(module) != "api" for imp in scope.get(module, [])
                   if in_group(imp.target, "runtime", "model", "engine_build") or is_external(imp.target, "torch")})


def violations(root: Path = SRC) -> dict[str, list[str]]:
    modules, imports = scan(root)
    return {
        "cycles": group_cycles(imports),
        "runtime": forbidden(imports, "runtime", groups=("engine_build", "cli")),
        "jobs": forbidden(imports, "jobs", groups=("cli",)),
        "api": forbidden(imports, "api", groups=("runtime", "model", "engine_build"), external=("torch",))
        + api_import_time_violations(modules, imports),
    }


@pytest.fixture(scope="module")
def found():
    return violations()


def test_scan_sees_the_whole_package():
    modules, imports = scan()
    assert {"wanrt.cli", "wanrt.runtime.factory", "wanrt.runtime.backends.compiled", "wanrt.api.app"} <= set(modules)
    # lazy imports count: the CLI builds the runtime inside cmd_generate
    assert any(i.source == "wanrt.cli" and i.target == "wanrt.runtime.factory" and not i.module_scope for i in imports)


def test_no_import_cycle_between_groups(found):
    assert found["cycles"] == []


def test_runtime_never_imports_engine_build_or_cli(found):
    assert found["runtime"] == []


def test_jobs_never_imports_cli(found):
    assert found["jobs"] == []


def test_api_never_imports_torch_runtime_model_or_engine_build(found):
    assert found["api"] == []


def test_rules_catch_what_they_forbid(tmp_path):
    """The checks on a small package that breaks each rule, lazily and through a relative import."""
    files = {
        "__init__.py": "",
        "cli.py": "def main():\n    from wanrt.jobs import worker\n",
        "runtime/__init__.py": "",
        "runtime/fp8.py": "def f():\n    from ..engine_build import quantize\n",
        "engine_build/__init__.py": "",
        "engine_build/quantize.py": "from wanrt.runtime.fp8 import f\n",
        "jobs/__init__.py": "",
        "jobs/worker.py": "def load():\n    from wanrt.cli import main\n",
        "api/__init__.py": "",
        "api/app.py": "from wanrt import helpers\n",
        "helpers.py": "import torch.nn\n",
    }
    for name, text in files.items():
        (tmp_path / "wanrt" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "wanrt" / name).write_text(text)
    v = violations(tmp_path / "wanrt")
    assert len(v["cycles"]) == 2 and any("engine_build, runtime" in c for c in v["cycles"])
    assert any("cli, jobs" in c for c in v["cycles"])
    assert v["runtime"] == ["wanrt/runtime/fp8.py:2: wanrt.runtime.fp8 imports wanrt.engine_build.quantize"]
    assert v["jobs"] == ["wanrt/jobs/worker.py:2: wanrt.jobs.worker imports wanrt.cli"]
    assert v["api"] == ["wanrt/helpers.py:1: wanrt.helpers (loaded by the API at import time) imports torch.nn"]
