"""docs/METHOD.md is the repository's own statement of the method: every config field the presets
build has a row in its table (a new field cannot ship undocumented), every documented field
exists, and every file the code and README cite as METHOD.md is the one in docs/."""

import os
import re

import ml_collections

from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = os.path.join(REPO, "docs", "METHOD.md")


def _leaves(config, prefix=""):
  out = set()
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out |= _leaves(value, name + ".")
    elif key == "domains" and prefix == "data.":
      out.add(name)
      for domain in value:
        out |= {f"data.domains[i].{k}" for k in domain.keys()}
    else:
      out.add(name)
  return out


def _documented():
  """Field names of the table in section 8 (`a.b`, `a.b`, ... and `a.b.c`, `.d` shorthands)."""
  text = open(METHOD, encoding="utf-8").read()
  table = text[text.index("## 8. Every config field"):]
  names = set()
  for line in table.splitlines():
    if not line.startswith("| `"):
      continue
    cell = line.split("|")[1]
    first = None
    for name in re.findall(r"`([^`]+)`", cell):
      if name.startswith("."):
        name = first.rsplit(".", 1)[0] + name
      first = first or name
      names.add(name)
  return names


def test_every_config_field_is_documented_and_every_documented_field_exists():
  fields = set()
  for presets in ("", "tiny", "tiny,fft"):
    fields |= _leaves(load_config(os.path.join(REPO, "configs", f"six_domains.py:{presets}")))
  documented = _documented()
  assert fields - documented == set(), "fields missing from docs/METHOD.md section 8"
  assert documented - fields == set(), "docs/METHOD.md documents fields the config lacks"


def test_citations_point_at_the_file_in_the_repository():
  assert os.path.isfile(METHOD)
  cited = []
  for root in ("README.md", "desmoe_jax", "configs", "docs", "colab", "scripts"):
    path = os.path.join(REPO, root)
    files = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
        if f.endswith((".py", ".md", ".ipynb"))]
    for f in files:
      if f == METHOD:
        continue
      for line in open(f, encoding="utf-8"):
        for m in re.finditer(r"[\w./-]*METHOD\.md", line):
          cited.append((f, m.group(0)))
  assert cited, "nothing cites METHOD.md"
  # A citation resolves from the repository root ("docs/METHOD.md") or, for a Markdown link,
  # from the citing file's folder; a bare "METHOD.md" outside docs/ resolves to nothing.
  bad = [(os.path.relpath(f, REPO), c) for f, c in cited
         if not (os.path.isfile(os.path.join(REPO, c))
                 or (f.endswith(".md") and os.path.isfile(os.path.join(os.path.dirname(f), c))))]
  assert bad == []


# ------------------------------------------------------------------ licences


def _data_sets():
  data = os.path.join(REPO, "data")
  return sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d)))


def test_licence_files_cover_every_shipped_data_set_and_asset():
  license_text = open(os.path.join(REPO, "LICENSE"), encoding="utf-8").read()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert 'license = {text = "Apache-2.0"}' in open(os.path.join(REPO, "pyproject.toml")).read()
  notice = open(os.path.join(REPO, "NOTICE"), encoding="utf-8").read()
  assets = sorted(os.listdir(os.path.join(REPO, "assets")))
  assert [d for d in _data_sets() if f"data/{d}/" not in notice] == []
  assert [a for a in assets if f"assets/{a}/" not in notice] == []
  readme = open(os.path.join(REPO, "data", "README.md"), encoding="utf-8").read()
  rows = {line.split("|")[1].strip(" `"): line.split("|")[-2] for line in readme.splitlines()
          if line.startswith("| `")}
  for domain in set(_data_sets()) - {"general", "corpus"}:
    assert re.search(r"Apache|PSF|MIT|licen[cs]e", rows[domain]), domain
  # The pretraining corpus: a licence per genre, and one per document in SOURCES.tsv.
  genres = {line.split("|")[1].strip(" *"): line.split("|")[-2] for line in readme.splitlines()
            if line.startswith("| **")}
  assert len(genres) == 9
  for genre, licence in genres.items():
    assert re.search(r"Apache|PSF|MIT|BSD|GPL|licen[cs]e|public domain|copying", licence), genre
  assert "SOURCES.tsv" in readme
  assert "public domain" in readme and "general/" in readme


def test_gpl_data_is_labelled_row_by_row():
  """Every catalog / package present in the data has its line in the folder's LICENSES.md."""
  import json
  for folder, key in (("translation", "catalog"), ("summary", "package")):
    listed = open(os.path.join(REPO, "data", folder, "LICENSES.md"), encoding="utf-8").read()
    assert "not under the repository's Apache-2.0 licence" in listed
    sources = set()
    for split in ("train", "eval"):
      with open(os.path.join(REPO, "data", folder, f"{split}.jsonl"), encoding="utf-8") as f:
        sources |= {json.loads(line)[key] for line in f if line.strip()}
    assert sources and [s for s in sorted(sources) if f"| `{s}` |" not in listed] == []



def _rows():
  """{field: (its default in the table, the row's meaning)} of section 8: a row naming several
  fields gives each its default in order when it shows one per field, else the first."""
  text = open(METHOD, encoding="utf-8").read()
  table = text[text.index("## 8. Every config field"):]
  rows = {}
  for line in table.splitlines():
    if not line.startswith("| `"):
      continue
    cells = [c.strip() for c in line.split("|")[1:-1]]
    names, first = [], None
    for name in re.findall(r"`([^`]+)`", cells[0]):
      if name.startswith("."):
        name = first.rsplit(".", 1)[0] + name
      first = first or name
      names.append(name)
    shown = re.findall(r"`([^`]*)`", cells[1].split("(tiny")[0])
    for i, name in enumerate(names):
      default = shown[i] if len(shown) == len(names) else (shown[0] if shown else None)
      rows[name] = (default, cells[1] + " " + cells[2])
  return rows


def _same(shown: str, value) -> bool:
  if shown == '""':
    return value == ""
  if isinstance(value, str) and os.path.isabs(value):   # a bundled file, cited from the repo
    return os.path.relpath(value, REPO) == shown
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    try:
      return float(shown) == float(value)
    except ValueError:
      return False
  return shown == str(value)


def test_section_8_agrees_with_the_presets_and_the_schema():
  """One source for each field: the paper preset's default (configs/six_domains.py) is the
  table's, and a row that lists a field's choices lists every choice its rule (validate.FIELDS,
  from the dataclasses' declared rules) allows."""
  from desmoe_jax import validate
  paper = load_config(os.path.join(REPO, "configs", "six_domains.py"))
  rows = _rows()
  wrong_default, missing_choices = [], []
  for field, rule in validate.FIELDS.items():
    if field not in rows:
      continue
    default, text = rows[field]
    value = paper
    for part in field.split("."):
      value = value[part]
    if default is not None and not _same(default, value):
      wrong_default.append(f"{field}: table {default!r}, preset {value!r}")
    named = set(re.findall(r"`([^`]+)`", text))
    choices = {c for c in rule.choices if c}
    if len(named & choices) >= 2 and choices - named:
      missing_choices.append(f"{field}: {sorted(choices - named)}")
  assert wrong_default == []
  assert missing_choices == []
