"""The training run end to end on the embedded tiny model: outputs, exact resume after a kill
(also during a checkpoint save) and after a SIGTERM preemption, a non-finite loss or state
stopping the run without saving it, a failed save stopping the run at once, a resume with a
changed config refused, fail-fast config errors."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import E2E_MOE_IMPL, one_device_env

pytestmark = pytest.mark.e2e   # end-to-end (pyproject.toml markers): -m "not e2e" skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = dict(steps=8, log_every=1, eval_every=0, checkpoint_every=2)
# One schedule phase (stabilization from step 0): for the fault tests whose check does not
# depend on crossing phases (a NaN, a failed save), one train-step compilation per run instead
# of two. The runs that resume across phases keep OVERRIDES' three.
ONE_PHASE = {"schedule.t1": 0.0, "schedule.t2": 1.0}

# Runs trainer.train in a fresh process, optionally dying at a chosen moment (os._exit: no
# cleanup, like SIGKILL) or poisoning the loss, to exercise what a real crash does.
DRIVER = textwrap.dedent("""
    import importlib.util, json, logging, os, sys
    import jax, jax.numpy as jnp
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("desmoe_jax").setLevel(logging.INFO)
    from desmoe_jax import checkpoint, cli, trainer, train_step
    spec = importlib.util.spec_from_file_location("c", sys.argv[1])
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    config = mod.get_config("tiny")
    for k, v in json.loads(sys.argv[3]).items():   # train fields, or "group.field"
      group, _, name = k.rpartition(".")
      setattr(config[group] if group else config.train, name, v)
    config.data.batch_size, config.eval.loss_batches = 1, 1
    config.data.seq_len, config.data.select = 256, "math,code"   # TRAIN_FLAGS' data
    config.export.enabled = False
    config.model.moe_impl = sys.argv[6]
    action, at = sys.argv[4], int(sys.argv[5])
    if action == "die_in_save":     # start the async save of step `at`, then die before commit
      save = checkpoint.Checkpointer.save
      def dying_save(self, step, *a, **k):
        save(self, step, *a, **k)
        if step == at:
          os._exit(17)
      checkpoint.Checkpointer.save = dying_save
    if action == "die_after_step":  # die right after logging step `at`, once every save
      # started before it has committed: a kill during a save is die_in_save's case, and here
      # whether step 4's async save beats step 5 would be a race (CI once lost it).
      write = trainer.MetricsLog.write
      opened = []
      init = checkpoint.Checkpointer.__init__
      def recording_init(self, *a, **k):
        init(self, *a, **k)
        opened.append(self)
      checkpoint.Checkpointer.__init__ = recording_init
      def dying_write(self, step, record, *a):
        write(self, step, record, *a)
        if step == at and "loss" in record:
          for c in opened:
            c.wait()
          os._exit(17)
      trainer.MetricsLog.write = dying_write
    if action == "nan_at":          # the step's loss becomes NaN
      make = train_step.make_train_step
      def poisoned(*a, **k):
        fn = make(*a, **k)
        def step_fn(ms, opt, batch, step, lr=None):
          ms, opt, m = fn(ms, opt, batch, step, lr)
          m["loss"] = jnp.where(step == at - 1, jnp.nan, m["loss"])
          return ms, opt, m
        return step_fn
      train_step.make_train_step = poisoned
    if action == "nan_params_at":   # after step `at`, parameters are NaN; the loss stays finite
      make = train_step.make_train_step
      def poisoned(*a, **k):
        fn = make(*a, **k)
        def step_fn(ms, opt, batch, step, lr=None):
          ms, opt, m = fn(ms, opt, batch, step, lr)
          ms = jax.tree.map(lambda x: jnp.where(step == at - 1, x * jnp.nan, x)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, ms)
          return ms, opt, m
        return step_fn
      train_step.make_train_step = poisoned
    cli.run(trainer.train, config, sys.argv[2])   # as train.py: one line and an exit code
