"""The training run behind `train.py`: config -> mesh, model, data, method, phases, logs,
checkpoints, evaluations, and the final Hugging Face export. Notebooks call `train()` directly.

Work directory layout:
  config.json            the config as given (data.select applied, hub ids kept): eval.py reads it
  checkpoints/<step>/    orbax: model state, optimizer state, meta (data position, RNG, phase)
  metrics.jsonl          one JSON record per logged step / evaluation
  tb/                    TensorBoard event files
  plots/                 correlation and mask-overlap heatmaps (PNG) at every evaluation
  eval/                  evaluation results (JSON)
  hf/                    the adapted model in the HF DeepSeek-V2 layout, with its tokenizer

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

from desmoe_jax import build
from desmoe_jax import checkpoint as ckpt_lib
from desmoe_jax import data as data_lib
from desmoe_jax import distributed
from desmoe_jax import esft as esft_lib
from desmoe_jax import resume as resume_lib
from desmoe_jax import sharding as sharding_lib
from desmoe_jax import specialization
from desmoe_jax import sources
from desmoe_jax import train_step as ts
from desmoe_jax import validate as validate_lib
from desmoe_jax.errors import ConfigError, Preempted, TrainingDiverged
from desmoe_jax.esft import EsftConfig
from desmoe_jax.methods import (DEFAULT_PAPER_LR, PAPER_LR, UNSCHEDULED, MethodConfig,
                                prepare_model)
from desmoe_jax.optim import OptimConfig
from desmoe_jax.preemption import PreemptionGuard
from desmoe_jax.router import AlrConfig
from desmoe_jax.schedule import PHASE_NAMES, ScheduleConfig
from desmoe_jax.specialization import DgesConfig

log = logging.getLogger("desmoe_jax")



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
    kw["learning_rate"] = PAPER_LR.get(config.method, DEFAULT_PAPER_LR)
  kw["master_weights"] = config.train.precision == "bf16_master"  # a float32 copy in the state
  kw["skip_nonfinite_updates"] = int(config.train.get("skip_nonfinite_updates", 0))
  return OptimConfig(**kw)


def step_config(config) -> ts.StepConfig:
  """train.microbatches / train.precision, checked against model.param_dtype."""
  step_cfg = ts.StepConfig(microbatches=config.train.microbatches,
                           precision=config.train.precision, seed=config.seed)
  want = {"fp32_master": "float32", "bf16_sr": "bfloat16",
          "bf16_master": "bfloat16"}[step_cfg.precision]
  if config.model.param_dtype != want:
    raise ConfigError(f"train.precision={step_cfg.precision!r} stores the weights in {want}, "
                      f"model.param_dtype={config.model.param_dtype!r}: set "
                      f"--config.model.param_dtype={want}, or pick another train.precision "
                      f"({', '.join(p for p in ts.PRECISIONS if p != step_cfg.precision)})")
  if config.data.batch_size % step_cfg.microbatches:
    raise ConfigError(f"train.microbatches={step_cfg.microbatches} does not divide "
                      f"data.batch_size={config.data.batch_size}")
  return step_cfg


def check_microbatch_split(step_cfg: ts.StepConfig, batch_size: int, batch_sharding):
  """Each microbatch must split evenly over the data-parallel devices, or every device would
  compute the whole microbatch."""
  spec = batch_sharding.spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  devices = math.prod(batch_sharding.mesh.shape[a] for a in axes)
  if batch_size % step_cfg.microbatches:
    raise ValueError(f"train.microbatches={step_cfg.microbatches} does not divide the batch of "
                     f"{batch_size} sequences")
  rows = batch_size // step_cfg.microbatches
  if rows % devices:
    raise ValueError(f"data.batch_size={batch_size} / train.microbatches="
                     f"{step_cfg.microbatches} = {rows} rows per microbatch, not a multiple of "
                     f"the {devices} data-parallel devices: lower train.microbatches or raise "
                     "data.batch_size")


def check_config(config):
  """Fails before anything heavy happens with a `ConfigError` naming every bad field
  (validate.py), then checks what relates fields to the train step (`step_config`)."""
  validate_lib.validate(config)
  step_config(config)
  if config.model.path and not config.model.path.startswith(sources.PREFIX) and \
      os.path.isfile(config.model.path):
    raise ConfigError(f"config.model.path={config.model.path!r} is a file, not a directory")
  init = config.train.get("init_from", "")
  if init and not os.path.isdir(init):
    raise ConfigError(f"config.train.init_from={init!r} does not exist (a run's work "
                      "directory)")
  if config.dges.get("exclude_general_top") and not config.data.general:
    raise ConfigError("config.dges.exclude_general_top ranks experts on general text, but "
                      "config.data.general is empty")
  if config.dges.get("exclude_general_top") and init:
    raise ConfigError("config.dges.exclude_general_top ranks experts on the pretrained model; "
                      f"config.train.init_from={init!r} starts from a trained one")
  if config.export.get("hub_repo") and not config.export.enabled:
    raise ConfigError(f"config.export.hub_repo={config.export.hub_repo!r} pushes the export, "
                      "but config.export.enabled=False")


# Real tokens of general text (data.general) that rank experts for dges.exclude_general_top.
GENERAL_SAMPLE_TOKENS = 32768


def exclude_general_experts(model, config, tokenizer, n: int, place=jnp.asarray):
  """The oracle DGES control: ranks each MoE layer's experts by the share of the (still
  pretrained) model's top-k slots that general text gives them, over the first
  GENERAL_SAMPLE_TOKENS tokens of data.general, and removes the top `n` from every mask."""
  e = model.config.n_routed_experts
  if n >= e:
    raise ConfigError(f"config.dges.exclude_general_top={n} would exclude all {e} routed "
                      "experts of a layer")
  batches = data_lib.text_loss_batches(
      config.data.general, tokenizer, seq_len=config.data.seq_len,
      batch_size=config.data.batch_size,
      max_batches=-(-GENERAL_SAMPLE_TOKENS // (config.data.batch_size * config.data.seq_len)))
  share = esft_lib.domain_scores(model, batches, GENERAL_SAMPLE_TOKENS, e, place)["token"]
  excluded = specialization.top_share_experts(share, n)                        # [L, E]
  specialization.exclude_experts(model, excluded)
  log.info("oracle DGES: the %d experts per layer with the most general-text routing (%.1f%% "
           "of its top-k slots) excluded from every mask", n,
           100 * float((np.asarray(share) * excluded).sum(-1).mean()))


def domain_spec(d, split: str = "train",
                max_bad_fraction: float = 0.1) -> data_lib.DomainSpec:
  """The data of one `data.domains` entry; fields a custom config omits take their defaults."""
  return data_lib.DomainSpec(
      name=d.name, path=d[split], format=d.format, weight=d.get("weight", 1.0),
      prompt_field=d.get("prompt_field", "prompt"),
      response_field=d.get("response_field", "response"),
      messages_field=d.get("messages_field", "messages"),
      split=d.get("split", "train") if split == "train" else d.get("eval_split", "test"),
      max_bad_fraction=max_bad_fraction)


def domain_specs(config, split: str = "train") -> list:
  return [domain_spec(d, split, config.data.get("max_bad_fraction", 0.1))
          for d in config.data.domains]



# ------------------------------------------------------------------ logging


class MetricsLog:
  """JSON lines + TensorBoard (+ Weights & Biases with `logging.wandb.enabled`), written by
  process 0 only. TensorBoard and W&B get the same scalars (`scalars`); W&B also gets the
  record's strings and the heatmaps as images (`images`), and is imported only when enabled.

  Resuming from step N (`resume_step`) first drops what the interrupted run logged after its
  checkpoint: metrics.jsonl is cut back to `resume_offset` (its size when checkpoint N was
  saved) or, for a checkpoint that did not record it, to the records of steps <= N; TensorBoard
  purges events after N (`purge_step`). The replayed steps are then logged once, not twice.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None,
               resume_offset: int | None = None, wandb_config=None,
               run_config: dict | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.dropped = 0
    if enabled and resume_step is not None and os.path.exists(self.path):
      self.dropped = truncate_records(self.path, resume_step, resume_offset)
    self._file = open(self.path, "a") if enabled else None
    self._tb = self._wandb = self._wandb_lib = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                               purge_step=None if resume_step is None else resume_step + 1)
      if wandb_config is not None and wandb_config.get("enabled"):
        self._wandb_lib, self._wandb = _start_wandb(workdir, wandb_config, run_config)

  def offset(self) -> int | None:
    """Bytes of metrics.jsonl written so far (stored with each checkpoint)."""
    return self._file.tell() if self.enabled else None

  @staticmethod
  def scalars(record: dict[str, Any], domain_names=()) -> dict[str, Any]:
    """{key: number} as TensorBoard gets them (per-domain lists split into key/<domain>)."""
    out = {}
    for key, value in record.items():
      if key == "step":
        continue
      if isinstance(value, list) and len(value) == len(domain_names) and domain_names:
        for name, v in zip(domain_names, value):
          if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{key}/{name}"] = v
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[key] = value
    return out

  def write(self, step: int, record: dict[str, Any], domain_names=()):
    if not self.enabled:
      return
    record = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    scalars = self.scalars(record, domain_names)
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._tb.flush()
    if self._wandb is not None:
      strings = {k: v for k, v in record.items() if isinstance(v, str)}
      self._wandb.log({**scalars, **strings}, step=step)

  def images(self, step: int, paths: dict[str, str]):
    """The heatmap PNGs of `step` ({"correlation": path, ...}) as W&B images."""
    if self.enabled and self._wandb is not None:
      self._wandb.log({f"heatmap/{k}": self._wandb_lib.Image(p) for k, p in paths.items()
                       if os.path.isfile(p)}, step=step)

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def _start_wandb(workdir: str, cfg, run_config: dict | None):
  """(the wandb module, a W&B run for `workdir`): the run's id is kept in <workdir>/wandb_id, so
  a resumed training run continues the same W&B run."""
  try:
    import wandb
  except ImportError:
    raise ImportError("config.logging.wandb.enabled=True, but wandb is not installed: "
                      "pip install 'desmoe-jax[wandb]' (or wandb)") from None
  id_file = os.path.join(workdir, "wandb_id")
  if os.path.isfile(id_file):
    with open(id_file) as f:
      run_id = f.read().strip()
  else:
    import secrets
    run_id = secrets.token_hex(4)
    with open(id_file, "w") as f:
      f.write(run_id)
  return wandb, wandb.init(project=cfg.get("project") or None, entity=cfg.get("entity") or None,
                           name=cfg.get("name") or None, mode=cfg.get("mode") or None,
                           dir=workdir, id=run_id, resume="allow", config=run_config)


