"""bench/accel.py: its FLOP formulas against independent counts, and --smoke running every
stage end to end on CPU (the same code the accelerator run takes, at tiny shapes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from helpers import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import accel  # noqa: E402
import hlo_check  # noqa: E402

from desmoe_jax.config import ModelConfig  # noqa: E402
from desmoe_jax.model import init_model  # noqa: E402


def test_layer_flop_formulas_by_hand():
  # 2 tokens, top-1, d=3, F=5: per slot 3 matmuls of 3x5 MACs, x2 FLOPs, x3 for fwd+bwd.
  assert hlo_check.routed_flops(2, 1, 3, 5) == 2 * 1 * 3 * (3 * 5) * 2 * 3
  # + shared (width 2*5 on both tokens) + router (3 x 4 experts on both tokens)
  assert hlo_check.layer_flops(2, 1, 3, 5, experts=4, shared=2) == (
      540 + 2 * 3 * (3 * 10) * 6 + 2 * (3 * 4) * 6)
  assert accel.matmul_flops(8192) == 2 * 8192 ** 3


@pytest.mark.parametrize("alr", [False, True])
def test_train_flops_per_token_counts_the_model_matmuls(alr):
  """6 x (every matmul weight a token meets, counted from the built model: routed experts at
  top_k/E of theirs, no embedding) + causal attention, for a model with q_lora and without."""
  for extra in ({}, {"q_lora_rank": 12}):
    cfg = ModelConfig(**dict(TINY, **extra))
    state = nnx.state(init_model(cfg), nnx.Param)
    macs = 0.0
    for path, v in nnx.to_flat_state(state):
      name = "/".join(str(p) for p in path)
      if v[...].ndim < 2 or "embed_tokens" in name or "norm" in name:  # norms: stacked 1-D
        continue
      size = float(np.prod(v[...].shape))
      if "moe_layers" in name and "/experts/" in name:
        size *= cfg.num_experts_per_tok / cfg.n_routed_experts
      macs += size
    hidden = 4 * cfg.hidden_size if alr else 0
    if alr:  # the ALR MLP and its residual linear router, in every MoE layer
      macs += (cfg.num_hidden_layers - cfg.first_k_dense_replace) * (
          cfg.hidden_size * hidden + hidden * cfg.n_routed_experts)
    seq = 16
    attention = cfg.num_hidden_layers * seq / 2 * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    np.testing.assert_allclose(accel.train_flops_per_token(cfg, seq, hidden),
                               6 * (macs + attention), rtol=1e-12)


def test_datasheet_peak_matches_the_longest_name():
  assert accel.datasheet_peak("NVIDIA H200") == 989e12
  assert accel.datasheet_peak("TPU v5 lite") == 197e12   # not "TPU v5" (v5p)
  assert accel.datasheet_peak("cpu") is None


def test_smoke_runs_every_stage(tmp_path):
  out = tmp_path / "acc"
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "accel.py"), "--smoke",
                         f"--out_dir={out}"], env=env, capture_output=True, text=True,
                        timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (out / "accel.jsonl").read_text().splitlines()]
  status = {r["stage"]: r["status"] for r in records if "status" in r}
  assert status == {s: "ok" for s in accel.STAGES}, [r for r in records if "status" in r]
  by = lambda stage: [r for r in records if r["stage"] == stage and "status" not in r]
  errors = [r for r in records if "error" in r]
  assert not errors, errors
  assert {r["impl"] for r in by("moe_torch")} == {"eager", "grouped_mm"}
  assert by("moe_torch")[1]["check_vs_eager"]["ok"]
  jax_layers = {r["impl"]: r for r in by("moe_jax")}
  assert set(jax_layers) == {"ragged", "tokamax"}
  for r in jax_layers.values():
    assert r["check_vs_torch_eager"]["ok"] and r["median_ms"] > 0
    assert r["hlo"]["compiler_flops"] > 0
    # On CPU both are ragged_dot (tokamax has no CPU kernel and falls back to it), which XLA:CPU
    # lowers to a dot over all experts (moe/block.py); the check reads operand shapes by name,
    # as XLA:CPU prints them, and finds it. On a GPU tokamax must show none (bench/RESULTS.md;
    # tests/test_gpu_compile.py holds the compile-only GPU program to that).
    assert r["hlo"]["dense_fallback"]
  assert jax_layers["tokamax"]["check_vs_ragged"]["ok"]
  train = {r["method"]: r for r in by("train_jax")}
  assert set(train) == {"fft", "desmoe"}
  for r in train.values():
    assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mfu_vs_ceiling"] > 0
  assert by("ceiling_jax")[0]["matmul_tflops"] > 0 and by("ceiling_torch")[0]["copy_gbs"] > 0
