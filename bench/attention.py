"""Forward+backward wall time of the attention core of the tiny DeepSeek-V2, desmoe_jax against
torch: softmax(q k^T * scale, causal) v with MLA's head dims (q/k 48, v 32, 4 heads, as in
`assets/tiny_deepseek_v2`), one layer, float32.

Candidates, built from the same q, k, v and output cotangent:
  * desmoe_jax `attention_mla.dot_product_attention` under `jax.jit`, `impl="blocked"` (the
    default: on CPU the C++ kernel of nn/cpu_attention.py), `impl="blocked_xla"`
    (nn/blocked_attention.py) and `impl="einsum"` (the reference);
  * torch `scaled_dot_product_attention`, with `is_causal=True` and with the boolean causal mask
    (what transformers' DeepseekV2 passes in training: its profile shows the unfused
    `_scaled_dot_product_attention_math` path), `torch.set_num_threads(2)`.
Outputs and gradients are checked to agree before anything is timed. The candidates run round
robin (bench/train_step.py's `alternate`), median over rounds. The last line is
`speedup_vs_torch: X.XX`: torch's faster median over the blocked attention's.

  python bench/attention.py                    # 2 x 1024 tokens, the frontier's shape
  python bench/attention.py --shape=4x1024 --reps=15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from desmoe_jax.nn.attention_mla import attention_mask, dot_product_attention  # noqa: E402
from train_step import alternate  # noqa: E402

HEADS, QK_DIM, V_DIM = 4, 48, 32   # assets/tiny_deepseek_v2: 4 heads, qk 32 + 16 rope, v 32
SCALE = QK_DIM ** -0.5


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="2x1024", help="batch x seq")
  p.add_argument("--reps", type=int, default=10, help="timed rounds")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--torch", type=int, default=1, help="0: ours only (no ratio)")
  return p.parse_args(argv)


def inputs(b, s, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32)
          for shape in ((b, s, HEADS, QK_DIM), (b, s, HEADS, QK_DIM), (b, s, HEADS, V_DIM),
                        (b, s, HEADS, V_DIM))]


def build_jax(impl, q, k, v, cot):
  """() -> (out, dq, dk, dv) as numpy, [B, S, H, D] like the inputs."""
  mask = attention_mask(jnp.ones(q.shape[:2], jnp.int32))    # causal, one document per row

  def loss(q, k, v, mask, cot):
    return (dot_product_attention(q, k, v, mask, SCALE, impl) * cot).sum()

  # The mask is an argument, not a constant XLA would fold at compile time.
  fn = jax.jit(lambda q, k, v, mask, cot: (dot_product_attention(q, k, v, mask, SCALE, impl),
                                           *jax.grad(loss, argnums=(0, 1, 2))(q, k, v, mask,
                                                                              cot)))
  args = [jnp.asarray(a) for a in (q, k, v)] + [mask, jnp.asarray(cot)]
  return lambda: [np.asarray(x) for x in jax.block_until_ready(fn(*args))]


def build_torch(causal_flag, q, k, v, cot):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  heads_first = lambda a: torch.from_numpy(a).transpose(1, 2).contiguous()
  qt, kt, vt = (heads_first(a).requires_grad_() for a in (q, k, v))
  cot_t = heads_first(cot)
  s = q.shape[1]
  mask = None if causal_flag else torch.ones(s, s, dtype=torch.bool).tril()[None, None]

  def run():
    for t in (qt, kt, vt):
      t.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, is_causal=causal_flag, scale=SCALE)
    (out * cot_t).sum().backward()
    back = lambda t: t.detach().transpose(1, 2).numpy()
    return [back(out), back(qt.grad), back(kt.grad), back(vt.grad)]

  return run


def main(argv=None):
  args = parse_args(argv)
  b, s = (int(x) for x in args.shape.split("x"))
  q, k, v, cot = inputs(b, s)
  cands = {"jax blocked": build_jax("blocked", q, k, v, cot),
           "jax blocked_xla": build_jax("blocked_xla", q, k, v, cot),
           "jax einsum": build_jax("einsum", q, k, v, cot)}
  if args.torch:
    cands["torch sdpa is_causal"] = build_torch(True, q, k, v, cot)
    cands["torch sdpa bool mask"] = build_torch(False, q, k, v, cot)
  ref = cands["jax einsum"]()
  for name, fn in cands.items():
    for got, want, what in zip(fn(), ref, ("out", "dq", "dk", "dv")):
      np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4, err_msg=f"{name} {what}")
  times = alternate(cands, args.reps, args.warmup, block=1)
  print(f"attention fwd+bwd, {b} x {s} tokens, {HEADS} heads, qk {QK_DIM}, v {V_DIM}, float32, "
        f"jax {jax.__version__} ({jax.default_backend()})")
  med = {n: statistics.median(t) for n, t in times.items()}
  for n, t in med.items():
    print(f"  {n:<22}{1e3 * t:8.1f} ms  (median of {len(times[n])})")
  if args.torch:
    torch_best = min(t for n, t in med.items() if n.startswith("torch"))
    print(f"speedup_vs_torch: {torch_best / med['jax blocked']:.2f}")


if __name__ == "__main__":
  main()
