"""Boundary (edge) evaluation without MATLAB: odsF over a split, as the survey's SEISM protocol.

  python -m iterfuse_jax.boundary_eval WORKDIR [--num-workers N]

re-scores the edge predictions a run saved (WORKDIR/predictions/edge/<id>.png) against the eval
split of the run's dataset. Training calls `run` after its final evaluation, and so does
`--mode eval`.

The protocol (survey code: evaluation/eval_edge.py, evaluation/seism/read_one_png.m; SEISM:
src/measures/eval_cont.m, src/piotr_edges/edgesEvalImg.m, src/scripts/gather_measure.m):
  * each prediction is saved as a PNG of uint8(255 * sigmoid(logit)), resized linearly to the
    image's original size before the cast (which truncates, as the survey's `astype(np.uint8)`);
  * for each of the 99 thresholds t = 0.01, ..., 0.99 the map is binarised (value / 255 >= t),
    thinned to one-pixel lines (MATLAB's bwmorph 'thin'), and its pixels are matched one-to-one
    to ground-truth boundary pixels within a maximum distance of `max_dist` times the image
    diagonal (the BSDS `correspondPixels` assignment, outlier cost 100);
  * matched and total pixels are summed over the split per threshold: recall = matched ground
    truth / ground truth, precision = matched prediction / prediction (SEISM's conventions when a
    total is 0: no ground truth -> recall 1, precision 0; no prediction -> recall 0, precision 1);
    odsF = the best F = 2PR / (P + R) over the thresholds; oisF = the mean over images of each
    image's best F.
  * max_dist: 0.0075 on PASCAL-Context (SEISM's and edgesEvalImg's default, which the survey
    uses) and 0.011 on NYUD-v2 (the survey code evaluates no NYUD-v2 edges; ATRC and the works
    after it use 0.011 "following previous works").
  * ground truth: NYUD-v2's edge files; on PASCAL-Context the boundaries of the PASCAL-Context
    label map as SEISM draws them (`seg2bmap`, `pascal_context.boundary_ground_truth`), not the
    thinned Laplacian the network is trained on.
Matching and thinning are pyEdgeEval's Cython port of the BSDS benchmark code
(`pyEdgeEval.common.binary_label.evaluate_boundaries_threshold`). Images are scored in parallel
worker processes; odsF is in percent, like the other metrics.

Like the MATLAB original, the BSDS correspondence is randomised: it links every pixel to a few
randomly drawn outlier nodes (a random generator seeded from the clock) and solves the assignment
on that sparse graph, so an occasional pixel goes unmatched that the exact assignment would
match, and two evaluations of the same predictions can differ in the last digits (one pixel in
~10^2-10^3 of a small image; far less over a split).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import logging
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from iterfuse_jax import prediction_files

# The survey's SEISM parameter file: thresholds 0.01 to 0.99 in steps of 0.01, read from "%.2f".
SURVEY_THRESHOLDS = tuple(float(f"{k / 100:.2f}") for k in range(1, 100))
MAX_DIST = {"nyud": 0.011, "pascal": 0.0075}
TASK = "edge"
PREDICTIONS_SUBDIR = os.path.join(prediction_files.WORKDIR_SUBDIR, TASK)


def _boundary_counts_fn():
  """pyEdgeEval's per-image evaluation (imported lazily; its import prints a notice about MATLAB
  v7.3 files, which this module does not read)."""
  with contextlib.redirect_stdout(io.StringIO()):
    from pyEdgeEval.common.binary_label.evaluate_boundaries import (  # pylint: disable=g-import-not-at-top
        evaluate_boundaries_threshold)
  return evaluate_boundaries_threshold


def max_dist_for(dataset: str, override: float = 0.0) -> float:
  """The matching distance (fraction of the image diagonal): `override` if > 0, else the
  dataset's (MAX_DIST)."""
  if override > 0:
    return float(override)
  if dataset not in MAX_DIST:
    raise ValueError(f"no boundary matching distance for dataset {dataset!r}; known: "
                     f"{sorted(MAX_DIST)} (or set config.boundary_eval.max_dist)")
  return MAX_DIST[dataset]


# ----------------------------------------------------------------------------- scoring


