"""The CPU grouped-FFN kernel (gmm.py) against the dense reference: outputs and gradients in
float32 to 1e-5, for any routing (empty experts, one expert gets everything, group sizes that
are not multiples of any tile, duplicate experts in a token's top-k)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from desmoe_jax.moe import gmm
from desmoe_jax.moe.block import expert_outputs

E, D, F = 5, 16, 12


def _weights(seed, e=E):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (e, D, F)) * 0.3, jax.random.normal(k[1], (e, D, F)) * 0.3,
          jax.random.normal(k[2], (e, F, D)) * 0.3)


def _random_ids(t, k, e=E, seed=0):
  rs = np.random.RandomState(seed)
  return np.stack([rs.choice(e, k, replace=False) for _ in range(t)])


ROUTINGS = {
    "random": lambda t, k: _random_ids(t, k),
    "one_expert_gets_all_k1": lambda t, k: np.full((t, 1), 2),
    "one_expert_gets_all": lambda t, k: np.stack([[3, 0][:k]] * t),
    "empty_experts": lambda t, k: np.stack([[0, 4][:k]] * t),          # experts 1..3 get nothing
    "skewed": lambda t, k: np.where(np.arange(t)[:, None] % 7 == 0, _random_ids(t, k),
                                    np.array([1, 2][:k])),
    "duplicate_expert_in_topk": lambda t, k: np.stack([[1, 1][:k]] * t),
}


def _grads(fn, x, ids, weights, cot):
  loss = lambda x, g, u, d: jnp.sum(fn(x, ids, g, u, d) * cot)
  return fn(x, ids, *weights), jax.grad(loss, argnums=(0, 1, 2, 3))(x, *weights)


def _assert_close(got, want, what):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5, err_msg=what)


CASES = ([(routing, 37, (16, 4)) for routing in sorted(ROUTINGS)]
         + [("random", 1, (16, 4)), ("random", 70, (8, 8)), ("random", 70, (32, 8)),
            ("skewed", 70, (128, 32)), ("random", 37, (12, 4)), ("random", 3, (128, 32))])


@pytest.mark.parametrize("routing,t,tiles", CASES)
def test_matches_dense(routing, t, tiles):
  """T*K = 74 and 140 are multiples of no tile size; (12, 4) gives tiles of 12 and 6 rows; with
  T=3 the row buffer is shorter than max_tile. Every case checks y and all gradients."""
  max_tile, min_tile = tiles
  ids = jnp.asarray(ROUTINGS[routing](t, 2), jnp.int32)
  k = ids.shape[1]
  x = jax.random.normal(jax.random.key(t), (t, D))
  weights = _weights(1)
  cot = jax.random.normal(jax.random.key(2), (t, k, D))

  @jax.jit
  def both(x, weights, cot):
    dense = lambda *a: expert_outputs(*a, impl="dense")
    tiled = lambda *a: gmm.grouped_ffn(*a, max_tile=max_tile, min_tile=min_tile)
    return _grads(dense, x, ids, weights, cot), _grads(tiled, x, ids, weights, cot)

  (want_y, want_g), (got_y, got_g) = both(x, weights, cot)
  assert got_y.shape == (t, k, D)
  _assert_close(got_y, want_y, "y")
  for a, b, name in zip(got_g, want_g, ("x", "gate", "up", "down")):
    _assert_close(a, b, f"d{name}")


def test_layout_covers_every_slot_once():
  ids = jnp.asarray(ROUTINGS["skewed"](70, 2), jnp.int32)
  n, flat = ids.size, np.asarray(ids).reshape(-1)
  sizes = gmm.tile_sizes(32, 8)
  assert sizes == (32, 16, 8)
  row_slot, start, padded = map(np.asarray, gmm.tile_layout(ids, E, sizes[-1]))
  seen = []
  for e in range(E):
    plan = gmm.tile_plan(int(padded[e]), sizes)
    assert sum(c * s for (c, _), s in zip(plan, sizes)) == padded[e]
    assert all(c in (0, 1) for c, _ in plan[1:])
    assert 0 <= padded[e] - (flat == e).sum() < sizes[-1]     # padding < the smallest tile
    for (count, offset), size in zip(plan, sizes):
      for i in range(count):
        rows = row_slot[start[e] + offset + i * size: start[e] + offset + (i + 1) * size]
        real = rows[rows < n]
        assert (flat[real] == e).all()
        assert (np.diff(rows) > 0).all()                      # sorted, distinct
        seen.extend(real.tolist())
  assert sorted(seen) == list(range(n))


def test_bfloat16_runs_and_is_close():
  t, k = 40, 2
  ids = jnp.asarray(_random_ids(t, k), jnp.int32)
  x = jax.random.normal(jax.random.key(0), (t, D))
  weights = _weights(3)
  cot = jax.random.normal(jax.random.key(2), (t, k, D))
  want_y, want_g = jax.jit(lambda x, w, c: _grads(lambda *a: expert_outputs(*a, impl="dense"), x, ids,
                                                  w, c))(x, weights, cot)
  bf = lambda a: a.astype(jnp.bfloat16)
  got_y, got_g = _grads(jax.jit(lambda *a: gmm.grouped_ffn(*a, max_tile=16, min_tile=8)),
                        bf(x), ids, tuple(map(bf, weights)), bf(cot))
  assert got_y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_g)
  scale = lambda a: float(jnp.abs(a.astype(jnp.float32)).max())
  for a, b in zip((got_y,) + got_g, (want_y,) + want_g):
    assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 0.05 * scale(b)
