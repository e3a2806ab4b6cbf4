"""Domains discovered from the base model's routing (desmoe_jax/discover.py): signatures against
a per-example loop, k-means deterministic and exact on separable signatures, the silhouette
rule, the errors naming data.discover_domains, the assignment saved once and reloaded (never
re-clustered), and the data iterator carrying each example's cluster as its domain id."""

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model

from desmoe_jax import discover
from desmoe_jax import validate
from desmoe_jax.errors import ConfigError


def blobs(sizes, dim=24, seed=0, spread=0.02):
  """Signatures of len(sizes) known clusters: each a random point of the simplex, plus noise."""
  rng = np.random.default_rng(seed)
  centres = rng.dirichlet(np.ones(dim), len(sizes))
  x = np.concatenate([c + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
                      for c, n in zip(centres, sizes)])
  truth = np.repeat(np.arange(len(sizes)), sizes)
  order = rng.permutation(len(x))
  return x[order].astype(np.float32), truth[order]


def test_kmeans_recovers_known_clusters_deterministically():
  x, truth = blobs([30, 20, 25, 15])
  labels, centroids, _ = discover.kmeans(x, 4, seed=0)
  assert discover.adjusted_rand_index(truth, labels) == 1.0
  again, _, _ = discover.kmeans(x, 4, seed=0)
  np.testing.assert_array_equal(labels, again)
  np.testing.assert_array_equal(discover.predict(x, centroids), labels)   # nearest centroid
  table = discover.confusion(truth, labels, 4, 4)
  assert sorted(table.max(1).tolist()) == [15, 20, 25, 30] and (table > 0).sum() == 4


def test_auto_picks_the_number_of_clusters_by_silhouette():
  x, truth = blobs([20, 20, 20], seed=1)
  k, scores = discover.choose_k(x, seed=0, max_k=6)
  assert k == 3 and sorted(scores) == [2, 3, 4, 5, 6]
  assert scores[3] == max(scores.values())


def test_errors_name_the_field():
  x, _ = blobs([3, 3])
  with pytest.raises(ConfigError, match=r"data\.discover_domains=7: more clusters than the 6 "):
    discover.kmeans(x, 7, seed=0)
  with pytest.raises(ConfigError, match=r"data\.discover_domains=1: K = 1 puts every example"):
    discover.kmeans(x, 1, seed=0)
  dup = np.repeat(x[:2], 4, axis=0)             # two distinct signatures, three clusters asked
  with pytest.raises(ConfigError, match=r"data\.discover_domains=3: cluster\(s\) \[\d\] ended "
                                        r"up empty: the 8 examples have fewer than 3 distinct"):
    discover.kmeans(dup, 3, seed=0)
  c = ml_collections.ConfigDict({"data": {"discover_domains": 1}})
  assert validate.problems(c) == ["data.discover_domains=1: K = 1 puts every example in one "
                                  "domain: nothing to specialise (use 0 for off)"]
  for bad in (-2, "six", 2.5, True):
    c = ml_collections.ConfigDict({"data": {"discover_domains": bad}}, type_safe=False)
    assert validate.problems(c) == [f"data.discover_domains={bad!r}: must be 0 (off), a number "
                                    "of domains K >= 2, or 'auto'"]
  for good in (0, 2, 6, "auto"):
    assert not validate.problems(ml_collections.ConfigDict({"data": {"discover_domains": good}}))


def test_the_preset_field_takes_a_number_or_auto():
  from desmoe_jax.run_config import load_config
  assert load_config("six_domains:tiny").data.discover_domains == 0
  assert load_config("six_domains:tiny", {"data.discover_domains": 6}).data.discover_domains == 6
  assert load_config("six_domains:tiny",
                     {"data.discover_domains": "auto"}).data.discover_domains == "auto"


