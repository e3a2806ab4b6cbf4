"""Expert parallelism (`expert_parallel.py`) on 8 simulated devices: outputs and gradients of the
explicit all-to-all dispatch equal the unsharded layer, no token is dropped under any routing,
and a tiny model's DES-MoE train step is unchanged by it.

XLA:CPU has no ragged all-to-all, so the "ragged" exchange runs here with `jax.lax
.ragged_all_to_all` replaced by a transcription of its documented semantics (built from
all_gather); the real primitive is checked to lower, forward and backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import batch as make_batch
from helpers import tiny_model

from desmoe_jax import optim, sharding, specialization
from desmoe_jax.moe import block as moe
from desmoe_jax.moe import expert_parallel
from desmoe_jax import train_step as ts
from desmoe_jax.methods import UNSCHEDULED, MethodConfig, prepare_model
from desmoe_jax.specialization import DgesConfig

E, C, D, F, T, K = 8, 8, 16, 12, 64, 2
MESHES = {"expert4_fsdp2": {"expert": 4, "fsdp": 2}, "expert8": {"expert": 8},
          "expert2_fsdp2_tensor2": {"expert": 2, "fsdp": 2, "tensor": 2},
          "fsdp4_tensor2": {"fsdp": 4, "tensor": 2}}  # no expert axis: every device, all experts


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, axis_index_groups=None):
  """jax.lax.ragged_all_to_all as its docstring specifies it, one slice per peer. Sizes that
  break the documented contract (send_sizes == all_to_all(recv_sizes)) poison the output."""
  assert axis_index_groups is None
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)                 # [peers, N, D]
  starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]     # peer q's slice for me
  at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  rows = jnp.arange(output.shape[0])
  for q in range(input_offsets.shape[0]):
    rel = rows - at[q]
    hit = (rel >= 0) & (rel < recv_sizes[q])
    src = jnp.clip(starts[q] + rel, 0, operand.shape[0] - 1)
    output = jnp.where(hit[:, None], operands[q][src], output)
  agree = jnp.all(send_sizes == jax.lax.all_to_all(recv_sizes, axis_name, 0, 0, tiled=True))
  return jnp.where(agree, output, jnp.nan)


@pytest.fixture
def emulated_ragged(monkeypatch):
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)


def _problem(seed, routing="random", copies=True):
  """x [T, D], ids [T, K] over E routed experts + C copies, weights [E + C, ...], cotangent."""
  k = jax.random.split(jax.random.key(seed), 6)
  n_all = E + (C if copies else 0)
  x = jax.random.normal(k[0], (T, D))
  gate, up = (jax.random.normal(k[i], (n_all, D, F)) * 0.3 for i in (1, 2))
  down = jax.random.normal(k[3], (n_all, F, D)) * 0.3
  if routing == "random":
    ids = jnp.argsort(jax.random.uniform(k[4], (T, n_all)), axis=1)[:, :K]
  else:  # every token to experts 0 and 1: all slots of every device go to one device
    ids = jnp.broadcast_to(jnp.arange(K), (T, K))
  cot = jax.random.normal(k[5], (T, K, D))
  return x, ids.astype(jnp.int32), (gate, up, down), cot


def _value_and_grads(dispatch, x, ids, weights, cot):
  def loss(x, gate, up, down):
    y = dispatch(x, ids, gate, up, down)
    return jnp.sum(y * cot), y
  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, *weights)
  return y, grads


_reference = jax.jit(functools.partial(
    _value_and_grads, functools.partial(moe.expert_outputs, impl="dense")))


def _sharded(mesh_name, exchange, impl, x, ids, weights, cot):
  local = functools.partial(moe.expert_outputs, impl=impl, tile_size=8)
  dispatch = functools.partial(expert_parallel.expert_outputs, local, num_experts=E,
                               exchange=exchange)
  with jax.set_mesh(sharding.make_mesh(MESHES[mesh_name])):
    return jax.jit(functools.partial(_value_and_grads, dispatch))(x, ids, weights, cot)


def _assert_same(got, want):
  (y, grads), (ref_y, ref_grads) = got, want
  np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
  for g, r, name in zip(grads, ref_grads, ("x", "gate", "up", "down")):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("mesh_name,exchange,impl", [
    ("expert4_fsdp2", "fixed", "tiled"), ("expert8", "fixed", "ragged"), ("expert8", "ragged", "tiled"),
    ("expert2_fsdp2_tensor2", "fixed", "dense"), ("expert2_fsdp2_tensor2", "ragged", "tiled"),
    ("fsdp4_tensor2", "fixed", "tiled")])
def test_outputs_and_grads_equal_unsharded(emulated_ragged, mesh_name, exchange, impl):
  """Routed experts plus a copy bank (ids reach both), every gradient, 1e-5 in float32."""
  problem = _problem(0)
  assert int((problem[1] >= E).sum()) > 0 and int((problem[1] < E).sum()) > 0
  _assert_same(_sharded(mesh_name, exchange, impl, *problem), _reference(*problem))


@pytest.mark.parametrize("exchange", ["fixed", "ragged"])
def test_all_tokens_to_one_device_drop_nothing(emulated_ragged, exchange):
  """Experts 0 and 1 live on device 0 of the expert axis: it receives every slot of the batch,
  the worst case the buffers are sized for. Every slot's output is there and exact."""
  problem = _problem(1, routing="one_device", copies=False)
  got = _sharded("expert4_fsdp2", exchange, "tiled", *problem)
  assert np.all(np.abs(np.asarray(got[0])).max(axis=-1) > 0)  # no slot left at zero
  _assert_same(got, _reference(*problem))


