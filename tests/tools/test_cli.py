"""The installed commands: every console script of setup.py names a module of xlmr_mp/cli/ (or
xlmr_mp.train) whose main(["--help"]) prints its usage and exits 0; the installed metadata lists the
same commands; tools/*.py are thin wrappers of those mains; no sys.path manipulation in tools/ or
bench/ (read with `ast`, each check also run on a small tree that breaks it)."""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT_DIRS = ("tools", "bench", os.path.join("launch", "tools"))


def console_scripts(root: str = ROOT) -> dict:
    """{command: "module:function"} of CONSOLE_SCRIPTS in setup.py (read, not run)."""
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CONSOLE_SCRIPTS" for t in node.targets):
            return dict(tuple(x.strip() for x in e.value.split("=")) for e in node.value.elts)
    raise AssertionError("setup.py has no CONSOLE_SCRIPTS list")


def test_the_commands_of_the_issue_are_declared():
    assert set(console_scripts()) == {
        "xlmr-train", "xlmr-preprocess", "xlmr-train-spm", "xlmr-merge", "xlmr-evaluate", "xlmr-study",
        "xlmr-convert", "xlmr-plan", "xlmr-compile-kernels", "xlmr-download-cc100"}
    assert console_scripts()["xlmr-train"] == "xlmr_mp.train:main"


@pytest.mark.parametrize("command", sorted(console_scripts()))
def test_every_command_has_help(command):
    module, func = console_scripts()[command].split(":")
    main = getattr(importlib.import_module(module), func)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and out.getvalue().startswith("usage:"), out.getvalue()[:300]


def test_installed_metadata_lists_the_same_commands():
    # asked from outside the checkout, as a user's shell would (a stale xlmr_mp.egg-info in the
    # checkout is not what pip installed)
    code = ("import importlib.metadata as md, json\ntry:\n    eps = md.distribution('xlmr_mp').entry_points\n"
            "except md.PackageNotFoundError:\n    eps = None\n"
            "print(json.dumps(None if eps is None else {e.name: e.value for e in eps if e.group == 'console_scripts'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(ROOT), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    installed = __import__("json").loads(r.stdout)
    if installed is None:
        pytest.skip("xlmr_mp is not installed (pip install -e .)")
    assert installed == console_scripts(), "re-run `pip install -e .`: the installed commands are stale"
    exe = shutil.which("xlmr-plan")
    if exe:       # the command itself, from a directory that is not the checkout
        r = subprocess.run([exe, "--preset", "tiny", "--gpu", "H100", "--gpus-per-node", "1", "--json"], capture_output=True, text=True,
                           timeout=120, cwd=os.path.dirname(ROOT))
        assert r.returncode == 0 and '"fits": true' in r.stdout, r.stderr


def wrapper_problems(root: str) -> list:
    """tools/*.py that are more than `from xlmr_mp.cli.<same name> import main` + the __main__ guard."""
    out = []
    tools = os.path.join(root, "tools")
    for f in sorted(os.listdir(tools)):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(tools, f)).read())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        ok = (len(body) == 2 and isinstance(body[0], ast.ImportFrom)
              and body[0].module == f"xlmr_mp.cli.{f[:-3]}" and [a.name for a in body[0].names] == ["main"]
              and isinstance(body[1], ast.If))
        if not ok:
            out.append(f"tools/{f}")
    return out


def sys_path_edits(root: str) -> list:
    """file:line of every sys.path.insert / append / extend / assignment in the script folders."""
    out = []
    for d in SCRIPT_DIRS:
        path = os.path.join(root, d)
        for f in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            if not f.endswith(".py"):
                continue
            for node in ast.walk(ast.parse(open(os.path.join(path, f)).read())):
                target = None
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    target = node.func.value
                elif isinstance(node, (ast.Assign, ast.AugAssign)):
                    target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                if isinstance(target, ast.Attribute) and target.attr == "path" and \
                        isinstance(target.value, ast.Name) and target.value.id == "sys":
                    out.append(f"{os.path.join(d, f)}:{node.lineno}")
    return sorted(out)


def test_tools_are_thin_wrappers_and_no_script_edits_sys_path(tmp_path):
    assert wrapper_problems(ROOT) == []
    assert sys_path_edits(ROOT) == []
    (tmp_path / "tools").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "tools" / "plan.py").write_text('"""doc"""\nfrom xlmr_mp.cli.plan import main\n\n'
                                                 'if __name__ == "__main__":\n    raise SystemExit(main())\n')
    (tmp_path / "tools" / "fat.py").write_text("from xlmr_mp.cli.fat import main\nX = 1\nif True:\n    pass\n")
    (tmp_path / "bench" / "b.py").write_text("import sys\nsys.path.insert(0, '..')\nsys.path += ['x']\n")
    assert wrapper_problems(str(tmp_path)) == ["tools/fat.py"]
    assert sys_path_edits(str(tmp_path)) == ["bench/b.py:2", "bench/b.py:3"]
