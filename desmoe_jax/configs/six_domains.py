r"""DES-MoE on six domains (docs/METHOD.md): the paper's setting, and presets.

  python train.py --config=configs/six_domains.py --config.model.path=/path/to/DeepSeek-V2-Lite
  python train.py --config=configs/six_domains.py:tiny            # embedded tiny model, CPU
  python train.py --config=configs/six_domains.py:tiny_v2         # its multilingual successor
  python train.py --config=configs/six_domains.py:tiny,fft        # any method as a preset
  python train.py --config=configs/six_domains.py:tiny --config.train.steps=50 --config.dges.phi=0.5
  desmoe-train --config=six_domains:tiny --workdir=DIR            # installed command, any folder

Config string: comma-separated presets after ':', a size ("tiny", "tiny_v2"; none = the paper's
DeepSeek-V2-Lite setting) and/or a method (desmoe, fft, esft_token, esft_gate, desmoe_no_alr,
desmoe_no_dges, desmoe_no_schedule, lora). Every field below can be overridden on the command line.
"""

import os

import ml_collections
from ml_collections import config_dict

from desmoe_jax.methods import METHODS
from desmoe_jax.paths import bundled

DOMAINS = ("math", "code", "law", "intent", "summary", "translation")
# Learning rates of the tiny presets per method (desmoe's for the DES-MoE family), see get_config.
# LoRA's is 10x FFT's, the rule of thumb for LoRA against full fine-tuning at the same
# schedule, fixed before any LoRA run (not tuned on an outcome).
TINY_LR = {"desmoe": 3e-4, "fft": 1e-4, "esft_token": 1e-3, "esft_gate": 1e-3, "lora": 1e-3}


# The tiny testbeds (docs/RESULTS.md, "Testbeds"): preset -> bundled base model. tiny: 32 experts
# pretrained on Shakespeare + CPython; tiny_v2: 64 experts top-6 on a multilingual,
# multi-genre corpus (scripts/make_corpus.py, scripts/pretrain_tiny.py --preset=v2).
TINY = {"tiny": "tiny_deepseek_v2", "tiny_v2": "tiny_deepseek_v2_moe64"}
GENERAL = {"tiny_v2": ("data", "corpus", "heldout.txt")}
GENRES = {"tiny_v2": ("data", "corpus", "heldout.jsonl.gz")}


# Task metric of each domain (see desmoe_jax/metrics.py).
METRICS = {"math": "number_match", "code": "pass_at_1", "law": "law_label",
           "intent": "json_match", "summary": "rouge_l", "translation": "bleu"}


def _domain(name, folder=None, weight=1.0):
  folder = bundled("data", folder or name)
  d = ml_collections.ConfigDict()
  d.name = name                                          # domain name (id = position in list)
  d.train = os.path.join(folder, "train.jsonl")          # JSONL/parquet/dir, or hf://owner/name
  d.eval = os.path.join(folder, "eval.jsonl")            # held-out examples with answers
  d.format = "auto"                                      # "messages" | "prompt_response" | "auto"
  d.prompt_field = "prompt"                              # column of the prompt
  d.response_field = "response"                          # column of the response
  d.messages_field = "messages"                          # column of the chat messages
  d.split = "train"                                      # split of `train` (a dataset directory)
  d.eval_split = "test"                                  # split of `eval` (a dataset directory)
  d.weight = weight                                      # mixing weight of this domain
  d.metric = METRICS[name]                               # task metric used by eval.py
  return d


def domain_defaults() -> ml_collections.ConfigDict:
  """The settings every domain group has beyond its identity (name, files, metric), with their
  defaults: what a config saved by an older version may lack."""
  d = _domain("math")
  return ml_collections.ConfigDict({k: v for k, v in d.items()
                                    if k not in ("name", "train", "eval", "metric")})


