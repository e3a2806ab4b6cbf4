"""The Colab notebooks (colab/) run headless, so they cannot rot: the quickstart end to end with a
few steps, the DeepSeek-V2-Lite notebook with its TINY switch (embedded model, offline, CPU).
Both are committed clean (no outputs) and every code cell is valid Python once IPython has
translated its `!` / `%` lines.

Parameters are injected papermill style: a cell right after the one tagged `parameters`. The
kernel sees one CPU device (a Colab CPU runtime, a laptop), no network (offline hub; pip and git
would fail rather than download), and a JAX compilation cache shared by the two notebooks, which
compile the same train step: FAST equals the TPU notebook's TINY_OVERRIDES for that reason.
"""

import json
import os

import nbformat
import numpy as np
import pytest
from conftest import one_device_env
from IPython.core.inputtransformer2 import TransformerManager
from flax import nnx
from nbclient import NotebookClient
from transformers import AutoTokenizer

from desmoe_jax import evaluate, sharding, trainer
from desmoe_jax.run_config import load_config

pytestmark = pytest.mark.e2e   # end-to-end (pyproject.toml markers): -m "not e2e" skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ("quickstart.ipynb", "deepseek_v2_lite_tpu.ipynb")
FAST = {"train.steps": 8, "train.log_every": 2, "train.eval_every": 0,
        "train.checkpoint_every": 8, "data.batch_size": 1, "data.seq_len": 512,
        "eval.loss_batches": 1, "eval.max_examples": 2, "eval.max_new_tokens": 16,
        "data.general_mc": ""}


def _read(name):
  return nbformat.read(os.path.join(COLAB, name), as_version=4)


def _parameters_index(nb):
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ())]
  assert len(tagged) == 1, f"{len(tagged)} cells tagged 'parameters'"
  return tagged[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_every_cell_compiles(name):
  nb = _read(name)
  nbformat.validate(nb)
  first = nb.cells[0]
  assert first.cell_type == "markdown"
  # No placeholder link (the repository's public address is not known here): the user sets
  # REPO_URL, and the presets find the checkout through DESMOE_JAX_HOME.
  text = "".join(cell.source for cell in nb.cells)
  assert "<org>" not in text
  assert 'REPO_URL = ""' in text and 'os.environ["DESMOE_JAX_HOME"] = REPO' in text
  _parameters_index(nb)
  to_python = TransformerManager().transform_cell
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs"
    compile(to_python(cell.source), f"{name}, cell {i}", "exec")  # SyntaxError names the cell


def test_tpu_notebook_tiny_overrides_are_the_fast_ones():
  """Same shapes in both notebooks, so the second one reuses the first one's compilations."""
  nb = _read("deepseek_v2_lite_tpu.ipynb")
  scope = {}
  exec(nb.cells[_parameters_index(nb)].source, scope)
  assert scope["TINY"] is False and scope["TINY_OVERRIDES"] == FAST


def _execute(name, parameters: str, cache_dir):
  nb = _read(name)
  nb.cells.insert(_parameters_index(nb) + 1, nbformat.v4.new_code_cell(parameters))
  env = one_device_env(PIP_NO_INDEX="1", GIT_ALLOW_PROTOCOL="file",
                       TOKENIZERS_PARALLELISM="false", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": COLAB}}).execute(env=env)
  return nb


def _outputs(nb, mime):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if mime in o.get("data", {}) or (mime == "text" and o.get("name") == "stdout")]


def test_notebooks_execute(tmp_path):
  """One test for both notebooks: they share the compilation cache (xdist would split them)."""
  work = tmp_path / "quickstart"
  overrides = dict(FAST, **{"export.enabled": False})  # as the notebook's own default
  nb = _execute("quickstart.ipynb", f"WORKDIR = {str(work)!r}\nOVERRIDES = {overrides!r}",
                tmp_path / "jax_cache")
  assert len(_outputs(nb, "image/png")) == 2                    # the two heatmaps
  printed = "".join(o["text"] for o in _outputs(nb, "text"))
  assert "general abilities" in printed and "translation" in printed
  assert len(_outputs(nb, "text/html")) >= 1                    # the results DataFrame

  # The notebook's evaluation (a restored checkpoint) scores what the trainer had in memory.
  results = json.load(open(work / "eval" / "step8" / "results.json"))
  records = [json.loads(line) for line in open(work / "metrics.jsonl")]
  final = [r for r in records if r.get("event") == "eval"][-1]
  assert final["step"] == 8
  names = ["math", "code", "law", "intent", "summary", "translation", "general"]
  np.testing.assert_allclose([results[n]["loss"] for n in names],
                             [final[f"heldout_loss/{n}"] for n in names], rtol=1e-5)
  assert {"exact_match", "generated"} <= set(results["math"]) and "bleu" in results["translation"]
  assert "base_loss" in results["general"]

  # The same checkpoint restored onto 8 devices (sharded, as a big model is) scores the same.
  config = load_config(os.path.join(REPO, "configs", "six_domains.py:tiny"), FAST)
  mesh = sharding.make_mesh({"fsdp": 8})
  model, meta = evaluate.load_run_model(config, str(work), mesh=mesh)
  assert meta["step"] == 8
  assert not model.moe_blocks().experts.down_proj[...].sharding.is_fully_replicated
  sets = trainer.eval_loss_batches(config, AutoTokenizer.from_pretrained(config.model.path))
  losses = trainer.heldout_losses(*nnx.split(model), sets)
  np.testing.assert_allclose([losses[n] for n in names], [results[n]["loss"] for n in names],
                             rtol=1e-5)

  work = tmp_path / "v2_lite_tiny"
  nb = _execute("deepseek_v2_lite_tpu.ipynb", f"TINY = True\nWORKDIR = {str(work)!r}",
                tmp_path / "jax_cache")
  printed = "".join(o["text"] for o in _outputs(nb, "text"))
  assert "mesh {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}" in printed
  assert "DeepseekV2ForCausalLM answers:" in printed            # transformers ran the export
  assert os.path.isfile(work / "hf" / "config.json")
  assert os.path.isfile(work / "eval" / "step8" / "results.json")
