"""The training run behind `train.py`: config -> mesh, model, data, method, phases, logs,
checkpoints, evaluations, and the final Hugging Face export. Notebooks call `train()` directly.

Work directory layout:
  config.json            the resolved config
  checkpoints/<step>/    orbax: model state, optimizer state, meta (data position, RNG, phase)
  metrics.jsonl          one JSON record per logged step / evaluation
  tb/                    TensorBoard event files
  plots/                 correlation and mask-overlap heatmaps (PNG) at every evaluation
  eval/                  evaluation results (JSON)
  hf/                    the adapted model in the HF DeepSeek-V2 layout, with its tokenizer

In a multi-process run every process calls `train` (desmoe_jax/distributed.py); process 0 alone
writes the files above, and all of them write the checkpoints, through orbax.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax import checkpoint as ckpt_lib
from desmoe_jax import data as data_lib
from desmoe_jax import distributed
from desmoe_jax import esft as esft_lib
from desmoe_jax import sharding as sharding_lib
from desmoe_jax import specialization
from desmoe_jax import train_step as ts
from desmoe_jax.convert import from_pretrained
from desmoe_jax.esft import EsftConfig
from desmoe_jax.methods import UNSCHEDULED, MethodConfig, prepare_model
from desmoe_jax.optim import OptimConfig
from desmoe_jax.router import AlrConfig
from desmoe_jax.schedule import PHASE_NAMES, ScheduleConfig
from desmoe_jax.specialization import DgesConfig

log = logging.getLogger("desmoe_jax")

PAPER_LR = {"fft": 3e-5, "esft_token": 1e-5, "esft_gate": 1e-5}  # others: 1e-4 (METHOD.md)


class TrainingDiverged(RuntimeError):
  """A non-finite loss; the last checkpoint written before it is intact."""


# ------------------------------------------------------------------ config -> library objects


def method_config(config) -> MethodConfig:
  return MethodConfig(
      method=config.method, num_domains=len(config.data.domains), total_steps=config.train.steps,
      alr=AlrConfig(**config.alr.to_dict()), dges=DgesConfig(**config.dges.to_dict()),
      schedule=ScheduleConfig(**config.schedule.to_dict()),
      esft=EsftConfig(**dict(config.esft.to_dict(),
                             top_p=None if config.esft.top_p < 0 else config.esft.top_p)),
      linear_router_trainable=config.ablation.linear_router_trainable,
      balance_loss=config.ablation.balance_loss)


def optim_config(config) -> OptimConfig:
  kw = config.optim.to_dict()
  if kw["learning_rate"] < 0:
    kw["learning_rate"] = PAPER_LR.get(config.method, 1e-4)
  return OptimConfig(**kw)


def check_config(config):
  """Fails before anything heavy happens, naming the field to set."""
  if not config.model.path:
    raise ValueError("config.model.path is empty: set --config.model.path=/path/to/"
                     "DeepSeek-V2-Lite (a Hugging Face directory with config.json, safetensors "
                     "and tokenizer), or use the embedded model with --config=configs/"
                     "six_domains.py:tiny")
  if not os.path.isdir(config.model.path):
    raise FileNotFoundError(f"config.model.path={config.model.path!r} is not a directory")
  if not config.data.domains:
    raise ValueError("config.data.domains is empty: give at least one domain")
  for i, d in enumerate(config.data.domains):
    if not d.train:
      raise ValueError(f"config.data.domains[{i}] ({d.name!r}) has no train path")
  if config.train.steps < 1:
    raise ValueError(f"config.train.steps={config.train.steps} must be >= 1")
  if config.export.enabled:
    for field in ("fold_tokens", "check_tokens"):
      value = config.export.get(field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.export.{field}={value!r}: expected a positive number of "
                         "held-out tokens")


def domain_specs(config, split: str = "train") -> list:
  return [data_lib.DomainSpec(name=d.name, path=getattr(d, split), format=d.format,
                              weight=d.weight,
                              max_bad_fraction=config.data.get("max_bad_fraction", 0.1))
          for d in config.data.domains]


# ------------------------------------------------------------------ logging


class MetricsLog:
  """JSON lines + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, record: dict[str, Any], domain_names=()):
    if not self.enabled:
      return
    record = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key == "step":
        continue
      if isinstance(value, list) and len(value) == len(domain_names) and domain_names:
        for name, v in zip(domain_names, value):
          if isinstance(v, (int, float)):
            self._tb.add_scalar(f"{key}/{name}", v, step)
      elif isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def _jsonable(v):
  v = np.asarray(v) if isinstance(v, (jax.Array, np.ndarray, np.generic)) else v
  if isinstance(v, np.ndarray):
    v = v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def heatmap_paths(workdir: str, step: int) -> dict[str, str]:
  """The PNGs drawn at the evaluation of `step`: {"correlation": path, "overlap": path}."""
  prefix = os.path.join(workdir, "plots", f"step{step:06d}")
  return {"correlation": prefix + "_correlation.png", "overlap": prefix + "_overlap.png"}


