"""Orbax checkpoints of a whole training run: model state (parameters AND DES-MoE state:
correlation matrices, masks, router teachers, copy tables), optimizer state, and a JSON record
(step, phase, data-iterator position, RNG, config, shapes).

Saves are asynchronous, keep the newest `max_to_keep`, and are atomic (orbax writes to a
temporary directory and renames it on commit): a run killed mid-save leaves the previous
checkpoint as the latest one. Restoring takes abstract targets carrying the *current* mesh's
shardings, so a checkpoint written on one mesh restores onto another. Before any array is read,
the stored shapes are compared with what the current config builds, and a mismatch names every
offending key with both shapes instead of failing deep inside orbax.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

MODEL, OPT, META = "model", "opt_state", "meta"


def signature(tree) -> dict[str, list]:
  """{"path/to/leaf": [shape, dtype]} of a pytree of arrays or ShapeDtypeStructs."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    key = key[:-len("/value")] if key.endswith("/value") else key  # nnx.Variable's own node
    out[key] = [list(leaf.shape), str(leaf.dtype)]
  return out


def diff_signatures(stored: dict, current: dict, what: str) -> list[str]:
  problems = []
  for key in sorted(set(stored) | set(current)):
    if key not in current:
      problems.append(f"{what} '{key}' {stored[key][0]} is in the checkpoint but not in the "
                      "model the config builds")
    elif key not in stored:
      problems.append(f"{what} '{key}' {current[key][0]} is built by the config but missing "
                      "from the checkpoint")
    elif stored[key] != current[key]:
      problems.append(f"{what} '{key}': checkpoint has shape {stored[key][0]} {stored[key][1]}, "
                      f"the config builds {current[key][0]} {current[key][1]}")
  return problems


class Checkpointer:
  """Thin, explicit wrapper of `ocp.CheckpointManager` for (model_state, opt_state, meta)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(MODEL, OPT, META))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, model_state, opt_state, meta: dict[str, Any]) -> bool:
    """Starts an (async) save; the JSON record gets the trees' signatures for later checks."""
    meta = dict(meta, step=int(step), signature={MODEL: signature(model_state),
                                                  OPT: signature(opt_state)})
    return self._manager.save(int(step), args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardSave(model_state),
        OPT: ocp.args.StandardSave(opt_state),
        META: ocp.args.JsonSave(meta)}), force=True)

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def restore(self, abstract_model_state, abstract_opt_state=None, step: int | None = None):
    """(model_state, opt_state or None, meta) at `step` (default: latest), laid out like the
    abstract targets (ShapeDtypeStructs with shardings: `abstract_like(tree, shardings)`)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.read_meta(step)
    stored = meta.get("signature", {})
    problems = diff_signatures(stored.get(MODEL, {}), signature(abstract_model_state), "model")
    if abstract_opt_state is not None:
      problems += diff_signatures(stored.get(OPT, {}), signature(abstract_opt_state),
                                  "optimizer state")
    if problems:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match the current config:\n"
                       "  - " + "\n  - ".join(problems[:20])
                       + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    items = {MODEL: ocp.args.StandardRestore(abstract_model_state)}
    if abstract_opt_state is not None:
      items[OPT] = ocp.args.StandardRestore(abstract_opt_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[MODEL], restored.get(OPT) if abstract_opt_state is not None else None, meta

  def wait(self):
    """Blocks until the pending async save is committed."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of `tree` (arrays or structs), with `shardings` (same structure) if given."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
