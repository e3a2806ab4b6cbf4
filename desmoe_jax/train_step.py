"""One train step shared by every method:
    (model_state, opt_state, batch, step) -> (new model_state, new opt_state, metrics).

`make_train_step(graphdef, method_cfg, optim_cfg, phase, step_cfg)` returns a pure function to
jit once per phase (the phase decides which parameter groups are differentiated at all: frozen
groups get no weight-gradient computation, which is where much of DES-MoE's speed comes from).
Read top to bottom, `step_fn` is: the loss of each microbatch (`microbatch_loss`), its
gradients summed over the microbatches (`accumulate_gradients`), the per-expert update masks
(`expert_update_masks`), the optimizer's update (desmoe_jax/optim/: `optim.make_update`), the
DGES statistics (`dges_update`) and the metrics (`step_metrics`).

`StepConfig` holds what the trainer's `train.*` fields decide inside the step: gradient
accumulation over microbatches and how updates reach the stored parameters (`precision`).
`model_state` is the model's whole `nnx.State` (`graphdef, model_state = nnx.split(model)`):
parameters and the DES-MoE state (correlation, masks, router teachers, copy tables).

batch: tokens [B, S] int; loss_mask [B, S] (1 where token t is a prediction target, i.e. the
loss on predicting tokens[t] from tokens[:t]); domain_id [B, S] int, per token so that packed
rows can mix domains (or [B], one domain per row); optional segment_ids [B, S] (0 = padding)
and positions [B, S].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from desmoe_jax import lora, losses, optim, specialization
from desmoe_jax import sharding as sharding_lib
from desmoe_jax.methods import MethodConfig
from desmoe_jax.moe.block import Adaptation
# The optimizer's setup lives in desmoe_jax/optim/; these names stay importable from here for
# the callers of train_step.init_optimizer / optimizer_shardings / check_host_offload.
from desmoe_jax.optim import check_host_offload, init_optimizer, optimizer_shardings  # noqa: F401
from desmoe_jax.router import attach_kd_probe, kd_probe_zeros
from desmoe_jax.schedule import WARMUP
from desmoe_jax.schema import Int, OneOf, knob

PRECISIONS = ("fp32_master", "bf16_sr", "bf16_master")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The `train.*` fields that shape the compiled step (configs/six_domains.py documents them).

  microbatches: the global batch [B, S] is cut into this many microbatches of B / microbatches
    rows, run one after the other by a `lax.scan` inside the step, their gradients summed. Only
    the activations of one microbatch are alive at a time, so B can grow without the memory of
    B rows; the update, the DGES statistics and every metric are those of the whole batch.
  precision: how updates reach the stored parameters.
    "fp32_master": parameters are stored in float32 (they are the master weights) and cast to
      `model.dtype` where they are used; updates are added in float32 and none is lost.
    "bf16_sr": bfloat16 parameters; the update is computed in float32, added in float32, and the
      sum rounded stochastically to bfloat16 (unbiased: an update far below bfloat16's resolution
      still moves the weight by the right amount in expectation). The random bits come from
      `seed` and the step, so a step is deterministic and a resumed run repeats it exactly.
    "bf16_master": bfloat16 weights for the computation and a float32 master copy of the
      trained groups in the optimizer state (`optim.master_weights`, set by the trainer from
      this field): updates go to the master, the weights are the master rounded to nearest.
      Exact like fp32_master; 2 bytes per weight on the device plus 4 in the optimizer state,
      which `optim.host_offload` moves to host memory with the moments.
    float32 leaves (routers, the ALR) are always updated exactly.
  """
  microbatches: int = knob(1, Int(1))
  precision: str = knob("fp32_master", OneOf(*PRECISIONS))
  seed: int = knob(0, Int(0), key="seed")

  def __post_init__(self):
    if self.microbatches < 1:
      raise ValueError(f"train.microbatches={self.microbatches} must be >= 1")
    if self.precision not in PRECISIONS:
      raise ValueError(f"train.precision={self.precision!r}: expected one of {PRECISIONS}")


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


def learning_rate_arg(optim_cfg: optim.OptimConfig) -> jax.Array:
  """The peak learning rate as the compiled step takes it (`jit_train_step`'s last argument)."""
  return jnp.asarray(optim_cfg.learning_rate, jnp.float32)


