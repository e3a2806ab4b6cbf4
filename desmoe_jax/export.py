"""Export an adapted model to the plain Hugging Face layout of its family (transformers / vLLM).

Two DES-MoE additions are not part of that architecture:
* duplicated experts are merged back (`specialization.merge_copies`: each expert becomes the
  average of its versions), so the served model needs no domain id;
* the adaptive router (an MLP) is FOLDED into a linear router: per MoE layer, a least-squares
  fit W = argmin ||H W - R_adapt(H)||^2 on hidden states H that the adapted model's routers see
  on held-out text. The fit is reported honestly: top-k agreement (tokens whose expert SET is
  unchanged) measured end to end, the folded model against the adapted one, on tokens NOT used
  for the fit, and both models' loss on them. The exact adapted router stays in the orbax
  checkpoint, which `eval.py` evaluates directly.
Every other tensor is exported exactly.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax.convert import save_pretrained
from desmoe_jax.nn.layers import stack_modules
from desmoe_jax.moe.routing import LinearRouter
from desmoe_jax.router import AdaptiveRouter
from desmoe_jax.specialization import merge_copies


def _routing(model, batch):
  out = model(batch["tokens"], segment_ids_bs=batch.get("segment_ids"),
              positions_bs=batch.get("positions"), return_routing="inputs")
  nll = -jnp.take_along_axis(jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32)),
                             batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  return out.routing, nll


def _topk_sets_equal(ids_a, ids_b):
  return jnp.all(jnp.sort(ids_a, axis=-1) == jnp.sort(ids_b, axis=-1), axis=-1)


def fold_router(model, batches: list[dict], fit_fraction: float = 0.75) -> dict:
  """Replaces the adaptive routers of `model` by least-squares linear routers (in place).

  `batches`: held-out packed batches (tokens, segment_ids, positions). The first
  `fit_fraction` of them fit W; the rest measure the folded model against the adapted one.
  """
  moe = model.moe_blocks()
  if not isinstance(moe.gate, AdaptiveRouter):
    return {"router": "linear (nothing to fold)"}
  if len(batches) < 2:
    raise ValueError("fold_router needs at least 2 held-out batches (fit and check)")
  n_fit = min(len(batches) - 1, max(1, int(round(len(batches) * fit_fraction))))
  graphdef, state = nnx.split(model)
  routing_fn = jax.jit(lambda st, b: _routing(nnx.merge(graphdef, st), b))

  gram, cross = None, None     # per layer: H^T H [L, D, D], H^T R [L, D, E] in float64
  for b in batches[:n_fit]:
    routing, _ = routing_fn(state, b)
    real = np.asarray(b.get("segment_ids", np.ones(b["tokens"].shape))).reshape(-1) > 0
    h = np.asarray(routing.inputs, np.float64)[:, real]         # [L, N, D]
    r = np.asarray(routing.logits, np.float64)[:, real]         # [L, N, E]
    g, c = np.einsum("lnd,lnf->ldf", h, h), np.einsum("lnd,lne->lde", h, r)
    gram, cross = (g, c) if gram is None else (gram + g, cross + c)
  ridge = 1e-6 * np.trace(gram, axis1=1, axis2=2)[:, None, None] / gram.shape[1]
  w = np.linalg.solve(gram + ridge * np.eye(gram.shape[1]), cross).astype(np.float32)

  check = batches[n_fit:]
  adapted = [routing_fn(state, b) for b in check]
  cfg = model.config
  moe.gate = stack_modules([LinearRouter(cfg, rngs=nnx.Rngs(0)) for _ in range(w.shape[0])])
  moe.gate.weight[...] = jnp.asarray(w)
  graphdef, state = nnx.split(model)
  routing_fn = jax.jit(lambda st, b: _routing(nnx.merge(graphdef, st), b))
  agree, n_tokens, loss_a, loss_f, n_loss = 0.0, 0, 0.0, 0.0, 0
  for b, (routing_a, nll_a) in zip(check, adapted):
    routing_f, nll_f = routing_fn(state, b)
    seg = np.asarray(b.get("segment_ids", np.ones(b["tokens"].shape)))
    real = seg.reshape(-1) > 0
    same = np.asarray(_topk_sets_equal(routing_a.topk_ids, routing_f.topk_ids))[:, real]
    agree += same.sum()
    n_tokens += same.size
    target = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
    loss_a += float((np.asarray(nll_a) * target).sum())
    loss_f += float((np.asarray(nll_f) * target).sum())
    n_loss += int(target.sum())
  return {"router": "adaptive router folded into a linear router (least squares)",
          "fit_batches": n_fit, "check_batches": len(check),
          "topk_set_agreement": agree / max(n_tokens, 1),
          "heldout_loss_adapted": loss_a / max(n_loss, 1),
          "heldout_loss_folded": loss_f / max(n_loss, 1)}


def export_hf(model, path: str, *, tokenizer_dir: str | None, fit_batches: list[dict],
              dtype=None) -> dict:
  """Writes `path` in the HF layout of the model's family (merging copies, folding the ALR) and
  a `desmoe_export.json` report next to it. `model` is modified in place."""
  des = model.moe_blocks().des
  report = {"merged_expert_copies": des is not None and des.expert_copies is not None}
  merge_copies(model)
  report.update(fold_router(model, fit_batches))
  # DES-MoE state (correlation, masks) is not part of the HF architecture: drop it.
  model.moe_blocks().des = None
  save_pretrained(model, path, dtype=dtype, tokenizer_dir=tokenizer_dir)
  with open(os.path.join(path, "desmoe_export.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
