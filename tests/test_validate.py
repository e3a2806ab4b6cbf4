"""The config is validated as a whole before anything is loaded: every bad field is named on
its own line, and train.py / eval.py print the project's errors as one line and exit 2."""

import os
import subprocess
import sys

import ml_collections
import pytest
from conftest import one_device_env

from desmoe_jax import validate
from desmoe_jax.errors import ConfigError
from desmoe_jax.run_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "six_domains.py")


@pytest.mark.parametrize("presets", ["tiny", "tiny,fft", "tiny,esft_gate", "tiny,desmoe_no_alr"])
def test_shipped_configs_are_valid_and_every_field_has_a_rule(presets):
  config = load_config(f"{CONFIG}:{presets}")
  assert validate.problems(config) == []
  # A field without a rule would go unchecked: add it to validate.FIELDS.
  assert validate.unchecked_fields(config) == []


@pytest.mark.parametrize("field,value,needle", [
    ("train.log_every", 0, "train.log_every=0: must be >= 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0: must be >= 1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0: must be >= 1"),
    ("train.eval_every", -5, "train.eval_every=-5: must be >= 0"),
    ("train.steps", 0, "train.steps=0: must be >= 1"),
    ("train.skip_nonfinite_updates", -1, "train.skip_nonfinite_updates=-1: must be >= 0"),
    ("schedule.t1", 0.9, "schedule.t1=0.9, schedule.t2=0.7: need 0 <= t1 <= t2 <= 1"),
    ("schedule.t2", 1.5, "schedule.t2=1.5: must be in [0, 1]"),
    ("method", "desmoe2", "method='desmoe2': must be one of 'desmoe', 'fft'"),
    ("model.moe_impl", "fast", "model.moe_impl='fast': must be one of 'auto', 'dense'"),
    ("model.attention_impl", "flash", "model.attention_impl='flash': must be one of"),
    ("model.remat", "some", "model.remat='some': must be one of 'none', 'full', 'dots'"),
    ("model.expert_parallel", "a2a", "model.expert_parallel='a2a': must be one of"),
    ("model.dtype", "fp8", "model.dtype='fp8': must be one of"),
    ("model.path", "/no/such/model", "model.path='/no/such/model' is not a directory"),
    ("optim.learning_rate", 0.0, "optim.learning_rate=0.0: must be > 0, or -1"),
    ("optim.schedule", "step", "optim.schedule='step': must be one of"),
    ("optim.b2", 1.0, "optim.b2=1.0: must be in [0, 1)"),
    ("dges.phi", 0.0, "dges.phi=0.0: must be in (0, 1]"),
    ("dges.update_every", 0, "dges.update_every=0: must be >= 1"),
    ("esft.top_p", 1.5, "esft.top_p=1.5: must be in (0, 1], or -1"),
    ("esft.domain", 6, "esft.domain=6: there are 6 domains"),
    ("mesh.expert", 0, "mesh.expert=0: must be >= 1, or -1"),
    ("data.batch_size", 0, "data.batch_size=0: must be >= 1"),
    ("eval.code_timeout", 0.0, "eval.code_timeout=0.0: must be > 0"),
    ("optim.warmup_steps", 200, "optim.warmup_steps=200: must be < train.steps=120"),
    ("alr.mix", "adam", "alr.mix='adam': must be one of 'gradient', 'update'"),
    ("alr.alpha", "phase", "alr.alpha='phase': must be one of 'run', 'router'"),
    ("optim.decay_exclude", "norms+biases", "optim.decay_exclude='norms+biases': must be one of"),
])
def test_each_bad_field_is_one_line_naming_it(field, value, needle):
  config = load_config(f"{CONFIG}:tiny", {field: value})
  with pytest.raises(ConfigError) as e:
    validate.validate(config)
  assert needle in str(e.value)
  assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("fields,needle", [
    ({"alr.mix": "update", "alr.loss": "additive"}, "alr.mix='update': mixes the convex loss"),
    ({"optim.per_expert_bias_correction": True, "optim.name": "adafactor"},
     "optim.per_expert_bias_correction=True: counts AdamW's steps per expert"),
    ({"optim.per_expert_bias_correction": True, "optim.moments_dtype": "int8"},
     "optim.per_expert_bias_correction=True: counts AdamW's steps per expert"),
    ({"optim.host_offload": True, "optim.name": "adafactor"},
     "optim.name='adafactor' with optim.host_offload=True: not supported"),
])
def test_options_that_contradict_each_other_are_one_line(fields, needle):
  config = load_config(f"{CONFIG}:tiny", fields)
  with pytest.raises(ConfigError) as e:
    validate.validate(config)
  assert needle in str(e.value)
  assert len(str(e.value).splitlines()) == 1


