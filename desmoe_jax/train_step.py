"""One train step shared by every method:
    (model_state, opt_state, batch, step) -> (new model_state, new opt_state, metrics).

`make_train_step(graphdef, method_cfg, optim_cfg, phase)` returns a pure function to jit once
per phase (the phase decides which parameter groups are differentiated at all: frozen groups
get no weight-gradient computation, which is where much of DES-MoE's speed comes from).
`model_state` is the model's whole `nnx.State` (`graphdef, model_state = nnx.split(model)`):
parameters and the DES-MoE state (correlation, masks, router teachers, copy tables).

batch: tokens [B, S] int; loss_mask [B, S] (1 where token t is a prediction target, i.e. the
loss on predicting tokens[t] from tokens[:t]); domain_id [B, S] int, per token so that packed
rows can mix domains (or [B], one domain per row); optional segment_ids [B, S] (0 = padding)
and positions [B, S].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from desmoe_jax import optim, specialization
from desmoe_jax import sharding as sharding_lib
from desmoe_jax.methods import MethodConfig
from desmoe_jax.moe.block import Adaptation
from desmoe_jax.router import kd_lambda
from desmoe_jax.schedule import WARMUP


def between_phases(graphdef, model_state, method_cfg: MethodConfig, finished_phase: int):
  """Host-side work when a phase ends: expert duplication after warm-up (if enabled).

  Returns (model_state, info); the structure is unchanged (the copy bank exists from the
  start), so optimizer state and compiled steps stay valid.
  """
  info = {}
  if method_cfg.duplicate_experts and finished_phase == WARMUP:
    model = nnx.merge(graphdef, model_state)
    info = specialization.duplicate(model)
    model_state = nnx.state(model)
  return model_state, info


def phase_optimizer(method_cfg: MethodConfig, optim_cfg: optim.OptimConfig, phase: int):
  """The optax transform of `phase`. Every phase's shares one state structure, so the state
  made by `init_optimizer` (any phase) serves them all."""
  return optim.build_optimizer(optim_cfg, method_cfg.total_steps, method_cfg.trainable(phase),
                               method_cfg.trainable_ever())


def init_optimizer(method_cfg: MethodConfig, optim_cfg: optim.OptimConfig, model_state):
  """Optimizer state over the model's parameters (trainable-for-the-run groups only)."""
  params = nnx.filter_state(model_state, nnx.Param)
  return phase_optimizer(method_cfg, optim_cfg, method_cfg.phases()[0][0]).init(params)


def optimizer_shardings(method_cfg: MethodConfig, optim_cfg: optim.OptimConfig, model_state,
                        mesh, rules=None):
  """Layout of `init_optimizer`'s state on `mesh`: every moment like its parameter, counts
  replicated. `jit(init_optimizer)` alone has nothing to follow (moments are fresh zeros, not
  computed from the sharded parameters) and would put the whole state on one device."""
  abstract = jax.eval_shape(lambda ms: init_optimizer(method_cfg, optim_cfg, ms), model_state)
  return sharding_lib.state_shardings(abstract, mesh, rules)


