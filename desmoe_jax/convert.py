"""Hugging Face safetensors <-> NNX model for every family, with no torch involved.

`from_pretrained(path)` / `save_pretrained(model, path)` dispatch on the `model_type` of
config.json (families/): the family reads the config and names the tensors; everything else
here is shared.

Loading streams: each parameter is built with `jax.make_array_from_callback`, whose callback
reads, from memory-mapped safetensors files, exactly the slice one device needs (per layer,
per expert, per row/column block). A 16B-parameter checkpoint therefore never has to fit in
host memory at once, and a sharded model loads straight onto its mesh.

Mapping (ours -> HF; kernels are [in, out], HF stores [out, in]); `name` inside a layer goes
through the family's `hf_name` (e.g. Mixtral's mlp.experts.{e}.gate_proj -> block_sparse_moe.
experts.{e}.w1):
  embed_tokens.embedding                 model.embed_tokens.weight
  dense_layers[i].<name>                 model.layers.{i}.<name>
  moe_layers.<name>[j]                   model.layers.{first_k_dense_replace + j}.<name>
  moe_layers.mlp.gate.weight[j]          model.layers.{..}.mlp.gate.weight          (transposed)
  moe_layers.mlp.experts.gate_proj[j, e] model.layers.{..}.mlp.experts.{e}.gate_proj.weight (T)
  norm.weight / lm_head.kernel           model.norm.weight / lm_head.weight
What is exported: the Params and the selection bias (`moe.routing.SelectionBias`); DES-MoE state
is not part of any HF architecture (export.py folds or drops it first).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from desmoe_jax.config import ModelConfig
from desmoe_jax.families import get_family
from desmoe_jax.model import MoECausalLM
from desmoe_jax.moe.routing import LinearRouter, SelectionBias

# The Variables that a checkpoint holds.
HF_VARIABLES = (nnx.Param, SelectionBias)

# ------------------------------------------------------------------ safetensors, raw

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
  """Zero-copy, memory-mapped view of one .safetensors file (format: u64 header size, JSON, data)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
      n = int.from_bytes(head, "little")
      try:
        self.header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    self.header.pop("__metadata__", None)
    self._offset = 8 + n
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self):
    return self.header.keys()

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key) -> np.ndarray:
    info = self.header[key]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has dtype {info['dtype']}, not supported")
    start, end = info["data_offsets"]
    raw = self._mmap[self._offset + start:self._offset + end]
    return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class Checkpoint:
  """All tensors of an HF model directory (single file or sharded with an index)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: SafetensorsFile(os.path.join(path, name)) for name in set(weight_map.values())}
      self._where = {}
      for key, name in weight_map.items():
        if key not in files[name].header:
          raise ValueError(f"{index} maps {key!r} to {name}, which does not contain it")
        self._where[key] = files[name]
    elif os.path.exists(single):
      f = SafetensorsFile(single)
      self._where = {key: f for key in f.keys()}
    else:
      found = sorted(os.listdir(path)) if os.path.isdir(path) else "no such directory"
      raise FileNotFoundError(
          f"{path}: no model.safetensors or model.safetensors.index.json (found: {found}). "
          "Only safetensors checkpoints are read; convert .bin files with transformers first.")

  def keys(self):
    return self._where.keys()

  def shape(self, key):
    return self._where[key].shape(key)

  def get(self, key) -> np.ndarray:
    return self._where[key].get(key)

  def file_of(self, key) -> str:
    return self._where[key].path


# ------------------------------------------------------------------ name mapping


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """How one (possibly stacked) NNX leaf maps to HF tensors."""
  path: tuple                         # NNX state path
  hf_key: Callable[..., str]          # (*stack_indices) -> HF tensor name
  stack: tuple[int, ...]              # sizes of leading stacked dims (layers, experts)
  transpose: bool                     # HF stores the trailing 2 dims transposed

  def keys(self):
    for idx in itertools.product(*(range(n) for n in self.stack)):
      yield idx, self.hf_key(*idx)

  @property
  def name(self) -> str:
    return ".".join(str(p) for p in self.path)


def _hf_suffix(parts: tuple) -> str:
  renamed = ["weight" if p in ("kernel", "embedding") else str(p) for p in parts]
  return ".".join(renamed)


def leaf_specs(model: MoECausalLM) -> list[LeafSpec]:
  cfg = model.config
  hf_name = get_family(cfg.model_type).hf_name
  specs = []
  for path, var in nnx.to_flat_state(nnx.state(model, HF_VARIABLES)):
    ndim = len(var.shape)
    top = path[0]
    if top in ("embed_tokens", "norm", "lm_head"):
      prefix = "" if top == "lm_head" else "model."
      specs.append(LeafSpec(path, lambda k=prefix + _hf_suffix(path): k, (), ndim == 2 and top == "lm_head"))
    elif top == "dense_layers":
      i, rest = path[1], path[2:]
      key = f"model.layers.{i}.{hf_name(_hf_suffix(rest))}"
      specs.append(LeafSpec(path, lambda k=key: k, (), ndim == 2))
    elif top == "moe_layers":
      rest = path[1:]
      k0, nl = cfg.first_k_dense_replace, cfg.num_moe_layers
      if rest[:2] == ("mlp", "experts"):
        name = hf_name(f"mlp.experts.{{e}}.{rest[2]}.weight")
        specs.append(LeafSpec(
            path, lambda j, e, name=name: f"model.layers.{k0 + j}." + name.format(e=e),
            (nl, cfg.n_routed_experts), True))
      else:
        suffix = hf_name(_hf_suffix(rest))
        specs.append(LeafSpec(path, lambda j, s=suffix: f"model.layers.{k0 + j}.{s}", (nl,),
                              ndim == 3))
    else:
      raise AssertionError(f"no HF mapping for parameter {path}")
  return specs


def _skippable(key: str, cfg: ModelConfig) -> bool:
  """Checkpoint tensors that are not part of the causal LM: DeepSeek-V3's multi-token-prediction
  layers (model.layers.{num_hidden_layers + i}), skipped as transformers skips them."""
  extra = (cfg.hf_dict or {}).get("num_nextn_predict_layers") or 0
  m = re.match(r"model\.layers\.(\d+)\.", key)
  return bool(m) and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + extra


# ------------------------------------------------------------------ loading


def _check_shapes(ckpt: Checkpoint, specs: list[LeafSpec], state, cfg: ModelConfig):
  """Every expected key exists with the right shape; every checkpoint key is used."""
  used, problems = set(), []
  for spec in specs:
    shape = state[spec.path].shape[len(spec.stack):]
    want = tuple(reversed(shape)) if spec.transpose else tuple(shape)
    for _, key in spec.keys():
      used.add(key)
      if key not in ckpt.keys():
        problems.append(f"missing tensor {key!r} (for {spec.name}, shape {want})")
      elif ckpt.shape(key) != want:
        problems.append(f"tensor {key!r} in {ckpt.file_of(key)} has shape {ckpt.shape(key)}, "
                        f"the config expects {want} (for {spec.name})")
  extra = sorted(k for k in set(ckpt.keys()) - used if not _skippable(k, cfg))
  if cfg.tie_word_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")  # tied embeddings: checked for equality by the caller
  if extra:
    problems.append(f"{len(extra)} unexpected tensor(s) that this config has no place for: "
                    f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
  if problems:
    raise ValueError(f"checkpoint {ckpt.path} does not match its config.json:\n  - "
                     + "\n  - ".join(problems[:20])
                     + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _reader(ckpt: Checkpoint, spec: LeafSpec, shape, dtype):
  """Callback for make_array_from_callback: the block `index` of the leaf, read lazily."""
  ns = len(spec.stack)

  def read(index):
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    lead = [range(*sl.indices(n)) for sl, n in zip(index[:ns], spec.stack)]
    tail = index[ns:]
    hf_tail = tuple(reversed(tail)) if spec.transpose else tail
    blocks = []
    for idx in itertools.product(*lead):
      block = np.asarray(ckpt.get(spec.hf_key(*idx))[hf_tail])
      blocks.append(block.T if spec.transpose else block)
    if not ns:
      return blocks[0].astype(dtype)
    return np.stack(blocks).reshape([len(r) for r in lead] + list(blocks[0].shape)).astype(dtype)

  return read


def load_state(model: MoECausalLM, path: str, shardings=None):
  """Fills the (possibly abstract) model's parameters from an HF directory; returns the model."""
  ckpt = Checkpoint(path)
  graphdef, params, rest = nnx.split(model, HF_VARIABLES, ...)
  flat = dict(nnx.to_flat_state(params))
  specs = leaf_specs(model)
  _check_shapes(ckpt, specs, flat, model.config)
  for spec in specs:
    var = flat[spec.path]
    shape, dtype = tuple(var.shape), np.dtype(var.dtype)
    sharding = (shardings[spec.path] if shardings is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    value = jax.make_array_from_callback(shape, sharding, _reader(ckpt, spec, shape, dtype))
    flat[spec.path] = var.replace(value)
  if model.config.tie_word_embeddings and "lm_head.weight" in ckpt.keys():
    emb = ckpt.get("model.embed_tokens.weight")
    if not np.array_equal(np.asarray(ckpt.get("lm_head.weight")), np.asarray(emb)):
      raise ValueError(f"{path}: tie_word_embeddings=True but lm_head.weight differs from "
                       "model.embed_tokens.weight")
  params = nnx.from_flat_state(flat)
  return nnx.merge(graphdef, params, rest)


def from_pretrained(path: str, dtype=jnp.bfloat16, *, param_dtype=None, mesh=None, rules=None,
                    strict_config: bool = True, **runtime) -> MoECausalLM:
  """Loads an HF directory of any supported family (its config.json's `model_type`, see
  families/) into a `MoECausalLM` (parameters in `dtype`, routers in float32). With `mesh`,
  parameters are laid out by `sharding.py`'s logical rules.

  `model(input_ids).logits` is then [batch, seq, vocab]. `runtime` sets RuntimeConfig's fields
  (moe_impl, expert_parallel, attention_impl, scan_layers, remat, moe_tile_size).
  """
  dtype = jnp.dtype(dtype).name
  param_dtype = jnp.dtype(param_dtype or dtype).name
  cfg = ModelConfig.from_pretrained(path, strict=strict_config, dtype=dtype,
                                    param_dtype=param_dtype, **runtime)
  abstract = nnx.eval_shape(lambda: MoECausalLM(cfg, rngs=nnx.Rngs(0)))
  shardings = None
  if mesh is not None:
    from desmoe_jax import sharding as sharding_lib
    shardings = sharding_lib.param_shardings(abstract, mesh, rules)
  return load_state(abstract, path, shardings)


# ------------------------------------------------------------------ export


def _parse_size(size) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB'")
  return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def _is_router(spec: LeafSpec) -> bool:
  """Routers and selection biases are written in float32, whatever the export dtype."""
  return spec.path[-3:] == ("mlp", "gate", "weight") or spec.path[-1] == "e_score_correction_bias"


def _hf_tensors(model: MoECausalLM, dtype=None):
  """Yields (hf_key, numpy array) in a deterministic order, one HF tensor at a time."""
  flat = dict(nnx.to_flat_state(nnx.state(model, HF_VARIABLES)))
  for spec in leaf_specs(model):
    value = flat[spec.path][...]
    for idx, key in spec.keys():
      arr = value[idx] if idx else value
      arr = np.asarray(jax.device_get(arr))
      if spec.transpose:
        arr = arr.T
      if dtype is not None and not _is_router(spec):
        arr = arr.astype(dtype)
      yield key, np.ascontiguousarray(arr)


def _write_safetensors(path: str, tensors: list[tuple[str, np.ndarray]]):
  header, offset = {}, 0
  for key, arr in tensors:
    header[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align data to 8 bytes, as the reference writer does
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for _, arr in tensors:
      f.write(arr.tobytes())
  os.replace(tmp, path)


def save_pretrained(model: MoECausalLM, path: str, *, dtype=None,
                    max_shard_size="5GB", tokenizer_dir: str | None = None):
  """Writes `model` as an HF directory of its family (config.json + safetensors, sharded with
  an index past `max_shard_size`) that transformers, vLLM and `from_pretrained` load.

  Routers are written in float32 (as they compute); other tensors in their dtype, or `dtype`.
  `tokenizer_dir`: copy the tokenizer files found there, so the directory is self-contained.
  """
  moe = model.moe_blocks()
  if moe is not None and (not isinstance(moe.gate, LinearRouter) or moe.des is not None):
    raise ValueError(f"this model has DES-MoE parts the HF {model.config.model_type} layout "
                     "cannot hold (an adaptive router, domain statistics or duplicated "
                     "experts): export it with desmoe_jax.export.export_hf, which folds, "
                     "merges or drops them")
  os.makedirs(path, exist_ok=True)
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  limit = _parse_size(max_shard_size)
  shards, current, size = [], [], 0
  for key, arr in _hf_tensors(model, np_dtype):
    if current and size + arr.nbytes > limit:
      shards.append(current)
      current, size = [], 0
    current.append((key, arr))
    size += arr.nbytes
  shards.append(current)
  for name in os.listdir(path):  # stale shards of an earlier export would shadow the new ones
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name):
      os.remove(os.path.join(path, name))
  if len(shards) == 1:
    _write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
  else:
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _write_safetensors(os.path.join(path, name), shard)
      for key, arr in shard:
        weight_map[key] = name
        total += arr.nbytes
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  param_dtype = np_dtype or np.dtype(jnp.dtype(model.config.runtime.param_dtype))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(model.config.to_hf_dict(torch_dtype=str(np.dtype(param_dtype).name)), f, indent=2)
  if tokenizer_dir is not None:
    copy_tokenizer(tokenizer_dir, path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer(src: str, dst: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)) and os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied
