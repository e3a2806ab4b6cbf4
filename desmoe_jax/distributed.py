"""Multi-process (multi-host) runs through JAX's own distributed runtime, no launcher of ours.

Every process runs the same `train.py` on its own devices (JAX's multi-controller model):

* Slurm, Open MPI, GKE TPU and multislice jobs are recognised from their environment, and
  `jax.distributed.initialize()` (no arguments) takes coordinator, process count and id from it.
* Cloud TPU VM pod slices mark nothing in the environment (JAX asks the metadata server):
  pass --distributed=on.
* Anywhere else (several processes on one machine, a plain GPU cluster): give
  --coordinator_address, --num_processes and --process_id to every process.

Data: every process builds the same global batch and places only the shards its own devices
hold (`global_batch`), so the batch sequence is the single-process one. Host reads of arrays
that span other processes go through `to_host` (a collective: every process must call it, in
the same order). orbax writes checkpoints cooperatively; process 0 alone writes logs, plots,
config and the export.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from desmoe_jax.errors import ConfigError

log = logging.getLogger("desmoe_jax")

MODES = ("auto", "on", "off")


def cluster_job() -> str | None:
  """Name of the multi-process job the environment describes (what JAX's own cluster detection
  would use), or None. Looks at environment variables only: nothing touches a device."""
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    return "JAX_COORDINATOR_ADDRESS"
  if "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "TPU multislice"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "Slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in hosts:
    return "GKE TPU"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto") -> bool:
  """Starts JAX's distributed runtime when this is a multi-process run; returns whether it did.

  mode: "auto" (explicit arguments, else a job `cluster_job` recognises), "on" (always; JAX
  detects the rest, e.g. on Cloud TPU pod slices), "off" (never). Must run before anything
  touches a device.
  """
  if mode not in MODES:
    raise ConfigError(f"--distributed={mode!r}: expected one of {MODES}")
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ConfigError("give all of --coordinator_address, --num_processes and --process_id, "
                     "or none (cluster environments are detected)")
  if num_processes is not None:
    if num_processes < 1:
      raise ConfigError(f"--num_processes={num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id}: must be in 0..{num_processes - 1} "
                       f"(--num_processes={num_processes})")
  if mode == "off" or (num_processes is not None and num_processes <= 1):
    return False
  job = "flags" if coordinator_address is not None else cluster_job()
  if mode == "auto" and job is None:
    return False
  # CPU backend only (GPU/TPU use their own interconnect); gloo is the default in recent JAX.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  log.info("distributed runtime (%s): process %d of %d, %d local devices of %d",
           job or "detected by JAX", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def global_array(value: np.ndarray, sharding) -> jax.Array:
  """A host array, identical on every process, as a global array: each process copies only
  the blocks its own devices hold (no cross-process traffic, unlike `jax.device_put`, which
  first checks with a collective that the value is the same everywhere)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: global_array(v, sharding) for k, v in batch.items()}


def to_host(tree, chunk_bytes: int = 1 << 30):
  """A pytree of arrays as numpy, the same on every process.

  Arrays this process holds whole (single process, or replicated) are read directly; the
  others are all-gathered. That is a collective, so every process must make the same calls
  in the same order (the branch depends on shardings only, which all processes share). A
  gather replicates its input on every device, so arrays above `chunk_bytes` are gathered in
  slices along their first axis (e.g. a few stacked layers at a time). Under tracing (e.g.
  `nnx.eval_shape` of a model build, as scripts/memory_plan.py does) there is no value to
  read: tracers pass through unchanged.
  """
  return jax.tree.map(lambda x: _gather(x, chunk_bytes), tree)


def _gather(x, chunk_bytes: int) -> np.ndarray:
  if isinstance(x, jax.core.Tracer):
    return x
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  if x.ndim == 0 or x.nbytes <= chunk_bytes or x.shape[0] == 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  rows = max(1, x.shape[0] * chunk_bytes // x.nbytes)
  return np.concatenate([np.asarray(multihost_utils.process_allgather(x[i:i + rows], tiled=True))
                         for i in range(0, x.shape[0], rows)])


def barrier(name: str):
  """All processes wait here for each other (nothing to do in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
