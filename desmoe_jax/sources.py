"""Where a run's model and data come from: local paths, or hub ids with an explicit `hf://`.

The rule (docs/METHOD.md section 8): a value starting with `hf://` is a Hugging Face hub id,
anything else is a local path, and a local path that does not exist is an error naming the
config field. Nothing is guessed: a relative path that happens to look like `owner/name` is a
local path.

  model.path              hf://owner/name[@revision]                 a model repository
  data.domains[i].train   hf://owner/name[@revision][/path/in/repo]  a dataset repository (or a
  data.domains[i].eval                                                file in it); `hf://datasets/`
  data.general(_mc)                                                   is accepted as well

Hub ids are fetched with `huggingface_hub.snapshot_download` into the usual hub cache
(HF_HUB_CACHE); with HF_HUB_OFFLINE=1 only what is already cached is used. `resolve(config)`
returns a copy of the config with local paths; the run saves the original, with its ids.
`push(folder, repo)` uploads a folder (the export, `export.hub_repo`).

`data.select` ("math,code") keeps the named domains, in that order (`select_domains`).
"""

from __future__ import annotations

import copy
import os

from desmoe_jax.errors import ConfigError, UserError

PREFIX = "hf://"


class SourceError(UserError, FileNotFoundError):
  """A path or hub id named by a config field cannot be used (the message names the field):
  one `error:` line and exit 2 from train.py / eval.py."""
  exit_code = 2


def parse_hub_id(value: str, field: str) -> tuple[str, str | None, str]:
  """"hf://owner/name@rev/sub/path" -> ("owner/name", "rev" or None, "sub/path")."""
  rest = value[len(PREFIX):]
  if rest.startswith("datasets/"):
    rest = rest[len("datasets/"):]
  parts = rest.split("/")
  if len(parts) < 2 or not parts[0] or not parts[1]:
    raise SourceError(f"{field}={value!r}: a hub id is hf://owner/name[@revision][/path]")
  name, _, revision = parts[1].partition("@")
  return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def fetch(value: str, field: str, repo_type: str) -> str:
  """Local path of a hub id (a snapshot directory, or a file inside it)."""
  from huggingface_hub import snapshot_download
  repo_id, revision, sub = parse_hub_id(value, field)
  offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  try:
    root = snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                             local_files_only=offline,
                             cache_dir=os.environ.get("HF_HUB_CACHE") or None)
  except Exception as e:  # noqa: BLE001 - the hub's errors are many; each is reported as is
    hint = " (HF_HUB_OFFLINE=1: only the local hub cache is used)" if offline else ""
    raise SourceError(f"{field}={value!r}: cannot fetch {repo_type} {repo_id!r}"
                      f"{'@' + revision if revision else ''}{hint}: "
                      f"{type(e).__name__}: {e}") from e
  path = os.path.join(root, sub) if sub else root
  if not os.path.exists(path):
    raise SourceError(f"{field}={value!r}: {sub!r} is not in {repo_type} {repo_id!r} "
                      f"(snapshot {root})")
  return path


def local(value: str, field: str, repo_type: str) -> str:
  """`value` as a local path: fetched if a hub id, checked to exist otherwise."""
  if value.startswith(PREFIX):
    return fetch(value, field, repo_type)
  if not os.path.exists(value):
    from desmoe_jax.paths import missing_bundle_hint
    raise SourceError(f"{field}={value!r} does not exist (a local path; a hub id needs the "
                      f"prefix hf://, e.g. hf://owner/name){missing_bundle_hint(value)}")
  return value


def select_domains(config) -> None:
  """Applies `data.select` to `data.domains` in place (idempotent: names kept in that order)."""
  select = config.data.get("select", "")
  if not select:
    return
  names = [n.strip() for n in select.split(",") if n.strip()]
  by_name = {d.name: d for d in config.data.domains}
  unknown = [n for n in names if n not in by_name]
  if unknown or len(set(names)) != len(names):
    raise ConfigError(f"config.data.select={select!r}: "
                     + (f"unknown domain(s) {unknown}" if unknown else "a name is repeated")
                     + f"; domains: {', '.join(by_name)}")
  config.data.domains = [by_name[n] for n in names]


def resolve(config):
  """A copy of `config` with `data.select` applied and every model/data source a local path
  (hub ids fetched). Raises SourceError naming the first field that cannot be used."""
  config = copy.deepcopy(config)
  select_domains(config)
  if config.model.path:
    config.model.path = local(config.model.path, "config.model.path", "model")
  for i, d in enumerate(config.data.domains):
    for split in ("train", "eval"):
      if d[split]:
        d[split] = local(d[split], f"config.data.domains[{i}].{split} ({d.name!r})", "dataset")
  for field in ("general", "general_mc"):
    if config.data[field]:
      config.data[field] = local(config.data[field], f"config.data.{field}", "dataset")
  return config


def push(folder: str, repo: str, *, commit_message: str = "desmoe-jax export") -> str:
  """Uploads `folder` to the hub model repository `repo` ("owner/name", or "hf://owner/name"),
  creating it if needed (private by default: an export is not published by accident). Needs a
  token (HF_TOKEN or `hf auth login`). Returns the commit URL."""
  from huggingface_hub import HfApi
  repo_id = parse_hub_id(repo, "config.export.hub_repo")[0] if repo.startswith(PREFIX) else repo
  if repo_id.count("/") != 1:
    raise ValueError(f"config.export.hub_repo={repo!r}: expected owner/name")
  api = HfApi()
  api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
  info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                           commit_message=commit_message)
  return str(getattr(info, "commit_url", info))
