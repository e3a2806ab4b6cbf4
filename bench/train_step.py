"""One whole training step of the embedded tiny DeepSeek-V2: desmoe_jax against transformers + torch.

Both sides load `assets/tiny_deepseek_v2` in float32 and train on the same random batch:
  * desmoe_jax: the trainer's `train_step.jit_train_step` (one device, fp32_master, moe_impl=auto,
    i.e. the tiled grouped matmul on CPU, the :tiny preset's layer loop), its model and optimizer
    state donated step to step;
  * transformers: `DeepseekV2ForCausalLM` (eager, its default attention and experts
    implementations; the line names the experts one) and the
    plainest PyTorch loop a user writes: zero_grad, forward with labels, backward,
    clip_grad_norm_(1.0), `torch.optim.AdamW` step, `torch.set_num_threads(2)`.

Cases (`--cases`), each at 4 x 1024 and 2 x 1024 tokens (`--shapes`; 2 x 1024 is the frontier's):
  fft       full fine-tuning: every parameter trained on both sides.
  desmoe    DES-MoE's stabilization phase: ALR router with its KD loss, expert masks (random,
            a third of the experts per domain) isolating gradients, per-expert update masks,
            the DGES statistics and correlation update. The backbone is frozen. The torch side
            trains the same parameter groups (routed + shared experts, router) with the plain
            loss: it does less work than ours (no KD, no masks, no statistics).
  esft      ESFT-Token: only the selected routed experts train (a fixed random selection of
            about an eighth per domain). The torch side freezes everything but the routed
            experts and zeroes the gradient rows of unselected experts before clipping.
  desmoe_no_alr  (only where --cases names it) DES-MoE's stabilization without the ALR: the
            pretrained linear router trains with the plain loss, as on the torch side (the same
            as desmoe's), so the two steps differ only by the masks and statistics: what our
            DES-MoE step costs against torch's for the same work.

Each case and shape runs in a fresh process (`--isolate=0`: all in one): how many of torch's
large tensors come from fresh mappings depends on what the process allocated and freed before,
and a user's training run is a fresh process (`isolated`). Within it, timing alternates the two
frameworks step by step (`--block` steps of one, then of the other, the last one timed), after
`--warmup` steps of each. Lines report medians only, as tokens per second and the ratio
ours / torch; the last line is
`speedup_vs_torch: <min over cases>`. `--compile` also prints the compile seconds of each jitted
step (lowering + XLA) and `--profile` the split of our step's time per part of the model, from
XLA:CPU's per-instruction profiler events (bench/step_profile.py).

The lines also say how many cores other processes kept busy while the case was timed: torch's
OpenMP threads spin-wait, so on a shared machine torch loses far more to other processes than
XLA does, and the ratio is the idle-machine ratio only where that number stays near 0. They
also give each framework's minor page faults per step: both allocate through glibc, which maps
a large block afresh for every allocation and unmaps it when freed, so every step touches that
memory for the first time; how much a fault costs is the machine's, and torch's step depends
on it far more than ours (bench/RESULTS.md, "fifth round":
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes torch's step 7-41% faster and ours no faster).

  python bench/train_step.py                                   # all cases, ~8 min on 2 idle cores
  python bench/train_step.py --cases=fft --shapes=2x1024 --reps=5     # quick look
  python bench/train_step.py --cases=fft --profile --torch=0          # where our step's time goes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench import step_profile  # noqa: E402
from bench.moe_layer import _busy_cpu_seconds  # noqa: E402

MODEL = os.path.join(REPO, "assets", "tiny_deepseek_v2")
CASES = ("fft", "desmoe", "esft")
EXTRA_CASES = ("desmoe_no_alr",)   # only where named in --cases: not in speedup_vs_torch's default
METHOD = {"fft": "fft", "desmoe": "desmoe", "esft": "esft_token", "desmoe_no_alr": "desmoe_no_alr"}
DOMAINS = 6


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", default=",".join(CASES),
                 help=f"comma-separated, of {CASES + EXTRA_CASES}")
  p.add_argument("--shapes", default="4x1024,2x1024", help="batch x seq, comma-separated")
  p.add_argument("--reps", type=int, default=8, help="timed steps per framework and case")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
  p.add_argument("--block", type=int, default=1,
                 help="steps of one framework in a row, the last timed (1: strict alternation)")
  p.add_argument("--torch", type=int, default=1, help="0: our step only (no ratio)")
  p.add_argument("--compile", action="store_true", help="print compile seconds per step")
  p.add_argument("--profile", action="store_true",
                 help="split our step's time per part (bench/step_profile.py)")
  p.add_argument("--moe_impl", default="auto")
  p.add_argument("--attention_impl", default="blocked",
                 help="model.attention_impl of our step (blocked_xla: without the CPU kernel)")
  p.add_argument("--scan_layers", type=int, default=None,
                 help="1: scan the MoE layers, 0: unroll them (default: the :tiny preset's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--isolate", type=int, default=1,
                 help="1: each case and shape in a fresh process; 0: all in this one")
  args = p.parse_args(argv)
  args.cases = [c for c in args.cases.split(",") if c]
  for c in args.cases:
    if c not in CASES + EXTRA_CASES:
      p.error(f"--cases: {c!r} not in {CASES + EXTRA_CASES}")
  try:
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
  except ValueError:
    p.error(f"--shapes={args.shapes!r}: expected e.g. 4x1024,2x1024")
  return args


def make_batch(b, s, vocab, seed):
  rng = np.random.RandomState(seed)
  return {"tokens": rng.randint(3, vocab, (b, s)).astype(np.int32),
          "loss_mask": np.ones((b, s), np.float32),
          "domain_id": (np.arange(b) % DOMAINS).astype(np.int32)}


def random_masks(shape, density, seed):
  """[L, D, E] 0/1 expert masks, `density` of the experts per (layer, domain), at least one."""
  rng = np.random.RandomState(seed)
  m = (rng.rand(*shape) < density).astype(np.float32)
  m[..., 0] = np.maximum(m[..., 0], (m.sum(-1) == 0))
  return m


# ------------------------------------------------------------------------------------- ours
def build_jax(case, batch, seed, moe_impl="auto", scoped=False, **runtime):
  """(run(): one step, blocking; compile seconds; the compiled step). `scoped`: traced with
  step_profile's name scopes (for --profile)."""
  from desmoe_jax import sharding as sharding_lib
  from desmoe_jax import train_step as ts
  from desmoe_jax.convert import from_pretrained
  from desmoe_jax.methods import MethodConfig, prepare_model
  from desmoe_jax.optim import OptimConfig
  from desmoe_jax.schedule import STABILIZATION
  from desmoe_jax.specialization import des_state

  mc = MethodConfig(method=METHOD[case], num_domains=DOMAINS, total_steps=1000)
  stabilization = case.startswith("desmoe")   # desmoe, desmoe_no_alr: in phase II
  phase = STABILIZATION if stabilization else mc.phase(0)
  from desmoe_jax.run_config import load_config
  # The layer loop as the :tiny preset runs it (unrolled: desmoe_jax/configs/six_domains.py).
  runtime = dict({"scan_layers": load_config("six_domains:tiny").model.scan_layers}, **runtime)
  model = from_pretrained(MODEL, jnp.float32, moe_impl=moe_impl, **runtime)
  prepare_model(model, mc, seed=seed)
  des = des_state(model)
  if case != "fft":
    density = 1 / 3 if stabilization else 1 / 8
    des.expert_mask[...] = jnp.asarray(random_masks(des.expert_mask.shape, density, seed))
  mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
  sharding_lib.shard_model(model, mesh)
  graphdef, state = nnx.split(model)
  oc = OptimConfig(learning_rate=1e-5)
  state_sh = sharding_lib.state_shardings(state, mesh)
  opt_sh = ts.optimizer_shardings(mc, oc, state, mesh)
  opt = jax.jit(lambda s: ts.init_optimizer(mc, oc, s), out_shardings=opt_sh)(state)
  bsh = {k: sharding_lib.batch_sharding(mesh, ndim=np.ndim(v)) for k, v in batch.items()}
  with (step_profile.scoped() if scoped else contextlib.nullcontext()):
    step = ts.jit_train_step(graphdef, mc, oc, phase, state_sh, opt_sh, bsh)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  step_no = jnp.asarray(500 if stabilization else 0)   # 500/1000: inside phase II
  t0 = time.perf_counter()
  with (step_profile.scoped() if scoped else contextlib.nullcontext()):
    lr = ts.learning_rate_arg(oc)
    compiled = step.lower(state, opt, jbatch, step_no, lr).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state, "opt": opt}

  def run():
    holder["state"], holder["opt"], metrics = compiled(holder["state"], holder["opt"], jbatch,
                                                       step_no, lr)
    return float(jax.block_until_ready(metrics["loss"]))

  return run, compile_s, compiled


