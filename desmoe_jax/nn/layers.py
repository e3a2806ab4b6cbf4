"""Small building blocks shared by attention, MoE and the decoder.

Every parameter carries `logical_axes` metadata (one name per dimension); `sharding.py` maps
those names to mesh axes. We keep our own metadata key rather than Flax's `out_sharding`, which
would shard eagerly at creation and require a mesh just to build a model.

A parameter may also carry `group` metadata, its parameter group for the optimizer and the
phase schedule (`router`, `routed_experts`, `shared_experts`; absent = `backbone`): the module
that creates a parameter says what it is, so no code elsewhere parses paths (optim.py). Norm
gains and biases carry `kind` metadata (`norm`, `bias`; absent = a weight matrix), which
`optim.decay_exclude` reads: by the HF/ESFT convention they get no weight decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape, dtype, axes: Axes, group: str | None = None,
          kind: str | None = None) -> nnx.Param:
  assert len(axes) == len(shape), (shape, axes)
  meta = {"group": group} if group else {}
  if kind:
    meta["kind"] = kind
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes), **meta)


normal_init = jax.nn.initializers.normal(stddev=0.02)  # HF initializer_range for DeepSeek


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (HF stores the transpose)."""

  def __init__(self, d_in: int, d_out: int, axes: Axes, *, use_bias: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, group: str | None = None,
               rngs: nnx.Rngs):
    self.kernel = param(rngs, normal_init, (d_in, d_out), param_dtype, axes, group)
    self.bias = nnx.data(param(rngs, jax.nn.initializers.zeros, (d_out,), param_dtype, axes[1:],
                               group, kind="bias") if use_bias else None)
    self.dtype = dtype
    self.lora = nnx.data(None)   # a lora.LoraPair once lora.attach adapts this layer

  def __call__(self, x):
    x = x.astype(self.dtype)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.lora is not None:   # + s (x A) B: B = 0 at init adds exact zeros
      y = y + self.lora(x)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


  def weight(self):
    """The kernel the layer computes with ([in, out]; with LoRA, kernel + s A B in float32),
    for code that reads the matrix rather than calling the layer (MLA's absorbed decode)."""
    if self.lora is None:
      return self.kernel[...]
    return self.kernel[...].astype(jnp.float32) + self.lora.delta()


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.embedding = param(rngs, normal_init, (vocab, dim), param_dtype, ("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids_bs):
    return jnp.take(self.embedding[...], ids_bs, axis=0).astype(self.dtype)

  def attend(self, x_bsd):
    """Logits against the embedding matrix, for tied input/output embeddings."""
    return jnp.dot(x_bsd.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
  """DeepSeek/HF RMSNorm: normalise in float32, cast back, then scale (in that order)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, axis_name: str = "norm"):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,), kind="norm")
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    # The gain in the input's (compute) dtype: float32 master weights must not promote the
    # output, and everything after it, to float32 (train.precision=fp32_master).
    return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

  def __init__(self, d_model: int, d_ff: int, *, use_bias: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32, group: str | None = None, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, group=group, rngs=rngs)
    self.gate_proj = Linear(d_model, d_ff, ("embed", "mlp"), **kw)
    self.up_proj = Linear(d_model, d_ff, ("embed", "mlp"), **kw)
    self.down_proj = Linear(d_ff, d_model, ("mlp", "embed"), **kw)

  def __call__(self, x_btd):
    # On [tokens, d_model] rows, not [batch, seq, d_model]: the weight gradients then contract
    # one axis, and XLA:CPU reads the activations' gradient in place instead of transposing it
    # in an elementwise fusion first (the dense layer's f32[512, 2048] copy, 8-12 ms of the
    # tiny model's step at 2 x 1024; bench/RESULTS.md, "fifth round"). Same numbers.
    lead = x_btd.shape[:-1]
    x_td = x_btd.reshape(-1, x_btd.shape[-1])
    y_td = self.down_proj(jax.nn.silu(self.gate_proj(x_td)) * self.up_proj(x_td))
    return y_td.reshape(*lead, y_td.shape[-1])


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
