"""Forward+backward wall time of one DeepSeek-V2 MoE layer: desmoe_jax against transformers.

The layer is the whole thing: the float32 top-k router, the routed SwiGLU experts and the shared
experts (`n_shared_experts=2`, as in DeepSeek-V2-Lite, i.e. one dense MLP of width 2*inter).
It is built twice with identical weights and the same input:
  * `desmoe_jax.moe.block.MoEBlock` under `jax.jit`, once per expert-dispatch implementation
    ("dense" reference, "ragged" = lax.ragged_dot, "tokamax" = tokamax.ragged_dot, "tiled" = gmm.py;
    "auto" = the backend default);
  * transformers' PyTorch `DeepseekV2Moe`, once per `config._experts_implementation`
    ("eager" loop over experts, "grouped_mm", "batched_mm").
Outputs and gradients are checked to agree (float32) before anything is timed. The timed step is
loss = sum(y**2) and the gradients w.r.t. the input and every parameter.

Timing: all candidates are run round-robin, so that the noise of a shared machine hits them
alike: each round calls every candidate `--block` (2) times in a row and times the last call
(the steady state of a training loop, which runs one step again and again). We report the median
and the min over rounds, the speed ratio of every candidate to the fastest torch implementation,
and how busy other processes kept the CPU meanwhile. A slow candidate (the dense reference,
ragged_dot on CPU) leaves the rotation once it has used its time budget (`--budget_s`), after
at least `--min_reps` rounds. transformers' batched_mm is not run unless asked for
(`--torch_impls=eager,grouped_mm,batched_mm`): it gathers a weight matrix per (token, k) slot
and takes ~10 s per step on the cpu preset.

Presets:
  --preset cpu      (default) T = 1 x 2048 tokens, d=256, inter=512, 16 experts, top-2: the CPU
                    shapes of the issue; runs in about a minute on 2 cores.
  --preset v2_lite  DeepSeek-V2-Lite's layer shapes (d=2048, inter=1408, 64 experts, top-6,
                    2 shared), 8 x 1024 tokens: for GPU runs. On a GPU backend the torch
                    baseline runs on CUDA if this torch has it, else it is skipped.

The last line is `speedup_vs_torch: X.XX`: the fastest torch implementation's median time over
the JAX default's ("auto") median time, both forward+backward.

  python bench/moe_layer.py                       # cpu preset: dense, ragged, tiled, 2 torch
  python bench/moe_layer.py --impls=auto --torch_impls=eager,grouped_mm --reps=30
  python bench/moe_layer.py --preset=v2_lite --torch_impls=none --dtype=bfloat16   # on a GPU
  python bench/moe_layer.py --profile             # + where the time goes, per phase
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from desmoe_jax.moe import block as moe_lib  # noqa: E402
from desmoe_jax.config import ModelConfig  # noqa: E402

PRESETS = {
    "cpu": dict(batch=1, seq=2048, hidden=256, inter=512, experts=16, top_k=2, shared=2),
    "v2_lite": dict(batch=8, seq=1024, hidden=2048, inter=1408, experts=64, top_k=6, shared=2),
}
JAX_IMPLS = ("dense", "ragged", "tokamax", "tiled", "auto")
TORCH_IMPLS = ("eager", "grouped_mm", "batched_mm")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", "--arch", choices=sorted(PRESETS), default="cpu")
  for name in ("batch", "seq", "hidden", "inter", "experts", "top_k", "shared"):
    p.add_argument(f"--{name}", type=int, default=None, help="override the preset")
  p.add_argument("--impls", default=",".join(JAX_IMPLS),
                 help="JAX moe_impl values to time, comma-separated (auto = backend default)")
  p.add_argument("--torch_impls", default="eager,grouped_mm",
                 help="transformers experts implementations to time (eager, grouped_mm, "
                      "batched_mm), or 'none'. batched_mm is left out by default: it gathers "
                      "a [D, 2F] weight matrix per (token, k) slot and takes ~10 s per step here")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute/param dtype of both layers (the router stays float32)")
  p.add_argument("--tile_size", type=int, default=None, help="ModelConfig.moe_tile_size")
  p.add_argument("--reps", type=int, default=20, help="timed rounds (max per candidate)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--min_reps", type=int, default=3)
  p.add_argument("--block", type=int, default=2,
                 help="calls per candidate per round; only the last is timed (1 = strict "
                      "alternation)")
  p.add_argument("--budget_s", type=float, default=6.0,
                 help="a candidate leaves the rotation after this much timed work")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_check", action="store_true", help="skip the output/gradient check")
  p.add_argument("--profile", action="store_true", help="also time the phases of each layer")
  args = p.parse_args(argv)
  shapes = dict(PRESETS[args.preset])
  for name in shapes:
    if getattr(args, name) is not None:
      shapes[name] = getattr(args, name)
  args.shapes = shapes
  args.impls = [s for s in args.impls.split(",") if s]
  args.torch_impls = [] if args.torch_impls in ("", "none") else args.torch_impls.split(",")
  for s in args.impls:
    if s not in JAX_IMPLS:
      p.error(f"--impls: {s!r} not in {JAX_IMPLS}")
  for s in args.torch_impls:
    if s not in TORCH_IMPLS:
      p.error(f"--torch_impls: {s!r} not in {TORCH_IMPLS}")
  return args


# ------------------------------------------------------------------------------------- weights
def make_weights(shapes, seed):
  """float32 numpy weights in transformers' layout, scaled so that activations are O(1)."""
  rng = np.random.RandomState(seed)
  d, f, e, s = shapes["hidden"], shapes["inter"], shapes["experts"], shapes["shared"]
  n = lambda *shape, fan_in: (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  return {
      "gate.weight": n(e, d, fan_in=d),                       # router [E, D]
      "experts.gate_up_proj": n(e, 2 * f, d, fan_in=d),       # [E, 2F, D] = [gate; up]
      "experts.down_proj": n(e, d, f, fan_in=f),              # [E, D, F]
      "shared_experts.gate_proj.weight": n(s * f, d, fan_in=d),
      "shared_experts.up_proj.weight": n(s * f, d, fan_in=d),
      "shared_experts.down_proj.weight": n(d, s * f, fan_in=s * f),
      "x": rng.standard_normal((shapes["batch"], shapes["seq"], d)).astype(np.float32),
  }


def jax_config(shapes, impl, dtype, tile_size, **runtime):
  kw = dict(vocab_size=128, hidden_size=shapes["hidden"], intermediate_size=4 * shapes["hidden"],
            moe_intermediate_size=shapes["inter"], num_hidden_layers=2, num_attention_heads=2,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=shapes["experts"], n_shared_experts=shapes["shared"],
            num_experts_per_tok=shapes["top_k"], first_k_dense_replace=1, topk_method="greedy",
            routed_scaling_factor=1.0, norm_topk_prob=False, dtype=dtype, param_dtype=dtype,
            moe_impl=impl, **runtime)
  if tile_size is not None:
    kw["moe_tile_size"] = tile_size
  return ModelConfig.make(**kw)


def build_jax(shapes, w, impl, dtype, tile_size, **runtime):
  """(jitted fwd+bwd step, params, x, layer): step(params, x) -> (loss, (dparams, dx)).
  `runtime`: other ModelConfig runtime fields (e.g. expert_parallel)."""
  cfg = jax_config(shapes, impl, dtype, tile_size, **runtime)
  layer = moe_lib.MoEBlock(cfg, rngs=nnx.Rngs(0))
  f = shapes["inter"]
  pd = jnp.dtype(dtype)
  gate_up = w["experts.gate_up_proj"]
  layer.gate.weight[...] = jnp.asarray(w["gate.weight"].T)                     # [D, E] float32
  layer.experts.gate_proj[...] = jnp.asarray(gate_up[:, :f].transpose(0, 2, 1), pd)  # [E, D, F]
  layer.experts.up_proj[...] = jnp.asarray(gate_up[:, f:].transpose(0, 2, 1), pd)    # [E, D, F]
  layer.experts.down_proj[...] = jnp.asarray(w["experts.down_proj"].transpose(0, 2, 1), pd)
  sh = layer.shared_experts
  for name in ("gate_proj", "up_proj", "down_proj"):
    getattr(sh, name).kernel[...] = jnp.asarray(w[f"shared_experts.{name}.weight"].T, pd)
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss_fn(params, x):
    y, _, _ = nnx.merge(graphdef, params)(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x)[0])
  return step, forward, params, jnp.asarray(w["x"], pd), layer


