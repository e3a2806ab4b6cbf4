"""`load_config` gives what `--config=FILE:PRESETS --config.a.b=V` gives train.py (reference:
ml_collections' own flag parser), and names the field of every bad override."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIX = os.path.join(REPO, "configs", "six_domains.py")


def _from_flags(argv):
  values = flags.FlagValues()
  argv = ["train.py"] + argv
  holder = config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                           sys_argv=argv)  # override flags are made from argv
  values(argv)
  return holder.value


def test_matches_the_command_line():
  got = load_config(f"{SIX}:tiny,fft", {"train.steps": 7, "dges.phi": 0.5, "mesh.expert": 2,
                                        "data.general_mc": "", "export.enabled": False})
  want = _from_flags([f"--config={SIX}:tiny,fft", "--config.train.steps=7",
                      "--config.dges.phi=0.5", "--config.mesh.expert=2",
                      "--config.data.general_mc=", "--config.export.enabled=False"])
  assert got.to_dict() == want.to_dict()
  assert got.method == "fft" and got.train.steps == 7 and got.data.general_mc == ""
  # No preset: get_config() with its default argument, as `--config=FILE` calls it.
  assert load_config(SIX).to_dict() == _from_flags([f"--config={SIX}"]).to_dict()
  models = load_config(os.path.join(REPO, "configs", "models.py:v2_lite"))
  assert models.n_routed_experts == 64


def test_loaded_config_is_locked():
  config = load_config(f"{SIX}:tiny")
  config.train.steps = 3                      # existing fields stay settable
  with pytest.raises(AttributeError):
    config.train.stepz = 3                    # a misspelt field is not silently added


@pytest.mark.parametrize("key, value, error, match", [
    ("train.stepz", 3, KeyError, r"override 'train.stepz': .* has no field 'stepz' in train "
                                 r"\(fields: .*steps"),
    ("trian.steps", 3, KeyError, r"override 'trian.steps': 'trian' is not a config group"),
    ("train.steps.x", 3, KeyError, r"'train.steps' is not a config group"),
    ("methd", "fft", KeyError, r"has no field 'methd' in the top level"),
    ("train.steps", "many", TypeError, r"override 'train.steps'='many'"),
])
def test_bad_overrides_name_the_field(key, value, error, match):
  with pytest.raises(error, match=match):
    load_config(f"{SIX}:tiny", {key: value})


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.py"):
    load_config(str(tmp_path / "nope.py:tiny"))
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(AttributeError, match="defines no get_config"):
    load_config(str(tmp_path / "empty.py"))
  (tmp_path / "dict.py").write_text("def get_config():\n  return {'a': 1}\n")
  with pytest.raises(TypeError, match="returned a dict, not a ConfigDict"):
    load_config(str(tmp_path / "dict.py"))
  with pytest.raises(ValueError, match="unknown preset"):  # the file's own check
    load_config(f"{SIX}:tiny,huge")


def test_tiny_v2_preset_is_tiny_with_its_own_base_and_general_set():
  """The two tiny testbeds (docs/RESULTS.md, "Testbeds") differ in the base model and its
  held-out general text (and that text's genres) only."""
  tiny, v2 = load_config(f"{SIX}:tiny,fft"), load_config(f"{SIX}:tiny_v2,fft")
  assert v2.model.path.endswith(os.path.join("assets", "tiny_deepseek_v2_moe64"))
  assert v2.data.general.endswith(os.path.join("data", "corpus", "heldout.txt"))
  assert os.path.exists(v2.data.general)
  assert v2.data.general_genres.endswith(os.path.join("data", "corpus", "heldout.jsonl.gz"))
  assert os.path.exists(v2.data.general_genres) and tiny.data.general_genres == ""
  for c in (tiny, v2):
    c.model.path = c.data.general = c.data.general_genres = ""
  assert tiny.to_dict() == v2.to_dict()
  with pytest.raises(ValueError, match="at most one size preset"):
    load_config(f"{SIX}:tiny,tiny_v2")