def jit_train_step(graphdef, method_cfg: MethodConfig, optim_cfg: optim.OptimConfig, phase: int,
                   state_shardings, opt_shardings, batch_shardings):
  """`make_train_step(...)` under `jax.jit` with its layout pinned: model and optimizer state
  keep their shardings from step to step (and are donated: updated in place), the batch is
  split as `batch_shardings` says, metrics come back replicated. The trainer runs this, and
  `scripts/memory_plan.py` compiles this, ahead of time."""
  mesh = jax.tree.leaves(batch_shardings)[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(make_train_step(graphdef, method_cfg, optim_cfg, phase),
                 in_shardings=(state_shardings, opt_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, opt_shardings, replicated),
                 donate_argnums=(0, 1))


def token_losses(logits_bsv, tokens_bs):
  """Cross-entropy of predicting tokens[:, t] from position t-1, [B, S] (position 0 gets 0)."""
  logp = jax.nn.log_softmax(logits_bsv[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens_bs[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(nll, ((0, 0), (1, 0)))


def per_domain(values_bs, weights_bs, domain_bs, num_domains: int):
  """(sum of values, sum of weights) per domain, [D] each."""
  onehot = jax.nn.one_hot(domain_bs, num_domains, dtype=jnp.float32) * weights_bs[..., None]
  return jnp.einsum("bsd,bs->d", onehot, values_bs), onehot.sum(axis=(0, 1))


def make_train_step(graphdef, method_cfg: MethodConfig, optim_cfg: optim.OptimConfig,
                    phase: int):
  """The step of `phase`, to be jitted once (`graphdef` from `nnx.split(model)`)."""
  cfg = method_cfg
  tx = phase_optimizer(method_cfg, optim_cfg, phase)
  lr_schedule = optim.learning_rate_schedule(optim_cfg, cfg.total_steps)
  trainable = optim.trainable_filter(cfg.trainable(phase))
  refresh = cfg.refresh_masks(phase)

  def step_fn(model_state, opt_state, batch, step):
    params, state = nnx.split_state(model_state, nnx.Param, ...)
    tokens = batch["tokens"]
    domain_bs = batch["domain_id"]
    if domain_bs.ndim == 1:
      domain_bs = jnp.broadcast_to(domain_bs[:, None], tokens.shape)
    loss_mask = batch["loss_mask"].astype(jnp.float32)
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    positions = batch.get("positions")

    lam = kd_lambda(step, cfg.total_steps) if cfg.use_alr else jnp.zeros((), jnp.float32)
    convex = cfg.use_alr and cfg.alr.loss == "convex"
    adapt = Adaptation(domain_bs=domain_bs, isolate=cfg.apply_masks,
                       router_grad_scale=(1.0 - lam) if convex else None)
    diff, frozen = nnx.split_state(params, trainable, ...)

    def loss_fn(diff):
      model = nnx.merge(graphdef, diff, frozen, state)
      out = model(tokens, segment_ids_bs=segment_ids, positions_bs=positions, adapt=adapt)
      nll = token_losses(out.logits, tokens)
      n = jnp.maximum(loss_mask.sum(), 1.0)
      task = jnp.sum(nll * loss_mask) / n
      total = task + (out.aux_loss if cfg.balance_loss else 0.0)
      kd = out.kd_loss if cfg.use_alr else jnp.zeros((), jnp.float32)
      if cfg.use_alr:
        weight = lam if convex else cfg.alr.beta * lam
        total = total + weight * kd
      return total, (task, kd, nll, out)

    (total, (task, kd, nll, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(diff)
    # Groups frozen in this phase were not differentiated: zeros keep the optimizer's tree.
    full_grads = nnx.merge_state(jax.tree.map(jnp.zeros_like, frozen), grads)

    # The DES-MoE state, reached through the model's interface (model.moe_blocks().des).
    des = specialization.des_state(nnx.merge(graphdef, model_state))
    mask = des.expert_mask[...]                                            # [L, D, E]
    update_mask = {"experts": jnp.ones((mask.shape[0], mask.shape[2]), jnp.float32)}
    if cfg.apply_masks:
      update_mask["experts"] = specialization.expert_update_mask(mask, out.domain_tokens)
    if des.expert_copies is not None:
      copies = des.expert_copies
      update_mask["expert_copies"] = specialization.copies_update_mask(
          copies.owner[...], copies.origin[...], mask, out.domain_tokens)
    updates, new_opt_state = tx.update(full_grads, opt_state, params, step=step,
                                       expert_update_mask=update_mask)
    new_params = optax.apply_updates(params, updates)

    # DGES: correlation from this step's routing; masks refreshed every T_update steps.
    corr = des.correlation[...]
    new_corr = specialization.update_correlation(corr, out.domain_counts, out.domain_tokens,
                                                 cfg.dges.momentum)
    new_mask = mask
    if refresh:
      due = (step + 1) % cfg.dges.update_every == 0
      new_mask = jnp.where(due, specialization.mask_from_correlation(new_corr, cfg.dges.phi,
                                                                     cfg.dges.score), mask)
    new_model = nnx.merge(graphdef, new_params, state)
    new_des = specialization.des_state(new_model)
    new_des.correlation[...] = new_corr
    new_des.expert_mask[...] = new_mask

    domain_loss, domain_tokens = per_domain(nll, loss_mask, domain_bs, cfg.num_domains)
    overlap = specialization.mask_overlap(new_mask)
    d = cfg.num_domains
    metrics = {
        "loss": task,
        "total_loss": total,
        "kd_loss": kd,
        "lambda": lam,
        "balance_loss": out.aux_loss,
        "grad_norm": optax.tree.norm(grads),
        "domain_loss": domain_loss / jnp.maximum(domain_tokens, 1.0),   # [D]; NaN-free
        "domain_tokens": domain_tokens,                                  # [D] target tokens
        "mask_density": new_mask.mean(),
        "expert_overlap": (overlap.sum() - jnp.trace(overlap)) / max(d * (d - 1), 1),
        "overlap_matrix": overlap,
        "experts_updated": update_mask["experts"].mean(),
        "learning_rate": lr_schedule(step),
        "phase": jnp.asarray(phase, jnp.int32),
    }
    return nnx.state(new_model), new_opt_state, metrics

  return step_fn
