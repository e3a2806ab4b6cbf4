"""The installed commands, end to end, from a folder outside the checkout: `pip install -e .` into
a fresh virtual environment, `desmoe-train --config=six_domains:tiny,fft` with a hub model id
(local hub cache, offline), `desmoe-eval --workdir=DIR` alone (the run's saved config) with a
local lm-eval task reported for the base and the adapted model, and `train.init_from`. Plus the
config plumbing they rest on: preset names, saved configs, `data.select`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ONE_DEVICE_XLA_FLAGS

from desmoe_jax import cli, run_config
from desmoe_jax.run_config import load_config

pytestmark = pytest.mark.e2e   # end-to-end (pyproject.toml markers): -m "not e2e" skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_AT_RUN = None  # the checkout's commit when the tiny run trained
FAST = ["--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.data.seq_len=256", "--config.data.batch_size=2", "--config.eval.loss_batches=1",
        "--config.data.general_mc=", "--config.export.enabled=False",
        "--config.data.select=math"]


def test_preset_names_are_the_config_files():
  for name, arg in (("six_domains", "tiny,esft_gate"), ("six_domains", ""), ("models", "v2")):
    by_name = load_config(f"{name}:{arg}" if arg else name)
    by_file = load_config(os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else ""))
    assert by_name.to_dict() == by_file.to_dict()
  assert cli.resolve_config_arg(["x", "--config=six_domains:tiny", "--config.seed=1"]) == [
      "x", f"--config={os.path.join(REPO, 'desmoe_jax', 'configs', 'six_domains.py')}:tiny",
      "--config.seed=1"]
  assert cli.resolve_config_arg(["x", "--config", "configs/six_domains.py"])[2] == \
      "configs/six_domains.py"                                  # a file stays a file
  with pytest.raises(ValueError, match="unknown preset 'six_domain'; presets: six_domains, models"):
    load_config("six_domain:tiny")


def test_domain_fields_from_the_command_line():
  """`--config.data.domains[1].prompt_field=question` (ml_collections' own flag parser) and the
  same key given to load_config set the same field."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["train.py", f"--config={os.path.join(REPO, 'configs', 'six_domains.py')}:tiny",
          "--config.data.domains[1].prompt_field=question", "--config.data.domains[1].split=dev",
          "--config.data.select=code"]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  values(argv)
  want = load_config("six_domains:tiny", {"data.domains[1].prompt_field": "question",
                                          "data.domains[1].split": "dev", "data.select": "code"})
  assert holder.value.to_dict() == want.to_dict()
  assert want.data.domains[1].name == "code" and want.data.domains[1].prompt_field == "question"
  with pytest.raises(KeyError, match=r"'data.domains\[9\]' is not an entry of a list"):
    load_config("six_domains:tiny", {"data.domains[9].split": "x"})


def test_saved_config_round_trips_and_fills_fields_of_older_runs(tmp_path):
  config = load_config("six_domains:tiny,fft", {"dges.phi": 0.5, "data.select": "code,math"})
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  assert run_config.saved_config(str(tmp_path)).to_dict() == config.to_dict()
  old = json.loads(config.to_json_best_effort())
  del old["logging"], old["data"]["select"], old["data"]["domains"][1]["messages_field"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  filled = run_config.saved_config(str(tmp_path))
  assert filled.to_dict() == config.to_dict() | {"data": dict(config.data.to_dict(), select="")}
  with pytest.raises(FileNotFoundError, match="no config.json and no checkpoints/ there"):
    run_config.saved_config(str(tmp_path / "empty"))


# ------------------------------------------------------------------ end to end


def _site_dirs() -> list[str]:
  """The running interpreter's site-packages (the suite's own environment: CI's virtualenv, or
  the system's)."""
  import site
  dirs = list(site.getsitepackages())
  if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
  return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A fresh virtual environment that sees the packages of the interpreter running this suite,
  with this checkout `pip install -e`'d into it. Not `--system-site-packages`: made from inside
  a virtualenv (CI), that shows the BASE interpreter's packages, not the virtualenv's (where jax
  etc. are), and the commands fail with "No module named 'jax'" wherever the base interpreter
  has none. A .pth file naming the running interpreter's site-packages instead (plain paths:
  their own .pth files, e.g. an editable desmoe_jax of the outer environment, stay inactive, so
  the import below can only come from this venv's own install)."""
  venv = tmp_path_factory.mktemp("venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                          "['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(purelib, "_outer_site_packages.pth"), "w") as f:
    f.write("".join(d + "\n" for d in _site_dirs()))
  # No pip of its own: the running environment's pip and setuptools install into it.
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "-e", REPO], check=True, capture_output=True)
  return venv / "bin"


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
  from test_sources import _cache_repo
  cache = str(tmp_path_factory.mktemp("hub"))
  tiny = os.path.join(REPO, "assets", "tiny_deepseek_v2")
  _cache_repo(cache, "model", "desmoe/tiny", {f: os.path.join(tiny, f) for f in os.listdir(tiny)})
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  return dict(env, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
              XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)


def _run(command, cwd, env):
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def tiny_run(installed, hub_env, tmp_path_factory):
  global HEAD_AT_RUN
  HEAD_AT_RUN = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                               text=True).stdout.strip()
  elsewhere = tmp_path_factory.mktemp("elsewhere")      # not the checkout: presets and bundled
  work = elsewhere / "run"                              # data must resolve from the package
  _run([str(installed / "desmoe-train"), "--config=six_domains:tiny,fft", f"--workdir={work}",
        "--config.model.path=hf://desmoe/tiny", *FAST], elsewhere, hub_env)
  return work


