"""The project's own import graph (desmoe_jax/ and scripts/, every import, those inside functions
included): no module is part of an import circle, and none reads another's private names."""

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  """{dotted module name: file}: desmoe_jax.* by package path, scripts by file name (scripts/
  is on sys.path when one runs, so they import each other by bare name)."""
  out = {}
  for path in glob.glob(os.path.join(REPO, "desmoe_jax", "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  for path in glob.glob(os.path.join(REPO, "scripts", "*.py")):
    out[os.path.basename(path)[:-3]] = path
  return out


def _imports(path: str, modules: dict) -> tuple[set, list]:
  """(project modules `path` imports, private names it reads from them)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  edges, private, aliases = set(), [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name in modules:
          edges.add(a.name)
          aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        if sub in modules:                 # `from package import module`
          edges.add(sub)
          aliases[a.asname or a.name] = sub
        elif node.module in modules:
          edges.add(node.module)
          if a.name.startswith("_"):
            private.append(f"from {node.module} import {a.name}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      private.append(f"{aliases[node.value.id]}.{node.attr}")
  return edges, private


def _graph():
  modules = _modules()
  graph, private = {}, {}
  for name, path in modules.items():
    edges, names = _imports(path, modules)
    graph[name] = {e for e in edges if e != name}
    if names:
      private[name] = names
  return graph, private


def _cycles(graph: dict) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
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


def test_no_import_circles():
  assert _cycles(_graph()[0]) == []


def test_no_module_reads_another_modules_private_names():
  assert _graph()[1] == {}


def test_the_checks_see_a_circle_and_a_private_name():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  graph, _ = _graph()
  assert "desmoe_jax.optim.phase" in graph["desmoe_jax.optim"]
  assert "desmoe_jax.config" in graph["desmoe_jax.families"]
