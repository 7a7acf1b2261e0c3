"""The package's shape: commands at the root and libraries in folders imported in one order,
no import cycle, the host loop imported by `main` alone, one mesh constructor, and every
package docstring naming every module of its package. Read from the source (every import,
at module level or inside a function)."""
import ast
import os

PACKAGE = "multistep_cm"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.join(REPO, PACKAGE)


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
  importers = sorted(name for name, deps in _graph().items() if f"{PACKAGE}.training.loop" in deps)
  assert importers == [f"{PACKAGE}.main"]


def test_one_mesh_constructor():
  defs = [name for name, tree in _modules().items() for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef) and node.name == "make_mesh"]
  assert defs == [f"{PACKAGE}.runtime.sharding"]


# The library folders, each importing only from the folders before it. The commands (the
# package root's modules, and the few commands that live beside what they run) may import
# anything.
ORDER = ("diffusion", "models", "teachers", "data", "runtime", "config", "sampling",
         "evaluation", "training")
COMMANDS = ("main", "sample", "evaluate", "compile_report", "toy", "sampler_comparison",
            "t2i_demo", "convert")
SUBPACKAGE_COMMANDS = ("models.summary", "data.prepare", "data.train_vae",
                       "evaluation.convert_inception",
                       "evaluation.convert_dinov2", "evaluation.convert_clip",
                       "evaluation.reference_stats", "evaluation.digits_metric",
                       "evaluation.prompt_metric", "evaluation.folder_metric",
                       "evaluation.learning_curves")


def _folder(name: str) -> str | None:
  parts = name.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else None


# The one library module at the root: the Python interface (it may import any folder).
ROOT_LIBRARIES = ("api",)


def test_the_root_holds_the_commands_and_the_api():
  root = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
  assert root == sorted(("__init__",) + COMMANDS + ROOT_LIBRARIES)
  folders = sorted(f for f in os.listdir(ROOT)
                   if os.path.isfile(os.path.join(ROOT, f, "__init__.py")))
  assert folders == sorted(ORDER)


def test_the_commands_are_commands():
  """Every module the layout calls a command runs as `python -m` (and nothing else does)."""
  commands = {f"{PACKAGE}.{c}" for c in COMMANDS + SUBPACKAGE_COMMANDS}
  runnable = {name for name, tree in _modules().items()
              if any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
                     for node in tree.body)}
  assert runnable == commands


def test_folders_import_only_earlier_folders():
  commands = {f"{PACKAGE}.{c}" for c in SUBPACKAGE_COMMANDS}
  wrong = []
  for name, deps in _graph().items():
    here = _folder(name)
    if here is None or name in commands:
      continue
    for dep in deps:
      there = _folder(dep)
      if there is None or ORDER.index(there) > ORDER.index(here):
        wrong.append(f"{name} imports {dep}")
  assert not wrong, wrong


def test_the_order_check_finds_a_wrong_import():
  assert _folder(f"{PACKAGE}.config.build") == "config"
  assert _folder(f"{PACKAGE}.main") is None and _folder(f"{PACKAGE}.models") == "models"
  assert ORDER.index("training") > ORDER.index("config")


def test_every_package_docstring_names_its_modules():
  """Each package's docstring names each of its modules (as `name` or `name.py`)."""
  missing = []
  for folder, _, files in os.walk(ROOT):
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
      continue
    with open(init) as fh:
      doc = ast.get_docstring(ast.parse(fh.read())) or ""
    names = [f[:-3] for f in files if f.endswith(".py") and f != "__init__.py"]
    subpackages = [d for d in os.listdir(folder)
                   if os.path.isfile(os.path.join(folder, d, "__init__.py"))]
    for name in names + subpackages:
      if f"`{name}`" not in doc and f"`{name}.py`" not in doc:
        missing.append(f"{os.path.relpath(init, ROOT)}: {name}")
  assert not missing, missing


# Where a config's objective may be read: where the plan is built (the config folder) and
# the maths that implements each objective. Everything else asks the plan.
MODE_READERS = ("config.base", "config.build", "config.checks", "config.plan",
                "diffusion.losses")


def _reads_loss_mode(node) -> bool:
  """`<...>.loss.mode`, or `lc.mode` (the configs' name for `config.loss`)."""
  if not (isinstance(node, ast.Attribute) and node.attr == "mode"):
    return False
  inner = node.value
  return ((isinstance(inner, ast.Attribute) and inner.attr == "loss")
          or (isinstance(inner, ast.Name) and inner.id == "lc"))


def _defaulted_config_gets(tree, keys) -> list[str]:
  """`x.get("<key>", <default>)` calls whose key is a key of config/base.py (checkpoint and
  file metadata, dicts of their own, aside)."""
  found = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get" and len(node.args) == 2
        and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys
        and "meta" not in ast.unparse(node.func.value)):
      found.append(ast.unparse(node))
  return found


def _config_keys() -> set[str]:
  from multistep_cm.config import base as config_base  # pylint: disable=g-import-not-at-top
  keys = set()

  def walk(tree):
    for key, value in tree.items():
      keys.add(key)
      if isinstance(value, dict):
        walk(value)

  walk(config_base.base_config().to_dict())
  return keys


def test_loss_mode_is_read_only_where_the_plan_is_built():
  readers = sorted(name for name, tree in _modules().items()
                   if any(_reads_loss_mode(n) for n in ast.walk(tree)))
  assert set(readers) <= {f"{PACKAGE}.{m}" for m in MODE_READERS}, readers
  assert _reads_loss_mode(ast.parse("config.loss.mode").body[0].value)
  assert not _reads_loss_mode(ast.parse("plan.objective").body[0].value)


def test_no_config_default_is_repeated_outside_the_defaults():
  """A config read with `.get(key, default)` repeats a default config/base.py holds: the
  plan's config has every key, so code reads it directly."""
  keys = _config_keys()
  found = {name: calls for name, tree in _modules().items()
           if (calls := _defaulted_config_gets(tree, keys))}
  assert not found, found
  assert _defaulted_config_gets(ast.parse('c.get("seed", 0)'), keys)
