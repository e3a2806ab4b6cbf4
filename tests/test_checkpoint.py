"""Orbax checkpoints: exact round trip, restore onto another mesh, mismatches named by key."""

import os

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


def test_read_only_never_creates_the_directory(tmp_path):
  from desmoe_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="no checkpoints: .*/typo/checkpoints does not exist"):
    ck.Checkpointer(str(tmp_path / "typo" / "checkpoints"), read_only=True)
  assert os.listdir(tmp_path) == []


def test_all_finite_is_one_reduction_over_every_float_leaf():
  tree = {"a": jnp.ones((3,)), "b": {"c": jnp.arange(4), "d": jnp.zeros((2, 2), jnp.bfloat16)}}
  assert bool(jax.jit(ck.all_finite)(tree))
  tree["b"]["d"] = tree["b"]["d"].at[1, 1].set(jnp.inf)
  assert not bool(jax.jit(ck.all_finite)(tree))
  assert {k: bool(v) for k, v in ck.nonfinite_leaves(tree).items()} == {"a": True, "b/d": False}


def test_a_save_that_fails_is_raised_naming_path_and_last_good(tmp_path, monkeypatch):
  """The synchronous part of a save failing (here: orbax refusing) is a SaveFailed naming the
  checkpoint and the last committed one; the background part is covered end to end in
  test_trainer (a full disk)."""
  from desmoe_jax.errors import SaveFailed
  _, ms, opt = _run_state()
  saver = ck.Checkpointer(str(tmp_path), async_save=False)
  saver.save(1, ms, opt, {})
  saver.wait()

  def refuse(*a, **k):
    raise OSError(30, "Read-only file system")
  monkeypatch.setattr(saver._manager, "save", refuse)
  with pytest.raises(SaveFailed) as e:
    saver.save(2, ms, opt, {})
  assert str(e.value).startswith(f"saving checkpoint {tmp_path}/2 failed (OSError: [Errno 30] "
                                 f"Read-only file system); the last good checkpoint is "
                                 f"{tmp_path}/1.")


def test_a_checkpoint_path_that_is_a_file_is_a_config_error(tmp_path):
  from desmoe_jax.errors import ConfigError
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(ConfigError, match="checkpoints is a file"):
    ck.Checkpointer(str(tmp_path / "checkpoints"))


def test_eval_of_a_step_that_was_not_saved_lists_the_saved_ones(tmp_path):
  """Found from the checkpoint listing, before any model is loaded."""
  from desmoe_jax import evaluate
  from desmoe_jax.errors import ConfigError
  _, ms, opt = _run_state()
  saver = ck.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saver.save(4, ms, opt, {})
  saver.close()
  with pytest.raises(ConfigError, match=r"--step=7: no checkpoint of that step in .* \(there "
                                        r"are: 4\)"):
    evaluate.load_run_model(None, str(tmp_path), step=7)
