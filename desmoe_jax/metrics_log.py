"""What a run logs: metrics.jsonl, TensorBoard and (optionally) Weights & Biases, written by
process 0, cut back on resume so that each step is logged once; and the progress bar."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


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
        self._wandb_lib, self._wandb = start_wandb(workdir, wandb_config, run_config)

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
    record = {"step": step, **{k: jsonable(v) for k, v in record.items()}}
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


def start_wandb(workdir: str, cfg, run_config: dict | None):
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
    kept = b"".join(l for l in lines if record_step(l) is not None and record_step(l) <= step)
  dropped = data[len(kept):].count(b"\n") if data.startswith(kept) else (
      data.count(b"\n") - kept.count(b"\n"))
  if kept != data:
    with open(path, "wb") as f:
      f.write(kept)
  return dropped


def record_step(line: bytes) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def jsonable(v):
  v = np.asarray(v) if isinstance(v, (jax.Array, np.ndarray, np.generic)) else v
  if isinstance(v, np.ndarray):
    v = v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def progress_bar(start: int, total: int, enabled: bool):
  """The tqdm bar of the training steps (process 0 only)."""
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
