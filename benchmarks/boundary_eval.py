"""Time per image of the edge odsF evaluation (iterfuse_jax.boundary_eval), the survey's settings.

Renders synthetic NYUD-v2 rooms (480x640, maximum distance 0.011) and PASCAL-sized frames
(375x500, 0.0075) with their one-pixel boundary maps, turns each map into a prediction such as a
trained network makes (the boundaries blurred to a few pixels' width, their strength scaled, plus
pixel noise), saves them as the evaluation's PNGs and scores them: 99 thresholds, thinning, BSDS
matching. Prints seconds per image with 1 and with N worker processes.

  python -m benchmarks.boundary_eval                       # 8 images per dataset, 1 and 2 workers
  python -m benchmarks.boundary_eval --images 4 --workers 1 --noise 0
  python -m benchmarks.boundary_eval --images 1 --workers 1 --scale 0.125   # a smoke run
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from data_pipelines import synthetic
from iterfuse_jax import boundary_eval

SIZES = {"nyud": (480, 640), "pascal": (375, 500)}


def network_like(edge: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
  """uint8 [H, W]: the boundary map blurred (sigma 1.5 pixels) to a peak of ~230, plus noise."""
  blurred = ndimage.gaussian_filter(edge.astype(np.float64), 1.5)
  blurred *= 230.0 / max(blurred.max(), 1e-9)
  return np.clip(blurred + rng.normal(0, noise, edge.shape), 0, 255).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.boundary_eval",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=8, help="images per dataset")
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--noise", type=float, default=4.0,
                      help="std of the pixel noise on the 0..255 prediction")
  parser.add_argument("--datasets", nargs="+", default=sorted(SIZES), choices=sorted(SIZES))
  parser.add_argument("--scale", type=float, default=1.0,
                      help="multiplies the frame sizes (timings are for 1.0)")
  args = parser.parse_args(argv)
  print(f"{os.cpu_count()} CPU cores; {len(boundary_eval.SURVEY_THRESHOLDS)} thresholds")
  print("| dataset | size | max_dist | workers | s / image | odsF |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for dataset in args.datasets:
      height, width = (max(16, round(s * args.scale)) for s in SIZES[dataset])
      directory = pathlib.Path(tmp) / dataset
      directory.mkdir()
      rng = np.random.default_rng(0)
      pairs = []
      for index in range(args.images):
        edge = synthetic.render_room(np.random.default_rng([1, index]), height, width)[4] > 0
        Image.fromarray(network_like(edge, rng, args.noise), mode="L").save(
            directory / f"{index}.png")
        pairs.append((str(index), edge))
      for workers in args.workers:
        start = time.perf_counter()
        results = boundary_eval.evaluate_directory(
            directory, pairs, max_dist=boundary_eval.MAX_DIST[dataset],
            num_workers=0 if workers == 1 else workers, total=len(pairs))
        seconds = (time.perf_counter() - start) / len(pairs)
        print(f"| {dataset} | {height}x{width} | {boundary_eval.MAX_DIST[dataset]} | {workers} | "
              f"{seconds:.2f} | {results['odsF']:.2f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
