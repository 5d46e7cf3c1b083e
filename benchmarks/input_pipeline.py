"""Throughput of the training input pipeline (images/s), with 0 and more grain workers.

Writes a synthetic NYUD_MT (or PASCAL_MT) folder into a temporary directory (or uses --data-dir),
prepares it, and times `create_train_dataset` batches of the training size after a warm-up. NYUD
frames are written at the training size (480x640, as the dataset's); PASCAL frames at 375x500, a
typical PASCAL image, which the pipeline augments and pads to the 512x512 training size:

  python -m benchmarks.input_pipeline                      # NYUD 480x640, workers 0 and 2
  python -m benchmarks.input_pipeline --dataset pascal     # PASCAL-Context 512x512
  python -m benchmarks.input_pipeline --workers 0 --read-threads 1 2 4
  python -m benchmarks.input_pipeline --height 48 --width 64 --steps 3 --workers 0

Every combination of --workers and --read-threads is timed (read threads run the reads and the
transforms of each process: with 0 workers, the threads of the training process itself).
"""

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

from data_pipelines import config as config_lib
from data_pipelines import io_utils
from data_pipelines import pipeline
from data_pipelines import synthetic


def measure(cfg, batch_size: int, steps: int, warmup: int) -> float:
  """Images per second over `steps` batches, after `warmup` batches (worker start-up excluded)."""
  iterator = iter(pipeline.create_train_dataset(cfg, batch_size, seed=0))
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  assert batch["image"].shape[0] == batch_size
  if hasattr(iterator, "close"):
    iterator.close()
  return steps * batch_size / elapsed


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", choices=("nyud", "pascal"), default="nyud")
  parser.add_argument("--height", type=int, default=0, help="training height (0: the paper's)")
  parser.add_argument("--width", type=int, default=0, help="training width (0: the paper's)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20, help="timed batches per setting")
  parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--read-threads", type=int, nargs="+", default=[-1],
                      help="dataset.read_threads values (-1, the default: one per core, at most "
                           "8, shared among the workers)")
  parser.add_argument("--num-train", type=int, default=32, help="synthetic frames to write")
  parser.add_argument("--data-dir", default="",
                      help="an existing NYUD_MT / PASCAL_MT folder instead")
  parser.add_argument("--no-augment", action="store_true")
  args = parser.parse_args(argv)

  paper_size = {"nyud": (480, 640), "pascal": (512, 512)}[args.dataset]
  height, width = args.height or paper_size[0], args.width or paper_size[1]
  # NYUD frames have the training size; PASCAL images vary, 500x375 being typical.
  frame = (height, width) if args.dataset == "nyud" else (min(height, 375), min(width, 500))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    cfg = config_lib.get_dataset_config(args.dataset)
    if not data_dir:
      data_dir = f"{tmp}/{'NYUD_MT' if args.dataset == 'nyud' else 'PASCAL_MT'}"
      writer = synthetic.write_nyud if args.dataset == "nyud" else synthetic.write_pascal
      start = time.perf_counter()
      writer(data_dir, num_train=args.num_train, num_val=1, seed=0, height=frame[0],
             width=frame[1])
      print(f"wrote {args.num_train} synthetic {frame[0]}x{frame[1]} frames in "
            f"{time.perf_counter() - start:.1f} s")
    cfg.data_dir = data_dir
    cfg.prepared_dir = f"{tmp}/prepared"
    cfg.train_size = (height, width)
    cfg.augment = not args.no_augment
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", io_utils.SplitSizeWarning)
      start = time.perf_counter()
      pipeline.num_examples(cfg, cfg.train_split)
      print(f"prepared the array_record copy in {time.perf_counter() - start:.1f} s")
    for workers in args.workers:
      for threads in args.read_threads:
        cfg.num_workers, cfg.read_threads = workers, threads
        rate = measure(cfg, args.batch_size, args.steps, args.warmup)
        print(f"{args.dataset.upper()} train pipeline {height}x{width}, batch {args.batch_size}, "
              f"augment={cfg.augment}, read_threads={pipeline.read_threads(cfg)}, "
              f"workers={workers}: {rate:.1f} images/s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
