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
from desmoe_jax.layers import MLP, Embed, Linear, RMSNorm
from desmoe_jax.moe import MoE
from desmoe_jax.router import Routing


@struct.dataclass
class ModelOutput:
  logits: jax.Array                 # [batch, seq, vocab]
  aux_loss: jax.Array               # scalar: DeepSeek balance loss summed over MoE layers
  routing: Routing | None = None    # stacked over MoE layers: [L, batch*seq, ...]; if requested


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

  def __call__(self, x_bsd, positions_bs, mask_b1qk, token_mask_bs):
    x_bsd = x_bsd + self.self_attn(self.input_layernorm(x_bsd), positions_bs, mask_b1qk)
    h_bsd = self.post_attention_layernorm(x_bsd)
    if self.is_moe:
      y_bsd, routing, aux = self.mlp(h_bsd, token_mask_bs)
      return x_bsd + y_bsd, routing, aux
    return x_bsd + self.mlp(h_bsd), None, jnp.zeros((), jnp.float32)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module whose Variables are the inputs' Variables stacked on a new leading `layers` axis."""
  graphdef, first = nnx.split(modules[0])
  states = [first] + [nnx.split(m)[1] for m in modules[1:]]

  def stack(*variables):
    axes = variables[0].get_metadata().get("logical_axes")
    value = jnp.stack([v[...] for v in variables])
    if axes is None:
      return variables[0].replace(value)
    return variables[0].replace(value, logical_axes=("layers",) + tuple(axes))

  stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


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
               return_routing: bool = False) -> ModelOutput:
    """input_ids [batch, seq] -> ModelOutput(logits [batch, seq, vocab], aux_loss, routing).

    segment_ids: packed-example ids, 0 = padding; attention never crosses segments.
    positions: RoPE positions (restart at 0 in each packed example); default 0..seq-1.
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
    aux = jnp.zeros((), jnp.float32)
    for layer in self.dense_layers:
      x, _, layer_aux = layer(x, positions_bs, mask, token_mask)
      aux = aux + layer_aux

    routing = None
    if self.moe_layers is not None:
      x, routing, moe_aux = self._moe_stack(x, positions_bs, mask, token_mask, return_routing)
      aux = aux + moe_aux.sum()

    x = self.norm(x)
    logits = self.lm_head(x) if self.lm_head is not None else self.embed_tokens.attend(x)
    return ModelOutput(logits=logits, aux_loss=aux, routing=routing)

  def _moe_stack(self, x, positions_bs, mask, token_mask, return_routing):
    graphdef, state = nnx.split(self.moe_layers)

    def body(h, layer_state):
      layer = nnx.merge(graphdef, layer_state)
      h, routing, aux = layer(h, positions_bs, mask, token_mask)
      return h, (routing if return_routing else None, aux)

    if self.config.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.config.remat])
    if self.config.scan_layers:
      x, (routing, aux) = jax.lax.scan(body, x, state)
      return x, routing, aux
    outs = []
    for i in range(self.config.num_moe_layers):
      x, out = body(x, jax.tree.map(lambda a: a[i], state))
      outs.append(out)
    routing, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, routing, aux


def init_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV2ForCausalLM:
  """A randomly initialised model (normal(0.02) weights, unit norms), as HF's _init_weights."""
  return DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(seed))