def torch_device():
  import torch
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def build_torch(shapes, w, impl, dtype):
  import torch
  from transformers import DeepseekV2Config
  from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

  tdt = getattr(torch, dtype)
  cfg = DeepseekV2Config(
      hidden_size=shapes["hidden"], moe_intermediate_size=shapes["inter"],
      n_routed_experts=shapes["experts"], num_experts_per_tok=shapes["top_k"],
      n_shared_experts=shapes["shared"], topk_method="greedy", routed_scaling_factor=1.0,
      norm_topk_prob=False, n_group=1, topk_group=1, hidden_act="silu")
  cfg._experts_implementation = impl
  layer = DeepseekV2Moe(cfg)
  with torch.no_grad():
    for name, p in layer.named_parameters():
      p.copy_(torch.from_numpy(w[name]))
  dev = torch_device()
  layer = layer.to(device=dev, dtype=tdt)
  layer.gate.weight.data = layer.gate.weight.data.float()   # the router stays float32, as in HF
  params = list(layer.parameters())
  x = torch.from_numpy(w["x"]).to(device=dev, dtype=tdt).requires_grad_(True)

  def step():
    y = layer(x)
    loss = y.float().square().sum()
    grads = torch.autograd.grad(loss, [x] + params)
    if dev == "cuda":
      torch.cuda.synchronize()
    return loss, grads

  return step, layer, x


