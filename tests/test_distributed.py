"""Multi-process runs: `train.py` in 2 local CPU processes (4 simulated devices each, JAX's own
distributed runtime over localhost) against the same run in one process on 8 devices.

The 2-process run must see the single-process batch sequence (losses equal to float
tolerance), log once (process 0), evaluate over both processes, and write checkpoints through
orbax's multi-process path that a single process restores and continues from.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import E2E_MOE_IMPL, FAST_COMPILE_XLA_FLAGS

pytestmark = pytest.mark.e2e   # end-to-end (pyproject.toml markers): -m "not e2e" skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny preset, shrunk to what CI's 2 cores compile quickly: one schedule phase (t1=0,
# t2=1: stabilization from step 0, so one train-step compilation per run), 8 rows of 256
# tokens (one per device), held-out loss on two batches of general text only, which the HF
# export then folds the router on (one batch to fit, one to check) over the whole mesh.
# alr.loss=additive: under the convex mix the router's step-0 gradient is the KD gradient
# alone, exactly zero in exact arithmetic (the ALR equals the pretrained router at init), so
# its float value is rounding noise, which Adam (eps=1e-8) scales to full-size steps; a
# different but equally valid reduction order (8 devices in one process vs gloo across two)
# then takes another path. With the task gradient added, every step is determined.
NO_DOMAIN_EVAL = [f"--config.data.domains[{i}].eval=" for i in range(6)]
ARGS = ["--config=configs/six_domains.py:tiny", "--config.train.steps=3",
        "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=2", "--config.data.seq_len=256",
        "--config.data.batch_size=8", "--config.eval.loss_batches=2",
        "--config.schedule.t1=0.0", "--config.schedule.t2=1.0", "--config.alr.loss=additive",
        # a rate at which 3 steps visibly lower the loss (the check that it trained)
        "--config.optim.learning_rate=3e-3",
        f"--config.model.moe_impl={E2E_MOE_IMPL}", *NO_DOMAIN_EVAL]
TIMEOUT_S = 600


def _env(devices: int, cache_dir=None) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))}
  env.update(HF_HUB_OFFLINE="1", PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_XLA_FLAGS}")
  if cache_dir:  # the single-process resume reuses the reference run's compiled programs
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(argv: list[str], logs: list, devices: int, processes: int = 1,
           cache_dir=None) -> list[subprocess.Popen]:
  """Starts `argv` in `processes` processes (a coordinator on a free localhost port). Output
  goes to files: a full pipe would block one process while the other waits for it in a
  collective."""
  port = _free_port()
  flags = [[]] if processes == 1 else [
      [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
       f"--process_id={i}"] for i in range(processes)]
  procs = []
  for extra, log in zip(flags, logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen([sys.executable, *argv, *extra], cwd=REPO, stdout=f,
                                    stderr=subprocess.STDOUT, env=_env(devices, cache_dir)))
  return procs


def _wait(procs: list[subprocess.Popen]) -> list[int | None]:
  """Exit codes (None: still running after TIMEOUT_S, then killed)."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        break
    return [p.poll() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _launch(argv: list[str], logs: list, devices: int, processes: int = 1) -> list[int | None]:
  return _wait(_start(argv, logs, devices, processes))


def _train(*runs):
  """Runs train.py for each (workdir, logs, processes, extra flags), all at once: compiling
  is single-threaded, so a 1-process and a 2-process run side by side fill CI's 2 cores."""
  started = []
  for workdir, logs, processes, extra in runs:
    cache = os.path.join(os.path.dirname(workdir), "jit")
    started.append((logs, _start([os.path.join(REPO, "train.py"), *ARGS,
                                  f"--workdir={workdir}", *extra],
                                 logs, 8 // processes, processes, cache_dir=cache)))
  codes = [_wait(procs) for _, procs in started]  # all of them, even after a failure
  for (logs, procs), got in zip(started, codes):
    assert got == [0] * len(procs), "\n".join(
        f"=== {l} (exit codes {got})\n" + open(l).read()[-4000:] for l in logs)


def _records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(records):
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_match_one_process(tmp_path):
  ref, work, single = tmp_path / "ref", tmp_path / "work", tmp_path / "single"
  logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
  _train((ref, [tmp_path / "ref.log"], 1, []), (work, logs, 2, []))

  out0, out1 = (open(l).read() for l in logs)
  assert "process 0 of 2, 4 local devices of 8" in out0
  assert "process 1 of 2, 4 local devices of 8" in out1
  assert "mesh {'data': 1, 'fsdp': 8, 'expert': 1, 'tensor': 1} over 8 devices" in out0
  assert "held-out loss" in out0 and "held-out loss" not in out1  # process 1 logs warnings only

  # Logged once: one record per step (both processes appending would double them), one
  # TensorBoard event file, one set of plots.
  records = _records(work)
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
  assert [r.get("event") for r in records if "event" in r] == ["eval", "export"]
  assert len(os.listdir(work / "tb")) == 1
  assert sorted(os.listdir(work / "plots")) == ["step000003_correlation.png",
                                                "step000003_overlap.png"]
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "3"]

  ref_losses, got = _losses(_records(ref)), _losses(records)
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref_losses[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  assert ref_losses[3] < ref_losses[1]  # it trained: equal losses are not equal constants
  ref_eval = next(r for r in _records(ref) if r.get("event") == "eval")
  got_eval = next(r for r in records if r.get("event") == "eval")
  np.testing.assert_allclose(got_eval["heldout_loss/general"], ref_eval["heldout_loss/general"],
                             rtol=1e-5)

  # The export, folded and written across both processes, is the single-process one up to
  # the training's own float differences (the losses above agree to 1e-5, not bitwise); that
  # gathering is exact is test_export's mesh-vs-one-device comparison.
  from desmoe_jax.convert import Checkpoint
  ref_hf, got_hf = Checkpoint(str(ref / "hf")), Checkpoint(str(work / "hf"))
  assert sorted(got_hf.keys()) == sorted(ref_hf.keys())
  diff = {"router": 0.0, "other": 0.0}
  for key in ref_hf.keys():
    kind = "router" if key.endswith("mlp.gate.weight") else "other"
    a, b = np.asarray(got_hf.get(key), np.float64), np.asarray(ref_hf.get(key), np.float64)
    assert a.shape == b.shape, key
    diff[kind] = max(diff[kind], float(np.max(np.abs(a - b))))
  # 3 Adam steps of lr 1e-4 move a weight by at most 3e-4: a tensor written from the wrong
  # place or layer would differ by the weights' own scale (0.02) instead. Measured: 5.8e-5
  # (Adam normalises rounding-size gradient differences), routers 1.2e-6.
  assert diff["other"] < 3e-4 and diff["router"] < 1e-4, diff
  ref_report, got_report = (json.load(open(d / "hf" / "desmoe_export.json")) for d in (ref, work))
  assert got_report["fit_tokens"] == ref_report["fit_tokens"] == 8 * 256
  assert got_report["check_tokens"] == ref_report["check_tokens"] == 8 * 256
  assert abs(got_report["topk_set_agreement"] - ref_report["topk_set_agreement"]) < 0.01
  assert abs(got_report["heldout_loss_folded"] - ref_report["heldout_loss_folded"]) < 1e-4

  # The 2-process checkpoint restores in one process (8 devices, another process layout):
  # as if killed after step 2, step 3 then gives the reference loss again.
  shutil.copytree(work / "checkpoints", single / "checkpoints")
  shutil.rmtree(single / "checkpoints" / "3")
  log = tmp_path / "single.log"
  _train((single, [log], 1, ["--config.data.general=", "--config.export.enabled=False"]))
  assert "resumed from step 2" in open(log).read()
  records = _records(single)
  assert [r["step"] for r in records if "loss" in r] == [3]
  np.testing.assert_allclose(_losses(records)[3], ref_losses[3], rtol=1e-5)


# ------------------------------------------------------------------ the runtime's pieces

PIECES = r"""
import sys
import numpy as np
from desmoe_jax import distributed
flags = dict(a[2:].split("=") for a in sys.argv[1:])
assert distributed.initialize(flags["coordinator_address"], int(flags["num_processes"]),
                              int(flags["process_id"]))
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from desmoe_jax.sharding import make_mesh
mesh = make_mesh({"fsdp": 8})
x = np.arange(8 * 6 * 5, dtype=np.float32).reshape(8, 6, 5)
g = distributed.global_array(x, NamedSharding(mesh, P("fsdp")))
assert not g.is_fully_addressable
# This process holds rows 4i..4i+3 of the global batch, and only those.
rows = sorted(s.index[0].start for s in g.addressable_shards)
assert rows == [4 * jax.process_index() + k for k in range(4)], rows
for s in g.addressable_shards:
  np.testing.assert_array_equal(np.asarray(s.data), x[s.index])
y = jax.jit(lambda a: a * 2 + 1)(g)
np.testing.assert_array_equal(distributed.to_host(y), x * 2 + 1)
np.testing.assert_array_equal(distributed.to_host(y, chunk_bytes=3 * 6 * 5 * 4), x * 2 + 1)
t = distributed.to_host({"sum": y.sum(), "col": jax.jit(lambda a: a[:, 0, 0])(y)})
np.testing.assert_array_equal(t["col"], x[:, 0, 0] * 2 + 1)
assert t["sum"] == (x * 2 + 1).sum()
print("pieces ok", jax.process_index())
"""


def test_global_array_and_to_host_across_two_processes(tmp_path):
  script = tmp_path / "pieces.py"
  script.write_text(PIECES)
  logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
  codes = _launch([str(script)], logs, devices=4, processes=2)
  assert codes == [0, 0], "\n".join(open(l).read()[-3000:] for l in logs)
  assert "pieces ok 0" in open(logs[0]).read() and "pieces ok 1" in open(logs[1]).read()


# ------------------------------------------------------------------ when to initialize


@pytest.fixture
def clean_env(monkeypatch):
  for key in list(os.environ):
    if key.startswith(("JAX_COORDINATOR", "MEGASCALE_", "SLURM_", "OMPI_", "TPU_")):
      monkeypatch.delenv(key)
  return monkeypatch


def test_initialize_validates_its_flags(clean_env):
  from desmoe_jax import distributed
  with pytest.raises(ValueError, match="--coordinator_address, --num_processes and --process_id"):
    distributed.initialize("localhost:1234", num_processes=2)
  with pytest.raises(ValueError, match=r"--process_id=2: must be in 0\.\.1 \(--num_processes=2\)"):
    distributed.initialize("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="--num_processes=0: must be at least 1"):
    distributed.initialize("localhost:1234", 0, 0)
  with pytest.raises(ValueError, match="--distributed='maybe'"):
    distributed.initialize(mode="maybe")
  # Single-process cases return before touching JAX's runtime.
  assert not distributed.initialize()
  assert not distributed.initialize("localhost:1234", 1, 0)
  assert not distributed.initialize("localhost:1234", 2, 0, mode="off")
  import jax
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env, job", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "Slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),         # one task: single process
    ({"SLURM_JOB_ID": "7"}, None),                                 # sbatch shell, no srun step
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "GKE TPU"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),                # single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "w0:8080"}, "TPU multislice"),
    ({"JAX_COORDINATOR_ADDRESS": "w0:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_job_detection(clean_env, env, job):
  from desmoe_jax import distributed
  for k, v in env.items():
    clean_env.setenv(k, v)
  assert distributed.cluster_job() == job
