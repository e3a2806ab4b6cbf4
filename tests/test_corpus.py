"""scripts/make_corpus.py and the bundled corpus (data/corpus/): every genre in both splits,
documents held out whole, no fine-tuning domain row inside, a held-out text whose every prefix
has the mixture's genres, and a tokenizer (assets/tokenizer_v2) that covers its Chinese."""

import gzip
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import make_corpus  # noqa: E402

CORPUS = os.path.join(REPO, "data", "corpus")


@pytest.fixture(scope="module")
def splits():
  return (make_corpus.read_docs(os.path.join(CORPUS, "train.jsonl.gz")),
          make_corpus.read_docs(os.path.join(CORPUS, "heldout.jsonl.gz")))


def test_every_genre_in_both_splits_and_documents_held_out_whole(splits):
  train, heldout = splits
  genres = set(make_corpus.GENRES)
  assert {d["genre"] for d in train} == genres == {d["genre"] for d in heldout}
  assert not {d["name"] for d in train} & {d["name"] for d in heldout}
  assert len({d["lang"] for d in train}) >= 50          # many languages, Chinese among them
  assert {"zh", "zh_CN", "de", "fr", "ja"} <= {d["lang"] for d in train + heldout}
  size = sum(len(d["text"]) for d in train + heldout)
  assert 5e6 < size < 2e7
  for d in heldout:   # held out by the hash of the name (or the one per genre)
    assert (make_corpus.stable_hash("heldout/" + d["name"]) % make_corpus.HELDOUT_EVERY == 0
            or sum(x["genre"] == d["genre"] for x in heldout) == 1)


def test_no_fine_tuning_row_is_in_the_corpus(splits):
  banned = make_corpus.domain_lines(os.path.join(REPO, "data"))
  train, heldout = splits
  for d in train + heldout:
    if d["genre"] == "code":   # kept out by the module split instead (make_corpus.code)
      continue
    hits = [l for l in d["text"].split("\n") if l.strip() in banned]
    assert not hits, (d["name"], hits[:3])
  # Code: no function of the code domain's modules.
  code_modules = {json.loads(l)["module"] for l in open(os.path.join(REPO, "data", "code",
                                                                      "train.jsonl"))}
  assert not {d["name"].split("/", 1)[1] for d in train + heldout if d["genre"] == "code"} \
      & code_modules


def test_heldout_text_interleaves_genres_in_proportion():
  docs = [{"genre": "code", "name": "a", "text": "\n\n".join(["x" * 900] * 40)},
          {"genre": "math", "name": "b", "text": "\n\n".join(["y" * 900] * 10)}]
  pieces = make_corpus.heldout_text(docs, chunk_chars=2000).split("\n\n")
  first = pieces[:len(pieces) // 2]   # any prefix: ~4 code pieces per math piece
  assert 0.1 < sum(p.startswith("y") for p in first) / len(first) < 0.3
  assert max(len(p.strip()) for p in pieces) <= 900
  # The bundled held-out text is the held-out documents', nothing else.
  with open(os.path.join(CORPUS, "heldout.txt"), encoding="utf-8") as f:
    text = f.read()
  with gzip.open(os.path.join(CORPUS, "heldout.jsonl.gz"), "rt", encoding="utf-8") as f:
    heldout = [json.loads(l) for l in f]
  assert text == make_corpus.heldout_text(heldout)


def test_v2_tokenizer_encodes_chinese_near_one_token_per_character():
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "assets", "tokenizer_v2"))
  old = AutoTokenizer.from_pretrained(os.path.join(REPO, "assets", "tokenizer"))
  rows = [json.loads(l) for l in open(os.path.join(REPO, "data", "law", "train.jsonl"),
                                      encoding="utf-8")][:50]
  zh = "".join(m["content"] for r in rows for m in r["messages"])
  per_char = lambda t: len(t(zh, add_special_tokens=False)["input_ids"]) / len(zh)
  assert tok.vocab_size == 8192
  assert per_char(tok) < 1.5 < 2.5 < per_char(old)
