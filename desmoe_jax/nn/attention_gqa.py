"""Grouped-query attention with RoPE on whole heads: Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE.

Matches transformers' eager attention of those families: q/k/v projections (optional biases),
optional q/k RMSNorm ("head": per head, Qwen3; "full": over the whole projection, before the
heads are split, OLMoE), optional clamp of q/k/v (OLMoE's clip_qkv), RoPE on halves
(`rotate_half`), keys/values shared by num_attention_heads / num_key_value_heads query heads,
softmax in float32, an optional sliding window (q - k < window, Mixtral/Qwen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from desmoe_jax.config import ModelConfig
from desmoe_jax.nn.attention_mla import dot_product_attention
from desmoe_jax.nn.layers import Linear, RMSNorm
from desmoe_jax.nn.rope import apply_rope, rope_inv_freq


@struct.dataclass
class GQACache:
  """Decode cache of one layer (or stacked over layers on axis 0): rotated keys and values."""
  k: jax.Array  # [B, T, KV, head_dim]
  v: jax.Array  # [B, T, KV, head_dim]

  def grow(self, n: int) -> "GQACache":
    """The same cache with room for `n` more tokens (time is the third axis from the end)."""
    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 3) + [(0, n), (0, 0), (0, 0)])
    return GQACache(k=pad(self.k), v=pad(self.v))


class GQAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                    cfg.gqa_head_dim)
    pd = jnp.dtype(cfg.runtime.param_dtype)
    kw = dict(dtype=jnp.dtype(cfg.runtime.dtype), param_dtype=pd, rngs=rngs)
    self.cfg = cfg
    self.q_proj = Linear(d, h * hd, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
    self.k_proj = Linear(d, kv * hd, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
    self.v_proj = Linear(d, kv * hd, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
    self.o_proj = Linear(h * hd, d, ("heads", "embed"), use_bias=cfg.o_proj_bias, **kw)
    if cfg.qk_norm == "head":
      self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=pd)
      self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=pd)
    elif cfg.qk_norm == "full":
      self.q_norm = RMSNorm(h * hd, cfg.rms_norm_eps, param_dtype=pd)
      self.k_norm = RMSNorm(kv * hd, cfg.rms_norm_eps, param_dtype=pd)
    inv_freq, self.rope_scale = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling,
                                              cfg.max_position_embeddings)
    self.inv_freq = tuple(float(f) for f in inv_freq)  # static: not a parameter

  def _qkv(self, x_bsd, positions_bs):
    """q [B,S,H,hd], k and v [B,S,KV,hd], RoPE applied to q and k."""
    cfg = self.cfg
    b, s, _ = x_bsd.shape
    hd = cfg.gqa_head_dim
    q, k, v = self.q_proj(x_bsd), self.k_proj(x_bsd), self.v_proj(x_bsd)
    if cfg.qk_norm == "full":
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(b, s, -1, hd)
    k = k.reshape(b, s, -1, hd)
    v = v.reshape(b, s, -1, hd)
    if cfg.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = np.asarray(self.inv_freq, np.float32)
    q = apply_rope(q, positions_bs, inv_freq, self.rope_scale, interleaved=False)
    k = apply_rope(k, positions_bs, inv_freq, self.rope_scale, interleaved=False)
    return q, k, v

  def _attend(self, q_bqhd, k_bkgd, v_bkgd, mask_b1qk):
    rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
    k = jnp.repeat(k_bkgd, rep, axis=2)   # head h reads key/value head h // rep, as repeat_kv
    v = jnp.repeat(v_bkgd, rep, axis=2)
    return dot_product_attention(q_bqhd, k, v, mask_b1qk, self.cfg.softmax_scale,
                                 self.cfg.runtime.attention_impl)

  def _window(self, mask_b1qk, q_pos_bq, k_pos_bk):
    if self.cfg.sliding_window is None:
      return mask_b1qk
    near = (q_pos_bq[:, :, None] - k_pos_bk[:, None, :]) < self.cfg.sliding_window
    return mask_b1qk & near[:, None]

  def __call__(self, x_bsd, positions_bs, mask_b1qk, return_latents: bool = False):
    """Full-sequence attention; with `return_latents` also the (k, v) a decode cache stores."""
    b, s, _ = x_bsd.shape
    q, k, v = self._qkv(x_bsd, positions_bs)
    out = self._attend(q, k, v, self._window(mask_b1qk, positions_bs, positions_bs))
    out = self.o_proj(out.reshape(b, s, -1))
    return (out, GQACache(k=k, v=v)) if return_latents else out

  def decode(self, x_b1d, positions_b1, cache: GQACache, index, key_valid_bt):
    """One new token per row: written at slot `index`, attending to the valid slots."""
    b = x_b1d.shape[0]
    q, k, v = self._qkv(x_b1d, positions_b1)
    cache = GQACache(
        k=jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), index, axis=1),
        v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, axis=1))
    t = cache.k.shape[1]
    # every row's slots are its positions shifted by a constant (left padding)
    k_pos_bt = jnp.arange(t)[None, :] - (index - positions_b1[:, :1])
    mask = self._window(key_valid_bt[:, None, None, :], positions_b1, k_pos_bt)
    out = self._attend(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask)
    return self.o_proj(out.reshape(b, 1, -1)), cache
