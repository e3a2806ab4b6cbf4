r"""Memory plan: bytes per device of the real train step, compiled ahead of time, no weights.

For a trainer config (configs/six_domains.py, any method), an architecture (configs/models.py
name of any family: DeepSeek-V2/V3 incl. Moonlight, Qwen3-MoE, OLMoE, Mixtral; or
config.model.path's config.json) and device meshes, the model is built abstractly
(`nnx.eval_shape` of init + `methods.prepare_model`), laid out by `sharding.py`'s rules, and
`train_step.jit_train_step` (what the trainer runs) is compiled once per phase of each method.
Every argument is a `jax.ShapeDtypeStruct`: nothing is allocated, and a 16B model plans on a
laptop.

  python scripts/memory_plan.py --arch=v2_lite --methods=desmoe,fft \
      --meshes='fsdp=8;fsdp=4,expert=2' --batch=8,32 --seq=4096
  python scripts/memory_plan.py --target=v5e:2x4 --meshes='fsdp=8' --batch=8   # TPU compiler
  python scripts/memory_plan.py --methods=desmoe --target=v4:2x2x4 --meshes=fsdp=16 \
      --batch=32 --phases=stabilization,consolidation                           # some phases
  python scripts/memory_plan.py --config=configs/six_domains.py:tiny --arch=tiny --batch=8
  python scripts/memory_plan.py --config=configs/six_domains.py:v5e8 --methods=desmoe \
      --target=v5e:2x4 --seq=4096 --quick    # a machine preset's mesh and batch; fit verdict only

--target=cpu (default) compiles for simulated CPU devices (as many as the largest mesh).
--target=<TPU topology> (v5e:2x4 = v5e-8, v4:2x2x4 = v4-32, v5e:4x8 = v5e-32) compiles with the
real TPU compiler on this CPU machine (compile-only; needs `pip install libtpu`, the version
`jax[tpu]` pins); a step that does not fit then fails to compile, and is reported as such.
--target=<GPU>:<count> (h100:8 = 8 x H100 SXM 80 GB, h200:1 = one H200 141 GB; h100:2x8 = 2 hosts
x 8) compiles with XLA's real GPU compiler, compile-only (`pip install -e .[gpu_plan]`, run with
JAX_PLATFORMS=cpu XLA_FLAGS=--xla_gpu_deviceless_cub_mode=DEVICELESS_CUB_DISABLED; the GPU target
specs are desmoe_jax/gpu_specs/, desmoe_jax/gpu_target.py says how host memory is planned). The
GPU compiler does not refuse an oversized program: `fits` compares the peak with what JAX lets a
program use, the HBM times XLA_PYTHON_CLIENT_MEM_FRACTION (--mem_fraction; JAX's default 0.75).
Each GPU row also gives the compiled program's dot FLOPs (counted from its HLO, loops by their
trip counts) and a step-time estimate against the datasheet peaks (scripts/hlo_check.py).

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_gpu_deviceless_cub_mode=DEVICELESS_CUB_DISABLED \
  python scripts/memory_plan.py --config=configs/six_domains.py:8xh100 --arch=v2_lite \
      --methods=desmoe,fft,esft_token --target=h100:8 --seq=4096

Per row, bytes per device. Exact, from the shardings (sum of shard sizes):
  params    the model's parameters; opt: the optimizer state (groups never trained hold none)
From XLA's `memory_analysis()` of the compiled step:
  argument  every input buffer: parameters, model state, optimizer state, batch, step
  output    every output buffer: new model state and optimizer state, metrics
  alias     outputs written in place of a donated input (model and optimizer state)
  temp      everything else live at some point of the step: activations kept for the backward,
            gradients, optimizer temporaries, logits and their cross-entropy, gathered weights
  peak      argument + output - alias + temp: what must fit at once
`argument` equals the exact sum with XLA:CPU, to the byte (printed on each row; the TPU
compiler's is slightly larger: padded layouts, under 1 MB for V2-Lite). `temp` is the
compiler's: XLA:CPU upcasts bf16 arithmetic to f32 and fuses less, so its temp is larger
than the TPU compiler's for the same program. XLA_FLAGS=--xla_dump_to=DIR adds, per compiled
step, *memory-usage-report.txt: the largest buffers by shape.
Every config field can be overridden as in train.py (`--config.model.remat=dots`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import hlo_check  # noqa: E402  (scripts/hlo_check.py: reading compiled HLO)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from desmoe_jax import build  # noqa: E402
from desmoe_jax import data as data_lib  # noqa: E402
from desmoe_jax import gpu_target  # noqa: E402
from desmoe_jax import sharding as sharding_lib  # noqa: E402
from desmoe_jax import train_step as ts  # noqa: E402
from desmoe_jax.config import ModelConfig  # noqa: E402
from desmoe_jax.moe.block import resolve_impl  # noqa: E402
from desmoe_jax.model import init_model  # noqa: E402
from desmoe_jax.optim import label_of  # noqa: E402
from desmoe_jax.run_config import load_config  # noqa: E402
from desmoe_jax.schedule import BASE_LABELS, LABELS, PHASE_NAMES  # noqa: E402
from desmoe_jax.train_config import check_microbatch_split, step_config  # noqa: E402
from desmoe_jax.train_state import TrainState, build_train_state  # noqa: E402

GIB = 2**30
CPU_DEVICES = 8  # simulated devices for a config mesh with a -1 axis on --target=cpu
HBM_GIB = {"v5e": 15.75, "v5litepod": 15.75, "v4": 30.75, "v5p": 95, "v6e": 32}  # per chip; v5e, v4:
# what the TPU compiler calls "available HBM" in a refusal (15.75 of 16, 30.75 of 32 GiB)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "six_domains.py"),
    "Trainer config, e.g. configs/six_domains.py (the paper's setting) or ...py:tiny")
_ARCH = flags.DEFINE_string(
    "arch", "v2_lite", "configs/models.py architecture (tiny, v2_lite, v2, moonlight_16b_a3b, "
    "qwen3_30b_a3b, olmoe_1b_7b, mixtral_8x7b: any family of desmoe_jax/families/), or '' to "
    "read config.model.path/config.json")
_METHODS = flags.DEFINE_list("methods", ["desmoe", "fft"], "methods to plan (config.method)")
_MESHES = flags.DEFINE_string(
    "meshes", "", "';'-separated meshes, each ','-separated axis=size over data, fsdp, "
    "expert, tensor (e.g. 'fsdp=8;fsdp=4,expert=2'); default: the config's mesh (its -1 axis "
    "takes the target's devices; 8 simulated devices for cpu)")
_BATCH = flags.DEFINE_list("batch", [], "global batch sizes in sequences (default "
                           "config.data.batch_size)")
_SEQ = flags.DEFINE_integer("seq", 0, "sequence length (default config.data.seq_len)")
_TARGET = flags.DEFINE_string("target", "cpu", "cpu (simulated devices), a TPU topology, "
                              "e.g. v5e:2x4, v4:2x2x4 (needs libtpu), or GPUs, e.g. h100:8, "
                              "h200:1 (needs .[gpu_plan])")
_PHASES = flags.DEFINE_list(
    "phases", [], "phases to compile, by name (warmup, stabilization, consolidation; FFT/ESFT's "
    "single phase is 'all'); default every phase. A TPU compile of V2-Lite takes minutes: "
    "compile the largest phase first")
_LAYERS = flags.DEFINE_integer(
    "layers", 0, "override the architecture's num_hidden_layers (0: keep it). A quick look at "
    "a deep model: state and compile time grow with the MoE layers, temp barely does")
_QUICK = flags.DEFINE_bool(
    "quick", False, "TPU targets: stop each phase's compile at buffer assignment, where the "
    "compiler decides whether the step fits, and read temp from its memory-usage report (about "
    "a minute per phase, against minutes to tens of minutes for the full compile's code "
    "generation). temp is then the report's total, which differed from the full compile's "
    "memory_analysis by up to 0.9 GiB on V2-Lite and 1.8 GiB (under) on Qwen3-30B-A3B: a "
    "row near the HBM needs the full compile (docs/SCALING.md, Compile time)")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "memory per device in GiB for the 'fits' column "
                          "(default: the TPU chip's; a GPU's usable memory, see --mem_fraction; "
                          "16 for cpu)")
_MEM_FRACTION = flags.DEFINE_float(
    "mem_fraction", 0.0, "GPU targets: the fraction of HBM JAX lets the program use "
    "(XLA_PYTHON_CLIENT_MEM_FRACTION of the run; default: that variable here, else JAX's 0.75)")


# ------------------------------------------------------------------ inputs


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=4,expert=2' -> {'fsdp': 4, 'expert': 2}."""
  shape = {}
  for part in text.split(","):
    axis, _, size = part.partition("=")
    if axis.strip() not in sharding_lib.MESH_AXES or not size.strip().isdigit():
      raise ValueError(f"--meshes: {part!r} in {text!r} is not axis=size with axis one of "
                       f"{sharding_lib.MESH_AXES}")
    shape[axis.strip()] = int(size)
  return shape


