"""The sparse MoE block of every family: top-k routed experts (+ shared experts), no token dropped.

Expert dispatch has one interface, `expert_outputs`, and four implementations that compute the
same numbers (tests hold them to 1e-5 in float32, outputs and gradients):
  "dense"   every expert on every token, then pick the top-k: the readable reference (E/K x work).
  "ragged"  sort slots by expert and run `jax.lax.ragged_dot` grouped matmuls, lowered by XLA
            (what MaxText only falls back to). XLA:TPU lowers it to its own Mosaic kernels (no
            dense-fallback matmul in the compiled program, scripts/hlo_check.py); XLA:CPU, and
            XLA:GPU outside the configurations cuDNN/Triton cover, expand it to a dot over
            every expert.
  "tokamax" the same sorted layout through `tokamax.ragged_dot`, DeepMind's Pallas grouped
            matmul with its own gradient kernels (megablox-style GMM/TGMM): the Mosaic TPU kernel
            on TPU, the Mosaic GPU kernel (sm90+, else Triton) on GPU, and XLA's ragged_dot
            elsewhere. The kernel is picked per lowering platform (`lax.platform_dependent`) and,
            within it, by JAX's default device (tokamax's rule): a compile-only TPU lowering from
            a CPU host traces under `jax.default_device(tpu_device)` (scripts/hlo_check.py).
            Pallas kernels cannot be partitioned by the compiler: on a multi-device mesh use
            `expert_parallel="shard_map"` (each device runs the kernel on its own rows), else
            JAX stops with "Mosaic kernels cannot be automatically partitioned".
  "tiled"   the expert-sorted, tile-padded loop of `gmm.py`: the fast choice on CPU, where
            ragged_dot lowers to a dense dot over all experts.
"auto" picks "tiled" on CPU, "ragged" on TPU and "tokamax" on GPU, by what the compiled program
is (scripts/hlo_check.py, compile-only with the real compilers; docs/SCALING.md):
  TPU  XLA lowers ragged_dot to its own grouped-matmul kernels (compiler FLOPs at the ideal).
       tokamax's Mosaic TPU kernels are as good compile-only but fail under the default
       compiler-partitioned layout on a multi-device mesh (above).
  GPU  XLA:GPU rewrites every ragged_dot into a dense dot over all experts (64x the routed
       FLOPs for V2-Lite, a [T*K, E, F] temporary per matmul); tokamax compiles to grouped-GEMM
       kernels (Pallas Triton compile-only, Mosaic GPU on a real sm90+) at the ideal FLOPs.
       Where the dispatch is sharded (a multi-GPU mesh, or expert_parallel="shard_map" as the
       :8xh100 preset sets; :h200 is one device) "auto" runs "tiled" instead (AUTO_SHARDED):
       the compiler cannot partition a Pallas kernel, and tokamax's Triton kernel fails
       shard_map's type check.
bench/accel.py measures them on the accelerator (bench/RESULTS.md).

`model.expert_parallel` picks how a mesh with an `expert` axis runs this dispatch: "compiler"
partitions it with XLA's SPMD partitioner; "shard_map" exchanges token rows between the devices
holding the experts explicitly (`expert_parallel.py`), each device running the kernel above on
its own experts.

The block knows two interfaces and nothing of DES-MoE:
* its router `gate`: `route(x, token_mask, adapt) -> (logits [T, E], loss)` (`moe/routing.py`'s
  LinearRouter: the pretrained gate, loss 0), and optionally `teacher_logits(x)`, whose top-k
  the block reports next to the router's (`Routing.teacher_topk_ids`). The family's routing function (`select_experts`)
  and selection bias apply to whatever logits the router gives, so DES-MoE's adaptive router
  replaces the logits only (and adds its distillation loss).
* an optional expert hook `des` (the one DES-MoE state submodule, `specialization.DesState`):
  `dispatch` (remap slots to duplicated experts), `isolate` (per-token gradient isolation) and
  `statistics` (domain x expert counts), each given the per-call `adapt` it alone reads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from desmoe_jax.moe import expert_parallel, gmm
from desmoe_jax.config import MOE_IMPLS, ModelConfig
from desmoe_jax.moe.routing import (LinearRouter, Routing, SelectionBias, balance_loss,
                                    select_experts)
from desmoe_jax.nn.layers import MLP, Linear, normal_init, param

ROUTED_EXPERTS, SHARED_EXPERTS = "routed_experts", "shared_experts"   # parameter groups

IMPLS = tuple(i for i in MOE_IMPLS if i != "auto")   # the kernels model.moe_impl may name
# What "auto" runs on each platform (see the module docstring for why).
AUTO = {"cpu": "tiled", "tpu": "ragged", "gpu": "tokamax"}
# ... and where the dispatch is sharded: on a multi-device mesh a Pallas kernel cannot be
# partitioned by the compiler (expert_parallel="compiler"), and inside expert_parallel=
# "shard_map" tokamax 0.0.12's Pallas Triton ragged_dot gives its pallas_call an output type
# without the mesh axes it varies over, which shard_map's type check refuses
# (scripts/hlo_check.py --target=h100, row tokamax+shard_map). On GPU the tiled loop is then the
# grouped computation that compiles (no dense fallback; ragged_dot would be one).
AUTO_SHARDED = {**AUTO, "gpu": "tiled"}


def resolve_impl(impl: str, platform: str | None = None, sharded: bool = False) -> str:
  """The implementation `impl` runs; "auto" by `platform` (default: JAX's default backend; pass
  it when compiling for another target, e.g. "tpu" for a compile-only TPU lowering) and by
  whether the dispatch is sharded (a mesh of more than one device, or expert_parallel=
  "shard_map")."""
  if impl == "auto":
    platform = platform or jax.default_backend()
    table = AUTO_SHARDED if sharded else AUTO
    return table.get("gpu" if platform in ("cuda", "rocm", "gpu") else platform, "ragged")
  if impl not in IMPLS:
    raise ValueError(f"moe_impl={impl!r}: expected 'auto' or one of {IMPLS}")
  return impl


def _dense(x_td, ids_tk, gate, up, down):
  h_tef = jax.nn.silu(jnp.einsum("td,edf->tef", x_td, gate)) * jnp.einsum("td,edf->tef", x_td, up)
  y_ted = jnp.einsum("tef,efd->ted", h_tef, down)
  # id E (no expert) reads 0
  return jnp.take_along_axis(y_ted, ids_tk[:, :, None], axis=1, mode="fill", fill_value=0)


def _ragged(x_td, ids_tk, gate, up, down, dot=jax.lax.ragged_dot, row_multiple=0, lora=None):
  """Expert-sorted grouped matmuls through `dot` (the `jax.lax.ragged_dot` signature).

  row_multiple > 0 (the Pallas kernels): the row buffer is padded to a multiple of it (the TPU
  kernel needs whole 128-row tiles, else tokamax falls back to XLA), and the rows after the
  last group (padding, slots of id E) are zeroed on the way in and out: XLA's ragged_dot writes
  zeros there, but a kernel may leave them unwritten, and their input gradient would otherwise
  reach x through the gather.

  lora: (((A, B) of gate, up, down), scale, (masks [T*K, D], [T*K, D], [T*K, F] in slot
  order)), LoRA's branch with dropout (`lora.ExpertLora.branch`): each weight's matmul adds
  scale * ((rows * mask) A_e) B_e, grouped like the weight's.
  """
  t, k = ids_tk.shape
  n = t * k
  flat = ids_tk.reshape(-1)
  order = jnp.argsort(flat, stable=True)                  # slot index, grouped by expert
  sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
  xs = x_td[order // k]                                    # [T*K, D] expert-sorted rows
  masks = () if lora is None else tuple(m[order] for m in lora[2])   # sorted like the rows
  if row_multiple:
    xs = jnp.pad(xs, ((0, -n % row_multiple), (0, 0)))
    masks = tuple(jnp.pad(m, ((0, -n % row_multiple), (0, 0))) for m in masks)
    valid = (jnp.arange(xs.shape[0]) < sizes.sum())[:, None]
    xs = jnp.where(valid, xs, 0)

  def linear(rows, w, j):
    y = dot(rows, w, sizes)
    if lora is None:
      return y
    (a, b), scale = lora[0][j], lora[1]
    return y + dot(dot(rows * masks[j], a, sizes), b, sizes) * jnp.asarray(scale, y.dtype)

  h = jax.nn.silu(linear(xs, gate, 0)) * linear(xs, up, 1)
  ys = linear(h, down, 2)
  if row_multiple:
    ys = jnp.where(valid, ys, 0)[:n]
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
  return ys[inverse].reshape(t, k, -1)


def import_tokamax():
  """tokamax, imported when an impl needs it. tokamax reads its options from absl flags and, when
  nothing has parsed them, parses sys.argv itself, which fails on any other program's arguments
  (pytest's, argparse scripts'): the flags are then marked parsed, keeping tokamax's defaults."""
  import tokamax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def _tokamax_dot(implementation):
  tokamax = import_tokamax()
  return lambda lhs, rhs, sizes: tokamax.ragged_dot(lhs, rhs, sizes,
                                                    implementation=implementation)


