"""The package's import graph (issue 13 "Rooms"), read from the source with ``ast``, so it holds for imports at
module level AND inside functions (a function-local import hides a cycle from ``python -c 'import x'`` but not from
a reader):

* no import cycle among ``simflow`` modules;
* ``simflow.eval`` and ``simflow.train`` never import each other;
* ``simflow.models`` imports no ``torch.distributed``, DeepSpeed, megatron, ``simflow.parallel``,
  ``simflow.checkpoint`` or ``simflow.data`` (model code knows nothing of parallelism, files or data).
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "simflow")

def _modules() -> Dict[str, str]:
    """Module name -> file, for every .py under simflow/."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


def _imports(name: str, path: str, modules: Dict[str, str]) -> List[Tuple[str, int]]:
    """(imported name, line) for every import statement anywhere in the file, resolved to a module of ``modules``
    when it is one (``from a.b import c`` -> ``a.b.c`` if that is a module, else ``a.b``); other names as written."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_pkg else parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in modules else base, node.lineno))
    return out


def _graph() -> Tuple[Dict[str, Set[str]], Dict[str, List[Tuple[str, int]]]]:
    modules = _modules()
    raw = {m: _imports(m, p, modules) for m, p in modules.items()}
    graph = {m: {t for t, _ in imps if t in modules and t != m} for m, imps in raw.items()}
    return graph, raw


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _offences(src_prefix: str, banned: Tuple[str, ...], skip=frozenset()) -> List[str]:
    _, raw = _graph()
    bad = []
    for m, imps in raw.items():
        if (m == src_prefix or m.startswith(src_prefix + ".")) and m not in skip:
            bad += [f"{m}:{line} imports {t}" for t, line in imps
                    if any(t == b or t.startswith(b + ".") for b in banned)]
    return bad


def test_the_checker_sees_function_level_imports_and_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]
    modules = _modules()
    raw = dict(_imports("simflow.launch", modules["simflow.launch"], modules))
    assert "simflow.train.trainer" in raw and "simflow.eval.self_score" in raw


def test_no_import_cycle_in_the_package():
    graph, _ = _graph()
    assert len(graph) > 50
    assert _cycles(graph) == []


def test_eval_and_train_never_import_each_other():
    assert _offences("simflow.eval", ("simflow.train",)) == []
    assert _offences("simflow.train", ("simflow.eval",)) == []


def test_models_know_nothing_of_parallelism_checkpoints_or_data():
    banned = ("torch.distributed", "deepspeed", "megatron", "simflow.parallel", "simflow.checkpoint", "simflow.data")
    assert _offences("simflow.models", banned) == []
