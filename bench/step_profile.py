"""Where a compiled train step's time goes on XLA:CPU, per part of the model (bench/train_step.py
--profile).

XLA:CPU's thunk executor records one profiler event per executed HLO instruction (a fusion, a
dot, a scatter, ...), named by the instruction. `jax.profiler` traces a few steps; each leaf
instruction's time is summed and attributed to a part through the `op_name` metadata of the
compiled HLO, which carries JAX's name stack (forward and backward: `transpose(jvp(scope))`).
The model has no name scopes of its own, so `scoped()` wraps the functions that make each part
in `jax.named_scope` for the duration of the trace (bench-only: the library is untouched and
the numerics are the same). Control-flow instructions (while, conditional, call) are left out:
their events enclose their bodies' events.

Parts: embedding (lookup and its gradient), attention, norms, dense MLP, MoE routing (router,
top-k, balance loss), MoE dispatch (the tiled kernel's sort/layout), MoE tiled kernel (the
grouped SwiGLU and its backward, gathers and scatters included), MoE combine (the weighted sum
over k and reshapes), shared experts, DES-MoE hooks (masks, isolation, statistics, DGES
update, KD), loss+logits (lm head and cross-entropy), optimizer (clip + AdamW + masks),
metrics, and "layer loop / other" (what no scope covers: the scan over the stacked layers'
slices and copies, parameter plumbing).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import re
import tempfile

import jax

# scope name -> part. The innermost scope of an instruction decides, "linear" only where no
# other scope holds it (the lm head).
PARTS = {
    "p_embed": "embedding",
    "p_attention": "attention",
    "p_norm": "norms",
    "p_mlp": "dense MLP",                  # "shared experts" under p_moe
    "p_router": "MoE routing",
    "p_layout": "MoE dispatch (sort)",
    "p_experts": "MoE tiled kernel",
    "p_moe": "MoE combine",
    "p_des": "DES-MoE hooks",
    "p_loss": "loss+logits",
    "p_linear": "loss+logits",
    "p_optimizer": "optimizer",
    "p_metrics": "metrics",
}
ORDER = ("embedding", "attention", "norms", "dense MLP", "MoE routing", "MoE dispatch (sort)",
         "MoE tiled kernel", "MoE combine", "shared experts", "DES-MoE hooks", "loss+logits",
         "optimizer", "metrics", "layer loop / other")


def _wrap(obj, attr, scope):
  fn = getattr(obj, attr)

  def wrapped(*a, **k):
    with jax.named_scope(scope):
      return fn(*a, **k)

  setattr(obj, attr, wrapped)
  return obj, attr, fn


@contextlib.contextmanager
def scoped():
  """Named scopes around every part while the step is traced (see the module docstring)."""
  from desmoe_jax import losses, model, optim, router, specialization
  from desmoe_jax import train_step as ts
  from desmoe_jax.moe import block, gmm, routing
  from desmoe_jax.nn import attention_gqa, attention_mla, layers
  targets = [
      (layers.Embed, "__call__", "p_embed"), (layers.Embed, "attend", "p_linear"),
      (layers.RMSNorm, "__call__", "p_norm"), (layers.MLP, "__call__", "p_mlp"),
      (layers.Linear, "__call__", "p_linear"),
      (attention_mla.MLAttention, "__call__", "p_attention"),
      (attention_gqa.GQAttention, "__call__", "p_attention"),
      (block.MoEBlock, "__call__", "p_moe"),
      (routing.LinearRouter, "route", "p_router"), (router.AdaptiveRouter, "route", "p_router"),
      (block, "select_experts", "p_router"), (block, "balance_loss", "p_router"),
      (block, "expert_outputs", "p_experts"), (gmm, "tile_layout", "p_layout"),
      (specialization.DesState, "dispatch", "p_des"),
      (specialization.DesState, "isolate", "p_des"),
      (specialization.DesState, "statistics", "p_des"),
      (router.AdaptiveRouter, "teacher_logits", "p_des"),
      (router, "kd_loss", "p_des"),
      (model.MoECausalLM, "token_losses", "p_loss"), (losses, "token_losses", "p_loss"),
      (ts, "per_domain", "p_loss"),
      (ts, "expert_update_masks", "p_des"), (ts, "dges_update", "p_des"),
      (ts, "step_metrics", "p_metrics"),
  ]
  saved = []
  try:
    for obj, attr, scope in targets:
      if hasattr(obj, attr):
        saved.append(_wrap(obj, attr, scope))
    make_update = optim.make_update  # bound when the step is made: scope what it returns

    def scoped_make_update(*a, **k):
      update = make_update(*a, **k)

      def run(*aa, **kk):
        with jax.named_scope("p_optimizer"):
          return update(*aa, **kk)
      return run

    optim.make_update = scoped_make_update
    saved.append((optim, "make_update", make_update))
    yield
  finally:
    for obj, attr, fn in reversed(saved):
      setattr(obj, attr, fn)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+.*?\s([a-z][\w\-]*)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_SCOPE = re.compile(r"\b(p_[a-z]+)\b")
_CONTROL = {"while", "conditional", "call"}


def part_of(op_name: str) -> str:
  scopes = _SCOPE.findall(op_name)
  if not scopes:
    return "layer loop / other"
  inner = [s for s in scopes if s != "p_linear"] or scopes
  s = inner[-1]
  if s == "p_mlp" and "p_moe" in scopes:
    return "shared experts"
  return PARTS.get(s, "layer loop / other")


def instruction_parts(hlo_text: str) -> dict:
  """{instruction name: part} of the leaf instructions of a compiled module's HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m or m.group(2) in _CONTROL:
      continue
    op = _OPNAME.search(line)
    out[m.group(1)] = part_of(op.group(1) if op else "")
  return out


def profile(run, hlo_text: str, steps: int = 3, per_instruction=None) -> dict:
  """{part: seconds per step} summed over the leaf instructions executed in `steps` calls of
  `run` (a step, blocking). `per_instruction`: a dict, filled with {instruction: seconds per
  step} (to find the costly instructions of a part)."""
  parts = instruction_parts(hlo_text)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      run()
    jax.profiler.stop_trace()
    path = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[-1]
    data = jax.profiler.ProfileData.from_file(path)
    tot = collections.Counter()
    for plane in data.planes:
      if plane.name != "/host:CPU":
        continue
      for line in plane.lines:
        if line.name == "python":
          continue
        for ev in line.events:
          part = parts.get(ev.name)
          if part is not None:
            tot[part] += ev.duration_ns * 1e-9 / steps
            if per_instruction is not None:
              per_instruction[ev.name] = (per_instruction.get(ev.name, 0.0)
                                          + ev.duration_ns * 1e-9 / steps)
  return dict(tot)


def format_split(split: dict) -> list[str]:
  total = sum(split.values()) or 1.0
  return [f"    {p:<22}{100 * split[p] / total:6.1f}%  {1e3 * split[p]:8.1f} ms" for p in ORDER
          if p in split] + [f"    {'(sum over threads)':<22}{100.0:6.1f}%  {1e3 * total:8.1f} ms"]