# ------------------------------------------------------------------------------------ checking
def torch_grads_in_jax_layout(layer, grads, f):
  """{jax param path: grad} for the torch layer's grads, transposed to our layout."""
  g = {name: t.detach().float().cpu().numpy()
       for (name, _), t in zip(layer.named_parameters(), grads[1:])}
  gu = g["experts.gate_up_proj"]
  return {
      "x": grads[0].detach().float().cpu().numpy(),
      ("gate", "weight"): g["gate.weight"].T,
      ("experts", "gate_proj"): gu[:, :f].transpose(0, 2, 1),
      ("experts", "up_proj"): gu[:, f:].transpose(0, 2, 1),
      ("experts", "down_proj"): g["experts.down_proj"].transpose(0, 2, 1),
      ("shared_experts", "gate_proj", "kernel"): g["shared_experts.gate_proj.weight"].T,
      ("shared_experts", "up_proj", "kernel"): g["shared_experts.up_proj.weight"].T,
      ("shared_experts", "down_proj", "kernel"): g["shared_experts.down_proj.weight"].T,
  }


def rel_err(a, b, norm="max"):
  """|a - b| / |b|, in the max norm or ("l2") the Frobenius norm."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if norm == "l2":
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(name, y, grads, ref_y, ref_grads, tol, norm="max"):
  """Error relative to the reference's magnitude, for the outputs and every gradient."""
  errs = {"y": rel_err(y, ref_y, norm)}
  errs.update({"d" + (k if isinstance(k, str) else ".".join(k)):
               rel_err(grads[k], ref_grads[k], norm) for k in ref_grads})
  worst = max(errs, key=errs.get)
  status = "ok" if errs[worst] <= tol else "MISMATCH"
  print(f"  check {name:<22} {norm} rel err {errs[worst]:.1e} ({worst})  {status}")
  return status == "ok"


def jax_grads_flat(dparams, dx):
  flat = {tuple(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v,
                                                  np.float32)
          for path, v in nnx.to_flat_state(dparams)}
  flat["x"] = np.asarray(dx, np.float32)
  return flat