def test_types_of_a_hand_written_config_are_checked():
  """A config file may build its ConfigDict from a dict, where nothing checks types."""
  d = load_config(f"{CONFIG}:tiny").to_dict()
  d["train"]["steps"] = "8"
  d["train"]["async_checkpoint"] = "yes"
  d["dges"]["update_every"] = 2.5
  d["data"]["domains"][1]["format"] = "chat"
  d["data"]["domains"][2]["weight"] = 0
  found = validate.problems(ml_collections.ConfigDict(d))
  assert found == [
      "train.steps='8': must be a number, not a str",
      "train.async_checkpoint='yes': must be True or False, not a str",
      "dges.update_every=2.5: must be a whole number",
      "data.domains[1] ('code').format='chat': must be one of 'auto', 'messages', "
      "'prompt_response'",
      "data.domains[2] ('law').weight=0.0: must be > 0",
  ]


def test_every_problem_is_reported_at_once_one_per_line():
  config = load_config(f"{CONFIG}:tiny", {"train.log_every": 0, "train.keep_checkpoints": 0,
                                          "mesh.data": -1})
  with pytest.raises(ConfigError) as e:
    validate.validate(config)
  lines = str(e.value).splitlines()
  assert lines[0] == "invalid config (3 problems):"
  assert lines[1:] == ["train.log_every=0: must be >= 1", "train.keep_checkpoints=0: must be >= 1",
                       "mesh.data/fsdp are all -1: at most one mesh axis may be -1"]


def test_domains_need_names_train_paths_and_unique_names():
  config = load_config(f"{CONFIG}:tiny")
  config.data.domains[2].train = ""
  config.data.domains[3].name = "math"
  found = validate.problems(config)
  assert ("data.domains[2] ('law').train='': must not be empty (every domain needs training "
          "data)") in found
  assert "data.domains: names ['math'] appear more than once (a name is a domain's id)" in found


def _cli(script, *args, cwd):
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True,
                        text=True, env=one_device_env(), cwd=cwd, timeout=300)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def test_train_py_refuses_bad_settings_in_one_line_before_any_work(tmp_path):
  work = tmp_path / "work"
  r = _cli("train.py", f"--config={CONFIG}:tiny", "--config.train.log_every=0",
           f"--workdir={work}", cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert _error_lines(r.stderr) == ["error: train.log_every=0: must be >= 1"]
  assert "Traceback" not in r.stderr
  assert not work.exists()                     # refused before the work directory was made
  r = _cli("train.py", f"--config={CONFIG}:tiny", "--config.train.stepz=3", f"--workdir={work}",
           cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert _error_lines(r.stderr) == [
      "error: --config.*: no config field 'stepz' (Did you mean \"steps\" instead of \"stepz\"?)"]
  assert "Traceback" not in r.stderr


def test_eval_py_on_a_mistyped_workdir_is_one_line_and_creates_nothing(tmp_path):
  work = tmp_path / "no_such_run"
  r = _cli("eval.py", f"--config={CONFIG}:tiny", f"--workdir={work}", cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert _error_lines(r.stderr) == [f"error: --workdir={str(work)!r} does not exist"]
  assert not work.exists()
  work.mkdir()                                  # exists, but holds no run
  r = _cli("eval.py", f"--config={CONFIG}:tiny", f"--workdir={work}", cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert _error_lines(r.stderr) == [
      f"error: no checkpoints: {work}/checkpoints does not exist (is --workdir the run's work "
      "directory?)"]
  assert os.listdir(work) == []
  assert "cannot schedule new futures" not in r.stderr and "Traceback" not in r.stderr


def test_eval_of_a_missing_hf_directory_is_refused_before_any_load(tmp_path):
  from desmoe_jax import evaluate
  with pytest.raises(ConfigError, match=r"--hf='.*/no_export' is not a directory"):
    evaluate.evaluate_run(load_config(f"{CONFIG}:tiny"), str(tmp_path / "run"),
                          hf_dir=str(tmp_path / "no_export"))
  assert os.listdir(tmp_path) == []