# One preset per machine people rent: the paper's 32 x 4096-token batch (through
# train.microbatches) with the memory levers that machine needs. docs/SCALING.md has the memory
# plan of each (TPU compiler) and why each lever is set; `scripts/memory_plan.py
# --config=desmoe_jax/configs/six_domains.py:<preset>` re-checks one before renting. Keys are config paths.
_LOCAL_DISPATCH = {  # what every V2-Lite preset shares (docs/SCALING.md, the temporaries)
    "model.remat": "full",
    "model.ce_chunk": 1024,                 # no [seq, 102400] float32 logits
    "model.expert_parallel": "shard_map",   # each device dispatches its own tokens
}
# How the weights and the optimizer state are stored: bfloat16 weights trained by stochastic
# rounding with bf16 moments (chips that cannot hold more), or float32 weights (the master
# copy) with float32 moments (chips that can). Either way the optimizer state lives in host
# memory and streams through the device one layer at a time (optim.host_offload): an update of
# the whole tree on the device holds several gradient-sized float32 temporaries (v5p-8 plan:
# temp 68-80 GiB per chip on the device, 37-52 GiB streamed; docs/SCALING.md).
_BF16_STATE_ON_HOST = {
    "train.precision": "bf16_sr", "model.param_dtype": "bfloat16",
    "optim.moments_dtype": "bfloat16", "optim.host_offload": True}
_FP32_STATE_ON_HOST = {
    "train.precision": "fp32_master", "model.param_dtype": "float32",
    "optim.moments_dtype": "float32", "optim.host_offload": True}
MACHINES = {
    # TPU v5e-8: 8 chips x 16 GiB. The bf16 weights (4.0 GiB per chip), one layer's moments
    # and the gradients fit (every phase of DES-MoE, FFT and ESFT; docs/SCALING.md).
    "v5e8": {**_LOCAL_DISPATCH, **_BF16_STATE_ON_HOST, "mesh.fsdp": 8, "train.microbatches": 4},
    # TPU v4-8: 4 chips (megacore) x 32 GiB: weights 7.9 GiB per chip.
    "v4_8": {**_LOCAL_DISPATCH, **_BF16_STATE_ON_HOST, "mesh.fsdp": 4, "train.microbatches": 8},
    # TPU v5p-8: 4 chips x 95 GiB: float32 weights (15.2 GiB per chip), float32 moments.
    "v5p8": {**_LOCAL_DISPATCH, **_FP32_STATE_ON_HOST, "mesh.fsdp": 4, "train.microbatches": 2},
    # 8 x H100 80 GB: float32 weights (7.6 GiB per GPU), float32 moments. XLA's GPU compiler
    # (compile-only): peaks 24-31 GiB of the 59 GiB JAX lets a program use (MoE dispatch "tiled").
    "8xh100": {**_LOCAL_DISPATCH, **_FP32_STATE_ON_HOST, "mesh.fsdp": 8,
               "train.microbatches": 2},
    # One H200 141 GB: bf16 weights (31 GB) and gradients on the GPU, the moments on the host.
    # One device, so the dispatch is not sharded: "compiler" lets moe_impl="auto" run tokamax's
    # grouped-GEMM kernel (peaks 89-93 of 106 GiB; shard_map's "tiled" loop: 43-66).
    "h200": {**_LOCAL_DISPATCH, **_BF16_STATE_ON_HOST, "mesh.fsdp": 1, "train.microbatches": 16,
             "model.expert_parallel": "compiler"},
}


def _apply_machine(c, machine: str):
  for key, value in MACHINES[machine].items():
    section, field = key.split(".")
    if field not in c[section]:
      raise KeyError(f"preset {machine}: {key} is not a config field")
    c[section][field] = value