# tokamax.ragged_dot implementations per lowering platform, each list tried in order (tokamax
# moves to the next on NotImplementedError, e.g. the TPU kernel's dims < 128, or Mosaic GPU on
# a pre-Hopper GPU). "xla" is `jax.lax.ragged_dot` (the reference every kernel falls back to).
TOKAMAX_RAGGED_DOT = {"tpu": ("mosaic_tpu", "xla"), "cuda": ("mosaic_gpu", "triton", "xla"),
                      "default": ("xla",)}


TOKAMAX_ROW_MULTIPLE = 128  # the TPU kernel's default (and smallest tuned) row tile


def tokamax_ragged_dot(lhs, rhs, sizes):
  """tokamax.ragged_dot with the kernel of the platform this is lowered for: the choice is made
  at lowering (`lax.platform_dependent`), not by the host's default backend."""
  branches = {p: _tokamax_dot(impls) for p, impls in TOKAMAX_RAGGED_DOT.items()}
  return jax.lax.platform_dependent(lhs, rhs, sizes, **branches)


def _dense_dot(lhs, rhs, sizes):
  """`jax.lax.ragged_dot`'s contract the "dense" way: every group's matrix on every row, then
  each row's own (id E past the groups: 0). The reference dispatch of LoRA's dropout branch."""
  group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(lhs.shape[0]), side="right")
  y_ref = jnp.einsum("nd,edf->nef", lhs, rhs)
  return jnp.take_along_axis(y_ref, group[:, None, None], axis=1, mode="fill",
                             fill_value=0)[:, 0]


