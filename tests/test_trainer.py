"""The training run end to end on the embedded tiny model: outputs, exact resume after a kill
(also during a checkpoint save), a non-finite loss stopping the run, fail-fast config errors."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = dict(steps=8, log_every=1, eval_every=0, checkpoint_every=2)

# Runs trainer.train in a fresh process, optionally dying at a chosen moment (os._exit: no
# cleanup, like SIGKILL) or poisoning the loss, to exercise what a real crash does.
DRIVER = textwrap.dedent("""
    import importlib.util, json, logging, os, sys
    import jax.numpy as jnp
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("desmoe_jax").setLevel(logging.INFO)
    from desmoe_jax import checkpoint, trainer, train_step
    spec = importlib.util.spec_from_file_location("c", sys.argv[1])
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    config = mod.get_config("tiny")
    for k, v in json.loads(sys.argv[3]).items():
      setattr(config.train, k, v)
    config.data.batch_size, config.eval.loss_batches = 1, 1
    config.export.enabled = False
    action, at = sys.argv[4], int(sys.argv[5])
    if action == "die_in_save":     # start the async save of step `at`, then die before commit
      save = checkpoint.Checkpointer.save
      def dying_save(self, step, *a, **k):
        save(self, step, *a, **k)
        if step == at:
          os._exit(17)
      checkpoint.Checkpointer.save = dying_save
    if action == "die_after_step":  # die right after logging step `at`
      write = trainer.MetricsLog.write
      def dying_write(self, step, record, *a):
        write(self, step, record, *a)
        if step == at and "loss" in record:
          os._exit(17)
      trainer.MetricsLog.write = dying_write
    if action == "nan_at":          # the step's loss becomes NaN
      make = train_step.make_train_step
      def poisoned(*a, **k):
        fn = make(*a, **k)
        def step_fn(ms, opt, batch, step):
          ms, opt, m = fn(ms, opt, batch, step)
          m["loss"] = jnp.where(step == at - 1, jnp.nan, m["loss"])
          return ms, opt, m
        return step_fn
      train_step.make_train_step = poisoned
    trainer.train(config, sys.argv[2])
""")


def _run(tmp_path, workdir, action="none", at=0, **overrides):
  driver = tmp_path / "driver.py"
  driver.write_text(DRIVER)
  env = dict(os.environ, HF_HUB_OFFLINE="1",   # this checkout's package, whatever is installed
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  env.pop("XLA_FLAGS", None)  # one device, as a user's laptop
  return subprocess.run(
      [sys.executable, str(driver), os.path.join(REPO, "configs", "six_domains.py"),
       str(workdir), json.dumps(dict(OVERRIDES, **overrides)), action, str(at)],
      capture_output=True, text=True, env=env, timeout=900)


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        out[r["step"]] = r["loss"]  # a resumed run rewrites the steps it repeats: last wins
  return out


@pytest.fixture
def reference_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ref")
  result = _run(tmp, tmp / "work")
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / "work"


def test_resume_after_kills_gives_the_same_losses_and_outputs(reference_run, tmp_path):
  """(One test with the reference run: xdist would build a module fixture once per worker.)"""
  _check_outputs(reference_run)
  work = tmp_path / "work"
  died = _run(tmp_path, work, "die_in_save", 4)            # killed while saving step 4
  assert died.returncode == 17, died.stderr[-3000:]
  died = _run(tmp_path, work, "die_after_step", 5)         # resumes from 2, killed after step 5
  assert died.returncode == 17, died.stderr[-3000:]
  assert "resumed from step 2" in died.stderr
  finished = _run(tmp_path, work)                          # resumes from 4 and finishes
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "resumed from step 4" in finished.stderr
  ref, got = _losses(reference_run), _losses(work)
  assert sorted(got) == sorted(ref) == list(range(1, 9))
  np.testing.assert_array_equal([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)])
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "6", "8"]  # keep 3, no tmp left


def _check_outputs(reference_run):
  records = [json.loads(l) for l in open(reference_run / "metrics.jsonl")]
  steps = [r for r in records if "loss" in r]
  assert {"loss", "kd_loss", "lambda", "domain_loss", "mask_density", "expert_overlap",
          "tokens_per_s", "phase_name"} <= set(steps[0])
  assert [r["phase_name"] for r in steps][:2] == ["warmup", "warmup"]
  assert steps[-1]["phase_name"] == "consolidation"
  evals = [r for r in records if r.get("event") == "eval"]
  assert evals and "heldout_loss/general" in evals[-1]
  assert os.listdir(reference_run / "tb")
  plots = os.listdir(reference_run / "plots")
  assert "step000008_correlation.png" in plots and "step000008_overlap.png" in plots
  config = json.load(open(reference_run / "config.json"))
  assert config["train"]["steps"] == 8 and config["method"] == "desmoe"


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
  result = _run(tmp_path, tmp_path / "work", "nan_at", 5)
  assert result.returncode != 0
  assert "TrainingDiverged: non-finite loss between steps 5 and 5" in result.stderr
  assert "last good checkpoint (4)" in result.stderr
  assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["2", "4"]
  from desmoe_jax.checkpoint import Checkpointer
  assert Checkpointer(str(tmp_path / "work" / "checkpoints")).read_meta(4)["step"] == 4


def test_missing_model_path_fails_before_any_work():
  import importlib.util
  spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs",
                                                                  "six_domains.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  from desmoe_jax import trainer
  with pytest.raises(ValueError, match="--config.model.path=/path/to/DeepSeek-V2-Lite"):
    trainer.check_config(mod.get_config(""))
  config = mod.get_config("tiny")
  config.data.domains[2].train = ""
  with pytest.raises(ValueError, match=r"domains\[2\] \('law'\) has no train path"):
    trainer.check_config(config)


def test_heldout_losses_compile_once_per_run():
  """Evaluations after the first reuse its compiled program, also from a fresh nnx.split (what
  evaluate_model passes): no backend compile on the second call."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from helpers import tiny_model  # pylint: disable=import-outside-toplevel

  from desmoe_jax import trainer  # pylint: disable=import-outside-toplevel

  model = tiny_model(seed=4)
  rng = np.random.RandomState(0)
  batches = {d: [{"tokens": jnp.asarray(rng.randint(0, 64, (2, 10)), jnp.int32),
                  "segment_ids": jnp.ones((2, 10), jnp.int32),
                  "positions": jnp.tile(jnp.arange(10, dtype=jnp.int32), (2, 1)),
                  "loss_mask": jnp.ones((2, 10), jnp.float32)} for _ in range(2)]
             for d in ("a", "b")}
  compiles = []

  def listener(name, _secs, **_):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first = trainer.heldout_losses(*nnx.split(model), batches)
    after_first = len(compiles)
    second = trainer.heldout_losses(*nnx.split(model), batches)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert after_first > 0 and len(compiles) == after_first, compiles
  assert first == second and np.isfinite(first["a"])
