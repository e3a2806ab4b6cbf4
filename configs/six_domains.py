r"""DES-MoE on six domains (METHOD.md): the paper's setting, and presets.

  python train.py --config=configs/six_domains.py --config.model.path=/path/to/DeepSeek-V2-Lite
  python train.py --config=configs/six_domains.py:tiny            # embedded tiny model, CPU
  python train.py --config=configs/six_domains.py:tiny,fft        # any method as a preset
  python train.py --config=configs/six_domains.py:tiny --config.train.steps=50 --config.dges.phi=0.5

Config string: comma-separated presets after ':', a size ("tiny"; none = the paper's
DeepSeek-V2-Lite setting) and/or a method (desmoe, fft, esft_token, esft_gate, desmoe_no_alr,
desmoe_no_dges, desmoe_no_schedule). Every field below can be overridden on the command line.
"""

import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("desmoe", "fft", "esft_token", "esft_gate", "desmoe_no_alr", "desmoe_no_dges",
           "desmoe_no_schedule")
# The paper's learning rates (METHOD.md): DES-MoE 1e-4, ESFT 1e-5, FFT 3e-5.
PAPER_LR = {"fft": 3e-5, "esft_token": 1e-5, "esft_gate": 1e-5}
DOMAINS = ("math", "code", "law", "intent", "summary", "translation")


# Task metric of each domain (see desmoe_jax/metrics.py).
METRICS = {"math": "number_match", "code": "pass_at_1", "law": "law_label",
           "intent": "json_match", "summary": "rouge_l", "translation": "bleu"}


def _domain(name, folder=None, weight=1.0):
  folder = os.path.join(REPO, "data", folder or name)
  d = ml_collections.ConfigDict()
  d.name = name                                          # domain name (id = position in list)
  d.train = os.path.join(folder, "train.jsonl")          # JSONL/parquet path or hub dataset
  d.eval = os.path.join(folder, "eval.jsonl")            # held-out examples with answers
  d.format = "auto"                                      # "messages" | "prompt_response" | "auto"
  d.weight = weight                                      # mixing weight of this domain
  d.metric = METRICS[name]                               # task metric used by eval.py
  return d


