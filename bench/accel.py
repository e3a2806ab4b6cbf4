r"""The one-shot accelerator benchmark: one command, at most ~8 minutes on one H100/H200 or a TPU
VM, no internet. Every stage runs in its own subprocess under a timeout and appends JSON lines
to `<out_dir>/accel.jsonl` as soon as it has them, so a killed run keeps what it measured.

  python bench/accel.py                      # out_dir: $OUT, else ./accel_out
  python bench/accel.py --out_dir=/tmp/acc --stages=ceiling_jax,moe_jax
  python bench/accel.py --smoke              # every stage at tiny shapes on CPU (< 1 min; CI)

Stages (in order; --stages picks some):
  preflight_jax / preflight_torch  versions, devices (XLA_PYTHON_CLIENT_PREALLOCATE=false, so
                                   peak bytes are what a program used, not a preallocated pool)
  ceiling_jax / ceiling_torch      bf16 8192^3 matmul (TFLOP/s) and a 1 GiB device-to-device copy
                                   (GB/s, bytes read + written)
  moe_torch          transformers' DeepseekV2Moe at V2-Lite shapes (bf16, 16384 tokens, 64
                     experts, top-6, 2 shared, fp32 router): "eager" (the reference) and
                     "grouped_mm", outputs and gradients checked against eager by relative L2
                     before timing; writes samples of them for moe_jax to check against
                     (skipped where torch has no CUDA device, e.g. on a TPU VM)
  moe_jax            desmoe_jax's MoE layer, moe_impl "ragged" and "tokamax": checked against
                     torch eager (and each other) before timing; the HLO check of
                     scripts/hlo_check.py on the compiled GPU/TPU program; peak bytes in use
  train_jax          a 4-layer model at V2-Lite widths (1 dense + 3 MoE, vocab 102400) through
                     the trainer's `jit_train_step`, fft and DES-MoE's stabilization phase, at
                     2 x 4096 tokens: tokens/s, MFU against the measured matmul ceiling and the
                     datasheet peak
  moe_torch_compile  torch.compile of the grouped_mm layer, timed if it compiles within 60 s
                     (last: the least needed if the time runs out)
Extra stage (only by name, --stages=train_py; its own command in bench/RESULTS.md):
  train_py           train.py itself, the GPU path a user runs: a random checkpoint at V2-Lite
                     widths with train_jax's 4 layers (written with save_pretrained, the bundled
                     tokenizer), trained for a few steps with the :h200 preset's levers (bf16
                     weights by stochastic rounding, moments in host memory, remat full,
                     ce_chunk 1024, the paper's 32 x 4096 batch in 16 microbatches); emits
                     train.py's own step records (tokens/s, loss) and its return code

Layer results: median ms over the timed steps, tokens/s, TFLOP/s of the ideal layer FLOPs
(scripts/hlo_check.layer_flops: 6 x tokens x (top_k x 3 x d x F + 3 x d x shared F + d x E)).
Checks compare outputs/gradients by relative L2 over a fixed random sample of up to 2^18
entries per tensor (the whole tensor when smaller): the full weight gradients are ~2 GB each
and the two frameworks run in separate processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import numpy as np  # noqa: E402

STAGES = ("preflight_jax", "preflight_torch", "ceiling_jax", "ceiling_torch", "moe_torch",
          "moe_jax", "train_jax", "moe_torch_compile")
EXTRA_STAGES = ("train_py",)
TIMEOUT_S = {"preflight_jax": 45, "preflight_torch": 45, "ceiling_jax": 45, "ceiling_torch": 45,
             "moe_torch": 120, "moe_jax": 150, "train_jax": 150, "moe_torch_compile": 100,
             "train_py": 420}
TORCH_COMPILE_BUDGET_S = 60

FULL = dict(matmul=8192, copy_bytes=1 << 30, reps=10, warmup=2, torch_compile_backend="inductor",
            torch_needs_cuda=True,
            moe=dict(batch=2, seq=8192, hidden=2048, inter=1408, experts=64, top_k=6, shared=2),
            moe_dtype="bfloat16", check_tol=3e-2,
            train=dict(layers=4, vocab=102400, batch=2, seq=4096, widths="v2_lite"),
            train_py=dict(preset="h200", steps=4, overrides=()))
# --smoke: torch.compile with "aot_eager" (dynamo + autograd tracing, no code generation):
# inductor's C++ build alone takes minutes on a CPU.
SMOKE = dict(matmul=256, copy_bytes=1 << 22, reps=2, warmup=1, torch_compile_backend="aot_eager",
             torch_needs_cuda=False,
             moe=dict(batch=2, seq=64, hidden=64, inter=32, experts=8, top_k=2, shared=2),
             moe_dtype="float32", check_tol=1e-4,
             train=dict(layers=4, vocab=256, batch=2, seq=32, widths="tiny"),
             # the tiny preset's data and sizes (the :h200 levers need 4096-token sequences)
             train_py=dict(preset="tiny", steps=2, overrides=("--config.model.moe_impl=dense",)))

# Dense bf16 peak FLOP/s from the vendors' datasheets, by JAX/torch device kind.
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12,
                  "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v4": 275e12,
                  "TPU v6 lite": 918e12}
SAMPLE = 1 << 18


def datasheet_peak(device_kind: str) -> float | None:
  """Datasheet bf16 peak of a device kind ("NVIDIA H200", "TPU v5 lite"), longest match."""
  hits = [k for k in DATASHEET_BF16 if k.lower() in device_kind.lower()]
  return DATASHEET_BF16[max(hits, key=len)] if hits else None


def matmul_flops(n: int) -> float:
  """An n x n by n x n matmul: n^3 multiply-adds."""
  return 2.0 * n ** 3


def train_flops_per_token(cfg, seq: int, alr_hidden: int = 0) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add) of a
  DeepSeek-V2 model: every matmul a token goes through (attention projections, the dense MLPs,
  the router, top_k routed and the shared experts, the LM head; the embedding is a lookup) plus
  causal attention itself (a query meets seq/2 keys on average: seq/2 x heads x (qk + v) dims).
  `alr_hidden`: the adaptive router's hidden width (DES-MoE), whose fp32 MLP replaces the linear
  router in every MoE layer (d x hidden + hidden x E + the residual d x E)."""
  d, h = cfg.hidden_size, cfg.num_attention_heads
  qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
  q = d * h * qk if cfg.q_lora_rank is None else d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk
  attn = (q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
          + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + v) + h * v * d)
  dense_mlp = 3 * d * cfg.intermediate_size
  e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
  router = d * e if not alr_hidden else d * alr_hidden + alr_hidden * e + d * e
  moe = router + cfg.num_experts_per_tok * 3 * d * f + 3 * d * f * cfg.n_shared_experts
  n_dense = cfg.first_k_dense_replace
  n_moe = cfg.num_hidden_layers - n_dense
  macs = cfg.num_hidden_layers * attn + n_dense * dense_mlp + n_moe * moe + d * cfg.vocab_size
  attention = cfg.num_hidden_layers * (seq / 2) * h * (qk + v)
  return 6.0 * (macs + attention)


