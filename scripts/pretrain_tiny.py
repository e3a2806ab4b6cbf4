r"""Pretrains the embedded tiny DeepSeek-V2 (`assets/tiny_deepseek_v2`) on the general corpus.

  python scripts/pretrain_tiny.py                        # 1200 steps; 105 min measured on a busy 2-core machine
  python scripts/pretrain_tiny.py --out=/tmp/tiny --steps=200
  python scripts/pretrain_tiny.py --preset=v2            # the :tiny_v2 base (below); resumable:
                                                         # rerun the same command to continue

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

`--preset=v2` (`assets/tiny_deepseek_v2_moe64`, the `:tiny_v2` preset): the base whose experts
can specialize, because its corpus has something to specialize on (docs/RESULTS.md,
"Testbeds"). ARCH_V2: 64 routed experts top-6 (V2-Lite's counts) of width d/4, 2 shared, an
8192-token tokenizer (`assets/tokenizer_v2`) trained on the multilingual, multi-genre corpus of
scripts/make_corpus.py (`data/corpus/train.jsonl.gz`: 9 genres, ~100 languages). The balance
loss during pretraining is DeepSeek's over the whole batch (`seq_aux=False`) at
PRETRAIN_BALANCE_ALPHA_V2: a per-sequence balance loss asks every 1024-token window (one
document, one genre) to spread over all experts, the opposite of specialization. config.json
keeps V2-Lite's fine-tuning values (seq_aux, alpha 0.001). Each step's windows come from a
generator seeded by (seed, step), and the run writes `workdir/<out name>.ckpt/` (weights, Adam
state, log; safetensors + JSON) every `--checkpoint_every` steps, so a stopped run continues where it
stopped with the same curve: rerun the same command. Besides the validation windows, the loss on
the held-out general documents (`data/corpus/heldout.jsonl.gz`) is reported per genre.
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

sys.path.insert(0, os.path.join(REPO, "scripts"))
import make_corpus  # noqa: E402

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
# The :tiny_v2 base: V2-Lite's expert counts (64 routed, top-6, 2 shared) at d_model 128.
ARCH_V2 = dict(ARCH, vocab_size=8192, moe_intermediate_size=32, n_routed_experts=64,
               num_experts_per_tok=6)
# Batch-level (seq_aux=False) during pretraining. Chosen on the base's premise alone
# (docs/RESULTS.md "Testbeds": 0.01 over 300 steps routes more specifically than 0.003 over 600).
PRETRAIN_BALANCE_ALPHA_V2 = 0.01
PRESETS = {
    "v1": dict(arch=ARCH, balance_alpha=PRETRAIN_BALANCE_ALPHA, balance_seq_aux=True,
               out=os.path.join(REPO, "assets", "tiny_deepseek_v2"),
               corpus=os.path.join(REPO, "data", "general", "train.txt"),
               heldout=os.path.join(REPO, "data", "general", "heldout.txt"),
               tokenizer=os.path.join(REPO, "assets", "tokenizer"), steps=1500),
    "v2": dict(arch=ARCH_V2, balance_alpha=PRETRAIN_BALANCE_ALPHA_V2, balance_seq_aux=False,
               out=os.path.join(REPO, "assets", "tiny_deepseek_v2_moe64"),
               corpus=os.path.join(REPO, "data", "corpus", "train.jsonl.gz"),
               heldout=os.path.join(REPO, "data", "corpus", "heldout.jsonl.gz"),
               tokenizer=os.path.join(REPO, "assets", "tokenizer_v2"), steps=300),
}


def portable_args(args) -> dict:
  """The flags as the log records them: paths inside the repository relative to its root, so a
  log (shipped beside the weights) and a checkpoint's resume check do not depend on where the
  repository was cloned."""
  out = dict(vars(args))
  for key in ("out", "corpus", "heldout", "tokenizer", "checkpoint_dir"):
    path = out.get(key)
    if path and os.path.isabs(path):
      rel = os.path.relpath(path, REPO)
      out[key] = path if rel.startswith("..") else rel
  return out


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


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
  """The ids `tokenizer(texts, add_special_tokens=False)["input_ids"]` gives, from the Rust
  tokenizer's encode_batch_fast, which computes no character offsets: a third less time over
  the 4.1 M-token v2 corpus (tests/test_pretrain.py compares the two)."""
  return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(
      texts, add_special_tokens=False)]


def encode_corpus(path: str, tokenizer) -> np.ndarray:
  """The corpus as one token stream: a text file as is, or make_corpus's documents (.jsonl.gz)
  each followed by <eos>."""
  if not path.endswith(".jsonl.gz"):
    with open(path, encoding="utf-8") as f:
      return np.asarray(encode(tokenizer, [f.read()])[0], np.int32)
  docs = make_corpus.read_docs(path)
  ids = encode(tokenizer, [d["text"] for d in docs])
  eos = [tokenizer.eos_token_id]
  return np.asarray([t for doc in ids for t in doc + eos], np.int32)


def genre_rows(path: str, tokenizer, seq_len: int) -> dict:
  """genre -> (rows [N, seq_len] int32, loss mask [N, seq_len]): each genre's held-out
  documents as one stream (<eos> between documents) cut into <bos> + (seq_len - 1)-token rows;
  the last row is padded and masked."""
  by_genre = {}
  for d in make_corpus.read_docs(path):
    by_genre.setdefault(d["genre"], []).append(d["text"])
  out, n = {}, seq_len - 1
  for genre in sorted(by_genre):
    ids = encode(tokenizer, by_genre[genre])
    stream = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
    count = -(-len(stream) // n)
    rows = np.full((count, seq_len), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((count, seq_len), np.float32)
    rows[:, 0] = tokenizer.bos_token_id
    for r in range(count):
      chunk = stream[r * n:(r + 1) * n]
      rows[r, 1:1 + len(chunk)] = chunk
      mask[r, 1:1 + len(chunk)] = 1
    out[genre] = (rows, mask)
  return out


def _flat(prefix: str, tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(k): np.ascontiguousarray(jax.device_get(v))
          for k, v in leaves}


def _unflat(prefix: str, template, tensors: dict, path: str):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = []
  for k, v in leaves:
    key = prefix + jax.tree_util.keystr(k)
    if key not in tensors:
      raise ValueError(f"{path}: checkpoint lacks {key} (written by another architecture?)")
    # (np.ascontiguousarray stores a scalar, e.g. Adam's count, as shape [1])
    value = tensors[key].reshape(np.shape(v)) if tensors[key].size == np.size(v) else tensors[key]
    if value.shape != np.shape(v) or value.dtype != np.asarray(v).dtype:
      raise ValueError(f"{path}: {key} is {tensors[key].dtype}{list(tensors[key].shape)}, this "
                       f"run expects {np.asarray(v).dtype}{list(np.shape(v))}")
    out.append(jnp.asarray(value))
  return jax.tree_util.tree_unflatten(treedef, out)


def save_checkpoint(ckpt_dir: str, state: dict, params, opt_state, best_params):
  """<ckpt_dir>/state.safetensors (float32 weights, Adam state, best weights so far) and
  state.json (step, best, log), replaced atomically: a run killed while saving keeps the last
  complete checkpoint."""
  from safetensors.numpy import save_file
  tmp = ckpt_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  tensors = {**_flat("params", params), **_flat("opt", opt_state)}
  if best_params is not None:
    tensors.update(_flat("best", best_params))
  save_file(tensors, os.path.join(tmp, "state.safetensors"))
  with open(os.path.join(tmp, "state.json"), "w") as f:
    json.dump(state, f)
  old = ckpt_dir + ".old"
  if os.path.isdir(ckpt_dir):
    os.replace(ckpt_dir, old)
  os.replace(tmp, ckpt_dir)
  shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: str, params, opt_state):
  """(state, params, opt_state, best_params) of <ckpt_dir>, shaped like the templates."""
  from safetensors.numpy import load_file
  path = os.path.join(ckpt_dir, "state.safetensors")
  tensors = load_file(path)
  with open(os.path.join(ckpt_dir, "state.json")) as f:
    state = json.load(f)
  best = (_unflat("best", params, tensors, path)
          if any(k.startswith("best") for k in tensors) else None)
  return (state, _unflat("params", params, tensors, path),
          _unflat("opt", opt_state, tensors, path), best)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="v1",
                 help="v1: the :tiny base (Shakespeare + CPython); v2: the :tiny_v2 base")
  p.add_argument("--out", default=None, help="HF directory written (default: the preset's)")
  p.add_argument("--corpus", default=None)
  p.add_argument("--heldout", default=None)
  p.add_argument("--tokenizer", default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=None, help="schedule length (default: preset's)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--stop_after", type=int, default=0,
                 help="stop after this many steps of the full schedule (reproducibility checks); "
                      "nothing is saved")
  p.add_argument("--checkpoint_every", type=int, default=100,
                 help="v2: steps between resumable checkpoints (workdir/<out name>.ckpt, or "
                      "--checkpoint_dir)")
  p.add_argument("--checkpoint_dir", default=None)
  p.add_argument("--until", type=int, default=0,
                 help="v2: checkpoint and exit after this step (a partial run; rerun to continue)")
  p.add_argument("--fresh", action="store_true", help="v2: ignore an existing checkpoint")
  p.add_argument("--balance_alpha", type=float, default=None,
                 help="balance-loss weight during pretraining (default: the preset's)")
  p.add_argument("--balance_seq_aux", type=int, choices=(0, 1), default=None,
                 help="1: per-sequence balance loss, 0: over the batch (default: the preset's)")
  p.add_argument("--export", action="store_true",
                 help="v2: no training; write --out from the newest checkpoint's weights (the "
                      "base of a partial run, its log marked complete=false)")
  args = p.parse_args(argv)
  preset = PRESETS[args.preset]
  for key in ("out", "corpus", "heldout", "tokenizer", "steps"):
    if getattr(args, key) is None:
      setattr(args, key, preset[key])
  arch, v2 = preset["arch"], args.preset == "v2"
  balance_alpha = preset["balance_alpha"] if args.balance_alpha is None else args.balance_alpha
  balance_seq_aux = (preset["balance_seq_aux"] if args.balance_seq_aux is None
                     else bool(args.balance_seq_aux))
  cpu0, wall0 = time.process_time(), time.perf_counter()
  run_args = portable_args(args)

  from desmoe_jax.data import load_tokenizer
  tokenizer = load_tokenizer(args.tokenizer)
  ids = encode_corpus(args.corpus, tokenizer)
  train_starts, val_rows = corpus_windows(ids, args.seq_len, tokenizer.bos_token_id)
  print(f"corpus {len(ids)} tokens; {len(val_rows)} validation windows of {args.seq_len}",
        flush=True)

  # Pretraining may balance over the batch (v2); config.json keeps the arch's (fine-tuning) value.
  cfg = ModelConfig.make(**dict(arch, seq_aux=balance_seq_aux), dtype="float32",
                         param_dtype="float32", moe_impl="auto", scan_layers=True, remat="none")
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
  balance_scale = balance_alpha / cfg.aux_loss_alpha

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

  def as_batches(rows, masks=None):
    out = []
    for i in range(0, len(rows), args.batch):
      chunk = rows[i:i + args.batch]
      tokens = np.zeros((args.batch, args.seq_len), np.int32)
      mask = np.zeros((args.batch, args.seq_len), np.float32)
      tokens[:len(chunk)] = chunk
      if masks is None:
        mask[:len(chunk), 1:] = 1
      else:
        mask[:len(chunk)] = masks[i:i + args.batch]
      out.append({"tokens": tokens, "loss_mask": mask})
    return out

  val_batches = as_batches(val_rows)
  rng = np.random.default_rng(args.seed)
  n = args.seq_len - 1
  log = {"args": run_args, "arch": arch, "parameters": int(n_params), "train_loss": [],
         "validation": [], "cpu_s": 0.0, "wall_s": 0.0}
  best = (np.inf, -1, None)
  # Checkpoints are build outputs, never shipped: under the git-ignored workdir/.
  ckpt_dir = args.checkpoint_dir or os.path.join(
      REPO, "workdir", os.path.basename(args.out.rstrip("/")) + ".ckpt")
  first = 1
  if v2 and not args.stop_after and not args.fresh and os.path.exists(
      os.path.join(ckpt_dir, "state.json")):
    saved, params, opt_state, best_params = load_checkpoint(ckpt_dir, params, opt_state)
    same = {k: v for k, v in saved["log"]["args"].items() if k not in
            ("until", "fresh", "checkpoint_dir", "checkpoint_every", "eval_every", "out",
                 "export")}
    now = {k: v for k, v in run_args.items() if k in same}
    if same != now:
      raise ValueError(f"{ckpt_dir} was written by another run ({same}); this one is {now}: "
                       f"pass --fresh or another --checkpoint_dir")
    log = saved["log"]
    log["args"] = run_args
    best = (saved["best_validation"], saved["best_step"], best_params)
    first = saved["step"] + 1
    print(f"resumed {ckpt_dir} at step {saved['step']}", flush=True)

  def export(weights, out_dir):
    """`weights` as an HF directory in bfloat16 (like DeepSeek's own checkpoints: 10 MB instead
    of 20), with the arch's own config.json (v2 pretrains with a batch-level balance loss)."""
    export_model = init_model(ModelConfig.make(**arch, dtype="float32", param_dtype="float32",
                                               moe_impl="auto", scan_layers=True,
                                               remat="none"), seed=args.seed)
    nnx.update(export_model, weights)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    save_pretrained(export_model, out_dir, dtype=jnp.bfloat16)
    copy_tokenizer(args.tokenizer, out_dir)

  def checkpoint(step):
    log["cpu_s"] += time.process_time() - cpu_t[0]
    log["wall_s"] += time.perf_counter() - wall_t[0]
    cpu_t[0], wall_t[0] = time.process_time(), time.perf_counter()
    save_checkpoint(ckpt_dir, {"step": step, "best_validation": best[0], "best_step": best[1],
                               "log": log}, params, opt_state, best[2])
    # The current weights as an HF directory: the premise can be measured on it mid-run
    # (scripts/reproduce_paper.py --premise --config=tiny_v2 --model=<ckpt>/hf).
    export(params, os.path.join(ckpt_dir, "hf"))

  cpu_t, wall_t = [cpu0], [wall0]
  t0 = time.perf_counter()
  last = args.stop_after or args.steps
  if args.export:
    if first == 1:
      raise FileNotFoundError(f"--export: no checkpoint in {ckpt_dir}")
    last = first - 1   # no training: the loop below does not run
  for step in range(first, last + 1):
    # v2: the windows of step s depend on (seed, s) alone, so a resumed run draws the same.
    step_rng = np.random.default_rng([args.seed, step]) if v2 else rng
    starts = step_rng.choice(train_starts, size=args.batch)
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
            f"{(time.perf_counter() - t0) / (step - first + 1):.2f} s/step", flush=True)
    if v2 and not args.stop_after and (step % args.checkpoint_every == 0 or step == args.until):
      checkpoint(step)
      if step == args.until:
        print(f"stopped at step {step}; rerun the same command (without --until) to continue",
              flush=True)
        return log
  log["cpu_s"] += time.process_time() - cpu_t[0]
  log["wall_s"] += time.perf_counter() - wall_t[0]
  if args.stop_after:
    print(json.dumps({"train_loss": log["train_loss"]}))
    return log

  val, step, best_params = best
  if args.export:   # a partial run: the newest weights (stopped_at_step), not the best
    # validated ones; best_* then name the newest validation pass
    step, val = log["validation"][-1] if log["validation"] else (None, float("nan"))
    best_params = params
    log.update(complete=False, stopped_at_step=first - 1)
  elif v2:
    log["complete"] = True
  if v2:
    per_genre = {}
    for genre, (rows, masks) in genre_rows(args.heldout, tokenizer, args.seq_len).items():
      batches = as_batches(rows, masks)
      per_genre[genre] = [mean_loss(best_params, batches), float(masks.sum())]
    total = sum(t for _, t in per_genre.values())
    log.update(heldout_general_loss=sum(l * t for l, t in per_genre.values()) / total,
               heldout_general_loss_per_genre={g: l for g, (l, _) in per_genre.items()},
               heldout_general_tokens_per_genre={g: t for g, (_, t) in per_genre.items()})
  else:
    heldout = text_loss_batches(args.heldout, tokenizer, seq_len=args.seq_len,
                                batch_size=args.batch, max_batches=1000)
    log["heldout_general_loss"] = mean_loss(best_params, heldout)
  log.update(best_step=step, best_validation=val)
  weights = f"step {first - 1}'s weights" if args.export else "its weights"
  print(f"best validation {val:.4f} at step {step} ({weights}); held-out general text "
        f"{log['heldout_general_loss']:.4f}", flush=True)
  for genre, loss in log.get("heldout_general_loss_per_genre", {}).items():
    print(f"  held-out {genre}: {loss:.4f}", flush=True)

  export(best_params, args.out)
  with open(os.path.join(args.out, "pretrain_log.json"), "w") as f:
    json.dump(log, f)
  print(f"saved {args.out}; {log['cpu_s']:.0f} CPU-s, {log['wall_s']:.0f} s wall in all",
        flush=True)
  return log


if __name__ == "__main__":
  main()
