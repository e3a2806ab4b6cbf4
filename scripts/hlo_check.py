r"""What the compiler made of one MoE layer's forward+backward, per `moe_impl`: the compiled
program, not the source.

One DeepSeek-V2-Lite-shaped MoE layer (d_model 2048, 64 experts of width 1408, top-6, 2 shared
experts, fp32 router, bf16 weights and activations), loss = sum(y * cotangent), gradients with
respect to the input and every parameter, is compiled for the target and its optimized HLO read:
  dense_fallback  matmuls (dot or convolution) with a result or operand that spans every expert
                  for every token row, i.e. has the expert count as a dimension next to >=
                  tokens rows and a feature dimension: what "dense" does on purpose and XLA's
                  expansion of ragged_dot into zero-padded per-expert matmuls does behind our
                  back.
  kernels         Mosaic (Pallas) custom calls, other custom calls, and dots/convolutions.
  flops           XLA's cost analysis of the compiled program against the ideal
                  6 x tokens x top_k x 3 x d_model x expert_width of the routed experts (and the
                  ideal of the whole layer: + shared experts + router). A Pallas kernel counts
                  what its cost estimate says, so compare FLOPs only among XLA-only programs.
  temp            the compiler's temporary buffer bytes (memory_analysis).

--target: a TPU topology compiled on this CPU machine (compile-only, needs libtpu; one device of
it is used), or "local" for the default backend's first device (how bench/accel.py checks the
GPU program). For a TPU target the layer is traced with that TPU device as JAX's default device:
tokamax picks its kernels by the default device (on a CPU host it would pick its XLA fallback).

  python scripts/hlo_check.py                                     # v5e, ragged + tokamax
  python scripts/hlo_check.py --impls=dense,ragged,tokamax,tiled --tokens=16384
  python scripts/hlo_check.py --target=local --impls=ragged,tokamax --json_out=hlo.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A second process using libtpu for compiles alongside (tests, other scripts) must not stop this.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from desmoe_jax import gpu_target  # noqa: E402
from desmoe_jax import sharding as sharding_lib  # noqa: E402
from desmoe_jax.moe import block as moe_lib  # noqa: E402
from desmoe_jax.config import ModelConfig  # noqa: E402

V2_LITE = dict(hidden=2048, inter=1408, experts=64, top_k=6, shared=2)


SHARD_MAP = "+shard_map"  # "<impl>+shard_map": expert_parallel="shard_map" on an expert mesh


def layer_config(shapes: dict, impl: str, dtype: str = "bfloat16") -> ModelConfig:
  """A DeepSeek-V2 config whose MoE layer has these shapes (the attention fields are unused)."""
  return ModelConfig.make(
      vocab_size=128, hidden_size=shapes["hidden"], intermediate_size=4 * shapes["hidden"],
      moe_intermediate_size=shapes["inter"], num_hidden_layers=2, num_attention_heads=2,
      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
      n_routed_experts=shapes["experts"], n_shared_experts=shapes["shared"],
      num_experts_per_tok=shapes["top_k"], first_k_dense_replace=1, topk_method="greedy",
      routed_scaling_factor=1.0, norm_topk_prob=False, dtype=dtype, param_dtype=dtype,
      moe_impl=impl.removesuffix(SHARD_MAP),
      expert_parallel="shard_map" if impl.endswith(SHARD_MAP) else "compiler")


def layer_step(cfg: ModelConfig):
  """(fn(params, x, cot) -> (dparams, dx), abstract params): the layer's forward+backward."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))),
                               nnx.Param)

  def loss(p, x, cot):
    y, _, stats = nnx.merge(graphdef, p)(x)
    return jnp.sum(y.astype(jnp.float32) * cot) + stats.balance

  return jax.grad(loss, argnums=(0, 1)), params


# ------------------------------------------------------------------ ideal FLOPs


def routed_flops(tokens: int, top_k: int, d_model: int, width: int) -> float:
  """Forward+backward FLOPs of the routed experts: 3 matmuls of 2*d*F per (token, k) slot
  forward, twice that backward (input and weight gradients): 6 x T x K x 3 x d x F."""
  return 6.0 * tokens * top_k * 3 * d_model * width


