r"""Train one DeepSeek-V2 MoE on several labelled domains with DES-MoE (or a baseline).

  python train.py --config=configs/six_domains.py:tiny --workdir=/tmp/desmoe_tiny
  python train.py --config=configs/six_domains.py --config.model.path=/path/to/DeepSeek-V2-Lite \
      --workdir=gs://bucket/run1 --config.method=desmoe

All outputs go to --workdir (see desmoe_jax/trainer.py); rerunning the same command resumes
from the newest checkpoint there.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from desmoe_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/six_domains.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-file chatter
  logging.getLogger("desmoe_jax").setLevel(logging.INFO)
  summary = trainer.train(_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  app.run(main)
