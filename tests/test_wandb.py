"""W&B logging (`logging.wandb`), in wandb's offline mode in a tmp dir: what metrics.jsonl and
TensorBoard get reaches the W&B run file with the same values at the same steps, the heatmaps
as images; with W&B off, wandb is never imported (its absence costs nothing)."""

import glob
import json
import os
import struct
import sys
import types

import numpy as np
import pytest

from desmoe_jax import trainer
from desmoe_jax.run_config import load_config

NAMES = ["math", "code"]


def _records(path):
  """Protobuf records of a .wandb file (wandb's log format: 32 KiB blocks, 7-byte record
  headers: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
  data, pos, block, pending = open(path, "rb").read(), 7, 32768, b""
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pos += 7
    if length == 0 and kind == 0:
      pos += left - 7
      continue
    chunk, pos = data[pos:pos + length], pos + length
    if kind == 1:
      yield chunk
    elif kind == 2:
      pending = chunk
    elif kind == 3:
      pending += chunk
    elif kind == 4:
      yield pending + chunk


def _history(run_dir, timeout_s=60.0):
  """{step: {key: value}} of the run, once wandb's service has written the run's exit record
  (it writes the file in the background)."""
  import time
  from wandb.proto import wandb_internal_pb2
  deadline = time.monotonic() + timeout_s
  while True:
    rows, finished = {}, False
    for raw in _records(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]):
      rec = wandb_internal_pb2.Record()
      rec.ParseFromString(raw)
      kind = rec.WhichOneof("record_type")
      finished |= kind == "exit"
      if kind == "history":
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in rec.history.item}
        rows.setdefault(row["_step"], {}).update(row)
    if finished or time.monotonic() > deadline:
      return rows
    time.sleep(0.5)


def test_wandb_gets_what_metrics_jsonl_and_tensorboard_get(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = load_config("six_domains:tiny", {"logging.wandb.enabled": True,
                                            "logging.wandb.mode": "offline"})
  work = tmp_path / "work"
  work.mkdir()
  log = trainer.MetricsLog(str(work), wandb_config=config.logging.wandb,
                           run_config=config.to_dict())
  rng = np.random.default_rng(0)
  written = {
      5: {"loss": float(rng.random()), "domain_loss": rng.random(2).astype(np.float32),
          "phase": np.int32(0), "phase_name": "warmup", "overlap_matrix": rng.random((2, 2))},
      10: {"event": "eval", "heldout_loss/math": 3.25, "heldout_loss/general": 4.5},
  }
  for step, record in written.items():
    log.write(step, record, NAMES)
  paths = trainer.heatmap_paths(str(work), 10)
  des = types.SimpleNamespace(  # the DES-MoE state's two matrices, [layers, domains, experts]
      correlation=rng.random((3, 2, 8)).astype(np.float32),
      expert_mask=(rng.random((3, 2, 8)) > 0.5).astype(np.float32))
  trainer.save_heatmaps(des, NAMES, paths, max_layers=2)
  log.images(10, paths)
  log.close()

  history = _history(glob.glob(str(work / "wandb" / "offline-run-*"))[0])
  lines = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [5, 10]
  for line in lines:
    numbers = trainer.MetricsLog.scalars(line, NAMES)
    texts = {k: v for k, v in line.items() if isinstance(v, str)}
    got = history[line["step"]]
    # Compared apart: pytest >= 9.2's approx refuses a mapping that holds strings.
    assert {k: got[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)
    assert {k: got[k] for k in texts} == texts
  assert history[5]["domain_loss/code"] == pytest.approx(float(written[5]["domain_loss"][1]))
  assert "overlap_matrix" not in history[5]       # the heatmap carries it
  for name in ("correlation", "overlap"):
    image = history[10][f"heatmap/{name}/path"]
    assert history[10][f"heatmap/{name}/_type"] == "image-file"
    assert os.path.getsize(glob.glob(str(work / "wandb" / "offline-run-*" / "files" / image))[0]) \
        == os.path.getsize(paths[name])
  assert open(work / "wandb_id").read().strip() in glob.glob(str(work / "wandb" / "offline-run-*"))[0]


def test_without_wandb_nothing_changes(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)    # `import wandb` now fails
  config = load_config("six_domains:tiny")
  log = trainer.MetricsLog(str(tmp_path), wandb_config=config.logging.wandb)
  log.write(1, {"loss": 2.0}, NAMES)
  log.images(1, trainer.heatmap_paths(str(tmp_path), 1))
  log.close()
  assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "loss": 2.0}
  config.logging.wandb.enabled = True
  (tmp_path / "b").mkdir()
  with pytest.raises(ImportError, match=r"config.logging.wandb.enabled=True, but wandb is not "
                                        r"installed: pip install 'desmoe-jax\[wandb\]'"):
    trainer.MetricsLog(str(tmp_path / "b"), wandb_config=config.logging.wandb)
