"""Trains and evaluates a model from a config file.

  python launch.py --config configs/nyud_ifbC.py --workdir /tmp/nyud_ifbC \
      --config.dataset.data_dir=/data/NYUD_MT
  python launch.py --config configs/demo.py --workdir /tmp/iterfuse_demo
  python launch.py --config configs/nyud_ifbC.py --workdir /tmp/nyud_ifbC --mode eval

Any config field can be overridden with `--config.<key>=<value>`; unknown keys are errors.
A killed run started again with the same workdir resumes from its last checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train with periodic evaluation (resumes if possible); "
                          "eval: evaluate a checkpoint of the workdir.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"],
                                "Which checkpoint --mode=eval evaluates.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host runs).")
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from iterfuse_jax import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(FLAGS.config, _WORKDIR.value)
    else:
      train.evaluate_checkpoint(FLAGS.config, _WORKDIR.value, which=_CHECKPOINT.value)
  except (FileNotFoundError, train.NonFiniteLossError) as e:
    # What the user must act on (missing data or checkpoint, a diverged run): the message, not a
    # traceback through the library.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
