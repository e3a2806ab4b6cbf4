"""Held-out evaluation during training (and by eval.py): the mean next-token loss on held-out
packed batches of each domain and of general text, and the ALR's agreement with its teacher.
Each is one jitted program per model structure, cached, so a run's evaluations compile once."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from desmoe_jax import data as data_lib
from desmoe_jax import discover
from desmoe_jax import distributed
from desmoe_jax import losses
from desmoe_jax import specialization
from desmoe_jax.heatmaps import heatmap_paths, save_heatmaps
from desmoe_jax.train_config import domain_spec

log = logging.getLogger("desmoe_jax")


@functools.lru_cache(maxsize=8)
def _loss_sums_fn(graphdef):
  """The jitted held-out loss of one model structure. Cached so that every evaluation of a run
  reuses one compiled program (jax.jit caches by shapes per function object, and a function
  defined inside `heldout_losses` was a new object, so a new compile, at every evaluation)."""

  @jax.jit
  def loss_sums(state, batch):
    out = nnx.merge(graphdef, state)(batch["tokens"], segment_ids_bs=batch["segment_ids"],
                                     positions_bs=batch["positions"])
    nll = losses.token_losses(out.logits, batch["tokens"])
    w = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)

  return loss_sums


@functools.lru_cache(maxsize=8)
def _teacher_agreement_fn(graphdef):
  """The jitted ALR/teacher agreement of one batch: (tokens x layers whose two top-k SETS are
  equal, tokens x layers), over the real tokens. Each layer reduces its own ids inside the layer
  loop; the router inputs are never returned."""

  @jax.jit
  def agreement(state, batch):
    def same_t(routing):
      return jnp.all(jnp.sort(routing.topk_ids, axis=-1)
                     == jnp.sort(routing.teacher_topk_ids, axis=-1), axis=-1)

    out = nnx.merge(graphdef, state)(batch["tokens"], segment_ids_bs=batch["segment_ids"],
                                     positions_bs=batch["positions"], return_routing=same_t,
                                     logits=False)
    real_t = (batch["segment_ids"] != 0).reshape(-1).astype(jnp.float32)
    same_lt = out.routing.astype(jnp.float32)
    return jnp.sum(same_lt * real_t), same_lt.shape[0] * jnp.sum(real_t)

  return agreement


def alr_teacher_agreement(graphdef, model_state, batches, batch_sharding=None) -> float | None:
  """Top-k agreement of the ALR with its frozen teacher (the pretrained router) on `batches`:
  the fraction of (MoE layer, real token) pairs whose top-k expert SET is the same under both
  (`Routing.teacher_topk_ids`; the export's `topk_set_agreement` measures the folded router the
  same way). 1.0 at initialisation, where the ALR equals its teacher; how far it drifts from it
  is what distillation holds back. None for a model without the ALR, or no batch."""
  from desmoe_jax.router import AdaptiveRouter
  moe = nnx.merge(graphdef, model_state).moe_blocks()
  if moe is None or not isinstance(moe.gate, AdaptiveRouter) or not batches:
    return None
  agreement = _teacher_agreement_fn(graphdef)
  same, total = 0.0, 0.0
  for b in batches:
    b = (distributed.global_batch(b, batch_sharding) if batch_sharding is not None
         else {k: jnp.asarray(v) for k, v in b.items()})
    s, n = agreement(model_state, b)
    same, total = same + float(s), total + float(n)
  return same / total if total else None


def heldout_losses(graphdef, model_state, batches_by_domain: dict, batch_sharding=None) -> dict:
  """Mean next-token loss on held-out packed batches, {name: loss}. With `batch_sharding`,
  batches are split over its mesh (every process of a multi-process run must call this).
  Compiles once per model structure and batch shape, not once per call."""
  loss_sums = _loss_sums_fn(graphdef)
  out = {}
  for name, batches in batches_by_domain.items():
    total, count = 0.0, 0.0
    for b in batches:
      b = (distributed.global_batch(b, batch_sharding) if batch_sharding is not None
           else {k: jnp.asarray(v) for k, v in b.items()})
      s, n = loss_sums(model_state, b)                # replicated scalars: readable everywhere
      total, count = total + float(s), count + float(n)
    out[name] = total / max(count, 1.0)
  return out


def eval_loss_batches(config, tokenizer) -> dict:
  """Held-out packed batches per domain (answers given prompts) and of general text."""
  out = {}
  for d in config.data.domains:
    if d.eval:
      out[d.name] = data_lib.eval_loss_batches(
          domain_spec(d, "eval"), tokenizer,
          seq_len=config.data.seq_len, batch_size=config.data.batch_size,
          max_batches=config.eval.loss_batches)
  if config.data.general:
    general = config.eval.general_batches
    out["general"] = data_lib.text_loss_batches(
        config.data.general, tokenizer, seq_len=config.data.seq_len,
        batch_size=config.data.batch_size,
        max_batches=config.eval.loss_batches if general < 0 else general)
  return out


def heldout_examples_of(config, tokenizer) -> dict:
  """{domain name: its tokenised held-out examples} (`data.eval_loss_examples`), for the
  domains with an eval file: what the discovered clusters' held-out sets are drawn from."""
  return {d.name: data_lib.eval_loss_examples(domain_spec(d, "eval"), tokenizer,
                                              seq_len=config.data.seq_len)
          for d in config.data.domains if d.eval}


def cluster_loss_batches(config, assignment: discover.Assignment, heldout_examples: dict
                         ) -> dict:
  """Held-out packed batches per discovered cluster ("cluster<c>"): the held-out examples of
  every labelled domain that the assignment puts in cluster c (nearest centroid of their base
  routing), taken from the domains in turn (the first of each domain's, then the second, ...),
  at most eval.loss_batches batches. A cluster no held-out example falls in has no set."""
  out = {}
  for c, name in enumerate(discover.cluster_names(assignment.k)):
    queues = [[ex for ex, cl in zip(examples, assignment.heldout[domain]["cluster"]) if cl == c]
              for domain, examples in heldout_examples.items()]
    ordered = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues
               if i < len(q)]
    if ordered:
      out[name] = data_lib.pack_once(ordered, config.data.seq_len, config.data.batch_size,
                                     config.eval.loss_batches)
  return out


def genre_loss_batches(config, tokenizer) -> dict:
  """Held-out batches of general text per genre (`data.general_genres`; {} when off), scored
  once after training and by eval.py, not at every in-training evaluation."""
  if not config.data.get("general_genres"):
    return {}
  return data_lib.genre_loss_batches(config.data.general_genres, tokenizer,
                                     seq_len=config.data.seq_len,
                                     batch_size=config.data.batch_size,
                                     max_batches=config.eval.get("genre_batches", 4))


def evaluate_heldout(graphdef, model_state, eval_sets, names, workdir, step, config, metrics_log,
              batch_sharding):
  losses = heldout_losses(graphdef, model_state, eval_sets, batch_sharding)
  record = {"event": "eval", **{f"heldout_loss/{k}": v for k, v in losses.items()}}
  agreement = alr_teacher_agreement(graphdef, model_state, eval_sets.get("general"),
                                    batch_sharding)
  if agreement is not None:   # on general text: how far the ALR has moved from its teacher
    record["alr_teacher_topk_agreement"] = agreement
  metrics_log.write(step, record)
  save_heatmaps(specialization.des_state(nnx.merge(graphdef, model_state)), names,
                heatmap_paths(workdir, step), config.train.heatmap_layers)
  metrics_log.images(step, heatmap_paths(workdir, step))
  log.info("step %d held-out loss: %s", step,
           ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
  return losses
