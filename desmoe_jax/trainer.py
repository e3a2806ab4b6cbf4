"""The training run behind `train.py`: config -> mesh, model, data, method, phases, logs,
checkpoints, evaluations, and the final Hugging Face export. Notebooks call `train()` directly.

Work directory layout:
  config.json            the config as given (data.select applied, hub ids kept): eval.py reads it
  domains.json           data.discover_domains: the discovered domains (discover.py), written once
  checkpoints/<step>/    orbax: model state, optimizer state, meta (data position, RNG, phase)
  metrics.jsonl          one JSON record per logged step / evaluation
  tb/                    TensorBoard event files
  plots/                 correlation and mask-overlap heatmaps (PNG) at every evaluation
  eval/                  evaluation results (JSON)
  hf/                    the adapted model in its family's HF layout, with its tokenizer

The loop (`run_steps`) runs one step at a time and then the hooks that are due (`Hooks`, each
added with `every=`, as Levanter's `Trainer.add_hook`): log, evaluate, checkpoint, preemption.
What changes from step to step is one `RunState` (model state, optimizer state, data position,
step), which every hook takes as its argument; what does not is the `RunContext`. The pieces
live in their own modules: train_config.py (config -> library objects, cross-field checks),
train_state.py (`build_train_state`), run_dir.py (work directory, resume, provenance),
metrics_log.py (metrics.jsonl, TensorBoard, W&B), heldout.py (held-out losses), heatmaps.py.

In a multi-process run every process calls `train` (desmoe_jax/distributed.py); process 0 alone
writes the files above, and all of them write the checkpoints, through orbax.

Reliability (docs/RELIABILITY.md lists every fault tried and the test that holds it):
* the whole config is validated (validate.py) before anything is loaded;
* a resumed run must agree with its checkpoint on the config (resume.py; `allow_config_change`
  overrides) and on the tokenizer; metrics records and TensorBoard events written after the
  restored step are dropped, so a resumed run's logs have each step once;
* SIGTERM / SIGINT (or the cluster's preemption sync on multi-process runs) save the current
  step, wait for it and raise `errors.Preempted` (preemption.py);
* before each save, one jitted reduction checks parameters, optimizer state and the gradient
  norm for NaN/inf: a non-finite state is never saved, and `TrainingDiverged` names the last
  checkpoint that is finite;
* a failed save stops the run after the step it is noticed in (`errors.SaveFailed`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax import build
from desmoe_jax import checkpoint as ckpt_lib
from desmoe_jax import data as data_lib
from desmoe_jax import discover
from desmoe_jax import distributed
from desmoe_jax import run_dir
from desmoe_jax import sharding as sharding_lib
from desmoe_jax import sources
from desmoe_jax import train_step as ts
from desmoe_jax.errors import ConfigError, Preempted, TrainingDiverged
from desmoe_jax.heatmaps import heatmap_paths, save_heatmaps  # noqa: F401 (trainer.* API)
from desmoe_jax.heldout import (alr_teacher_agreement, cluster_loss_batches,  # noqa: F401
                                eval_loss_batches, evaluate_heldout, heldout_examples_of,
                                heldout_losses)
from desmoe_jax.methods import UNSCHEDULED, MethodConfig
from desmoe_jax.metrics_log import MetricsLog, progress_bar, truncate_records  # noqa: F401
from desmoe_jax.preemption import PreemptionGuard
from desmoe_jax.run_dir import init_from, provenance  # noqa: F401 (trainer.* API)
from desmoe_jax.schedule import PHASE_NAMES
from desmoe_jax.train_config import (check_config, check_microbatch_split,  # noqa: F401
                                     domain_spec, domain_specs, method_config, optim_config,
                                     step_config)
from desmoe_jax.train_state import (GENERAL_SAMPLE_TOKENS, build_train_state,  # noqa: F401
                                    exclude_general_experts, select_experts)

log = logging.getLogger("desmoe_jax")


# ------------------------------------------------------------------ the run's state and context


@dataclasses.dataclass
class RunState:
  """What the loop changes from step to step."""
  model_state: Any                # nnx.State: parameters + DES-MoE state
  opt_state: Any
  data: data_lib.MixtureIterator  # the data position: data.state() is checkpointed
  step: int                       # steps done
  phase: int                      # phase of the last step run
  grad_norm: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  # device scalars, loss finite, since the last host check
  pending_finite: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What the hooks see of the step just run (cf. Levanter's StepInfo)."""
  done: int                       # steps done, this one included
  phase: int
  metrics: dict                   # device arrays, replicated
  tokens: int                     # tokens of its batch


