r"""Train one pretrained MoE (any of the six families, desmoe_jax/families/) on several labelled
domains with DES-MoE (or a baseline).

  python train.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny
  python train.py --config=configs/six_domains.py --config.model.path=/path/to/DeepSeek-V2-Lite \
      --workdir=gs://bucket/run1 --config.method=desmoe

The installed command `desmoe-train` is the same program (`--config=six_domains:tiny` names the
preset the package carries). All outputs go to --workdir (see desmoe_jax/trainer.py); rerunning
the same command resumes from the newest checkpoint there.

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

from desmoe_jax.cli import train_main

if __name__ == "__main__":
  train_main()
