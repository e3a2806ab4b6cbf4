r"""Pretrains the embedded tiny DeepSeek-V2 (`assets/tiny_deepseek_v2`) on the general corpus.

  python scripts/pretrain_tiny.py                        # 1200 steps; 105 min measured on a busy 2-core machine
  python scripts/pretrain_tiny.py --out=/tmp/tiny --steps=200

Why this model exists: the paper's claims (forgetting, per-domain quality, convergence) can only
be checked on a model that HAS general abilities to forget. DeepSeek-V2-Lite and a GPU cluster
are out of reach for most users, so we pretrain a DeepSeek-V2-architecture MoE ourselves, on the
"general" corpus only (`data/general/train.txt`: Shakespeare and CPython functions of modules the
`code` domain does not use; none of the six fine-tuning domains), and save it with
`save_pretrained` in the Hugging Face DeepSeek-V2 layout, so every experiment loads it through the
same converter a DeepSeek-V2-Lite user does.

Architecture (ARCH below), DeepSeek-V2-Lite in miniature: MLA attention with YaRN RoPE, the first
layer dense, then MoE layers of 2 shared + 32 fine-grained routed experts, top-4, softmax gates.
* 32 routed experts of width d/2 (V2-Lite: 64 of width 0.69 d), top-4 (1/8 of the experts
  active per token; V2-Lite: 6/64): enough experts for six domains to claim different subsets,
  which is what DES-MoE's masks and ESFT's selections act on.
* d_model 128, 4 layers (3 MoE): 4.04 M parameters, 8.1 MB in bfloat16 (the repository ships it),
  and a training step of 8 x 1024 tokens fast enough for the paper's experiments to run many
  times over on two CPU cores (scripts/reproduce_paper.py).
* The byte-level BPE tokenizer (4096 tokens, `scripts/train_tokenizer.py`) was trained on the same
  corpus, so it knows no Chinese: law and intent encode at ~3 tokens per character.

Training: next-token loss on random 1024-token windows (each starting with <bos>) of the corpus,
AdamW (b2 0.95, weight decay 0.1), linear warm-up then cosine decay, global-norm clipping 1.0,
and DeepSeek's balance loss at 0.01 during pretraining (10x the 0.001 written to config.json and
used when fine-tuning: a model this small otherwise lets experts die before the router has
learnt anything). One window in 32 of the corpus is held out as validation; the weights of the
evaluation with the lowest validation loss are saved (the corpus is ~0.5 M tokens, so the model
overfits if trained long enough). `data/general/heldout.txt` (plays never in the corpus) is
only reported, never used for a decision.

Deterministic: the same seed and flags give the same loss curve; `pretrain_log.json` beside the
weights records it, and tests/test_pretrain.py re-runs the first steps and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from desmoe_jax import train_step as ts  # noqa: E402
from desmoe_jax.config import ModelConfig  # noqa: E402
from desmoe_jax.convert import copy_tokenizer, save_pretrained  # noqa: E402
from desmoe_jax.data import text_loss_batches  # noqa: E402
from desmoe_jax.model import init_model  # noqa: E402

# HF config.json fields of the shipped model.
ARCH = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=512, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32,
    n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1, routed_scaling_factor=1.0,
    topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, aux_loss_alpha=0.001,
    seq_aux=True, rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024,
                      beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
PRETRAIN_BALANCE_ALPHA = 0.01
VALIDATION_EVERY = 32   # one window in 32 of the corpus is validation


def corpus_windows(ids: np.ndarray, seq_len: int, bos: int):
  """Cuts the token stream into non-overlapping (seq_len - 1)-token windows and splits them
  into train / validation (every VALIDATION_EVERY-th). Train windows are later sampled at a
  random offset inside [start, start + 2 windows) so the model sees every position of the text."""
  n = seq_len - 1
  starts = np.arange(0, len(ids) - 2 * n, n)
  is_val = (np.arange(len(starts)) % VALIDATION_EVERY) == VALIDATION_EVERY // 2
  val_rows = np.stack([np.concatenate([[bos], ids[s:s + n]]) for s in starts[is_val]])
  # A train window may start anywhere that does not reach into a validation window.
  val_spans = [(s, s + n) for s in starts[is_val]]
  ok = np.ones(len(ids), bool)
  for s, e in val_spans:
    ok[max(0, s - n + 1):e] = False
  ok[len(ids) - n:] = False
  train_starts = np.nonzero(ok)[0]
  return train_starts, val_rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "assets", "tiny_deepseek_v2"))
  p.add_argument("--corpus", default=os.path.join(REPO, "data", "general", "train.txt"))
  p.add_argument("--heldout", default=os.path.join(REPO, "data", "general", "heldout.txt"))
  p.add_argument("--tokenizer", default=os.path.join(REPO, "assets", "tokenizer"))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--stop_after", type=int, default=0,
                 help="stop after this many steps of the full schedule (reproducibility checks); "
                      "nothing is saved")
  args = p.parse_args(argv)

  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
  with open(args.corpus, encoding="utf-8") as f:
    ids = np.asarray(tokenizer(f.read(), add_special_tokens=False)["input_ids"], np.int32)
  train_starts, val_rows = corpus_windows(ids, args.seq_len, tokenizer.bos_token_id)
  print(f"corpus {len(ids)} tokens; {len(val_rows)} validation windows of {args.seq_len}",
        flush=True)

  cfg = ModelConfig.make(**ARCH, dtype="float32", param_dtype="float32", moe_impl="auto",
                         scan_layers=True, remat="none")
  model = init_model(cfg, seed=args.seed)
  graphdef, state = nnx.split(model)
  params, rest = nnx.split_state(state, nnx.Param, ...)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"{n_params / 1e6:.2f} M parameters", flush=True)

  lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps,
                                          end_value=args.lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1))
  opt_state = tx.init(params)
  balance_scale = PRETRAIN_BALANCE_ALPHA / cfg.aux_loss_alpha

  @jax.jit
  def train_step(params, opt_state, tokens):
    def loss_fn(params):
      out = nnx.merge(graphdef, params, rest)(tokens)
      nll = ts.token_losses(out.logits, tokens)[:, 1:].mean()
      return nll + balance_scale * out.aux_loss, nll
    (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll

  @jax.jit
  def eval_loss(params, tokens, loss_mask):
    out = nnx.merge(graphdef, params, rest)(tokens)
    nll = ts.token_losses(out.logits, tokens)
    return jnp.sum(nll * loss_mask), jnp.sum(loss_mask)

  def mean_loss(params, batches):
    s = n = 0.0
    for b in batches:
      a, c = eval_loss(params, b["tokens"], b["loss_mask"])
      s, n = s + float(a), n + float(c)
    return s / n

  def as_batches(rows):
    out = []
    for i in range(0, len(rows), args.batch):
      chunk = rows[i:i + args.batch]
      tokens = np.zeros((args.batch, args.seq_len), np.int32)
      mask = np.zeros((args.batch, args.seq_len), np.float32)
      tokens[:len(chunk)] = chunk
      mask[:len(chunk), 1:] = 1
      out.append({"tokens": tokens, "loss_mask": mask})
    return out

  val_batches = as_batches(val_rows)
  rng = np.random.default_rng(args.seed)
  n = args.seq_len - 1
  log = {"args": vars(args), "arch": ARCH, "parameters": int(n_params), "train_loss": [],
         "validation": []}
  best = (np.inf, -1, None)
  t0 = time.perf_counter()
  last = args.stop_after or args.steps
  for step in range(1, last + 1):
    starts = rng.choice(train_starts, size=args.batch)
    tokens = np.stack([np.concatenate([[tokenizer.bos_token_id], ids[s:s + n]]) for s in starts])
    params, opt_state, nll = train_step(params, opt_state, tokens)
    log["train_loss"].append(float(nll))
    # --stop_after saves nothing, so no best weights to pick: no validation pass at its end.
    if step % args.eval_every == 0 or (step == last and not args.stop_after):
      val = mean_loss(params, val_batches)
      log["validation"].append([step, val])
      if val < best[0]:
        best = (val, step, jax.device_get(params))
      print(f"step {step:5d}  train {float(nll):.4f}  validation {val:.4f}  "
            f"{(time.perf_counter() - t0) / step:.2f} s/step", flush=True)
  log["wall_s"] = time.perf_counter() - t0
  if args.stop_after:
    print(json.dumps({"train_loss": log["train_loss"]}))
    return log

  val, step, best_params = best
  heldout = text_loss_batches(args.heldout, tokenizer, seq_len=args.seq_len,
                              batch_size=args.batch, max_batches=1000)
  log.update(best_step=step, best_validation=val,
             heldout_general_loss=mean_loss(best_params, heldout))
  print(f"best validation {val:.4f} at step {step}; held-out general text "
        f"{log['heldout_general_loss']:.4f}", flush=True)

  nnx.update(model, best_params)
  # Written in bfloat16, like DeepSeek's own checkpoints: 8 MB instead of 17.
  if os.path.isdir(args.out):
    shutil.rmtree(args.out)
  save_pretrained(model, args.out, dtype=jnp.bfloat16)
  copy_tokenizer(args.tokenizer, args.out)
  with open(os.path.join(args.out, "pretrain_log.json"), "w") as f:
    json.dump(log, f)
  print(f"saved {args.out}", flush=True)
  return log


if __name__ == "__main__":
  main()