@dataclasses.dataclass
class RunContext:
  """What stays fixed over the loop."""
  config: Any
  saved_config: Any               # what the run records (hub ids kept)
  workdir: str
  is_main: bool
  graphdef: Any
  method_cfg: MethodConfig
  optim_cfg: Any
  step_cfg: ts.StepConfig
  state_shardings: Any
  opt_shardings: Any
  batch_sharding: Any
  checkpoints: ckpt_lib.Checkpointer
  guard: PreemptionGuard
  metrics_log: MetricsLog
  eval_sets: dict
  fingerprint: str
  provenance: dict
  state_finite: Callable
  progress: Any
  compiled: dict = dataclasses.field(default_factory=dict)   # phase -> step(ms, opt, batch, i)
  assignment: discover.Assignment | None = None   # data.discover_domains: the clusters

  @property
  def total_steps(self) -> int:
    return self.config.train.steps

  @property
  def names(self) -> list:
    """The run's domains, in domain-id order: data.domains' names, or the clusters'."""
    if self.assignment is not None:
      return discover.cluster_names(self.assignment.k)
    return [d.name for d in self.config.data.domains]


# ------------------------------------------------------------------ hooks


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(ctx, run, info)` after every `every`-th step (0: never). `last`: at the run's last
  step, True runs it whatever `every` says, False never (the run's end does it), None follows
  `every`."""
  fn: Callable[[RunContext, RunState, StepInfo], None]
  every: int = 1
  last: bool | None = None

  def due(self, done: int, total: int) -> bool:
    if done == total and self.last is not None:
      return self.last
    return bool(self.every) and done % self.every == 0


class Hooks:
  def __init__(self):
    self.hooks: list[Hook] = []

  def add(self, fn, every: int = 1, last: bool | None = None) -> Hooks:
    self.hooks.append(Hook(fn, every, last))
    return self

  def run(self, ctx: RunContext, run: RunState, info: StepInfo):
    for hook in self.hooks:
      if hook.due(info.done, ctx.total_steps):
        hook.fn(ctx, run, info)


class LogHook:
  """A metrics record (and the progress bar's numbers) every `train.log_every` steps, with the
  throughput since the last record."""

  def __init__(self):
    self.tokens, self.since = 0, time.perf_counter()

  def count(self, ctx: RunContext, run: RunState, info: StepInfo):
    self.tokens += info.tokens

  def __call__(self, ctx: RunContext, run: RunState, info: StepInfo):
    check_finite(ctx, run, info.done)
    now = time.perf_counter()
    record = distributed.to_host(info.metrics)
    record["tokens_per_s"] = self.tokens / max(now - self.since, 1e-9)
    record["phase_name"] = (PHASE_NAMES[info.phase] if info.phase != UNSCHEDULED
                            else "unscheduled")
    self.tokens, self.since = 0, now
    ctx.metrics_log.write(info.done, record, ctx.names)
    ctx.progress.set_postfix(loss=f"{float(record['loss']):.3f}", phase=record["phase_name"],
                             tok_s=f"{record['tokens_per_s']:.0f}")


def poll_saves(ctx: RunContext, run: RunState, info: StepInfo):
  ctx.checkpoints.poll()                # a background save that failed stops the run here


def advance_progress(ctx: RunContext, run: RunState, info: StepInfo):
  ctx.progress.update(1)


def evaluate(ctx: RunContext, run: RunState, info: StepInfo):
  evaluate_heldout(ctx.graphdef, run.model_state, ctx.eval_sets, ctx.names, ctx.workdir,
                   info.done, ctx.config, ctx.metrics_log, ctx.batch_sharding)


def checkpoint(ctx: RunContext, run: RunState, info: StepInfo):
  save(ctx, run, info.done)


def stop_if_preempted(ctx: RunContext, run: RunState, info: StepInfo):
  step_done = info.done
  if not ctx.guard.reached(step_done, ctx.checkpoints):
    return
  if ctx.checkpoints.latest_step() != step_done:
    save(ctx, run, step_done)
  ctx.checkpoints.wait()
  log.warning("preempted at step %d (%s): checkpoint %s committed; rerun the same command "
              "to resume", step_done, ctx.guard.signal_name, ctx.checkpoints.path(step_done))
  ctx.metrics_log.close()
  raise Preempted(f"preempted at step {step_done} by {ctx.guard.signal_name}; "
                  f"{ctx.checkpoints.path(step_done)} is committed: rerun the same command to "
                  "resume", step_done)


def default_hooks(config) -> Hooks:
  """The hooks of a training run, in the order they run after a step."""
  logger = LogHook()
  train = config.train
  return (Hooks().add(logger.count).add(poll_saves)
          .add(logger, every=train.log_every, last=True)
          .add(advance_progress)
          .add(evaluate, every=train.eval_every, last=False)
          .add(checkpoint, every=train.checkpoint_every, last=False)
          .add(stop_if_preempted))


# ------------------------------------------------------------------ finiteness and saves


def last_good(ctx: RunContext) -> str:
  ctx.checkpoints.wait()   # a save still running was checked before it started: let it commit
  return ctx.checkpoints.describe_last_good()


def check_finite(ctx: RunContext, run: RunState, upto_step: int):
  """The losses since the last check: all finite (or skipped updates), or the run stops."""
  pending = run.pending_finite
  if ctx.config.train.nan_check and pending and not bool(jnp.all(jnp.stack(pending))):
    first = upto_step - len(pending) + 1
    pending.clear()
    raise TrainingDiverged(
        f"non-finite loss between steps {first} and {upto_step}; "
        f"{last_good(ctx)} (intact). Lower optim.learning_rate, check the data, or set "
        "train.skip_nonfinite_updates.")
  pending.clear()


def check_state_finite(ctx: RunContext, run: RunState, step_done: int):
  """Parameters, optimizer state and the last gradient norm: all finite, or no save."""
  if bool(ctx.state_finite((run.model_state, run.opt_state, run.grad_norm))):
    return
  flags = distributed.to_host(jax.jit(ckpt_lib.nonfinite_leaves)(
      {"model": run.model_state, "opt_state": run.opt_state, "grad_norm": run.grad_norm}))
  bad = [k for k, ok in flags.items() if not ok]
  raise TrainingDiverged(
      f"non-finite values at step {step_done} in {len(bad)} arrays ({', '.join(bad[:3])}"
      f"{', ...' if len(bad) > 3 else ''}) with a finite loss: not saved; {last_good(ctx)}, "
      "whose state is finite. Lower optim.learning_rate or check the data.")


def save(ctx: RunContext, run: RunState, step_done: int):
  check_finite(ctx, run, step_done)
  check_state_finite(ctx, run, step_done)
  config = ctx.config
  meta = {"method": config.method, "phase": ctx.method_cfg.phase(max(step_done - 1, 0)),
          "data": run.data.state(), "seed": config.seed, "finite": True,
          "tokenizer": ctx.fingerprint, "metrics_offset": ctx.metrics_log.offset(),
          "config": json.loads(ctx.saved_config.to_json_best_effort()), **ctx.provenance}
  ctx.checkpoints.save(step_done, run.model_state, run.opt_state, meta)


# ------------------------------------------------------------------ the loop


def enter_phase(ctx: RunContext, run: RunState, phase: int, step: int):
  """Between phases (also right after resuming at a phase boundary): the host-side work of the
  phase that ended (train_step.between_phases); the phase's step is compiled once."""
  if phase != run.phase:
    ctx.checkpoints.wait()
    model_state, info = ts.between_phases(ctx.graphdef, run.model_state, ctx.method_cfg,
                                          run.phase)
    run.model_state = jax.device_put(model_state, ctx.state_shardings)
    if info:
      log.info("end of %s: %s", PHASE_NAMES[run.phase], info)
      ctx.metrics_log.write(step, {"event": "between_phases", **info})
    run.phase = phase
  if phase not in ctx.compiled:
    step_fn = ts.jit_train_step(ctx.graphdef, ctx.method_cfg, ctx.optim_cfg, phase,
                                ctx.state_shardings, ctx.opt_shardings, ctx.batch_sharding,
                                ctx.step_cfg)
    # The rate is an input of the compiled step, not a constant: the runs of a learning-rate
    # grid compile each step once (train_step.make_train_step). One device scalar per run.
    lr = ts.learning_rate_arg(ctx.optim_cfg)
    ctx.compiled[phase] = lambda ms, opt, batch, i: step_fn(ms, opt, batch, i, lr)


def train_one_step(ctx: RunContext, run: RunState, step: int) -> StepInfo:
  # Every process builds the whole global batch (the single-process sequence) and places only
  # its own devices' rows.
  batch = distributed.global_batch(next(run.data), ctx.batch_sharding)
  run.model_state, run.opt_state, metrics = ctx.compiled[run.phase](
      run.model_state, run.opt_state, batch, jnp.asarray(step, jnp.int32))
  finite = jnp.isfinite(metrics["loss"])
  if "update_skipped" in metrics:   # train.skip_nonfinite_updates: a skipped step is fine
    finite = finite | metrics["update_skipped"]
  run.pending_finite.append(finite)
  run.grad_norm = metrics["grad_norm"]
  run.step = step + 1
  return StepInfo(step + 1, run.phase, metrics, int(np.prod(batch["tokens"].shape)))


def run_steps(ctx: RunContext, run: RunState, hooks: Hooks):
  """The training loop: each step, then the hooks due after it; the last step is saved."""
  for step in range(run.step, ctx.total_steps):
    enter_phase(ctx, run, ctx.method_cfg.phase(step), step)
    hooks.run(ctx, run, train_one_step(ctx, run, step))
  if ctx.checkpoints.latest_step() != ctx.total_steps:
    save(ctx, run, ctx.total_steps)
  ctx.checkpoints.wait()


# ------------------------------------------------------------------ the run


def train(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) the training described by `config` in `workdir`; returns a summary.

  Raises `errors.ConfigError` (bad setting, or a resume whose config changed what the run
  computes; `allow_config_change=True` accepts such changes), `errors.Preempted` (SIGTERM /
  SIGINT: the current step was saved), `errors.TrainingDiverged`, `errors.SaveFailed`.
  """
  config = copy.deepcopy(config)
  sources.select_domains(config)
  check_config(config)
  resolved = sources.resolve(config)  # hub ids fetched; `config` (saved) keeps them
  try:
    mesh = sharding_lib.make_mesh(dict(resolved.mesh))
  except ValueError as e:
    raise ConfigError(f"mesh={dict(resolved.mesh)}: {e}") from e
  with jax.set_mesh(mesh), PreemptionGuard() as guard:  # mesh: read by shard_map / constrain
    return _train(resolved, workdir, mesh, guard, allow_config_change, saved_config=config)


def _train(config, workdir: str, mesh, guard: PreemptionGuard, allow_config_change: bool,
           saved_config=None) -> dict:
  saved_config = config if saved_config is None else saved_config
  checkpoints, tokenizer, fingerprint, resume_meta = run_dir.open_run(
      config, workdir, allow_config_change, saved_config)
  try:
    ctx, run = start_run(config, saved_config, workdir, mesh, guard, checkpoints, tokenizer,
                         fingerprint, resume_meta)
    summary: dict[str, Any] = {"start_step": run.step}
    try:
      run_steps(ctx, run, default_hooks(config))
    finally:
      ctx.progress.close()
    return finish(ctx, run, summary)
  finally:
    checkpoints.close()


def load_checked_model(config, mesh, tokenizer):
  """The pretrained model on `mesh`, checked against the tokenizer."""
  model = build.load_model(config, mesh=mesh)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ConfigError(f"tokenizer in {config.model.path} has {tokenizer.vocab_size} tokens, the "
                      f"model's vocab_size is {model.config.vocab_size}")
  return model


def start_run(config, saved_config, workdir, mesh, guard, checkpoints, tokenizer, fingerprint,
              resume_meta) -> tuple[RunContext, RunState]:
  """The run's context and its state at the first step to run: fresh, resumed from the
  newest checkpoint (`resume_meta`), or started from another run's model (train.init_from)."""
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(saved_config.to_json_best_effort(indent=2))
  log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
  model = load_checked_model(config, mesh, tokenizer)
  train_specs = domain_specs(config, "train")
  train_iter = data_lib.MixtureIterator(train_specs, tokenizer, seq_len=config.data.seq_len,
                                        batch_size=config.data.batch_size, seed=config.seed)
  step_cfg = step_config(config)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  check_microbatch_split(step_cfg, config.data.batch_size, batch_sharding)
  place = functools.partial(distributed.global_array, sharding=batch_sharding)
  eval_sets = eval_loss_batches(config, tokenizer)
  assignment = None
  if discover.enabled(config):   # the base model's routing, before the method changes it
    heldout_examples = heldout_examples_of(config, tokenizer)
    assignment = discover.discover(
        config, model, {s.name: [ids for ids, _ in ex] for s, ex in
                        zip(train_specs, train_iter.examples)},
        {name: [ids for ids, _ in ex] for name, ex in heldout_examples.items()}, workdir,
        saved_model_path=saved_config.model.path, resuming=resume_meta is not None,
        place=place)
    train_iter.set_example_domains([assignment.train_labels(s.name) for s in train_specs])
    eval_sets.update(cluster_loss_batches(config, assignment, heldout_examples))
  state = build_train_state(config, lambda: model, mesh,
                            select=select_experts(config, tokenizer, train_specs, place),
                            domains=assignment.k if assignment is not None else None)
  # One jitted reduction over parameters, optimizer state and gradient norm; replicated, so
  # every process reads the same answer.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_finite = jax.jit(ckpt_lib.all_finite, out_shardings=replicated)
  run = RunState(state.state, state.opt_state, train_iter, step=0,
                 phase=state.method_cfg.phase(0))
  restore(config, checkpoints, resume_meta, state, run, state_finite)
  wandb_config = config.logging.get("wandb") if "logging" in config else None
  metrics_log = MetricsLog(workdir, enabled=is_main,
                           resume_step=run.step if resume_meta is not None else None,
                           resume_offset=resume_meta.get("metrics_offset") if resume_meta else None,
                           wandb_config=wandb_config,
                           run_config=json.loads(saved_config.to_json_best_effort()))
  if metrics_log.dropped:
    log.info("dropped %d metrics records logged after step %d by the interrupted run",
             metrics_log.dropped, run.step)
  ctx = RunContext(config, saved_config, workdir, is_main, state.graphdef, state.method_cfg,
                   state.optim_cfg, step_cfg, state.state_shardings, state.opt_shardings,
                   batch_sharding, checkpoints, guard, metrics_log,
                   eval_sets=eval_sets, fingerprint=fingerprint,
                   provenance=provenance(), state_finite=state_finite,
                   progress=progress_bar(run.step, config.train.steps, is_main),
                   assignment=assignment)
  return ctx, run


def restore(config, checkpoints, resume_meta, state, run: RunState, state_finite):
  """`run` from the newest checkpoint (a resume), or its model from train.init_from."""
  if resume_meta is not None:
    run.model_state, run.opt_state, meta = checkpoints.restore(
        ckpt_lib.abstract_like(run.model_state, state.state_shardings),
        ckpt_lib.abstract_like(run.opt_state, state.opt_shardings))
    if not bool(state_finite((run.model_state, run.opt_state))):
      raise TrainingDiverged(
          f"{checkpoints.path(meta['step'])} holds non-finite values (written before saves "
          "were checked); move it away to resume from the checkpoint before it")
    run.data.restore(meta["data"])
    run.step, run.phase = int(meta["step"]), int(meta["phase"])
    log.info("resumed from step %d", run.step)
  elif config.train.get("init_from"):
    run.model_state, source_meta = init_from(
        config.train.init_from, ckpt_lib.abstract_like(run.model_state, state.state_shardings))
    log.info("model state from %s (step %d of a %r run); fresh optimizer",
             config.train.init_from, source_meta["step"], source_meta.get("method"))


def finish(ctx: RunContext, run: RunState, summary: dict) -> dict:
  """After the last step: the final evaluation and heatmaps, and the export."""
  steps = ctx.total_steps
  summary["eval"] = evaluate_heldout(ctx.graphdef, run.model_state, ctx.eval_sets, ctx.names,
                                     ctx.workdir, steps, ctx.config, ctx.metrics_log,
                                     ctx.batch_sharding)
  summary["plots"] = heatmap_paths(ctx.workdir, steps)
  if ctx.config.export.enabled:
    export(ctx, run, summary)
  ctx.metrics_log.close()
  return summary


def export(ctx: RunContext, run: RunState, summary: dict):
  """<workdir>/hf (and for method=lora <workdir>/hf_adapter, peft_adapter.py), on the training
  mesh, in every process (the fold's programs and the writer's per-layer gathers are
  collectives); the optimizer state is dropped first to make room."""
  from desmoe_jax.export import export_hf
  config, hf_dir = ctx.config, os.path.join(ctx.workdir, "hf")
  run.opt_state = None
  model = nnx.merge(ctx.graphdef, run.model_state)
  run.model_state = None  # the model now holds the arrays; merging copies replaces some of them
  fit = [b for batches in ctx.eval_sets.values() for b in batches]
  summary["export"] = export_hf(model, hf_dir, tokenizer_dir=config.model.path,
                                fit_batches=fit, fold_tokens=config.export.fold_tokens,
                                check_tokens=config.export.check_tokens,
                                batch_sharding=ctx.batch_sharding,
                                adapter_path=os.path.join(ctx.workdir, "hf_adapter"),
                                base_model=config.model.path,
                                trained_dropout=config.lora.dropout if "lora" in config else 0.0)
  if ctx.is_main:
    log.info("exported %s: %s", hf_dir, summary["export"])
    ctx.metrics_log.write(config.train.steps, {"event": "export", **summary["export"]})
    if config.export.get("hub_repo"):
      summary["hub_commit"] = sources.push(hf_dir, config.export.hub_repo)
      log.info("pushed %s to the hub: %s", hf_dir, summary["hub_commit"])
  # The others wait here rather than in the runtime's shutdown barrier, which times out.
  distributed.barrier("export")