def _examples(seed=0, n=10):
  """Token id arrays of two kinds (low and high ids) that a random model routes apart."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    lo = 0 if i % 2 == 0 else 32
    out.append(rng.integers(lo, lo + 32, rng.integers(5, 15)).astype(np.int32))
  return out


def test_signatures_equal_a_per_example_loop():
  """Packed several to a row and reduced inside the layer loop, each example's signature is
  the one its own forward pass gives (attention never crosses packed examples)."""
  model = tiny_model(seed=3)
  examples = _examples()
  sig = discover.routing_signatures(model, examples, seq_len=32, batch_size=2)
  e, k = model.config.n_routed_experts, model.config.num_experts_per_tok
  assert sig.shape == (len(examples), 2 * e)          # 2 MoE layers x 8 experts
  # The reference: one example per row, padded (one forward pass of every example alone).
  tokens = np.zeros((len(examples), 16), np.int32)
  for i, ids in enumerate(examples):
    tokens[i, :len(ids)] = ids
  segments = (np.arange(16)[None] < np.array([len(x) for x in examples])[:, None])
  topk_ids = nnx.jit(lambda m, t, seg: m(t, segment_ids_bs=seg, return_routing=True,
                                         logits=False).routing.topk_ids)
  topk = np.asarray(topk_ids(model, jnp.asarray(tokens), jnp.asarray(segments, jnp.int32)))
  topk = topk.reshape(2, len(examples), 16, k)                               # [L, N, S, K]
  for i, ids in enumerate(examples):
    want = np.stack([np.bincount(layer[i, :len(ids)].reshape(-1), minlength=e)
                     for layer in topk]) / (len(ids) * k)
    np.testing.assert_allclose(sig[i].reshape(2, e), want, atol=1e-6)
  np.testing.assert_allclose(sig.reshape(-1, 2, e).sum(-1), 1.0, atol=1e-6)


def _config(k=2, seed=0):
  return ml_collections.ConfigDict({"seed": seed, "model": {"path": "tiny"}, "data": {
      "discover_domains": k, "seq_len": 32, "batch_size": 2}})


def test_assignment_is_saved_once_and_reloaded_never_reclustered(tmp_path, monkeypatch):
  model = tiny_model(seed=3)
  train = {"a": _examples(0, 8), "b": _examples(1, 6)}
  held = {"a": _examples(2, 3), "b": []}
  first = discover.discover(_config(), model, train, held, str(tmp_path))
  saved = json.loads((tmp_path / "domains.json").read_text())
  assert saved["k"] == 2 and saved["setup"]["requested"] == 2
  assert [len(saved["train"][n]["cluster"]) for n in "ab"] == [8, 6]
  assert len(saved["heldout"]["a"]["cluster"]) == 3 and sum(first.sizes()) == 14

  def no_routing(*a, **k):
    raise AssertionError("a resumed run re-computed the signatures")
  monkeypatch.setattr(discover, "routing_signatures", no_routing)
  again = discover.discover(_config(), model, train, held, str(tmp_path), resuming=True)
  assert again == first

  with pytest.raises(ConfigError, match=r"domains\.json was computed for another run.*\n"
                                        r"requested: saved 2, now 3"):
    discover.discover(_config(k=3), model, train, held, str(tmp_path), resuming=True)
  changed = {"a": _examples(0, 8), "b": _examples(5, 6)}
  with pytest.raises(ConfigError, match=r"training examples of 'b' changed"):
    discover.discover(_config(), model, changed, held, str(tmp_path), resuming=True)
  os.remove(tmp_path / "domains.json")
  with pytest.raises(ConfigError, match=r"holds checkpoints of a data\.discover_domains run but "
                                        r"no domains\.json"):
    discover.discover(_config(), model, train, held, str(tmp_path), resuming=True)


def test_clustering_is_deterministic_for_a_seed(tmp_path):
  model = tiny_model(seed=3)
  train = {"a": _examples(0, 8), "b": _examples(1, 8)}
  runs = []
  for i in range(2):
    os.makedirs(tmp_path / str(i))
    runs.append(discover.discover(_config(k="auto"), model, train, {}, str(tmp_path / str(i))))
  assert runs[0].train == runs[1].train and runs[0].k == runs[1].k >= 2
  assert set(runs[0].info["silhouette"]) == set(range(2, discover.AUTO_MAX_K + 1))


def test_iterator_carries_each_examples_cluster_and_the_same_tokens(tmp_path):
  from desmoe_jax.data import DomainSpec, MixtureIterator
  from transformers import AutoTokenizer
  from desmoe_jax.paths import bundled
  tok = AutoTokenizer.from_pretrained(bundled("assets", "tiny_deepseek_v2"))
  specs = []
  for name, n in (("x", 5), ("y", 4)):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{name} {i}?", "response": f"{name * i}."})
                            + "\n" for i in range(1, n + 1)))
    specs.append(DomainSpec(name, str(path)))
  labelled = MixtureIterator(specs, tok, seq_len=64, batch_size=2, seed=1)
  found = MixtureIterator(specs, tok, seq_len=64, batch_size=2, seed=1)
  ids = [np.arange(5) % 3, np.array([2, 2, 0, 1])]
  found.set_example_domains(ids)
  lookup = {tuple(x.tolist()): (d, i) for d, ex in enumerate(found.examples)
            for i, (x, _) in enumerate(ex)}
  for _ in range(4):
    a, b = next(labelled), next(found)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    for row in range(2):
      for seg in set(b["segment_ids"][row].tolist()) - {0}:
        where = b["segment_ids"][row] == seg
        d, i = lookup[tuple(b["tokens"][row][where].tolist())]
        assert set(b["domain_id"][row][where].tolist()) == {int(ids[d][i])}
  with pytest.raises(ValueError, match=r"for \[5, 3\] examples, the sources have \[5, 4\]"):
    found.set_example_domains([ids[0], ids[1][:3]])


def _small_six_domains(tmp_path, train=12, held=3) -> list[str]:
  """Flags pointing the six domains of the :tiny preset at their shortest rows (seconds to
  route and cluster, where the bundled files take minutes), at 512-token sequences, in one
  schedule phase."""
  from desmoe_jax.configs.six_domains import DOMAINS
  from desmoe_jax.paths import bundled
  flags = ["--config.data.select=", "--config.data.seq_len=512"]
  for i, name in enumerate(DOMAINS):
    for split, n in (("train", train), ("eval", held)):
      rows = sorted(open(bundled("data", name, f"{split}.jsonl")).read().splitlines(),
                    key=len)[:n]
      path = tmp_path / "data" / name / f"{split}.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("\n".join(rows) + "\n")
      flags.append(f"--config.data.domains[{i}].{split}={path}")
  # One schedule phase (stabilization from step 0: the masks of the discovered domains apply
  # from the first step), so each run compiles one train step instead of three; crossing the
  # phases on a resume is tests/test_trainer.py's.
  return flags + ["--config.data.discover_domains=6", "--config.schedule.t1=0.0",
                  "--config.schedule.t2=1.0"]


@pytest.mark.e2e
def test_train_py_discovers_resumes_after_sigterm_bit_identically_and_eval_reports_clusters(
    tmp_path):
  """train.py on the six tiny domains with data.discover_domains=6: the assignment is written
  once; a SIGTERM mid-run and the rerun give the uninterrupted run's losses bit for bit, the
  rerun reading the assignment instead of clustering again; eval.py reports every labelled
  domain and every cluster."""
  import re
  import signal
  import subprocess
  import sys
  import time
  from conftest import one_device_env
  from test_trainer import REPO, _losses, _train_py
  flags = _small_six_domains(tmp_path)
  ref = _train_py(tmp_path / "ref", *flags, checkpoint_every=100)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert re.search(r"discovered domains: K=6; cluster sizes \[(\d+, ){5}\d+\]", ref.stdout)
  saved = json.loads((tmp_path / "ref" / "domains.json").read_text())
  assert saved["k"] == 6 and saved["info"]["sizes"] and all(saved["info"]["sizes"])
  assert [t["examples"] for t in saved["train"].values()] == [12] * 6

  work = tmp_path / "work"
  proc = _train_py(work, *flags, wait=False, checkpoint_every=100)
  metrics, deadline = work / "metrics.jsonl", time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any('"loss"' in l for l in metrics.read_text().splitlines()[1:]):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be preempted"
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 75, stderr[-3000:]
  assignment = (work / "domains.json").read_bytes()
  resumed = _train_py(work, *flags, checkpoint_every=100)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr and "the 6 clusters saved in" in resumed.stderr
  assert "discovered domains" not in resumed.stdout            # never re-clustered
  assert (work / "domains.json").read_bytes() == assignment
  assert json.loads(assignment)["train"] == saved["train"]      # same seed, same clusters
  ref_losses, got = _losses(tmp_path / "ref"), _losses(work)
  assert sorted(got) == sorted(ref_losses) == list(range(1, 9))
  np.testing.assert_array_equal([got[s] for s in range(1, 9)],
                                [ref_losses[s] for s in range(1, 9)])

  ev = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), f"--workdir={work}",
                       "--no_generation", "--no_base"], capture_output=True, text=True,
                      env=one_device_env(), timeout=900)
  assert ev.returncode == 0, ev.stderr[-3000:]
  results = json.loads((work / "eval" / "step8" / "results.json").read_text())
  from desmoe_jax.configs.six_domains import DOMAINS
  clusters = [f"cluster{c}" for c in range(6)
              if any(c in h["cluster"] for h in saved["heldout"].values())]
  assert clusters and set(DOMAINS) | set(clusters) <= set(results)
  for name in list(DOMAINS) + clusters:
    assert np.isfinite(results[name]["loss"]) and re.search(rf"^{name}\s+\d", ev.stdout, re.M)
