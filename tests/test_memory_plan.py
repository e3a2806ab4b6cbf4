"""scripts/memory_plan.py: bytes per device from the shardings equal a hand computation from the
shapes and the mesh, and the compiled train step's arguments are exactly those bytes."""

import collections
import importlib.util
import math
import os
import sys

import jax
import pytest
from flax import nnx

from desmoe_jax import sharding
from desmoe_jax.optim import label_of
from desmoe_jax.schedule import BASE_LABELS as LABELS  # the groups of a model without LoRA
from desmoe_jax.schedule import CONSOLIDATION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, *path):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, *path))
  module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses need it
  spec.loader.exec_module(module)
  return module


memory_plan = _load("memory_plan", "scripts", "memory_plan.py")
six_domains = _load("six_domains", "configs", "six_domains.py")

BATCH, SEQ = 4, 32
COUNT = 4  # bytes of one Adam step count (int32, replicated): one per trained group


def _setup(method):
  config = six_domains.get_config(f"tiny,{method}")
  config.model.param_dtype = "bfloat16"  # moments take the parameters' dtype; routers stay f32
  config.train.precision = "bf16_sr"     # what bfloat16 weights train with
  model_cfg = memory_plan.model_config(config, "tiny")
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices=jax.devices()[:4])
  return config, model_cfg, mesh


def _hand_param_bytes(state) -> dict:
  """Per device on fsdp=2 x expert=2: a dimension named "embed" is halved by fsdp, one named
  "experts" by expert (when they divide it); everything else is whole on every device."""
  out = collections.defaultdict(int)
  for path, var in nnx.to_flat_state(nnx.filter_state(state, nnx.Param)):
    axes, shape = var.get_metadata()["logical_axes"], var.shape
    n = math.prod(shape)
    for name in ("embed", "experts"):
      if name in axes and shape[axes.index(name)] % 2 == 0:
        n //= 2
    out[label_of(var)] += n * var.dtype.itemsize
  return out


def _batch_bytes():
  return 5 * (BATCH // 4) * SEQ * 4 + 8  # five int32 [B, S] arrays split 4 ways, step and rate


def test_fft_state_is_params_plus_two_moments_and_compiles_to_those_bytes():
  config, model_cfg, mesh = _setup("fft")
  (p,) = memory_plan.plan(config, model_cfg, mesh, BATCH, SEQ)
  hand = _hand_param_bytes(memory_plan.abstract_train_state(config, model_cfg, mesh).state)
  assert p.params_by_group == hand and p.params == sum(hand.values())
  assert all(hand[g] > 0 for g in LABELS)
  assert p.opt_by_group == {g: 2 * hand[g] + COUNT for g in LABELS}
  assert p.opt_state == 2 * p.params + len(LABELS) * COUNT
  assert p.seqs_per_device == BATCH / 4 and p.batch_bytes == _batch_bytes()
  # XLA's view of the compiled step: the inputs are exactly these shards, and every state
  # buffer is donated and updated in place.
  state_bytes = p.params + p.model_state + p.opt_state
  assert p.argument == state_bytes + p.batch_bytes
  assert p.alias == state_bytes
  assert p.output >= state_bytes and p.temp > 0 and p.peak > p.argument


def test_desmoe_holds_state_for_phase_frozen_groups_esft_only_for_routed_experts():
  config, model_cfg, mesh = _setup("desmoe")
  (p,) = memory_plan.plan(config, model_cfg, mesh, BATCH, SEQ, phases=[CONSOLIDATION])
  hand = _hand_param_bytes(memory_plan.abstract_train_state(config, model_cfg, mesh).state)
  assert p.params_by_group == hand
  # Every group trains in some phase, so every group has moments in every phase (optim.hold
  # carries a frozen group's state): phases share one optimizer-state structure.
  assert p.opt_by_group == {g: 2 * hand[g] + COUNT for g in LABELS}
  assert p.argument == p.params + p.model_state + p.opt_state + p.batch_bytes

  config, model_cfg, mesh = _setup("esft_gate")
  esft = memory_plan.abstract_train_state(config, model_cfg, mesh)
  hand = _hand_param_bytes(esft.state)
  assert memory_plan.opt_bytes_by_group(esft.opt_state) == {
      "backbone": 0, "shared_experts": 0, "router": 0,
      "routed_experts": 2 * hand["routed_experts"] + COUNT}


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="'pipe=2'"):
    memory_plan.parse_mesh("fsdp=2,pipe=2")
  config, model_cfg, mesh = _setup("fft")
  with pytest.raises(ValueError, match="--batch=6"):
    memory_plan.plan(config, model_cfg, mesh, 6, SEQ)


