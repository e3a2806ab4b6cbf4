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


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "expert": 2},
                                   {"fsdp": 2, "expert": 2, "tensor": 2}])
def test_sharded_forward_equals_single_device(hf_checkpoint, shape):
  assert len(jax.devices()) >= 8, "conftest sets --xla_force_host_platform_device_count=8"
  path, hf = hf_checkpoint("v2lite_like")
  ids = np.random.RandomState(0).randint(0, hf.config.vocab_size, (8, 12))
  ref = np.asarray(from_pretrained(path, dtype=jnp.float32)(ids).logits)

  mesh = sharding.make_mesh(shape)
  model = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
  kernel = model.moe_layers.mlp.experts.gate_proj[...]
  assert kernel.sharding.spec == sharding.logical_to_spec(
      ("layers", "experts", "embed", "expert_mlp"), kernel.shape, mesh)
  assert len(kernel.sharding.device_set) == 8

  @nnx.jit
  def forward(m, ids):
    return m(ids).logits

  with jax.set_mesh(mesh):
    out = forward(model, jax.device_put(ids, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_shard_model_moves_every_variable(hf_checkpoint):
  path, _ = hf_checkpoint("v2lite_like")
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  model = sharding.shard_model(from_pretrained(path, dtype=jnp.float32), mesh)
  for p, v in nnx.to_flat_state(nnx.state(model)):
    assert v[...].sharding.mesh.shape == mesh.shape, p
  assert "moe_layers.mlp.experts.up_proj" in sharding.describe(model, mesh)
