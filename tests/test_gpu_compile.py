"""desmoe_jax/gpu_target.py and the GPU targets of scripts/memory_plan.py: target names, the usable
memory, and (with JAX's CUDA plugin, `pip install -e .[gpu_plan]`) the tiny model's train step
compiled by XLA's GPU compiler for one simulated H100: moe_impl="auto" leaves no dot over all
experts in the program, and "ragged" does (XLA:GPU's dense expansion: the check can fail)."""

import os
import re
import subprocess
import sys

import pytest

from desmoe_jax import gpu_target
from desmoe_jax.moe import block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_target_names_and_usable_memory():
  assert gpu_target.parse_target("h100:8") == ("h100", 1, 8)
  assert gpu_target.parse_target("h100:2x8") == ("h100", 2, 8)
  assert gpu_target.parse_target("h200") == ("h200", 1, 1)
  assert gpu_target.device_count("h100:2x8") == 16
  assert gpu_target.is_gpu_target("h200:1") and not gpu_target.is_gpu_target("v5e:2x4")
  with pytest.raises(ValueError, match="a100"):
    gpu_target.parse_target("a100:8")
  with pytest.raises(ValueError, match="h100:eight"):
    gpu_target.parse_target("h100:eight")
  # The spec's device memory (79.11 GiB for the H100 SXM) times the fraction JAX preallocates.
  h100 = gpu_target.GPUS["h100"].hbm_bytes
  assert gpu_target.usable_bytes("h100:8", 0.75) == int(h100 * 0.75)
  assert gpu_target.usable_bytes("h200:1", 0.95) == int(gpu_target.GPUS["h200"].hbm_bytes * 0.95)
  with pytest.raises(ValueError, match="1.5"):
    gpu_target.usable_bytes("h100:8", 1.5)
  for gpu in gpu_target.GPUS.values():  # the shipped spec says the same size
    spec = open(os.path.join(gpu_target.SPECS_DIR, gpu.spec)).read()
    assert f"device_memory_size: {gpu.hbm_bytes}" in spec
    assert "collective_memory_granularity" not in spec   # jax 0.10.2 cannot parse it


def test_auto_picks_the_grouped_gemm_on_gpu_and_keeps_cpu_and_tpu():
  assert block.resolve_impl("auto", "cpu") == "tiled"
  assert block.resolve_impl("auto", "tpu") == "ragged"
  assert block.resolve_impl("auto", "cuda") == "tokamax"
  assert block.resolve_impl("auto", "gpu", sharded=True) == "tiled"
  assert block.resolve_impl("auto", "tpu", sharded=True) == "ragged"
  assert block.resolve_impl("auto", "cpu", sharded=True) == "tiled"


def _plan_tiny(moe_impl: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=gpu_target.CUB_FLAG,
             JAX_ENABLE_COMPILATION_CACHE="false", HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "memory_plan.py"),
       "--config=" + os.path.join(REPO, "configs", "six_domains.py") + ":tiny", "--arch=tiny",
       "--methods=desmoe", "--phases=stabilization", "--target=h100:1", "--batch=2",
       "--seq=128", f"--config.model.moe_impl={moe_impl}"],
      env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.skipif(not gpu_target.plugin_installed(),
                    reason="needs JAX's CUDA plugin (pip install -e .[gpu_plan])")
def test_tiny_train_step_for_one_h100_has_no_dense_all_experts_dot():
  auto = _plan_tiny("auto")
  assert "moe_impl tokamax" in auto, auto
  m = re.search(r"argument (\d+) B = shard sizes (\d+) B \+ 0 .*dense all-expert dots (\d+)", auto)
  assert m, auto
  assert m.group(1) == m.group(2) and m.group(3) == "0", auto   # exact arguments, no fallback
  ragged = _plan_tiny("ragged")
  m = re.search(r"dense all-expert dots (\d+)", ragged)
  assert m and int(m.group(1)) > 0, ragged