def save_heatmaps(des, domain_names, paths: dict[str, str], max_layers: int):
  """PNG heatmaps (`heatmap_paths`): domain x expert correlation (a few MoE layers) and domain
  mask overlap.

  Every process of a multi-process run must call it (the matrices are gathered); process 0
  draws and writes them."""
  corr, mask = distributed.to_host((des.correlation[...], des.expert_mask[...]))  # [L,D,E]
  if jax.process_index() != 0:
    return
  for path in paths.values():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from desmoe_jax.specialization import mask_overlap

  layers = np.unique(np.linspace(0, corr.shape[0] - 1, min(max_layers, corr.shape[0])).astype(int))
  fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, corr.shape[2] * 0.18),
                                                    1.2 + 0.35 * corr.shape[1] * len(layers)),
                           squeeze=False)
  for ax, layer in zip(axes[:, 0], layers):
    im = ax.imshow(corr[layer], aspect="auto", cmap="viridis")
    ys, xs = np.nonzero(mask[layer] > 0)
    ax.scatter(xs, ys, s=4, c="white", marker="s", linewidths=0)
    ax.set_yticks(range(len(domain_names)), domain_names, fontsize=7)
    ax.set_title(f"MoE layer {layer}: correlation A (dots: mask M)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.02)
  axes[-1, 0].set_xlabel("routed expert")
  fig.tight_layout()
  fig.savefig(paths["correlation"], dpi=110)
  plt.close(fig)

  overlap = np.asarray(mask_overlap(jnp.asarray(mask)))
  fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(domain_names),) * 2)
  im = ax.imshow(overlap, vmin=0, vmax=1, cmap="magma")
  ax.set_xticks(range(len(domain_names)), domain_names, rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(len(domain_names)), domain_names, fontsize=7)
  for i in range(len(domain_names)):
    for j in range(len(domain_names)):
      ax.text(j, i, f"{overlap[i, j]:.2f}", ha="center", va="center", fontsize=6,
              color="white" if overlap[i, j] < 0.6 else "black")
  ax.set_title("expert mask overlap (Jaccard, mean over layers)", fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(paths["overlap"], dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------ evaluation during training


@functools.lru_cache(maxsize=8)
def _loss_sums_fn(graphdef):
  """The jitted held-out loss of one model structure. Cached so that every evaluation of a run
  reuses one compiled program (jax.jit caches by shapes per function object, and a function
  defined inside `heldout_losses` was a new object, so a new compile, at every evaluation)."""

  @jax.jit
  def loss_sums(state, batch):
    out = nnx.merge(graphdef, state)(batch["tokens"], segment_ids_bs=batch["segment_ids"],
                                     positions_bs=batch["positions"])
    nll = ts.token_losses(out.logits, batch["tokens"])
    w = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)

  return loss_sums


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


# ------------------------------------------------------------------ the run


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the training described by `config` in `workdir`; returns a summary."""
  check_config(config)
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  with jax.set_mesh(mesh):  # read by expert_parallel="shard_map" and sharding.constrain
    return _train(config, workdir, mesh)


def _train(config, workdir: str, mesh) -> dict:
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mc, oc = method_config(config), optim_config(config)
  log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
  model = from_pretrained(
      config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
      mesh=mesh, moe_impl=config.model.moe_impl, attention_impl=config.model.attention_impl,
      remat=config.model.remat, scan_layers=config.model.scan_layers,
      expert_parallel=config.model.expert_parallel)
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(config.model.path)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(f"tokenizer in {config.model.path} has {tokenizer.vocab_size} tokens, the "
                     f"model's vocab_size is {model.config.vocab_size}")

  train_specs = domain_specs(config, "train")
  train_iter = data_lib.MixtureIterator(train_specs, tokenizer, seq_len=config.data.seq_len,
                                        batch_size=config.data.batch_size, seed=config.seed)
  names = [d.name for d in config.data.domains]

  batch_sharding = sharding_lib.batch_sharding(mesh)
  place = functools.partial(distributed.global_array, sharding=batch_sharding)

  prepare_model(model, mc, seed=config.seed)
  if mc.is_esft:
    per_domain = {i: data_lib.MixtureIterator([s], tokenizer, seq_len=config.data.seq_len,
                                              batch_size=config.data.batch_size, seed=config.seed)
                  for i, s in enumerate(train_specs)}
    masks = esft_lib.esft_masks(model, per_domain, mc.esft_score, mc.esft, mc.num_domains,
                                place=place)
    specialization.des_state(model).expert_mask[...] = jnp.asarray(masks)
    log.info("ESFT-%s selected %.1f%% of routed experts", mc.esft_score, 100 * masks.mean())
  sharding_lib.shard_model(model, mesh)
  graphdef, model_state = nnx.split(model)
  state_shardings = sharding_lib.state_shardings(model_state, mesh)
  opt_shardings = ts.optimizer_shardings(mc, oc, model_state, mesh)
  opt_state = jax.jit(lambda ms: ts.init_optimizer(mc, oc, ms), out_shardings=opt_shardings)(
      model_state)

  checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoint)
  start, last_phase = 0, mc.phase(0)
  if checkpoints.latest_step() is not None:
    model_state, opt_state, meta = checkpoints.restore(
        ckpt_lib.abstract_like(model_state, state_shardings),
        ckpt_lib.abstract_like(opt_state, opt_shardings))
    if meta.get("method") != config.method:
      raise ValueError(f"{checkpoints.directory} holds a {meta.get('method')!r} run; "
                       f"config.method={config.method!r}")
    train_iter.restore(meta["data"])
    start, last_phase = int(meta["step"]), int(meta["phase"])
    log.info("resumed from step %d", start)

  metrics_log = MetricsLog(workdir, enabled=is_main)
  eval_sets = _eval_loss_batches(config, tokenizer)
  compiled: dict[int, Any] = {}
  pending_finite = []           # device scalars: loss finite, since the last host check
  tokens_seen, t_last, step_last = 0, time.perf_counter(), start
  summary: dict[str, Any] = {"start_step": start}
  progress = _progress(start, config.train.steps, is_main)

  def check_finite(upto_step):
    if config.train.nan_check and pending_finite and not bool(jnp.all(jnp.stack(pending_finite))):
      raise TrainingDiverged(
          f"non-finite loss between steps {upto_step - len(pending_finite) + 1} and {upto_step}; "
          f"the last good checkpoint ({checkpoints.latest_step()}) in {checkpoints.directory} "
          "is intact. Lower optim.learning_rate or check the data.")
    pending_finite.clear()

  def save(step_done):
    check_finite(step_done)
    meta = {"method": config.method, "phase": mc.phase(max(step_done - 1, 0)),
            "data": train_iter.state(), "seed": config.seed,
            "config": json.loads(config.to_json_best_effort())}
    checkpoints.save(step_done, model_state, opt_state, meta)

  try:
    for step in range(start, config.train.steps):
      phase = mc.phase(step)
      if phase != last_phase:  # also right after resuming at a phase boundary
        checkpoints.wait()
        model_state, info = ts.between_phases(graphdef, model_state, mc, last_phase)
        model_state = jax.device_put(model_state, state_shardings)
        if info:
          log.info("end of %s: %s", PHASE_NAMES[last_phase], info)
          metrics_log.write(step, {"event": "between_phases", **info})
        last_phase = phase
      if phase not in compiled:
        compiled[phase] = ts.jit_train_step(graphdef, mc, oc, phase, state_shardings,
                                            opt_shardings, batch_sharding)
      # Every process builds the whole global batch (the single-process sequence) and
      # places only its own devices' rows.
      batch = distributed.global_batch(next(train_iter), batch_sharding)
      model_state, opt_state, metrics = compiled[phase](model_state, opt_state, batch,
                                                        jnp.asarray(step, jnp.int32))
      pending_finite.append(jnp.isfinite(metrics["loss"]))
      tokens_seen += int(np.prod(batch["tokens"].shape))
      done = step + 1
      if done % config.train.log_every == 0 or done == config.train.steps:
        check_finite(done)
        now = time.perf_counter()
        record = distributed.to_host(metrics)
        record["tokens_per_s"] = tokens_seen / max(now - t_last, 1e-9)
        record["phase_name"] = PHASE_NAMES[phase] if phase != UNSCHEDULED else "unscheduled"
        tokens_seen, t_last = 0, now
        metrics_log.write(done, record, names)
        progress.set_postfix(loss=f"{float(record['loss']):.3f}", phase=record["phase_name"],
                             tok_s=f"{record['tokens_per_s']:.0f}")
      progress.update(1)
      if config.train.eval_every and done % config.train.eval_every == 0 and done < config.train.steps:
        _evaluate(graphdef, model_state, eval_sets, names, workdir, done, config, metrics_log,
                  batch_sharding)
      if done % config.train.checkpoint_every == 0 and done < config.train.steps:
        save(done)
    final = config.train.steps
    if checkpoints.latest_step() != final:
      save(final)
    checkpoints.wait()
  finally:
    progress.close()
    checkpoints.close()

  summary["eval"] = _evaluate(graphdef, model_state, eval_sets, names, workdir,
                              config.train.steps, config, metrics_log, batch_sharding)
  summary["plots"] = heatmap_paths(workdir, config.train.steps)
  if config.export.enabled:
    # On the training mesh, in every process (the fold's programs and the writer's per-layer
    # gathers are collectives); the optimizer state is dropped first to make room.
    from desmoe_jax.export import export_hf
    opt_state = None
    model = nnx.merge(graphdef, model_state)
    model_state = None  # the model now holds the arrays; merging copies replaces some of them
    fit = [b for batches in eval_sets.values() for b in batches]
    summary["export"] = export_hf(model, os.path.join(workdir, "hf"),
                                  tokenizer_dir=config.model.path, fit_batches=fit,
                                  fold_tokens=config.export.fold_tokens,
                                  check_tokens=config.export.check_tokens,
                                  batch_sharding=batch_sharding)
    if is_main:
      log.info("exported %s: %s", os.path.join(workdir, "hf"), summary["export"])
      metrics_log.write(config.train.steps, {"event": "export", **summary["export"]})
    # The others wait here rather than in the runtime's shutdown barrier, which times out.
    distributed.barrier("export")
  metrics_log.close()
  return summary


def _progress(start, total, enabled):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def _eval_loss_batches(config, tokenizer) -> dict:
  """Held-out packed batches per domain (answers given prompts) and of general text."""
  out = {}
  for d in config.data.domains:
    if d.eval:
      out[d.name] = data_lib.eval_loss_batches(
          data_lib.DomainSpec(name=d.name, path=d.eval, format=d.format), tokenizer,
          seq_len=config.data.seq_len, batch_size=config.data.batch_size,
          max_batches=config.eval.loss_batches)
  if config.data.general:
    general = config.eval.general_batches
    out["general"] = data_lib.text_loss_batches(
        config.data.general, tokenizer, seq_len=config.data.seq_len,
        batch_size=config.data.batch_size,
        max_batches=config.eval.loss_batches if general < 0 else general)
  return out


def _evaluate(graphdef, model_state, eval_sets, names, workdir, step, config, metrics_log,
              batch_sharding):
  losses = heldout_losses(graphdef, model_state, eval_sets, batch_sharding)
  record = {"event": "eval", **{f"heldout_loss/{k}": v for k, v in losses.items()}}
  metrics_log.write(step, record)
  save_heatmaps(specialization.des_state(nnx.merge(graphdef, model_state)), names,
                heatmap_paths(workdir, step), config.train.heatmap_layers)
  log.info("step %d held-out loss: %s", step,
           ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
  return losses
