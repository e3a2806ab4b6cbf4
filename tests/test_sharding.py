"""Sharding: logical axes -> mesh, and an 8-device sharded forward equal to the 1-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from desmoe_jax import sharding
from desmoe_jax.convert import from_pretrained


def test_mesh_axes_are_auto_and_sized():
  mesh = sharding.make_mesh({"data": 2, "expert": 2, "tensor": -1})
  assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"pipeline": 8})


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  assert sharding.logical_to_spec(("experts", "embed", "expert_mlp"), (8, 32, 16), mesh) == \
      P("expert", "fsdp", "tensor")
  # A dimension the axis does not divide stays replicated instead of failing at run time.
  assert sharding.logical_to_spec(("embed", "kv_lora"), (32, 21), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("layers", "vocab", "embed"), (3, 95, 32), mesh) == \
      P(None, None, "fsdp")
  with pytest.raises(KeyError, match="'nope'"):
    sharding.logical_to_spec(("nope",), (4,), mesh)


@nnx.jit
def _forward(m, ids):
  """One program for the reference too (one device): an eager forward compiles every op."""
  return m(ids).logits


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "expert": 2},
                                   {"fsdp": 2, "expert": 2, "tensor": 2}])
def test_sharded_forward_equals_single_device(hf_checkpoint, shape):
  assert len(jax.devices()) >= 8, "conftest sets --xla_force_host_platform_device_count=8"
  path, hf = hf_checkpoint("v2lite_like")
  ids = np.random.RandomState(0).randint(0, hf.config.vocab_size, (8, 12))
  ref = np.asarray(_forward(from_pretrained(path, dtype=jnp.float32), ids))

  mesh = sharding.make_mesh(shape)
  model = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
  kernel = model.moe_blocks().experts.gate_proj[...]
  assert kernel.sharding.spec == sharding.logical_to_spec(
      ("layers", "experts", "embed", "expert_mlp"), kernel.shape, mesh)
  assert len(kernel.sharding.device_set) == 8

  with jax.set_mesh(mesh):
    out = _forward(model, jax.device_put(ids, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_shard_model_moves_every_variable(hf_checkpoint):
  path, _ = hf_checkpoint("v2lite_like")
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  model = sharding.shard_model(from_pretrained(path, dtype=jnp.float32), mesh)
  for p, v in nnx.to_flat_state(nnx.state(model)):
    assert v[...].sharding.mesh.shape == mesh.shape, p
  assert "moe_layers.mlp.experts.up_proj" in sharding.describe(model, mesh)


def test_optimizer_state_is_laid_out_like_the_parameters():
  """Moments are fresh zeros, not computed from the parameters: without out_shardings,
  jit(init) put the whole optimizer state on one device."""
  from desmoe_jax import train_step
  from desmoe_jax.methods import MethodConfig, prepare_model
  from desmoe_jax.optim import OptimConfig
  from helpers import tiny_model

  mc, oc = MethodConfig(method="desmoe"), OptimConfig()
  mesh = sharding.make_mesh({"fsdp": 4, "expert": 2})
  _, state = nnx.split(sharding.shard_model(prepare_model(tiny_model(), mc), mesh))
  opt_shardings = train_step.optimizer_shardings(mc, oc, state, mesh)
  opt = jax.jit(lambda s: train_step.init_optimizer(mc, oc, s), out_shardings=opt_shardings)(state)
  params = {jax.tree_util.keystr(p): v.sharding
            for p, v in jax.tree_util.tree_flatten_with_path(nnx.filter_state(state, nnx.Param))[0]}
  moments = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt)[0]:
    key = jax.tree_util.keystr(path)
    if leaf.ndim == 0:  # step counts
      assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8, key
      continue
    (name,) = [p for p in params if key.endswith(p)]
    assert leaf.sharding == params[name], key
    moments += 1
  assert moments == 2 * len(params)  # every group is trained in some DES-MoE phase


def test_activations_are_split_over_the_batch_under_the_mesh():
  """Under `jax.set_mesh` (as the trainer runs) every device computes only its own rows: the
  partitioner, left to itself, split d_model like the parameters and replicated the batch."""
  from helpers import TINY, tiny_model

  mesh = sharding.make_mesh({"fsdp": 8})
  model = tiny_model()
  ids = np.random.RandomState(0).randint(0, TINY["vocab_size"], (8, 16))
  ref = np.asarray(model(ids).logits)
  graphdef, state = nnx.split(sharding.shard_model(model, mesh))
  forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).logits)
  ids = jax.device_put(ids, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    hlo = forward.lower(state, ids).compile().as_text()
    out = forward(state, ids)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  vocab = TINY["vocab_size"]
  assert f"f32[1,16,{vocab}]" in hlo and f"f32[8,16,{vocab}]" not in hlo  # per-device logits
