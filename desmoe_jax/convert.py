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
import math
import os
import re
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from desmoe_jax import lora
from desmoe_jax.config import ModelConfig
from desmoe_jax.families import get_family
from desmoe_jax.model import MoECausalLM
from desmoe_jax.moe.routing import LinearRouter, SelectionBias

# The Variables that a checkpoint holds.
HF_VARIABLES = (nnx.Param, SelectionBias)

# ------------------------------------------------------------------ safetensors

# Writing (export) is ours: numpy arrays -> the format's bytes. Reading goes through the
# `safetensors` library, which validates the header (its size, every tensor's dtype, shape and
# offsets, that the data covers the file exactly) before a byte of data is used.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# safetensors' numpy views find BF16 through numpy's dtype registry ("bfloat16" exists there once
# ml_dtypes is imported, above) but the F8 types as attributes of the numpy module, which numpy
# does not have: give it ml_dtypes' (the types JAX uses), only where missing.
for _name in ("float8_e4m3fn", "float8_e5m2"):
  if not hasattr(np, _name):
    setattr(np, _name, getattr(ml_dtypes, _name))
_MAX_HEADER = 100_000_000  # the library's own limit on the header's size


def _diagnose(path: str) -> str:
  """Which tensor of a file the library refused is at fault, and how, read from the header with
  every size bounded (diagnosis only: nothing here is used to read data). "" if not found."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if n > min(size - 8, _MAX_HEADER):
        return f"the header claims {n} bytes, the file has {size}"
      header = json.loads(f.read(n))
  except (OSError, ValueError) as e:
    return f"unreadable header ({e})"
  if not isinstance(header, dict):
    return "the header is not a JSON object"
  data = size - 8 - n
  widths = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
            "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if not isinstance(info, dict):
      return f"tensor {key!r}: its entry is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
      return f"tensor {key!r}: bad shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
      return f"tensor {key!r}: bad data_offsets {offsets!r}"
    if dtype not in widths:
      return f"tensor {key!r}: dtype {dtype!r} is not one this reader knows"
    want = widths[dtype] * math.prod(shape)
    if offsets[1] - offsets[0] != want:
      return (f"tensor {key!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
              f"its shape {shape} of {dtype} needs {want}")
    if offsets[1] > data:
      return (f"tensor {key!r}: its data ends at byte {offsets[1]}, the file holds {data} "
              "(truncated)")
  return ""


class SafetensorsFile:
  """One .safetensors file, memory-mapped by the `safetensors` library (`safe_open`, numpy).
  Tensors are read whole (`get`) or one block at a time (`get_slice`), so loading a sharded
  model reads only what each device needs. A file the library refuses raises ValueError naming
  the file, and the tensor where one is at fault."""

  def __init__(self, path: str):
    from safetensors import SafetensorError, safe_open
    self.path = path
    try:
      self._file = safe_open(path, framework="numpy")
    except SafetensorError as e:
      why = _diagnose(path)
      raise ValueError(f"{path}: corrupt safetensors file ({e})" +
                       (f": {why}" if why else "")) from None
    self._keys = tuple(self._file.keys())
    self._key_set = frozenset(self._keys)
    self._slices = {}

  def keys(self):
    return self._keys

  def __contains__(self, key) -> bool:
    return key in self._key_set

  def _slice(self, key):
    if key not in self._slices:
      self._slices[key] = self._file.get_slice(key)
    return self._slices[key]

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self._slice(key).get_shape())

  def dtype(self, key) -> str:
    return self._slice(key).get_dtype()

  def get_slice(self, key, index: tuple) -> np.ndarray:
    """The block `index` (a tuple of slices, one per leading dim) of tensor `key`."""
    if self.dtype(key) not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has dtype {self.dtype(key)}, not supported")
    try:
      return self._slice(key)[index]
    except Exception as e:  # the library's errors carry neither the file nor the tensor
      raise ValueError(f"{self.path}: cannot read tensor {key!r}{list(index)} ({e})") from e

  def get(self, key) -> np.ndarray:
    return self.get_slice(key, (slice(None),) * len(self.shape(key)))


def _check_shard_name(index: str, name) -> str:
  """A shard named by the index must be a plain file name in the model directory: never a path
  (a separator, "..") that would open a file elsewhere."""
  if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or \
      "\\" in name or "\0" in name:
    raise ValueError(f"{index}: shard name {name!r} is not a plain file name in the model "
                     "directory (path separators and '..' are refused)")
  return name


class Checkpoint:
  """All tensors of an HF model directory (single file or sharded with an index)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, not an object")
      files = {}
      for name in dict.fromkeys(weight_map.values()):  # each shard once, in index order
        _check_shard_name(index, name)
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
          raise FileNotFoundError(f"{index} names shard {name}, which is not in {path}")
        files[name] = SafetensorsFile(shard)
      self._where = {}
      for key, name in weight_map.items():
        if key not in files[name]:
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

  def get_slice(self, key, index: tuple) -> np.ndarray:
    return self._where[key].get_slice(key, index)

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
      block = np.asarray(ckpt.get_slice(spec.hf_key(*idx), hf_tail))
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


