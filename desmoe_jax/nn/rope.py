"""Rotary position embeddings: inverse frequencies (default and YaRN, computed in float32 as
transformers does) and the two rotation layouts families use.

  interleaved  pairs (x[2i], x[2i+1]) rotate like a complex multiply (DeepSeek's MLA);
  halves       pairs (x[i], x[i + d/2]) (`rotate_half`: Llama, Qwen, OLMoE, Mixtral).

Both rotate pair i by position * inv_freq[i]; only which two numbers form a pair differs, so
a checkpoint must be run with its own layout.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, rope_scaling: dict | None,
                  max_position_embeddings: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim/2] and the cos/sin scale, computed in float32 as HF does."""
  base = np.float32(theta)
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  rope_type = "default" if not rope_scaling else rope_scaling.get(
      "rope_type", rope_scaling.get("type", "default"))
  if rope_type == "default":
    return (np.float32(1.0) / base ** exponents).astype(np.float32), 1.0

  rs = rope_scaling
  original_max = rs.get("original_max_position_embeddings", max_position_embeddings)
  factor = rs.get("factor")
  if factor is None:
    factor = max_position_embeddings / original_max
  mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")

  attention_factor = rs.get("attention_factor")
  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = float(yarn_get_mscale(factor, mscale)
                               / yarn_get_mscale(factor, mscale_all_dim))
    else:
      attention_factor = yarn_get_mscale(factor)
  beta_fast = rs.get("beta_fast") or 32
  beta_slow = rs.get("beta_slow") or 1

  def correction_dim(num_rotations):
    return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(float(base)))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rs.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp, as HF does
  pos_freqs = base ** exponents
  inv_extrapolation = np.float32(1.0) / pos_freqs
  inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1).astype(np.float32)
  extrapolation_factor = np.float32(1) - ramp
  inv_freq = (inv_interpolation * (np.float32(1) - extrapolation_factor)
              + inv_extrapolation * extrapolation_factor)
  return inv_freq.astype(np.float32), float(attention_factor)


def apply_rope(x_bshr, positions_bs, inv_freq_r, scale: float, interleaved: bool = True):
  """Rotates the pairs of the last dim by position * inv_freq, in float32."""
  freqs_bsr = positions_bs.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_r)
  cos = (jnp.cos(freqs_bsr) * scale)[:, :, None, :]  # [batch, seq, 1, rope/2]
  sin = (jnp.sin(freqs_bsr) * scale)[:, :, None, :]
  xf = x_bshr.astype(jnp.float32)
  if interleaved:
    xf = xf.reshape(*x_bshr.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  else:
    half = x_bshr.shape[-1] // 2
    re, im = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x_bshr.shape).astype(x_bshr.dtype)