def config_mesh(config, target: str) -> dict[str, int]:
  """config.mesh as a mesh shape, its -1 axis resolved to the target's devices (8 on cpu)."""
  shape = {a: int(config.mesh[a]) for a in sharding_lib.MESH_AXES}
  if list(shape.values()).count(-1) > 1:
    raise ValueError(f"config.mesh {shape}: at most one axis may be -1")
  if -1 in shape.values():
    total = (CPU_DEVICES if target == "cpu" else gpu_target.device_count(target)
             if gpu_target.is_gpu_target(target) else len(_topology(target)))
    known = math.prod(v for v in shape.values() if v != -1)
    shape = {a: (total // known if v == -1 else v) for a, v in shape.items()}
  return {a: v for a, v in shape.items() if v != 1} or {"fsdp": 1}


def _topology(target: str):
  from jax.experimental import topologies
  megacore = target.split(":")[0] in ("v4", "v5p")  # one JAX device per chip, as JAX runs them
  return topologies.get_topology_desc(
      platform="tpu", topology_name=target,
      chip_config_name="megacore" if megacore else "default").devices


def target_devices(target: str, count: int):
  """`count` devices of the target: simulated CPU devices, or a TPU topology's (compile-only).
  A GPU target's mesh is traced on CPU devices (gpu_target.py: memory kinds) and compiled for
  `gpu_target.topology_devices(target)`."""
  if target == "cpu" or gpu_target.is_gpu_target(target):
    if jax.device_count() < count:
      raise ValueError(f"a {count}-device mesh on {jax.device_count()} CPU devices: run this "
                       "script directly (it sets the device count) or set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    if gpu_target.is_gpu_target(target) and gpu_target.device_count(target) != count:
      raise ValueError(f"--target={target} has {gpu_target.device_count(target)} GPUs; every "
                       f"mesh must use all of them, this one uses {count}")
    return jax.devices()[:count]
  devices = _topology(target)
  if len(devices) != count:
    raise ValueError(f"--target={target} has {len(devices)} devices; every mesh must use all "
                     f"of them, this one uses {count}")
  return devices


def model_config(config, arch: str = "", target: str = "cpu", layers: int = 0) -> ModelConfig:
  """Architecture from configs/models.py (`arch`) or config.model.path's config.json, with the
  trainer config's runtime fields (config.model.* other than path); `layers` > 0 replaces
  num_hidden_layers."""
  runtime = build.runtime_fields(config)
  if target != "cpu" and runtime.get("moe_impl") == "auto":  # what "auto" picks on the target
    gpu = gpu_target.is_gpu_target(target)                    # (the host here is cpu)
    runtime["moe_impl"] = resolve_impl("auto", "gpu" if gpu else "tpu", sharded=(
        runtime.get("expert_parallel") == "shard_map"
        or (gpu and gpu_target.device_count(target) > 1)))
  if not arch:
    if not config.model.path:
      raise ValueError("--arch='' needs --config.model.path (an HF directory with config.json)")
    cfg = ModelConfig.from_pretrained(config.model.path, **runtime)
  else:
    arch_config = load_config(os.path.join(REPO, "configs", f"models.py:{arch}"))
    cfg = ModelConfig.from_hf_dict(arch_config.to_dict(), source=f"--arch={arch}", **runtime)
  if layers < 0:
    raise ValueError(f"--layers={layers}: expected 0 (the architecture's) or a layer count")
  return cfg.replace(num_hidden_layers=layers) if layers else cfg


# ------------------------------------------------------------------ abstract state, exact bytes


def abstract_train_state(config, model_cfg: ModelConfig, mesh) -> TrainState:
  """The abstract (ShapeDtypeStruct, sharded) arguments of one method's train step."""
  return build_train_state(config, lambda: init_model(model_cfg, config.seed), mesh,
                           abstract=True)


def _shard_bytes(x) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (sum of shard sizes)."""
  return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def param_bytes_by_group(state) -> dict[str, int]:
  out = dict.fromkeys(BASE_LABELS, 0)   # LoRA's groups where the model has them
  for path, var in nnx.to_flat_state(nnx.filter_state(state, nnx.Param)):
    out[label_of(var)] = out.get(label_of(var), 0) + _shard_bytes(var.get_value())
  return out


def opt_bytes_by_group(opt_state) -> dict[str, int]:
  """Optimizer-state bytes per device of each parameter group (optax.multi_transform's inner
  state of that label); 0 for a group never trained in the run (set_to_zero holds nothing)."""
  out = dict.fromkeys(BASE_LABELS, 0)   # LoRA's groups where the state has them
  for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    if "inner_states" in names:
      label = names[names.index("inner_states") + 1]
      out[label] = out.get(label, 0) + _shard_bytes(x)
  return out


# ------------------------------------------------------------------ the plan


@dataclasses.dataclass
class PhasePlan:
  mesh: dict
  method: str
  phase: str
  batch: int                # global sequences per step
  seq: int
  seqs_per_device: float
  params: int               # bytes per device, exact from the shardings
  model_state: int          # non-parameter model state (correlation, masks, router teacher)
  opt_state: int
  params_by_group: dict
  opt_by_group: dict
  batch_bytes: int          # the batch, the step counter and the learning rate
  argument: int             # XLA memory_analysis of the compiled step, per device
  output: int
  alias: int
  temp: int
  compile_s: float          # wall seconds of lowering + compiling this phase
  compile_cpu_s: float = 0.0  # CPU seconds of this process meanwhile (all its threads): the
                              # machine-independent part when other jobs share the cores
  host: int = 0             # XLA: input buffers in host memory (optim.host_offload), per device
  quick: bool = False       # --quick: temp from the memory report at buffer assignment; the
                            # device arguments are the exact shard sizes, output = alias = 0
  error: str = ""           # the TPU compiler refused (does not fit): argument = exact, temp
                            # from its message
  dot_flops: float = 0.0    # GPU targets: per device, counted from the compiled HLO's dots
  dense_expert_dots: int = 0  # GPU targets: matmuls over every expert x every token row
  loop_dot_flops: float = 0.0  # of dot_flops: one trip of loops of data-dependent trip count
                               # (the tiled dispatch's tile loops)
  routed_flops: float = 0.0    # the routed experts' ideal matmul FLOPs per device and step
  collective_bytes: float = 0.0  # GPU targets: per device, result bytes of its collectives

  @property
  def peak(self) -> int:
    return self.argument + self.output - self.alias + self.temp


def phase_name(phase: int) -> str:
  return PHASE_NAMES[phase] if phase >= 0 else "all"


def plan(config, model_cfg: ModelConfig, mesh, batch: int, seq: int, phases=None,
         quick=None, gpu_devices=None):
  """Compiles `config.method`'s train step on `mesh` for each phase (or those in `phases`, by
  index or name); returns a PhasePlan per phase. `quick(phase_name)` -> temp bytes replaces
  the compile by one stopped at buffer assignment (`--quick`). `gpu_devices`: compile with the
  GPU compiler for these (compile-only) devices, `mesh` being their CPU twin (gpu_target.py)."""
  ts_ = abstract_train_state(config, model_cfg, mesh)
  batch_sh = sharding_lib.batch_sharding(mesh, 2)
  splits = math.prod(mesh.shape[a] for a in _axes(batch_sh.spec[0]))
  if batch % splits:
    raise ValueError(f"--batch={batch} sequences cannot be split over the {splits} "
                     f"data-parallel devices of mesh {dict(mesh.shape)}")
  step_cfg = step_config(config)
  check_microbatch_split(step_cfg, batch, batch_sh)
  abs_batch = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sh)
               for k in data_lib.BATCH_KEYS}
  abs_step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  abs_lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  params, rest = nnx.split_state(ts_.state, nnx.Param, ...)
  exact = dict(params=shard_bytes(params), model_state=shard_bytes(rest),
               opt_state=shard_bytes(ts_.opt_state),
               params_by_group=param_bytes_by_group(ts_.state),
               opt_by_group=opt_bytes_by_group(ts_.opt_state),
               batch_bytes=shard_bytes((abs_batch, abs_step, abs_lr)))
  exact_args = sum(exact[k] for k in ("params", "model_state", "opt_state", "batch_bytes"))
  out = []
  for phase, _, _ in ts_.method_cfg.phases():
    if phases and phase not in phases and phase_name(phase) not in phases:
      continue
    t0, c0 = time.perf_counter(), time.process_time()
    step = ts.jit_train_step(ts_.graphdef, ts_.method_cfg, ts_.optim_cfg, phase,
                             ts_.state_shardings, ts_.opt_shardings, batch_sh, step_cfg)
    error, sizes, sizes_gpu = "", dict(argument=0, output=0, alias=0, temp=0), {}
    device_args = exact_args - (exact["opt_state"] if ts_.optim_cfg.host_offload else 0)
    if quick is not None:
      temp, cpu = quick(phase_name(phase))
      out.append(PhasePlan(
          mesh={k: v for k, v in mesh.shape.items() if v > 1} or {"fsdp": 1},
          method=config.method, phase=phase_name(phase), batch=batch, seq=seq,
          seqs_per_device=batch / splits, **exact, argument=device_args, output=0, alias=0,
          temp=temp, compile_s=time.perf_counter() - t0, compile_cpu_s=cpu,
          host=exact_args - device_args, quick=True))
      continue
    try:
      args = (ts_.state, ts_.opt_state, abs_batch, abs_step, abs_lr)
      with jax.set_mesh(mesh):
        if gpu_devices is None:
          mem = step.lower(*args).compile().memory_analysis()
        else:  # the GPU compiler; the mesh is the CPU twin (gpu_target.py)
          executable = gpu_target.compile_for(step, args, gpu_devices)
          mem = executable.get_compiled_memory_stats()
          text = executable.hlo_modules()[0].to_string()
          cost = hlo_check.module_cost(text)
          sizes_gpu = dict(dot_flops=cost.dot_flops, collective_bytes=cost.collective_bytes,
                           loop_dot_flops=cost.unknown_loop_dot_flops,
                           routed_flops=routed_step_flops(model_cfg, batch * seq / splits),
                           dense_expert_dots=dense_expert_dots(text, model_cfg, batch * seq //
                                                               (splits * step_cfg.microbatches)))
      sizes = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
                   alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
                   host=mem.host_argument_size_in_bytes, **sizes_gpu)
    except Exception as e:  # the TPU compiler refuses a program that does not fit in HBM
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      error, temp = _oom_summary(str(e))
      sizes = dict(argument=device_args, output=0, alias=0, temp=temp)
    out.append(PhasePlan(
        mesh={k: v for k, v in mesh.shape.items() if v > 1} or {"fsdp": 1},
        method=config.method, phase=phase_name(phase), batch=batch,
        seq=seq, seqs_per_device=batch / splits, **exact, **sizes,
        compile_s=time.perf_counter() - t0, compile_cpu_s=time.process_time() - c0,
        error=error))
  return out


def routed_step_flops(model_cfg: ModelConfig, tokens: float) -> float:
  """Ideal FLOPs of the routed experts' matmuls for `tokens` (a device's share of a step):
  top_k x 3 matmuls of 2 d F per token and MoE layer, forward + backward (x3), + the forward
  again under model.remat="full"."""
  passes = 3 + (model_cfg.runtime.remat == "full")
  layers = model_cfg.num_hidden_layers - model_cfg.first_k_dense_replace
  return (tokens * model_cfg.num_experts_per_tok * 3 * 2 * model_cfg.hidden_size
          * model_cfg.moe_intermediate_size * layers * passes)


def dense_expert_dots(hlo_text: str, model_cfg: ModelConfig, tokens: int) -> int:
  """Matmuls of the compiled step that run every (token, k) slot of a device's microbatch
  against every routed expert (scripts/hlo_check.py's dense-fallback test with T*K rows): XLA's
  expansion of ragged_dot. T*K rather than T keeps attention's [heads, tokens, head_dim] out
  where the head count equals the expert count (the tiny model's 8 and 8)."""
  return len(hlo_check.dense_fallback_shapes(
      hlo_check.matmul_shapes(hlo_text), model_cfg.n_routed_experts,
      tokens * model_cfg.num_experts_per_tok,
      (model_cfg.hidden_size, model_cfg.moe_intermediate_size)))


def quick_runner(argv, method: str, batch: int, mesh_text: str):
  """`quick(phase)` for `plan`: compiles the phase in a child process (this script, full
  compile) with XLA's dumps on, waits for the TPU compiler's memory-usage report (written at
  buffer assignment, whether or not the program then fits) and stops the child there.
  Returns (temp bytes: the report's total, CPU seconds of the child). The code generation that follows buffer
  assignment is what makes a fitting TPU compile of V2-Lite take minutes."""
  import resource
  import signal
  import subprocess
  import tempfile
  keep = [a for a in argv[1:] if not a.startswith(("--methods=", "--phases=", "--batch=",
                                                   "--meshes=", "--quick"))]

  def run(phase: str):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as dump:
      env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                        f" --xla_dump_to={dump}").strip())
      child = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), *keep, f"--methods={method}",
           f"--phases={phase}", f"--batch={batch}", f"--meshes={mesh_text}"],
          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
          start_new_session=True)
      report = None
      while report is None:
        found = [f for f in os.listdir(dump) if f.endswith("memory-usage-report.txt")]
        if found:
          time.sleep(2)  # the file is written in one go; let it finish
          report = open(os.path.join(dump, found[0])).read()
        elif child.poll() is not None:
          raise RuntimeError(f"--quick: the compile of {method}/{phase} ended without a memory "
                             f"report:\n{child.stderr.read()[-2000:]}")
        else:
          time.sleep(1)
      if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
      child.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    m = re.search(r"Total bytes: (\d+)", report)
    if not m:
      raise RuntimeError(f"--quick: no 'Total bytes' in the memory report of {method}/{phase}")
    return int(m.group(1)), cpu

  return run


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _oom_summary(message: str) -> tuple[str, int]:
  """(short message, temp bytes) of the TPU compiler's out-of-memory error."""
  m = re.search(r"HLO temporaries \(([\d.]+)([KMG])\) exceeds available HBM \(([\d.]+)G\)",
                message)
  if not m:
    return message.strip().splitlines()[0][:200], 0
  temp = int(float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
  return f"temp alone exceeds the {m.group(3)} GiB of HBM", temp


# ------------------------------------------------------------------ report

COLUMNS = ("mesh", "method", "phase", "batch", "seqs/device", "params", "opt state",
           "opt groups", "argument", "temp", "peak", "fits", "compile s", "compile cpu s")
SHORT = {"backbone": "bb", "shared_experts": "shared", "router": "router",
         "routed_experts": "experts"}
SHORT.update({"lora_" + k: "lora_" + v for k, v in SHORT.items()})   # LoRA's factor groups


def _gib(n: int) -> str:
  return f"{n / GIB:.2f}"


def row(p: PhasePlan, hbm_gib: float) -> list[str]:
  # A group the architecture lacks (Qwen3-MoE, OLMoE, Mixtral: no shared experts) holds only
  # its step count: not listed.
  groups = "+".join(SHORT.get(g, g) for g in LABELS
                    if p.opt_by_group.get(g) and p.params_by_group.get(g)) or "none"
  head = [",".join(f"{k}={v}" for k, v in p.mesh.items()), p.method, p.phase,
          f"{p.batch}x{p.seq}", f"{p.seqs_per_device:g}", _gib(p.params), _gib(p.opt_state),
          groups]
  fits = "NO (compiler)" if p.error else "yes" if p.peak <= hbm_gib * GIB else "NO"
  if p.quick:
    fits += " (report)"
  return head + [_gib(p.argument), _gib(p.temp), _gib(p.peak), fits, f"{p.compile_s:.0f}",
                 f"{p.compile_cpu_s:.0f}"]


def markdown(plans, hbm_gib: float) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(row(p, hbm_gib)) + " |" for p in plans]
  return "\n".join(lines)


