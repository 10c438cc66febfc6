"""The package's layers point one way, read from the source with `ast` (nothing is imported):
no import cycle inside xlmr_mp/ (function-level imports included), nothing in xlmr_mp/parallel/
imports xlmr_mp.model, nothing in xlmr_mp/model/ calls a torch.distributed collective, nothing in
xlmr_mp/model/ nor the pipeline schedule (xlmr_mp/parallel/schedule.py) imports xlmr_mp.kernels
(fused paths are applied to a built model from outside: kernels.apply), the layout rules import no
torch, and no source file is over 600 lines. Each rule is also run on a small
synthetic tree that breaks it, so the checks themselves are seen to fail."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LINES = 600
SOURCE_DIRS = ("xlmr_mp", "tools", "bench", "launch", "tests", "csrc")
SOURCE_EXT = (".py", ".cpp", ".cu", ".cuh", ".h", ".sh", ".slurm")
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "gather", "scatter", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
               "broadcast_object_list", "gather_object", "scatter_object_list", "monitored_barrier"}


# ----------------------------------------------------------------------------- reading the tree

def _modules(root: str, package: str = "xlmr_mp") -> dict:
    """{dotted module name: path} of every .py file under root/package."""
    out = {}
    for d, _, files in os.walk(os.path.join(root, package)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


def _defined_names(path: str) -> set:
    """Top-level names a module defines itself (functions, classes, assignments, imports)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom of a module, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: str, modules: dict, package: str = "xlmr_mp", module_level: bool = False) -> set:
    """The modules of `modules` that module `name` imports (a `from a import b` of a submodule
    counts as importing a.b); with `module_level`, only the imports run when it is imported."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in _import_nodes(tree):
        if module_level and node.col_offset > 0 and not _at_module_level(tree, node):
            continue
        if isinstance(node, ast.Import):
            # `import pkg.x` of a compiled extension (xlmr_mp._C) imports nothing of the package
            targets = [a.name for a in node.names if a.name in modules or a.name.rsplit(".", 1)[0] not in modules]
        else:
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_pkg else parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            if base not in modules and base.rsplit(".", 1)[0] in modules:
                continue                   # from a compiled extension (xlmr_mp._C): nothing of the package
            # `from pkg import x`: the submodule pkg.x, else a name pkg/__init__.py defines; anything
            # else is a compiled extension (xlmr_mp._C), which imports nothing of the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
                       if f"{base}.{a.name}" in modules or base not in modules
                       or not modules[base].endswith("__init__.py") or a.name in _defined_names(modules[base])]
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name and (t == package or t.startswith(package + ".")):
                out.add(t)
    return out


def _at_module_level(tree: ast.Module, node: ast.AST) -> bool:
    """Whether `node` runs when the module is imported: not inside a function (an import under a
    module-level `if` / `try` counts)."""
    stack = list(tree.body)
    while stack:
        n = stack.pop()
        if n is node:
            return True
        if isinstance(n, (ast.If, ast.Try, ast.With)):
            stack.extend(ast.iter_child_nodes(n))
    return False


def import_graph(root: str, package: str = "xlmr_mp", module_level: bool = False) -> dict:
    mods = _modules(root, package)
    return {m: _imports(m, p, mods, package, module_level) for m, p in mods.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def imports_into(graph: dict, source: str, target: str) -> dict:
    """{module: sorted imports} of the modules of `graph` named `source` or under it that import
    `target` or a module under it (function-level imports included)."""
    def under(m, p):
        return m == p or m.startswith(p + ".")
    out = {m: sorted(n for n in deps if under(n, target)) for m, deps in graph.items() if under(m, source)}
    return {m: d for m, d in out.items() if d}


def collective_calls(path: str) -> list:
    """(line, call) of every call of a torch.distributed collective in one file: through a name
    bound to torch.distributed (`import torch.distributed as dist`), through `torch.distributed.X`,
    or a collective imported by name from torch.distributed."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    aliases, direct = set(), set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    aliases.add(a.asname)
        elif node.module == "torch.distributed":
            direct.update(a.asname or a.name for a in node.names if a.name in COLLECTIVES)
        elif node.module == "torch" and any(a.name == "distributed" for a in node.names):
            aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in direct:
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = ast.unparse(f.value)
            if owner in aliases or owner == "torch.distributed":
                found.append((node.lineno, f"{owner}.{f.attr}"))
    return found