def image_counts(prediction: np.ndarray, ground_truth: np.ndarray,
                 thresholds: Sequence[float] = SURVEY_THRESHOLDS,
                 max_dist: float = MAX_DIST["pascal"]) -> np.ndarray:
  """Boundary match counts of one image at each threshold.

  Args:
    prediction: uint8 [H, W] edge strength (255 * probability).
    ground_truth: [H, W] boundary map (nonzero = boundary).
    thresholds: K thresholds on prediction / 255.
    max_dist: matching distance as a fraction of the image diagonal.

  Returns:
    float64 [4, K]: matched ground-truth pixels, ground-truth pixels, matched predicted pixels,
    predicted pixels (after thinning).
  """
  prediction = np.asarray(prediction)
  ground_truth = np.asarray(ground_truth) > 0
  if prediction.shape != ground_truth.shape:
    raise ValueError(f"edge prediction of shape {prediction.shape} does not match its ground "
                     f"truth of shape {ground_truth.shape}")
  evaluate = _boundary_counts_fn()
  count_r, sum_r, count_p, sum_p = evaluate(
      np.asarray(thresholds, np.float64), prediction.astype(np.float64) / 255.0, ground_truth,
      max_dist=max_dist, apply_thinning=True, apply_nms=False)
  return np.stack([count_r, sum_r, count_p, sum_p]).astype(np.float64)


def _precision_recall(count_r, sum_r, count_p, sum_p):
  """SEISM's precision and recall (eval_cont per image, gather_measure per split), elementwise:
  no ground truth -> recall 1, precision 0; no prediction -> recall 0, precision 1."""
  count_r, sum_r, count_p, sum_p = (np.asarray(x, np.float64) for x in
                                    (count_r, sum_r, count_p, sum_p))
  recall = np.where(sum_r == 0, 1.0,
                    np.where(sum_p == 0, 0.0, count_r / np.maximum(sum_r, 1)))
  precision = np.where(sum_r == 0, 0.0,
                       np.where(sum_p == 0, 1.0, count_p / np.maximum(sum_p, 1)))
  return precision, recall


def _f_measure(precision, recall):
  total = precision + recall
  return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1.0), 0.0)


