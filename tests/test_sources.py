"""The `hf://` rule (desmoe_jax/sources.py), offline against a hub cache built in a tmp dir
(the HF_HUB_CACHE layout: <cache>/<type>s--owner--name/refs/main -> snapshots/<commit>/...),
`data.select`, the per-domain column and split fields, and `export.hub_repo`. Pushing is tested
no further than the calls it makes to huggingface_hub (mocked): no test reaches the hub."""

import json
import os
import shutil

import pytest

from desmoe_jax import data as data_lib
from desmoe_jax import sources, trainer
from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
QA = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i), "answers": [str(2 * i)]}
      for i in range(12)]  # one schema for both splits, as a hub dataset has


def _cache_repo(cache, repo_type, repo_id, files: dict):
  """Writes one repository into a hub cache: {relative path: source file or text}."""
  folder = os.path.join(cache, f"{repo_type}s--{repo_id.replace('/', '--')}")
  snapshot = os.path.join(folder, "snapshots", COMMIT)
  for rel, content in files.items():
    os.makedirs(os.path.dirname(os.path.join(snapshot, rel)), exist_ok=True)
    if os.path.isfile(content):
      shutil.copy(content, os.path.join(snapshot, rel))
    else:
      with open(os.path.join(snapshot, rel), "w") as f:
        f.write(content)
  os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
  with open(os.path.join(folder, "refs", "main"), "w") as f:
    f.write(COMMIT)
  return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
  cache = str(tmp_path / "hub")
  monkeypatch.setenv("HF_HUB_CACHE", cache)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  tiny = os.path.join(REPO, "assets", "tiny_deepseek_v2")
  model = _cache_repo(cache, "model", "desmoe/tiny",
                      {f: os.path.join(tiny, f) for f in os.listdir(tiny)})
  rows = lambda items: "".join(json.dumps(r) + "\n" for r in items)
  dataset = _cache_repo(cache, "dataset", "desmoe/qa", {
      "train.jsonl": rows(QA[:8]),
      "test.jsonl": rows(QA[8:])})
  return {"model": model, "dataset": dataset}


def _config(**overrides):
  return load_config("six_domains:tiny", overrides)


def test_hub_model_and_dataset_resolve_from_the_cache(hub):
  config = _config(**{"model.path": "hf://desmoe/tiny", "data.select": "math"})
  config.data.domains[0].train = "hf://desmoe/qa"
  config.data.domains[0].eval = "hf://datasets/desmoe/qa@main"
  config.data.domains[0].prompt_field = "question"
  config.data.domains[0].response_field = "answer"
  resolved = sources.resolve(config)
  assert resolved.model.path == hub["model"]
  assert resolved.data.domains[0].train == hub["dataset"]
  assert config.model.path == "hf://desmoe/tiny"           # the caller's config keeps the id
  assert len(resolved.data.domains) == 1 and len(config.data.domains) == 6

  train_spec, eval_spec = (trainer.domain_specs(resolved, s)[0] for s in ("train", "eval"))
  rows, bad = data_lib.read_rows(train_spec)                # split "train" of the directory
  assert bad == [] and [r for _, r in rows] == QA[:8]
  assert data_lib.to_messages(rows[3][1], train_spec) == [
      {"role": "user", "content": QA[3]["question"]},
      {"role": "assistant", "content": QA[3]["answer"]}]
  eval_rows, _ = data_lib.read_rows(eval_spec)              # split "test"
  assert [r["question"] for _, r in eval_rows] == [r["question"] for r in QA[8:]]

  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(resolved.model.path)
  examples = data_lib.load_eval_examples(eval_spec, tokenizer)
  assert [ex["prompt_text"] for ex in examples] == [r["question"] for r in QA[8:]]
  assert [ex["answers"] for ex in examples] == [[r["answer"]] for r in QA[8:]]


def test_a_file_inside_a_hub_dataset(hub):
  config = _config(**{"data.general_mc": "hf://desmoe/qa/test.jsonl"})
  assert sources.resolve(config).data.general_mc == os.path.join(hub["dataset"], "test.jsonl")


def test_every_unusable_source_names_its_field(hub, tmp_path):
  config = _config()
  config.data.domains[2].train = "someone/law-data"        # no hf://: a (missing) local path
  with pytest.raises(sources.SourceError,
                     match=r"config.data.domains\[2\].train \('law'\)='someone/law-data' does "
                           r"not exist \(a local path; a hub id needs the prefix hf://"):
    sources.resolve(config)
  with pytest.raises(sources.SourceError, match=r"config.model.path='hf://desmoe/absent': cannot "
                                                r"fetch model 'desmoe/absent'.*HF_HUB_OFFLINE"):
    sources.resolve(_config(**{"model.path": "hf://desmoe/absent"}))
  with pytest.raises(sources.SourceError, match=r"config.data.general='hf://desmoe/qa/nope.txt'"
                                                r": 'nope.txt' is not in dataset 'desmoe/qa'"):
    sources.resolve(_config(**{"data.general": "hf://desmoe/qa/nope.txt"}))
  with pytest.raises(sources.SourceError, match="hf://owner/name"):
    sources.resolve(_config(**{"model.path": "hf://just-a-name"}))
  from desmoe_jax.errors import UserError   # validate.py or sources.py: one `error:` line
  with pytest.raises(UserError, match=r"model.path='/nowhere/model' is not a directory \(a hub "
                                      r"id needs the prefix hf://\)"):
    trainer.train(_config(**{"model.path": "/nowhere/model"}), str(tmp_path / "w"))
  with pytest.raises(UserError, match=r"config.data.domains\[0\].train \('math'\)="):
    trainer.train(_config(**{"data.domains[0].train": "nowhere.jsonl"}), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")                # nothing written before the check


def test_select_keeps_the_named_domains_in_that_order():
  config = _config(**{"data.select": "code, math"})
  sources.select_domains(config)
  assert [d.name for d in config.data.domains] == ["code", "math"]
  assert config.data.domains[1].train.endswith(os.path.join("math", "train.jsonl"))
  sources.select_domains(config)                            # idempotent (saved configs)
  assert [d.name for d in config.data.domains] == ["code", "math"]
  with pytest.raises(ValueError, match=r"data.select='math,poetry': unknown domain\(s\) "
                                       r"\['poetry'\]; domains: math, code, law"):
    sources.select_domains(_config(**{"data.select": "math,poetry"}))


def test_export_push_makes_exactly_these_hub_calls(tmp_path, monkeypatch):
  """Tested no further than the calls to huggingface_hub.HfApi (mocked)."""
  import huggingface_hub
  calls = []

  class FakeApi:
    def create_repo(self, repo_id, **kw):
      calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
      calls.append(("upload_folder", kw))
      return type("Info", (), {"commit_url": "https://hub.example/commit/1"})()

  monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
  (tmp_path / "hf").mkdir()
  assert sources.push(str(tmp_path / "hf"), "hf://me/adapted") == "https://hub.example/commit/1"
  assert calls == [
      ("create_repo", "me/adapted", {"repo_type": "model", "private": True, "exist_ok": True}),
      ("upload_folder", {"folder_path": str(tmp_path / "hf"), "repo_id": "me/adapted",
                         "repo_type": "model", "commit_message": "desmoe-jax export"})]
  with pytest.raises(ValueError, match="config.export.hub_repo='adapted': expected owner/name"):
    sources.push(str(tmp_path / "hf"), "adapted")
  with pytest.raises(ValueError, match="export.hub_repo='me/x' pushes the export, but "
                                       "config.export.enabled=False"):
    trainer.check_config(_config(**{"export.hub_repo": "me/x", "export.enabled": False}))
