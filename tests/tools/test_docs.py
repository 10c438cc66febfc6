"""The README and docs/ refer only to things that exist.

Checked in README.md, docs/*.md, DEVELOPERS.md and bench/results/README.md:
- every relative link resolves to a file (and its `#anchor` to a heading of that file, by GitHub's
  slug rule); repository paths and `xlmr-*` commands in `inline code` exist;
- every shell command in a bash/sh code block: `python tools/X.py`, `bash X.sh`, `sbatch X.slurm` ->
  the file exists; `xlmr-*` -> a console_scripts entry of setup.py; each `--flag` after a known
  command -> an option of that command's argparse parser (captured in one subprocess by running the
  command's entry with `--help` and stopping at its parse), or for a shell script a word of the script
  (or of what it sources); `--preset NAME` / `--config preset:NAME` -> a shipped preset;
  `key.sub=value` -> a field of the run config dataclasses; `pip install ".[extra]"` -> a declared extra;
- every yaml code block in docs/ loads as a run config (`xlmr_mp.config.load_config`), and every
  `from xlmr_mp... import name` in a python block imports;
- README.md is at most 10,000 characters.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _repo_root() -> str:
    d = HERE
    while not os.path.isfile(os.path.join(d, "setup.py")):
        parent = os.path.dirname(d)
        if parent == d:
            raise RuntimeError("setup.py not found above " + HERE)
        d = parent
    return d


ROOT = _repo_root()
README_LIMIT = 10_000
# Pages whose links and paths are checked; commands and config blocks are checked in all of them too.
PAGES = ["README.md", "DEVELOPERS.md", "bench/results/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TOP_DIRS = ("xlmr_mp/", "tools/", "bench/", "launch/", "csrc/", "tests/", "docs/", ".ci/")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# Path segments that stand for something the reader supplies, not a file of the repository.
PLACEHOLDERS = {"NAME", "DIR", "OUT", "X", "P", "SPEC", "FILE", "TYPE", "PATH", "GPU", "DATE", "TASK"}
# Words shaped like a command that are a command's subcommand (`xlmr-convert xlmr-to-hf`).
SUBCOMMANDS = {"xlmr-to-hf"}
# Commands whose key=value arguments are run-config overrides (validated against the dataclasses).
CONFIG_ANCHORS = {"xlmr-train", "xlmr-plan", "module:xlmr_mp.train", "launch/demo.sh", "launch/local.sh",
                  "launch/xlmr_base.slurm", "launch/xlmr_large.slurm", "launch/scaling_study.slurm",
                  "launch/tools/check_layout.py"}


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------- markdown parsing

FENCE = re.compile(r"^(\s*)```([\w+-]*)\s*$")


def split_markdown(text: str):
    """(prose lines with line numbers, code blocks as (lang, first line number, text))."""
    prose, blocks = [], []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            lang, start, body = m.group(2).lower(), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i][len(m.group(1)):] if lines[i].startswith(m.group(1)) else lines[i])
                i += 1
            blocks.append((lang, start, "\n".join(body)))
        else:
            prose.append((i + 1, lines[i]))
        i += 1
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    s = re.sub(r"`|\*", "", heading.strip())
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)
    s = s.lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors_of(rel: str) -> frozenset:
    prose, _ = split_markdown(read(rel))
    seen, out = {}, set()
    for _, line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            out.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return frozenset(out)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`]+)`")


def link_problems(rel: str) -> list:
    prose, _ = split_markdown(read(rel))
    base = os.path.dirname(rel)
    problems = []
    for no, line in prose:
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):      # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(base, path)) if path else rel
            if dest.startswith(".."):
                problems.append(f"{rel}:{no}: link {target!r} leaves the repository")
                continue
            if not os.path.exists(os.path.join(ROOT, dest)):
                problems.append(f"{rel}:{no}: link {target!r}: {dest} does not exist")
            elif anchor and (not dest.endswith(".md") or anchor not in anchors_of(dest)):
                problems.append(f"{rel}:{no}: link {target!r}: no heading #{anchor} in {dest}")
    return problems


def repo_path_exists(token: str) -> bool:
    """Does a repository path written in the docs exist (`a/b.py:symbol`, `{x,y}`, globs allowed)?"""
    path = token.split(":")[0].rstrip(".,;")
    segments = re.split(r"[/.]", path)
    if "<" in path or any(s in PLACEHOLDERS for s in segments):
        return True
    m = re.search(r"\{([^}]*)\}", path)
    if m:
        return all(repo_path_exists(path[:m.start()] + alt + path[m.end():]) for alt in m.group(1).split(","))
    if "*" in path:
        return bool(glob.glob(os.path.join(ROOT, path)))
    return os.path.exists(os.path.join(ROOT, path))


def path_problems(rel: str) -> list:
    prose, _ = split_markdown(read(rel))
    problems, scripts = [], console_scripts()
    for no, line in prose:
        for span in CODE_SPAN.findall(line):
            for tok in span.split():
                if tok.startswith(TOP_DIRS) and not repo_path_exists(tok):
                    problems.append(f"{rel}:{no}: `{tok}` does not exist")
                if re.fullmatch(r"xlmr-[a-z0-9-]*[a-z0-9]", tok) and tok not in scripts and tok not in SUBCOMMANDS:
                    problems.append(f"{rel}:{no}: `{tok}` is not a console_scripts entry of setup.py")
    return problems


# ---------------------------------------------------------------- commands

def console_scripts() -> dict:
    """{command: 'module:function'} declared in setup.py (or pyproject.toml [project.scripts])."""
    text = read("setup.py") + "\n" + (read("pyproject.toml") if os.path.isfile(os.path.join(ROOT, "pyproject.toml")) else "")
    return {m.group(1): f"{m.group(2)}:{m.group(3)}"
            for m in re.finditer(r"[\"']?(xlmr-[\w-]+)[\"']?\s*=\s*[\"']?\s*([\w.]+)\s*:\s*(\w+)", text)}


def extras() -> set:
    m = re.search(r"extras_require\s*=\s*\{(.*?)\}\s*,\s*\n", read("setup.py"), re.S)
    return set(re.findall(r"[\"']([\w-]+)[\"']\s*:", m.group(1))) if m else set()


def shell_commands(block: str):
    """Each simple command of a shell block as a token list (continuations joined, comments dropped,
    `$(...)` substitutions as commands of their own, split at && || | ;)."""
    text = re.sub(r"\\\n", " ", block)
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            tokens = line.split("#")[0].split()
        current = []
        for tok in tokens:
            for inner in re.findall(r"\$\(([^)]*)\)", tok):
                yield from shell_commands(inner)
            if tok in ("&&", "||", "|", ";"):
                if current:
                    yield current
                current = []
            else:
                current.append(tok)
        if current:
            yield current


def find_anchor(tokens):
    """(anchor, index of its first argument) of a command, or (None, 0): the first token that names
    one of our commands (a console script, `-m module`, a .py / .sh / .slurm file)."""
    for i, tok in enumerate(tokens):
        if re.fullmatch(r"xlmr-[\w-]+", tok):
            return tok, i + 1
        if tok == "-m" and i + 1 < len(tokens):
            return f"module:{tokens[i + 1]}", i + 2
        if re.search(r"\.(py|sh|slurm)$", tok) and not tok.startswith("-"):
            return tok, i + 1
    return None, 0


def config_key_exists(key: str) -> bool:
    from xlmr_mp.config import RunConfig
    import dataclasses
    obj = RunConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def preset_exists(name: str) -> bool:
    return os.path.isfile(os.path.join(ROOT, "xlmr_mp", "presets", f"{name}.yaml"))


def script_words(rel: str) -> str:
    """A shell script's text and the text of the repository files it sources."""
    text = read(rel)
    for src in re.findall(r"^\s*(?:source|\.)\s+([\w./-]+)", text, re.M):
        if os.path.isfile(os.path.join(ROOT, src)):
            text += "\n" + read(src)
    return text