def summarize(counts: np.ndarray, thresholds: Sequence[float] = SURVEY_THRESHOLDS
              ) -> dict[str, float]:
  """odsF, its precision, recall and threshold, and oisF from per-image counts [N, 4, K].

  F-measures are in percent, the threshold on probabilities.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 3 or counts.shape[1] != 4 or counts.shape[2] != len(thresholds):
    raise ValueError(f"counts must be [N, 4, {len(thresholds)}], got {counts.shape}")
  if counts.shape[0] == 0:
    raise ValueError("no image to evaluate")
  precision, recall = _precision_recall(*counts.sum(axis=0))
  f = _f_measure(precision, recall)
  best = int(np.argmax(f))
  per_image = _f_measure(*_precision_recall(*np.moveaxis(counts, 1, 0)))  # [N, K]
  return {
      "odsF": 100.0 * float(f[best]),
      "ods_precision": 100.0 * float(precision[best]),
      "ods_recall": 100.0 * float(recall[best]),
      "ods_threshold": float(thresholds[best]),
      "oisF": 100.0 * float(per_image.max(axis=1).mean()),
  }


def _score_file(args: tuple[str, str, np.ndarray, tuple[float, ...], float]) -> np.ndarray:
  image_id, path, ground_truth, thresholds, max_dist = args
  if not os.path.isfile(path):
    raise FileNotFoundError(f"edge prediction of image {image_id!r} not found: {path}")
  with Image.open(path) as image:
    prediction = np.asarray(image.convert("L") if image.mode != "L" else image)
  if prediction.shape != ground_truth.shape:
    raise ValueError(f"edge prediction {path} is {prediction.shape[0]}x{prediction.shape[1]} "
                     f"but its ground truth is {ground_truth.shape[0]}x{ground_truth.shape[1]}")
  return image_counts(prediction, ground_truth, thresholds, max_dist)


def evaluate_directory(directory: str | os.PathLike,
                       ground_truths: Iterable[tuple[str, np.ndarray]], *,
                       max_dist: float, thresholds: Sequence[float] = SURVEY_THRESHOLDS,
                       num_workers: int = -1, total: int | None = None) -> dict[str, float]:
  """Scores `<directory>/<image_id>.png` against each (image_id, boundary map) pair.

  Args:
    directory: the saved edge predictions (`prediction_files`: <predictions>/edge).
    ground_truths: (image_id, [H, W] boundary map) of every image of the split.
    max_dist: matching distance, fraction of the image diagonal.
    thresholds: thresholds on prediction / 255.
    num_workers: worker processes (-1: one per CPU core; 0: in this process).
    total: number of images, for the progress bar.

  Returns:
    `summarize`'s metrics plus "num_images" and "seconds_per_image" (wall time per image with
    this many workers).
  """
  thresholds = tuple(float(t) for t in thresholds)
  counts, seconds = score_images(directory, ground_truths, max_dist=max_dist,
                                 thresholds=thresholds, num_workers=num_workers, total=total)
  return _results(counts, seconds, thresholds)


def _results(counts: np.ndarray, seconds: float, thresholds: Sequence[float]) -> dict[str, float]:
  results = summarize(counts, thresholds)
  results["num_images"] = float(len(counts))
  results["seconds_per_image"] = seconds / len(counts)
  return results


def score_images(directory: str | os.PathLike, ground_truths: Iterable[tuple[str, np.ndarray]],
                 *, max_dist: float, thresholds: Sequence[float] = SURVEY_THRESHOLDS,
                 num_workers: int = -1, total: int | None = None) -> tuple[np.ndarray, float]:
  """The per-image counts [N, 4, K] of `evaluate_directory` (in the order of `ground_truths`),
  and the wall time in seconds they took."""
  from iterfuse_jax import console  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  thresholds = tuple(float(t) for t in thresholds)
  jobs = ((image_id, str(directory / f"{image_id}.png"), np.asarray(gt) > 0, thresholds,
           float(max_dist)) for image_id, gt in ground_truths)
  workers = (os.cpu_count() or 1) if num_workers < 0 else num_workers
  start = time.perf_counter()
  counts = []
  # Kept when done (and, in a log file, a line every 30 s): a full split takes hours.
  with console.progress(total=total, desc=f"edge odsF ({workers or 1} proc)", unit="image",
                        leave=True) as bar:
    if workers <= 1:
      for job in jobs:
        counts.append(_score_file(job))
        bar.update(1)
    else:
      # Spawned workers: forking a process that runs JAX's threads is unsafe.
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for result in pool.map(_score_file, jobs):  # one image per task: each takes seconds
          counts.append(result)
          bar.update(1)
  seconds = time.perf_counter() - start
  return (np.stack(counts) if counts else np.zeros((0, 4, len(thresholds))), seconds)


# ----------------------------------------------------------------------------- a run's split


def ground_truths(dataset_cfg) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
  """(count, iterator of (image_id, boundary map)) of the eval split of a dataset config (its
  first max_eval_examples examples, as the evaluation), from the prepared records."""
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top

  if TASK not in tuple(dataset_cfg.tasks):
    raise ValueError(f"the dataset config's tasks {tuple(dataset_cfg.tasks)} have no {TASK!r}")
  source = pipeline.load_source(dataset_cfg, dataset_cfg.eval_split)
  total = len(source)
  if dataset_cfg.get("max_eval_examples", -1) and dataset_cfg.max_eval_examples > 0:
    total = min(total, int(dataset_cfg.max_eval_examples))
  key = builders.BOUNDARY_GT_FEATURE[dataset_cfg.name]

  def iterate():
    for index in range(total):
      record = source[index]
      image_id = record["image_id"]
      image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
      label = np.asarray(record[key])
      yield image_id, (label[..., 0] if label.ndim == 3 else label) > 0

  return total, iterate()


def evaluate_saved(config, predictions_dir: str | os.PathLike) -> dict[str, float]:
  """odsF of the predictions in `predictions_dir` against the eval split of `config.dataset`.

  Returns {"edge/odsF": ..., "edge/oisF": ..., ...} (see `summarize`).
  """
  options = config.get("boundary_eval") or {}
  max_dist = max_dist_for(config.dataset.name, float(options.get("max_dist", 0.0)))
  total, pairs = ground_truths(config.dataset)
  logging.info("Boundary evaluation of %d images (max_dist %g of the diagonal, %d thresholds)",
               total, max_dist, len(SURVEY_THRESHOLDS))
  num_workers = int(options.get("num_workers", -1))
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    results = evaluate_directory(predictions_dir, pairs, max_dist=max_dist,
                                 num_workers=num_workers, total=total)
  else:
    # Every process scores every process_count-th image, and all of them summarize the same
    # gathered counts: the same results everywhere (their records must agree), in 1/P the time.
    index, count = jax.process_index(), jax.process_count()
    counts, seconds = score_images(
        predictions_dir, itertools.islice(pairs, index, None, count), max_dist=max_dist,
        num_workers=num_workers, total=len(range(index, total, count)))
    counts, seconds = _gather_counts(counts, seconds, total)
    results = _results(counts, seconds, SURVEY_THRESHOLDS)
  logging.info("Boundary evaluation: odsF %.2f, %.3f s per image", results["odsF"],
               results["seconds_per_image"])
  return {f"{TASK}/{name}": value for name, value in results.items()}


def _gather_counts(counts: np.ndarray, seconds: float, total: int) -> tuple[np.ndarray, float]:
  """The counts of every process's images (process p scored images p, p + P, ...), in split
  order, and the longest wall time; a collective of all processes."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  processes = jax.process_count()
  # Counts of matched and boundary pixels: integers well below 2**31, exact in int32 (the
  # collective's widest integer type without jax_enable_x64).
  if counts.size and counts.max() >= 2**31:
    raise ValueError(f"boundary counts up to {counts.max()} do not fit int32")
  padded = np.zeros((-(-total // processes), *counts.shape[1:]), np.int32)
  padded[:len(counts)] = counts
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, ceil(N / P), 4, K]
  longest = float(np.max(multihost_utils.process_allgather(np.float32(seconds))))
  ordered = np.empty((total, *counts.shape[1:]), np.float64)
  for p in range(processes):
    ordered[p::processes] = gathered[p, :len(range(p, total, processes))]
  return ordered, longest


def run(config, workdir: str | os.PathLike, eval_batches,
        predict: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, float]:
  """Saves the model's edge predictions of the eval split and scores them (after training and in
  `--mode eval`). {} when the config has no edge task.

  Args:
    config: the run's config (dataset, boundary_eval).
    workdir: predictions go to `<workdir>/predictions/edge/` (`prediction_files`' format).
    eval_batches: this host's eval batches (`train.create_eval_batches`).
    predict: host images [B, h, w, 3] -> edge logits [B, h, w, 1]; None: every process has
      written the files already (`prediction_files.save_split` of all tasks), score them.

  Returns:
    {"edge/odsF": ..., ...}, the same in every process (each scores its share of the images).
  """
  if TASK not in tuple(config.dataset.tasks):
    return {}
  directory = pathlib.Path(workdir) / PREDICTIONS_SUBDIR
  if predict is not None:
    prediction_files.save_split(eval_batches, lambda images: {TASK: predict(images)},
                                pathlib.Path(workdir) / prediction_files.WORKDIR_SUBDIR, (TASK,),
                                total=len(eval_batches), desc="edge predictions")
  return evaluate_saved(config, directory)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m iterfuse_jax.boundary_eval",
      description="odsF of the edge predictions a run saved in WORKDIR/predictions/edge, against "
                  "the eval split of the run's dataset (the survey's SEISM protocol).")
  parser.add_argument("workdir")
  parser.add_argument("--num-workers", type=int, default=None,
                      help="worker processes (default: the config's, -1 = all cores)")
  parser.add_argument("--max-dist", type=float, default=None,
                      help="matching distance, fraction of the diagonal (default: the dataset's)")
  args = parser.parse_args(argv)

  def score(config) -> dict[str, float]:
    options: dict[str, Any] = dict(config.get("boundary_eval") or {})
    if args.num_workers is not None:
      options["num_workers"] = args.num_workers
    if args.max_dist is not None:
      options["max_dist"] = args.max_dist
    config.boundary_eval = options
    return evaluate_saved(config, pathlib.Path(args.workdir) / PREDICTIONS_SUBDIR)

  return prediction_files.score_run(args.workdir, score)


if __name__ == "__main__":
  sys.exit(main())