def long_files(root: str, limit: int = MAX_LINES) -> list:
    """(path, lines) of every source file under the SOURCE_DIRS of root longer than `limit` lines."""
    out = []
    for top in SOURCE_DIRS:
        for d, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [x for x in dirs if not x.startswith((".", "__pycache__")) and x != "golden"]
            for f in files:
                if f.endswith(SOURCE_EXT):
                    p = os.path.join(d, f)
                    with open(p, errors="replace") as fh:
                        n = sum(1 for _ in fh)
                    if n > limit:
                        out.append((os.path.relpath(p, root), n))
    return out


def _write(root, rel: str, text: str) -> None:
    p = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- the real tree

def test_no_import_cycle_in_the_package():
    graph = import_graph(ROOT)
    assert "xlmr_mp.parallel.layout" in graph and graph["xlmr_mp.config"], "the import graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_parallel_does_not_import_the_model():
    graph = import_graph(ROOT)
    bad = {m: sorted(n for n in deps if n == "xlmr_mp.model" or n.startswith("xlmr_mp.model."))
           for m, deps in graph.items() if m.startswith("xlmr_mp.parallel")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_model_imports_no_kernel():
    """The model is the reference: no module of xlmr_mp/model/ imports xlmr_mp.kernels."""
    graph = import_graph(ROOT)
    assert "xlmr_mp.model.xlmr" in graph and "xlmr_mp.kernels.fast_paths" in graph
    assert imports_into(graph, "xlmr_mp.model", "xlmr_mp.kernels") == {}


def test_pipeline_schedule_imports_no_kernel():
    """The schedule knows no kernel: what the CPU nodes need around a micro-batch comes in as
    PipelineSchedule(micro_batch=...) from kernels.apply's result."""
    graph = import_graph(ROOT)
    assert "xlmr_mp.parallel.schedule" in graph
    assert imports_into(graph, "xlmr_mp.parallel.schedule", "xlmr_mp.kernels") == {}


def test_model_calls_no_collective():
    mods = _modules(ROOT)
    calls = {p: collective_calls(p) for m, p in mods.items() if m.startswith("xlmr_mp.model")}
    assert len(calls) >= 4
    assert not {p: c for p, c in calls.items() if c}


def torch_importers(root: str, starts) -> list:
    """Modules that importing `starts` runs and that import torch at module level (function-level
    imports do not run on import)."""
    mods = _modules(root)
    graph = import_graph(root, module_level=True)
    seen, todo = set(), list(starts)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    out = []
    for m in sorted(seen):
        with open(mods[m]) as f:
            tree = ast.parse(f.read())
        run = [n for n in _import_nodes(tree) if _at_module_level(tree, n)]
        names = [a.name for n in run if isinstance(n, ast.Import) for a in n.names] + \
                [n.module or "" for n in run if isinstance(n, ast.ImportFrom)]
        if [n for n in names if n == "torch" or n.startswith("torch.")]:
            out.append(m)
    return out


def test_layout_rules_import_no_torch():
    """launch/tools/check_layout.py validates a layout in one CPU process without torch: importing
    xlmr_mp.config and xlmr_mp.parallel.layout runs no torch import."""
    assert torch_importers(ROOT, ["xlmr_mp.config", "xlmr_mp.parallel.layout"]) == []


def test_no_source_file_over_600_lines():
    assert long_files(ROOT) == []


# ----------------------------------------------------------------------------- the checks can fail

def test_checks_find_what_they_look_for(tmp_path):
    _write(tmp_path, "xlmr_mp/__init__.py", "")
    _write(tmp_path, "xlmr_mp/errors.py", "from xlmr_mp import config\n")
    _write(tmp_path, "xlmr_mp/config.py", "def f():\n    from xlmr_mp.parallel import layout\n")
    _write(tmp_path, "xlmr_mp/parallel/__init__.py", "")
    _write(tmp_path, "xlmr_mp/parallel/layout.py", "from ..errors import ConfigError\n")
    _write(tmp_path, "xlmr_mp/parallel/stages.py", "import xlmr_mp.model.xlmr as m\nfrom xlmr_mp import _C\n"
           "import xlmr_mp._C\nfrom xlmr_mp._C import f\n")
    _write(tmp_path, "xlmr_mp/parallel/lazy.py", "def f():\n    import torch\n")
    _write(tmp_path, "xlmr_mp/parallel/eager.py", "try:\n    import torch.nn\nexcept ImportError:\n    pass\n")
    _write(tmp_path, "xlmr_mp/model/__init__.py", "")
    _write(tmp_path, "xlmr_mp/model/xlmr.py",
           "import torch.distributed as d\nfrom torch.distributed import all_reduce\n"
           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from xlmr_mp import config\n"
           "def f(x):\n    d.all_reduce(x)\n    all_reduce(x)\n    x.broadcast()\n")
    graph = import_graph(str(tmp_path))
    assert find_cycle(graph) == ["xlmr_mp.config", "xlmr_mp.parallel.layout", "xlmr_mp.errors", "xlmr_mp.config"]
    assert graph["xlmr_mp.parallel.stages"] == {"xlmr_mp.model.xlmr"}
    assert graph["xlmr_mp.model.xlmr"] == set()          # TYPE_CHECKING imports are not run
    assert torch_importers(str(tmp_path), ["xlmr_mp.parallel.lazy", "xlmr_mp.parallel.eager"]) == \
        ["xlmr_mp.parallel.eager"]
    assert [c for _, c in collective_calls(str(tmp_path / "xlmr_mp/model/xlmr.py"))] == ["d.all_reduce", "all_reduce"]
    _write(tmp_path, "xlmr_mp/errors.py", "")
    assert find_cycle(import_graph(str(tmp_path))) is None
    _write(tmp_path, "tools/big.py", "x = 1\n" * (MAX_LINES + 1))
    _write(tmp_path, "tools/ok.py", "x = 1\n" * MAX_LINES)
    assert long_files(str(tmp_path)) == [(os.path.join("tools", "big.py"), MAX_LINES + 1)]


def test_kernel_import_checks_find_what_they_look_for(tmp_path):
    _write(tmp_path, "xlmr_mp/__init__.py", "")
    _write(tmp_path, "xlmr_mp/kernels/__init__.py", "from xlmr_mp.kernels.ops import f\n")
    _write(tmp_path, "xlmr_mp/kernels/ops.py", "from xlmr_mp.model import xlmr\ndef f():\n    pass\n")
    _write(tmp_path, "xlmr_mp/model/__init__.py", "")
    _write(tmp_path, "xlmr_mp/model/xlmr.py", "import torch\n")
    _write(tmp_path, "xlmr_mp/model/encoder.py", "def g():\n    from xlmr_mp.kernels import ops\n")
    _write(tmp_path, "xlmr_mp/model/heads.py", "from xlmr_mp import kernels\n")
    _write(tmp_path, "xlmr_mp/parallel/__init__.py", "")
    _write(tmp_path, "xlmr_mp/parallel/schedule.py", "from xlmr_mp.kernels.ops import f\n")
    _write(tmp_path, "xlmr_mp/parallel/vocab.py", "def h():\n    from xlmr_mp.kernels import ops\n")
    graph = import_graph(str(tmp_path))
    assert imports_into(graph, "xlmr_mp.model", "xlmr_mp.kernels") == {
        "xlmr_mp.model.encoder": ["xlmr_mp.kernels.ops"], "xlmr_mp.model.heads": ["xlmr_mp.kernels"]}
    assert imports_into(graph, "xlmr_mp.parallel.schedule", "xlmr_mp.kernels") == {
        "xlmr_mp.parallel.schedule": ["xlmr_mp.kernels.ops"]}


@pytest.mark.parametrize("ignored", ["__pycache__/x.py", "golden/x.py"])
def test_long_file_scan_skips_caches_and_data(tmp_path, ignored):
    _write(tmp_path, f"tests/{ignored}", "x = 1\n" * (MAX_LINES + 1))
    assert long_files(str(tmp_path)) == []


# ----------------------------------------------------------------------------- script directories

SCRIPT_DIRS = ("bench", "tools", os.path.join("launch", "tools"))


def _shadowing(root: str, installed: set) -> list:
    """Scripts whose module name is also an importable top-level name (stdlib or an installed
    distribution): Python puts a script's own directory first on sys.path, so such a file takes
    that package's place for everything the script imports (transformers 5 imports `kernels`)."""
    import sys
    taken = set(sys.stdlib_module_names) | installed
    out = []
    for d in SCRIPT_DIRS:
        path = os.path.join(root, d)
        if os.path.isdir(path):
            out += [os.path.join(d, f) for f in sorted(os.listdir(path))
                    if f.endswith(".py") and f[:-3] in taken]
    return out


def test_scripts_shadow_no_installed_package(tmp_path):
    import importlib.metadata
    installed = set(importlib.metadata.packages_distributions())
    assert _shadowing(ROOT, installed) == [], "rename these scripts: they shadow a package of that name"
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "kernels.py").write_text("")
    (tmp_path / "bench" / "json.py").write_text("")
    assert _shadowing(str(tmp_path), {"kernels"}) == ["bench/json.py", "bench/kernels.py"]


