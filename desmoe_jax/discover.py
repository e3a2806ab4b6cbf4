"""Domains discovered from the base model's routing, for data without (or beside) domain labels
(`data.discover_domains`, docs/METHOD.md section 2a).

DES-MoE needs a domain id on every token. A model that routes by content already has an opinion
about which examples belong together, so the examples are grouped by how the *base* model routes
them:

  signature of an example  [L * E]  per MoE layer, the share of the example's top-k slots (all
                                     its real tokens, prompt and response) that each routed
                                     expert takes; each layer's block sums to 1
  clusters                          k-means (scikit-learn's KMeans, k-means++ with `N_INIT`
                                     restarts, seeded) on the signatures of every training
                                     example of every data.domains file, pooled

and every example then carries its cluster id as `domain_id`. K is given, or chosen by the
silhouette rule (`choose_k`). The assignment, with what it was computed from, is written once
to <workdir>/domains.json (`Assignment`) and read back on resume, which never re-clusters; a
workdir whose assignment does not fit the data or the config is an error. Held-out examples
are assigned to the nearest centroid by their own signatures, so held-out losses can be
reported per cluster beside the labelled domains.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax import distributed
from desmoe_jax.errors import ConfigError, DataError

log = logging.getLogger("desmoe_jax")

FIELD = "data.discover_domains"
FILE = "domains.json"
VERSION = 1
N_INIT = 10            # k-means++ restarts (the lowest inertia is kept)
AUTO_MAX_K = 12        # "auto" tries K = 2 .. min(AUTO_MAX_K, examples - 1)
SILHOUETTE_SAMPLE = 4000   # examples the silhouette of each K is computed on (seeded sample)
ROW_EXAMPLES = 32      # at most this many examples packed into one row of a signature batch


def requested(config):
  """`data.discover_domains` of `config`: 0 (off), K >= 2, or "auto"."""
  return config.data.get("discover_domains", 0)


def enabled(config) -> bool:
  return requested(config) not in (0, None)


def check_request(value) -> str | None:
  """None if `value` is a valid data.discover_domains, else why not (without the field name)."""
  if value == "auto" or value == 0:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    return "must be 0 (off), a number of domains K >= 2, or 'auto'"
  if value == 1:
    return "K = 1 puts every example in one domain: nothing to specialise (use 0 for off)"
  if value < 0:
    return "must be 0 (off), a number of domains K >= 2, or 'auto'"
  return None


def cluster_names(k: int) -> list[str]:
  return [f"cluster{c}" for c in range(k)]


# ------------------------------------------------------------------ signatures


def signature_batches(examples, seq_len: int, batch_size: int):
  """(batch, count) pairs: `examples` (token id arrays) packed in order into rows of
  `seq_len`, each batch with `example_bs` [B, S] int32, the index of the example (in the batch)
  each token belongs to, -1 on padding; `count` examples per batch."""
  i, n = 0, len(examples)
  while i < n:
    tokens = np.zeros((batch_size, seq_len), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    example = np.full_like(tokens, -1)
    count = 0
    for row in range(batch_size):
      used, segment = 0, 0
      while i < n and segment < ROW_EXAMPLES and used + len(examples[i]) <= seq_len:
        ids = examples[i]
        sl = slice(used, used + len(ids))
        segment += 1
        tokens[row, sl], segments[row, sl] = ids, segment
        positions[row, sl], example[row, sl] = np.arange(len(ids)), count
        used, count, i = used + len(ids), count + 1, i + 1
      if i < n and segment == 0:
        raise DataError(f"an example of {len(examples[i])} tokens does not fit "
                        f"data.seq_len={seq_len}")
    yield {"tokens": tokens, "segment_ids": segments, "positions": positions,
           "example_bs": example}, count


@functools.lru_cache(maxsize=4)
def _slot_counts_fn(graphdef, num_experts: int, max_examples: int):
  """The jitted per-example top-k slot counts [L, M, E] of one batch; each MoE layer reduces
  its own [T, K] ids to [M, E] inside the layer loop, so [L, T, K, E] never exists."""

  @jax.jit
  def counts(state, tokens, segment_ids, positions, example_bs):
    owner_tm = jax.nn.one_hot(example_bs.reshape(-1), max_examples, dtype=jnp.float32)

    def per_layer(routing):
      slots_te = jax.nn.one_hot(routing.topk_ids, num_experts, dtype=jnp.float32).sum(1)
      return owner_tm.T @ slots_te                                         # [M, E]

    out = nnx.merge(graphdef, state)(tokens, segment_ids_bs=segment_ids,
                                     positions_bs=positions, return_routing=per_layer,
                                     logits=False)
    return out.routing                                                     # [L, M, E]

  return counts


def routing_signatures(model, examples, *, seq_len: int, batch_size: int,
                       place=jnp.asarray) -> np.ndarray:
  """[N, L * E] float32: per MoE layer, the share of each example's top-k slots per routed
  expert under `model` (the base model), over all its real tokens. One jitted program (per
  model structure), run over the examples packed into `batch_size` x `seq_len` batches."""
  graphdef, state = nnx.split(model)
  e = model.config.n_routed_experts
  m = batch_size * ROW_EXAMPLES
  fn = _slot_counts_fn(graphdef, e, m)
  out = []
  for batch, count in signature_batches(examples, seq_len, batch_size):
    counts = fn(state, *(place(batch[k]) for k in ("tokens", "segment_ids", "positions",
                                                     "example_bs")))
    counts_mle = np.transpose(np.asarray(distributed.to_host(counts)), (1, 0, 2))[:count]
    out.append(counts_mle / counts_mle.sum(-1, keepdims=True))
  if not out:
    raise DataError("domain discovery got no example to route")
  sig = np.concatenate(out).astype(np.float32)
  return sig.reshape(sig.shape[0], -1)


# ------------------------------------------------------------------ clustering


def kmeans(signatures: np.ndarray, k: int, seed: int, field: str = FIELD):
  """(labels [N] int, centroids [K, F], inertia) of scikit-learn's KMeans, seeded (the same
  signatures and seed give the same labels). Errors name `field`: K larger than the number
  of examples, K = 1, a cluster left empty (fewer distinct signatures than K)."""
  from sklearn.cluster import KMeans
  from sklearn.exceptions import ConvergenceWarning
  n = len(signatures)
  why = check_request(k)
  if why or k == 0 or k == "auto":
    raise ConfigError(f"{field}={k!r}: {why or 'needs a number of clusters K >= 2 here'}")
  if k > n:
    raise ConfigError(f"{field}={k}: more clusters than the {n} training examples")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # duplicates: found empty below
    km = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(signatures)
  labels = km.labels_.astype(np.int64)
  sizes = np.bincount(labels, minlength=k)
  if (sizes == 0).any():
    raise ConfigError(f"{field}={k}: cluster(s) {np.flatnonzero(sizes == 0).tolist()} ended up "
                      f"empty: the {n} examples have fewer than {k} distinct routing "
                      "signatures; lower K")
  return labels, km.cluster_centers_.astype(np.float32), float(km.inertia_)


def choose_k(signatures: np.ndarray, seed: int, max_k: int = AUTO_MAX_K):
  """The "auto" rule: K in 2 .. min(max_k, N - 1) with the largest mean silhouette (Euclidean,
  on a seeded sample of at most SILHOUETTE_SAMPLE examples); ties go to the smaller K. Returns
  (K, {K: silhouette})."""
  from sklearn.metrics import silhouette_score
  n = len(signatures)
  top = min(max_k, n - 1)
  if top < 2:
    raise ConfigError(f"{FIELD}='auto': needs at least 3 training examples, there are {n}")
  scores = {}
  for k in range(2, top + 1):
    try:
      labels, _, _ = kmeans(signatures, k, seed)
    except ConfigError:      # an empty cluster: fewer distinct signatures than k
      break
    scores[k] = float(silhouette_score(signatures, labels, sample_size=min(n, SILHOUETTE_SAMPLE),
                                       random_state=seed))
  if not scores:
    raise ConfigError(f"{FIELD}='auto': the training examples have fewer than 2 distinct "
                      "routing signatures")
  best = max(scores.values())
  return min(k for k, s in scores.items() if s == best), scores


def predict(signatures: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """The nearest centroid (Euclidean, as k-means assigns) of each signature."""
  d = ((signatures[:, None, :] - centroids[None]) ** 2).sum(-1)
  return np.argmin(d, axis=1)


def adjusted_rand_index(a, b) -> float:
  from sklearn.metrics import adjusted_rand_score
  return float(adjusted_rand_score(a, b))


def confusion(true, pred, n_true: int, n_pred: int) -> np.ndarray:
  """[n_true, n_pred] counts of examples per (true domain, cluster)."""
  out = np.zeros((n_true, n_pred), np.int64)
  np.add.at(out, (np.asarray(true), np.asarray(pred)), 1)
  return out


# ------------------------------------------------------------------ the assignment


def digest(examples) -> str:
  """sha256 over the token ids of `examples`, in order: what identifies a source's examples."""
  h = hashlib.sha256()
  for ids in examples:
    h.update(np.asarray(ids, np.int32).tobytes())
    h.update(b"|")
  return h.hexdigest()


