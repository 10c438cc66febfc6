"""megatron-core across the declared range (docs/megatron_core_compat.md): the range in setup.py is
the one the page states, every megatron-core name the package uses is on that page, the data path
reads MMIDIDX files without importing megatron-core (0.19 imports triton on import), a truncated
index names the file, and a megatron-core that fails on a missing triton gives the cause and the fix."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "megatron_core_compat.md")
BLOCK = "import sys; sys.modules['megatron'] = None\n"     # every `import megatron...` raises ImportError


def _setup_constant(name: str) -> str:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    return next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", "") == name for t in n.targets))


def test_the_declared_range_is_the_documented_one():
    spec = _setup_constant("MEGATRON_CORE")
    assert re.fullmatch(r"megatron-core>=0\.\d+,<0\.\d+", spec), spec
    assert f"**`{spec}`**" in open(DOC).read()


def megatron_names(root: str) -> dict:
    """{name: [file, ...]} of every megatron-core name the package uses: modules and names imported
    from megatron, and attributes read from a module returned by megatron_module(...)."""
    out: dict = {}
    for d, _, files in os.walk(os.path.join(root, "xlmr_mp")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, root)
            tree = ast.parse(open(path).read())
            mods = set()
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron"):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.startswith("megatron")]
                elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "megatron_module":
                    names = [node.args[0].value.rsplit(".", 1)[-1]]
                elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                        getattr(node.value.func, "id", "") == "megatron_module":
                    mods.update(t.id for t in node.targets if isinstance(t, ast.Name))
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call) and \
                        getattr(node.value.func, "id", "") == "megatron_module":
                    names = [node.attr]
                for n in names:
                    out.setdefault(n, []).append(rel)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in mods:
                    out.setdefault(node.attr, []).append(rel)
    return out


def test_every_megatron_name_we_use_is_on_the_compat_page(tmp_path):
    used = megatron_names(ROOT)
    assert {"initialize_model_parallel", "ColumnParallelLinear", "RowParallelLinear", "ModelParallelConfig",
            "get_data_parallel_group"} <= set(used), sorted(used)
    doc = open(DOC).read()
    assert [n for n in sorted(used) if n not in doc] == [], "add these to docs/megatron_core_compat.md"
    # the scan itself finds a new call
    (tmp_path / "xlmr_mp").mkdir()
    (tmp_path / "xlmr_mp" / "m.py").write_text("ps = megatron_module('megatron.core.parallel_state')\n"
                                               "ps.get_context_parallel_group()\n"
                                               "from megatron.core.fusions import fused_softmax\n")
    assert set(megatron_names(str(tmp_path))) == {"parallel_state", "get_context_parallel_group", "fused_softmax"}


def _run(code: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_training_data_is_read_without_megatron(tmp_path):
    """Files written by megatron-core's own IndexedDatasetBuilder, read with megatron-core blocked."""
    from tests.support.corpus import write_corpus
    write_corpus(str(tmp_path), {"xx": 20, "yy": 12}, splits=("train",))
    p = _run(BLOCK + """
from xlmr_mp.data.dataset import MultilingualCorpus, PackedLanguageDataset
ds = PackedLanguageDataset(sys.argv[1] + "/xx/train", 63)
corpus = MultilingualCorpus(sys.argv[1], "train", 63)
print(len(ds) > 0, corpus.languages, any(k.startswith("megatron") and sys.modules[k] for k in sys.modules))
""", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split("\n")[0] == "True ['xx', 'yy'] False"


def test_a_truncated_index_names_the_file(tmp_path):
    from tests.support.corpus import write_corpus
    from xlmr_mp.data.dataset import PackedLanguageDataset
    from xlmr_mp.data.indexed import read_index_arrays
    write_corpus(str(tmp_path), {"xx": 5}, splits=("train",))
    prefix = str(tmp_path / "xx" / "train")
    dtype, lengths, pointers, docs = read_index_arrays(prefix)
    assert int(pointers[-1]) == int(lengths[:-1].sum()) * np.dtype(dtype).itemsize and docs[0] == 0
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".idx") - 8)
    with pytest.raises(ValueError, match=r"train\.idx: \d+ bytes, but its header describes .*truncated or corrupt"):
        read_index_arrays(prefix)
    with pytest.raises(ValueError, match=r"train\.idx is not a valid megatron-core \(MMIDIDX\) index"):
        PackedLanguageDataset(prefix, 63)


def test_missing_triton_names_the_cause_and_the_fix(tmp_path):
    """megatron-core >= 0.19 imports triton from megatron/core/__init__; a CPU-only torch has none.
    A stand-in megatron package that does the same shows the message a user gets."""
    pkg = tmp_path / "megatron" / "core"
    pkg.mkdir(parents=True)
    (tmp_path / "megatron" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("import triton.language\n")
    (pkg / "parallel_state.py").write_text("")
    p = _run(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); sys.modules['triton'] = None\n" + """
from xlmr_mp.parallel.megatron_import import megatron_module
try:
    megatron_module("megatron.core.parallel_state")
except ImportError as e:
    print(type(e).__name__, e)
""")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("ImportError ") and "imports triton" in p.stdout and "pip install triton" in p.stdout