# ----------------------------------------------------------------------------- the tests' own layout

TEST_AREAS = ("data", "model", "parallel", "kernels", "checkpoint", "train", "eval", "study", "tools")


def layout_problems_of_tests(root: str) -> list:
    """tests/ mirrors the package: no Python file at its root but conftest.py and __init__.py, every
    test_*.py under one of TEST_AREAS, and each area a package (an __init__.py: test modules are
    imported as tests.<area>.<name>, so two areas may hold the same file name)."""
    tests = os.path.join(root, "tests")
    out = [f"tests/{f}" for f in sorted(os.listdir(tests))
           if f.endswith(".py") and f not in ("conftest.py", "__init__.py")]
    for d, dirs, files in os.walk(tests):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        rel = os.path.relpath(d, tests)
        if rel != "." and rel.split(os.sep)[0] not in TEST_AREAS:
            out += [f"tests/{rel}/{f}" for f in sorted(files) if f.startswith("test_") and f.endswith(".py")]
    out += [f"tests/{a}/__init__.py missing" for a in TEST_AREAS
            if os.path.isdir(os.path.join(tests, a)) and not os.path.isfile(os.path.join(tests, a, "__init__.py"))]
    return out


def test_tests_mirror_the_package(tmp_path):
    assert layout_problems_of_tests(ROOT) == []
    _write(tmp_path, "tests/conftest.py", "")
    _write(tmp_path, "tests/__init__.py", "")
    _write(tmp_path, "tests/data/__init__.py", "")
    _write(tmp_path, "tests/data/test_ok.py", "")
    _write(tmp_path, "tests/support/harness.py", "")
    assert layout_problems_of_tests(str(tmp_path)) == []
    _write(tmp_path, "tests/test_flat.py", "")
    _write(tmp_path, "tests/helper.py", "")
    _write(tmp_path, "tests/support/test_in_support.py", "")
    os.remove(tmp_path / "tests" / "data" / "__init__.py")
    assert layout_problems_of_tests(str(tmp_path)) == [
        "tests/helper.py", "tests/test_flat.py", "tests/support/test_in_support.py", "tests/data/__init__.py missing"]
