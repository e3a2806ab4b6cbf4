"""Export an adapted model to the plain Hugging Face layout of its family (transformers loads it;
tests/test_export.py and tests/test_families_train.py check it).

LoRA's pairs are merged into their weights (W + (alpha / r) A B, `lora.merge`), the routed
experts' per-expert pairs included; the pairs themselves go to an adapter-only export beside it
in PEFT's layout (`peft_adapter.py`, `workdir/hf_adapter`). Two DES-MoE additions are not part
of that architecture:
* duplicated experts are merged back (`specialization.merge_copies`: each expert becomes the
  average of its versions), so the served model needs no domain id;
* the adaptive router (an MLP) is FOLDED into a linear router: per MoE layer, a least-squares
  fit W = argmin ||H W - R_adapt(H)||^2 on hidden states H that the adapted model's routers see
  on held-out text. The fit is reported honestly: top-k agreement (tokens whose expert SET is
  unchanged) measured end to end, the folded model against the adapted one, on tokens NOT used
  for the fit, and both models' loss on them. The exact adapted router stays in the orbax
  checkpoint, which `eval.py` evaluates directly.
Every other tensor is exported exactly.

It runs where training ran, at any scale, never gathering the model onto one device (a
multi-host DeepSeek-V2-Lite run holds ~31 GB of bf16 weights that no single chip can):
* the fit's statistics, H^T H [L, D, D] and H^T R [L, D, E], come from jitted programs over the
  model's own mesh and shardings; each layer reduces its router inputs inside the layer loop
  (`return_routing=<function>`), so the [L, T, D] inputs of a batch never exist. They use a
  bounded sample, the first `fold_tokens` real held-out tokens, streamed batch by batch.
  The per-layer systems (D x D, D = d_model) are solved on the host in float64, one layer
  gathered at a time;
* the agreement check runs the adapted and the folded model over the same mesh on at most
  `check_tokens` further tokens, batch by batch, keeping only scalars and top-k ids;
* `convert.save_pretrained` gathers one tensor (one layer of a stacked leaf) at a time, and
  process 0 writes.
In a multi-process run every process calls `export_hf` with the same batches (its gathers and
jitted programs are collectives).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from desmoe_jax import distributed, lora
from desmoe_jax.convert import save_pretrained
from desmoe_jax.moe.routing import LinearRouter
from desmoe_jax.nn.layers import stack_modules
from desmoe_jax.peft_adapter import save_adapter
from desmoe_jax.router import AdaptiveRouter
from desmoe_jax.sharding import constrain
from desmoe_jax.specialization import merge_copies

# Defaults of `export.fold_tokens` / `export.check_tokens` (configs/six_domains.py): one paper
# batch (32 x 4096) to fit, i.e. 64 tokens per unknown of a V2-Lite router column
# (d_model = 2048), and half of that to check the folded routing against the adapted one.
FOLD_TOKENS = 131072
CHECK_TOKENS = 65536

_HIGHEST = jax.lax.Precision.HIGHEST  # TPUs multiply float32 in bf16 passes by default


def _check_budget(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"export.{name}={value!r}: expected a positive number of tokens")
  return int(value)


def _real_tokens(batch) -> np.ndarray:
  """[B, S] bool: real (non-padding) tokens; a batch without segment_ids is all real."""
  tokens = np.asarray(batch["tokens"])
  seg = batch.get("segment_ids")
  return np.ones(tokens.shape, bool) if seg is None else np.asarray(seg) > 0


def take_tokens(batches: list[dict], budget: int) -> list[tuple[dict, np.ndarray]]:
  """The leading batches that hold the first `budget` real tokens (row-major order), each with
  its mask [B, S] of the tokens taken (the last batch possibly in part). Why a token budget and
  not a batch count: the fit's cost and its statistical quality are both set by tokens."""
  out, left = [], budget
  for b in batches:
    if left <= 0:
      break
    real = _real_tokens(b)
    keep = real & (np.cumsum(real.reshape(-1)).reshape(real.shape) <= left)
    left -= int(keep.sum())
    out.append((b, keep))
  return out