@dataclasses.dataclass
class Assignment:
  """The discovered domains of a run: per data source (a data.domains entry), the cluster of
  each training example (in the order the source's rows are read) and of each held-out
  example, and what they were computed from (`setup`, compared on resume)."""
  k: int
  setup: dict                          # requested K, seed, model, seq_len, signature layout
  train: dict                          # source name -> {"examples", "sha256", "cluster": [..]}
  heldout: dict                        # source name -> {"examples", "sha256", "cluster": [..]}
  centroids: list
  info: dict = dataclasses.field(default_factory=dict)   # sizes, silhouettes, inertia

  def train_labels(self, name: str) -> np.ndarray:
    return np.asarray(self.train[name]["cluster"], np.int32)

  def sizes(self) -> list[int]:
    labels = np.concatenate([self.train_labels(n) for n in self.train])
    return np.bincount(labels, minlength=self.k).tolist()

  def save(self, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"version": VERSION, **dataclasses.asdict(self)}, f)
    os.replace(tmp, path)             # a reader never sees half an assignment

  @classmethod
  def load(cls, path: str) -> Assignment:
    try:
      with open(path) as f:
        raw = json.load(f)
      raw.pop("version")
      return cls(**raw)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{path}: the saved domain assignment is unreadable ({e}); move it "
                        "away to re-cluster, or use another --workdir") from None

  def check(self, path: str, setup: dict, train: dict, heldout: dict):
    """Raises a ConfigError naming what differs between this saved assignment and the run."""
    problems = [f"{key}: saved {self.setup.get(key)!r}, now {value!r}"
                for key, value in setup.items() if self.setup.get(key) != value]
    for kind, saved, now in (("training", self.train, train), ("held-out", self.heldout,
                                                                 heldout)):
      if list(saved) != list(now):
        problems.append(f"{kind} sources: saved {list(saved)}, now {list(now)}")
        continue
      for name, (count, sha) in now.items():
        if (saved[name]["examples"], saved[name]["sha256"]) != (count, sha):
          problems.append(f"{kind} examples of {name!r} changed ({saved[name]['examples']} -> "
                          f"{count} examples, or their tokens)")
    if problems:
      raise ConfigError(f"{path} was computed for another run ({FIELD}); a resumed run never "
                        "re-clusters. Use another --workdir, or move the file away (and the "
                        "checkpoints) to start over:\n" + "\n".join(problems))