def expert_outputs(x_td, ids_tk, gate_edf, up_edf, down_efd, *, impl: str = "auto",
                   tile_size: int = 128, lora=None):
  """y[t, k] = FFN_{ids[t,k]}(x[t]) with SwiGLU experts; returns [T, K, D].

  An id equal to E (one past the last expert) selects no expert: its output is 0, "tiled" spends
  no matmul on it and "ragged"/"tokamax" leave it out of every group (the unused rows of expert
  parallelism's receive buffers).

  lora: LoRA's branch with dropout (training with lora.dropout > 0, `_ragged`), which cannot be
  merged into the weights: the masks differ per slot. Every impl then runs `_ragged`'s grouped
  matmuls with the branch explicit, through its own grouped dot: "dense" every expert on every
  row (`_dense_dot`), "ragged" XLA's ragged_dot, "tokamax" tokamax's; "tiled", whose kernel
  fuses the whole FFN, takes XLA's ragged_dot (on XLA:CPU a dot over every expert).
  """
  impl = resolve_impl(impl)
  dt = x_td.dtype
  gate, up, down = gate_edf.astype(dt), up_edf.astype(dt), down_efd.astype(dt)
  if lora is not None:
    dot = {"dense": _dense_dot, "tokamax": tokamax_ragged_dot}.get(impl, jax.lax.ragged_dot)
    return _ragged(x_td, ids_tk, gate, up, down, dot=dot, lora=lora,
                   row_multiple=TOKAMAX_ROW_MULTIPLE if impl == "tokamax" else 0)
  if impl == "dense":
    return _dense(x_td, ids_tk, gate, up, down)
  if impl == "ragged":
    return _ragged(x_td, ids_tk, gate, up, down)
  if impl == "tokamax":
    return _ragged(x_td, ids_tk, gate, up, down, dot=tokamax_ragged_dot,
                   row_multiple=TOKAMAX_ROW_MULTIPLE)
  return gmm.grouped_ffn(x_td, ids_tk, gate, up, down, max_tile=tile_size)


