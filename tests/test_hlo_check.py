"""scripts/hlo_check.py: its HLO reading on hand-written HLO, and (with libtpu) the TPU v5e
compile of a V2-Lite-shaped MoE layer: no dense-fallback matmul and Pallas kernels for
"tokamax", a dense fallback seen in "dense" (the check can fail)."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import hlo_check  # noqa: E402

HLO = """
ENTRY %main {
  %p0 = bf16[4096,2048]{1,0} parameter(0)
  %dot.1 = bf16[4096,64,1408]{2,1,0:T(8,128)(2,1)} dot(bf16[4096,2048]{1,0} %p0, bf16[64,2048,1408]{2,1,0} %w), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %router = f32[4096,64]{1,0} dot(f32[4096,2048]{1,0} %x, f32[2048,64]{1,0} %g), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %convolution.3 = bf16[64,2048,1408]{2,1,0} convolution(bf16[4096,64,2048]{2,1,0} %a, bf16[4096,64,1408]{2,1,0} %b), window={size=64}, dim_labels=0bf_0oi->bf0
  %expert_grad = bf16[8,2048,1408]{2,1,0} dot(bf16[8,512,2048] %c, bf16[8,512,1408] %d), lhs_batch_dims={0}
  %k = bf16[24576,1408]{1,0} custom-call(bf16[24576,2048]{1,0} %xs), custom_call_target="tpu_custom_call"
  %s = s32[64]{0} custom-call(s32[64]{0} %z), custom_call_target="TopK"
}
"""


def test_reads_matmuls_fallbacks_and_kernels_from_hlo_text():
  matmuls = hlo_check.matmul_shapes(HLO)
  assert [m[0] for m in matmuls] == [(4096, 64, 1408), (4096, 64), (64, 2048, 1408),
                                     (8, 2048, 1408)]
  assert matmuls[0][1:] == ((4096, 2048), (64, 2048, 1408))
  # The [T, E, F] forward and the [E, D, F] weight gradient contracting [T, E, D] x [T, E, F]
  # are dense fallbacks; the router's [T, E] logits and an 8-expert, 512-row batch are not.
  fallback = hlo_check.dense_fallback_shapes(matmuls, experts=64, tokens=4096,
                                             features=(2048, 1408))
  assert fallback == [(4096, 64, 1408), (4096, 64, 2048)]
  calls = hlo_check.custom_call_targets(HLO)
  assert calls == {"tpu_custom_call": 1, "TopK": 1}
  assert hlo_check.is_kernel("tpu_custom_call") and not hlo_check.is_kernel("TopK")


def _has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _has_libtpu(), reason="needs libtpu (compile-only TPU lowering)")
def test_tpu_v5e_compile_of_a_v2_lite_layer():
  """V2-Lite widths (2048 x 64 experts x 1408, top-6, 2 shared, bf16) with 1024 tokens:
  "tokamax" compiles to Pallas (Mosaic) kernels with no dense-fallback matmul, and the
  compiler's FLOPs are within 25% of the ideal layer FLOPs; "dense" is flagged."""
  reports = {r.impl: r for r in hlo_check.check(["tokamax", "dense"], "v5e:2x2", tokens=1024)}
  tok, dense = reports["tokamax"], reports["dense"]
  assert not tok.error and not dense.error, (tok.error, dense.error)
  assert tok.dense_fallback == [] and tok.mosaic_calls >= 6, tok
  assert 0.75 < tok.flops_over_ideal < 1.25, tok
  assert dense.dense_fallback and dense.mosaic_calls == 0, dense


# A GPU-style module (operands printed by name only): a while loop of known trip count 26 over a
# body with one dot and an all-gather, a loop of unknown trip count, and a Triton grouped-matmul
# kernel (lhs [M, K] x rhs [G, K, N] -> [M, N]).
GPU_HLO = """
HloModule m

%fused_dot (p0: bf16[128,64], p1: bf16[64,32]) -> bf16[128,32] {
  %p0 = bf16[128,64]{1,0} parameter(0)
  %p1 = bf16[64,32]{1,0} parameter(1)
  ROOT %d = bf16[128,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], bf16[128,64])) -> (s32[], bf16[128,64]) {
  %t = (s32[], bf16[128,64]{1,0}) parameter(0)
  %x = bf16[128,64]{1,0} get-tuple-element(%t), index=1
  %w = bf16[64,32]{1,0} constant({...})
  %f = bf16[128,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %g = bf16[1024,32]{1,0} all-gather(%f), dimensions={0}
  ROOT %r = (s32[], bf16[128,64]{1,0}) tuple(%i, %x)
}

%cond (t: (s32[], bf16[128,64])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[128,64], xs: bf16[600,256], ws: bf16[8,256,512]) -> bf16[600,512] {
  %a = bf16[128,64]{1,0} parameter(0)
  %w0 = (s32[], bf16[128,64]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"26"}}
  %w1 = (s32[], bf16[128,64]{1,0}) while(%t1), condition=%cond, body=%body
  %xs = bf16[600,256]{1,0} parameter(1)
  %ws = bf16[8,256,512]{2,1,0} parameter(2)
  ROOT %k = bf16[600,512]{1,0} custom-call(%xs, %ws, %sz), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={bf16[600,256]{1,0}, bf16[8,256,512]{2,1,0}, s32[8]{0}}
}
"""


def test_module_cost_counts_loops_by_trip_count_and_grouped_kernels():
  cost = hlo_check.module_cost(GPU_HLO)
  dot = 2 * 128 * 32 * 64
  # 26 trips + 1 for the loop of unknown trip count (counted once, and reported).
  assert cost.unknown_loops == 1
  assert cost.dot_flops == 27 * dot + 2 * 600 * 256 * 512
  assert cost.collective_bytes == 27 * 1024 * 32 * 2
  assert cost.kernels == {"__gpu$xla.gpu.triton": 1}
  # Operand shapes looked up by name (GPU text prints none inline).
  assert hlo_check.matmul_shapes(GPU_HLO) == [((128, 32), (128, 64), (64, 32))]
  assert hlo_check.kernel_kind([], {"__gpu$xla.gpu.triton": 9}, 0).startswith("Pallas Triton")
  assert hlo_check.kernel_kind([], {}, 6).startswith("loop")
  assert hlo_check.kernel_kind([(64, 49152, 1408)], {}, 0) == "dense dot over all experts"