def collect_commands():
    """[(page, line, tokens)] of every shell command in the checked pages."""
    out = []
    for rel in PAGES:
        _, blocks = split_markdown(read(rel))
        for lang, start, body in blocks:
            if lang in SHELL_LANGS:
                for tokens in shell_commands(body):
                    out.append((rel, start, tokens))
    return out


@lru_cache(maxsize=None)
def parser_options(anchors: tuple) -> dict:
    """{anchor: sorted option strings} of the Python commands, from one subprocess (this file run as
    a script: it captures each command's argparse parser when the command parses `--help`)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(list(anchors))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def command_problems(commands) -> list:
    scripts = console_scripts()
    problems, python_anchors, checks = [], set(), []
    for rel, no, tokens in commands:
        where = f"{rel}:{no}: `{' '.join(tokens)[:90]}`"
        anchor, first = find_anchor(tokens)
        if tokens and tokens[0] == "pip":
            for extra_list in re.findall(r"\[([\w,-]+)\]", " ".join(tokens)):
                for extra in extra_list.split(","):
                    if extra not in extras():
                        problems.append(f"{where}: extra [{extra}] is not in setup.py's extras_require")
        for tok in tokens:
            tok = tok.strip("[]")
            if tok.startswith(TOP_DIRS) and not repo_path_exists(tok):
                problems.append(f"{where}: {tok} does not exist")
        if anchor is None or (re.search(r"\.(py|sh|slurm)$", anchor) and not repo_path_exists(anchor)):
            continue                          # no command of ours, or a missing file (reported above)
        if anchor.startswith("xlmr-"):
            if anchor not in scripts:
                problems.append(f"{where}: {anchor} is not a console_scripts entry of setup.py")
                continue
            python_anchors.add(anchor)
        elif anchor.startswith("module:"):
            if not anchor.startswith("module:xlmr_mp"):
                continue                      # python -m pytest, ...: not ours
            python_anchors.add(anchor)
        elif anchor.endswith(".py"):
            if not anchor.startswith(TOP_DIRS):
                continue
            python_anchors.add(anchor)
        elif not anchor.startswith(TOP_DIRS):
            continue
        checks.append((where, anchor, tokens[first:]))
    options = parser_options(tuple(sorted(python_anchors))) if python_anchors else {}
    for where, anchor, args in checks:
        if anchor in options and options[anchor] is None:
            problems.append(f"{where}: {anchor} has no argparse parser reachable with --help")
            continue
        known = options.get(anchor)
        words = None if anchor in options else (script_words(anchor) if os.path.isfile(os.path.join(ROOT, anchor)) else "")
        for i, raw in enumerate(args):
            arg = raw.strip("[]")
            if arg.startswith("--"):
                flag = arg.split("=")[0]
                ok = flag in known if known is not None else re.search(re.escape(flag) + r"\b", words or "")
                if not ok:
                    problems.append(f"{where}: {flag} is not an option of {anchor}")
                value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1].strip("[]") if i + 1 < len(args) else "")
                if flag == "--preset" and not preset_exists(value):
                    problems.append(f"{where}: --preset {value}: no xlmr_mp/presets/{value}.yaml")
                if flag == "--config" and value.startswith("preset:") and not preset_exists(value[7:]):
                    problems.append(f"{where}: --config {value}: no such preset")
                if flag == "--config" and value.startswith(TOP_DIRS) and not repo_path_exists(value):
                    problems.append(f"{where}: --config {value} does not exist")
            elif re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)*=.*", arg):
                key = arg.split("=")[0]
                if (anchor in CONFIG_ANCHORS or "." in key) and not config_key_exists(key):
                    problems.append(f"{where}: {key} is not a run-config key")
    return problems


# ---------------------------------------------------------------- tests

def test_readme_is_short():
    n = len(read("README.md"))
    assert n <= README_LIMIT, f"README.md has {n} characters (limit {README_LIMIT}): move detail to docs/"


def test_docs_index_lists_every_page():
    index = read("docs/README.md")
    missing = [p for p in PAGES if p.startswith("docs/") and p != "docs/README.md"
               and f"({os.path.basename(p)}" not in index]
    assert not missing, f"docs/README.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_links_and_paths_resolve(page):
    problems = link_problems(page) + path_problems(page)
    assert not problems, "\n".join(problems)


def test_commands_refer_to_what_exists():
    commands = collect_commands()
    assert len(commands) > 20, "no shell commands found: did the code-block parser break?"
    problems = command_problems(commands)
    assert not problems, "\n".join(problems)


def test_yaml_blocks_are_valid_run_configs(tmp_path):
    from xlmr_mp.config import load_config
    n = 0
    for rel in PAGES:
        for lang, start, body in split_markdown(read(rel))[1]:
            if lang in ("yaml", "yml"):
                path = tmp_path / f"block{n}.yaml"
                path.write_text(body)
                n += 1
                try:
                    load_config(str(path))
                except Exception as e:      # noqa: BLE001 - report which block
                    pytest.fail(f"{rel}:{start}: yaml block is not a valid run config: {e}")


def test_python_blocks_import():
    import importlib
    for rel in PAGES:
        for lang, start, body in split_markdown(read(rel))[1]:
            if lang == "python":
                for mod, names in re.findall(r"^from\s+(xlmr_mp[\w.]*)\s+import\s+([\w, ]+)", body, re.M):
                    m = importlib.import_module(mod)
                    for name in (n.strip() for n in names.split(",")):
                        assert hasattr(m, name), f"{rel}:{start}: {mod} has no {name}"


def test_checker_catches_breaks():
    """The checks themselves: a missing file, flag, preset, config key, console script, anchor."""
    bad = [("x.md", 1, ["python", "tools/no_such_tool.py"]),
           ("x.md", 2, ["xlmr-no-such-command", "--help"]),
           ("x.md", 3, ["bash", "launch/demo.sh", "train.no_such_key=1"]),
           ("x.md", 4, ["bash", "launch/local.sh", "--no-such-flag-anywhere"])]
    for cmd in bad:
        assert len(command_problems([cmd])) == 1, (cmd, command_problems([cmd]))
    assert not command_problems([("x.md", 5, ["bash", "launch/demo.sh", "train.train_steps=3"])])
    assert github_slug("3. Preprocess into `indexed` datasets") == "3-preprocess-into-indexed-datasets"
    assert github_slug("**Layouts**: TP, ZeRO-1 and `x_y`") == "layouts-tp-zero-1-and-x_y"
    assert not repo_path_exists("xlmr_mp/no_such_module.py")
    assert repo_path_exists("xlmr_mp/presets/NAME.yaml") and repo_path_exists("xlmr_mp/{config,train}.py")


# ---------------------------------------------------------------- subprocess: argparse capture

class _Captured(BaseException):
    pass


def _options_of(parser) -> list:
    import argparse
    opts = set()
    for action in parser._actions:
        opts.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                opts.update(_options_of(sub))
    return sorted(opts)


def _capture(anchor: str):
    """The option strings of the parser `anchor` parses its arguments with, or None."""
    import argparse
    import importlib
    import runpy
    seen = []
    original = argparse.ArgumentParser.parse_known_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        raise _Captured()

    argparse.ArgumentParser.parse_known_args = spy
    argv = sys.argv
    try:
        if anchor.startswith("xlmr-"):
            module, func = console_scripts()[anchor].split(":")
            sys.argv = [anchor, "--help"]
            try:
                fn = getattr(importlib.import_module(module), func)
                try:
                    fn()
                except TypeError:
                    fn(["--help"])
            except (_Captured, SystemExit):
                pass
        else:
            sys.argv = [anchor, "--help"]
            try:
                if anchor.startswith("module:"):
                    runpy.run_module(anchor[7:], run_name="__main__", alter_sys=True)
                else:   # as `python FILE` runs it: the script's folder first on sys.path
                    sys.path.insert(0, os.path.dirname(os.path.join(ROOT, anchor)))
                    runpy.run_path(os.path.join(ROOT, anchor), run_name="__main__")
            except (_Captured, SystemExit):
                pass
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = argv
    return _options_of(seen[0]) if seen else None


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    result = {}
    for a in json.loads(sys.argv[1]):
        try:
            result[a] = _capture(a)
        except Exception as e:       # noqa: BLE001 - an import error is reported as no parser
            print(f"{a}: {type(e).__name__}: {e}", file=sys.stderr)
            result[a] = None
    sys.stdout.flush()
    print(json.dumps(result))