def layer_flops(tokens: int, top_k: int, d_model: int, width: int, experts: int,
                shared: int) -> float:
  """Routed experts + the shared experts (one SwiGLU of width shared*F on every token) + the
  router (one [d, E] matmul), forward+backward."""
  return (routed_flops(tokens, top_k, d_model, width) + routed_flops(tokens, 1, d_model,
                                                                        shared * width)
          + 6.0 * tokens * d_model * experts)


# ------------------------------------------------------------------ reading the HLO



@dataclasses.dataclass
class HloReport:
  impl: str
  dense_fallback: list          # result shapes of matmuls spanning every expert x every token row
  mosaic_calls: int             # Pallas kernels (tpu_custom_call / Mosaic GPU / Triton)
  custom_calls: dict            # every custom-call target: count
  matmuls: int                  # dot + convolution instructions
  flops: float                  # compiler's cost analysis
  ideal_routed_flops: float
  ideal_layer_flops: float
  temp_bytes: int
  compile_s: float
  error: str = ""
  dot_flops: float = 0.0        # counted from the compiled HLO (module_cost): dots + grouped
                                # matmul kernels, loops by their known trip counts
  unknown_loops: int = 0        # while loops of data-dependent trip count (counted once)
  kernel: str = ""              # what the routed experts' matmuls became (`kernel_kind`)

  @property
  def flops_over_ideal(self) -> float:
    return self.flops / self.ideal_layer_flops if self.ideal_layer_flops else float("nan")

  @property
  def dot_over_ideal(self) -> float:
    return self.dot_flops / self.ideal_layer_flops if self.ideal_layer_flops else float("nan")


def kernel_kind(dense_fallback: list, calls: dict, unknown_loops: int) -> str:
  """Names what the MoE dispatch compiled to, from the program's HLO."""
  kernels = {t: n for t, n in calls.items() if is_kernel(t)}
  if dense_fallback:
    return "dense dot over all experts"
  if kernels:
    name = ("Mosaic TPU" if "tpu_custom_call" in kernels else
            "Mosaic GPU" if any("mosaic" in t for t in kernels) else "Pallas Triton")
    return f"{name} grouped GEMM ({sum(kernels.values())} kernel calls)"
  if unknown_loops:
    return f"loop: a GEMM fusion per tile ({unknown_loops} while loops)"
  if any("cublas" in t for t in calls):
    return "cuBLAS GEMMs"
  return "XLA dots"


def matmul_shapes(hlo_text: str) -> list[tuple[tuple[int, ...], ...]]:
  """(result shape, operand shapes...) of every dot/convolution instruction in an (optimized)
  HLO text, fused computations included. Operand shapes are read where the text prints them
  (TPU) or looked up by operand name in the computation (GPU)."""
  out = []
  comps, _ = parse_hlo(hlo_text)
  for instrs in comps.values():
    shapes = {}
    for ins in instrs:
      arrays = _dims(ins.type_text)
      shapes[ins.name] = arrays[0][1] if arrays else ()
      if ins.op not in ("dot", "convolution") or not arrays:
        continue
      ops = []
      for name, inline in zip(ins.operands, ins.operand_types):
        dims = _dims(inline)
        ops.append(dims[0][1] if dims else shapes.get(name, ()))
      out.append((arrays[0][1], *ops))
  return out


def _spans_all(shape, experts: int, tokens: int, features) -> bool:
  if len(shape) < 3 or experts not in shape:
    return False
  rest = list(shape)
  rest.remove(experts)
  return any(r >= tokens for r in rest) and any(f in rest for f in features)


def dense_fallback_shapes(matmuls, experts: int, tokens: int, features: tuple[int, ...]):
  """Matmuls with a result or an operand that has the expert count as a dimension next to
  >= `tokens` rows and a feature dimension (d_model or the expert width): every expert over
  every token, forward ([T, E, F] results) or backward (weight gradients contracting [T, E, .]
  operands). Returns the first such shape of each."""
  out = []
  for shapes in matmuls:
    hit = [s for s in shapes if _spans_all(s, experts, tokens, features)]
    if hit:
      out.append(hit[0])
  return out