""")


def _run(tmp_path, workdir, action="none", at=0, **overrides):
  driver = tmp_path / "driver.py"
  driver.write_text(DRIVER)
  return subprocess.run(
      [sys.executable, str(driver), os.path.join(REPO, "configs", "six_domains.py"),
       str(workdir), json.dumps(dict(OVERRIDES, **overrides)), action, str(at), E2E_MOE_IMPL],
      capture_output=True, text=True, env=one_device_env(), timeout=900)


def _losses(workdir):
  """{step: loss}; a resumed run drops what was logged after its checkpoint, so each step is
  logged once."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        assert r["step"] not in out, f"step {r['step']} logged twice"
        out[r["step"]] = r["loss"]
  return out


# train.py itself in a subprocess, after running `patch` (Python source) in that process: how
# faults that need the real entry point (signals, exit codes, one-line errors) are injected.
LAUNCH = textwrap.dedent("""
    import runpy, sys
    exec(sys.argv[1])
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
# Two domains of short sequences: what these tests check (faults, exit codes, resume) does not
# depend on the data, and tokenizing six domains and evaluating seven sets of 1024-token
# sequences in every run would dominate their time.
TRAIN_FLAGS = ["--config.data.batch_size=1", "--config.eval.loss_batches=1",
               "--config.export.enabled=False", "--config.data.seq_len=256",
               "--config.data.select=math,code", f"--config.model.moe_impl={E2E_MOE_IMPL}"]


def _train_py(workdir, *flags, patch="", wait=True, **overrides):
  """train.py on the tiny preset with OVERRIDES (as `_run` sets them), `flags` appended."""
  train = dict(OVERRIDES, **overrides)
  args = [sys.executable, "-c", LAUNCH, patch, os.path.join(REPO, "train.py"),
          f"--config={os.path.join(REPO, 'configs', 'six_domains.py')}:tiny",
          f"--workdir={workdir}", *TRAIN_FLAGS,
          *[f"--config.train.{k}={v}" for k, v in train.items()], *flags]
  env = one_device_env()
  if not wait:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
  return subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)


def _error_lines(stderr):
  """Each `error:` line printed by cli.report, with the indented detail lines after it."""
  out, inside = [], False
  for line in stderr.splitlines():
    inside = line.startswith("error:") or (inside and line.startswith("  "))
    if inside:
      out.append(line)
  return out


# Its two users are the first two tests, side by side: pytest-xdist (CI: -n 2 --dist worksteal)
# hands each worker a contiguous run of tests and steals from the end of it, so neighbours
# share a worker, and one reference run, where tests far apart in the file often did not.
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ref")
  result = _run(tmp, tmp / "work")
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / "work"


def test_resume_after_kills_gives_the_same_losses_and_outputs(reference_run, tmp_path):
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


def test_sigterm_preempts_saves_and_resumes_bit_identically(reference_run, tmp_path):
  """A real SIGTERM to train.py mid-run: it saves the current step, exits 75, and the rerun
  resumes there to the reference run's losses, bit for bit, each step logged once. No periodic
  checkpoint is due (checkpoint_every=100, a free-to-change field): the preemption's own save is
  the only one to resume from. A third run with a changed config is then refused before any
  model load."""
  work = tmp_path / "work"
  proc = _train_py(work, wait=False, checkpoint_every=100)
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any('"loss"' in l for l in metrics.read_text().splitlines()[1:]):
      break                                   # step 2 is logged: preempt from step 3 on
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be preempted"
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 75, stderr[-3000:]
  step = int(re.search(r"preempted at step (\d+) \(SIGTERM\)", stderr).group(1))
  assert 2 <= step < 8, stderr[-3000:]
  assert os.listdir(work / "checkpoints") == [str(step)]
  assert stderr.rstrip().splitlines()[-1] == (
      f"preempted at step {step} by SIGTERM; {work}/checkpoints/{step} is committed: rerun the "
      "same command to resume")

  resumed = _train_py(work, checkpoint_every=100)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {step}" in resumed.stderr
  ref, got = _losses(reference_run), _losses(work)
  assert sorted(got) == sorted(ref) == list(range(1, 9))
  np.testing.assert_array_equal([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)])

  changed = _train_py(work, "--config.optim.learning_rate=0.001", steps=10)
  assert changed.returncode == 2, changed.stderr[-3000:]
  assert _error_lines(changed.stderr) == [
      f"error: resuming {work}/checkpoints/8 with a config that changes the run (2 fields); "
      "rerun with --allow_config_change to accept, or use another --workdir:",
      "  optim.learning_rate: 0.0003 -> 0.001", "  train.steps: 8 -> 10"]
  assert _losses(work) == got                    # nothing was run


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
  result = _run(tmp_path, tmp_path / "work", "nan_at", 5, **ONE_PHASE)
  assert result.returncode == 3, result.stderr[-3000:]               # TrainingDiverged
  ckpts = tmp_path / "work" / "checkpoints"
  assert _error_lines(result.stderr) == [
      f"error: non-finite loss between steps 5 and 5; the last good checkpoint is {ckpts}/4 "
      "(intact). Lower optim.learning_rate, check the data, or set "
      "train.skip_nonfinite_updates."]
  assert sorted(os.listdir(ckpts)) == ["2", "4"]
  from desmoe_jax.checkpoint import Checkpointer
  assert Checkpointer(str(ckpts)).read_meta(4)["step"] == 4


def test_nan_parameters_with_a_finite_loss_are_never_saved(tmp_path):
  """The step that makes every parameter NaN reports the loss of the parameters before it,
  which is finite; the save right after it must be refused, and the newest checkpoint on disk
  must be finite."""
  result = _run(tmp_path, tmp_path / "work", "nan_params_at", 4, steps=6, **ONE_PHASE)
  assert result.returncode == 3, result.stderr[-3000:]
  ckpts = tmp_path / "work" / "checkpoints"
  (line,) = _error_lines(result.stderr)
  assert re.fullmatch(
      r"error: non-finite values at step 4 in \d+ arrays \(model/.*\) with a finite loss: not "
      rf"saved; the last good checkpoint is {re.escape(str(ckpts))}/2, whose state is finite\. .*",
      line), line
  assert sorted(os.listdir(ckpts)) == ["2"]
  losses = _losses(tmp_path / "work")
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  import orbax.checkpoint as ocp
  for item in ("model", "opt_state"):
    tree = ocp.StandardCheckpointer().restore(ckpts / "2" / item)
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(tree)]
    assert leaves and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


def test_failed_save_stops_the_run_at_once_with_one_line(tmp_path):
  """The disk 'fills up' after checkpoint 2 (RLIMIT_FSIZE: every write past 256 KiB fails with
  EFBIG, root included): the background save of step 4 fails, and the run stops at the next
  step with one line naming the checkpoint and the last good one, exit code 4."""
  patch = textwrap.dedent("""
      import resource, signal
      from desmoe_jax import checkpoint
      finish = checkpoint.Checkpointer._finish_pending
      def finish_then_fill_disk(self):
        step = self._pending
        finish(self)
        if step == 2:
          signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
          resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
      checkpoint.Checkpointer._finish_pending = finish_then_fill_disk
  """)
  work = tmp_path / "work"
  result = _train_py(work, *[f"--config.{k}={v}" for k, v in ONE_PHASE.items()], patch=patch)
  assert result.returncode == 4, result.stderr[-3000:]
  (line,) = _error_lines(result.stderr)
  assert line.startswith(f"error: saving checkpoint {work}/checkpoints/4 failed ("), line
  assert "File too large" in line
  assert line.endswith(f"the last good checkpoint is {work}/checkpoints/2. Free space or fix "
                       "the directory's permissions, then rerun the same command to resume "
                       "from it."), line
  assert max(_losses(work)) <= 5                 # stopped at once, not at the end
  assert "Traceback" not in result.stderr
  assert len(result.stderr.splitlines()) < 60, result.stderr


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
  with pytest.raises(ValueError, match=r"domains\[2\] \('law'\)\.train='': must not be empty"):
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
  # Off for this test: a program another test already put in the suite's persistent cache
  # would load without a backend compile, and the first call must compile.
  cache_was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    first = trainer.heldout_losses(*nnx.split(model), batches)
    after_first = len(compiles)
    second = trainer.heldout_losses(*nnx.split(model), batches)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was)
    jax.monitoring.unregister_event_duration_listener(listener)
  assert after_first > 0 and len(compiles) == after_first, compiles
  assert first == second and np.isfinite(first["a"])


SPECIALIZE = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING)
    from desmoe_jax import cli, trainer
    from desmoe_jax.configs.six_domains import get_config
    config = get_config("tiny")
    for dotted, value in json.loads(sys.argv[2]).items():
      group, *mid, name = dotted.split(".")
      node = config[group]
      for m in mid:
        node = node[m]
      node[name] = value
    cli.run(trainer.train, config, sys.argv[1])
""")


