"""Data pipeline: packing invariants on the bundled data, bad rows, determinism and resume."""

import json
import os
import warnings

import numpy as np
import pytest
from transformers import AutoTokenizer

from desmoe_jax import cli, data
from desmoe_jax.errors import DataError, DataFileMissing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
  return AutoTokenizer.from_pretrained(os.path.join(REPO, "assets", "tokenizer"))


def _spec(name, **kw):
  return data.DomainSpec(name=name, path=os.path.join(REPO, "data", name, "train.jsonl"), **kw)


@pytest.fixture(scope="module")
def mixture(tokenizer):
  specs = [_spec("math", max_examples=200), _spec("law", max_examples=100),
           _spec("translation", max_examples=200)]
  return data.MixtureIterator(specs, tokenizer, seq_len=512, batch_size=4, seed=0)


def test_packing_never_crosses_examples(mixture, tokenizer):
  for _ in range(3):
    b = next(mixture)
    assert set(b) == set(data.BATCH_KEYS) and all(v.shape == (4, 512) for v in b.values())
    for row in range(4):
      seg, pos, loss, dom = (b[k][row] for k in ("segment_ids", "positions", "loss_mask",
                                                 "domain_id"))
      starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
      for s in starts:
        if seg[s] == 0:
          continue
        assert pos[s] == 0 and loss[s] == 0          # a new example: position 0, not a target
      inside = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
      assert np.all(pos[1:][inside] == pos[:-1][inside] + 1)   # positions count up per example
      assert np.all(np.diff(seg[seg > 0]) >= 0)                # segments increase along the row
      pad = seg == 0
      assert not loss[pad].any() and not b["tokens"][row][pad].any() and not dom[pad].any()
      # Every target token lies in the assistant reply: decoding the targets of one example
      # gives exactly its reply (plus the end-of-sequence token).
      for s in np.unique(seg[seg > 0]):
        ids, tgt = b["tokens"][row][seg == s], loss[seg == s]
        text = tokenizer.decode(ids)
        reply = tokenizer.decode(ids[tgt > 0])
        assert text.endswith(reply) and reply.endswith(tokenizer.eos_token)
        assert "Assistant: " in text[:len(text) - len(reply)] and "User:" not in reply


def test_domain_tags_survive_packing(tokenizer):
  specs = [_spec("math", max_examples=50), _spec("intent", max_examples=50)]
  it = data.MixtureIterator(specs, tokenizer, seq_len=512, batch_size=4, seed=1,
                            domain_ids=[3, 5])
  math_texts = {tokenizer.decode(ids) for ids, _ in it.examples[0]}
  intent_texts = {tokenizer.decode(ids) for ids, _ in it.examples[1]}
  seen = set()
  for _ in range(4):
    b = next(it)
    for row in range(4):
      for s in np.unique(b["segment_ids"][row][b["segment_ids"][row] > 0]):
        sel = b["segment_ids"][row] == s
        dom = set(b["domain_id"][row][sel].tolist())
        assert len(dom) == 1
        text = tokenizer.decode(b["tokens"][row][sel])
        assert text in (math_texts if dom == {3} else intent_texts)
        seen |= dom
  assert seen == {3, 5}


def test_bad_rows_are_counted_and_named(tmp_path, tokenizer):
  path = tmp_path / "bad.jsonl"
  rows = [json.dumps({"prompt": "2+2?", "response": "4"}),
          json.dumps({"prompt": "no answer"}),                          # 2: missing field
          json.dumps({"prompt": "x", "response": 5}),                   # 3: wrong type
          json.dumps({"prompt": "x", "response": "   "}),               # 4: empty response
          json.dumps({"prompt": "long " * 400, "response": "y"}),       # 5: over-long
          '{"prompt": "broken"',                                        # 6: invalid JSON
          json.dumps(["not", "an", "object"]),                          # 7: not an object
          json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # 8: no assistant
          json.dumps({"prompt": "3+3?", "response": "6"})]
  path.write_text("\n".join(rows) + "\n")
  spec = data.DomainSpec("toy", str(path), max_bad_fraction=1.0)
  with pytest.warns(UserWarning) as record:
    examples, report = data.load_domain(spec, tokenizer, seq_len=256)
  assert len(examples) == 2 and report.rows == 9 and report.bad_count == 7
  msg = str(record[0].message)
  assert str(path) in msg and "'toy'" in msg
  by_reason = {r: lines for r, lines in report.bad.items()}
  assert by_reason["missing field 'response'"] == [2]
  assert by_reason["field 'response' is a int, not a string"] == [3]
  assert by_reason["empty response (field 'response')"] == [4]
  assert by_reason["over-long"] == [5]
  assert by_reason["invalid JSON"] == [6]
  assert by_reason["a JSON list, not an object"] == [7]
  assert by_reason["no non-empty assistant message (empty response)"] == [8]