# -- FLOPs and collective bytes of a compiled module, loops by their trip counts

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "ragged-all-to-all")
_CALLEE = re.compile(r"\b(calls|body|to_apply|branch_computations|true_computation|"
                     r"false_computation)=\{?([^}\s,]+(?:,\s*%[^}\s,]+)*)\}?")


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def _dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(m.group(1), tuple(int(v) for v in m.group(2).split(",") if v))
          for m in _ARRAY.finditer(text)]


@dataclasses.dataclass
class _Instr:
  name: str
  type_text: str
  op: str
  operands: list            # operand names
  operand_types: list       # inline operand type texts ("" where only a name is printed)
  attrs: str


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[_Instr]], str]:
  """{computation name: its instructions}, and the ENTRY computation's name."""
  comps, entry, current = {}, "", None
  for raw in hlo_text.splitlines():
    line = raw.strip()
    if not line or line.startswith(("//", "HloModule")):
      continue
    if current is None:
      m = re.match(r"(ENTRY\s+)?%?([\w.\-$]+)\s*(\(|\{)", line)
      if m and line.endswith("{"):
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line == "}":
      current = None
      continue
    m = re.match(r"(?:ROOT\s+)?%?([\w.\-$]+)\s*=\s*", line)
    if not m:
      continue
    rest = line[m.end():]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    m_op = re.match(r"([\w\-$]+)\(", rest)
    if not m_op:
      continue
    close = _balanced(rest, m_op.end() - 1)
    args, attrs = rest[m_op.end():close - 1], rest[close:]
    names, types, depth, part = [], [], 0, ""
    for ch in args + ",":
      if ch == "," and depth == 0:
        toks = re.findall(r"%([\w.\-$]+)", part)
        names.append(toks[-1] if toks else "")
        types.append(part.split("%")[0] if "%" in part else "")
        part = ""
        continue
      depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(ch, 0)
      part += ch
    comps[current].append(_Instr(m.group(1), type_text, m_op.group(1), names, types, attrs))
  return comps, entry


def _trip_count(attrs: str) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
  return int(m.group(1)) if m else None


@dataclasses.dataclass
class ModuleCost:
  dot_flops: float = 0.0          # 2 x result elements x contracted size, every dot/convolution
  collective_bytes: float = 0.0   # result bytes of every collective
  unknown_loops: int = 0          # while loops without a known trip count (counted once)
  unknown_loop_dot_flops: float = 0.0  # of dot_flops: one trip of those loops' bodies
  kernels: dict = dataclasses.field(default_factory=dict)  # kernel custom calls: executions

  def add(self, other: "ModuleCost", times: float = 1.0) -> None:
    self.dot_flops += times * other.dot_flops
    self.collective_bytes += times * other.collective_bytes
    self.unknown_loops += other.unknown_loops
    self.unknown_loop_dot_flops += times * other.unknown_loop_dot_flops
    for k, n in other.kernels.items():
      self.kernels[k] = self.kernels.get(k, 0) + times * n


