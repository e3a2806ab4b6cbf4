"""The decoder-only MoE causal LM every family shares (DeepSeek-V2/V3, Qwen3-MoE, OLMoE,
Mixtral, Qwen2-MoE), numerically matching each family's transformers model.

A family (families/) contributes its config reader and key mapping; the model is pre-norm
decoder layers: x + attn(norm(x)), then x + mlp(norm(x)), with MLA or GQA attention
(`config.attention`) and a dense MLP or the sparse MoE block (moe/block.py).

Layout: the first `first_k_dense_replace` decoder layers (dense MLP) are a plain list; the MoE
layers are ONE stacked module whose every parameter has a leading `layers` axis, applied with
`jax.lax.scan` (or an unrolled loop, `scan_layers=False`). One compiled layer body keeps compile
time flat in depth (26 MoE layers for V2-Lite), and per-layer state such as DES-MoE's correlation
matrices becomes a plain stacked array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from desmoe_jax import losses
from desmoe_jax.config import ModelConfig
from desmoe_jax.moe.block import Adaptation, MoEBlock
from desmoe_jax.moe.routing import Routing
from desmoe_jax.nn.attention_gqa import GQAttention
from desmoe_jax.nn.attention_mla import MLAttention, attention_mask
from desmoe_jax.nn.layers import MLP, Embed, Linear, RMSNorm, stack_modules
from desmoe_jax.sharding import constrain


ACTIVATIONS = ("batch", None, None)  # [batch, seq, d_model]: split over the batch only


@struct.dataclass
class ModelOutput:
  logits: jax.Array | None          # [batch, seq, vocab]; None with logits=False
  aux_loss: jax.Array               # scalar: DeepSeek balance loss summed over MoE layers
  routing: Routing | None = None    # stacked over MoE layers: [L, batch*seq, ...]; if requested
  kd_loss: jax.Array | None = None  # scalar: ALR distillation loss, mean over MoE layers
  domain_counts: jax.Array | None = None  # [L, D, E] tokens of domain d routed to e (DGES)
  domain_tokens: jax.Array | None = None  # [D] real tokens per domain in the batch
  latents: "ModelCache | None" = None     # per-layer decode cache contents; if return_latents
  hidden: jax.Array | None = None   # [batch, seq, d_model] final-norm output; with logits=False
  grad_acc: object | None = None    # the `grad_acc` given to the call, passed on (see __call__)


@struct.dataclass
class ModelCache:
  """Decode cache of the whole model: one cache per dense layer, one stacked for MoE layers
  (MLA's `KVCache` or GQA's `GQACache`, each with a `grow(n)`)."""
  dense: tuple
  moe: object | None

  def grow(self, n: int) -> "ModelCache":
    return ModelCache(dense=tuple(c.grow(n) for c in self.dense),
                      moe=None if self.moe is None else self.moe.grow(n))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.runtime.param_dtype)
    self.self_attn = (MLAttention if cfg.attention == "mla" else GQAttention)(cfg, rngs=rngs)
    if moe:
      self.mlp = MoEBlock(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias,
                     dtype=jnp.dtype(cfg.runtime.dtype), param_dtype=pd, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
    self.is_moe = moe

  def __call__(self, x_bsd, positions_bs, mask_b1qk, token_mask_bs, adapt=None,
               return_latents: bool = False):
    """Returns (x, Routing or None, LayerStats or None, this layer's decode cache or None)."""
    attn = self.self_attn(self.input_layernorm(x_bsd), positions_bs, mask_b1qk,
                          return_latents=return_latents)
    attn, latents = attn if return_latents else (attn, None)
    x_bsd = x_bsd + attn
    y_bsd, routing, stats = self._mlp(self.post_attention_layernorm(x_bsd), token_mask_bs, adapt)
    return constrain(x_bsd + y_bsd, ACTIVATIONS), routing, stats, latents

  def _mlp(self, h_bsd, token_mask_bs, adapt):
    if self.is_moe:
      return self.mlp(h_bsd, token_mask_bs, adapt)
    return self.mlp(h_bsd), None, None

  def decode(self, x_b1d, positions_b1, cache, index, key_valid_bt):
    """One token per row with a KV cache; returns (x, updated cache)."""
    attn, cache = self.self_attn.decode(self.input_layernorm(x_b1d), positions_b1, cache, index,
                                        key_valid_bt)
    x_b1d = x_b1d + attn
    y, _, _ = self._mlp(self.post_attention_layernorm(x_b1d), None, None)
    return x_b1d + y, cache


_LAYER_INPUT = "moe_layer_input"  # checkpoint_name of a scanned MoE layer's input


def remat_policy(name: str):
  """The jax.checkpoint policy of config.remat (see config.REMAT_POLICIES for what each keeps)."""
  cp = jax.checkpoint_policies
  return {
      "full": None,
      "dots": cp.dots_with_no_batch_dims_saveable,
      "dots_offload": cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
      # Only the named layer input is a residual, and it lives on the host; everything else
      # is recomputed.
      "full_offload": cp.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=[_LAYER_INPUT],
          offload_src="device", offload_dst="pinned_host"),
  }[name]


