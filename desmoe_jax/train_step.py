"""One train step shared by every method:
    (model_state, opt_state, batch, step) -> (new model_state, new opt_state, metrics).

`make_train_step(graphdef, method_cfg, optim_cfg, phase, step_cfg)` returns a pure function to
jit once per phase (the phase decides which parameter groups are differentiated at all: frozen
groups get no weight-gradient computation, which is where much of DES-MoE's speed comes from).
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

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from desmoe_jax import losses, optim, specialization
from desmoe_jax import sharding as sharding_lib
from desmoe_jax.methods import MethodConfig
from desmoe_jax.moe.block import Adaptation
from desmoe_jax.router import attach_kd_probe, kd_probe_zeros
from desmoe_jax.schedule import WARMUP

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
  microbatches: int = 1
  precision: str = "fp32_master"
  seed: int = 0

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


def phase_optimizer(method_cfg: MethodConfig, optim_cfg: optim.OptimConfig, phase: int,
                    norm_given: bool = False):
  """The optax transform of `phase`. Every phase's shares one state structure, so the state
  made by `init_optimizer` (any phase) serves them all. With `skip_nonfinite_updates`, the
  whole transform is wrapped in `optim.apply_if_finite_given` (optax.apply_if_finite's state,
  which says whether the last update was skipped; `update(..., all_finite=)`, see
  `finiteness`). `norm_given`: see optim.build_optimizer."""
  tx = optim.build_optimizer(optim_cfg, method_cfg.total_steps, method_cfg.trainable(phase),
                             method_cfg.trainable_ever(),
                             router_kd_lambda=method_cfg.kd_lambda if mixes_updates(method_cfg)
                             else None, norm_given=norm_given)
  if optim_cfg.skip_nonfinite_updates:
    tx = optim.apply_if_finite_given(tx, optim_cfg.skip_nonfinite_updates)
  return tx


def mixes_updates(method_cfg: MethodConfig) -> bool:
  """`alr.mix="update"` on a method with the ALR: the router's task and KD gradients are kept
  apart (router.attach_kd_probe) and mixed after Adam (optim.mix_updates)."""
  return method_cfg.use_alr and method_cfg.alr.mix == "update"


def router_kd_grads(full_grads, probe_grads: dict):
  """A tree like the gradients holding the router parameters' KD gradients (by parameter name,
  from the probe) and zeros elsewhere (masked away before any transform reads them)."""
  def kd(path, g):
    if optim.label_of(g) != "router":
      return jax.tree.map(jnp.zeros_like, g)
    return g.replace(probe_grads[str(optim._key(path[-1]))].astype(g.dtype))

  return jax.tree_util.tree_map_with_path(kd, full_grads,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def finiteness(grads, opt_state) -> dict:
  """The `all_finite=` extra argument of `optim.apply_if_finite_given` (with
  `optim.skip_nonfinite_updates`; else no argument): whether every gradient is finite."""
  if not isinstance(opt_state, optax.ApplyIfFiniteState):
    return {}
  return {"all_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                           for g in jax.tree.leaves(grads)]))}


def update_skipped(opt_state, optim_cfg: optim.OptimConfig):
  """Whether `apply_if_finite` skipped the update that produced `opt_state` (False if off)."""
  if not optim_cfg.skip_nonfinite_updates:
    return jnp.asarray(False)
  finite, count = opt_state.last_finite, opt_state.notfinite_count
  if optim_cfg.host_offload:  # the state is in host memory
    finite, count = jax.device_put((finite, count), jax.memory.Space.Device)
  return ~finite & (count <= optim_cfg.skip_nonfinite_updates)


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
  shardings = sharding_lib.state_shardings(abstract, mesh, rules)
  if optim_cfg.host_offload:
    check_host_offload(mesh)
    shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings,
                             is_leaf=lambda x: isinstance(x, NamedSharding))
  return shardings


def check_host_offload(mesh):
  """optim.host_offload keeps the optimizer state in each device's host memory (the memory kind
  `pinned_host`, as MaxText's optimizer_memory_host_offload); fails, naming the field, on a
  backend whose devices have none."""
  device = mesh.devices.flat[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception as e:  # a compile-only (topology) device may not list its memories
    kinds = {"unknown: " + type(e).__name__}
  if "pinned_host" not in kinds:
    raise ValueError(f"optim.host_offload=True needs host memory (memory kind 'pinned_host') on "
                     f"the devices; {device.platform} device {device} has {sorted(kinds)}: set "
                     "optim.host_offload=False")


def jit_train_step(graphdef, method_cfg: MethodConfig, optim_cfg: optim.OptimConfig, phase: int,
                   state_shardings, opt_shardings, batch_shardings,
                   step_cfg: StepConfig = StepConfig()):
  """`make_train_step(...)` under `jax.jit` with its layout pinned: model and optimizer state
  keep their shardings from step to step (and are donated: updated in place), the batch is
  split as `batch_shardings` says, metrics come back replicated. The trainer runs this, and
  `scripts/memory_plan.py` compiles this, ahead of time."""
  mesh = jax.tree.leaves(batch_shardings)[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(make_train_step(graphdef, method_cfg, optim_cfg, phase, step_cfg),
                 in_shardings=(state_shardings, opt_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, opt_shardings, replicated),
                 donate_argnums=(0, 1))


def _zeros_like_params(params):
  """Zeros shaped and laid out like `params` (each split as its logical axes say). A bare
  zeros_like has no layout of its own, and the partitioner, blocked by the host-offload
  barrier, made them whole on every device: measured on the TPU compiler for V2-Lite's DES-MoE
  warm-up (frozen routed experts), [26, 64, 2048, 1408] zeros of 8.9 GiB per chip."""
  def zeros(var):
    if not isinstance(var, nnx.Variable):
      return jnp.zeros_like(var)
    value = jnp.zeros(var.shape, var.dtype)
    axes = var.get_metadata().get("logical_axes")
    return var.replace(value if axes is None else sharding_lib.constrain(value, axes))

  return jax.tree.map(zeros, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


STACK = "moe_layers"   # the model's stacked layers (model.MoECausalLM): one leading [L] axis


def _names(path) -> list:
  return [optim._key(p) for p in path]


def _update_streamed(tx, params, grads, opt_state, step, update_mask, key, trained_labels,
                     probe_grads=None):
  """(new params, new optimizer state) with `optim.host_offload`: the optimizer state stays in
  host memory and is streamed through the device one stacked layer at a time.

  The update is `tx.update` + `apply_updates`, run twice on views of the trees: once on the
  leaves outside the stacked layers (embeddings, LM head, dense layers: their state is copied
  in whole, small), then in a `lax.scan` over the L stacked layers on the [1, ...] slice of
  every stacked leaf: each layer's moments are read from host memory, updated on the device and
  written back (`dynamic_update_slice` into the host buffer, as remat offload does), so one
  layer's state is on the device at a time. Leaves absent from a view are zero-size ([0, ...]),
  so the transform chain, its masks and its per-leaf stochastic-rounding bits (offset by the
  layer: `apply_updates(row_offset=)`) are those of the whole-tree update, leaf for leaf.
  Groups frozen in this phase are in neither view: their weights and state are not touched.
  `probe_grads` (alr.mix="update"): the router's KD gradients, viewed like the gradients.

  Why not update on the host (`compute_on("device_host")`, tried): the TPU compiler passes host
  computations untiled arrays, so every stacked leaf sent there (the routed experts' gradients
  and weights, 1.12 GiB each per v5e chip for V2-Lite) was re-laid-out on the device first,
  through two device buffers of its size, and the result counted against HBM (stabilization of
  the v5e-8 preset: 18.19 GiB of temporaries; docs/SCALING.md). Everything that reduces over
  all gradients (the clip's global norm) is computed once, before."""
  host, device = jax.memory.Space.Host, jax.memory.Space.Device
  grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
  given = finiteness(grads, opt_state)
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  s_flat, s_def = jax.tree_util.tree_flatten_with_path(opt_state)
  g_by_path = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  kd_by_path = None if probe_grads is None else dict(
      jax.tree_util.tree_flatten_with_path(router_kd_grads(grads, probe_grads))[0])
  stacked = [x.shape[0] for path, x in p_flat if STACK in _names(path) and x.ndim]
  num_layers = stacked[0] if stacked else 0

  def kind(path, x, of_state):
    """"stack" (a leaf of the stacked layers), "flat" (any other trained leaf) or "skip"."""
    names = _names(path)
    if of_state:
      i = names.index("inner_states") if "inner_states" in names else -1
      if i >= 0 and i + 1 < len(names) and names[i + 1] not in trained_labels:
        return "skip"
    elif path not in g_by_path:
      return "skip"
    ndim = getattr(x, "ndim", 0)
    return "stack" if STACK in names and ndim and x.shape[0] == num_layers else "flat"

  p_kind = [kind(path, x, False) for path, x in p_flat]
  s_kind = [kind(path, x, True) for path, x in s_flat]
  empty = lambda x: jnp.zeros((0,) + x.shape[1:], x.dtype) if x.ndim else x

  def view(x, k, layer):
    """x as the pass `layer` sees it: the flat pass (None) its flat leaves whole, a layer's
    pass the [1, ...] slice of its stacked leaves; everything else zero-size."""
    if layer is None:
      return x if k == "flat" else empty(x)
    return jax.lax.dynamic_slice_in_dim(x, layer, 1, 0) if k == "stack" else empty(x)

  def to_device(x):
    return jax.device_put(x, device) if jax.typeof(x).memory_space == host else x

  def run(p_leaves, s_leaves, layer):
    """tx.update + apply_updates on the view of one pass: (new params, new state) leaves."""
    p = [view(x, k, layer) for x, k in zip(p_leaves, p_kind)]
    like_grads = lambda by_path: p_def.unflatten(
        [view(by_path[path], k, layer) if k != "skip" else empty(x)
         for (path, x), k in zip(p_flat, p_kind)])
    g = like_grads(g_by_path)
    extra = {} if kd_by_path is None else {"router_kd_grads": like_grads(kd_by_path)}
    s = [to_device(view(x, k, layer)) for x, k in zip(s_leaves, s_kind)]
    mask = {name: (m[:0] if layer is None else jax.lax.dynamic_slice_in_dim(m, layer, 1, 0))
            for name, m in update_mask.items()}
    p, s = p_def.unflatten(p), s_def.unflatten(s)
    updates, new_s = tx.update(g, s, p, step=step, expert_update_mask=mask, grad_norm=grad_norm,
                               **given, **extra)
    new_p = optim.apply_updates(p, updates, key, row_offset=0 if layer is None else layer)
    return jax.tree.leaves(new_p), jax.tree.leaves(new_s)

  p_leaves = [x for _, x in p_flat]
  s_leaves = [x for _, x in s_flat]
  flat_p, flat_s = run(p_leaves, s_leaves, None)
  pick = lambda leaves, kinds, k: [x for x, kk in zip(leaves, kinds) if kk == k]

  def put(leaves, kinds, stack):
    """Full leaf list from the stacked leaves `stack` (in order) and the others unchanged."""
    it = iter(stack)
    return [next(it) if k == "stack" else x for x, k in zip(leaves, kinds)]

  def layer_step(carry, layer):
    p_stack, s_stack = carry
    new_p, new_s = run(put(p_leaves, p_kind, p_stack), put(s_leaves, s_kind, s_stack), layer)
    p_stack = [jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), layer, 0)
               for x, y in zip(p_stack, pick(new_p, p_kind, "stack"))]
    s_stack = [jax.lax.dynamic_update_slice_in_dim(
        x, jax.device_put(y.astype(x.dtype), jax.typeof(x).memory_space), layer, 0)
        for x, y in zip(s_stack, pick(new_s, s_kind, "stack"))]
    return (p_stack, s_stack), None

  p_stack, s_stack = pick(p_leaves, p_kind, "stack"), pick(s_leaves, s_kind, "stack")
  # Stacked vectors ([L, n]: norms, biases, per-expert counts) cross to the device whole: small,
  # and one row of a bfloat16 one cannot be sliced out of host memory (the TPU compiler slices
  # sublanes in pairs there: "Sublane slicing size must be multiple of element packing factor").
  s_stack = [to_device(x) if x.ndim <= 2 else x for x in s_stack]
  if num_layers and (p_stack or s_stack):
    (p_stack, s_stack), _ = jax.lax.scan(layer_step, (p_stack, s_stack),
                                         jnp.arange(num_layers))

  def merge(old, kinds, flat, stack):
    it = iter(stack)
    out = []
    for x, k, f in zip(old, kinds, flat):
      new = x if k == "skip" else next(it) if k == "stack" else f
      if new is not x and jax.typeof(x).memory_space == host:
        new = jax.device_put(new, host)
      out.append(new)
    return out

  new_params = p_def.unflatten(merge(p_leaves, p_kind, flat_p, p_stack))
  new_state = s_def.unflatten(merge(s_leaves, s_kind, flat_s, s_stack))
  return new_params, new_state


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