def test_experts_no_domain_owns_are_exported_bit_identical(tmp_path):
  """The done criterion of the mask refresh at the end of phase I: a short DES-MoE run whose
  phase II starts (step 2 of 6) long before the first dges.update_every refresh (1000), with a
  high dges.phi, leaves every expert that no domain owns bit-identical to the base model in the
  exported safetensors (before, the masks were all ones in phase II and every expert moved).
  The run's evaluation also logs the ALR/teacher top-k agreement."""
  from desmoe_jax import evaluate
  from desmoe_jax.configs.six_domains import get_config
  from desmoe_jax.specialization import des_state

  work = tmp_path / "work"
  fields = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 0,
            "train.checkpoint_every": 6, "data.select": "math,code", "data.batch_size": 1,
            "data.seq_len": 256, "eval.loss_batches": 1, "data.general_mc": "",
            "dges.update_every": 1000, "dges.phi": 0.95, "model.moe_impl": E2E_MOE_IMPL}
  env = one_device_env()
  result = subprocess.run([sys.executable, "-c", SPECIALIZE, str(work), json.dumps(fields)],
                          capture_output=True, text=True, env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]

  config = get_config("tiny")
  config.data.domains = [d for d in config.data.domains if d.name in ("math", "code")]
  model, _ = evaluate.load_run_model(config, str(work))
  owned_le = np.asarray(des_state(model).expert_mask[...]).max(axis=1) > 0        # [L, E]
  assert 0 < owned_le.sum() < owned_le.size
  moved = _moved_experts(work, config, model)
  assert not (moved & ~owned_le).any(), "an expert no domain owns moved"
  assert moved[owned_le].any()                        # the owned ones did train
  evals = [json.loads(l) for l in open(work / "metrics.jsonl") if '"eval"' in l]
  assert 0.0 <= evals[-1]["alr_teacher_topk_agreement"] <= 1.0


