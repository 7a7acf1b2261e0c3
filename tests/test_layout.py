"""The package's shape: no import cycle, the host loop imported by `main` alone, one mesh
constructor. Read from the source (every import, at module level or inside a function)."""
import ast
import os

PACKAGE = "multistep_cm"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules() -> dict[str, ast.Module]:
  """`{dotted module name: its syntax tree}` for every file of the package."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        with open(path) as fh:
          out[rel.removesuffix(".__init__")] = ast.parse(fh.read(), path)
  return out


def _imports(tree: ast.Module, modules) -> set[str]:
  """The package modules `tree` imports anywhere (`from a import b` counts `a.b` if that is
  a module, else `a`)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in modules else node.module)
  return {name for name in found if name in modules}


def _graph():
  modules = _modules()
  return {name: _imports(tree, modules) - {name} for name, tree in modules.items()}


def _cycle(graph) -> list[str] | None:
  """One import cycle of `graph` (a package's `__init__` importing its own modules, and
  those modules being imported through the package, is not one), or None."""
  def edges(name):
    # `import a.b` runs `a/__init__` first; that is not an edge back from `a.b` to `a`.
    return [d for d in graph[name] if not name.startswith(d + ".")]

  state, stack = {}, []

  def visit(name):
    state[name] = "open"
    stack.append(name)
    for dep in edges(name):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[name] = "done"
    return None

  for name in sorted(graph):
    if name not in state:
      found = visit(name)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": {"p"}}) is None


def test_no_import_cycle_in_the_package():
  assert _cycle(_graph()) is None


def test_only_main_imports_the_host_loop():
  importers = sorted(name for name, deps in _graph().items() if f"{PACKAGE}.train" in deps)
  assert importers == [f"{PACKAGE}.main"]


def test_one_mesh_constructor():
  defs = [name for name, tree in _modules().items() for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef) and node.name == "make_mesh"]
  assert defs == [f"{PACKAGE}.sharding"]
