"""Multi-process (multi-host) runs through JAX's own distributed runtime, no launcher of ours.

* TPU pods, SLURM and other clusters JAX recognises: `jax.distributed.initialize()` with no
  arguments detects the coordinator, process count and id from the environment.
* Anywhere else (several processes on one machine, a plain GPU cluster): give
  --coordinator_address, --num_processes and --process_id to every process.
On CPU, cross-process collectives go through gloo.

Every process runs the same program on its own devices; data is generated identically on all
processes and each one places only its own shards of a batch (`global_batch`); orbax writes
checkpoints cooperatively; process 0 alone writes logs, plots and exports.
"""

from __future__ import annotations

import os

import jax
import numpy as np

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts the distributed runtime when this is a multi-process run; returns whether it did.

  Must run before any other JAX call that touches devices.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError("give all of --coordinator_address, --num_processes and --process_id, "
                     "or none (cluster environments are detected)")
  if num_processes is not None and num_processes <= 1:
    return False
  if coordinator_address is None and not any(k in os.environ for k in _CLUSTER_ENV):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
  if coordinator_address is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  return True


def global_array(value: np.ndarray, sharding) -> jax.Array:
  """A host array (identical on every process) as a global array: each process puts only the
  shards its own devices hold."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: global_array(v, sharding) for k, v in batch.items()}


def to_host(tree):
  """A pytree of (possibly multi-process sharded) arrays as numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