def _final_eval(work):
  records = [json.loads(line) for line in open(work / "metrics.jsonl")]
  return [r for r in records if r.get("event") == "eval"][-1]


def _counts(checkpoint):
  import jax
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(os.path.join(checkpoint, "opt_state"))
  return {int(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jax.tree_util.keystr(p).endswith("['count']")}


def _runs_from_any_folder(installed, hub_env, tiny_run):
  where = _run([str(installed / "python"), "-c", "import desmoe_jax; print(desmoe_jax.__file__)"],
               tiny_run.parent, hub_env).stdout.strip()
  assert where == os.path.join(REPO, "desmoe_jax", "__init__.py")
  saved = json.load(open(tiny_run / "config.json"))
  assert saved["model"]["path"] == "hf://desmoe/tiny"     # the id, not the cache path
  assert [d["name"] for d in saved["data"]["domains"]] == ["math"]
  assert saved["data"]["domains"][0]["train"] == os.path.join(REPO, "data", "math", "train.jsonl")
  from desmoe_jax.checkpoint import Checkpointer
  meta = Checkpointer(str(tiny_run / "checkpoints")).read_meta()
  import jax
  assert meta["versions"]["jax"] == jax.__version__ and meta["versions"]["desmoe-jax"] == "0.1.0"
  if os.path.isdir(os.path.join(REPO, ".git")) or os.path.isfile(os.path.join(REPO, ".git")):
    assert meta["git_commit"] == HEAD_AT_RUN and isinstance(meta["git_dirty"], bool)
  assert _counts(str(tiny_run / "checkpoints" / "2")) == {2}


def _eval_workdir_alone_reports_lm_eval_base_and_adapted(installed, hub_env, tiny_run,
                                                         tmp_path):
  from test_lm_eval import write_tasks
  tasks = write_tasks(tmp_path / "tasks")
  out = _run([str(installed / "desmoe-eval"), f"--workdir={tiny_run}", "--no_generation",
              "--config.eval.lm_eval_tasks=desmoe_mc", f"--config.eval.lm_eval_include={tasks}",
              "--config.eval.lm_eval_limit=4"], tmp_path, hub_env).stdout
  results = json.load(open(tiny_run / "eval" / "step2" / "results.json"))
  # The run's own config: the domain it trained, and its held-out loss exactly as training saw it.
  assert [k for k in results if k not in ("general", "lm_eval")] == ["math"]
  final = _final_eval(tiny_run)
  assert results["math"]["loss"] == pytest.approx(final["heldout_loss/math"], rel=1e-5)
  assert results["general"]["loss"] == pytest.approx(final["heldout_loss/general"], rel=1e-5)
  scores = results["lm_eval"]["desmoe_mc"]
  assert set(scores) == {"acc", "base_acc"}
  assert all(4 * v == pytest.approx(round(4 * v)) for v in scores.values())   # 4 items
  line = next(line for line in out.splitlines() if line.startswith("desmoe_mc acc"))
  assert [float(x) for x in line.split()[2:]] == pytest.approx(
      [scores["acc"], scores["base_acc"], scores["acc"] - scores["base_acc"]], abs=1e-4)


def _init_from_takes_the_model_state_and_a_fresh_optimizer(installed, hub_env, tiny_run,
                                                           tmp_path):
  # A learning rate of 1e-30 leaves the weights as they came: the new run's held-out loss is
  # the source run's final one, and its optimizer counts only its own step.
  _run([str(installed / "desmoe-train"), "--config=six_domains:tiny,fft",
        f"--workdir={tmp_path / 'next'}", "--config.model.path=hf://desmoe/tiny", *FAST,
        f"--config.train.init_from={tiny_run}", "--config.train.steps=1",
        "--config.optim.learning_rate=1e-30"], tmp_path, hub_env)
  before, after = _final_eval(tiny_run), _final_eval(tmp_path / "next")
  for key in ("heldout_loss/math", "heldout_loss/general"):
    assert after[key] == pytest.approx(before[key], rel=1e-5)
  assert not np.isclose(before["heldout_loss/math"], 0.0)
  assert _counts(str(tmp_path / "next" / "checkpoints" / "1")) == {1}
  with pytest.raises(AssertionError, match="config.train.init_from='/nowhere' does not exist"):
    _run([str(installed / "desmoe-train"), "--config=six_domains:tiny,fft",
          f"--workdir={tmp_path / 'bad'}", *FAST, "--config.train.init_from=/nowhere"],
         tmp_path, hub_env)


def test_installed_commands_end_to_end(installed, hub_env, tiny_run, tmp_path):
  """One test, not three: the phases share one venv and one training run (module fixtures),
  and pytest-xdist (CI runs `pytest -n 2`) hands consecutive tests to different workers, each
  of which then built its own venv and trained its own run (measured: two of each, ~50 % more
  CPU time for this file). The phases stay separate functions, each failing with its message.
  The lm_eval phase comes last, so that without lm_eval only it is left out."""
  _runs_from_any_folder(installed, hub_env, tiny_run)
  (tmp_path / "init_from").mkdir()
  _init_from_takes_the_model_state_and_a_fresh_optimizer(installed, hub_env, tiny_run,
                                                         tmp_path / "init_from")
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    pytest.skip("lm_eval is not installed: `desmoe-eval --workdir` with lm-eval tasks did not "
                "run (the other phases passed)")
  (tmp_path / "eval").mkdir()
  _eval_workdir_alone_reports_lm_eval_base_and_adapted(installed, hub_env, tiny_run,
                                                       tmp_path / "eval")