# ------------------------------------------------------------------ plumbing


class Out:
  """Appends one JSON object per line to <out_dir>/accel.jsonl, flushed at once."""

  def __init__(self, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, "accel.jsonl")
    self.dir = out_dir

  def emit(self, record: dict):
    record = dict(record, time=time.strftime("%H:%M:%S"))
    with open(self.path, "a") as f:
      f.write(json.dumps(record, default=_jsonable) + "\n")
      f.flush()
      os.fsync(f.fileno())
    print(json.dumps(record, default=_jsonable), flush=True)

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


def _jsonable(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return str(v)


def median_ms(fn, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Median wall ms of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), times


def sample(name: str, a) -> np.ndarray:
  """A fixed random sample (by name) of up to SAMPLE entries of `a`, as float32."""
  flat = np.asarray(a, np.float32).reshape(-1)
  if flat.size <= SAMPLE:
    return flat
  idx = np.random.RandomState(zlib.crc32(name.encode())).randint(0, flat.size, SAMPLE)
  return flat[idx]


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(samples: dict, ref: dict, tol: float) -> dict:
  """{"worst": name, "rel_l2": its error, "ok": bool, "all": {name: err}} over shared keys."""
  errs = {k: rel_l2(samples[k], ref[k]) for k in ref if k in samples}
  if not errs:
    return {"ok": False, "error": "no tensor in common"}
  worst = max(errs, key=errs.get)
  return {"ok": errs[worst] <= tol, "worst": worst, "rel_l2": errs[worst], "all": errs}


def _key(k) -> str:
  return k if isinstance(k, str) else "d" + ".".join(k)


# ------------------------------------------------------------------ stages


def stage_preflight_jax(out: Out, preset: dict):
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  rec = {"python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__,
         "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
         "prealloc": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
    rec["tokamax"] = getattr(tokamax, "__version__", "installed")
  except ImportError as e:
    rec["tokamax"] = f"missing: {e}"
  import jaxlib  # pylint: disable=import-outside-toplevel
  rec["jaxlib"] = jaxlib.__version__
  out.emit({"stage": "preflight_jax", **rec})


def stage_preflight_torch(out: Out, preset: dict):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  rec = {"torch": torch.__version__, "transformers": transformers.__version__,
         "cuda": torch.cuda.is_available()}
  if torch.cuda.is_available():
    rec["device"] = torch.cuda.get_device_name(0)
    rec["cuda_version"] = torch.version.cuda
  out.emit({"stage": "preflight_torch", **rec})


def stage_ceiling_jax(out: Out, preset: dict):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = preset["matmul"]
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  ms, _ = median_ms(lambda: mm(a, b).block_until_ready(), preset["reps"], preset["warmup"])
  words = preset["copy_bytes"] // 4
  src = jnp.ones((words,), jnp.float32)
  copy = jax.jit(lambda x: x + 0.0)   # read + write every byte (a plain copy may be elided)
  cms, _ = median_ms(lambda: copy(src).block_until_ready(), preset["reps"], preset["warmup"])
  dev = jax.devices()[0]
  out.emit({"stage": "ceiling_jax", "device": dev.device_kind, "matmul_n": n,
            "matmul_ms": ms, "matmul_tflops": matmul_flops(n) / ms / 1e9,
            "datasheet_tflops": (datasheet_peak(dev.device_kind) or 0) / 1e12 or None,
            "copy_bytes": preset["copy_bytes"], "copy_ms": cms,
            "copy_gbs": 2 * preset["copy_bytes"] / cms / 1e6})


def stage_ceiling_torch(out: Out, preset: dict):
  import torch  # pylint: disable=import-outside-toplevel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  n = preset["matmul"]
  a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
  b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)

  def mm():
    a @ b
    sync()

  ms, _ = median_ms(mm, preset["reps"], preset["warmup"])
  src = torch.ones(preset["copy_bytes"] // 4, device=dev)
  dst = torch.empty_like(src)

  def copy():
    dst.copy_(src)
    sync()

  cms, _ = median_ms(copy, preset["reps"], preset["warmup"])
  out.emit({"stage": "ceiling_torch", "device": torch.cuda.get_device_name(0) if dev == "cuda"
            else "cpu", "matmul_n": n, "matmul_ms": ms,
            "matmul_tflops": matmul_flops(n) / ms / 1e9, "copy_ms": cms,
            "copy_gbs": 2 * preset["copy_bytes"] / cms / 1e6})


def _layer_flops(s: dict) -> float:
  from hlo_check import layer_flops  # pylint: disable=import-outside-toplevel
  return layer_flops(s["batch"] * s["seq"], s["top_k"], s["hidden"], s["inter"], s["experts"],
                     s["shared"])


def _torch_samples(layer, x, grads, f) -> dict:
  import moe_layer  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    y = layer(x).float().cpu().numpy()
  flat = moe_layer.torch_grads_in_jax_layout(layer, grads, f)
  out = {"y": sample("y", y)}
  out.update({_key(k): sample(_key(k), v) for k, v in flat.items()})
  return out


def _torch_layer_record(name, step, layer, x, s, preset, tokens, ref=None):
  import torch  # pylint: disable=import-outside-toplevel
  _, grads = step()
  samples = _torch_samples(layer, x, grads, s["inter"])
  rec = {"stage": "moe_torch", "impl": name}
  if ref is not None:
    rec["check_vs_eager"] = compare(samples, ref, preset["check_tol"])
  if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
  ms, _ = median_ms(step, preset["reps"], preset["warmup"])
  rec.update(median_ms=ms, tokens_per_s=tokens / ms * 1e3,
             tflops=_layer_flops(s) / ms / 1e9,
             peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
  return rec, samples


def _no_cuda(out: Out, preset: dict, stage: str) -> bool:
  """The full-size torch layer on a CPU (a TPU VM) would only eat the time budget."""
  import torch  # pylint: disable=import-outside-toplevel
  if preset["torch_needs_cuda"] and not torch.cuda.is_available():
    out.emit({"stage": stage, "skipped": "torch has no CUDA device here"})
    return True
  return False


def stage_moe_torch(out: Out, preset: dict):
  import moe_layer  # pylint: disable=import-outside-toplevel
  if _no_cuda(out, preset, "moe_torch"):
    return
  s, dtype = preset["moe"], preset["moe_dtype"]
  w = moe_layer.make_weights(s, seed=0)
  tokens = s["batch"] * s["seq"]
  ref = None
  for name in ("eager", "grouped_mm"):
    try:
      step, layer, x = moe_layer.build_torch(s, w, name, dtype)
      rec, samples = _torch_layer_record(name, step, layer, x, s, preset, tokens, ref)
      if ref is None:
        ref = samples
        np.savez(os.path.join(out.dir, "torch_eager_samples.npz"), **samples)
      out.emit(rec)
    except Exception as e:  # pylint: disable=broad-except  # the next one still runs
      out.emit({"stage": "moe_torch", "impl": name, "error": f"{type(e).__name__}: {e}"[:500]})


def stage_moe_torch_compile(out: Out, preset: dict):
  import moe_layer  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  if _no_cuda(out, preset, "moe_torch_compile"):
    return
  s, dtype = preset["moe"], preset["moe_dtype"]
  w = moe_layer.make_weights(s, seed=0)
  step, layer, x = moe_layer.build_torch(s, w, "grouped_mm", dtype)
  compiled = torch.compile(layer, backend=preset["torch_compile_backend"])
  params = list(layer.parameters())
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

  def cstep():
    loss = compiled(x).float().square().sum()
    grads = torch.autograd.grad(loss, [x] + params)
    sync()
    return loss, grads

  t0 = time.perf_counter()
  cstep()
  compile_s = time.perf_counter() - t0
  if compile_s > TORCH_COMPILE_BUDGET_S:
    out.emit({"stage": "moe_torch_compile", "compile_s": compile_s,
              "backend": preset["torch_compile_backend"],
              "skipped": f"compiled in more than {TORCH_COMPILE_BUDGET_S} s"})
    return
  ref_path = os.path.join(out.dir, "torch_eager_samples.npz")
  ref = dict(np.load(ref_path)) if os.path.exists(ref_path) else None
  rec, _ = _torch_layer_record("compile(grouped_mm)", cstep, layer, x, s, preset,
                               s["batch"] * s["seq"], ref)
  out.emit(dict(rec, stage="moe_torch_compile", compile_s=compile_s,
                backend=preset["torch_compile_backend"]))


def stage_moe_jax(out: Out, preset: dict):
  import jax  # pylint: disable=import-outside-toplevel
  import moe_layer  # pylint: disable=import-outside-toplevel
  from hlo_check import analyze  # pylint: disable=import-outside-toplevel
  s, dtype = preset["moe"], preset["moe_dtype"]
  w = moe_layer.make_weights(s, seed=0)
  tokens = s["batch"] * s["seq"]
  ref_path = os.path.join(out.dir, "torch_eager_samples.npz")
  torch_ref = dict(np.load(ref_path)) if os.path.exists(ref_path) else None
  first = None
  for impl in ("ragged", "tokamax"):
    try:
      step, forward, params, x, _ = moe_layer.build_jax(s, w, impl, dtype, None)
      t0 = time.perf_counter()
      compiled = step.lower(params, x).compile()
      compile_s = time.perf_counter() - t0
      hlo = analyze(compiled, impl, tokens=tokens, shapes=s, compile_s=compile_s)
      y = np.asarray(forward(params, x), np.float32)
      _, (dparams, dx) = compiled(params, x)
      flat = moe_layer.jax_grads_flat(dparams, dx)
      samples = {"y": sample("y", y)}
      samples.update({_key(k): sample(_key(k), v) for k, v in flat.items()})
      rec = {"stage": "moe_jax", "impl": impl,
             "hlo": {"dense_fallback": hlo.dense_fallback, "pallas_kernels": hlo.mosaic_calls,
                     "custom_calls": hlo.custom_calls, "matmuls": hlo.matmuls,
                     "compiler_flops": hlo.flops, "ideal_layer_flops": hlo.ideal_layer_flops,
                     "temp_bytes": hlo.temp_bytes, "compile_s": compile_s}}
      if torch_ref is not None:
        rec["check_vs_torch_eager"] = compare(samples, torch_ref, preset["check_tol"])
      if first is not None:
        rec["check_vs_ragged"] = compare(samples, first, preset["check_tol"])
      first = first or samples
      del y, dparams, dx, flat
      ms, _ = median_ms(lambda: jax.block_until_ready(compiled(params, x)), preset["reps"],
                        preset["warmup"])
      stats = jax.devices()[0].memory_stats() or {}
      rec.update(median_ms=ms, tokens_per_s=tokens / ms * 1e3, tflops=_layer_flops(s) / ms / 1e9,
                 peak_bytes=stats.get("peak_bytes_in_use"))
      out.emit(rec)
    except Exception as e:  # pylint: disable=broad-except
      out.emit({"stage": "moe_jax", "impl": impl, "error": f"{type(e).__name__}: {e}"[:500]})


def _ceiling_tflops(out: Out) -> float | None:
  for r in out.records():
    if r.get("stage") == "ceiling_jax" and r.get("matmul_tflops"):
      return r["matmul_tflops"]
  return None


def train_model_config(t: dict, moe_impl: str, attention_impl: str):
  from desmoe_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from desmoe_jax.run_config import load_config  # pylint: disable=import-outside-toplevel
  arch = load_config(os.path.join(REPO, "configs", f"models.py:{t['widths']}")).to_dict()
  arch.update(num_hidden_layers=t["layers"], first_k_dense_replace=1, vocab_size=t["vocab"],
              max_position_embeddings=max(arch["max_position_embeddings"], t["seq"]))
  return ModelConfig.from_hf_dict(arch, source=f"accel {t['widths']}", dtype="bfloat16",
                                  param_dtype="bfloat16", moe_impl=moe_impl,
                                  attention_impl=attention_impl)


def stage_train_jax(out: Out, preset: dict, moe_impl: str, attention_impl: str):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from desmoe_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from desmoe_jax import train_step as ts  # pylint: disable=import-outside-toplevel
  from desmoe_jax.methods import MethodConfig, prepare_model  # pylint: disable=import-outside-toplevel
  from desmoe_jax.model import init_model  # pylint: disable=import-outside-toplevel
  from desmoe_jax.optim import OptimConfig  # pylint: disable=import-outside-toplevel
  from desmoe_jax.schedule import STABILIZATION  # pylint: disable=import-outside-toplevel

  t = preset["train"]
  cfg = train_model_config(t, moe_impl, attention_impl)
  b, seq = t["batch"], t["seq"]
  rng = np.random.RandomState(0)
  batch = {"tokens": jnp.asarray(rng.randint(0, t["vocab"], (b, seq)), jnp.int32),
           "loss_mask": jnp.ones((b, seq), jnp.float32),
           "domain_id": jnp.asarray(np.arange(b) % 6, jnp.int32),
           "segment_ids": jnp.ones((b, seq), jnp.int32),
           "positions": jnp.tile(jnp.arange(seq, dtype=jnp.int32), (b, 1))}
  device = jax.devices()[0]
  peak = datasheet_peak(device.device_kind)
  ceiling = _ceiling_tflops(out)
  for method in ("fft", "desmoe"):
    try:
      mc = MethodConfig(method=method, num_domains=6, total_steps=1000)
      phase = mc.phase(0) if method == "fft" else STABILIZATION
      model = prepare_model(init_model(cfg, seed=0), mc)
      mesh = sharding_lib.make_mesh(devices=[device])
      sharding_lib.shard_model(model, mesh)
      graphdef, state = nnx.split(model)
      del model
      oc = OptimConfig()
      state_sh = sharding_lib.state_shardings(state, mesh)
      opt_sh = ts.optimizer_shardings(mc, oc, state, mesh)
      opt = jax.jit(lambda s, mc=mc: ts.init_optimizer(mc, oc, s), out_shardings=opt_sh)(state)
      batch_sh = sharding_lib.batch_sharding(mesh)
      bsh = {k: batch_sh for k in batch}
      bsh["domain_id"] = sharding_lib.batch_sharding(mesh, ndim=1)
      # bfloat16 weights (param_dtype above): the paper preset's precision, stochastic rounding.
      step = ts.jit_train_step(graphdef, mc, oc, phase, state_sh, opt_sh, bsh,
                               ts.StepConfig(precision="bf16_sr"))
      t0 = time.perf_counter()
      lr = ts.learning_rate_arg(oc)
      compiled = step.lower(state, opt, batch, jnp.asarray(500), lr).compile()
      compile_s = time.perf_counter() - t0
      holder = {"state": state, "opt": opt}

      def run():
        holder["state"], holder["opt"], metrics = compiled(holder["state"], holder["opt"], batch,
                                                           jnp.asarray(500), lr)
        jax.block_until_ready(metrics)
        return metrics

      ms, _ = median_ms(run, preset["reps"], warmup=1)
      loss = float(run()["loss"])
      alr_hidden = mc.alr.hidden_mult * cfg.hidden_size if mc.use_alr else 0
      fpt = train_flops_per_token(cfg, seq, alr_hidden)
      tps = b * seq / ms * 1e3
      stats = device.memory_stats() or {}
      out.emit({"stage": "train_jax", "method": method, "phase": int(phase),
                "moe_impl": moe_impl, "attention_impl": attention_impl,
                "tokens": b * seq, "median_ms": ms, "tokens_per_s": tps, "loss": loss,
                "flops_per_token": fpt, "tflops": tps * fpt / 1e12,
                "mfu_vs_ceiling": tps * fpt / (ceiling * 1e12) if ceiling else None,
                "mfu_vs_datasheet": tps * fpt / peak if peak else None,
                "compile_s": compile_s, "peak_bytes": stats.get("peak_bytes_in_use")})
      del holder, state, opt, compiled
    except Exception as e:  # pylint: disable=broad-except
      out.emit({"stage": "train_jax", "method": method, "error": f"{type(e).__name__}: {e}"[:500]})


def stage_train_py(out: Out, preset: dict):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from desmoe_jax.convert import save_pretrained  # pylint: disable=import-outside-toplevel
  from desmoe_jax.model import init_model  # pylint: disable=import-outside-toplevel

  t, tp = preset["train"], preset["train_py"]
  model_dir = os.path.join(out.dir, "train_py_model")
  work = os.path.join(out.dir, "train_py_run")
  # At least the bundled tokenizer's 4096 tokens (train.py checks), V2-Lite's 102400 in full.
  cfg = train_model_config(dict(t, vocab=max(t["vocab"], 4096)), "auto", "einsum")
  t0 = time.perf_counter()
  with jax.default_device(jax.devices("cpu")[0]):  # written from host memory, not the GPU's
    save_pretrained(init_model(cfg, seed=0), model_dir, dtype=jnp.bfloat16,
                    tokenizer_dir=os.path.join(REPO, "assets", "tokenizer"))
  out.emit({"stage": "train_py", "checkpoint": model_dir, "layers": cfg.num_hidden_layers,
            "write_s": time.perf_counter() - t0})
  cmd = [sys.executable, os.path.join(REPO, "train.py"),
         f"--config={os.path.join(REPO, 'configs', 'six_domains.py')}:{tp['preset']}",
         f"--config.model.path={model_dir}", f"--workdir={work}",
         f"--config.train.steps={tp['steps']}", "--config.train.log_every=1",
         "--config.train.eval_every=0", *tp["overrides"]]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  steps = []
  metrics = os.path.join(work, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      steps = [r for r in (json.loads(line) for line in f if line.strip())
               if "tokens_per_s" in r]
  out.emit({"stage": "train_py", "command": " ".join(cmd), "rc": proc.returncode,
            "seconds": time.perf_counter() - t0, "steps": steps,
            "loss": steps[-1].get("loss") if steps else None,
            "tokens_per_s": steps[-1]["tokens_per_s"] if steps else None,
            **({"stderr_tail": proc.stderr[-1500:]} if proc.returncode else {})})
  if proc.returncode:
    raise SystemExit(proc.returncode)


# ------------------------------------------------------------------ driver


def run_stage(name: str, out: Out, preset: dict, args):
  fn = globals()[f"stage_{name}"]
  if name == "train_jax":
    fn(out, preset, args.train_moe_impl, args.train_attention_impl)
  else:
    fn(out, preset)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out_dir", default=os.environ.get("OUT") or "accel_out")
  p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, every stage")
  p.add_argument("--stages", default=",".join(STAGES),
                 help=f"comma-separated, of {STAGES + EXTRA_STAGES} (default: all but "
                      f"{EXTRA_STAGES})")
  p.add_argument("--budget_s", type=float, default=0.0,
                 help="wall-clock budget of the whole run (default 470 s; 900 s with --smoke, "
                      "whose stage timeouts are tripled for slow CI machines); a stage's timeout "
                      "never exceeds what is left of it")
  p.add_argument("--train_moe_impl", default="tokamax")
  p.add_argument("--train_attention_impl", default="tokamax")
  p.add_argument("--stage", default="", help=argparse.SUPPRESS)   # a stage's subprocess
  args = p.parse_args(argv)
  preset = SMOKE if args.smoke else FULL
  out = Out(args.out_dir)
  if args.stage:
    run_stage(args.stage, out, preset, args)
    return 0
  budget = args.budget_s or (900.0 if args.smoke else 470.0)
  stages = [s for s in args.stages.split(",") if s]
  for s in stages:
    if s not in STAGES + EXTRA_STAGES:
      p.error(f"--stages: {s!r} not in {STAGES + EXTRA_STAGES}")
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if args.smoke:
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  start = time.perf_counter()
  out.emit({"stage": "start", "smoke": args.smoke, "stages": stages, "budget_s": budget,
            "argv": sys.argv[1:]})
  for name in stages:
    left = budget - (time.perf_counter() - start)
    timeout = min(TIMEOUT_S[name] * (3 if args.smoke else 1), left)
    if timeout < 5:
      out.emit({"stage": name, "status": "skipped", "reason": "budget spent"})
      continue
    cmd = [sys.executable, os.path.abspath(__file__), f"--stage={name}",
           f"--out_dir={args.out_dir}", f"--train_moe_impl={args.train_moe_impl}",
           f"--train_attention_impl={args.train_attention_impl}"] + (
               ["--smoke"] if args.smoke else [])
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
      status = "ok" if proc.returncode == 0 else "failed"
      tail = proc.stderr[-1500:] if proc.returncode else ""
      rc = proc.returncode
    except subprocess.TimeoutExpired as e:
      status, rc = "timeout", None
      tail = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))[-1500:]
    out.emit({"stage": name, "status": status, "rc": rc, "seconds": time.perf_counter() - t0,
              "timeout_s": timeout, **({"stderr_tail": tail} if tail else {})})
  out.emit({"stage": "end", "seconds": time.perf_counter() - start})
  return 0


if __name__ == "__main__":
  sys.exit(main())
