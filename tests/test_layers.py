"""No file-level import circle anywhere in medai, on the module layout the wheel installs.

The graph is grimp's (import-linter's graph builder) over the tree `scripts/lint_imports.py` stages:
every import counts, lazy imports inside functions included, as the layers contract counts them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# grimp finds `medai` through the import system, and this process has already imported the
# checkout's medai (without models/, kernels/, pipelines/ inside it): so the graph is built in a
# child whose only medai is the staged one.
_GRAPH = """
import json, grimp
graph = grimp.build_graph("medai", cache_dir=None)
print(json.dumps({m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}))
"""


def _import_graph(staged: Path) -> dict[str, list[str]]:
    """Return {module: modules it imports directly} for the medai tree staged under `staged`."""
    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts" / "lint_imports.py")
    lint_imports = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lint_imports)
    lint_imports.stage(staged)
    env = {**os.environ, "PYTHONPATH": str(staged)}
    out = subprocess.run([sys.executable, "-c", _GRAPH], cwd=staged, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def import_circles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(graph[succ])))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return sorted(circles)


def test_import_circles_finds_a_circle_and_only_it():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e", "d"], "f": ["d", "g"], "g": ["f"]}
    assert import_circles(graph) == [["a", "b", "c"], ["f", "g"]]
    assert import_circles({"a": ["b"], "b": []}) == []


def test_no_file_level_import_circle(tmp_path):
    graph = _import_graph(tmp_path)
    assert "medai.pipelines.finetune" in graph and "medai.kernels.ops" in graph  # the staged tree is whole
    circles = import_circles(graph)
    assert not circles, "file-level import circles (modules of each):\n" + "\n".join(" <-> ".join(c) for c in circles)