def test_empty_or_missing_domain_is_an_error(tmp_path, tokenizer, capsys):
  with pytest.raises(DataFileMissing, match="'law2'.*does not exist") as missing:
    data.load_domain(data.DomainSpec("law2", str(tmp_path / "nope.jsonl")), tokenizer, 256)
  # train.py / eval.py print it as one line and exit 2 (a user's mistake, not a bug).
  assert isinstance(missing.value, FileNotFoundError) and cli.report(missing.value) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: domain 'law2': data file ")
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(DataError, match="'e'.*empty.jsonl is empty"):
    data.load_domain(data.DomainSpec("e", str(tmp_path / "empty.jsonl")), tokenizer, 256)
  (tmp_path / "allbad.jsonl").write_text('{"prompt": "x"}\n')
  with pytest.raises(ValueError, match="'b': no usable example"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data.load_domain(data.DomainSpec("b", str(tmp_path / "allbad.jsonl")), tokenizer, 256)


def test_deterministic_and_resumable(tokenizer):
  specs = [_spec("math", max_examples=40), _spec("translation", max_examples=60)]
  make = lambda: data.MixtureIterator(specs, tokenizer, seq_len=256, batch_size=3, seed=7)
  a = make()
  run = [next(a) for _ in range(12)]  # several epochs of the small domains
  b = make()
  for _ in range(5):
    next(b)
  state = json.loads(json.dumps(b.state()))  # it goes through a JSON checkpoint record
  c = make()
  c.restore(state)
  for expected in run[5:]:
    got = next(c)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])
  other = data.MixtureIterator(specs, tokenizer, seq_len=256, batch_size=3, seed=8)
  assert not np.array_equal(next(other)["tokens"], run[0]["tokens"])


def test_mixing_weights(tokenizer):
  specs = [_spec("math", max_examples=100, weight=3.0),
           _spec("translation", max_examples=100, weight=1.0)]
  it = data.MixtureIterator(specs, tokenizer, seq_len=256, batch_size=8, seed=0)
  counts = np.zeros(2)
  for _ in range(30):
    b = next(it)
    for row in range(8):
      for s in np.unique(b["segment_ids"][row][b["segment_ids"][row] > 0]):
        counts[b["domain_id"][row][b["segment_ids"][row] == s][0]] += 1
  assert 0.68 < counts[0] / counts.sum() < 0.82  # 3:1 -> 0.75 of the examples


def test_eval_examples_and_text_batches(tokenizer):
  code = data.load_eval_examples(data.DomainSpec("code", os.path.join(REPO, "data", "code",
                                                                      "eval.jsonl")),
                                 tokenizer, max_examples=3)
  assert len(code) == 3 and {"test", "entry_point"} <= set(code[0])
  assert tokenizer.decode(code[0]["prompt_ids"]).endswith("Assistant: ")
  batches = data.text_loss_batches(os.path.join(REPO, "data", "general", "heldout.txt"),
                                   tokenizer, seq_len=128, batch_size=2, max_batches=2)
  assert len(batches) == 2 and batches[0]["tokens"][0, 0] == tokenizer.bos_token_id
  assert batches[0]["loss_mask"][:, 0].sum() == 0 and batches[0]["loss_mask"][:, 1:].all()
  whole = data.text_loss_batches(os.path.join(REPO, "data", "general", "heldout.txt"),
                                 tokenizer, seq_len=128, batch_size=2, max_batches=0)
  ids = tokenizer(open(os.path.join(REPO, "data", "general", "heldout.txt")).read(),
                  add_special_tokens=False)["input_ids"]
  assert sum(int(b["segment_ids"][:, 0].sum()) for b in whole) == len(ids) // 127  # every row
  mc = data.load_multiple_choice(os.path.join(REPO, "data", "general", "mc.jsonl"))
  assert len(mc) == 200 and all(0 <= m["label"] < len(m["choices"]) for m in mc)