def _instr_cost(ins: _Instr, shapes: dict) -> ModuleCost:
  """The instruction's own dot FLOPs / collective bytes / kernel call (not its callees')."""
  cost = ModuleCost()
  arrays = _dims(ins.type_text)
  if ins.op in ("dot", "convolution") and arrays:
    inline = _dims(ins.operand_types[0]) if ins.operand_types and ins.operand_types[0] else []
    lhs = inline[0][1] if inline else shapes.get(ins.operands[0], ())
    if ins.op == "dot":
      m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
      contract = [int(v) for v in m.group(1).split(",") if v] if m else []
      k = math.prod(lhs[c] for c in contract if c < len(lhs))
    else:  # a convolution as a matmul: the contracted size is the lhs over the result rows
      k = max(1, math.prod(lhs) // max(1, math.prod(arrays[0][1])))
    cost.dot_flops = 2.0 * math.prod(arrays[0][1]) * k
  if ins.op.removesuffix("-start") in _COLLECTIVES:
    cost.collective_bytes = max((math.prod(d) * _DTYPE_BYTES[t] for t, d in arrays), default=0)
  if ins.op == "custom-call":
    t = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    if t and is_kernel(t.group(1)):
      cost.kernels[t.group(1)] = 1
      cost.dot_flops = grouped_matmul_flops(ins, arrays)
  return cost


def grouped_matmul_flops(ins: _Instr, result) -> float:
  """A kernel's FLOPs where it is a grouped matmul (what tokamax's ragged_dot kernels are): lhs
  [M, K] with rhs [G, K, N] -> [M, N] (forward, input gradient), or lhs [M, K] with [M, N] ->
  [G, K, N] (weight gradient): 2 M K N over the M rows the kernel is given. 0 otherwise."""
  at = ins.attrs.find("operand_layout_constraints={")
  if at >= 0:
    start = at + len("operand_layout_constraints=")
    operands = _dims(ins.attrs[start:_balanced(ins.attrs, start)])
  else:
    operands = [a for t in ins.operand_types for a in _dims(t)]
  if len(operands) < 2 or len(result) != 1:
    return 0.0
  (_, a), (_, b), (_, r) = operands[0], operands[1], result[0]
  if len(a) == 2 and len(b) == 3 and len(r) == 2 and r[0] == a[0] and b[1] == a[1]:
    return 2.0 * a[0] * a[1] * r[1]
  if len(a) == 2 and len(b) == 2 and len(r) == 3 and a[0] == b[0] and r[1:] == (a[1], b[1]):
    return 2.0 * a[0] * a[1] * b[1]
  return 0.0


def module_cost(hlo_text: str) -> ModuleCost:
  """What the compiled module executes, every while body counted by XLA's known trip count
  (nested loops multiply; a conditional by its costliest branch). XLA's own cost analysis
  counts a loop body once, and answers nothing for a GPU compile-only executable. A dot inside
  a Pallas kernel (a custom call) is not visible: those calls are counted in `kernels`."""
  comps, entry = parse_hlo(hlo_text)
  memo: dict[str, ModuleCost] = {}

  def comp_cost(name: str) -> ModuleCost:
    if name in memo:
      return memo[name]
    total, shapes = ModuleCost(), {}
    for ins in comps.get(name, []):
      arrays = _dims(ins.type_text)
      shapes[ins.name] = arrays[0][1] if arrays else ()
      total.add(_instr_cost(ins, shapes))
      if ins.op == "while":
        n = _trip_count(ins.attrs)
        body = re.search(r"body=%?([\w.\-$]+)", ins.attrs)
        total.unknown_loops += n is None
        if body:
          total.add(comp_cost(body.group(1)), n or 1)
          if n is None:
            total.unknown_loop_dot_flops += comp_cost(body.group(1)).dot_flops
        continue
      branches = []
      for key, names in _CALLEE.findall(ins.attrs):
        callees = [c.strip().lstrip("%") for c in names.split(",")]
        if key in ("branch_computations", "true_computation", "false_computation"):
          branches += callees
        elif key == "calls":  # fusions, async ops, calls (to_apply: reductions, no dots)
          for c in callees:
            total.add(comp_cost(c))
      if branches:
        total.add(max((comp_cost(b) for b in branches), key=lambda c: c.dot_flops))
    memo[name] = total
    return total

  return comp_cost(entry)


def custom_call_targets(hlo_text: str) -> dict[str, int]:
  counts: dict[str, int] = {}
  for t in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
    counts[t] = counts.get(t, 0) + 1
  return counts


def is_kernel(target: str) -> bool:
  """Pallas kernels: Mosaic TPU, Mosaic GPU, Triton."""
  return target in ("tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2", "__gpu$xla.gpu.triton",
                    "triton_kernel_call") or "mosaic" in target or "triton" in target


def analyze(compiled, impl: str, *, tokens: int, shapes: dict, compile_s: float,
            experts: int | None = None) -> HloReport:
  text = compiled.as_text()
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # GPU compile-only: UNIMPLEMENTED
    cost = None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  calls = custom_call_targets(text)
  mm = matmul_shapes(text)
  counted = module_cost(text)
  fallback = [list(s) for s in dense_fallback_shapes(
      mm, experts or shapes["experts"], tokens, (shapes["hidden"], shapes["inter"]))]
  return HloReport(
      impl=impl, dense_fallback=fallback,
      mosaic_calls=sum(n for t, n in calls.items() if is_kernel(t)),
      custom_calls=calls, matmuls=len(mm), flops=float((cost or {}).get("flops", 0.0)),
      dot_flops=counted.dot_flops, unknown_loops=counted.unknown_loops,
      kernel=kernel_kind(fallback, calls, counted.unknown_loops),
      ideal_routed_flops=routed_flops(tokens, shapes["top_k"], shapes["hidden"], shapes["inter"]),
      ideal_layer_flops=layer_flops(tokens, shapes["top_k"], shapes["hidden"], shapes["inter"],
                                    shapes["experts"], shapes["shared"]),
      temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0) or 0), compile_s=compile_s)


