"""What a resume must agree on (config, tokenizer) and what it cleans up (metrics written after
the restored step)."""

import json
import os

import pytest

from desmoe_jax import resume
from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "six_domains.py")
TINY_MODEL = os.path.join(REPO, "assets", "tiny_deepseek_v2")


def _json(config):
  return json.loads(config.to_json_best_effort())


@pytest.mark.parametrize("field,value,alters", [
    ("train.steps", 200, True),
    ("data.batch_size", 8, True),
    ("optim.learning_rate", 1e-3, True),
    ("method", "fft", True),
    ("schedule.t1", 0.3, True),
    ("dges.phi", 0.5, True),
    ("model.dtype", "bfloat16", True),
    ("data.seq_len", 512, True),
    ("seed", 1, True),
    ("train.log_every", 1, False),
    ("train.checkpoint_every", 10, False),
    ("train.keep_checkpoints", 5, False),
    ("eval.max_examples", 4, False),
    ("export.enabled", False, False),
    ("mesh.fsdp", 1, False),
    ("model.remat", "full", False),
    ("model.path", "/elsewhere/tiny", False),
    # Same update, other memory trade-off (resuming on another machine's preset).
    ("train.microbatches", 2, False),
    ("optim.host_offload", True, False),
    ("model.ce_chunk", 256, False),
    ("train.precision", "bf16_sr", True),
    ("optim.moments_dtype", "bfloat16", True),
])
def test_changes_that_alter_the_run_are_told_apart(field, value, alters):
  saved = _json(load_config(f"{CONFIG}:tiny"))
  current = _json(load_config(f"{CONFIG}:tiny", {field: value}))
  changes = resume.config_changes(saved, current)
  assert [c[0] for c in changes] == [field]
  assert bool(resume.run_altering(changes)) == alters


def test_domain_data_changes_alter_the_run_but_eval_files_do_not():
  saved = _json(load_config(f"{CONFIG}:tiny"))
  current = _json(load_config(f"{CONFIG}:tiny"))
  current["data"]["domains"][1]["train"] = "/other/train.jsonl"
  current["data"]["domains"][1]["eval"] = "/other/eval.jsonl"
  current["data"]["domains"][2]["weight"] = 2.0
  changes = resume.config_changes(saved, current)
  assert resume.describe(resume.run_altering(changes)) == [
      f"data.domains[1].train: {saved['data']['domains'][1]['train']!r} -> '/other/train.jsonl'",
      "data.domains[2].weight: 1.0 -> 2.0"]
  assert len(changes) == 3


def test_a_field_only_one_side_has_is_not_a_change():
  """A checkpoint written before a field existed resumes under a config that has it."""
  saved = _json(load_config(f"{CONFIG}:tiny"))
  current = _json(load_config(f"{CONFIG}:tiny"))
  del saved["train"]["skip_nonfinite_updates"]
  assert resume.config_changes(saved, current) == []


def test_tokenizer_fingerprint_sees_what_vocab_size_does_not(tmp_path):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(TINY_MODEL)
  base = resume.tokenizer_fingerprint(tok)
  tok("some text", truncation=True, max_length=4)   # runtime settings are not identity
  assert resume.tokenizer_fingerprint(tok) == base
  assert resume.tokenizer_fingerprint(AutoTokenizer.from_pretrained(TINY_MODEL)) == base

  def variant(edit):
    d = tmp_path / f"v{len(os.listdir(tmp_path))}"
    d.mkdir()
    for name in os.listdir(TINY_MODEL):
      if name.startswith("token") or name.endswith(".jinja"):
        (d / name).write_bytes(open(os.path.join(TINY_MODEL, name), "rb").read())
    edit(d)
    t = AutoTokenizer.from_pretrained(str(d))
    assert t.vocab_size == tok.vocab_size                 # what the old check compared
    return resume.tokenizer_fingerprint(t)

  def swap_two_tokens(d):
    spec = json.loads((d / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    (a, ia), (b, ib) = [(k, v) for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = ib, ia
    (d / "tokenizer.json").write_text(json.dumps(spec))

  def other_chat_template(d):
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")

  assert variant(lambda d: None) == base
  assert variant(swap_two_tokens) != base
  assert variant(other_chat_template) != base


def _records(path):
  return [json.loads(l) for l in open(path)]


def test_metrics_after_the_restored_step_are_dropped(tmp_path):
  from desmoe_jax.trainer import MetricsLog
  log = MetricsLog(str(tmp_path))
  for step in (1, 2):
    log.write(step, {"loss": float(step)})
  offset = log.offset()                       # checkpoint 2 saved here
  log.write(2, {"event": "eval", "heldout_loss/math": 1.0})   # after the save, same step
  log.write(3, {"loss": 3.0})
  log.close()
  log = MetricsLog(str(tmp_path), resume_step=2, resume_offset=offset)
  assert log.dropped == 2
  log.write(3, {"loss": 3.5})
  log.close()
  assert [(r["step"], r.get("loss")) for r in _records(tmp_path / "metrics.jsonl")] == [
      (1, 1.0), (2, 2.0), (3, 3.5)]


def test_without_a_stored_offset_records_past_the_step_are_dropped(tmp_path):
  from desmoe_jax.trainer import MetricsLog
  log = MetricsLog(str(tmp_path))
  for step in (1, 2, 3, 4):
    log.write(step, {"loss": float(step)})
  log.close()
  log = MetricsLog(str(tmp_path), resume_step=2)   # a checkpoint that recorded no offset
  log.close()
  assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2]
  assert log.dropped == 2


def _run_dir_with_checkpoint(tmp_path, config, **meta):
  import jax.numpy as jnp

  from desmoe_jax.checkpoint import Checkpointer
  saver = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saver.save(2, {"w": jnp.zeros(3)}, {"m": jnp.zeros(3)},
             dict({"method": config.method, "config": _json(config)}, **meta))
  saver.close()
  return str(tmp_path)


def test_resume_and_eval_refuse_another_tokenizer_before_loading_the_model(tmp_path):
  from transformers import AutoTokenizer

  from desmoe_jax import evaluate, run_dir
  from desmoe_jax.errors import ConfigError
  config = load_config(f"{CONFIG}:tiny")
  workdir = _run_dir_with_checkpoint(tmp_path, config, tokenizer="sha256:" + "0" * 64)
  with pytest.raises(ConfigError, match=r"the tokenizer in model.path=.* is not the one "
                                        r".*/checkpoints/2 was trained with"):
    run_dir.open_run(config, workdir, allow_config_change=False)
  with pytest.raises(ConfigError, match=r"the tokenizer used for evaluation is not the one "
                                        r".*/checkpoints/2 was trained with"):
    evaluate.load_run_model(config, workdir, tokenizer=AutoTokenizer.from_pretrained(TINY_MODEL))


def test_resume_refuses_run_altering_changes_unless_allowed(tmp_path):
  from desmoe_jax import run_dir
  from desmoe_jax.errors import ConfigError
  saved = load_config(f"{CONFIG}:tiny")
  workdir = _run_dir_with_checkpoint(tmp_path, saved)
  changed = load_config(f"{CONFIG}:tiny", {"data.batch_size": 8, "train.log_every": 1})
  with pytest.raises(ConfigError) as e:
    run_dir.open_run(changed, workdir, allow_config_change=False)
  assert str(e.value).splitlines()[1:] == ["data.batch_size: 4 -> 8"]   # log_every is free
  checkpoints, _, _, meta = run_dir.open_run(changed, workdir, allow_config_change=True)
  checkpoints.close()
  assert meta["step"] == 2
