"""ESFT expert scoring and top-p selection against hand computations."""

import jax.numpy as jnp
import numpy as np
from helpers import batch, tiny_model

from desmoe_jax import esft

# 4 tokens, top-2 of 4 experts (one layer).
IDS = np.array([[[0, 1], [0, 2], [0, 1], [3, 0]]])
WEIGHTS = np.array([[[0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]]])


def test_scores_hand_example():
  gate, token = esft.score_sums(jnp.asarray(IDS), jnp.asarray(WEIGHTS), jnp.ones(4, bool), 4)
  # gate: e0 .6+.5+.9+.3=2.3, e1 .4+.1=.5, e2 .5, e3 .7 (total 4); token: counts/K = 2, 1, .5, .5
  np.testing.assert_allclose(esft.normalise_per_layer(gate), [[0.575, 0.125, 0.125, 0.175]])
  np.testing.assert_allclose(esft.normalise_per_layer(token), [[0.5, 0.25, 0.125, 0.125]])
  # A padding token does not count.
  _, token_masked = esft.score_sums(jnp.asarray(IDS), jnp.asarray(WEIGHTS),
                                    jnp.array([True, True, True, False]), 4)
  np.testing.assert_allclose(esft.normalise_per_layer(token_masked), [[0.5, 1 / 3, 1 / 6, 0]])


def test_top_p_selection_hand_example():
  gate = np.array([[0.575, 0.125, 0.125, 0.175]])
  token = np.array([[0.5, 0.25, 0.125, 0.125]])
  # ESFT loop: add experts by score until the kept share reaches p.
  np.testing.assert_array_equal(esft.select(gate, 0.1), [[1, 0, 0, 0]])      # paper's gate p
  np.testing.assert_array_equal(esft.select(gate, 0.7), [[1, 0, 0, 1]])      # .575 < .7
  np.testing.assert_array_equal(esft.select(token, 0.2), [[1, 0, 0, 0]])     # paper's token p
  np.testing.assert_array_equal(esft.select(token, 0.6), [[1, 1, 0, 0]])     # .5 < .6 <= .75
  np.testing.assert_array_equal(esft.select(token, 1.0), [[1, 1, 1, 1]])


def test_masks_single_domain_and_union():
  model = tiny_model(seed=4)
  data = {d: [batch(10 + d, [d, d])] for d in range(3)}
  cfg = esft.EsftConfig(top_p=0.5, sample_tokens=16)
  union = esft.esft_masks(model, data, "token", cfg, num_domains=3)
  singles = [esft.esft_masks(model, data, "token", esft.EsftConfig(top_p=0.5, domain=d), 3)
             for d in range(3)]
  for d in range(3):
    assert singles[d][:, d].sum() > 0
    assert singles[d].sum() == singles[d][:, d].sum()  # other rows empty
  expected = np.max([singles[d][:, d] for d in range(3)], axis=0)
  for d in range(3):
    np.testing.assert_array_equal(union[:, d], expected)