# ------------------------------------------------------------------------------------ torch
def torch_group(name: str) -> str:
  """schedule.LABELS group of a transformers parameter name."""
  if ".mlp.experts." in name:
    return "routed_experts"
  if ".mlp.shared_experts." in name:
    return "shared_experts"
  if ".mlp.gate." in name:
    return "router"
  return "backbone"


def build_torch(case, batch, seed):
  import torch
  from transformers import DeepseekV2ForCausalLM

  torch.set_num_threads(2)
  torch.manual_seed(seed)
  model = DeepseekV2ForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
  model.train()
  trained = {"fft": None, "desmoe": {"routed_experts", "shared_experts", "router"},
             "esft": {"routed_experts"}}[case.removesuffix("_no_alr")]
  for name, p in model.named_parameters():
    p.requires_grad_(trained is None or torch_group(name) in trained)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
  tokens = torch.from_numpy(batch["tokens"]).long()
  masks = []
  if case == "esft":  # the union over the batch's domains of the selected experts, per layer
    cfg = model.config
    sel = random_masks((cfg.num_hidden_layers - cfg.first_k_dense_replace, DOMAINS,
                        cfg.n_routed_experts), 1 / 8, seed)
    union = torch.from_numpy(sel[:, np.unique(batch["domain_id"])].max(1))       # [L, E]
    for name, p in model.named_parameters():
      if p.requires_grad:
        layer = int(name.split(".layers.")[1].split(".")[0]) - cfg.first_k_dense_replace
        masks.append((p, union[layer].view(-1, *([1] * (p.ndim - 1)))))

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    for p, m in masks:
      p.grad.mul_(m)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()

  impl = getattr(model.config, "_experts_implementation", None)
  return run, impl


