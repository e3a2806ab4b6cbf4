"""One way to build the model from a config (desmoe_jax/build.py): the trainer, eval.py
(`evaluate.load_model`, which used to drop remat / scan_layers / expert_parallel) and the memory
plan get every `config.model` runtime field, and the same weights."""

import os

from desmoe_jax import build, evaluate
from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"model.dtype": "float32", "model.param_dtype": "float32", "model.moe_impl": "dense",
          "model.expert_parallel": "shard_map", "model.attention_impl": "jax",
          "model.remat": "dots", "model.scan_layers": True, "model.ce_chunk": 256}


def test_every_runtime_field_reaches_every_builder():
  config = load_config("six_domains:tiny", FIELDS)
  want = {k.split(".")[1]: v for k, v in FIELDS.items()}
  assert build.runtime_fields(config) == want
  for model_cfg in (build.load_model(config).config, evaluate.load_model(
      config.model.path, config).config, build.model_config(config)):
    assert {k: getattr(model_cfg.runtime, k) for k in want} == want
  import importlib.util
  import sys
  spec = importlib.util.spec_from_file_location("memory_plan", os.path.join(REPO, "scripts",
                                                                            "memory_plan.py"))
  plan = sys.modules["memory_plan"] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plan)
  planned = plan.model_config(config, "")
  assert {k: getattr(planned.runtime, k) for k in want} == want

