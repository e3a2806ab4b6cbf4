"""Multi-head latent attention (MLA) with DeepSeek's decoupled RoPE, including YaRN.

Matches transformers' `DeepseekV2Attention` and `DeepseekV3Attention` (the same MLA):
keys/values are compressed to a `kv_lora_rank` latent (plus one shared rotary key), queries
optionally through a `q_lora_rank` bottleneck; RoPE (nn/rope.py) rotates interleaved pairs
(x[2i], x[2i+1]) like a complex multiply (V3 with rope_interleave=False: halves), in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from desmoe_jax.config import ModelConfig
from desmoe_jax.nn import cpu_attention
from desmoe_jax.nn.blocked_attention import causal_attention
from desmoe_jax.nn.layers import Linear, RMSNorm
from desmoe_jax.nn.rope import apply_rope, rope_inv_freq


def attention_mask(segment_ids_bs, q_positions=None):
  """Boolean [batch, 1, q, k] mask: causal, same packed segment, never padding (segment 0)."""
  s = segment_ids_bs.shape[1]
  causal = jnp.tril(jnp.ones((s, s), jnp.bool_))
  same = segment_ids_bs[:, :, None] == segment_ids_bs[:, None, :]
  valid = (segment_ids_bs != 0)[:, None, :]
  return (causal[None] & same & valid)[:, None]


# tokamax.dot_product_attention implementations per lowering platform, tried in order (tokamax
# moves on at NotImplementedError). All take MLA's unequal head dims (q/k 192, v 128 in V2-Lite)
# without padding V in memory: splash ("mosaic_tpu") and Mosaic GPU read v's own head dim, the
# Triton kernel rounds the block (not the array) to a power of two, "xla" is an einsum. Left out:
# "cudnn", which tokamax reaches through jax.nn with q, k and v padded to the larger head dim
# (V 128 -> 192). The splash kernel takes one unbatched boolean mask, so on TPU the call is
# vmapped over the batch (each row's packed-segment mask is then a dynamic splash mask).
# Pallas kernels cannot be partitioned by XLA's SPMD partitioner and this call is not wrapped in
# shard_map: "tokamax" attention is for single-device programs.
TOKAMAX_ATTENTION = {"tpu": ("mosaic_tpu", "xla"), "cuda": ("mosaic_gpu", "triton", "xla"),
                     "default": ("xla",)}


def _tokamax_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale: float):
  from desmoe_jax.moe.block import import_tokamax  # pylint: disable=import-outside-toplevel
  tokamax = import_tokamax()

  def call(implementation, per_row=False):
    def attend(q, k, v, m):
      return tokamax.dot_product_attention(q, k, v, mask=m, scale=scale,
                                           implementation=implementation)
    return jax.vmap(attend) if per_row else attend

  branches = {p: call(impls, per_row=p == "tpu") for p, impls in TOKAMAX_ATTENTION.items()}
  return jax.lax.platform_dependent(q_bshd, k_bshd, v_bshv, mask_b1qk, **branches)


def dot_product_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale: float, impl: str):
  """Softmax(q k^T * scale + mask) v, softmax in float32 (HF eager semantics).

  impl: "blocked" (the default: the reference's numbers a block of queries at a time, keys after
  the block skipped, scores recomputed in the backward; nn/blocked_attention.py; needs a causal
  mask; lowered for CPU in float32, the C++ kernel of nn/cpu_attention.py does the same),
  "blocked_xla" (nn/blocked_attention.py on every platform, the kernel never), "einsum" (the
  reference), "jax" (jax.nn.dot_product_attention, XLA's attention, with V padded to q's head
  dim), "tokamax" (fused kernels per platform, V unpadded; see
  TOKAMAX_ATTENTION). A query with no key to attend (padding) gets the mean of V from "einsum",
  "jax" and tokamax's XLA path; a fused kernel may give it another value (never a real token's).
  """
  if impl in ("blocked", "blocked_xla") and q_bshd.shape[1] == k_bshd.shape[1]:
    # Blocks skip the keys after each query block, which holds for a sequence attending to
    # itself only; a decode step (a few queries against a longer cache) takes the reference.
    xla = lambda: causal_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale)
    if impl == "blocked" and cpu_attention.supports(q_bshd, k_bshd, v_bshv, mask_b1qk):
      # Chosen when lowering: a program compiled for an accelerator (the compile-only plans of
      # scripts/hlo_check.py trace on a CPU host) gets the XLA path.
      kernel = lambda: cpu_attention.causal_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale)
      return jax.lax.platform_dependent(cpu=kernel, default=xla)
    return xla()
  if impl == "tokamax":
    return _tokamax_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, scale)
  if impl == "jax":
    dv, dq = v_bshv.shape[-1], q_bshd.shape[-1]
    v = jnp.pad(v_bshv, [(0, 0)] * 3 + [(0, dq - dv)]) if dv < dq else v_bshv
    out = jax.nn.dot_product_attention(q_bshd, k_bshd, v, mask=mask_b1qk, scale=scale)
    return out[..., :dv]
  logits_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bshd, k_bshd) * jnp.asarray(scale, q_bshd.dtype)
  big_neg = jnp.finfo(logits_bhqk.dtype).min
  logits_bhqk = jnp.where(mask_b1qk, logits_bhqk, big_neg)
  probs = jax.nn.softmax(logits_bhqk.astype(jnp.float32), axis=-1).astype(q_bshd.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v_bshv)


class MLAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.num_attention_heads
    pd = jnp.dtype(cfg.runtime.param_dtype)
    kw = dict(dtype=jnp.dtype(cfg.runtime.dtype), param_dtype=pd, rngs=rngs)
    self.cfg = cfg
    if cfg.q_lora_rank is None:
      self.q_proj = Linear(d, h * cfg.qk_head_dim, ("embed", "heads"), **kw)
    else:
      self.q_a_proj = Linear(d, cfg.q_lora_rank, ("embed", "q_lora"),
                             use_bias=cfg.attention_bias, **kw)
      # HF builds the two latent norms with the class default eps (1e-6), not rms_norm_eps.
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, param_dtype=pd, axis_name="q_lora")
      self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, ("q_lora", "heads"), **kw)
    self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                     ("embed", "kv_lora"), use_bias=cfg.attention_bias, **kw)
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, param_dtype=pd, axis_name="kv_lora")
    self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                            ("kv_lora", "heads"), **kw)
    self.o_proj = Linear(h * cfg.v_head_dim, d, ("heads", "embed"),
                         use_bias=cfg.attention_bias, **kw)
    inv_freq, self.rope_scale = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta,
                                              cfg.rope_scaling, cfg.max_position_embeddings)
    self.interleaved = cfg.rope_interleave
    self.inv_freq = tuple(float(f) for f in inv_freq)  # static: not a parameter

  def _queries(self, x_bsd, positions_bs):
    """(q_nope [B,S,H,nope], q_pe [B,S,H,rope] with RoPE applied)."""
    cfg = self.cfg
    b, s, _ = x_bsd.shape
    if cfg.q_lora_rank is None:
      q = self.q_proj(x_bsd)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_bsd)))
    q_bshd = q.reshape(b, s, cfg.num_attention_heads, cfg.qk_head_dim)
    q_pe = apply_rope(q_bshd[..., cfg.qk_nope_head_dim:], positions_bs,
                      np.asarray(self.inv_freq, np.float32), self.rope_scale,
                      self.interleaved)
    return q_bshd[..., :cfg.qk_nope_head_dim], q_pe

  def latents(self, x_bsd, positions_bs):
    """What MLA caches per token: the normalised kv latent [B,S,kv_lora] and the rotated shared
    rope key [B,S,rope]."""
    cfg = self.cfg
    ckv = self.kv_a_proj_with_mqa(x_bsd)                    # [batch, seq, kv_lora + rope]
    kv_latent = self.kv_a_layernorm(ckv[..., :cfg.kv_lora_rank])
    k_pe = apply_rope(ckv[..., cfg.kv_lora_rank:][:, :, None, :], positions_bs,
                      np.asarray(self.inv_freq, np.float32), self.rope_scale,
                      self.interleaved)
    return kv_latent, k_pe[:, :, 0, :]

  def __call__(self, x_bsd, positions_bs, mask_b1qk, return_latents: bool = False):
    """Full-sequence attention (training, prefill). With `return_latents`, also returns the
    (kv_latent, k_pe) that a decode cache stores."""
    cfg = self.cfg
    b, s, _ = x_bsd.shape
    h, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    q_nope, q_pe = self._queries(x_bsd, positions_bs)
    kv_latent, k_pe = self.latents(x_bsd, positions_bs)
    kv = self.kv_b_proj(kv_latent).reshape(b, s, h, nope + cfg.v_head_dim)
    k_nope, v_bshv = kv[..., :nope], kv[..., nope:]
    k_bshd = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (b, s, h, rope))], -1)
    q_bshd = jnp.concatenate([q_nope, q_pe], axis=-1)
    out = dot_product_attention(q_bshd, k_bshd, v_bshv, mask_b1qk, cfg.softmax_scale,
                                cfg.runtime.attention_impl)
    out = self.o_proj(out.reshape(b, s, h * cfg.v_head_dim))
    return (out, KVCache(latent=kv_latent, k_pe=k_pe)) if return_latents else out

  def decode(self, x_b1d, positions_b1, cache: "KVCache", index, key_valid_bt):
    """One new token per row against MLA's compressed cache, with the key/value up-projection
    absorbed into the query and the output (DeepSeek-V2's inference form): per cached token
    only kv_lora + rope numbers are read, never a per-head key or value.

    index: scalar slot the new token is written to; key_valid_bt: [B, T] which slots attend.
    Returns (out [B,1,D], updated cache).
    """
    cfg = self.cfg
    b = x_b1d.shape[0]
    h, nope, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    q_nope, q_pe = self._queries(x_b1d, positions_b1)       # [B,1,H,nope], [B,1,H,rope]
    kv_latent, k_pe = self.latents(x_b1d, positions_b1)     # [B,1,C], [B,1,rope]
    cache = KVCache(
        latent=jax.lax.dynamic_update_slice_in_dim(cache.latent, kv_latent.astype(
            cache.latent.dtype), index, axis=1),
        k_pe=jax.lax.dynamic_update_slice_in_dim(cache.k_pe, k_pe.astype(cache.k_pe.dtype),
                                                 index, axis=1))
    w_kv = self.kv_b_proj.weight().astype(q_nope.dtype).reshape(cfg.kv_lora_rank, h, nope + dv)
    q_latent = jnp.einsum("bqhn,chn->bqhc", q_nope, w_kv[..., :nope])    # [B,1,H,C]
    latent, kpe = cache.latent.astype(q_nope.dtype), cache.k_pe.astype(q_nope.dtype)
    scores = (jnp.einsum("bqhc,btc->bhqt", q_latent, latent)
              + jnp.einsum("bqhr,btr->bhqt", q_pe, kpe)) * jnp.asarray(cfg.softmax_scale,
                                                                       q_nope.dtype)
    scores = jnp.where(key_valid_bt[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q_nope.dtype)
    out_latent = jnp.einsum("bhqt,btc->bqhc", probs, latent)              # [B,1,H,C]
    out = jnp.einsum("bqhc,chv->bqhv", out_latent, w_kv[..., nope:])      # [B,1,H,v]
    return self.o_proj(out.reshape(b, 1, h * dv)), cache


@struct.dataclass
class KVCache:
  """MLA's compressed decode cache for one layer (or stacked over layers on axis 0)."""
  latent: jax.Array  # [B, T, kv_lora] normalised kv latents
  k_pe: jax.Array    # [B, T, rope] rotated shared rope keys

  def grow(self, n: int) -> "KVCache":
    """The same cache with room for `n` more tokens (time is the second axis from the end)."""
    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, n), (0, 0)])
    return KVCache(latent=pad(self.latent), k_pe=pad(self.k_pe))