def truncate_records(path: str, step: int, offset: int | None = None) -> int:
  """Cuts metrics.jsonl back to what was written up to checkpoint `step`; returns how many
  records were dropped."""
  with open(path, "rb") as f:
    data = f.read()
  if offset is not None and 0 <= offset <= len(data) and (offset == 0 or data[offset - 1:offset]
                                                          == b"\n"):
    kept = data[:offset]
  else:  # no (usable) offset: keep the records of steps up to `step`
    lines = data.splitlines(keepends=True)
    kept = b"".join(l for l in lines if _record_step(l) is not None and _record_step(l) <= step)
  dropped = data[len(kept):].count(b"\n") if data.startswith(kept) else (
      data.count(b"\n") - kept.count(b"\n"))
  if kept != data:
    with open(path, "wb") as f:
      f.write(kept)
  return dropped


def _record_step(line: bytes) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


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


def provenance() -> dict:
  """The code that ran: git commit of the checkout (if any) and the versions of the packages
  that decide the numbers, recorded in every checkpoint."""
  import importlib.metadata
  import platform
  import subprocess
  out: dict[str, Any] = {"python": platform.python_version(), "git_commit": None,
                         "git_dirty": None}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.exists(os.path.join(repo, ".git")):
    try:
      out["git_commit"] = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                                         capture_output=True, text=True).stdout.strip()
      out["git_dirty"] = bool(subprocess.run(
          ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], check=True,
          capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
      pass
  versions = {}
  for dist in ("desmoe-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
               "transformers", "numpy", "ml-dtypes"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  out["versions"] = versions
  return out


def init_from(path: str, abstract_model_state):
  """Model state (parameters and DES-MoE state) of another run's newest checkpoint. `path`: a
  work directory, or its `checkpoints/` directory."""
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    directory = path
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.train.init_from={path!r} does not exist")
  checkpoints = ckpt_lib.Checkpointer(directory)
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"config.train.init_from={path!r}: no checkpoint in {directory}")
  try:
    state, _, meta = checkpoints.restore(abstract_model_state)
  except ValueError as e:
    raise ValueError(f"config.train.init_from={path!r}: {e}") from None
  return state, meta


def _open_run(config, workdir: str, allow_config_change: bool, saved_config=None):
  """Work directory, checkpoints and tokenizer, checked against an existing run before any
  model is loaded. Returns (checkpointer, tokenizer, fingerprint, latest meta or None)."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir!r}: cannot create it ({e})") from e
  checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoint)
  try:
    tokenizer, fingerprint, meta = _check_resume(config, checkpoints, allow_config_change,
                                                 saved_config)
  except BaseException:
    checkpoints.close()
    raise
  return checkpoints, tokenizer, fingerprint, meta


def _check_resume(config, checkpoints, allow_config_change: bool, saved_config=None):
  """`config` has local paths; `saved_config` (default `config`) is what the run records, with
  its hub ids, and what a resume is compared with."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(config.model.path)
  fingerprint = resume_lib.tokenizer_fingerprint(tokenizer)
  meta = None
  if checkpoints.latest_step() is not None:
    meta = checkpoints.read_meta()
    where = checkpoints.path(checkpoints.latest_step())
    if meta.get("method") != config.method and not allow_config_change:
      raise ConfigError(f"{where} holds a {meta.get('method')!r} run; config.method="
                        f"{config.method!r} (another --workdir starts a new run)")
    changes = resume_lib.config_changes(
        meta.get("config", {}), json.loads((saved_config or config).to_json_best_effort()))
    for line in resume_lib.describe(changes):
      log.info("config changed since %s: %s", where, line)
    altering = resume_lib.run_altering(changes)
    if altering and not allow_config_change:
      raise ConfigError(
          f"resuming {where} with a config that changes the run "
          f"({len(altering)} field{'s' if len(altering) > 1 else ''}); rerun with "
          "--allow_config_change to accept, or use another --workdir:\n"
          + "\n".join(resume_lib.describe(altering)))
    stored = meta.get("tokenizer")
    if stored is not None and stored != fingerprint:
      raise ConfigError(f"the tokenizer in model.path={config.model.path!r} is not the one "
                        f"{where} was trained with (fingerprint {fingerprint[:19]} vs "
                        f"{stored[:19]}: vocabulary, merges, special tokens or chat template "
                        "differ)")
  return tokenizer, fingerprint, meta


def _train(config, workdir: str, mesh, guard: PreemptionGuard, allow_config_change: bool,
           saved_config=None) -> dict:
  is_main = jax.process_index() == 0
  saved_config = config if saved_config is None else saved_config
  checkpoints, tokenizer, fingerprint, resume_meta = _open_run(config, workdir,
                                                               allow_config_change, saved_config)
  try:
    return _run(config, workdir, mesh, guard, checkpoints, tokenizer, fingerprint, resume_meta,
                is_main, saved_config)
  finally:
    checkpoints.close()


def _run(config, workdir, mesh, guard, checkpoints, tokenizer, fingerprint, resume_meta,
         is_main, saved_config) -> dict:
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(saved_config.to_json_best_effort(indent=2))

  mc, oc, sc = method_config(config), optim_config(config), step_config(config)
  log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
  model = build.load_model(config, mesh=mesh)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ConfigError(f"tokenizer in {config.model.path} has {tokenizer.vocab_size} tokens, the "
                      f"model's vocab_size is {model.config.vocab_size}")

  train_specs = domain_specs(config, "train")
  train_iter = data_lib.MixtureIterator(train_specs, tokenizer, seq_len=config.data.seq_len,
                                        batch_size=config.data.batch_size, seed=config.seed)
  names = [d.name for d in config.data.domains]

  batch_sharding = sharding_lib.batch_sharding(mesh)
  check_microbatch_split(sc, config.data.batch_size, batch_sharding)
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
  if mc.dges.exclude_general_top:
    exclude_general_experts(model, config, tokenizer, mc.dges.exclude_general_top, place)
  sharding_lib.shard_model(model, mesh)
  graphdef, model_state = nnx.split(model)
  state_shardings = sharding_lib.state_shardings(model_state, mesh)
  opt_shardings = ts.optimizer_shardings(mc, oc, model_state, mesh)
  opt_state = jax.jit(lambda ms: ts.init_optimizer(mc, oc, ms), out_shardings=opt_shardings)(
      model_state)

  # One jitted reduction over parameters, optimizer state and gradient norm; replicated, so
  # every process reads the same answer.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_finite = jax.jit(ckpt_lib.all_finite, out_shardings=replicated)

  start, last_phase = 0, mc.phase(0)
  if resume_meta is not None:
    model_state, opt_state, meta = checkpoints.restore(
        ckpt_lib.abstract_like(model_state, state_shardings),
        ckpt_lib.abstract_like(opt_state, opt_shardings))
    if not bool(state_finite((model_state, opt_state))):
      raise TrainingDiverged(
          f"{checkpoints.path(meta['step'])} holds non-finite values (written before saves "
          "were checked); move it away to resume from the checkpoint before it")
    train_iter.restore(meta["data"])
    start, last_phase = int(meta["step"]), int(meta["phase"])
    log.info("resumed from step %d", start)
  elif config.train.get("init_from"):
    model_state, source_meta = init_from(config.train.init_from,
                                         ckpt_lib.abstract_like(model_state, state_shardings))
    log.info("model state from %s (step %d of a %r run); fresh optimizer",
             config.train.init_from, source_meta["step"], source_meta.get("method"))

  wandb_config = config.logging.get("wandb") if "logging" in config else None
  metrics_log = MetricsLog(workdir, enabled=is_main,
                           resume_step=start if resume_meta is not None else None,
                           resume_offset=resume_meta.get("metrics_offset") if resume_meta else None,
                           wandb_config=wandb_config,
                           run_config=json.loads(saved_config.to_json_best_effort()))
  if metrics_log.dropped:
    log.info("dropped %d metrics records logged after step %d by the interrupted run",
             metrics_log.dropped, start)
  eval_sets = _eval_loss_batches(config, tokenizer)
  compiled: dict[int, Any] = {}
  pending_finite = []           # device scalars: loss finite, since the last host check
  last_grad_norm = jnp.zeros((), jnp.float32)
  tokens_seen, t_last, step_last = 0, time.perf_counter(), start
  summary: dict[str, Any] = {"start_step": start}
  progress = _progress(start, config.train.steps, is_main)

  def last_good() -> str:
    checkpoints.wait()   # a save still running was checked before it started: let it commit
    return checkpoints.describe_last_good()

  def check_finite(upto_step):
    if config.train.nan_check and pending_finite and not bool(jnp.all(jnp.stack(pending_finite))):
      first = upto_step - len(pending_finite) + 1
      pending_finite.clear()
      raise TrainingDiverged(
          f"non-finite loss between steps {first} and {upto_step}; "
          f"{last_good()} (intact). Lower optim.learning_rate, check the data, or set "
          "train.skip_nonfinite_updates.")
    pending_finite.clear()

  def check_state_finite(step_done):
    """Parameters, optimizer state and the last gradient norm: all finite, or no save."""
    if bool(state_finite((model_state, opt_state, last_grad_norm))):
      return
    flags = distributed.to_host(jax.jit(ckpt_lib.nonfinite_leaves)(
        {"model": model_state, "opt_state": opt_state, "grad_norm": last_grad_norm}))
    bad = [k for k, ok in flags.items() if not ok]
    raise TrainingDiverged(
        f"non-finite values at step {step_done} in {len(bad)} arrays ({', '.join(bad[:3])}"
        f"{', ...' if len(bad) > 3 else ''}) with a finite loss: not saved; {last_good()}, "
        "whose state is finite. Lower optim.learning_rate or check the data.")

  run_provenance = provenance()

  def save(step_done):
    check_finite(step_done)
    check_state_finite(step_done)
    meta = {"method": config.method, "phase": mc.phase(max(step_done - 1, 0)),
            "data": train_iter.state(), "seed": config.seed, "finite": True,
            "tokenizer": fingerprint, "metrics_offset": metrics_log.offset(),
            "config": json.loads(saved_config.to_json_best_effort()), **run_provenance}
    checkpoints.save(step_done, model_state, opt_state, meta)

  def stop_if_preempted(step_done):
    if not guard.reached(step_done, checkpoints):
      return
    if checkpoints.latest_step() != step_done:
      save(step_done)
    checkpoints.wait()
    log.warning("preempted at step %d (%s): checkpoint %s committed; rerun the same command "
                "to resume", step_done, guard.signal_name, checkpoints.path(step_done))
    metrics_log.close()
    raise Preempted(f"preempted at step {step_done} by {guard.signal_name}; "
                    f"{checkpoints.path(step_done)} is committed: rerun the same command to "
                    "resume", step_done)

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
                                            opt_shardings, batch_sharding, sc)
      # Every process builds the whole global batch (the single-process sequence) and
      # places only its own devices' rows.
      batch = distributed.global_batch(next(train_iter), batch_sharding)
      model_state, opt_state, metrics = compiled[phase](model_state, opt_state, batch,
                                                        jnp.asarray(step, jnp.int32))
      finite = jnp.isfinite(metrics["loss"])
      if "update_skipped" in metrics:   # train.skip_nonfinite_updates: a skipped step is fine
        finite = finite | metrics["update_skipped"]
      pending_finite.append(finite)
      last_grad_norm = metrics["grad_norm"]
      tokens_seen += int(np.prod(batch["tokens"].shape))
      done = step + 1
      checkpoints.poll()                # a background save that failed stops the run here
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
      stop_if_preempted(done)
    final = config.train.steps
    if checkpoints.latest_step() != final:
      save(final)
    checkpoints.wait()
  finally:
    progress.close()

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
      if config.export.get("hub_repo"):
        summary["hub_commit"] = sources.push(os.path.join(workdir, "hf"), config.export.hub_repo)
        log.info("pushed %s to the hub: %s", os.path.join(workdir, "hf"), summary["hub_commit"])
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


def _evaluate(graphdef, model_state, eval_sets, names, workdir, step, config, metrics_log,
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