# ------------------------------------------------------------------------------------- timing
def _busy_cpu_seconds():
  """CPU seconds all processes have spent busy so far (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      v = [int(a) for a in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf(
      "SC_CLK_TCK")


def time_round_robin(candidates, reps, warmup, min_reps, budget_s, block=2):
  """candidates: {name: zero-arg callable that blocks until done}. Returns {name: [seconds]}.

  Each round runs every candidate `block` times in a row and times the last call only: a
  program that alternates with others pays for re-faulting its memory (XLA:CPU allocates its
  temporaries afresh; the allocator state depends on what ran before), whereas a training
  loop runs the same step again and again.

  Also prints how many cores other processes kept busy meanwhile: on a shared machine that
  number says whether the times can be trusted (torch's spinning OpenMP threads suffer far
  more from a competing process than XLA's thread pool does).
  """
  for fn in candidates.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in candidates}
  busy0, ours0, wall0 = _busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
  for _ in range(reps):
    active = [n for n in candidates
              if len(times[n]) < min_reps or sum(times[n]) < budget_s]
    if not active:
      break
    for name in active:
      for _ in range(block - 1):
        candidates[name]()
      t0 = time.perf_counter()
      candidates[name]()
      times[name].append(time.perf_counter() - t0)
  if busy0 is not None:
    others = max(0.0, _busy_cpu_seconds() - busy0 - (sum(os.times()[:2]) - ours0))
    others /= time.perf_counter() - wall0
    print(f"other processes kept {others:.2f} of {os.cpu_count()} cores busy while timing"
          + ("  WARNING: the machine was shared, times are not reliable" if others > 0.1
             else ""))
  return times


def jax_call(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def describe_machine():
  model = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.default_backend()}"


# ------------------------------------------------------------------------------------ profile
class _SharedOnTokens(nnx.Module):
  """The shared-experts MLP applied to [B*S, D] rather than [B, S, D] (profile only)."""

  def __init__(self, mlp):
    self.mlp = mlp

  def __call__(self, x):
    return self.mlp(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def minor_faults_per_call(fn, calls=5):
  """Median number of page faults (first touches of fresh memory) per call of fn."""
  import resource
  fn()
  counts = []
  for _ in range(calls):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  return int(statistics.median(counts))


def profile(shapes, w, dtype, tile_size, reps, torch_impls):
  """Where the time goes: per-phase forward+backward times of the JAX default and of torch."""
  from desmoe_jax.moe import gmm
  from desmoe_jax.moe.routing import select_experts

  step, _, params, x, layer = build_jax(shapes, w, "auto", dtype, tile_size)
  cfg = layer.cfg
  b, s, d = x.shape
  x_td = x.reshape(b * s, d)
  router_w = layer.gate.weight[...]
  ex = layer.experts
  gate, up, down = ex.gate_proj[...], ex.up_proj[...], ex.down_proj[...]
  shared_mlp = layer.shared_experts
  _, ids_tk, _ = select_experts(x_td.astype(jnp.float32) @ router_w, cfg)
  impl = moe_lib.resolve_impl(cfg.runtime.moe_impl)
  sq = lambda y: jnp.sum(jnp.square(y.astype(jnp.float32)))
  grad = lambda f, n: jax.jit(jax.value_and_grad(f, argnums=tuple(range(n))))

  def router_loss(xx, rw):
    wts, _, _ = select_experts(xx.astype(jnp.float32) @ rw, cfg)
    return sq(wts)

  def experts_fwd(xx, g, u, dn):
    return moe_lib.expert_outputs(xx, ids_tk, g, u, dn, impl=impl, tile_size=cfg.runtime.moe_tile_size)

  sh_graph, sh_params = nnx.split(shared_mlp, nnx.Param)
  shared_loss = lambda p, xx: sq(nnx.merge(sh_graph, p)(xx))

  # The same layer with its shared experts applied to [B*S, D] (a change MoE.__call__ could make).
  _, _, _, _, layer2 = build_jax(shapes, w, "auto", dtype, tile_size)
  layer2.shared_experts = _SharedOnTokens(layer2.shared_experts)
  graph2, params2 = nnx.split(layer2, nnx.Param)
  step2 = jax.jit(jax.value_and_grad(
      lambda p, xx: sq(nnx.merge(graph2, p)(xx)[0]), argnums=(0, 1)))

  cands = {
      "jax whole layer": jax_call(step, params, x),
      "jax whole layer, shared MLP on [T,D] (*)": jax_call(step2, params2, x),
      "jax router + top-k": jax_call(grad(router_loss, 2), x_td, router_w),
      f"jax routed experts ({impl}), forward only": jax_call(jax.jit(experts_fwd), x_td, gate,
                                                              up, down),
      f"jax routed experts ({impl})": jax_call(grad(lambda *a: sq(experts_fwd(*a)), 4), x_td,
                                               gate, up, down),
      "jax shared MLP on [B,S,D] (as MoE calls it)": jax_call(grad(shared_loss, 2), sh_params, x),
      "jax shared MLP on [T,D]": jax_call(grad(shared_loss, 2), sh_params, x_td),
  }
  if impl == "tiled":
    cands["jax tile layout (sort) only"] = jax_call(
        jax.jit(lambda ids: gmm.tile_layout(ids, cfg.n_routed_experts, 32)), ids_tk)
  faults = {"jax whole layer": minor_faults_per_call(cands["jax whole layer"])}

  if torch_impls:
    import torch
    for ti in torch_impls:
      tstep, tlayer, tx = build_torch(shapes, w, ti, dtype)
      xt = tx.detach().reshape(-1, d).requires_grad_(True)
      sync = torch.cuda.synchronize if torch_device() == "cuda" else (lambda: None)
      with torch.no_grad():
        _, t_wts, t_ids = tlayer.gate(xt)

      def t_router(tlayer=tlayer, xt=xt, sync=sync):
        _, wts, _ = tlayer.gate(xt)
        torch.autograd.grad(wts.square().sum(), [xt, tlayer.gate.weight])
        sync()

      def t_experts(tlayer=tlayer, xt=xt, t_wts=t_wts, t_ids=t_ids, sync=sync):
        y = tlayer.experts(xt, t_ids, t_wts)
        torch.autograd.grad(y.square().sum(), [xt] + list(tlayer.experts.parameters()))
        sync()

      def t_shared(tlayer=tlayer, xt=xt, sync=sync):
        y = tlayer.shared_experts(xt)
        torch.autograd.grad(y.square().sum(), [xt] + list(tlayer.shared_experts.parameters()))
        sync()

      cands[f"torch[{ti}] whole layer"] = tstep
      cands[f"torch[{ti}] router + top-k"] = t_router
      cands[f"torch[{ti}] routed experts"] = t_experts
      if ti == torch_impls[0]:
        cands["torch shared MLP"] = t_shared
      faults[f"torch[{ti}] whole layer"] = minor_faults_per_call(tstep)
  times = time_round_robin(cands, reps, warmup=2, min_reps=3, budget_s=4.0)
  print("\nprofile: forward+backward of each phase alone (ms). Routed experts get fixed routing;"
        "\nthe router's loss is on its top-k weights. (*) not what MoE does today.")
  print(f"  {'phase':<48}{'median':>9}{'min':>9}")
  for name, ts in times.items():
    print(f"  {name:<48}{1e3 * statistics.median(ts):9.1f}{1e3 * min(ts):9.1f}")
  print("page faults per forward+backward step (fresh memory touched; ~2 us each on this VM):")
  for name, n in faults.items():
    print(f"  {name:<48}{n:9d}  ({n * 4 / 1024:.0f} MiB of 4 KiB pages)")


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
  args = parse_args(argv)
  sh = args.shapes
  t = sh["batch"] * sh["seq"]
  print(f"MoE layer fwd+bwd: preset={args.preset} tokens={sh['batch']}x{sh['seq']}={t} "
        f"d={sh['hidden']} inter={sh['inter']} experts={sh['experts']} top-{sh['top_k']} "
        f"shared={sh['shared']} (one MLP of width {sh['shared'] * sh['inter']}) dtype={args.dtype}")
  print(f"machine: {describe_machine()}")
  w = make_weights(sh, args.seed)
  f = sh["inter"]

  torch_ok = bool(args.torch_impls)
  if torch_ok:
    import torch
    torch.set_num_threads(os.cpu_count())
    if jax.default_backend() != "cpu" and torch_device() == "cpu":
      print(f"torch has no {jax.default_backend()} device here: the torch baseline is skipped")
      torch_ok = False
  cands, checks_ok = {}, True
  # float32: every element to 1e-4 of the largest. bfloat16: a token whose rounded input
  # flips a near-tie in the top-k goes to other experts, so compare whole tensors (L2).
  tol, norm = (1e-4, "max") if args.dtype == "float32" else (5e-2, "l2")
  ref = None
  if torch_ok:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for ti in args.torch_impls:
      try:
        tstep, tlayer, _ = build_torch(sh, w, ti, args.dtype)
        loss, grads = tstep()
      except Exception as e:  # noqa: BLE001 - an implementation this torch cannot run
        print(f"  torch[{ti}] unavailable: {type(e).__name__}: {e}")
        continue
      with torch.no_grad():
        xin = torch.from_numpy(w["x"]).to(device=torch_device(), dtype=getattr(torch, args.dtype))
        y = tlayer(xin).float().cpu().numpy()
      tg = torch_grads_in_jax_layout(tlayer, grads, f)
      if ref is None:
        ref = (y, tg)
        print(f"  reference for the checks: torch[{ti}]")
      elif not args.no_check:
        checks_ok &= check(f"torch[{ti}]", y, tg, *ref, tol, norm)
      cands[f"torch[{ti}]"] = tstep
  default = moe_lib.resolve_impl("auto")
  default_name = None
  for resolved in dict.fromkeys(moe_lib.resolve_impl(i) for i in args.impls):
    name = f"jax[{resolved}]"
    if resolved == default and "auto" in args.impls:
      name = default_name = f"jax[{resolved}] = auto"
    step, forward, params, x, _ = build_jax(sh, w, resolved, args.dtype, args.tile_size)
    if not args.no_check:
      loss, (dparams, dx) = step(params, x)
      y = np.asarray(forward(params, x), np.float32)
      if ref is None:
        ref = (y, jax_grads_flat(dparams, dx))
        print(f"  reference for the checks: {name}")
      else:
        checks_ok &= check(name, y, jax_grads_flat(dparams, dx), *ref, tol, norm)
    cands[name] = jax_call(step, params, x)
  if not checks_ok:
    print("ERROR: implementations disagree; not timing")
    return 1

  times = time_round_robin(cands, args.reps, args.warmup, args.min_reps, args.budget_s,
                           args.block)
  med = {n: statistics.median(ts) for n, ts in times.items()}
  torch_names = [n for n in med if n.startswith("torch[")]
  base = min(torch_names, key=med.get) if torch_names else None
  print(f"\n{'implementation':<28}{'reps':>5}{'median ms':>11}{'min ms':>9}"
        + (f"{'vs ' + base:>22}" if base else ""))
  for n in sorted(med, key=med.get):
    row = f"{n:<28}{len(times[n]):>5}{1e3 * med[n]:11.1f}{1e3 * min(times[n]):9.1f}"
    if base:
      row += f"{med[base] / med[n]:21.2f}x"
    print(row)
  if args.profile:
    profile(sh, w, args.dtype, args.tile_size, args.reps, args.torch_impls if torch_ok else [])
  if base and default_name:
    print(f"baseline: {base}; speedup = its median / the median of {default_name}")
    print(f"speedup_vs_torch: {med[base] / med[default_name]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