def jit_train_step(graphdef, method_cfg: MethodConfig, optim_cfg: optim.OptimConfig, phase: int,
                   state_shardings, opt_shardings, batch_shardings,
                   step_cfg: StepConfig = StepConfig()):
  """`make_train_step(...)` under `jax.jit` with its layout pinned: model and optimizer state
  keep their shardings from step to step (and are donated: updated in place), the batch is
  split as `batch_shardings` says, metrics come back replicated. The trainer runs this, and
  `scripts/memory_plan.py` compiles this, ahead of time. Called as `step(model_state,
  opt_state, batch, step, learning_rate_arg(optim_cfg))`: the rate is an input, so one compiled step
  serves every rate (`make_train_step`)."""
  mesh = jax.tree.leaves(batch_shardings)[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(make_train_step(graphdef, method_cfg, optim_cfg, phase, step_cfg),
                 in_shardings=(state_shardings, opt_shardings, batch_shardings, replicated,
                               replicated),
                 out_shardings=(state_shardings, opt_shardings, replicated),
                 donate_argnums=(0, 1))


token_losses = losses.token_losses  # the plain loss from logits (model.token_losses picks)


def per_domain(values_bs, weights_bs, domain_bs, num_domains: int):
  """(sum of values, sum of weights) per domain, [D] each."""
  onehot = jax.nn.one_hot(domain_bs, num_domains, dtype=jnp.float32) * weights_bs[..., None]
  return jnp.einsum("bsd,bs->d", onehot, values_bs), onehot.sum(axis=(0, 1))


def microbatched(x, microbatches: int):
  """[B, ...] -> [microbatches, B / microbatches, ...], microbatch i = rows i, i + n, i + 2n, ...

  Strided, not contiguous: the batch is split over devices in contiguous blocks, so a strided
  microbatch takes the same number of rows from every device (when n divides the rows per
  device) and no row moves between devices."""
  b = x.shape[0]
  if b % microbatches:
    raise ValueError(f"train.microbatches={microbatches} does not divide the batch of {b} rows "
                     "(data.batch_size)")
  x = x.reshape((b // microbatches, microbatches) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return sharding_lib.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def step_inputs(batch) -> dict:
  """The batch as the step reads it, every optional field given its default: tokens, loss_mask
  (float32), domain_bs (one domain id per token), segment_ids and positions, all [B, S]."""
  tokens = batch["tokens"]
  domain_bs = batch["domain_id"]
  if domain_bs.ndim == 1:
    domain_bs = jnp.broadcast_to(domain_bs[:, None], tokens.shape)
  loss_mask = batch["loss_mask"].astype(jnp.float32)
  segment_ids = batch.get("segment_ids")
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  positions = batch.get("positions")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
          "loss_mask": loss_mask, "domain_bs": domain_bs}


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What one step's microbatch losses share: the model's parts not differentiated (`frozen`
  parameters, non-parameter `state`), lambda, and the whole batch's normalisers, so that every
  microbatch's loss is its share of the whole batch's and the microbatch losses (and
  gradients) SUM to the whole batch's."""
  graphdef: object
  method_cfg: MethodConfig
  frozen: object
  state: object
  lam: jax.Array
  microbatches: int
  rows: int                 # sequences in the whole batch
  n_targets: jax.Array      # task loss: mean over the whole batch's targets
  n_real: jax.Array         # KD loss: mean over its real tokens
  seed: int = 0             # lora.dropout's masks: lora.dropout_key(seed, step, microbatch)
  step: jax.Array | None = None

  @property
  def convex(self) -> bool:
    return self.method_cfg.use_alr and self.method_cfg.alr.loss == "convex"


def check_accumulable(model, microbatches: int):
  """A batch-level balance loss is not a sum over sequences: it cannot be accumulated."""
  mcfg = model.config
  if microbatches > 1 and (mcfg.balance_loss == "switch"
                           or (mcfg.balance_loss == "deepseek" and not mcfg.seq_aux)):
    raise ValueError(f"train.microbatches={microbatches}: the model's batch-level balance loss "
                     f"({mcfg.model_type}: balance_loss={mcfg.balance_loss!r}, seq_aux="
                     f"{mcfg.seq_aux}) is not a sum over sequences and cannot be "
                     "accumulated exactly; use train.microbatches=1")


def microbatch_loss(ctx: LossContext, diff_and_probe, mb, acc=None, held=()):
  """(share of the whole batch's objective, (sums, acc)) of one microbatch `mb` ([b, S] each).

  The objective is the total loss, except under alr.mix="update", where L_KD enters with weight
  1 and reaches the probe only: the probe's gradient is the router's KD gradient, and the
  router's own gradient is its task gradient. `acc`: the running gradient sum of the trained
  MoE-layer parameters `held` (given here without gradient), passed to the model (`grad_acc`)
  and returned."""
  cfg = ctx.method_cfg
  diff, probe = diff_and_probe
  model = nnx.merge(ctx.graphdef, diff, *held, ctx.frozen, ctx.state)
  if probe is not None:
    attach_kd_probe(model, probe)
  if cfg.is_lora and cfg.lora.dropout > 0:   # training only: no other caller sets the keys
    lora.set_dropout(model, lora.dropout_key(ctx.seed, ctx.step, mb.get("microbatch", 0)))
  check_accumulable(model, ctx.microbatches)
  adapt = Adaptation(domain_bs=mb["domain_bs"], isolate=cfg.apply_masks,
                     router_grad_scale=(1.0 - ctx.lam) if ctx.convex and probe is None else None)
  out = model(mb["tokens"], segment_ids_bs=mb["segment_ids"], positions_bs=mb["positions"],
              adapt=adapt, logits=False, grad_acc=acc)
  nll = model.token_losses(out, mb["tokens"])  # from the hidden states (model.ce_chunk)
  # The balance loss is a mean over sequences (seq_aux), the KD loss a mean over real tokens:
  # weighted by this microbatch's share of each, they sum to the whole batch's.
  balance = out.aux_loss * (mb["tokens"].shape[0] / ctx.rows)
  kd = (out.kd_loss * (mb["segment_ids"] != 0).sum() / ctx.n_real if cfg.use_alr
        else jnp.zeros((), jnp.float32))
  task = jnp.sum(nll * mb["loss_mask"]) / ctx.n_targets
  total = task + (balance if cfg.balance_loss else 0.0)
  objective = total + kd if probe is not None else None
  if cfg.use_alr:
    total = total + (ctx.lam if ctx.convex else cfg.alr.beta * ctx.lam) * kd
  domain_loss, domain_targets = per_domain(nll, mb["loss_mask"], mb["domain_bs"],
                                           cfg.num_domains)
  sums = {"loss": task, "total_loss": total, "kd_loss": kd, "balance_loss": balance,
          "domain_loss": domain_loss, "domain_targets": domain_targets,
          "domain_counts": out.domain_counts, "domain_tokens": out.domain_tokens}
  return (total if objective is None else objective), (sums, out.grad_acc)


def accumulate_gradients(loss_fn, diff, probe, whole: dict, microbatches: int):
  """(sums, gradients of `diff`, gradients of `probe`) of the whole batch `whole`, run as
  `microbatches` microbatches one after the other (a `lax.scan`), their gradients and sums
  added (cf. MaxText's gradient_accumulation.py). `loss_fn(diff_and_probe, mb, acc, held)`:
  `microbatch_loss` of one microbatch.

  The trained MoE-layer parameters (stacked [L, ...]: nearly all of an MoE model's weights)
  accumulate in place inside the layer loop's backward (model `grad_acc`): one gradient-sized
  buffer for them. The others sum microbatch gradients as usual."""
  if microbatches == 1:
    (_, (sums, _)), (grads, probe_grads) = jax.value_and_grad(loss_fn, has_aux=True)(
        (diff, probe), whole)
    return sums, grads, probe_grads
  in_layers, rest = nnx.split_state(diff, lambda path, _: path[0] == "moe_layers", ...)
  if not nnx.to_flat_state(in_layers):
    in_layers = None
  held = () if in_layers is None else (jax.lax.stop_gradient(in_layers),)

  def accumulate(carry, mb):
    rest_sum, probe_sum, acc, sums_sum = carry

    def f(rest_and_probe, acc):
      total, (mb_sums, acc_out) = loss_fn(rest_and_probe, mb, acc, held)
      return (total, acc_out), mb_sums

    (total, _), vjp, mb_sums = jax.vjp(f, (rest, probe), acc, has_aux=True)
    # acc is the cotangent of the returned acc: its gradient comes back as acc + this
    # microbatch's gradient (model.accumulate_into).
    (rest_grads, probe_grads), acc = vjp((jnp.ones_like(total), acc))
    return (jax.tree.map(jnp.add, rest_sum, rest_grads),
            jax.tree.map(jnp.add, probe_sum, probe_grads), acc,
            jax.tree.map(jnp.add, sums_sum, mb_sums)), None

  parts = {k: microbatched(v, microbatches) for k, v in whole.items()}
  parts["microbatch"] = jnp.arange(microbatches)   # each microbatch's own dropout masks
  zero_sums = jax.eval_shape(loss_fn, (diff, probe), jax.tree.map(lambda x: x[0], parts))[1][0]
  zeros = (optim.zeros_like_params(rest), jax.tree.map(jnp.zeros_like, probe),
           None if in_layers is None else optim.zeros_like_params(in_layers)["moe_layers"],
           jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero_sums))
  (rest_grads, probe_grads, acc, sums), _ = jax.lax.scan(accumulate, zeros, parts)
  grads = rest_grads if acc is None else nnx.merge_state(
      rest_grads, nnx.State({"moe_layers": acc}))
  return sums, grads, probe_grads


def expert_update_masks(method_cfg: MethodConfig, des, domain_tokens) -> dict:
  """The per-expert update masks of this step (`optim.mask_experts`): {"experts": [L, E],
  "expert_copies": [L, C] with duplicated experts}; 1 = updated. An expert is updated when a
  domain whose mask holds it has tokens in the batch (DES-MoE); every expert otherwise."""
  mask = des.expert_mask[...]                                            # [L, D, E]
  update_mask = {"experts": jnp.ones((mask.shape[0], mask.shape[2]), jnp.float32)}
  if method_cfg.apply_masks:
    update_mask["experts"] = specialization.expert_update_mask(mask, domain_tokens)
  if des.expert_copies is not None:
    copies = des.expert_copies
    update_mask["expert_copies"] = specialization.copies_update_mask(
        copies.owner[...], copies.origin[...], mask, domain_tokens)
  return update_mask


def dges_update(method_cfg: MethodConfig, phase: int, des, sums: dict, step, skipped=None):
  """DGES (docs/METHOD.md section 2): (new correlation [L, D, E], new masks [L, D, E]). The
  correlation follows this step's routing; the masks are refreshed from it every
  `dges.update_every` steps of a phase that refreshes them, and at the end of warm-up (phase II
  starts with masks: MethodConfig.warmup_end). `skipped` (train.skip_nonfinite_updates): a
  skipped step leaves both as they were."""
  cfg = method_cfg
  corr, mask = des.correlation[...], des.expert_mask[...]
  new_corr = specialization.update_correlation(corr, sums["domain_counts"],
                                               sums["domain_tokens"], cfg.dges.momentum)
  new_mask = mask
  if cfg.refresh_masks(phase):
    due = (step + 1) % cfg.dges.update_every == 0
    warmup_end = cfg.warmup_end() if phase == WARMUP else None
    if warmup_end is not None:
      due = due | (step + 1 == warmup_end)
    new_mask = jnp.where(due, des.allowed(specialization.mask_from_correlation(
        new_corr, cfg.dges.phi, cfg.dges.score)), mask)
  if skipped is not None:
    new_corr = jnp.where(skipped, corr, new_corr)
    new_mask = jnp.where(skipped, mask, new_mask)
  return new_corr, new_mask


def step_metrics(method_cfg: MethodConfig, sums: dict, grads, lam, new_mask, update_mask,
                 learning_rate, phase: int) -> dict:
  """The step's metrics (one record of metrics.jsonl), all of the whole batch."""
  overlap = specialization.mask_overlap(new_mask)
  d = method_cfg.num_domains
  return {
      "loss": sums["loss"],
      "total_loss": sums["total_loss"],
      "kd_loss": sums["kd_loss"],
      "lambda": lam,
      "balance_loss": sums["balance_loss"],
      "grad_norm": optax.tree.norm(grads),
      "domain_loss": sums["domain_loss"] / jnp.maximum(sums["domain_targets"], 1.0),  # [D]
      "domain_tokens": sums["domain_targets"],                         # [D] target tokens
      "mask_density": new_mask.mean(),
      "expert_overlap": (overlap.sum() - jnp.trace(overlap)) / max(d * (d - 1), 1),
      "overlap_matrix": overlap,
      "experts_updated": update_mask["experts"].mean(),
      "learning_rate": learning_rate,
      "phase": jnp.asarray(phase, jnp.int32),
  }


def make_train_step(graphdef, method_cfg: MethodConfig, optim_cfg: optim.OptimConfig,
                    phase: int, step_cfg: StepConfig = StepConfig()):
  """The step of `phase`, to be jitted once (`graphdef` from `nnx.split(model)`):
  `step_fn(model_state, opt_state, batch, step, learning_rate=None)`. `learning_rate`, the
  peak rate as a float32 scalar, is an input of the program, so runs that differ only in their
  rate (a sweep, the frontier's grids, each seed) compile it once and share it through JAX's
  compilation cache; None bakes `optim_cfg.learning_rate` in as a constant."""
  cfg = method_cfg
  update = optim.make_update(cfg, optim_cfg, phase)
  trainable = optim.trainable_filter(cfg.trainable(phase))
  # alr.mix="update" while the router trains: L_KD reaches a probe, not the router parameters.
  probed = optim.mixes_updates(cfg) and "router" in cfg.trainable(phase)
  if optim_cfg.master_weights != (step_cfg.precision == "bf16_master"):
    raise ValueError(f"train.precision={step_cfg.precision!r} with optim master_weights="
                     f"{optim_cfg.master_weights}: the master copy exists for bf16_master only "
                     "(run_config.optim_config sets it from train.precision)")

  def step_fn(model_state, opt_state, batch, step, learning_rate=None):
    params, state = nnx.split_state(model_state, nnx.Param, ...)
    check_precision(params, step_cfg.precision)
    whole = step_inputs(batch)
    lam = cfg.kd_lambda(step) if cfg.use_alr else jnp.zeros((), jnp.float32)
    diff, frozen = nnx.split_state(params, trainable, ...)
    probe = kd_probe_zeros(nnx.merge(graphdef, model_state)) if probed else None
    ctx = LossContext(graphdef, cfg, frozen, state, lam, step_cfg.microbatches,
                      rows=whole["tokens"].shape[0],
                      n_targets=jnp.maximum(whole["loss_mask"].sum(), 1.0),
                      n_real=jnp.maximum((whole["segment_ids"] != 0).sum(), 1).astype(
                          jnp.float32), seed=step_cfg.seed, step=step)
    sums, grads, probe_grads = accumulate_gradients(
        functools.partial(microbatch_loss, ctx), diff, probe, whole, step_cfg.microbatches)
    # The DES-MoE state, reached through the model's interface (model.moe_blocks().des).
    des = specialization.des_state(nnx.merge(graphdef, model_state))
    update_mask = expert_update_masks(cfg, des, sums["domain_tokens"])
    key = rounding_key(step_cfg.seed, step) if step_cfg.precision == "bf16_sr" else None
    new_params, new_opt_state = update(params, frozen, grads, opt_state, step=step,
                                       update_mask=update_mask, key=key,
                                       probe_grads=None if probe is None else probe_grads,
                                       learning_rate=learning_rate)
    skipped = optim.update_skipped(new_opt_state, optim_cfg)
    new_corr, new_mask = dges_update(cfg, phase, des, sums, step,
                                     skipped if optim_cfg.skip_nonfinite_updates else None)
    new_model = nnx.merge(graphdef, new_params, state)
    new_des = specialization.des_state(new_model)
    new_des.correlation[...] = new_corr
    new_des.expert_mask[...] = new_mask
    lr = optim.learning_rate_schedule(optim_cfg, cfg.total_steps, learning_rate)(step)
    metrics = step_metrics(cfg, sums, grads, lam, new_mask, update_mask, lr, phase)
    if optim_cfg.skip_nonfinite_updates:
      metrics["update_skipped"] = skipped
      metrics["skipped_updates"] = new_opt_state.total_notfinite   # over the whole run
    return nnx.state(new_model), new_opt_state, metrics

  return step_fn


def rounding_key(seed: int, step):
  """The stochastic-rounding key of `step`: a function of (seed, step) only, so a step gives the
  same bits whenever it runs (a resumed run repeats the original exactly)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def check_precision(params, precision: str):
  """Fails at trace time, naming the fields, when the stored dtypes contradict `precision`."""
  dtypes = {jnp.dtype(v.dtype).name for _, v in nnx.to_flat_state(params)}
  if precision == "fp32_master" and dtypes != {"float32"}:
    raise ValueError(f"train.precision='fp32_master' keeps float32 parameters, these are "
                     f"{sorted(dtypes)}: set model.param_dtype=float32 (computation follows "
                     "model.dtype), or train.precision=bf16_sr for bfloat16 parameters")
  bf16 = precision in ("bf16_sr", "bf16_master")
  if bf16 and dtypes - {"float32", "bfloat16"}:
    raise ValueError(f"train.precision={precision!r} keeps bfloat16 weights, the parameters are "
                     f"{sorted(dtypes)}: set model.param_dtype=bfloat16")
  if bf16 and "bfloat16" not in dtypes:
    raise ValueError(f"train.precision={precision!r} with float32 parameters has nothing to "
                     "round: set model.param_dtype=bfloat16, or train.precision=fp32_master")
