"""Compile-only GPU targets: XLA's real GPU compiler on a machine without a GPU.

JAX's CUDA plugin (`pip install -e .[gpu_plan]`: jax-cuda12-plugin and jax-cuda12-pjrt at the
jax version, ptxas from nvidia-cuda-nvcc-cu12) compiles for GPUs that are not there, from an XLA
GPU target spec (`desmoe_jax/gpu_specs/`, from openxla/xla; see its README). Two settings make
that work, and `check_environment` names them when they are missing:
  JAX_PLATFORMS=cpu   the plugin then skips its CUDA-runtime check (else "topology not
                      implemented for cuda")
  XLA_FLAGS=--xla_gpu_deviceless_cub_mode=DEVICELESS_CUB_DISABLED
                      a large argsort otherwise becomes a CUB call, and compiling it loads CUDA
                      libraries that are not there

Memory kinds. A deviceless GPU device lists no memories, so JAX drops every `memory_kind` of a
sharding on it: `optim.host_offload`'s `pinned_host` optimizer state would silently be planned
on the device. A real GPU client reports `device` and `pinned_host`, as XLA:CPU's devices do;
`compile_for` therefore traces and lowers the program on a mesh of CPU devices of the same
shape (memory kinds kept; `lowering_platforms=("cuda",)` picks every platform-dependent branch
for CUDA) and hands the lowered module to the GPU compiler with the GPU devices as its device
assignment. The compiled program is then exactly the one a GPU host would compile, host
buffers included.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax

SPECS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
CUB_FLAG = "--xla_gpu_deviceless_cub_mode=DEVICELESS_CUB_DISABLED"
# JAX preallocates this fraction of GPU memory and lets a program use no more
# (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75); docs/SCALING.md says what the presets need.
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Gpu:
  spec: str             # file in gpu_specs/
  hbm_bytes: int        # device_memory_size of the spec (what the driver reports)
  bf16_flops: float     # datasheet dense bf16 tensor-core peak, FLOP/s
  hbm_bytes_per_s: float  # datasheet memory bandwidth
  nvlink_bytes_per_s: float  # datasheet NVLink bandwidth, one direction


# Datasheet peaks (NVIDIA H100 SXM and H200 SXM product briefs): 989 TFLOP/s dense bf16 for both,
# 3.35 and 4.8 TB/s HBM, 450 GB/s NVLink per direction (900 GB/s bidirectional).
GPUS = {
    "h100": Gpu("h100_sxm.txtpb", 84942979072, 989e12, 3.35e12, 450e9),
    "h200": Gpu("h200.txtpb", 151397597184, 989e12, 4.8e12, 450e9),
}


def is_gpu_target(target: str) -> bool:
  return target.split(":")[0] in GPUS


def parse_target(target: str) -> tuple[str, int, int]:
  """'h100:8' -> ('h100', 1 host, 8 GPUs per host); 'h100:2x8' -> 2 hosts x 8; 'h200' = 'h200:1'."""
  name, _, count = target.partition(":")
  if name not in GPUS:
    raise ValueError(f"--target={target}: unknown GPU {name!r}; known: {sorted(GPUS)}")
  hosts, _, per_host = (count or "1").rpartition("x")
  if not per_host.isdigit() or (hosts and not hosts.isdigit()) or int(per_host) < 1:
    raise ValueError(f"--target={target}: expected {name}:<GPUs> or {name}:<hosts>x<GPUs per "
                     "host>, e.g. h100:8 or h100:2x8")
  return name, int(hosts or 1), int(per_host)


def device_count(target: str) -> int:
  _, hosts, per_host = parse_target(target)
  return hosts * per_host


def usable_bytes(target: str, mem_fraction: float | None = None) -> int:
  """What JAX lets one program use on one GPU of the target: HBM x the preallocated fraction
  (`mem_fraction`, else XLA_PYTHON_CLIENT_MEM_FRACTION, else JAX's 0.75)."""
  if mem_fraction is None:
    mem_fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
  if not 0 < mem_fraction <= 1:
    raise ValueError(f"GPU memory fraction {mem_fraction}: expected a value in (0, 1]")
  return int(GPUS[parse_target(target)[0]].hbm_bytes * mem_fraction)


def plugin_installed() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def check_environment():
  """Fails, naming what to install or set, where a compile-only GPU compile cannot run."""
  if not plugin_installed():
    raise RuntimeError("a GPU --target needs JAX's CUDA plugin: pip install -e .[gpu_plan] "
                       "(jax-cuda12-plugin, jax-cuda12-pjrt, nvidia-cuda-nvcc-cu12)")
  if os.environ.get("JAX_PLATFORMS", "") != "cpu":
    raise RuntimeError("a compile-only GPU --target needs JAX_PLATFORMS=cpu (else the CUDA "
                       "plugin looks for a GPU: 'topology not implemented for cuda')")
  if CUB_FLAG not in os.environ.get("XLA_FLAGS", ""):
    raise RuntimeError(f"a compile-only GPU --target needs XLA_FLAGS={CUB_FLAG} (else a large "
                       "argsort becomes a CUB call that loads CUDA libraries)")


def spec_text(name: str) -> str:
  with open(os.path.join(SPECS_DIR, GPUS[name].spec)) as f:
    return f.read()


def topology_devices(target: str):
  """The target's devices, compile-only (`jax.experimental.topologies`)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  check_environment()
  name, hosts, per_host = parse_target(target)
  return topologies.get_topology_desc(platform="cuda", target_config=spec_text(name),
                                      topology=f"1x{hosts}x{per_host}").devices


def kernel_context():
  """tokamax on a compile-only GPU: its `cross_compile` option skips the device checks that
  otherwise send every ragged_dot to its XLA fallback (a compile-only device reports no compute
  capability, and JAX's default device here is the CPU). Its Mosaic GPU kernel then still
  declines (it asks the default device for sm90) and the Pallas Triton kernel compiles; on a
  real H100 tokamax takes the Mosaic GPU kernel first."""
  from desmoe_jax.moe.block import import_tokamax  # pylint: disable=import-outside-toplevel
  return import_tokamax().config.cross_compile(True)


def compile_for(jitted, args, gpu_devices):
  """`jitted` (traced and lowered for CUDA from CPU-device shardings in `args`) compiled by the
  GPU compiler for `gpu_devices` (the CPU mesh's devices in order map to these). Returns the
  XLA executable: get_compiled_memory_stats(), hlo_modules() (its cost_analysis() answers
  UNIMPLEMENTED compile-only: scripts/hlo_check.module_cost counts from the HLO instead)."""
  from jax._src.interpreters import pxla  # pylint: disable=import-outside-toplevel
  from jax._src.lib import xla_client as xc  # pylint: disable=import-outside-toplevel
  with kernel_context():
    lowered = jitted.trace(*args).lower(lowering_platforms=("cuda",))
  comp = lowered._lowering  # pylint: disable=protected-access  # no public way to re-target
  a = comp.compile_args
  # What `Lowered.compile()` does up to XLA, with the GPU client and devices (its later checks
  # compare the executable's shardings with the CPU mesh's, which name other devices).
  to_inputs, to_outputs = pxla.get_prop_to_input_output(
      a["in_shardings"], a["out_shardings"], len(a["ordered_effects"]))
  # pylint: disable=protected-access
  return pxla._cached_compilation(
      comp.stablehlo(), comp._name, a["tuple_args"], to_inputs, to_outputs,
      tuple(a["host_callbacks"]), gpu_devices[0].client, xc.DeviceList(tuple(gpu_devices)),
      comp._compiler_options_kvs, None)