def _moved_experts(work, config, model) -> np.ndarray:
  """[L, E] True where the exported expert differs from the base model's in any bit."""
  from safetensors.numpy import load_file
  base = load_file(os.path.join(config.model.path, "model.safetensors"))
  exported = {}
  for name in os.listdir(work / "hf"):
    if name.endswith(".safetensors"):
      exported.update(load_file(str(work / "hf" / name)))
  first_moe = model.config.first_k_dense_replace
  layers = model.config.num_hidden_layers - first_moe
  moved = np.zeros((layers, model.config.n_routed_experts), bool)
  for layer, expert in np.ndindex(*moved.shape):
    for proj in ("gate_proj", "up_proj", "down_proj"):
      key = f"model.layers.{first_moe + layer}.mlp.experts.{expert}.{proj}.weight"
      moved[layer, expert] |= not np.array_equal(base[key], exported[key])
  return moved


def test_oracle_dges_excludes_the_top_general_experts_and_leaves_them_bit_identical(tmp_path):
  """dges.exclude_general_top: the N experts per layer to which the base model routes the most
  general text (counted here directly from the base model's top-k ids) are in no domain's mask
  and end a run bit-identical in the export, although the masks refresh every step at a low
  phi that gives the domains most experts, and experts train from step 0 (router+experts)."""
  import jax
  from flax import nnx

  from desmoe_jax import data as data_lib
  from desmoe_jax import evaluate, trainer
  from desmoe_jax.configs.six_domains import get_config
  from desmoe_jax.specialization import des_state
  from transformers import AutoTokenizer

  n, seq_len = 8, 256
  work = tmp_path / "work"
  fields = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 0,
            "train.checkpoint_every": 6, "data.select": "math,code", "data.batch_size": 1,
            "data.seq_len": seq_len, "eval.loss_batches": 1, "data.general_mc": "",
            "dges.update_every": 1, "dges.phi": 0.3, "dges.exclude_general_top": n,
            "schedule.warmup_trains": "router+experts", "model.moe_impl": E2E_MOE_IMPL}
  result = subprocess.run([sys.executable, "-c", SPECIALIZE, str(work), json.dumps(fields)],
                          capture_output=True, text=True, env=one_device_env(), timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]

  config = get_config("tiny")
  config.data.domains = [d for d in config.data.domains if d.name in ("math", "code")]
  config.data.seq_len, config.data.batch_size = seq_len, 1
  config.model.moe_impl = E2E_MOE_IMPL
  config.dges.exclude_general_top = n
  base_model = evaluate.load_model(config.model.path, config)
  tokenizer = AutoTokenizer.from_pretrained(config.model.path)
  batches = data_lib.text_loss_batches(config.data.general, tokenizer, seq_len=seq_len,
                                       batch_size=1,
                                       max_batches=trainer.GENERAL_SAMPLE_TOKENS // seq_len)
  graphdef, state = nnx.split(base_model)
  ids = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, return_routing=True).routing.topk_ids)
  e = base_model.config.n_routed_experts
  counts = sum(np.stack([np.bincount(np.asarray(layer).ravel(), minlength=e)
                         for layer in ids(state, b["tokens"])]) for b in batches)   # [L, E]
  top = np.argsort(-counts, axis=-1, kind="stable")[:, :n]
  want = np.zeros(counts.shape, bool)
  np.put_along_axis(want, top, True, axis=-1)

  model, _ = evaluate.load_run_model(config, str(work))
  des = des_state(model)
  np.testing.assert_array_equal(np.asarray(des.excluded[...]) > 0, want)
  mask = np.asarray(des.expert_mask[...]) > 0                                  # [L, D, E]
  assert not mask.transpose(0, 2, 1)[want].any(), "an excluded expert is in a mask"
  assert mask.transpose(0, 2, 1)[~want].mean() > 0.25     # phi = 0.3: the rest mostly owned
  moved = _moved_experts(work, config, model)
  assert not moved[want].any(), "an excluded expert moved"
  assert moved[~want].any()


def test_oracle_dges_config_errors_name_the_fields(tmp_path):
  """dges.exclude_general_top ranks experts on data.general with the pretrained model: without
  general text, or starting from another run's trained model, it is refused before any load."""
  from desmoe_jax import trainer
  from desmoe_jax.configs.six_domains import get_config
  from desmoe_jax.errors import ConfigError
  config = get_config("tiny")
  config.dges.exclude_general_top = 4
  trainer.check_config(config)
  config.data.general = ""
  with pytest.raises(ConfigError, match="exclude_general_top.*data.general"):
    trainer.check_config(config)
  config = get_config("tiny")
  config.dges.exclude_general_top = 4
  config.train.init_from = str(tmp_path)
  with pytest.raises(ConfigError, match="exclude_general_top.*init_from"):
    trainer.check_config(config)
