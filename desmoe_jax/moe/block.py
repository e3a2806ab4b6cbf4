"""The DeepSeek-V2 MoE layer: shared experts + top-k routed experts, no token ever dropped.

Expert dispatch has one interface, `expert_outputs`, and three implementations that compute the
same numbers (tests hold them to 1e-5 in float32, outputs and gradients):
  "dense"  every expert on every token, then pick the top-k: the readable reference (E/K x work).
  "ragged" sort slots by expert and run `jax.lax.ragged_dot` grouped matmuls (MaxText's megablox
           path): the right choice on GPU/TPU.
  "tiled"  the expert-sorted, tile-padded loop of `gmm.py`: the fast choice on CPU, where
           ragged_dot lowers to a dense dot over all experts.
"auto" picks "tiled" on CPU and "ragged" elsewhere.

`model.expert_parallel` picks how a mesh with an `expert` axis runs this dispatch: "compiler"
partitions it with XLA's SPMD partitioner; "shard_map" exchanges token rows between the devices
holding the experts explicitly (`expert_parallel.py`), each device running the kernel above on
its own experts.

The layer returns per-slot outputs before the gate weights are applied, plus its `Routing`, so
that DES-MoE can build statistics, swap the router and mask gradients per token without
reaching into this module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from desmoe_jax.moe import expert_parallel, gmm
from desmoe_jax.config import ModelConfig
from desmoe_jax.nn.layers import MLP, normal_init, param
from desmoe_jax.router import AdaptiveRouter, Routing, TopKRouter, balance_loss, select_experts
from desmoe_jax.specialization import domain_expert_counts

IMPLS = ("dense", "ragged", "tiled")


def resolve_impl(impl: str) -> str:
  if impl == "auto":
    return "tiled" if jax.default_backend() == "cpu" else "ragged"
  if impl not in IMPLS:
    raise ValueError(f"moe_impl={impl!r}: expected 'auto' or one of {IMPLS}")
  return impl


def _dense(x_td, ids_tk, gate, up, down):
  h_tef = jax.nn.silu(jnp.einsum("td,edf->tef", x_td, gate)) * jnp.einsum("td,edf->tef", x_td, up)
  y_ted = jnp.einsum("tef,efd->ted", h_tef, down)
  # id E (no expert) reads 0
  return jnp.take_along_axis(y_ted, ids_tk[:, :, None], axis=1, mode="fill", fill_value=0)


def _ragged(x_td, ids_tk, gate, up, down):
  t, k = ids_tk.shape
  flat = ids_tk.reshape(-1)
  order = jnp.argsort(flat, stable=True)                  # slot index, grouped by expert
  sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
  xs = x_td[order // k]                                    # [T*K, D] expert-sorted rows
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  ys = jax.lax.ragged_dot(h, down, sizes)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
  return ys[inverse].reshape(t, k, -1)


def expert_outputs(x_td, ids_tk, gate_edf, up_edf, down_efd, *, impl: str = "auto",
                   tile_size: int = 128):
  """y[t, k] = FFN_{ids[t,k]}(x[t]) with SwiGLU experts; returns [T, K, D].

  An id equal to E (one past the last expert) selects no expert: its output is 0, "tiled" spends
  no matmul on it and "ragged" leaves it out of every group (the unused rows of expert
  parallelism's receive buffers).
  """
  impl = resolve_impl(impl)
  dt = x_td.dtype
  gate, up, down = gate_edf.astype(dt), up_edf.astype(dt), down_efd.astype(dt)
  if impl == "dense":
    return _dense(x_td, ids_tk, gate, up, down)
  if impl == "ragged":
    return _ragged(x_td, ids_tk, gate, up, down)
  return gmm.grouped_ffn(x_td, ids_tk, gate, up, down, max_tile=tile_size)


class RoutedExperts(nnx.Module):
  """The E routed experts' SwiGLU weights, stacked: gate/up [E, D, F], down [E, F, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    pd = jnp.dtype(cfg.param_dtype)
    self.gate_proj = param(rngs, normal_init, (e, d, f), pd, ("experts", "embed", "expert_mlp"))
    self.up_proj = param(rngs, normal_init, (e, d, f), pd, ("experts", "embed", "expert_mlp"))
    self.down_proj = param(rngs, normal_init, (e, f, d), pd, ("experts", "expert_mlp", "embed"))


@struct.dataclass
class Adaptation:
  """Per-call DES-MoE inputs to the MoE layers; the defaults leave the pretrained model as is."""
  domain_bs: jax.Array | None = None          # [batch, seq] int domain id of every token
  router_grad_scale: jax.Array | None = None  # scalar (1 - lambda): task-gradient share of the ALR
  isolate: bool = struct.field(pytree_node=False, default=False)  # apply the ExpertMask


@struct.dataclass
class LayerStats:
  balance: jax.Array                      # scalar DeepSeek balance loss (times aux_loss_alpha)
  kd: jax.Array                           # scalar router distillation loss (0 without an ALR)
  domain_counts: jax.Array | None = None  # [D, E] real tokens of domain d that picked expert e
  domain_tokens: jax.Array | None = None  # [D] real tokens of domain d


class MoE(nnx.Module):
  """y = shared_experts(x) + sum_k w[t,k] * expert_{ids[t,k]}(x[t]).

  DES-MoE adds, through `router.attach_alr` / `specialization.attach` / `.attach_copies`: an
  adaptive router in place of `gate`, the correlation/mask state, and a bank of duplicated
  experts. With them absent this is exactly the pretrained DeepSeek-V2 MoE.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.gate = TopKRouter(cfg, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    self.shared_experts = nnx.data(
        MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
            use_bias=cfg.mlp_bias, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        if cfg.n_shared_experts else None)
    self.correlation = nnx.data(None)    # specialization.Correlation [D, E] once attached
    self.expert_mask = nnx.data(None)    # specialization.ExpertMask [D, E] once attached
    self.expert_copies = nnx.data(None)  # specialization.ExpertCopies once attached

  def __call__(self, x_bsd, token_mask_bs=None, adapt: Adaptation | None = None):
    """Returns (y [B,S,D], Routing over the B*S tokens, LayerStats)."""
    cfg = self.cfg
    adapt = adapt if adapt is not None else Adaptation()
    b, s, d = x_bsd.shape
    x_td = x_bsd.reshape(b * s, d)
    if token_mask_bs is None:
      token_mask_bs = jnp.ones((b, s), jnp.bool_)
    mask_t = token_mask_bs.reshape(-1)
    domain_t = None if adapt.domain_bs is None else adapt.domain_bs.reshape(-1)

    kd = jnp.zeros((), jnp.float32)
    if isinstance(self.gate, AdaptiveRouter):
      logits_te = self.gate(x_td, grad_scale=adapt.router_grad_scale)
      kd = self.gate.distillation_loss(jax.lax.stop_gradient(x_td), mask_t)
    else:
      logits_te = self.gate(x_td)
    weights_tk, ids_tk, scores_te = select_experts(logits_te, cfg)

    gate, up, down = (self.experts.gate_proj[...], self.experts.up_proj[...],
                      self.experts.down_proj[...])
    dispatch_tk = ids_tk
    if self.expert_copies is not None and domain_t is not None:
      gate, up, down, dispatch_tk = self.expert_copies.dispatch(gate, up, down, ids_tk, domain_t)
    local = functools.partial(expert_outputs, impl=cfg.moe_impl, tile_size=cfg.moe_tile_size)
    if cfg.expert_parallel == "shard_map":
      y_tkd = expert_parallel.expert_outputs(local, x_td, dispatch_tk, gate, up, down,
                                             num_experts=cfg.n_routed_experts)
    else:
      y_tkd = local(x_td, dispatch_tk, gate, up, down)
    if adapt.isolate:
      if self.expert_mask is None or domain_t is None:
        raise ValueError("gradient isolation needs specialization.attach(...) and domain ids")
      # An expert learns only from tokens of domains that own it; the forward is unchanged.
      allowed_tk = self.expert_mask[...][domain_t[:, None], ids_tk] > 0
      y_tkd = jnp.where(allowed_tk[..., None], y_tkd, jax.lax.stop_gradient(y_tkd))

    # Gate weights stay float32 for the weighted sum, as in HF, then back to the compute dtype.
    y_td = jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), weights_tk).astype(x_bsd.dtype)
    if self.shared_experts is not None:
      # On [T, D], not [B, S, D]: XLA:CPU builds the 3-D weight gradients with a slow
      # transposing fusion (bench/RESULTS.md).
      y_td = y_td + self.shared_experts(x_td)
    y_bsd = y_td.reshape(b, s, d)

    stats = LayerStats(
        balance=balance_loss(scores_te.reshape(b, s, -1), ids_tk.reshape(b, s, -1),
                             token_mask_bs, cfg),
        kd=kd)
    if domain_t is not None and self.correlation is not None:
      counts, tokens = domain_expert_counts(ids_tk, domain_t, mask_t,
                                            self.correlation.shape[0], cfg.n_routed_experts)
      stats = stats.replace(domain_counts=counts, domain_tokens=tokens)
    routing = Routing(logits=logits_te, topk_ids=ids_tk, topk_weights=weights_tk, inputs=x_td)
    return y_bsd, routing, stats
