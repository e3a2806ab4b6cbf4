r"""Train one DeepSeek-V2 MoE on several labelled domains with DES-MoE (or a baseline).

  python train.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny
  python train.py --config=configs/six_domains.py --config.model.path=/path/to/DeepSeek-V2-Lite \
      --workdir=gs://bucket/run1 --config.method=desmoe

The installed command `desmoe-train` is the same program (`--config=six_domains:tiny` names the
preset the package carries). All outputs go to --workdir (see desmoe_jax/trainer.py); rerunning
the same command resumes from the newest checkpoint there.

Multi-process (every process runs this same command; see desmoe_jax/distributed.py): Slurm,
Open MPI and GKE TPU jobs are detected; on Cloud TPU pod slices add --distributed=on; elsewhere
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

from desmoe_jax.cli import train_main

if __name__ == "__main__":
  train_main()