class RoutedExperts(nnx.Module):
  """The E routed experts' SwiGLU weights, stacked: gate/up [E, D, F], down [E, F, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    pd = jnp.dtype(cfg.runtime.param_dtype)
    g = ROUTED_EXPERTS
    self.gate_proj = param(rngs, normal_init, (e, d, f), pd, ("experts", "embed", "expert_mlp"), g)
    self.up_proj = param(rngs, normal_init, (e, d, f), pd, ("experts", "embed", "expert_mlp"), g)
    self.down_proj = param(rngs, normal_init, (e, f, d), pd, ("experts", "expert_mlp", "embed"), g)
    self.lora = nnx.data(None)   # a lora.ExpertLora (a pair per expert) once lora.attach ran

  def weights(self, dtype):
    """(gate, up, down) the dispatch computes with: the stored weights, or with LoRA each
    expert's W_e + s A_e B_e (one batched matmul over the experts, float32 sum) in `dtype`."""
    ws = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
    if self.lora is None or self.lora.dropout_key is not None:   # no pairs, or the branch
      return ws
    pairs = (self.lora.gate_proj, self.lora.up_proj, self.lora.down_proj)
    return tuple(p.merge_into(w, dtype) for w, p in zip(ws, pairs))

  def lora_branch(self, n_slots: int, dtype):
    """LoRA's branch with dropout masks for n_slots (token, slot) rows, while training with
    lora.dropout > 0 (`lora.ExpertLora.branch`); else None."""
    return None if self.lora is None else self.lora.branch(n_slots, dtype)


@struct.dataclass
class Adaptation:
  """Per-call DES-MoE inputs, carried through the model to the router and the expert hook (the
  block itself reads none of them); the defaults leave the pretrained model as is."""
  domain_bs: jax.Array | None = None          # [batch, seq] int domain id of every token
  router_grad_scale: jax.Array | None = None  # scalar (1 - lambda): task-gradient share of the ALR
  isolate: bool = struct.field(pytree_node=False, default=False)  # apply the expert mask


@struct.dataclass
class LayerStats:
  balance: jax.Array                      # scalar balance loss (times aux_loss_alpha)
  kd: jax.Array                           # scalar router loss (ALR distillation; 0 otherwise)
  domain_counts: jax.Array | None = None  # [D, E] real tokens of domain d that picked expert e
  domain_tokens: jax.Array | None = None  # [D] real tokens of domain d


