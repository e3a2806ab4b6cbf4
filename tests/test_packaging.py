"""What a fresh install needs: runtime imports declared, and README's commands the ones CI runs.

The test environment has torch and its dependencies installed, which hides a runtime
dependency that only torch brings in (jinja2 did: README command 1 failed on a fresh machine
while every test passed). So the imports are checked statically here, and `.ci/run` also runs
README command 1 in a fresh virtualenv with requirements.txt alone.
"""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import readme_commands  # noqa: E402  (scripts/readme_commands.py)

# What runs when a user trains or evaluates (scripts/, bench/ and tests/ may use test deps).
RUNTIME_SOURCES = ["train.py", "eval.py", "desmoe_jax", "configs"]
LOCAL = {"desmoe_jax", "configs"}
# Needed at run time without an import of ours: name -> why.
INDIRECT = {"jinja2": "transformers' apply_chat_template (desmoe_jax/data.py) needs it"}


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(lines) -> dict[str, str]:
  """{normalised distribution name: the requirement as written}."""
  names = {}
  for line in lines:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
      continue
    names[_normalise(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])] = line
  return names


def _requirements_txt() -> dict[str, str]:
  with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
    return _requirement_names(f)


def _pyproject_dependencies() -> dict[str, str]:
  with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
    text = f.read()
  block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
  assert block, "pyproject.toml: no [project] dependencies list"
  return _requirement_names(re.findall(r'"([^"]+)"', block.group(1)))


def _optional(node: ast.AST, parents: dict) -> bool:
  """An import inside `try: ... except ImportError` is an optional extra, not a requirement."""
  while node in parents:
    node, child = parents[node], node
    if isinstance(node, ast.Try) and child in node.body:
      for handler in node.handlers:
        caught = handler.type
        names = [caught] if not isinstance(caught, ast.Tuple) else list(caught.elts)
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
               for n in names):
          return True
  return False


def _runtime_imports() -> dict[str, str]:
  """{top-level module: first file:line importing it} over the runtime sources."""
  files = []
  for source in RUNTIME_SOURCES:
    path = os.path.join(REPO, source)
    if os.path.isfile(path):
      files.append(path)
    for root, _, names in os.walk(path):
      files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
  found = {}
  for path in files:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules = [node.module]
      else:
        continue
      if _optional(node, parents):
        continue
      for module in modules:
        top = module.split(".")[0]
        if top not in sys.stdlib_module_names and top not in LOCAL and top != "__future__":
          found.setdefault(top, f"{os.path.relpath(path, REPO)}:{node.lineno}")
  return found


def test_every_runtime_import_is_declared():
  declared = _requirements_txt()
  distributions = importlib.metadata.packages_distributions()
  imports = _runtime_imports()
  assert "jax" in imports and "transformers" in imports, imports  # the scan sees the code
  missing = []
  for module, where in sorted(imports.items()):
    dists = {_normalise(d) for d in distributions.get(module, [])}
    if not dists:
      missing.append(f"{module} (imported at {where}) is not installed here")
    elif not dists & declared.keys():
      missing.append(f"{module} (imported at {where}, distribution {sorted(dists)})")
  missing += [f"{name} ({why})" for name, why in INDIRECT.items()
              if _normalise(name) not in declared]
  assert not missing, "requirements.txt lacks runtime dependencies:\n" + "\n".join(missing)


def test_import_scan_catches_an_undeclared_import(tmp_path, monkeypatch):
  """The scan itself: a module importing an undeclared package is reported, an optional one
  (try/except ImportError) is not."""
  package = tmp_path / "desmoe_jax"
  package.mkdir()
  (package / "x.py").write_text("import os\nimport yaml\ntry:\n  import wandb\n"
                                "except ImportError:\n  wandb = None\n")
  monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
  assert _runtime_imports() == {"yaml": "desmoe_jax/x.py:2"}


def test_requirements_txt_and_pyproject_agree():
  """`pip install -e .` and `pip install -r requirements.txt` must install the same things:
  otherwise one of README's commands hides a dependency the other lacks."""
  assert _requirements_txt() == _pyproject_dependencies()


def test_test_only_packages_stay_out_of_the_runtime_requirements():
  declared = _requirements_txt()
  for name in ("torch", "pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"):
    assert name not in declared, f"{name} is test-only; it belongs in requirements-test.txt"


def test_readme_commands_are_what_ci_runs():
  commands = readme_commands.readme_commands()
  # Command 1 installs the runtime requirements only, then trains; command 2 runs the tests.
  assert commands["1"].startswith("pip install -r requirements.txt -e . && python train.py ")
  assert "requirements-test" not in commands["1"]
  assert commands["2"].startswith("pip install -r requirements-test.txt -e . && ")
  assert "pytest" in commands["2"]
  assert commands["eval"].startswith("python eval.py ")
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read()
  code = "\n".join(line for line in ci.splitlines() if not line.lstrip().startswith("#"))
  for name in ("1", "2", "eval"):  # CI reads each command from README, never a copy of it
    assert f"scripts/readme_commands.py {name})" in code
  assert "python3 -m venv" in code and "source " in code  # in a fresh environment
  # Command 1 (and eval on its workdir) run before command 2 installs the test requirements.
  assert code.index('run "$cmd1') < code.index('run "$cmd_eval') < code.index('run "$cmd2"')


def test_readme_commands_script(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "readme_commands.py"), "2"],
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == readme_commands.readme_commands()["2"]
  bad = tmp_path / "README.md"
  bad.write_text("# x\n\n```bash\n# 1. a\necho one\n\n# 2. b\necho two\necho three\n```\n")
  with pytest.raises(ValueError, match="not the one line under"):
    readme_commands.readme_commands(str(bad))
  bad.write_text("# x\n\n```bash\n# 1. a\necho one\n```\n`python eval.py --workdir=x`\n")
  with pytest.raises(ValueError, match="exactly two set-up commands"):
    readme_commands.readme_commands(str(bad))


def test_nothing_declared_goes_unused_and_extras_are_declared():
  """Exactly what is imported: a declared runtime distribution that no runtime module imports
  (and that INDIRECT does not explain) is dead weight for every install. The optional imports
  (lm_eval, wandb: inside try/except ImportError) are extras of their own, in the test
  requirements too; the console scripts are the two documented commands."""
  import tomllib
  distributions = importlib.metadata.packages_distributions()
  used = {_normalise(d) for module in _runtime_imports() for d in distributions.get(module, [])}
  unused = set(_requirements_txt()) - used - {_normalise(n) for n in INDIRECT}
  assert unused == set(), f"declared but never imported: {sorted(unused)}"
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  extras = {k: set(_requirement_names(v)) for k, v in project["optional-dependencies"].items()}
  assert extras["lm_eval"] == {"lm-eval"} and extras["wandb"] == {"wandb"}
  with open(os.path.join(REPO, "requirements-test.txt"), encoding="utf-8") as f:
    tests = set(_requirement_names(f))
  assert tests == extras["test"] and {"lm-eval", "wandb"} <= tests
  assert project["scripts"] == {"desmoe-train": "desmoe_jax.cli:train_main",
                                "desmoe-eval": "desmoe_jax.cli:eval_main"}