def _inputs(batch, mask_bs) -> dict[str, np.ndarray]:
  """The model inputs of one batch, the token mask and the next-token loss weights, on the
  host (placed by the caller, over the mesh or on one device)."""
  tokens = np.asarray(batch["tokens"], np.int32)
  b, s = tokens.shape
  seg = batch.get("segment_ids")
  seg = np.ones((b, s), np.int32) if seg is None else np.asarray(seg, np.int32)
  pos = batch.get("positions")
  pos = (np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)) if pos is None
         else np.asarray(pos, np.int32))
  # next-token loss weights [B, S-1]: within a segment, target taken
  loss_w = ((seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & mask_bs[:, 1:]).astype(np.float32)
  return {"tokens": tokens, "segment_ids": seg, "positions": np.ascontiguousarray(pos),
          "mask": mask_bs.astype(np.float32), "loss_w": loss_w}


def _forward(graphdef, state, x, per_layer):
  return nnx.merge(graphdef, state)(x["tokens"], segment_ids_bs=x["segment_ids"],
                                    positions_bs=x["positions"], return_routing=per_layer)


def _fold_statistics(graphdef, state, x):
  """(H^T H [L, D, D], H^T R [L, D, E]) in float32 over the masked tokens of one batch.

  Reduced inside the layer loop: the router inputs of a layer ([T, D], split over the batch
  axes) become a [D, D] partial sum that the compiler all-reduces over the mesh. The logits of
  the language-model head are unused and compiled away."""
  m_t = x["mask"].reshape(-1)

  def per_layer(routing):
    h_td = routing.inputs.astype(jnp.float32)
    hm_td = h_td * m_t[:, None]
    gram_dd = jnp.einsum("td,tf->df", hm_td, h_td, precision=_HIGHEST)
    cross_de = jnp.einsum("td,te->de", hm_td, routing.logits.astype(jnp.float32),
                          precision=_HIGHEST)
    return constrain(gram_dd, ("embed", None)), cross_de

  return _forward(graphdef, state, x, per_layer).routing


def _topk_and_loss(graphdef, state, x):
  """Top-k expert ids [L, T, K] per layer and the summed next-token loss of the masked
  targets (logsumexp - target logit: no second [B, S, V] array)."""
  out = _forward(graphdef, state, x, lambda r: r.topk_ids)
  logits = out.logits[:, :-1].astype(jnp.float32)
  target = jnp.take_along_axis(logits, x["tokens"][:, 1:, None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target
  return out.routing, jnp.sum(nll * x["loss_w"])


def _agreement(ids_a, ids_f, mask_bs):
  """Number of (layer, masked token) pairs whose top-k expert SET is the same in both."""
  same_lt = jnp.all(jnp.sort(ids_a, axis=-1) == jnp.sort(ids_f, axis=-1), axis=-1)
  return jnp.sum(same_lt * mask_bs.reshape(1, -1))


def solve_fold(gram, cross) -> np.ndarray:
  """W [L, D, E] float32 = (H^T H + ridge I)^-1 H^T R per layer, in float64 on the host.

  One layer gathered at a time (16 MiB for V2-Lite's D = 2048), so host memory is bounded by a
  layer whatever the depth. The ridge (1e-6 of the mean diagonal) only guards directions the
  sample never visits. Every process solves the same system the same way."""
  out = []
  for layer in range(gram.shape[0]):
    g = np.asarray(distributed.to_host(gram[layer]), np.float64)      # [D, D]
    c = np.asarray(distributed.to_host(cross[layer]), np.float64)     # [D, E]
    ridge = 1e-6 * np.trace(g) / g.shape[0]
    out.append(np.linalg.solve(g + ridge * np.eye(g.shape[0]), c).astype(np.float32))
  return np.stack(out)


def fold_router(model, batches: list[dict], fit_fraction: float = 0.75, *,
                fold_tokens: int = FOLD_TOKENS, check_tokens: int = CHECK_TOKENS,
                batch_sharding=None) -> dict:
  """Replaces the adaptive routers of `model` by least-squares linear routers (in place).

  `batches`: held-out packed batches (tokens, and segment_ids / positions when packed). The fit
  uses the first `fold_tokens` real tokens of the first `fit_fraction` of them (at least one,
  never the last); the agreement check uses at most `check_tokens` real tokens of the batches
  after the fit's. `batch_sharding`: the mesh layout of a batch (the trainer's), with the model
  already sharded on that mesh and the mesh in context (`jax.set_mesh`); None: one device.
  """
  moe = model.moe_blocks()
  if not isinstance(moe.gate, AdaptiveRouter):
    return {"router": "linear (nothing to fold)"}
  fold_tokens = _check_budget("fold_tokens", fold_tokens)
  check_tokens = _check_budget("check_tokens", check_tokens)
  if len(batches) < 2:
    raise ValueError("fold_router needs at least 2 held-out batches (fit and check); the "
                     "trainer folds on its evaluation sets (config.eval.loss_batches)")
  n_fit_max = min(len(batches) - 1, max(1, int(round(len(batches) * fit_fraction))))
  fit = take_tokens(batches[:n_fit_max], fold_tokens)
  check = take_tokens(batches[len(fit):], check_tokens)
  if batch_sharding is not None:
    place = lambda x: distributed.global_batch(x, batch_sharding)
  else:
    place = lambda x: {k: jnp.asarray(v) for k, v in x.items()}

  graphdef_a, state_a = nnx.split(model)
  stats_fn = jax.jit(lambda st, x: _fold_statistics(graphdef_a, st, x))
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
  stats, n_fit_tokens = None, 0
  for b, mask in fit:   # streamed: one batch's activations at a time
    new = stats_fn(state_a, place(_inputs(b, mask)))
    stats = new if stats is None else add(stats, new)
    n_fit_tokens += int(mask.sum())
  if n_fit_tokens == 0:
    raise ValueError(f"the {len(fit)} held-out batch(es) for the router fold hold no real token "
                     "(segment_ids all 0): nothing to fit the folded router on")
  gram, cross = stats
  w = solve_fold(gram, cross)
  del stats, gram, cross

  # The folded model shares every array but the router with the adapted one (no copy).
  old = moe.gate.teacher[...]  # [L, D, E], laid out as the new router weight will be
  gate = stack_modules([LinearRouter(model.config, rngs=nnx.Rngs(0)) for _ in range(w.shape[0])])
  gate.weight.set_value(distributed.global_array(w, old.sharding))
  moe.gate = gate
  graphdef_f, state_f = nnx.split(model)

  route_a = jax.jit(lambda st, x: _topk_and_loss(graphdef_a, st, x))
  route_f = jax.jit(lambda st, x: _topk_and_loss(graphdef_f, st, x))
  agreement = jax.jit(_agreement)
  agree, loss_a, loss_f, n_check_tokens, n_loss = 0.0, 0.0, 0.0, 0, 0.0
  for b, mask in check:
    host = _inputs(b, mask)
    x = place(host)
    ids_a, nll_a = route_a(state_a, x)
    ids_f, nll_f = route_f(state_f, x)
    agree += float(agreement(ids_a, ids_f, x["mask"]))  # scalars: replicated, readable anywhere
    loss_a, loss_f = loss_a + float(nll_a), loss_f + float(nll_f)
    n_check_tokens += int(mask.sum())
    n_loss += float(host["loss_w"].sum())
  layers = w.shape[0]
  return {"router": "adaptive router folded into a linear router (least squares)",
          "fit_batches": len(fit), "fit_tokens": n_fit_tokens,
          "check_batches": len(check), "check_tokens": n_check_tokens,
          "topk_set_agreement": agree / max(n_check_tokens * layers, 1),
          "heldout_loss_adapted": loss_a / max(n_loss, 1),
          "heldout_loss_folded": loss_f / max(n_loss, 1)}


def export_hf(model, path: str, *, tokenizer_dir: str | None, fit_batches: list[dict],
              dtype=None, fold_tokens: int = FOLD_TOKENS, check_tokens: int = CHECK_TOKENS,
              batch_sharding=None, adapter_path: str | None = None,
              base_model: str | None = None, trained_dropout: float = 0.0) -> dict:
  """Writes `path` in the HF layout of the model's family (merging copies, folding the ALR) and
  a `desmoe_export.json` report next to it. `model` is modified in place. Every process of a
  multi-process run calls it; process 0 writes. See `fold_router` for the other arguments.
  `adapter_path`: a model with LoRA pairs also gets its adapter-only export there, before they
  are merged (peft_adapter.py: PEFT's layout over `base_model`; trained with lora.dropout
  `trained_dropout`); the report's "adapter" says whether it was written, or why not."""
  des = model.moe_blocks().des
  report = {"merged_expert_copies": des is not None and des.expert_copies is not None,
            "merged_lora": lora.attached(model)}
  if adapter_path is not None and lora.attached(model):
    report["adapter"] = save_adapter(model, adapter_path, base_model=base_model,
                                     trained_dropout=trained_dropout)
  lora.merge(model)   # W + (alpha / r) A B: the routed experts' pairs too
  merge_copies(model)
  report.update(fold_router(model, fit_batches, fold_tokens=fold_tokens,
                            check_tokens=check_tokens, batch_sharding=batch_sharding))
  # DES-MoE state (correlation, masks) is not part of the HF architecture: drop it.
  model.moe_blocks().des = None
  save_pretrained(model, path, dtype=dtype, tokenizer_dir=tokenizer_dir)
  if jax.process_index() == 0:
    with open(os.path.join(path, "desmoe_export.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report