def step_estimates(plans, target: str) -> str:
  """Step time per phase, an estimate: the compiled program's dot FLOPs per GPU (counted from
  its HLO, loops by their trip counts) against the datasheet bf16 peak, and its collectives'
  bytes against NVLink (one direction), not overlapped; nothing else of the step is counted.
  A loop of data-dependent trip count (the tiled dispatch's tiles) is counted once by the HLO:
  its dots are replaced by the routed experts' ideal FLOPs (`routed_step_flops`)."""
  g = gpu_target.GPUS[gpu_target.parse_target(target)[0]]
  lines = ["| method | phase | HLO dot TFLOP per GPU | of which tile loops (once) | routed "
           "experts, ideal | step TFLOP per GPU | at peak s | at 50% of peak s | collectives "
           "GB per GPU | at NVLink peak s |", "|" + "---|" * 10]
  for p in plans:
    loops = p.loop_dot_flops > 0
    flops = p.dot_flops - p.loop_dot_flops + (p.routed_flops if loops else 0)
    comm_s = p.collective_bytes / g.nvlink_bytes_per_s
    lines.append(f"| {p.method} | {p.phase} | {p.dot_flops / 1e12:.0f} | "
                 f"{p.loop_dot_flops / 1e12:.1f} | "
                 f"{p.routed_flops / 1e12:.0f}{'' if loops else ' (in the HLO)'} | "
                 f"{flops / 1e12:.0f} | {flops / g.bf16_flops:.2f} | "
                 f"{2 * flops / g.bf16_flops:.2f} | {p.collective_bytes / 1e9:.1f} | "
                 f"{comm_s:.2f} |")
  return "\n".join(lines)