# ------------------------------------------------------------------------------------ timing
def _own_cpu_seconds():
  t = os.times()
  return t.user + t.system


def alternate(cands: dict, reps: int, warmup: int, block: int, faults: dict | None = None) -> dict:
  """{name: [seconds]}: every round runs each candidate `block` times, timing the last.
  `faults`: a dict, filled with {name: [minor page faults of the process during each timed
  call]} (a 4 KiB page touched for the first time since the allocator mapped it)."""
  for fn in cands.values():
    for _ in range(warmup):
      fn()
  times = {n: [] for n in cands}
  if faults is not None:
    faults.update({n: [] for n in cands})
  for _ in range(reps):
    for n, fn in cands.items():
      for _ in range(block - 1):
        fn()
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      fn()
      times[n].append(time.perf_counter() - t0)
      if faults is not None:
        faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  return times


def isolated(argv: list[str], args) -> int:
  """Runs each (shape, case) as `train_step.py <argv> --cases=<case> --shapes=<shape>
  --isolate=0` in a fresh process, prints its lines, and the min ratio last.

  Why: both frameworks allocate through glibc, whose mmap threshold and heap grow with what the
  process freed before. In one process, the cases run earlier decide how many of torch's large
  tensors of a later case come from fresh mappings (page faults) and so its speed: the same case
  and shape measured 1.36x after FFT's cases and 1.85x as the process's first case
  (bench/RESULTS.md, "seventh round"). A fresh process per case is what a user's training run
  is."""
  ratios = []
  keep, skip = [], False   # argv without its --cases, --shapes, --isolate (and their values)
  for a in argv:
    if skip:
      skip = False
    elif a.split("=")[0] in ("--cases", "--shapes", "--isolate"):
      skip = "=" not in a
    else:
      keep.append(a)
  for b, s in args.shapes:
    for case in args.cases:
      cmd = [sys.executable, os.path.abspath(__file__), *keep, f"--cases={case}",
             f"--shapes={b}x{s}", "--isolate=0"]
      done = subprocess.run(cmd, capture_output=True, text=True)
      lines = [l for l in done.stdout.splitlines()
               if not l.startswith(("train step:", "torch ", "speedup_vs_torch:"))]
      print("\n".join(lines), flush=True)
      if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return done.returncode
      found = re.search(r"ratio ([0-9.]+)x", done.stdout)
      if found:
        ratios.append(float(found.group(1)))
  if ratios:
    print(f"speedup_vs_torch: {min(ratios):.2f}")
  return 0


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  print(f"train step: {MODEL}, float32, jax {jax.__version__} ({jax.default_backend()}), "
        f"moe_impl={args.moe_impl}, attention_impl={args.attention_impl}")
  if args.torch:
    import torch
    import transformers
    print(f"torch {torch.__version__} (2 threads), transformers {transformers.__version__}")
  if args.isolate and len(args.shapes) * len(args.cases) > 1:
    return isolated(argv, args)
  from desmoe_jax.config import ModelConfig
  vocab = ModelConfig.from_pretrained(MODEL).vocab_size
  ratios = {}
  for b, s in args.shapes:
    batch = make_batch(b, s, vocab, args.seed)
    for case in args.cases:
      name = f"{case:<13} {b}x{s}"
      loop = {} if args.scan_layers is None else {"scan_layers": bool(args.scan_layers)}
      loop["attention_impl"] = args.attention_impl
      run_j, compile_s, compiled = build_jax(case, batch, args.seed, args.moe_impl,
                                             scoped=args.profile, **loop)
      cands = {"jax": run_j}
      impl = None
      if args.torch:
        run_t, impl = build_torch(case, batch, args.seed)
        cands["torch"] = run_t
      busy0, own0, t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
      faults = {}
      times = alternate(cands, args.reps, args.warmup, args.block, faults)
      wall = time.perf_counter() - t0
      # cores kept busy by all other processes while this case was timed
      busy = ((_busy_cpu_seconds() - busy0 - (_own_cpu_seconds() - own0)) / wall
              if busy0 is not None else float("nan"))
      med = {n: statistics.median(t) for n, t in times.items()}
      tok = b * s
      line = f"{name}  jax {tok / med['jax']:8.0f} tok/s"
      if args.torch:
        ratios[name] = med["torch"] / med["jax"]
        line += (f"  torch[{impl}] {tok / med['torch']:8.0f} tok/s  "
                 f"ratio {ratios[name]:.2f}x")
      line += f"  (median of {args.reps}; other processes kept {busy:.2f} cores busy)"
      line += "  page faults/step " + " ".join(
          f"{n} {statistics.median(f):.0f}" for n, f in faults.items())
      if args.compile:
        line += f"  compile {compile_s:.1f} s"
      print(line, flush=True)
      if args.profile:
        split = step_profile.profile(run_j, compiled.as_text())
        print("\n".join(step_profile.format_split(split)), flush=True)
      del cands, run_j
  if ratios:
    print(f"speedup_vs_torch: {min(ratios.values()):.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