class MoEBlock(nnx.Module):
  """y = sum_k w[t,k] * expert_{ids[t,k]}(x[t]) (+ shared experts, optionally sigmoid-gated).

  Attribute names follow the HF modules so that a family's key mapping stays short:
  `gate` (router), `experts`, `shared_experts` (DeepSeek) or `shared_expert` +
  `shared_expert_gate` (Qwen2-MoE), `e_score_correction_bias` (DeepSeek-V3's selection bias,
  HF's `gate.e_score_correction_bias`). `des` is the DES-MoE hook, None for a plain model.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.gate = LinearRouter(cfg, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    self.e_score_correction_bias = nnx.data(
        SelectionBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=(None,))
        if cfg.topk_method == "noaux_tc" else None)
    mlp = lambda width: MLP(cfg.hidden_size, width, use_bias=cfg.mlp_bias,
                            dtype=jnp.dtype(cfg.runtime.dtype),
                            param_dtype=jnp.dtype(cfg.runtime.param_dtype), group=SHARED_EXPERTS,
                            rngs=rngs)
    self.shared_experts = nnx.data(mlp(cfg.moe_intermediate_size * cfg.n_shared_experts)
                                   if cfg.n_shared_experts else None)
    if cfg.shared_expert_intermediate_size:
      self.shared_expert = mlp(cfg.shared_expert_intermediate_size)
      self.shared_expert_gate = nnx.data(
          Linear(cfg.hidden_size, 1, ("embed", None), dtype=jnp.dtype(cfg.runtime.dtype),
                 param_dtype=jnp.dtype(cfg.runtime.param_dtype), group=SHARED_EXPERTS,
                 rngs=rngs) if cfg.shared_expert_gate else None)
    self.des = nnx.data(None)   # the DES-MoE hook (specialization.DesState) once attached

  def selection_bias(self):
    return None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]

  def __call__(self, x_bsd, token_mask_bs=None, adapt: Adaptation | None = None):
    """Returns (y [B,S,D], Routing over the B*S tokens, LayerStats)."""
    cfg = self.cfg
    adapt = adapt if adapt is not None else Adaptation()
    b, s, d = x_bsd.shape
    x_td = x_bsd.reshape(b * s, d)
    if token_mask_bs is None:
      token_mask_bs = jnp.ones((b, s), jnp.bool_)
    mask_t = token_mask_bs.reshape(-1)

    logits_te, router_loss = self.gate.route(x_td, mask_t, adapt)
    weights_tk, ids_tk, scores_te = select_experts(logits_te, cfg, self.selection_bias())

    gate, up, down = self.experts.weights(x_bsd.dtype)
    dispatch_tk = ids_tk
    if self.des is not None:
      gate, up, down, dispatch_tk = self.des.dispatch(gate, up, down, ids_tk, adapt)
    shard_map = cfg.runtime.expert_parallel == "shard_map"
    mesh = jax.sharding.get_abstract_mesh()
    sharded = shard_map or (not mesh.empty and math.prod(mesh.axis_sizes) > 1)
    branch = self.experts.lora_branch(ids_tk.size, x_bsd.dtype)
    if branch is not None and (shard_map or gate.shape[0] != cfg.n_routed_experts):
      raise ValueError("lora.dropout > 0 on the routed experts runs with neither model."
                       "expert_parallel='shard_map' (the masks do not travel with the token "
                       "rows) nor an expert copy bank (DGES duplicates)")
    local = functools.partial(expert_outputs,
                              impl=resolve_impl(cfg.runtime.moe_impl, sharded=sharded),
                              tile_size=cfg.runtime.moe_tile_size, lora=branch)
    if shard_map:
      y_tkd = expert_parallel.expert_outputs(local, x_td, dispatch_tk, gate, up, down,
                                             num_experts=cfg.n_routed_experts)
    else:
      y_tkd = local(x_td, dispatch_tk, gate, up, down)
    if adapt.isolate:
      if self.des is None:
        raise ValueError("gradient isolation needs the DES-MoE state (specialization.attach)")
      y_tkd = self.des.isolate(y_tkd, ids_tk, adapt)

    # Gate weights stay float32 for the weighted sum, as in HF, then back to the compute dtype.
    y_td = jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), weights_tk).astype(x_bsd.dtype)
    # Shared experts on [T, D], not [B, S, D]: XLA:CPU builds the 3-D weight gradients with a
    # slow transposing fusion (bench/RESULTS.md).
    if self.shared_experts is not None:
      y_td = y_td + self.shared_experts(x_td)
    if cfg.shared_expert_intermediate_size:
      shared_td = self.shared_expert(x_td)
      if self.shared_expert_gate is not None:
        shared_td = jax.nn.sigmoid(self.shared_expert_gate(x_td)) * shared_td
      y_td = y_td + shared_td
    y_bsd = y_td.reshape(b, s, d)

    stats = LayerStats(
        balance=balance_loss(scores_te.reshape(b, s, -1), ids_tk.reshape(b, s, -1),
                             token_mask_bs, cfg),
        kd=router_loss)
    if self.des is not None:
      stats = stats.replace(**self.des.statistics(ids_tk, mask_t, adapt))
    teacher_ids_tk = None
    if hasattr(self.gate, "teacher_logits"):   # a router that keeps a frozen teacher (the ALR)
      teacher_ids_tk = select_experts(self.gate.teacher_logits(x_td), cfg,
                                      self.selection_bias())[1]
    routing = Routing(logits=logits_te, topk_ids=ids_tk, topk_weights=weights_tk, inputs=x_td,
                      teacher_topk_ids=teacher_ids_tk)
    return y_bsd, routing, stats
