"""How long a periodic checkpoint holds up the training loop, against how long it takes.

Builds the train state of an experiment config (parameters, BatchNorm statistics and Adam's
moments) and saves it several times through `iterfuse_jax.checkpoints.RunCheckpoints`, as the
training loop does once per epoch: the loop waits for `save` (device-to-host copy, the input
iterator's position), and the files are written and committed in the background. Printed per
save: the time `save` held the caller, and the time until the save was committed.

  python -m benchmarks.checkpoint_save                          # configs/nyud_ifbC.py, 480x640
  python -m benchmarks.checkpoint_save --config configs/pascal_ifbC.py --saves 3
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import tempfile
import time
from collections.abc import Sequence

from benchmarks import experiment_config


def measure(config, saves: int) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  from iterfuse_jax import checkpoints, train
  from iterfuse_jax.models import build_model
  # pylint: enable=g-import-not-at-top

  h, w = config.dataset.train_size
  tx = train.create_optimizer(config, train.create_learning_rate_schedule(config, 100))
  state = train.create_train_state(config, build_model(config), tx, jax.random.key(0),
                                   (1, h, w, 3), train.create_mesh(1))
  leaves = jax.tree.leaves(jax.block_until_ready(state))
  out = {"arrays": len(leaves), "mib": sum(x.nbytes for x in leaves) / 2**20, "saves": []}
  with tempfile.TemporaryDirectory() as workdir:
    run = checkpoints.RunCheckpoints(workdir, keep=2)
    try:
      for step in range(1, saves + 1):
        start = time.perf_counter()
        run.save(step, state, None)
        held = time.perf_counter() - start
        run.latest.wait_until_finished()
        out["saves"].append({"held_s": held, "total_s": time.perf_counter() - start})
      out["committed"] = checkpoints.committed_steps(pathlib.Path(workdir) / "checkpoints")
    finally:
      run.close()
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  experiment_config.add_arguments(parser, default="configs/nyud_ifbC.py")
  parser.add_argument("--saves", type=int, default=4)
  args = parser.parse_args(argv)
  if args.saves < 1:
    parser.error("--saves must be >= 1")
  # orbax warns that each save waited for the previous one: the waits this script makes itself.
  logging.getLogger("absl").setLevel(logging.ERROR)
  result = measure(experiment_config.load(args.config, args.set), args.saves)
  print(f"{args.config}: {result['arrays']} arrays, {result['mib']:.1f} MiB")
  print("save  held s  total s")
  for i, s in enumerate(result["saves"], 1):
    print(f"{i:4d} {s['held_s']:7.2f} {s['total_s']:8.2f}")
  # The first save sets things up; the median of the rest is what each epoch pays.
  steady = result["saves"][1:] or result["saves"]
  held = statistics.median(s["held_s"] for s in steady)
  total = statistics.median(s["total_s"] for s in steady)
  print(f"median: the loop is held {held:.2f} s of {total:.2f} s per save "
        f"({held / total:.0%}); committed steps {result['committed']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
