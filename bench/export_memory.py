"""Per-device memory of the export's programs at DeepSeek-V2-Lite widths, compiled ahead of
time on simulated CPU devices (XLA:CPU `memory_analysis()`; nothing allocated), against the
held-out evaluation's forward and the fold program the export used before it ran on the mesh
(a forward returning every MoE layer's router inputs [L, T, D]).

  python bench/export_memory.py --mesh=fsdp=8 --batch=8 --seq=4096
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mesh", default="fsdp=8")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--arch", default="v2_lite")
  ap.add_argument("--programs", default="eval,old,fold,check", help="which of the four")
  args = ap.parse_args()
  import jax
  shape = {k: int(v) for k, v in (p.split("=") for p in args.mesh.split(","))}
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", math.prod(shape.values()))
  import jax.numpy as jnp
  from flax import nnx

  from desmoe_jax import export, sharding
  from desmoe_jax.methods import prepare_model
  from desmoe_jax.model import init_model
  from desmoe_jax.run_config import load_config
  from desmoe_jax.trainer import method_config
  from scripts.memory_plan import model_config, with_shardings

  config = load_config(os.path.join(REPO, "configs", "six_domains.py"))
  cfg = model_config(config, args.arch)
  mesh = sharding.make_mesh(shape)
  model = nnx.eval_shape(lambda: prepare_model(init_model(cfg, 0), method_config(config), 0))
  graphdef, state = nnx.split(model)
  state = with_shardings(state, sharding.state_shardings(state, mesh))
  bsh = sharding.batch_sharding(mesh)
  x = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32, sharding=bsh)
       for k in ("tokens", "segment_ids", "positions")}
  x.update(mask=jax.ShapeDtypeStruct((args.batch, args.seq), jnp.float32, sharding=bsh),
           loss_w=jax.ShapeDtypeStruct((args.batch, args.seq - 1), jnp.float32, sharding=bsh))

  def old_fold(st, b):  # what export.py compiled before: every layer's router inputs returned
    out = export._forward(graphdef, st, b, "inputs")
    return out.routing.inputs, out.routing.logits

  def eval_loss(st, b):  # the trainer's held-out loss
    out = export._forward(graphdef, st, b, False)
    return jnp.sum(jax.nn.log_softmax(out.logits.astype(jnp.float32))[..., 0])

  programs = {
      "eval": ("held-out loss (trainer)", eval_loss),
      "old": ("old fold: [L, T, D] router inputs out", old_fold),
      "fold": ("fold statistics (export.py)",
               lambda st, b: export._fold_statistics(graphdef, st, b)),
      "check": ("check: top-k ids + loss (export.py)",
                lambda st, b: export._topk_and_loss(graphdef, st, b)),
  }
  programs = dict(programs[p] for p in args.programs.split(",") if p)
  # The writer (convert._hf_tensors) gathers one layer of a stacked leaf, or a whole unstacked
  # one, at a time: the largest such block bounds its host memory (and the gather's per device).
  from desmoe_jax.convert import leaf_specs
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  blocks = {spec.name: math.prod(flat[spec.path].shape[1 if spec.stack else 0:])
            * flat[spec.path].dtype.itemsize for spec in leaf_specs(model)}
  top = sorted(blocks, key=blocks.get, reverse=True)[:3]
  print("writer: largest gathered blocks " + ", ".join(f"{blocks[n] / 2**20:.0f} MiB ({n})"
                                                       for n in top)
        + f"; whole model {sum(math.prod(v.shape) * v.dtype.itemsize for v in flat.values()) / 2**30:.2f} GiB")
  gib = lambda n: f"{n / 2**30:.2f}"
  print(f"{args.arch}, mesh {shape}, batch {args.batch} x {args.seq}; GiB per device")
  print("| program | argument | output | temp | argument + output + temp | compile s |")
  print("|---|---|---|---|---|---|")
  for name, fn in programs.items():
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      mem = jax.jit(fn).lower(state, x).compile().memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    print(f"| {name} | {gib(mem.argument_size_in_bytes)} | {gib(mem.output_size_in_bytes)} | "
          f"{gib(mem.temp_size_in_bytes)} | {gib(total)} | {time.perf_counter() - t0:.0f} |",
          flush=True)


if __name__ == "__main__":
  main()