def make_train_step(graphdef, method_cfg: MethodConfig, optim_cfg: optim.OptimConfig,
                    phase: int, step_cfg: StepConfig = StepConfig()):
  """The step of `phase`, to be jitted once (`graphdef` from `nnx.split(model)`)."""
  cfg = method_cfg
  tx = phase_optimizer(method_cfg, optim_cfg, phase)
  # optim.host_offload's streamed update sees a layer at a time: the clip's norm is given.
  streamed_tx = (phase_optimizer(method_cfg, optim_cfg, phase, norm_given=True)
                 if optim_cfg.host_offload else None)
  lr_schedule = optim.learning_rate_schedule(optim_cfg, cfg.total_steps)
  trainable = optim.trainable_filter(cfg.trainable(phase))
  refresh = cfg.refresh_masks(phase)
  warmup_end = cfg.warmup_end() if phase == WARMUP else None
  # alr.mix="update" while the router trains: L_KD reaches a probe, not the router parameters.
  probed = mixes_updates(cfg) and "router" in cfg.trainable(phase)
  n_micro = step_cfg.microbatches
  if optim_cfg.master_weights != (step_cfg.precision == "bf16_master"):
    raise ValueError(f"train.precision={step_cfg.precision!r} with optim master_weights="
                     f"{optim_cfg.master_weights}: the master copy exists for bf16_master only "
                     "(trainer.optim_config sets it from train.precision)")

  def step_fn(model_state, opt_state, batch, step):
    params, state = nnx.split_state(model_state, nnx.Param, ...)
    check_precision(params, step_cfg.precision)
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
    # Whole-batch normalisers: every microbatch's loss is its share of the whole batch's loss,
    # so the microbatch losses (and gradients) SUM to the whole batch's.
    n_targets = jnp.maximum(loss_mask.sum(), 1.0)              # task loss: mean over targets
    n_real = jnp.maximum((segment_ids != 0).sum(), 1).astype(jnp.float32)  # KD: over real tokens
    rows = tokens.shape[0]

    lam = cfg.kd_lambda(step) if cfg.use_alr else jnp.zeros((), jnp.float32)
    convex = cfg.use_alr and cfg.alr.loss == "convex"
    diff, frozen = nnx.split_state(params, trainable, ...)
    probe = kd_probe_zeros(nnx.merge(graphdef, model_state)) if probed else None

    def loss_fn(diff_and_probe, mb, acc=None, held=()):
      """(share of the whole batch's objective, (sums, acc)) of one microbatch `mb` ([b, S]
      each). The objective is the total loss, except under alr.mix="update", where L_KD enters
      with weight 1 and reaches the probe only: the probe's gradient is the router's KD
      gradient, and the router's own gradient is its task gradient. `acc`: the running gradient
      sum of the trained MoE-layer parameters `held` (given here without gradient), passed to
      the model (`grad_acc`) and returned."""
      diff, probe = diff_and_probe
      model = nnx.merge(graphdef, diff, *held, frozen, state)
      if probe is not None:
        attach_kd_probe(model, probe)
      mcfg = model.config
      if n_micro > 1 and (mcfg.balance_loss == "switch"
                          or (mcfg.balance_loss == "deepseek" and not mcfg.seq_aux)):
        raise ValueError(f"train.microbatches={n_micro}: the model's batch-level balance loss "
                         f"({mcfg.model_type}: balance_loss={mcfg.balance_loss!r}, seq_aux="
                         f"{mcfg.seq_aux}) is not a sum over sequences and cannot be "
                         "accumulated exactly; use train.microbatches=1")
      adapt = Adaptation(domain_bs=mb["domain_bs"], isolate=cfg.apply_masks,
                         router_grad_scale=(1.0 - lam) if convex and probe is None else None)
      out = model(mb["tokens"], segment_ids_bs=mb["segment_ids"], positions_bs=mb["positions"],
                  adapt=adapt, logits=not model.config.runtime.ce_chunk, grad_acc=acc)
      nll = model.token_losses(out, mb["tokens"])  # model.ce_chunk: no [b, S, V] logits
      # The balance loss is a mean over sequences (seq_aux), the KD loss a mean over real
      # tokens: weighted by this microbatch's share of each, they sum to the whole batch's.
      balance = out.aux_loss * (mb["tokens"].shape[0] / rows)
      kd = (out.kd_loss * (mb["segment_ids"] != 0).sum() / n_real if cfg.use_alr
            else jnp.zeros((), jnp.float32))
      task = jnp.sum(nll * mb["loss_mask"]) / n_targets
      total = task + (balance if cfg.balance_loss else 0.0)
      objective = total + kd if probe is not None else None
      if cfg.use_alr:
        total = total + (lam if convex else cfg.alr.beta * lam) * kd
      domain_loss, domain_targets = per_domain(nll, mb["loss_mask"], mb["domain_bs"],
                                               cfg.num_domains)
      sums = {"loss": task, "total_loss": total, "kd_loss": kd, "balance_loss": balance,
              "domain_loss": domain_loss, "domain_targets": domain_targets,
              "domain_counts": out.domain_counts, "domain_tokens": out.domain_tokens}
      return (total if objective is None else objective), (sums, out.grad_acc)

    whole = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
             "loss_mask": loss_mask, "domain_bs": domain_bs}
    if n_micro == 1:
      (_, (sums, _)), (grads, probe_grads) = jax.value_and_grad(loss_fn, has_aux=True)(
          (diff, probe), whole)
    else:
      # The trained MoE-layer parameters (stacked [L, ...]: nearly all of an MoE model's
      # weights) accumulate in place inside the layer loop's backward (model `grad_acc`): one
      # gradient-sized buffer for them. The others sum microbatch gradients as usual.
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

      parts = {k: microbatched(v, n_micro) for k, v in whole.items()}
      zero_sums = jax.eval_shape(loss_fn, (diff, probe),
                                 jax.tree.map(lambda x: x[0], parts))[1][0]
      zeros = (_zeros_like_params(rest), jax.tree.map(jnp.zeros_like, probe),
               None if in_layers is None else _zeros_like_params(in_layers)["moe_layers"],
               jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero_sums))
      (rest_grads, probe_grads, acc, sums), _ = jax.lax.scan(accumulate, zeros, parts)
      grads = rest_grads if acc is None else nnx.merge_state(
          rest_grads, nnx.State({"moe_layers": acc}))
    # The DES-MoE state, reached through the model's interface (model.moe_blocks().des).
    des = specialization.des_state(nnx.merge(graphdef, model_state))
    mask = des.expert_mask[...]                                            # [L, D, E]
    domain_tokens = sums["domain_tokens"]                                  # [D] whole batch
    update_mask = {"experts": jnp.ones((mask.shape[0], mask.shape[2]), jnp.float32)}
    if cfg.apply_masks:
      update_mask["experts"] = specialization.expert_update_mask(mask, domain_tokens)
    if des.expert_copies is not None:
      copies = des.expert_copies
      update_mask["expert_copies"] = specialization.copies_update_mask(
          copies.owner[...], copies.origin[...], mask, domain_tokens)
    key = rounding_key(step_cfg.seed, step) if step_cfg.precision == "bf16_sr" else None
    if optim_cfg.host_offload:
      new_params, new_opt_state = _update_streamed(streamed_tx, params, grads, opt_state, step,
                                                   update_mask, key, cfg.trainable(phase),
                                                   None if probe is None else probe_grads)
    else:
      # Groups frozen in this phase were not differentiated: zeros keep the optimizer's tree.
      full_grads = nnx.merge_state(_zeros_like_params(frozen), grads)
      extra = ({} if probe is None
               else {"router_kd_grads": router_kd_grads(full_grads, probe_grads)})
      updates, new_opt_state = tx.update(full_grads, opt_state, params, step=step,
                                         expert_update_mask=update_mask, **extra,
                                         **finiteness(grads, opt_state))
      new_params = optim.apply_updates(params, updates, key)

    # DGES: correlation from this step's routing; masks refreshed every T_update steps.
    corr = des.correlation[...]
    new_corr = specialization.update_correlation(corr, sums["domain_counts"], domain_tokens,
                                                 cfg.dges.momentum)
    new_mask = mask
    if refresh:
      due = (step + 1) % cfg.dges.update_every == 0
      if warmup_end is not None:   # phase II starts with masks (MethodConfig.warmup_end)
        due = due | (step + 1 == warmup_end)
      new_mask = jnp.where(due, des.allowed(specialization.mask_from_correlation(
          new_corr, cfg.dges.phi, cfg.dges.score)), mask)
    skipped = update_skipped(new_opt_state, optim_cfg)
    if optim_cfg.skip_nonfinite_updates:  # a skipped step leaves the routing statistics too
      new_corr = jnp.where(skipped, corr, new_corr)
      new_mask = jnp.where(skipped, mask, new_mask)
    new_model = nnx.merge(graphdef, new_params, state)
    new_des = specialization.des_state(new_model)
    new_des.correlation[...] = new_corr
    new_des.expert_mask[...] = new_mask

    overlap = specialization.mask_overlap(new_mask)
    d = cfg.num_domains
    metrics = {
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
        "learning_rate": lr_schedule(step),
        "phase": jnp.asarray(phase, jnp.int32),
    }
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