class MoECausalLM(nnx.Module):
  """`model(input_ids).logits` [batch, seq, vocab]; `model.moe_blocks()` is what DES-MoE uses."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd, dt = jnp.dtype(cfg.runtime.param_dtype), jnp.dtype(cfg.runtime.dtype)
    self.config = cfg
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pd, rngs=rngs)
    self.dense_layers = nnx.List([DecoderLayer(cfg, moe=False, rngs=rngs)
                                  for _ in range(cfg.num_dense_layers)])
    self.moe_layers = nnx.data(
        stack_modules([DecoderLayer(cfg, moe=True, rngs=rngs) for _ in range(cfg.num_moe_layers)])
        if cfg.num_moe_layers else None)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
    self.lm_head = nnx.data(
        None if cfg.tie_word_embeddings else
        Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pd,
               rngs=rngs))

  def moe_blocks(self) -> MoEBlock | None:
    """All MoE blocks as ONE module whose every Variable has a leading [num_moe_layers] axis
    (the layers are stacked for lax.scan): the one place DES-MoE, the optimizer, export and
    ESFT reach the MoE layers. None for a model without MoE layers."""
    return None if self.moe_layers is None else self.moe_layers.mlp

  def __call__(self, input_ids_bs, *, positions_bs=None, segment_ids_bs=None,
               return_routing=False, adapt: Adaptation | None = None,
               return_latents: bool = False, logits: bool = True,
               grad_acc=None) -> ModelOutput:
    """input_ids [batch, seq] -> ModelOutput(logits [batch, seq, vocab], aux_loss, ...).

    segment_ids: packed-example ids, 0 = padding; attention never crosses segments.
    positions: RoPE positions (restart at 0 in each packed example); default 0..seq-1.
    adapt: DES-MoE per-call inputs (domain ids, router gradient scale, gradient isolation).
    return_routing: True for each MoE layer's Routing (stacked); "inputs" adds the hidden states
      the routers saw ([L, T, D], e.g. to fit an exported router). A function of one layer's
      Routing (inputs included) is applied inside the layer loop and its results come back
      stacked over layers: statistics of the router inputs without the [L, T, D] array (the
      export's router fold, export.py).
    return_latents: also return what a decode cache stores (see generate.py).
    logits: False returns the final hidden states (`hidden`) instead of the logits, for a loss
      that never materialises them (`token_losses`, `model.ce_chunk`).
    grad_acc: gradient accumulation in place (train.microbatches): an nnx.State of some of the
      stacked MoE-layer parameters' paths (relative to `moe_layers`), a running gradient sum.
      It is carried through the layer loop and returned as `out.grad_acc`; in the backward pass
      each layer's gradient of those parameters is ADDED into it at the layer's index
      (`accumulate_into`), instead of becoming a stacked gradient of its own. Differentiate the
      loss and `out.grad_acc` with respect to the given `grad_acc`, with `grad_acc` itself as
      the cotangent of `out.grad_acc`: the result is grad_acc + this call's gradient, built in
      one buffer. The parameters themselves get no gradient through this path (pass them under
      stop_gradient).
    """
    input_ids_bs = jnp.asarray(input_ids_bs)
    b, s = input_ids_bs.shape
    if segment_ids_bs is None:
      segment_ids_bs = jnp.ones((b, s), jnp.int32)
    if positions_bs is None:
      positions_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = attention_mask(segment_ids_bs)
    token_mask = segment_ids_bs != 0

    x = constrain(self.embed_tokens(input_ids_bs), ACTIVATIONS)
    dense_latents = []
    for layer in self.dense_layers:
      if self.config.runtime.remat != "none" and not return_latents:
        x = self._remat_dense(layer, x, positions_bs, mask, token_mask)
        dense_latents.append(None)
        continue
      x, _, _, latents = layer(x, positions_bs, mask, token_mask, return_latents=return_latents)
      dense_latents.append(latents)

    out = ModelOutput(logits=None, aux_loss=jnp.zeros((), jnp.float32), grad_acc=grad_acc)
    moe_latents = None
    if self.moe_layers is not None:
      x, routing, stats, moe_latents, grad_acc = self._moe_stack(
          x, positions_bs, mask, token_mask, return_routing, adapt, return_latents, grad_acc)
      out = out.replace(grad_acc=grad_acc)
      out = out.replace(aux_loss=stats.balance.sum(), kd_loss=stats.kd.mean(), routing=routing)
      if stats.domain_counts is not None:
        out = out.replace(domain_counts=stats.domain_counts, domain_tokens=stats.domain_tokens[0])
    if return_latents:
      out = out.replace(latents=ModelCache(dense=tuple(dense_latents), moe=moe_latents))

    x = self.norm(x)
    if not logits:
      return out.replace(hidden=x)
    logits = self.lm_head(x) if self.lm_head is not None else self.embed_tokens.attend(x)
    return out.replace(logits=constrain(logits, ("batch", None, "vocab")))

  def output_kernel(self):
    """The output projection [d_model, vocab] (the tied embedding's transpose if tied)."""
    if self.lm_head is not None:
      return self.lm_head.kernel[...]
    return self.embed_tokens.embedding[...].T

  def token_losses(self, out: ModelOutput, tokens_bs):
    """Next-token cross-entropy [B, S] (position 0 gets 0): plain from the logits of a forward
    pass made with them, else from its hidden states (`logits=False`, what the train step does)
    through `losses.chunked_token_losses`, `model.ce_chunk` positions at a time (0: the whole
    sequence as one chunk). Even as one chunk its custom backward (softmax - one-hot, then the
    two matmuls) is ~2x faster on XLA:CPU than autodiff through the logits (bench/RESULTS.md,
    "Whole train step"); with ce_chunk > 0 the batch's float32 logits never exist at once."""
    if out.hidden is not None:
      return losses.chunked_token_losses(out.hidden, self.output_kernel(), tokens_bs,
                                         self.config.runtime.ce_chunk or tokens_bs.shape[1])
    return losses.token_losses(out.logits, tokens_bs)

  def _remat_dense(self, layer, x, positions_bs, mask, token_mask):
    """A dense layer under `model.remat`'s policy, as the MoE layers are: without it, its
    saved activations (V2-Lite: the [16, S, S] attention scores and the [S, 10944] MLP
    intermediates per sequence) stay alive for the backward of every step that trains
    anything before or in it (FFT, DES-MoE's router+backbone warm-up)."""
    graphdef, state = nnx.split(layer)

    def run(state, h):
      return nnx.merge(graphdef, state)(h, positions_bs, mask, token_mask)[0]

    return jax.checkpoint(run, policy=remat_policy(self.config.runtime.remat))(state, x)

  def _moe_stack(self, x, positions_bs, mask, token_mask, return_routing, adapt,
                 return_latents=False, grad_acc=None):
    """Applies the stacked MoE layers; per-layer outputs come back stacked on axis 0.
    Returns (x, routing, stats, latents, grad_acc passed through; see __call__)."""
    graphdef, state = nnx.split(self.moe_layers)

    def body(carry, xs):
      h, acc = carry
      layer_state, index = xs
      if acc is not None:  # each accumulated weight of this layer, tied to its slice of acc
        flat = dict(nnx.to_flat_state(layer_state))
        tied = []
        for path, var in nnx.to_flat_state(acc):
          w, a = accumulate_into(flat[path][...], var[...], index)
          flat[path] = flat[path].replace(w)
          tied.append((path, var.replace(a)))
        layer_state, acc = nnx.from_flat_state(list(flat.items())), nnx.from_flat_state(tied)
      if self.config.runtime.remat == "full_offload":  # every use of h goes through the named copy
        h = checkpoint_name(h, _LAYER_INPUT)
      layer = nnx.merge(graphdef, layer_state)
      h, routing, stats, latents = layer(h, positions_bs, mask, token_mask, adapt,
                                         return_latents=return_latents)
      if callable(return_routing):  # reduced per layer inside the loop (see __call__)
        routing = return_routing(routing)
      elif return_routing != "inputs":  # the [T, D] router inputs only when asked for
        routing = routing.replace(inputs=None)
      return (h, acc), (routing if return_routing else None, stats, latents)

    if self.config.runtime.remat != "none":
      body = jax.checkpoint(body, policy=remat_policy(self.config.runtime.remat))
    layers = jnp.arange(self.config.num_moe_layers, dtype=jnp.int32)
    (x, grad_acc), (routing, stats, latents) = self._over_layers(body, (x, grad_acc),
                                                                 (state, layers))
    return x, routing, stats, latents, grad_acc

  def _over_layers(self, body, carry, xs):
    """lax.scan of `body` over the stacked MoE layers, or the same loop unrolled."""
    if self.config.runtime.scan_layers:
      return jax.lax.scan(body, carry, xs)
    outs = []
    for i in range(self.config.num_moe_layers):
      carry, out = body(carry, jax.tree.map(lambda a: a[i], xs))
      outs.append(out)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)

  def decode_step(self, tokens_b1, positions_b1, cache: ModelCache, index, key_valid_bt):
    """Logits [B, 1, vocab] of one new token per row, and the cache with it written at slot
    `index` (see generate.py)."""
    x = self.embed_tokens(tokens_b1)
    dense = []
    for layer, layer_cache in zip(self.dense_layers, cache.dense):
      x, layer_cache = layer.decode(x, positions_b1, layer_cache, index, key_valid_bt)
      dense.append(layer_cache)
    moe = cache.moe
    if self.moe_layers is not None:
      graphdef, state = nnx.split(self.moe_layers)

      def body(h, xs):
        layer_state, layer_cache = xs
        return nnx.merge(graphdef, layer_state).decode(h, positions_b1, layer_cache, index,
                                                       key_valid_bt)

      x, moe = self._over_layers(body, x, (state, moe))
    x = self.norm(x)
    logits = self.lm_head(x) if self.lm_head is not None else self.embed_tokens.attend(x)
    return logits, ModelCache(dense=tuple(dense), moe=moe)


@jax.custom_vjp
def accumulate_into(w, acc, index):
  """(w, acc) unchanged: `w` is layer `index`'s slice of a stacked weight, `acc` the running
  gradient sum of the whole stack [L, ...], carried through the layer loop.

  The backward pass adds w's cotangent into acc's at `index` (an in-place update of the carried
  buffer) and gives w none: a loop over microbatches that feeds its running sum in this way
  holds one gradient-sized buffer, where summing each microbatch's gradient into it would hold
  two (the sum, and the stacked gradient the layer loop's backward builds for every microbatch;
  V2-Lite on a v5e-8: 3.35 GiB per chip each for the routed experts, docs/SCALING.md)."""
  return w, acc


def _accumulate_into_fwd(w, acc, index):
  return (w, acc), index


def _accumulate_into_bwd(index, cotangents):
  ct_w, ct_acc = cotangents
  return None, ct_acc.at[index].add(ct_w.astype(ct_acc.dtype)), None


accumulate_into.defvjp(_accumulate_into_fwd, _accumulate_into_bwd)


# The name this model had when DeepSeek-V2 was its only family (public API since then).
DeepseekV2ForCausalLM = MoECausalLM


def init_model(cfg: ModelConfig, seed: int = 0) -> MoECausalLM:
  """A randomly initialised model (normal(0.02) weights, unit norms), as HF's _init_weights."""
  return MoECausalLM(cfg, rngs=nnx.Rngs(seed))