def signature_setup(config, model) -> dict:
  """What an assignment depends on besides the examples (compared on resume)."""
  mc = model.config
  return {"requested": requested(config), "seed": int(config.seed),
          "model": config.model.path, "seq_len": int(config.data.seq_len),
          "signature": "top-k slot share per MoE layer and routed expert, all real tokens",
          "moe_layers": int(mc.num_hidden_layers - getattr(mc, "first_k_dense_replace", 0)),
          "experts": int(mc.n_routed_experts), "top_k": int(mc.num_experts_per_tok),
          "clustering": f"sklearn.cluster.KMeans(n_init={N_INIT})"}


def discover(config, model, train_examples: dict, heldout_examples: dict, workdir: str,
             *, saved_model_path: str | None = None, resuming: bool = False,
             place=jnp.asarray, signatures: np.ndarray | None = None) -> Assignment:
  """The run's assignment: read from <workdir>/domains.json when it is there (checked against
  the run), else computed from `model`'s routing and written there. `train_examples` /
  `heldout_examples`: {source name: [token id arrays]}; `resuming`: the workdir holds a
  checkpoint, so the assignment must already exist. `signatures`: those of the pooled training
  examples, when already computed (scripts/discover_report.py clusters them twice)."""
  path = os.path.join(workdir, FILE)
  setup = signature_setup(config, model)
  if saved_model_path is not None:
    setup["model"] = saved_model_path
  ids = {kind: {name: (len(ex), digest(ex)) for name, ex in examples.items()}
         for kind, examples in (("train", train_examples), ("heldout", heldout_examples))}
  if os.path.exists(path):
    assignment = Assignment.load(path)
    assignment.check(path, setup, ids["train"], ids["heldout"])
    log.info("domains: the %d clusters saved in %s (sizes %s)", assignment.k, path,
             assignment.sizes())
    return assignment
  if resuming:
    raise ConfigError(f"{workdir} holds checkpoints of a {FIELD} run but no {FILE}: its "
                      "domain assignment is lost, and a resumed run never re-clusters; use "
                      "another --workdir")
  pooled = [x for ex in train_examples.values() for x in ex]
  kw = dict(seq_len=config.data.seq_len, batch_size=config.data.batch_size, place=place)
  if signatures is None:
    signatures = routing_signatures(model, pooled, **kw)
  want, info = requested(config), {}
  if want == "auto":
    k, info["silhouette"] = choose_k(signatures, config.seed)
  else:
    k = int(want)
  labels, centroids, info["inertia"] = kmeans(signatures, k, config.seed)
  train, start = {}, 0
  for name, ex in train_examples.items():
    train[name] = {"examples": len(ex), "sha256": ids["train"][name][1],
                   "cluster": labels[start:start + len(ex)].tolist()}
    start += len(ex)
  heldout = {}
  for name, ex in heldout_examples.items():
    cl = predict(routing_signatures(model, ex, **kw), centroids).tolist() if ex else []
    heldout[name] = {"examples": len(ex), "sha256": ids["heldout"][name][1], "cluster": cl}
  assignment = Assignment(k, setup, train, heldout, centroids.tolist(), info)
  assignment.info["sizes"] = assignment.sizes()
  if jax.process_index() == 0:
    assignment.save(path)
  chosen = f"K={k}"
  if want == "auto":
    tried = ", ".join(f"{kk}: {v:.3f}" for kk, v in info["silhouette"].items())
    chosen += f" chosen by silhouette ({tried})"
  log.info("domains discovered from the base model's routing: %s; cluster sizes %s; saved to "
           "%s", chosen, assignment.sizes(), path)
  print(f"discovered domains: {chosen}; cluster sizes {assignment.sizes()}", flush=True)
  return assignment
