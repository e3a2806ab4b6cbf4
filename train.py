r"""Train one DeepSeek-V2 MoE on several labelled domains with DES-MoE (or a baseline).

  python train.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny
  python train.py --config=configs/six_domains.py --config.model.path=/path/to/DeepSeek-V2-Lite \
      --workdir=gs://bucket/run1 --config.method=desmoe

All outputs go to --workdir (see desmoe_jax/trainer.py); rerunning the same command resumes
from the newest checkpoint there.

Multi-process (every process runs this same command; see desmoe_jax/distributed.py): Slurm,
Open MPI and GKE TPU jobs are detected; on Cloud TPU pod slices add --distributed=on; elsewhere
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.

Rerunning with a config that changes the run (steps, batch size, learning rate, method,
schedule, data, model...) is refused with the list of differences; --allow_config_change
accepts it. SIGTERM or Ctrl-C saves the current step and stops (exit 75; rerun to resume).

Exit codes (desmoe_jax/errors.py): 0 done; 2 bad setting, flag, path or run directory (one
`error:` line per problem, nothing trained); 3 training diverged (non-finite loss or state; the
last finite checkpoint is named); 4 a checkpoint save failed (disk full, read-only; the last
good checkpoint is named); 75 preempted (checkpoint of the current step committed). Any other
failure is a bug and prints its traceback.
"""

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from desmoe_jax import checkpoint, cli, distributed, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/six_domains.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES,
    "Start JAX's distributed runtime: auto (with the flags below, or in a Slurm / Open MPI / "
    "GKE TPU job), on (always, JAX detects the cluster: Cloud TPU pod slices), off.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run JAX cannot "
    "detect (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though the config changes the run (steps, "
    "batch, learning rate, method, schedule, data, model); the differences are printed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-file chatter
  logging.getLogger("desmoe_jax").setLevel(logging.INFO)
  checkpoint.quiet_orbax_tracebacks()
  # Before anything touches a device.
  cli.run(distributed.initialize, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
          mode=_DISTRIBUTED.value)
  if jax.process_index() != 0:
    logging.getLogger("desmoe_jax").setLevel(logging.WARNING)  # process 0 tells the story
  summary = cli.run(trainer.train, _CONFIG.value, _WORKDIR.value,
                    allow_config_change=_ALLOW_CHANGE.value)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
