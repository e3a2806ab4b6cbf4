"""What the package declares is exactly what it imports: pyproject's dependencies and
requirements.txt list the same distributions, every third-party module the package and its two
command files import is declared (optional ones as extras), and nothing declared goes unused
(jinja2 aside: transformers renders chat templates with it but does not depend on it)."""

import ast
import os
import re
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ
DIST = {"absl": "absl-py", "ml_collections": "ml-collections", "ml_dtypes": "ml-dtypes",
        "orbax": "orbax-checkpoint", "rouge_score": "rouge-score",
        "huggingface_hub": "huggingface-hub", "tensorboardX": "tensorboardx", "yaml": "pyyaml"}
OPTIONAL = {"lm_eval": "lm_eval", "wandb": "wandb"}        # module -> extra
INDIRECT = {"jinja2"}                                       # declared, used by transformers


def _name(requirement: str) -> str:
  return re.split(r"[<>=!\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def _imported_modules() -> set[str]:
  files = [os.path.join(REPO, f) for f in ("train.py", "eval.py")]
  for root, _, names in os.walk(os.path.join(REPO, "desmoe_jax")):
    files += [os.path.join(root, n) for n in names if n.endswith(".py")]
  found = set()
  for path in files:
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.Import):
        found |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found.add(node.module.split(".")[0])
  return {m for m in found if m not in sys.stdlib_module_names and m != "desmoe_jax"}


def test_declared_dependencies_are_exactly_the_imports():
  project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]
  declared = {_name(r) for r in project["dependencies"]}
  requirements = {_name(line) for line in open(os.path.join(REPO, "requirements.txt"))
                  if line.strip() and not line.startswith("#")}
  assert requirements == declared
  imported = _imported_modules()
  runtime = {DIST.get(m, m).lower() for m in imported if m not in OPTIONAL}
  assert runtime == declared - INDIRECT
  extras = project["optional-dependencies"]
  for module, extra in OPTIONAL.items():
    assert module in imported and [_name(r) for r in extras[extra]] == [module]
  assert {_name(r) for r in extras["test"]} >= set(OPTIONAL)
  tests = {_name(line) for line in open(os.path.join(REPO, "requirements-test.txt"))
           if line.strip() and not line.startswith(("#", "-r"))}
  assert tests == {_name(r) for r in extras["test"]}
  assert project["scripts"] == {"desmoe-train": "desmoe_jax.cli:train_main",
                                "desmoe-eval": "desmoe_jax.cli:eval_main"}
