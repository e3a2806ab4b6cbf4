"""Forward+backward time of one MoE layer with its routed experts split over an `expert` mesh
axis: the explicit all-to-all dispatch (`model.expert_parallel="shard_map"`) against letting
XLA partition the single-program dispatch ("compiler", with moe_impl dense and ragged), and
against the unsharded layer on one device.

Every candidate is `desmoe_jax.moe.block.MoEBlock` (router, routed and shared experts) with the same
weights and input (bench/moe_layer.py's `make_weights`, same seed); the timed step is loss =
sum(y**2) and the gradients w.r.t. the input and every parameter. Outputs and gradients are
checked against the unsharded layer before timing. Timing is moe_layer.py's round-robin (median
and min over rounds; it prints how busy other processes kept the machine).

On CPU the devices are simulated (`--cpu_devices`, default 8, via XLA_FLAGS): they share the
machine's cores, so the numbers measure the overheads of each scheme (exchange, padding,
collectives), not a speedup from more hardware.

  python bench/expert_parallel.py                         # cpu preset, 8 simulated devices
  python bench/expert_parallel.py --mesh=expert=4,fsdp=2
  python bench/expert_parallel.py --preset=v2_lite --dtype=bfloat16     # on GPUs: all devices

With one GPU the mesh has a single device: the explicit dispatch then exchanges nothing and the
run measures only its local kernel under shard_map.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

COMPILER_IMPLS = ("dense", "ragged", "tiled")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=("cpu", "v2_lite"), default="cpu",
                 help="layer shapes of bench/moe_layer.py (cpu: its 2048 tokens as 8 x 256)")
  p.add_argument("--batch", type=int, default=None, help="override the preset's batch")
  p.add_argument("--seq", type=int, default=None, help="override the preset's sequence length")
  p.add_argument("--mesh", default=None,
                 help="mesh axes, e.g. 'expert=4,fsdp=2' (default: every device on expert)")
  p.add_argument("--cpu_devices", type=int, default=8, help="simulated devices on CPU")
  p.add_argument("--compiler_impls", default="dense,ragged,tiled",
                 help=f"moe_impl values for the compiler-partitioned layer ({COMPILER_IMPLS})")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--budget_s", type=float, default=6.0)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.compiler_impls = [s for s in args.compiler_impls.split(",") if s]
  for s in args.compiler_impls:
    if s not in COMPILER_IMPLS:
      p.error(f"--compiler_impls: {s!r} not in {COMPILER_IMPLS}")
  return args


def main(argv=None):
  args = parse_args(argv)
  # Before JAX starts; only the host platform reads it.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.cpu_devices}")
  import jax
  import numpy as np

  import moe_layer
  from desmoe_jax import sharding
  from desmoe_jax.moe import expert_parallel

  sh = dict(moe_layer.PRESETS[args.preset])
  if args.preset == "cpu":  # moe_layer.py's 2048 tokens as 8 sequences: the batch is split
    sh.update(batch=8, seq=256)
  for name in ("batch", "seq"):
    if getattr(args, name) is not None:
      sh[name] = getattr(args, name)
  mesh_shape = ({"expert": -1} if args.mesh is None else
                {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
  mesh = sharding.make_mesh(mesh_shape)
  w = moe_layer.make_weights(sh, args.seed)
  print(f"MoE layer fwd+bwd: preset={args.preset} tokens={sh['batch']}x{sh['seq']} "
        f"d={sh['hidden']} inter={sh['inter']} experts={sh['experts']} top-{sh['top_k']} "
        f"shared={sh['shared']} dtype={args.dtype}")
  print(f"machine: {moe_layer.describe_machine()}; mesh {dict(mesh.shape)} over "
        f"{mesh.size} {jax.devices()[0].platform} devices")
  if jax.default_backend() == "cpu":
    print("CPU: the devices are simulated on the same cores; ratios measure overheads, "
          "not speedups")

  def build(impl, parallel, on_mesh):
    """Compiled (ahead of time) step and forward, and their arguments: on the mesh, or on
    device 0 alone (compiled outside the mesh context, in which it would run replicated on
    every device)."""
    step, forward, params, x, _ = moe_layer.build_jax(sh, w, impl, args.dtype, None,
                                                      expert_parallel=parallel)
    if not on_mesh:
      params, x = jax.device_put((params, x), jax.devices()[0])
      return step.lower(params, x).compile(), forward.lower(params, x).compile(), params, x
    params = jax.device_put(params, sharding.state_shardings(params, mesh))
    x = jax.device_put(x, sharding.batch_sharding(mesh, ndim=3))
    with jax.set_mesh(mesh):  # model.expert_parallel="shard_map" reads the mesh from here
      return step.lower(params, x).compile(), forward.lower(params, x).compile(), params, x

  exchange = expert_parallel.resolve_exchange("auto")
  candidates = {"unsharded (1 device, moe_impl=auto)": ("auto", "compiler", False)}
  for impl in args.compiler_impls:
    candidates[f"compiler[{impl}]"] = (impl, "compiler", True)
  candidates[f"shard_map[{exchange} exchange, auto]"] = ("auto", "shard_map", True)

  tol, norm = (1e-4, "max") if args.dtype == "float32" else (5e-2, "l2")
  steps, ref, ok = {}, None, True
  for name, (impl, parallel, on_mesh) in candidates.items():
    step, forward, params, x = build(impl, parallel, on_mesh)
    _, (dparams, dx) = step(params, x)
    got = (np.asarray(forward(params, x), np.float32), moe_layer.jax_grads_flat(dparams, dx))
    if ref is None:
      ref = got
    else:
      ok &= moe_layer.check(name, *got, *ref, tol, norm)
    steps[name] = moe_layer.jax_call(step, params, x)
  if not ok:
    print("ERROR: the candidates disagree with the unsharded layer; not timing")
    return 1
  times = moe_layer.time_round_robin(steps, args.reps, args.warmup, 3, args.budget_s)
  med = {n: statistics.median(t) for n, t in times.items()}
  base = next(iter(candidates))
  ep = next(n for n in candidates if n.startswith("shard_map"))
  print(f"\n{'candidate':<40}{'reps':>5}{'median ms':>11}{'min ms':>9}"
        f"{'unsharded/this':>16}{'shard_map/this':>16}")
  for n in sorted(med, key=med.get):
    print(f"{n:<40}{len(times[n]):>5}{1e3 * med[n]:11.1f}{1e3 * min(times[n]):9.1f}"
          f"{med[base] / med[n]:15.2f}x{med[ep] / med[n]:15.2f}x")
  for impl in args.compiler_impls:
    print(f"shard_map_vs_compiler[{impl}]: {med[f'compiler[{impl}]'] / med[ep]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