def test_genre_batches_cut_each_genre_as_its_own_text(tmp_path, tokenizer):
  """Per-genre general batches: each genre's documents joined by blank lines and cut exactly as
  text_loss_batches cuts a text file; a bad row is an error naming file and line."""
  import gzip
  plays = open(os.path.join(REPO, "data", "general", "heldout.txt")).read()
  docs = [{"genre": "drama", "text": plays[:20000]}, {"genre": "prose", "text": plays[20000:40000]},
          {"genre": "drama", "text": plays[40000:60000]}]
  path = tmp_path / "genres.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write("".join(json.dumps(d) + "\n" for d in docs))
  got = data.genre_loss_batches(str(path), tokenizer, seq_len=128, batch_size=2, max_batches=3)
  assert list(got) == ["drama", "prose"]
  joined = tmp_path / "drama.txt"
  joined.write_text(plays[:20000] + "\n\n" + plays[40000:60000])
  want = data.text_loss_batches(str(joined), tokenizer, seq_len=128, batch_size=2, max_batches=3)
  assert len(got["drama"]) == 3
  for g, w in zip(got["drama"], want):
    assert all(np.array_equal(g[k], w[k]) for k in w)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(docs[0]) + "\n" + json.dumps({"genre": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: a row needs a non-empty string 'genre'"):
    data.genre_loss_batches(str(bad), tokenizer, seq_len=128, batch_size=2, max_batches=1)
  short = tmp_path / "short.jsonl"
  short.write_text(json.dumps({"genre": "tiny", "text": "a few words"}) + "\n")
  with pytest.raises(ValueError, match=r"short.jsonl \(genre 'tiny'\) has fewer than 128"):
    data.genre_loss_batches(str(short), tokenizer, seq_len=128, batch_size=2, max_batches=1)
  with pytest.raises(FileNotFoundError, match=r"data.general_genres"):
    data.genre_loss_batches(str(tmp_path / "absent.jsonl"), tokenizer, seq_len=128,
                            batch_size=2, max_batches=1)


def test_non_utf8_lines_are_counted_by_line(tmp_path, tokenizer):
  """One bad byte costs its line, named file:line, not a bare UnicodeDecodeError for the file."""
  path = tmp_path / "latin1.jsonl"
  good = json.dumps({"prompt": "2+2?", "response": "4"}).encode()
  lines = [good] * 12
  lines[4] = '{"prompt": "caf\u00e9", "response": "x"}'.encode("latin-1")  # line 5: 0xe9
  path.write_bytes(b"\n".join(lines) + b"\n")
  with pytest.warns(UserWarning, match=r"latin1.jsonl: 1 of 12 rows .*not UTF-8: 1 \(lines 5\)"):
    examples, report = data.load_domain(data.DomainSpec("toy", str(path)), tokenizer, 256)
  assert len(examples) == 11 and report.bad == {"not UTF-8": [5]}


def test_too_many_bad_rows_fail_the_domain(tmp_path, tokenizer):
  path = tmp_path / "mostly_bad.jsonl"
  rows = [json.dumps({"prompt": "q", "response": "a"})] * 3 + ['{"prompt": "broken"'] * 47
  path.write_text("\n".join(rows) + "\n")
  with pytest.raises(ValueError, match=r"'bad': 47 of 50 rows of .*mostly_bad.jsonl are bad "
                                       r"\(94%, more than data.max_bad_fraction=0.1\)"), \
      warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data.load_domain(data.DomainSpec("bad", str(path)), tokenizer, 256)
  # At the limit it loads (10% bad is allowed by the default), and the limit is adjustable.
  path.write_text("\n".join([rows[0]] * 9 + [rows[-1]]) + "\n")
  with pytest.warns(UserWarning):
    examples, _ = data.load_domain(data.DomainSpec("ok", str(path)), tokenizer, 256)
  assert len(examples) == 9
  with pytest.raises(ValueError, match="max_bad_fraction=0"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data.load_domain(data.DomainSpec("ok", str(path), max_bad_fraction=0.0), tokenizer, 256)
  with pytest.raises(ValueError, match=r"max_bad_fraction=1.5 must be a number in \[0, 1\]"):
    data.DomainSpec("x", str(path), max_bad_fraction=1.5)


def test_eval_rows_are_validated_per_line(tmp_path, tokenizer):
  src = [json.loads(line) for line in
         open(os.path.join(REPO, "data", "code", "eval.jsonl")).readlines()[:3]]
  del src[1]["test"]
  path = tmp_path / "code_eval.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in src) + "\n")
  spec = data.DomainSpec("code", str(path))
  with pytest.raises(ValueError, match=r"code_eval.jsonl:2: missing field 'test'"):
    data.load_eval_examples(spec, tokenizer, required=data.EVAL_FIELDS["pass_at_1"])
  # Without the code metric's fields (the held-out loss) the row is fine; each knows its line.
  rows = data.load_eval_examples(spec, tokenizer)
  assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
  path.write_text(json.dumps({"prompt": "p", "answers": "not a list"}) + "\n" +
                  json.dumps({"prompt": "p", "answers": ["a"]}) + "\n")
  with pytest.raises(ValueError, match=r"1 of 2 held-out rows .*code_eval.jsonl:1: 'answers' "
                                       r"must be a non-empty list of strings"):
    data.load_eval_examples(spec, tokenizer)


def test_undecodable_whole_files_name_file_line_column(tmp_path, tokenizer):
  text = tmp_path / "general.txt"
  text.write_bytes(b"fine line\nsecond \xff line\n")
  with pytest.raises(ValueError, match=r"general.txt:2:8: byte 0xff is not UTF-8"):
    data.text_loss_batches(str(text), tokenizer, seq_len=16, batch_size=1, max_batches=1)
  arr = tmp_path / "rows.json"
  arr.write_bytes(b'[{"prompt": "a", "response": "b"},\n {"prompt": "\xc3", "response": "b"}]')
  with pytest.raises(ValueError, match=r"rows.json:2:\d+: byte 0xc3 is not UTF-8"):
    data.load_domain(data.DomainSpec("arr", str(arr)), tokenizer, 256)


def test_batched_tokenizing_equals_one_example_at_a_time(tokenizer):
  """load_domain tokenises a chunk of rows per tokenizer call: the same examples as
  tokenize_messages row by row, bad rows in place, chunk boundaries and max_examples included."""
  rows = data.read_rows(_spec("math"))[0][:40]                         # (line, row)
  rows.insert(7, (0, {"prompt": "long " * 400, "response": "y"}))     # over-long
  rows.insert(20, (0, {"prompt": "x", "response": "  "}))             # empty response
  to_msgs = lambda r: data.to_messages(r[1], _spec("math"))
  expected = []
  for r in rows:
    try:
      expected.append(data.tokenize_messages(tokenizer, to_msgs(r), 256))
    except data.BadRow as e:
      expected.append(str(e))
  for chunk in (1, 6, 256):
    got = [str(x) if isinstance(x, data.BadRow) else x
           for _, x in data.tokenize_rows(tokenizer, rows, to_msgs, 256, chunk)]
    assert len(got) == len(expected) == 42
    assert sum(isinstance(e, str) for e in expected) == 2
    for g, e in zip(got, expected):
      if isinstance(e, str):
        assert g == e
      else:
        np.testing.assert_array_equal(g[0], e[0])
        np.testing.assert_array_equal(g[1], e[1])
  examples, report = data.load_domain(_spec("math", max_examples=13), tokenizer, seq_len=256)
  ref = [e for e in expected if not isinstance(e, str)][:13]   # the file's first 13 good rows
  assert len(examples) == 13 and report.examples == 13
  for (ids, t), (rids, rt) in zip(examples, ref):
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_array_equal(t, rt)


def test_load_tokenizer_is_autotokenizer_without_torch(tmp_path):
  """A tokenizer.json tokenizer loads as the class AutoTokenizer gives, encodes and renders the
  same, and without torch; another tokenizer class still goes through AutoTokenizer."""
  import subprocess
  import sys
  path = os.path.join(REPO, "assets", "tokenizer")
  ours, auto = data.load_tokenizer(path), AutoTokenizer.from_pretrained(path)
  assert type(ours) is type(auto)
  msgs = [{"role": "user", "content": "Solve 2x = 6."}, {"role": "assistant", "content": "x=3"}]
  assert ours.apply_chat_template(msgs, tokenize=False) == auto.apply_chat_template(
      msgs, tokenize=False)
  for special in (False, True):
    assert (ours("x = 3, déjà", add_special_tokens=special)["input_ids"]
            == auto("x = 3, déjà", add_special_tokens=special)["input_ids"])
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == (auto.bos_token, auto.eos_token,
                                                             auto.pad_token)
  code = ("import sys; from desmoe_jax import data; data.load_tokenizer(sys.argv[1]); "
          "print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.stdout.strip() == "False"
  other = tmp_path / "other"
  auto.save_pretrained(other)
  config = json.loads((other / "tokenizer_config.json").read_text())
  (other / "tokenizer_config.json").write_text(json.dumps(dict(config,
                                                               tokenizer_class="GPT2Tokenizer")))
  calls = []
  import transformers
  real = transformers.AutoTokenizer.from_pretrained
  try:
    transformers.AutoTokenizer.from_pretrained = lambda p, **k: calls.append(p) or real(p, **k)
    data.load_tokenizer(str(other))
  finally:
    transformers.AutoTokenizer.from_pretrained = real
  assert calls == [str(other)]
