"""HF <-> NNX conversion: exact round trips, transformers reading our export, clear errors."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from desmoe_jax.convert import Checkpoint, from_pretrained, save_pretrained


def _params(model):
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("variant", ["v2lite_like", "bias_tied"])
def test_export_reimport_round_trips_every_tensor(hf_checkpoint, tmp_path, variant):
  path, _ = hf_checkpoint(variant)
  model = from_pretrained(path, dtype=jnp.float32)
  save_pretrained(model, str(tmp_path))
  again = _params(from_pretrained(str(tmp_path), dtype=jnp.float32))
  before = _params(model)
  assert before.keys() == again.keys()
  for k in before:
    np.testing.assert_array_equal(before[k], again[k], err_msg=str(k))
  # Same tensors as the source checkpoint, key by key and bit for bit.
  src, ours = Checkpoint(path), Checkpoint(str(tmp_path))
  assert set(ours.keys()) <= set(src.keys())
  for key in ours.keys():
    np.testing.assert_array_equal(ours.get(key), src.get(key), err_msg=key)


def test_transformers_loads_our_export(hf_checkpoint, tmp_path):
  from transformers import DeepseekV2ForCausalLM
  path, hf = hf_checkpoint("qlora_grouped")
  save_pretrained(from_pretrained(path, dtype=jnp.float32), str(tmp_path))
  reloaded = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  ids = torch.tensor(np.random.RandomState(0).randint(0, 96, (2, 9)))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf(ids).logits.numpy())


def test_sharded_export_with_index(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("v2lite_like")
  model = from_pretrained(path, dtype=jnp.float32)
  save_pretrained(model, str(tmp_path), max_shard_size="20KB")
  files = sorted(os.listdir(tmp_path))
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  reloaded = _params(from_pretrained(str(tmp_path), dtype=jnp.float32))
  for k, v in _params(model).items():
    np.testing.assert_array_equal(v, reloaded[k])
  # Exporting again unsharded removes the stale shards.
  save_pretrained(model, str(tmp_path))
  assert not any("-of-" in f for f in os.listdir(tmp_path))


def test_bf16_export_keeps_router_float32(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("v2lite_like")
  save_pretrained(from_pretrained(path), str(tmp_path))
  ckpt = Checkpoint(str(tmp_path))
  assert ckpt.get("model.layers.1.mlp.gate.weight").dtype == np.float32
  assert str(ckpt.get("model.layers.1.mlp.experts.0.up_proj.weight").dtype) == "bfloat16"
  assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"


def _copy_without(path, dst, drop=(), edit=None):
  shutil.copytree(path, dst)
  ckpt = Checkpoint(str(dst))
  tensors = {k: np.array(ckpt.get(k)) for k in ckpt.keys() if k not in drop}
  if edit:
    edit(tensors)
  from desmoe_jax.convert import write_safetensors
  del ckpt
  write_safetensors(os.path.join(dst, "model.safetensors"), sorted(tensors.items()))


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("v2lite_like")
  key = "model.layers.2.mlp.experts.5.up_proj.weight"
  _copy_without(path, tmp_path / "ck", drop=[key])
  with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
    from_pretrained(str(tmp_path / "ck"), dtype=jnp.float32)


def test_extra_tensor_is_named(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("v2lite_like")
  _copy_without(path, tmp_path / "ck",
                edit=lambda t: t.__setitem__("model.layers.1.mlp.gate.e_score_correction_bias",
                                             np.zeros(8, np.float32)))
  with pytest.raises(ValueError, match="e_score_correction_bias"):
    from_pretrained(str(tmp_path / "ck"), dtype=jnp.float32)


def test_wrong_shape_names_key_and_both_shapes(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("v2lite_like")
  key = "model.layers.0.self_attn.kv_b_proj.weight"
  _copy_without(path, tmp_path / "ck",
                edit=lambda t: t.__setitem__(key, np.zeros((64, 15), np.float32)))
  with pytest.raises(ValueError, match=r"kv_b_proj.weight.*\(64, 15\).*\(64, 16\)"):
    from_pretrained(str(tmp_path / "ck"), dtype=jnp.float32)


def test_not_a_checkpoint_dir(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    from_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------ corrupt and hostile files
# Small hand-made files: the reader is the `safetensors` library; these hold that every file it
# refuses is named with the file and, where one is at fault, the tensor.

import ml_dtypes  # noqa: E402

from desmoe_jax.convert import write_safetensors  # noqa: E402


def _file(tmp_path, name="model.safetensors"):
  tensors = [("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4)),
             ("b.weight", np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3))]
  path = tmp_path / name
  write_safetensors(str(path), tensors)
  return path, dict(tensors)


def _rewrite_header(path, edit):
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  edit(header)
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


def test_reads_bf16_f8_and_slices(tmp_path):
  path, tensors = _file(tmp_path)
  ck = Checkpoint(str(tmp_path))
  b = ck.get("b.weight")
  assert b.dtype == ml_dtypes.bfloat16 and np.array_equal(b, tensors["b.weight"])
  np.testing.assert_array_equal(ck.get_slice("a.weight", (slice(1, 3), slice(0, 2))),
                                tensors["a.weight"][1:3, 0:2])
  f8 = np.array([0.5, -2.0, 448.0], dtype=ml_dtypes.float8_e4m3fn)
  write_safetensors(str(path), [("f8", f8)])
  got = Checkpoint(str(tmp_path)).get("f8")
  assert got.dtype == ml_dtypes.float8_e4m3fn and np.array_equal(got, f8)


def test_header_length_2_63_names_the_file(tmp_path):
  path, _ = _file(tmp_path)
  raw = path.read_bytes()
  path.write_bytes((1 << 63).to_bytes(8, "little") + raw[8:])
  with pytest.raises(ValueError, match=rf"{path}: corrupt safetensors file .*header.* the header "
                                       r"claims 9223372036854775808 bytes"):
    Checkpoint(str(tmp_path))


@pytest.mark.parametrize("fault", ["short_offsets", "wrong_shape", "truncated"])
def test_corrupt_tensor_is_named(tmp_path, fault):
  path, _ = _file(tmp_path)
  if fault == "short_offsets":
    _rewrite_header(path, lambda h: h["a.weight"].update(data_offsets=[0, 40]))
    why = r"tensor 'a.weight': data_offsets \[0, 40\] span 40 bytes, .* needs 48"
  elif fault == "wrong_shape":
    _rewrite_header(path, lambda h: h["b.weight"].update(shape=[2, 4]))
    why = r"tensor 'b.weight': data_offsets \[48, 60\] span 12 bytes, its shape \[2, 4\]"
  else:
    path.write_bytes(path.read_bytes()[:-5])
    why = r"tensor 'b.weight': its data ends at byte 60, the file holds 55 \(truncated\)"
  with pytest.raises(ValueError, match=rf"{path}: corrupt safetensors file .*{why}"):
    Checkpoint(str(tmp_path))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "..", "sub/model.safetensors",
                                   "/etc/passwd", "a\\b.safetensors", 7])
def test_index_shard_names_are_plain_file_names(tmp_path, shard):
  (tmp_path / "model").mkdir()
  _file(tmp_path, "outside.safetensors")  # what "../outside" would reach
  index = tmp_path / "model" / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a.weight": shard}}))
  with pytest.raises(ValueError, match=rf"{index}: shard name .* is not a plain file name"):
    Checkpoint(str(tmp_path / "model"))


def test_index_naming_a_missing_shard_or_no_weight_map(tmp_path):
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="names shard model-00001-of-00002.safetensors"):
    Checkpoint(str(tmp_path))
  index.write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="not a safetensors index with a 'weight_map'"):
    Checkpoint(str(tmp_path))
