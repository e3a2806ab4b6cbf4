"""DeepSeek-V2 causal LM in Flax NNX, numerically matching transformers' DeepseekV2ForCausalLM.

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

from desmoe_jax.attention import MLAttention, attention_mask
from desmoe_jax.config import ModelConfig
from desmoe_jax.layers import MLP, Embed, Linear, RMSNorm, stack_modules
from desmoe_jax.moe import Adaptation, MoE
from desmoe_jax.router import Routing


@struct.dataclass
class ModelOutput:
  logits: jax.Array                 # [batch, seq, vocab]
  aux_loss: jax.Array               # scalar: DeepSeek balance loss summed over MoE layers
  routing: Routing | None = None    # stacked over MoE layers: [L, batch*seq, ...]; if requested
  kd_loss: jax.Array | None = None  # scalar: ALR distillation loss, mean over MoE layers
  domain_counts: jax.Array | None = None  # [L, D, E] tokens of domain d routed to e (DGES)
  domain_tokens: jax.Array | None = None  # [D] real tokens per domain in the batch


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.self_attn = MLAttention(cfg, rngs=rngs)
    if moe:
      self.mlp = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias,
                     dtype=jnp.dtype(cfg.dtype), param_dtype=pd, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
    self.is_moe = moe

  def __call__(self, x_bsd, positions_bs, mask_b1qk, token_mask_bs, adapt=None):
    """Returns (x, Routing or None, LayerStats or None)."""
    x_bsd = x_bsd + self.self_attn(self.input_layernorm(x_bsd), positions_bs, mask_b1qk)
    h_bsd = self.post_attention_layernorm(x_bsd)
    if self.is_moe:
      y_bsd, routing, stats = self.mlp(h_bsd, token_mask_bs, adapt)
      return x_bsd + y_bsd, routing, stats
    return x_bsd + self.mlp(h_bsd), None, None


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DeepseekV2ForCausalLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
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

  def __call__(self, input_ids_bs, *, positions_bs=None, segment_ids_bs=None,
               return_routing: bool = False, adapt: Adaptation | None = None) -> ModelOutput:
    """input_ids [batch, seq] -> ModelOutput(logits [batch, seq, vocab], aux_loss, ...).

    segment_ids: packed-example ids, 0 = padding; attention never crosses segments.
    positions: RoPE positions (restart at 0 in each packed example); default 0..seq-1.
    adapt: DES-MoE per-call inputs (domain ids, router gradient scale, gradient isolation).
    """
    cfg = self.config
    input_ids_bs = jnp.asarray(input_ids_bs)
    b, s = input_ids_bs.shape
    if segment_ids_bs is None:
      segment_ids_bs = jnp.ones((b, s), jnp.int32)
    if positions_bs is None:
      positions_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = attention_mask(segment_ids_bs)
    token_mask = segment_ids_bs != 0

    x = self.embed_tokens(input_ids_bs)
    for layer in self.dense_layers:
      x, _, _ = layer(x, positions_bs, mask, token_mask)

    out = ModelOutput(logits=None, aux_loss=jnp.zeros((), jnp.float32))
    if self.moe_layers is not None:
      x, routing, stats = self._moe_stack(x, positions_bs, mask, token_mask, return_routing,
                                          adapt)
      out = out.replace(aux_loss=stats.balance.sum(), kd_loss=stats.kd.mean(), routing=routing)
      if stats.domain_counts is not None:
        out = out.replace(domain_counts=stats.domain_counts, domain_tokens=stats.domain_tokens[0])

    x = self.norm(x)
    logits = self.lm_head(x) if self.lm_head is not None else self.embed_tokens.attend(x)
    return out.replace(logits=logits)

  def _moe_stack(self, x, positions_bs, mask, token_mask, return_routing, adapt):
    """Applies the stacked MoE layers; per-layer outputs come back stacked on axis 0."""
    graphdef, state = nnx.split(self.moe_layers)

    def body(h, layer_state):
      layer = nnx.merge(graphdef, layer_state)
      h, routing, stats = layer(h, positions_bs, mask, token_mask, adapt)
      return h, (routing if return_routing else None, stats)

    if self.config.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.config.remat])
    if self.config.scan_layers:
      x, (routing, stats) = jax.lax.scan(body, x, state)
      return x, routing, stats
    outs = []
    for i in range(self.config.num_moe_layers):
      x, out = body(x, jax.tree.map(lambda a: a[i], state))
      outs.append(out)
    routing, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, routing, stats


def init_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV2ForCausalLM:
  """A randomly initialised model (normal(0.02) weights, unit norms), as HF's _init_weights."""
  return DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(seed))