def test_ragged_exchange_lowers_with_the_real_primitive():
  x, ids, weights, cot = _problem(2)
  local = functools.partial(moe.expert_outputs, impl="ragged")
  dispatch = functools.partial(expert_parallel.expert_outputs, local, num_experts=E,
                               exchange="ragged")
  with jax.set_mesh(sharding.make_mesh(MESHES["expert8"])):
    hlo = jax.jit(functools.partial(_value_and_grads, dispatch)).lower(
        x, ids, weights, cot).as_text()
  assert hlo.count("ragged_all_to_all") == 4  # dispatch and combine, and their transposes


def test_clear_errors():
  x, ids, (gate, up, down), _ = _problem(3)
  local = functools.partial(moe.expert_outputs, impl="dense")
  run = lambda x, ids, n: expert_parallel.expert_outputs(local, x, ids, gate[:n], up[:n],
                                                         down[:n], num_experts=E)
  with pytest.raises(ValueError, match="jax.set_mesh"):
    run(x, ids, E + C)
  with jax.set_mesh(sharding.make_mesh(MESHES["expert8"])):
    with pytest.raises(ValueError, match="dges.max_copies to a multiple of 8"):
      run(x, ids % E, E + 4)
    with pytest.raises(ValueError, match="do not split over the expert mesh axis"):
      run(x[:12], ids[:12] % E, E)
  with pytest.raises(ValueError, match="expert_parallel='nope'"):
    tiny_model(expert_parallel="nope")


# ------------------------------------------------------------------ the whole model


DOMAINS = 3


def _desmoe_model(**kw):
  """Tiny DES-MoE model (ALR, masks, a filled copy bank) whose masks isolate gradients."""
  mc = MethodConfig(method="desmoe_no_schedule", num_domains=DOMAINS, total_steps=10,
                    dges=DgesConfig(duplicate_shared_experts=True, max_copies=4))
  model = prepare_model(tiny_model(seed=0, **kw), mc)
  des = model.moe_blocks().des
  owners = np.random.RandomState(0).rand(*des.expert_mask.shape) < 0.5  # [L, D, E]
  owners[:, 0] = True                          # domain 0 owns every expert: copies are made
  des.expert_mask[...] = jnp.asarray(owners, jnp.float32)
  assert specialization.duplicate(model)["copies"] > 0
  return mc, model


def test_desmoe_step_equals_unsharded():
  """One DES-MoE train step (forward, loss, backward, AdamW, DGES statistics) with gradient
  isolation and duplicated experts: the explicit dispatch on expert=4 x fsdp=2 (with remat and
  the scan over layers) against the unsharded model. Every parameter and state after the step
  (the correlation holds the routing's domain counts) and the metrics agree."""
  batch = make_batch(0, [0, 1, 2, 1, 0, 2, 1, 0], seq=12)
  # eps=1: AdamW's first update ~ lr * g / (|g| + 1), smooth in the gradient, so the new
  # parameters compare the gradients (eps=1e-8 would give ~ lr * sign(g), float noise included).
  oc = optim.OptimConfig(learning_rate=1.0, eps=1.0, weight_decay=0.0, grad_clip=0.0,
                         schedule="constant")

  def run(model, mc, mesh=None):
    graphdef, state = nnx.split(model)
    opt = ts.init_optimizer(mc, oc, state)
    step = jax.jit(ts.make_train_step(graphdef, mc, oc, UNSCHEDULED))
    b = batch
    if mesh is not None:
      state = jax.device_put(state, sharding.state_shardings(state, mesh))
      b = jax.device_put(batch, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):  # None: no mesh
      return jax.device_get(step(state, opt, b, jnp.asarray(0)))

  mc, model = _desmoe_model()
  want = run(model, mc)
  mc, model = _desmoe_model(expert_parallel="shard_map", remat="full")
  got = run(model, mc, sharding.make_mesh(MESHES["expert4_fsdp2"]))

  flat_got, flat_want = (dict(nnx.to_flat_state(s)) for s in (got[0], want[0]))
  assert flat_got.keys() == flat_want.keys()
  for path, v in flat_want.items():
    np.testing.assert_allclose(flat_got[path][...], v[...], atol=1e-5, rtol=1e-5,
                               err_msg=".".join(map(str, path)))
  copies = ("moe_layers", "mlp", "des", "expert_copies", "up_proj")
  before = dict(nnx.to_flat_state(nnx.state(model)))[copies][...]
  assert np.abs(flat_got[copies][...] - before).max() > 1e-4  # the copies were trained
  for key in ("loss", "total_loss", "kd_loss", "balance_loss", "grad_norm", "domain_loss",
              "experts_updated"):
    np.testing.assert_allclose(got[2][key], want[2][key], rtol=1e-5, atol=1e-7, err_msg=key)