# ------------------------------------------------------------------ compiling


def target_device(target: str):
  if target == "local":
    return jax.devices()[0]
  if gpu_target.is_gpu_target(target):
    return gpu_target.topology_devices(target.split(":")[0] + ":1")[0]
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(platform="tpu", topology_name=target).devices[0]


def compile_layer(impl: str, device, tokens: int, shapes: dict = V2_LITE,
                  dtype: str = "bfloat16", ep_devices=None):
  """(compiled, seconds) of the layer's forward+backward for `device` (compile-only if it is a
  topology device). "<impl>+shard_map": on an `expert` mesh of `ep_devices` (the tokens split
  over it, E/ep experts per device), through expert_parallel.py's exchange."""
  cfg = layer_config(shapes, impl, dtype)
  step, params = layer_step(cfg)
  mesh = None
  if impl.endswith(SHARD_MAP):
    mesh = sharding_lib.make_mesh({"expert": len(ep_devices)}, ep_devices)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, sharding_lib.state_shardings(params, mesh))
    act = sharding_lib.batch_sharding(mesh, 3)
    rows = len(ep_devices)
  else:
    act = jax.sharding.SingleDeviceSharding(device)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=act), params)
    rows = 1
  abs_params = params
  x = jax.ShapeDtypeStruct((rows, tokens // rows, shapes["hidden"]), jnp.dtype(dtype),
                           sharding=act)
  cot = jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=act)
  t0 = time.perf_counter()
  # tokamax picks its kernel by JAX's default device: the target's, not this host's. A
  # compile-only GPU device reports no compute capability, so tokamax's hardware checks are
  # switched off instead (gpu_target.kernel_context).
  ctx = (jax.default_device(device) if device.platform == "tpu" else
         gpu_target.kernel_context() if device.platform == "gpu" else contextlib.nullcontext())
  with ctx, (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    compiled = jax.jit(step).lower(abs_params, x, cot).compile()
  return compiled, time.perf_counter() - t0


def ep_target_devices(target: str, ep: int):
  """`ep` devices of the target for a "+shard_map" row (a GPU target's topology of ep GPUs)."""
  if gpu_target.is_gpu_target(target):
    return gpu_target.topology_devices(f"{target.split(':')[0]}:{ep}")
  if target == "local":
    return jax.devices()[:ep]
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(platform="tpu", topology_name=target).devices[:ep]


def check(impls, target: str, tokens: int, shapes: dict = V2_LITE,
          ep: int = 8) -> list[HloReport]:
  """One report per impl. A "+shard_map" row runs on `ep` devices and is reported per device:
  its dot FLOPs times ep against the layer's ideal."""
  device = target_device(target)
  reports = []
  for impl in impls:
    try:
      ep_devices = ep_target_devices(target, ep) if impl.endswith(SHARD_MAP) else None
      compiled, secs = compile_layer(impl, device, tokens, shapes, ep_devices=ep_devices)
      r = analyze(compiled, impl, tokens=tokens, shapes=shapes, compile_s=secs,
                  experts=shapes["experts"] // (ep if ep_devices else 1))
      if ep_devices:
        r.dot_flops *= ep
      reports.append(r)
    except Exception as e:  # pylint: disable=broad-except  # e.g. does not fit: reported
      reports.append(HloReport(impl, [], 0, {}, 0, 0.0, 0.0, 0.0, 0, 0.0,
                               error=f"{type(e).__name__}: {str(e)[:300]}"))
  return reports


def table(reports: list[HloReport]) -> str:
  head = ("impl", "kernel found", "dense-fallback matmuls", "dots+convs", "HLO dot GFLOP",
          "ideal layer GFLOP", "HLO / ideal", "compiler GFLOP", "temp GiB", "compile s")
  rows = [head]
  for r in reports:
    if r.error:
      rows.append((r.impl, "error: " + r.error[:80], *[""] * (len(head) - 2)))
      continue
    fb = (f"{len(r.dense_fallback)} e.g. {r.dense_fallback[0]}" if r.dense_fallback else "0")
    ratio = f"{r.dot_over_ideal:.2f}" + (" (loops once)" if r.unknown_loops else "")
    rows.append((r.impl, r.kernel, fb, str(r.matmuls), f"{r.dot_flops / 1e9:.0f}",
                 f"{r.ideal_layer_flops / 1e9:.0f}", ratio,
                 f"{r.flops / 1e9:.0f}" if r.flops else "n/a",
                 f"{r.temp_bytes / 2**30:.2f}", f"{r.compile_s:.0f}"))
  return "\n".join("| " + " | ".join(r) + " |" for r in rows[:1]) + "\n|" + "---|" * len(head) + \
      "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows[1:])


def auto_choice(reports: list[HloReport], limit: float = 1.2) -> str:
  """The single-device impl whose program is a grouped GEMM within `limit` x the ideal FLOPs
  (what moe_impl="auto" should pick on the target), or why none is."""
  ok = [r for r in reports if not r.error and not r.impl.endswith(SHARD_MAP)
        and not r.dense_fallback and not r.unknown_loops and "grouped GEMM" in r.kernel
        and r.dot_over_ideal <= limit]
  if ok:
    best = min(ok, key=lambda r: r.dot_over_ideal)
    return f"{best.impl} ({best.kernel}, {best.dot_over_ideal:.2f} x ideal)"
  return (f"none: no impl compiled to a grouped GEMM within {limit} x the ideal FLOPs "
          "(dense fallbacks, loops or errors above)")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--target", default="v5e:2x2",
                 help="TPU topology (compile-only), a GPU (h100, h200: compile-only, needs "
                      ".[gpu_plan]) or 'local'")
  p.add_argument("--impls", default="",
                 help=f"comma-separated moe_impl values ({', '.join(moe_lib.IMPLS)}), each "
                      f"optionally with '{SHARD_MAP}' (expert_parallel='shard_map' on --ep "
                      "devices); default ragged,tokamax on TPU, all of them on a GPU")
  p.add_argument("--tokens", type=int, default=8192, help="tokens in the layer's batch")
  p.add_argument("--ep", type=int, default=8, help=f"devices of a '{SHARD_MAP}' row")
  p.add_argument("--json_out", default="", help="also write the reports here (JSON)")
  args = p.parse_args(argv)
  gpu = gpu_target.is_gpu_target(args.target)
  impls = [s for s in args.impls.split(",") if s] or (
      ["ragged", "tokamax", "tiled", "dense", "ragged" + SHARD_MAP, "tokamax" + SHARD_MAP]
      if gpu else ["ragged", "tokamax"])
  for s in impls:
    if s.removesuffix(SHARD_MAP) not in moe_lib.IMPLS:
      p.error(f"--impls: {s!r} not in {moe_lib.IMPLS} (optionally + {SHARD_MAP!r})")
  reports = check(impls, args.target, args.tokens, ep=args.ep)
  print(f"target {args.target}, one V2-Lite MoE layer fwd+bwd, {args.tokens} tokens, bf16"
        + (f"; '{SHARD_MAP}' rows on {args.ep} devices, FLOPs of all of them" if any(
            i.endswith(SHARD_MAP) for i in impls) else ""))
  print(table(reports))
  platform = "gpu" if gpu else "tpu"
  print(f"grouped GEMM within 1.2x of ideal: {auto_choice(reports)}; moe_impl='auto' runs "
        f"{moe_lib.resolve_impl('auto', platform)} on one device of this target (sharded, "
        f"e.g. expert_parallel='shard_map': {moe_lib.resolve_impl('auto', platform, True)})")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump([dict(dataclasses.asdict(r), flops_over_ideal=r.flops_over_ideal,
                      dot_over_ideal=r.dot_over_ideal) for r in reports], f, indent=1)
  return reports


if __name__ == "__main__":
  main()