def get_config(presets: str = "") -> ml_collections.ConfigDict:
  tokens = [t for t in presets.split(",") if t]
  unknown = [t for t in tokens if t not in METHODS + tuple(TINY) + tuple(MACHINES)]
  if unknown:
    raise ValueError(f"unknown preset(s) {unknown}; known: {', '.join(TINY)}, "
                     f"{', '.join(METHODS)}, machines {', '.join(MACHINES)}")
  sizes = [t for t in tokens if t in TINY]
  if len(sizes) > 1:
    raise ValueError(f"give at most one size preset, got {sizes}")
  tiny = bool(sizes)   # every tiny testbed shares the tiny settings; they differ in base model
  methods = [t for t in tokens if t in METHODS]
  if len(methods) > 1:
    raise ValueError(f"give at most one method preset, got {methods}")
  machines = [t for t in tokens if t in MACHINES]
  if len(machines) > 1 or (machines and tiny):
    raise ValueError(f"give at most one machine preset, and not with tiny: got {tokens}")

  c = ml_collections.ConfigDict()
  c.method = methods[0] if methods else "desmoe"  # desmoe | fft | esft_* | desmoe_no_* ablations
  c.seed = 0                                      # model init of new parts, data order

  c.model = ml_collections.ConfigDict()
  # HF DeepSeek-V2 directory (config.json, safetensors, tokenizer). Required for the paper preset.
  c.model.path = bundled("assets", TINY[sizes[0]]) if tiny else ""
  c.model.dtype = "float32" if tiny else "bfloat16"        # activations / compute
  # Storage dtype of the weights (routers and the ALR are always float32); must agree with
  # train.precision: float32 for fp32_master, bfloat16 for bf16_sr and bf16_master.
  c.model.param_dtype = "float32" if tiny else "bfloat16"
  # auto | dense | ragged | tokamax | tiled (auto: tiled on CPU, ragged on TPU, tokamax on one
  # GPU, tiled on a sharded GPU dispatch; desmoe_jax/moe/block.py says why)
  c.model.moe_impl = "auto"
  # compiler | shard_map: with mesh.expert > 1, XLA partitions the routed-expert dispatch, or
  # shard_map exchanges token rows between expert devices explicitly (all-to-all, no token
  # dropped; buffers ~mesh.expert x the layer's token rows, see desmoe_jax/moe/expert_parallel.py)
  c.model.expert_parallel = "compiler"
  # blocked (the einsum reference a block of causal queries at a time, scores recomputed in the
  # backward: desmoe_jax/nn/blocked_attention.py; on CPU in float32 a C++ kernel with the same
  # numbers, desmoe_jax/nn/cpu_attention.py; measured on CPU, bench/RESULTS.md) | blocked_xla
  # (blocked_attention.py, never the kernel) | einsum |
  # jax (jax.nn.dot_product_attention, cuDNN on GPU). The accelerator presets keep einsum: their
  # compiled memory plans (docs/SCALING.md) were made with it.
  c.model.attention_impl = "blocked" if tiny else "einsum"
  # What each MoE layer's backward recomputes: none | full | dots | dots_offload | full_offload
  # (the *_offload ones keep their residuals in host memory; desmoe_jax/config.py REMAT_POLICIES)
  c.model.remat = "none" if tiny else "full"
  # Cross-entropy over sequence chunks of this many positions (a divisor of data.seq_len), never
  # the [batch, seq, vocab] float32 logits (2.4 GiB per 4096-token sequence for V2-Lite's 102400
  # vocabulary); 0: the whole sequence as one chunk
  c.model.ce_chunk = 0
  # lax.scan over the MoE layers (one compiled body: the compile time of a deep model) or unrolled
  # (False). Tiny: unrolled, since autodiff then skips what no trained parameter needs, which a
  # scan's uniform body cannot (the first MoE layer's backward to its input when nothing below it
  # trains: DES-MoE after warm-up, ESFT): `python bench/train_step.py --scan_layers=1` against
  # the default, 2 x 1024 tokens on CPU, DES-MoE stabilization 5762 -> 6238 tok/s, ESFT-Token
  # 6461 -> 7815, FFT 4963 -> 4830 (noise); compile 4.7-7.6 s either way (bench/RESULTS.md).
  c.model.scan_layers = not tiny

  c.data = ml_collections.ConfigDict()
  # The six domains, in domain-id order. Summary: the paper's (ESFT's Chinese dialogues) needs a
  # long context, so the tiny preset uses English package descriptions instead (data/README.md).
  c.data.domains = [_domain(n, "summary" if (n == "summary" and tiny) else
                            "summary_esft" if n == "summary" else n) for n in DOMAINS]
  # Comma-separated domain names to train on, in this order (e.g. "math,code"); "" keeps all.
  c.data.select = ""
  # forgetting: text loss. tiny_v2: the held-out documents of its pretraining mixture, every
  # genre (data/corpus, scripts/make_corpus.py); tiny: four held-out Shakespeare plays.
  c.data.general = bundled(*GENERAL.get(sizes[0] if tiny else "", ("data", "general",
                                                                    "heldout.txt")))
  c.data.general_mc = bundled("data", "general", "mc.jsonl")  # forgetting: MC score
  # forgetting per genre: JSONL(.gz) of {"genre", "text"} documents, scored genre by genre at
  # the end of a run and by eval.py ("" = off). tiny_v2: the same held-out documents as
  # data.general, with their genres.
  c.data.general_genres = bundled(*GENRES[sizes[0]]) if tiny and sizes[0] in GENRES else ""
  c.data.seq_len = 1024 if tiny else 4096  # packed sequence length (tokens)
  c.data.batch_size = 4 if tiny else 32    # global batch, sequences per step
  c.data.max_bad_fraction = 0.1  # a domain with more bad rows than this (of those read) is an error
  # Domains discovered from the base model's routing instead of taken from the labels
  # (docs/METHOD.md section 2a): 0 = off (each data.domains entry is one domain); K >= 2: the
  # training examples of every entry, pooled, are clustered by k-means on their routing
  # signatures into K domains, each example's cluster its domain id (<workdir>/domains.json);
  # "auto": K chosen by the silhouette rule. An int or "auto", so a field of either type.
  c.data.discover_domains = config_dict.FieldReference(0, field_type=object)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 120 if tiny else 500     # total optimizer steps T (phases are fractions of T)
  c.train.log_every = 5                    # steps between log lines / metric records
  c.train.eval_every = 60 if tiny else 100  # steps between evaluations (0: only at the end)
  c.train.checkpoint_every = 40 if tiny else 100  # steps between checkpoints
  c.train.keep_checkpoints = 3             # newest checkpoints kept
  c.train.async_checkpoint = True          # save in the background
  c.train.heatmap_layers = 4               # MoE layers drawn in the correlation heatmaps
  c.train.nan_check = True                 # stop on a non-finite loss (keeps last good checkpoint)
  c.train.init_from = ""                   # another run's workdir: its model state, fresh optimizer
  # Gradient accumulation: data.batch_size is split into this many microbatches (strided rows),
  # run one after the other inside the jitted step (lax.scan) with their gradients summed.
  # Memory of activations: one microbatch's; the update, the DGES statistics, the KD and balance
  # losses and every metric are the whole batch's (equal to microbatches=1 up to float
  # rounding). data.batch_size / microbatches must be a multiple of the data-parallel devices.
  c.train.microbatches = 1
  # How updates reach the weights (docs/SCALING.md, "Precision" has the bytes of each):
  #   fp32_master  float32 weights (model.param_dtype=float32), computation in model.dtype:
  #                exact updates; 4 bytes per weight.
  #   bf16_sr      bfloat16 weights (model.param_dtype=bfloat16); the update is computed and added
  #                in float32 and the sum rounded stochastically to bfloat16: unbiased, so an
  #                update or a weight decay far below bfloat16's resolution (3e-5 x w) still
  #                moves the weights by the right amount in expectation; 2 bytes per weight.
  #                Deterministic: the random bits come from (seed, step).
  #   bf16_master  bfloat16 weights (model.param_dtype=bfloat16) + a float32 master copy of the
  #                trained groups in the optimizer state: exact updates; 2 bytes per weight on
  #                the device + 4 in the optimizer state (on the host with optim.host_offload).
  c.train.precision = "fp32_master" if tiny else "bf16_sr"
  c.train.skip_nonfinite_updates = 0       # N > 0: skip a step with NaN/inf gradients, up to N in a row

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = -1.0             # -1: the paper's rate for the method (methods.PAPER_LR)
  c.optim.schedule = "linear"              # linear (decay to 0) | cosine | constant
  c.optim.warmup_steps = 0                 # linear warm-up steps
  c.optim.weight_decay = 0.1               # AdamW decoupled weight decay (ESFT's)
  c.optim.b1 = 0.9                         # Adam beta1
  c.optim.b2 = 0.95                        # Adam beta2 (ESFT's)
  c.optim.eps = 1e-8                       # Adam epsilon
  c.optim.grad_clip = 1.0                  # global-norm clipping; 0 disables
  c.optim.name = "adamw"                   # adamw (the paper's) | adafactor (flagged alternative:
                                           # factored 2nd moment, no 1st; ~0 bytes of state)
  # Storage of Adam's two moments: auto (the weights' dtype) | float32 | bfloat16 | int8. The
  # optimizer computes in float32 whatever this is; bfloat16 halves float32's 8 bytes per weight
  # (rounded to nearest), int8 quarters them (blockwise-quantised codes, ~2 bytes per weight;
  # less accurate: tests/test_train_step.py measures it, docs/SCALING.md). int8: adamw only.
  c.optim.moments_dtype = "auto"
  # Keep the optimizer state (AdamW: two moments per trained weight) in host memory (JAX memory
  # kind pinned_host); each step streams it through the device one stacked layer at a time
  # (read, updated, written back), so the device holds one layer's state. Costs a host<->device
  # copy of the state per step. Needs a backend with pinned_host memory (TPU, GPU; the error
  # names this field otherwise). Not with optim.name=adafactor (its state is small).
  c.optim.host_offload = False
  # Parameter kinds with no weight decay: norms,biases (HF/ESFT: norm gains and biases are not
  # decayed) | norms | biases | none (decay every trained parameter)
  c.optim.decay_exclude = "norms,biases"
  # One Adam step count per routed expert, advanced only when the expert is updated: an expert
  # masked by DGES keeps its count, and its first update gets Adam's first-step bias correction
  c.optim.per_expert_bias_correction = False
  if tiny:
    # From the matched-quality frontier (docs/RESULTS.md, D = 6): each family's rate that lands
    # at the same mean in-domain held-out loss (6.4-6.6) as the others. For DES-MoE it is the
    # highest rate whose forgetting stays near FFT's (about 110% of it); 1e-4 forgets a little
    # less than FFT but barely adapts, higher rates forget far more than FFT does at the same
    # in-domain loss.
    c.optim.learning_rate = TINY_LR.get(c.method, TINY_LR["desmoe"])

  c.alr = ml_collections.ConfigDict()
  c.alr.form = "residual"       # residual (exact at init) | mlp (the paper's plain MLP)
  c.alr.hidden_mult = 4         # ALR hidden width in units of d_model
  c.alr.tau = 0.7               # distillation temperature
  c.alr.loss = "convex"         # convex: router grad = (1-l) task + l KD | additive
  c.alr.beta = 1.0              # KD weight for loss=additive
  c.alr.tau_squared = False     # multiply the KD loss by tau^2
  # How KD and task combine for the router: gradient (one Adam state, router gradient
  # (1-l) task + l KD) | update (two Adam states, router update l u_KD + (1-l) u_task; convex)
  c.alr.mix = "gradient"
  # lambda's clock: run (alpha = step / train.steps) | router (alpha = step / the steps the
  # router trains, i.e. until it freezes at the end of phase II)
  c.alr.alpha = "run"

  c.dges = ml_collections.ConfigDict()
  c.dges.momentum = 0.9         # weight of the old value in the correlation update
  c.dges.phi = 0.6              # mask threshold
  c.dges.score = "relative"     # relative (A / row max >= phi) | cumulative (top-p)
  # T_update: steps between mask refreshes (and one at the end of phase I whatever this is).
  # The tiny preset's 120 steps refresh at steps 10 and 20 before phase II starts at 24.
  c.dges.update_every = 10
  c.dges.duplicate_shared_experts = False  # duplicate experts owned by several domains
  c.dges.max_copies = 8         # per-layer capacity of the duplicated-expert bank
  # Oracle control (docs/RESULTS.md): per MoE layer, the N experts to which the base model routes
  # the most general text (data.general, before training) are removed from every domain's mask,
  # so they never train; 0 = off. Tests DGES given its premise (general text elsewhere).
  c.dges.exclude_general_top = 0

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

  c.lora = ml_collections.ConfigDict()   # method=lora (desmoe_jax/lora.py)
  c.lora.rank = 8               # r: inner width of each low-rank pair A [d_in, r], B [r, d_out]
  c.lora.alpha = 16.0           # the update is (alpha / rank) A B (PEFT's lora_alpha)
  c.lora.dropout = 0.0          # PEFT's lora_dropout on the low-rank branch's input (training)
  # Comma-separated weights that get pairs: attention, shared_experts, routed_experts (a pair
  # per expert, batched [E, d, r] x [E, r, F]), router (the linear gate), dense_mlp
  c.lora.targets = "attention,shared_experts,routed_experts,router,dense_mlp"
  # DES-MoE on the factors: its ALR routes, its masks isolate the experts' factors, its three
  # phases switch the factor groups (lora.targets must not name router then)
  c.lora.with_desmoe = False

  c.ablation = ml_collections.ConfigDict()
  c.ablation.linear_router_trainable = True  # desmoe_no_alr: train the linear router (else frozen)
  c.ablation.balance_loss = True             # add DeepSeek's balance loss (aux_loss_alpha)
  # Comma-separated groups never trained in any phase (backbone, shared_experts, router; "" =
  # none): where does forgetting come from? (docs/RESULTS.md, the per-part freezing runs)
  c.ablation.freeze = ""

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
  c.eval.genre_batches = 4      # batches per genre of data.general_genres (0: all of each genre)
  c.eval.code_timeout = 5.0     # seconds per HumanEval program (sandboxed subprocess)
  # pass@1 runs model-written code: off unless asked for (then reported as not run, never as 0).
  # When on, each program runs isolated (desmoe_jax/sandbox.py: own pid/mount/network
  # namespaces, read-only filesystem, non-root uid); a machine that cannot isolate refuses...
  c.eval.allow_code_execution = False
  c.eval.allow_unisolated_code_execution = False  # ...unless this is set too (limits only)
  # lm-evaluation-harness tasks (comma-separated, e.g. "mmlu,gsm8k,hellaswag") for the base and
  # the adapted model (pip install 'desmoe-jax[lm_eval]'); "" runs none.
  c.eval.lm_eval_tasks = ""
  c.eval.lm_eval_include = ""   # a folder of extra lm-eval task YAMLs (e.g. local tasks)
  c.eval.lm_eval_limit = 0      # examples per lm-eval task (0: all)

  c.logging = ml_collections.ConfigDict()
  c.logging.wandb = ml_collections.ConfigDict()
  c.logging.wandb.enabled = False   # also log to Weights & Biases (pip install 'desmoe-jax[wandb]')
  c.logging.wandb.project = "desmoe-jax"
  c.logging.wandb.entity = ""       # "": W&B's default entity
  c.logging.wandb.name = ""         # "": W&B names the run
  c.logging.wandb.mode = ""         # online | offline | disabled; "": W&B's default (WANDB_MODE)

  c.export = ml_collections.ConfigDict()
  c.export.enabled = True       # write <workdir>/hf (HF layout; the ALR folded, copies merged)
  # The ALR is folded into a linear router by least squares on the model's mesh, from the
  # first fold_tokens real tokens of the held-out sets (default: one paper batch, 64 tokens
  # per unknown of a V2-Lite router column); the folded routing is checked against the
  # adapted one on at most check_tokens further tokens (desmoe_export.json reports both).
  c.export.fold_tokens = 131072
  c.export.check_tokens = 65536
  c.export.hub_repo = ""        # owner/name: push <workdir>/hf there at the end (needs a token)
  if machines:
    _apply_machine(c, machines[0])
  return c