def get_config(presets: str = "") -> ml_collections.ConfigDict:
  tokens = [t for t in presets.split(",") if t]
  unknown = [t for t in tokens if t not in METHODS + ("tiny",)]
  if unknown:
    raise ValueError(f"unknown preset(s) {unknown}; known: tiny, {', '.join(METHODS)}")
  tiny = "tiny" in tokens
  methods = [t for t in tokens if t in METHODS]
  if len(methods) > 1:
    raise ValueError(f"give at most one method preset, got {methods}")

  c = ml_collections.ConfigDict()
  c.method = methods[0] if methods else "desmoe"  # desmoe | fft | esft_* | desmoe_no_* ablations
  c.seed = 0                                      # model init of new parts, data order

  c.model = ml_collections.ConfigDict()
  # HF DeepSeek-V2 directory (config.json, safetensors, tokenizer). Required for the paper preset.
  c.model.path = os.path.join(REPO, "assets", "tiny_deepseek_v2") if tiny else ""
  c.model.dtype = "float32" if tiny else "bfloat16"        # activations / compute
  c.model.param_dtype = "float32" if tiny else "bfloat16"  # weights and optimizer moments
  c.model.moe_impl = "auto"         # auto | dense | ragged | tiled (auto: tiled on CPU, ragged else)
  # compiler | shard_map: with mesh.expert > 1, XLA partitions the routed-expert dispatch, or
  # shard_map exchanges token rows between expert devices explicitly (all-to-all, no token
  # dropped; buffers ~mesh.expert x the layer's token rows, see desmoe_jax/expert_parallel.py)
  c.model.expert_parallel = "compiler"
  c.model.attention_impl = "einsum"  # einsum | jax (jax.nn.dot_product_attention, cuDNN on GPU)
  c.model.remat = "none" if tiny else "full"  # none | full | dots: rematerialise each MoE layer
  c.model.scan_layers = True        # lax.scan over MoE layers (fast compile); False unrolls

  c.data = ml_collections.ConfigDict()
  # The six domains, in domain-id order. Summary: the paper's (ESFT's Chinese dialogues) needs a
  # long context, so the tiny preset uses English package descriptions instead (data/README.md).
  c.data.domains = [_domain(n, "summary" if (n == "summary" and tiny) else
                            "summary_esft" if n == "summary" else n) for n in DOMAINS]
  c.data.general = os.path.join(REPO, "data", "general", "heldout.txt")  # forgetting: text loss
  c.data.general_mc = os.path.join(REPO, "data", "general", "mc.jsonl")  # forgetting: MC score
  c.data.seq_len = 1024 if tiny else 4096  # packed sequence length (tokens)
  c.data.batch_size = 4 if tiny else 32    # global batch, sequences per step
  c.data.max_bad_fraction = 0.1  # a domain with more bad rows than this (of those read) is an error

  c.train = ml_collections.ConfigDict()
  c.train.steps = 120 if tiny else 500     # total optimizer steps T (phases are fractions of T)
  c.train.log_every = 5                    # steps between log lines / metric records
  c.train.eval_every = 60 if tiny else 100  # steps between evaluations (0: only at the end)
  c.train.checkpoint_every = 40 if tiny else 100  # steps between checkpoints
  c.train.keep_checkpoints = 3             # newest checkpoints kept
  c.train.async_checkpoint = True          # save in the background
  c.train.heatmap_layers = 4               # MoE layers drawn in the correlation heatmaps
  c.train.nan_check = True                 # stop on a non-finite loss (keeps last good checkpoint)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = -1.0             # -1: the paper's value for the method (see PAPER_LR)
  c.optim.schedule = "linear"              # linear (decay to 0) | cosine | constant
  c.optim.warmup_steps = 0                 # linear warm-up steps
  c.optim.weight_decay = 0.1               # AdamW decoupled weight decay (ESFT's)
  c.optim.b1 = 0.9                         # Adam beta1
  c.optim.b2 = 0.95                        # Adam beta2 (ESFT's)
  c.optim.eps = 1e-8                       # Adam epsilon
  c.optim.grad_clip = 1.0                  # global-norm clipping; 0 disables
  if tiny:
    c.optim.learning_rate = 3e-3 if c.method not in PAPER_LR else 1e-3

  c.alr = ml_collections.ConfigDict()
  c.alr.form = "residual"       # residual (exact at init) | mlp (the paper's plain MLP)
  c.alr.hidden_mult = 4         # ALR hidden width in units of d_model
  c.alr.tau = 0.7               # distillation temperature
  c.alr.loss = "convex"         # convex: router grad = (1-l) task + l KD | additive
  c.alr.beta = 1.0              # KD weight for loss=additive
  c.alr.tau_squared = False     # multiply the KD loss by tau^2

  c.dges = ml_collections.ConfigDict()
  c.dges.momentum = 0.9         # weight of the old value in the correlation update
  c.dges.phi = 0.6              # mask threshold
  c.dges.score = "relative"     # relative (A / row max >= phi) | cumulative (top-p)
  c.dges.update_every = 10      # T_update: steps between mask refreshes
  c.dges.duplicate_shared_experts = False  # duplicate experts owned by several domains
  c.dges.max_copies = 8         # per-layer capacity of the duplicated-expert bank

  c.schedule = ml_collections.ConfigDict()
  c.schedule.t1 = 0.2           # end of phase I (warm-up) as a fraction of train.steps
  c.schedule.t2 = 0.7           # end of phase II (stabilization)
  c.schedule.warmup_trains = "router+backbone"  # router+backbone (Eq. 11) | router+experts | all

  c.esft = ml_collections.ConfigDict()
  c.esft.top_p = -1.0           # -1: 0.1 for esft_gate, 0.2 for esft_token (the paper's)
  c.esft.sample_tokens = 8192   # tokens per domain used to score experts
  c.esft.domain = -1            # -1: all domains, union of masks; d: single-domain ESFT on d
  c.esft.train_shared_experts = False      # ESFT's --train_shared_experts
  c.esft.train_non_expert_modules = False  # ESFT's --train_non_expert_modules

  c.ablation = ml_collections.ConfigDict()
  c.ablation.linear_router_trainable = True  # desmoe_no_alr: train the linear router (else frozen)
  c.ablation.balance_loss = True             # add DeepSeek's balance loss (aux_loss_alpha)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1               # data-parallel axis size
  c.mesh.fsdp = -1              # fully-sharded axis (-1: all remaining devices)
  c.mesh.expert = 1             # expert-parallel axis (routed experts split over it)
  c.mesh.tensor = 1             # tensor-parallel axis

  c.eval = ml_collections.ConfigDict()
  c.eval.max_examples = 32 if tiny else 200  # per domain, for generation metrics
  c.eval.max_new_tokens = 64 if tiny else 256  # greedy generation budget
  c.eval.batch_size = 16        # generation batch
  c.eval.loss_batches = 4 if tiny else 20  # packed batches per domain for held-out loss
  c.eval.general_batches = -1   # batches of general text for forgetting (-1: loss_batches; 0: all)
  c.eval.code_timeout = 5.0     # seconds per HumanEval program (sandboxed subprocess)
  # pass@1 runs model-written code: off unless asked for (then reported as not run, never as 0).
  # When on, each program runs isolated (desmoe_jax/sandbox.py: own pid/mount/network
  # namespaces, read-only filesystem, non-root uid); a machine that cannot isolate refuses...
  c.eval.allow_code_execution = False
  c.eval.allow_unisolated_code_execution = False  # ...unless this is set too (limits only)

  c.export = ml_collections.ConfigDict()
  c.export.enabled = True       # write <workdir>/hf (HF layout; the ALR folded, copies merged)
  # The ALR is folded into a linear router by least squares on the model's mesh, from the
  # first fold_tokens real tokens of the held-out sets (default: one paper batch, 64 tokens
  # per unknown of a V2-Lite router column); the folded routing is checked against the
  # adapted one on at most check_tokens further tokens (desmoe_export.json reports both).
  c.export.fold_tokens = 131072
  c.export.check_tokens = 65536
  return c