def check(p: PhasePlan) -> str:
  """XLA's sizes against the exact shard sizes."""
  exact = p.params + p.model_state + p.opt_state + p.batch_bytes
  if p.error:
    return f"shard sizes {exact} B; the compiler refused: {p.error} (temp {p.temp} B)"
  if p.quick:
    return (f"--quick: device arguments {p.argument} B (shard sizes; {p.host} B on the host), "
            f"temp {p.temp} B from the memory-usage report at buffer assignment")
  on_host = ""
  if p.host and p.argument < exact:  # the host-offloaded optimizer state is not an argument
    exact, on_host = exact - p.host, "device "
  return (f"argument {p.argument} B = {on_host}shard sizes {exact} B + {p.argument - exact} "
          f"(params {p.params}, model state {p.model_state}, optimizer {p.opt_state}, batch+step "
          f"{p.batch_bytes}); output {p.output} B, alias {p.alias} B, temp {p.temp} B, "
          f"host arguments {p.host} B" + (f" (= optimizer {p.opt_state} B)" if on_host else "")
          + (f"; dot FLOPs {p.dot_flops:.4g}, collective bytes {p.collective_bytes:.4g}, "
             f"dense all-expert dots {p.dense_expert_dots}" if p.dot_flops else ""))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  meshes = ([parse_mesh(m) for m in _MESHES.value.split(";") if m.strip()]
            or [config_mesh(config, _TARGET.value)])
  batches = [int(b) for b in _BATCH.value] or [config.data.batch_size]
  seq = _SEQ.value or config.data.seq_len
  target = _TARGET.value
  gpu = gpu_target.is_gpu_target(target)
  gpu_devices = gpu_target.topology_devices(target) if gpu else None
  hbm = _HBM.value or (gpu_target.usable_bytes(target, _MEM_FRACTION.value or None) / GIB if gpu
                       else HBM_GIB.get(target.split(":")[0], 16.0))
  phases = set(_PHASES.value)
  if phases - {*PHASE_NAMES, "all"}:
    raise app.UsageError(f"--phases: {sorted(phases - {*PHASE_NAMES, 'all'})} are not phases "
                         f"(one of {(*PHASE_NAMES, 'all')})")
  model_cfg = model_config(config, _ARCH.value, target, _LAYERS.value)
  rt = model_cfg.runtime
  print(f"# {_ARCH.value or config.model.path} on {target}: dtype {rt.dtype}, params "
        f"{rt.param_dtype}, remat {rt.remat}, scan {rt.scan_layers}, "
        f"moe_impl {rt.moe_impl}; GiB per device, fits: peak <= {hbm:g} GiB"
        + (f" ({hbm * GIB / gpu_target.GPUS[target.split(':')[0]].hbm_bytes:g} of "
           f"{gpu_target.GPUS[target.split(':')[0]].hbm_bytes / GIB:.2f} GiB HBM)" if gpu else ""),
        flush=True)
  plans = []
  for shape in meshes:
    mesh = sharding_lib.make_mesh(shape, target_devices(target, math.prod(shape.values())))
    for method in _METHODS.value:
      with config.unlocked():
        config.method = method
      for batch in batches:
        quick = None
        if _QUICK.value:
          if target == "cpu":
            raise app.UsageError("--quick needs a TPU --target (the TPU compiler's report)")
          quick = quick_runner(sys.argv, method, batch,
                               ",".join(f"{k}={v}" for k, v in shape.items()))
        method_plans = plan(config, model_cfg, mesh, batch, seq, phases, quick, gpu_devices)
        if not method_plans:
          print(f"# {method}: none of its phases is in --phases={','.join(sorted(phases))}",
                flush=True)
        for p in method_plans:
          plans.append(p)
          print(" | ".join(row(p, hbm)), flush=True)
          print("   ", check(p), flush=True)
  print()
  print(markdown(plans, hbm))
  if gpu:
    print()
    print(step_estimates(plans, target))


def _setup_devices(argv):
  """Before JAX starts a backend: simulated CPU devices for the largest mesh (target cpu)."""
  value = lambda name, default: next(
      (a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), default)
  jax.config.update("jax_platforms", "cpu")
  target = value("target", _TARGET.default)
  if gpu_target.is_gpu_target(target):  # the CPU twin of the GPU mesh (gpu_target.py)
    jax.config.update("jax_num_cpu_devices", gpu_target.device_count(target))
  elif target == "cpu":
    meshes = value("meshes", _MESHES.default) or f"fsdp={CPU_DEVICES}"
    n = max(math.prod(parse_mesh(m).values()) for m in meshes.split(";") if m.strip())
    jax.config.update("jax_num_cpu_devices", n)


if __name__ == "__main__":
  _setup_devices(sys.argv)
  app.run(main)
