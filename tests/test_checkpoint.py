"""Orbax checkpoints: exact round trip, restore onto another mesh, mismatches named by key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model

from desmoe_jax import checkpoint as ck
from desmoe_jax import sharding
from desmoe_jax import train_step as ts
from desmoe_jax.methods import MethodConfig, prepare_model
from desmoe_jax.optim import OptimConfig


def _run_state(num_domains=3, mesh=None):
  mc = MethodConfig(method="desmoe", num_domains=num_domains, total_steps=10)
  model = prepare_model(tiny_model(seed=1), mc)
  if mesh is not None:
    sharding.shard_model(model, mesh)
  graphdef, ms = nnx.split(model)
  opt = jax.jit(lambda ms: ts.init_optimizer(mc, OptimConfig(), ms))(ms)
  return graphdef, ms, opt


def test_round_trip_onto_another_mesh(tmp_path):
  mesh_a = sharding.make_mesh({"fsdp": 8})
  _, ms, opt = _run_state(mesh=mesh_a)
  ms = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, ms)
  saver = ck.Checkpointer(str(tmp_path))
  saver.save(7, ms, opt, {"data": {"pos": [1, 2]}, "phase": 1})
  saver.close()

  mesh_b = sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})
  _, target_ms, target_opt = _run_state(mesh=mesh_b)
  shardings = sharding.state_shardings(target_ms, mesh_b)
  loaded = ck.Checkpointer(str(tmp_path))
  assert loaded.latest_step() == 7
  got_ms, got_opt, meta = loaded.restore(ck.abstract_like(target_ms, shardings),
                                         ck.abstract_like(target_opt))
  assert meta["data"] == {"pos": [1, 2]} and meta["phase"] == 1 and meta["step"] == 7
  for a, b, s in zip(jax.tree.leaves(ms), jax.tree.leaves(got_ms), jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding.is_equivalent_to(s, b.ndim)
  for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(got_opt)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatch_names_every_key_and_both_shapes(tmp_path):
  _, ms, opt = _run_state(num_domains=3)
  saver = ck.Checkpointer(str(tmp_path), async_save=False)
  saver.save(1, ms, opt, {})
  _, other_ms, _ = _run_state(num_domains=4)
  with pytest.raises(ValueError) as e:
    saver.restore(ck.abstract_like(other_ms))
  msg = str(e.value)
  assert "'moe_layers/mlp/des/correlation': checkpoint has shape [2, 3, 8]" in msg
  assert "the config builds [2, 4, 8]" in msg and "expert_mask" in msg


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ck.Checkpointer(str(tmp_path)).restore({})
