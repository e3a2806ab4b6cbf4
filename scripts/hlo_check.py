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

from desmoe_jax.moe import block as moe_lib  # noqa: E402
from desmoe_jax.config import ModelConfig  # noqa: E402

V2_LITE = dict(hidden=2048, inter=1408, experts=64, top_k=6, shared=2)


def layer_config(shapes: dict, impl: str, dtype: str = "bfloat16") -> ModelConfig:
  """A DeepSeek-V2 config whose MoE layer has these shapes (the attention fields are unused)."""
  return ModelConfig.make(
      vocab_size=128, hidden_size=shapes["hidden"], intermediate_size=4 * shapes["hidden"],
      moe_intermediate_size=shapes["inter"], num_hidden_layers=2, num_attention_heads=2,
      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
      n_routed_experts=shapes["experts"], n_shared_experts=shapes["shared"],
      num_experts_per_tok=shapes["top_k"], first_k_dense_replace=1, topk_method="greedy",
      routed_scaling_factor=1.0, norm_topk_prob=False, dtype=dtype, param_dtype=dtype,
      moe_impl=impl)


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

_SHAPE = re.compile(r"\b(?:bf16|f16|f32|f64|s8|s32|u8|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(?:\(|)?[a-z0-9]+\[[0-9,]*\][^ ]*\s+(dot|convolution)\(")


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

  @property
  def flops_over_ideal(self) -> float:
    return self.flops / self.ideal_layer_flops if self.ideal_layer_flops else float("nan")


def matmul_shapes(hlo_text: str) -> list[tuple[tuple[int, ...], ...]]:
  """(result shape, operand shapes...) of every dot/convolution instruction in an (optimized)
  HLO text, fused computations included."""
  out = []
  for line in hlo_text.splitlines():
    if not _OP.search(line):
      continue
    rhs = line.split("=", 1)[1]
    out.append(tuple(tuple(int(v) for v in m.group(1).split(",") if v)
                     for m in _SHAPE.finditer(rhs)))
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


def custom_call_targets(hlo_text: str) -> dict[str, int]:
  counts: dict[str, int] = {}
  for t in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
    counts[t] = counts.get(t, 0) + 1
  return counts


def is_kernel(target: str) -> bool:
  """Pallas kernels: Mosaic TPU, Mosaic GPU, Triton."""
  return target in ("tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2", "__gpu$xla.gpu.triton",
                    "triton_kernel_call") or "mosaic" in target or "triton" in target


def analyze(compiled, impl: str, *, tokens: int, shapes: dict, compile_s: float) -> HloReport:
  text = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  calls = custom_call_targets(text)
  mm = matmul_shapes(text)
  return HloReport(
      impl=impl,
      dense_fallback=[list(s) for s in dense_fallback_shapes(
          mm, shapes["experts"], tokens, (shapes["hidden"], shapes["inter"]))],
      mosaic_calls=sum(n for t, n in calls.items() if is_kernel(t)),
      custom_calls=calls, matmuls=len(mm), flops=float(cost.get("flops", 0.0)),
      ideal_routed_flops=routed_flops(tokens, shapes["top_k"], shapes["hidden"], shapes["inter"]),
      ideal_layer_flops=layer_flops(tokens, shapes["top_k"], shapes["hidden"], shapes["inter"],
                                    shapes["experts"], shapes["shared"]),
      temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0) or 0), compile_s=compile_s)


# ------------------------------------------------------------------ compiling


def target_device(target: str):
  if target == "local":
    return jax.devices()[0]
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(platform="tpu", topology_name=target).devices[0]


def compile_layer(impl: str, device, tokens: int, shapes: dict = V2_LITE,
                  dtype: str = "bfloat16"):
  """(compiled, seconds) of the layer's forward+backward for `device` (compile-only if it is a
  topology device)."""
  cfg = layer_config(shapes, impl, dtype)
  step, params = layer_step(cfg)
  sharding = jax.sharding.SingleDeviceSharding(device)
  on = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  abs_params = jax.tree.map(on, params)
  x = jax.ShapeDtypeStruct((1, tokens, shapes["hidden"]), jnp.dtype(dtype), sharding=sharding)
  cot = jax.ShapeDtypeStruct((1, tokens, shapes["hidden"]), jnp.float32, sharding=sharding)
  t0 = time.perf_counter()
  # tokamax picks its kernel by JAX's default device: the target's, not this host's.
  ctx = jax.default_device(device) if device.platform == "tpu" else contextlib.nullcontext()
  with ctx:
    compiled = jax.jit(step).lower(abs_params, x, cot).compile()
  return compiled, time.perf_counter() - t0


def check(impls, target: str, tokens: int, shapes: dict = V2_LITE) -> list[HloReport]:
  device = target_device(target)
  reports = []
  for impl in impls:
    try:
      compiled, secs = compile_layer(impl, device, tokens, shapes)
      reports.append(analyze(compiled, impl, tokens=tokens, shapes=shapes, compile_s=secs))
    except Exception as e:  # pylint: disable=broad-except  # e.g. does not fit: reported
      reports.append(HloReport(impl, [], 0, {}, 0, 0.0, 0.0, 0.0, 0, 0.0,
                               error=f"{type(e).__name__}: {str(e)[:300]}"))
  return reports


def table(reports: list[HloReport]) -> str:
  head = ("impl", "dense-fallback matmuls", "Pallas kernels", "dots+convs", "compiler GFLOP",
          "ideal layer GFLOP", "ratio", "temp GiB", "compile s")
  rows = [head]
  for r in reports:
    if r.error:
      rows.append((r.impl, "error: " + r.error[:80], "", "", "", "", "", "", ""))
      continue
    fb = (f"{len(r.dense_fallback)} e.g. {r.dense_fallback[0]}" if r.dense_fallback else "0")
    rows.append((r.impl, fb, str(r.mosaic_calls), str(r.matmuls), f"{r.flops / 1e9:.0f}",
                 f"{r.ideal_layer_flops / 1e9:.0f}", f"{r.flops_over_ideal:.2f}",
                 f"{r.temp_bytes / 2**30:.2f}", f"{r.compile_s:.0f}"))
  return "\n".join("| " + " | ".join(r) + " |" for r in rows[:1]) + "\n|" + "---|" * len(head) + \
      "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows[1:])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--target", default="v5e:2x2", help="TPU topology (compile-only) or 'local'")
  p.add_argument("--impls", default="ragged,tokamax",
                 help=f"comma-separated moe_impl values ({', '.join(moe_lib.IMPLS)})")
  p.add_argument("--tokens", type=int, default=8192, help="tokens in the layer's batch")
  p.add_argument("--json_out", default="", help="also write the reports here (JSON)")
  args = p.parse_args(argv)
  impls = [s for s in args.impls.split(",") if s]
  for s in impls:
    if s not in moe_lib.IMPLS:
      p.error(f"--impls: {s!r} not in {moe_lib.IMPLS}")
  reports = check(impls, args.target, args.tokens)
  print(f"target {args.target}, one V2-Lite MoE layer fwd+bwd, {args.tokens} tokens, bf16")
  print(table(reports))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump([dict(dataclasses.asdict(r), flops_over_ideal=r.flops_over_ideal)
                 for r in reports], f, indent=1)
  return reports


if __name__ == "__main__":
  main()