@pytest.mark.parametrize("machine", sorted(six_domains.MACHINES))
def test_machine_presets_run_the_papers_batch(machine):
  """Every machine preset keeps the paper's 32 x 4096 batch, split into microbatches that give
  each data-parallel device whole sequences, with weights matching the precision."""
  config = six_domains.get_config(machine)
  assert (config.data.batch_size, config.data.seq_len) == (32, 4096)
  for key, value in six_domains.MACHINES[machine].items():
    section, field = key.split(".")
    assert config[section][field] == value
  devices = math.prod(v for v in config.mesh.values() if v > 0)
  assert config.data.batch_size % (config.train.microbatches * devices) == 0
  assert config.model.param_dtype == {"bf16_sr": "bfloat16",
                                      "fp32_master": "float32"}[config.train.precision]
  assert config.data.seq_len % config.model.ce_chunk == 0
  # A machine preset combines with a method preset, and the mesh comes from it in the plan.
  both = six_domains.get_config(f"fft,{machine}")
  assert both.method == "fft" and both.mesh.fsdp == config.mesh.fsdp
  assert memory_plan.config_mesh(config, "cpu") == {"fsdp": config.mesh.fsdp}


def test_machine_preset_errors_are_named():
  with pytest.raises(ValueError, match="v5e9"):
    six_domains.get_config("v5e9")
  with pytest.raises(ValueError, match="one machine preset"):
    six_domains.get_config("v5e8,v4_8")
  with pytest.raises(ValueError, match="one machine preset"):
    six_domains.get_config("tiny,v5e8")
  config = six_domains.get_config("")   # mesh.fsdp = -1: all of the target's devices
  assert memory_plan.config_mesh(config, "cpu") == {"fsdp": memory_plan.CPU_DEVICES}
  config.mesh.expert, config.mesh.fsdp = 2, -1
  assert memory_plan.config_mesh(config, "cpu") == {"fsdp": 4, "expert": 2}
  with pytest.raises(ValueError, match="--layers=-2"):
    memory_plan.model_config(config, "tiny", "cpu", -2)
  assert memory_plan.model_config(config, "tiny", "cpu", 2).num_hidden_layers == 2


# The other families: the published architectures load through --arch, and a tiny model of each
# family plans on XLA:CPU with the same exact-bytes checks as the DeepSeek-V2 one above.
FAMILY_ARCHS = {"deepseek_v3": "moonlight_16b_a3b", "qwen3_moe": "qwen3_30b_a3b",
                "olmoe": "olmoe_1b_7b", "mixtral": "mixtral_8x7b"}


@pytest.mark.parametrize("family,arch", sorted(FAMILY_ARCHS.items()))
def test_arch_of_every_family_loads(family, arch):
  config = six_domains.get_config("v5e8")
  cfg = memory_plan.model_config(config, arch, "v5e:2x4", 2)
  assert cfg.model_type == family and cfg.num_hidden_layers == 2
  assert cfg.runtime.moe_impl == "ragged" and cfg.runtime.expert_parallel == "shard_map"


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_other_family_plans_to_its_exact_bytes(family):
  from desmoe_jax.build import runtime_fields
  from desmoe_jax.config import ModelConfig
  from desmoe_jax.families import get_family

  config = six_domains.get_config("tiny,desmoe")
  config.model.param_dtype, config.train.precision = "bfloat16", "bf16_sr"
  model_cfg = ModelConfig.from_hf_dict(dict(get_family(family).TINY, model_type=family),
                                       **runtime_fields(config))
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices=jax.devices()[:4])
  (p,) = memory_plan.plan(config, model_cfg, mesh, BATCH, SEQ, phases=["stabilization"])
  hand = _hand_param_bytes(memory_plan.abstract_train_state(config, model_cfg, mesh).state)
  hand = {g: hand[g] for g in LABELS}
  assert p.params_by_group == hand and p.params == sum(hand.values())
  assert (hand["shared_experts"] > 0) == (family == "deepseek_v3")  # Qwen3-MoE has none
  trained = [g for g in LABELS if hand[g]]
  assert {g: p.opt_by_group[g] for g in trained} == {g: 2 * hand[g] + COUNT for g in trained}
  state_bytes = p.params + p.model_state + p.opt_state
  assert p.argument == state_bytes + p.batch_bytes and p.alias == state_bytes
  assert p.temp > 0 and p.peak > p.argument
  assert memory_plan.row(p, 16.0)[7] == "+".join(memory_plan.SHORT[g] for g in trained)