def _hf_plan(model: MoECausalLM, dtype=None) -> list[tuple[str, tuple, np.dtype]]:
  """(hf_key, shape, dtype) of every HF tensor, in the order `_hf_tensors` yields them: shards
  and headers are laid out from this before any tensor is read."""
  flat = dict(nnx.to_flat_state(nnx.state(model, HF_VARIABLES)))
  plan = []
  for spec in leaf_specs(model):
    var = flat[spec.path]
    shape = tuple(var.shape)[len(spec.stack):]
    shape = tuple(reversed(shape)) if spec.transpose else shape
    want = np.dtype(var.dtype) if dtype is None or _is_router(spec) else np.dtype(dtype)
    plan.extend((key, shape, want) for _, key in spec.keys())
  return plan


def _hf_tensors(model: MoECausalLM, dtype=None):
  """Yields (hf_key, numpy array) in `_hf_plan`'s order, one HF tensor at a time.

  Host memory is bounded by one layer of one stacked leaf (e.g. one MoE layer's 64 experts'
  up_proj, 369 MiB for V2-Lite in bf16) or the largest unstacked tensor (the embedding): a
  sharded model is gathered a layer at a time (`distributed.to_host`, a collective across the
  processes of a multi-host run: every process must run this generator to its end)."""
  from desmoe_jax import distributed
  flat = dict(nnx.to_flat_state(nnx.state(model, HF_VARIABLES)))
  for spec in leaf_specs(model):
    value = flat[spec.path][...]
    outer = range(spec.stack[0]) if spec.stack else [None]
    for j in outer:
      block = distributed.to_host(value if j is None else value[j])
      for rest in itertools.product(*(range(n) for n in spec.stack[1:])):
        idx = () if j is None else (j, *rest)
        arr = block[rest] if rest else block
        if spec.transpose:
          arr = arr.T
        if dtype is not None and not _is_router(spec):
          arr = arr.astype(dtype)
        yield spec.hf_key(*idx), np.ascontiguousarray(arr)


def write_safetensors(path: str, tensors: list[tuple[str, np.ndarray]]):
  """Writes (key, array) pairs held in memory as one safetensors file."""
  _stream_safetensors(path, [(k, a.shape, a.dtype) for k, a in tensors], iter(tensors))


def _stream_safetensors(path: str | None, plan: list[tuple[str, tuple, np.dtype]], tensors):
  """Writes the tensors of `plan` (header first, from shapes alone), drawing each array from
  the iterator `tensors` as it is written, so only one is held at a time. `path` None: draw
  them and write nothing (the other processes of a multi-host run, which join the gathers)."""
  header, offset = {}, 0
  for key, shape, dtype in plan:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[key] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align data to 8 bytes, as the reference writer does
  tmp = None if path is None else path + ".tmp"
  f = None if tmp is None else open(tmp, "wb")
  try:
    if f is not None:
      f.write(len(blob).to_bytes(8, "little"))
      f.write(blob)
    for key, shape, dtype in plan:
      got_key, arr = next(tensors)
      if (got_key, arr.shape, arr.dtype) != (key, tuple(shape), np.dtype(dtype)):
        raise AssertionError(f"export order: expected {key} {shape} {dtype}, got {got_key} "
                             f"{arr.shape} {arr.dtype}")
      if f is not None:
        f.write(arr.tobytes())
  finally:
    if f is not None:
      f.close()
  if tmp is not None:
    os.replace(tmp, path)


def save_pretrained(model: MoECausalLM, path: str, *, dtype=None,
                    max_shard_size="5GB", tokenizer_dir: str | None = None):
  """Writes `model` as an HF directory of its family (config.json + safetensors, sharded with
  an index past `max_shard_size`) that transformers and `from_pretrained` load.

  Routers are written in float32 (as they compute); other tensors in their dtype, or `dtype`.
  `tokenizer_dir`: copy the tokenizer files found there, so the directory is self-contained.
  The model may be sharded over a mesh spanning several processes: every process then calls
  this (tensors are gathered a layer at a time, see `_hf_tensors`) and process 0 writes.
  """
  moe = model.moe_blocks()
  if moe is not None and (not isinstance(moe.gate, LinearRouter) or moe.des is not None):
    raise ValueError(f"this model has DES-MoE parts the HF {model.config.model_type} layout "
                     "cannot hold (an adaptive router, domain statistics or duplicated "
                     "experts): export it with desmoe_jax.export.export_hf, which folds, "
                     "merges or drops them")
  if lora.attached(model):
    raise ValueError("this model has LoRA pairs, which the HF layout cannot hold: merge them "
                     "first (desmoe_jax.lora.merge; desmoe_jax.export.export_hf does)")
  writer = jax.process_index() == 0
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  limit = _parse_size(max_shard_size)
  shards, current, size = [], [], 0
  for key, shape, want in _hf_plan(model, np_dtype):
    nbytes = int(np.prod(shape, dtype=np.int64)) * want.itemsize
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = [], 0
    current.append((key, shape, want))
    size += nbytes
  shards.append(current)
  if writer:
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # stale shards of an earlier export would shadow the new ones
      if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name):
        os.remove(os.path.join(path, name))
  tensors = _hf_tensors(model, np_dtype)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, shard in zip(names, shards):
    _stream_safetensors(os.path.join(path, name) if writer else None, shard, tensors)
  if not writer:
    return
  if len(shards) > 1:
    weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
    total = sum(int(np.prod(shape, dtype=np.int64)) * want.itemsize
                for shard in shards for _, shape, want in shard)
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
