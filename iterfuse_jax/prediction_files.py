"""Every task's predictions of the eval split as files, in the MTL survey code's formats; and
their scores, whoever wrote them.

  python launch.py --config ... --workdir W --mode eval --save_predictions
writes W/predictions/<task>/<image_id>.png (.mat for depth) for every image of the eval split;

  python -m iterfuse_jax.prediction_files W [--dir DIR]
scores such a folder (default W/predictions) against the eval split of W's config.json, with
the evaluation's own metrics. DIR may as well be the `save_dir` of the PyTorch survey code
(MTI-Net, ATRC and the works built on it), which writes the same files: one evaluation for both
sides' predictions, and the survey's own evaluation (its `eval_all_results`) reads ours.

The formats are the survey's `save_model_predictions`: decode at the network's size, resize to
the image's original size with OpenCV, then write:
  segmentation (semseg, human_parts)  PNG, uint8 class ids: argmax, then INTER_NEAREST.
  binary (sal), boundary (edge)       PNG, uint8(255 * sigmoid(logit)) resized with INTER_LINEAR
                                      before the cast (which truncates).
  regression (depth)                  .mat with one variable "depth", float32 [H, W] metres:
                                      the raw output resized with INTER_LINEAR (not clamped: the
                                      scoring clamps to tasks.MIN_DEPTH, as the survey's does).
  normals                             RGB PNG, uint8((n / |n| + 1) * 255 / 2) resized with
                                      INTER_LINEAR before the cast.
Unlike the survey, which skips an image whose label of the task is all "ignore" (e.g. the human
parts of a picture without a person), every image gets its file; scoring accepts the survey's
folders, where those files are missing (such an image scores nothing either way), and refuses a
missing file of an image that has labels.

Scored from these files, the metrics are the evaluation's own (`train.evaluate_checkpoint`, whose
default `eval_resize="survey"` decodes and resizes the same way in XLA) up to float rounding of
the resizing, which can move a truncated 8-bit level by one; normals differ more: the evaluation
scores them before the 8-bit quantisation. Edge odsF is `boundary_eval`'s, over the edge folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from iterfuse_jax import tasks as task_registry

WORKDIR_SUBDIR = "predictions"  # a run's prediction files: <workdir>/predictions/<task>/
DEPTH_VARIABLE = "depth"  # the survey's name of the array in a depth .mat file


def suffix(task: str) -> str:
  """The file ending of `task`'s predictions: ".mat" for depth (regression), else ".png"."""
  return ".mat" if task_registry.get_task(task).kind == "regression" else ".png"


def prediction_path(directory: str | os.PathLike, task: str, image_id: str) -> pathlib.Path:
  """<directory>/<task>/<image_id><suffix>."""
  return pathlib.Path(directory) / task / f"{image_id}{suffix(task)}"


def _resize(x: np.ndarray, size: Sequence[int], interpolation: int) -> np.ndarray:
  import cv2  # pylint: disable=g-import-not-at-top

  height, width = (int(s) for s in size)
  if x.shape[:2] == (height, width):
    return x
  resized = cv2.resize(x, (width, height), interpolation=interpolation)
  # OpenCV drops a trailing channel of size 1; keep the input's rank.
  return resized.reshape(height, width, *x.shape[2:])


def encode(task: str, output: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """The array the survey writes for one image: network output -> its file's content.

  Args:
    task: registry name.
    output: the network's final output for the image at the network's size, [h, w, C_task].
    size: (H, W), the image's original size.

  Returns:
    segmentation uint8 [H, W] class ids; binary and boundary uint8 [H, W]; regression float32
    [H, W]; normals uint8 [H, W, 3] (module docstring).
  """
  import cv2  # pylint: disable=g-import-not-at-top

  kind = task_registry.get_task(task).kind
  output = np.asarray(output, np.float32)
  if output.ndim != 3:
    raise ValueError(f"{task} output must be [h, w, C], got shape {output.shape}")
  if kind == "segmentation":
    if output.shape[-1] > 256:
      raise ValueError(f"{task} has {output.shape[-1]} classes; a uint8 PNG holds at most 256")
    ids = np.argmax(output, axis=-1).astype(np.uint8)
    return _resize(ids, size, cv2.INTER_NEAREST)
  if output.shape[-1] != (3 if kind == "normals" else 1):
    raise ValueError(f"{task} output must have {3 if kind == 'normals' else 1} channel(s), got "
                     f"shape {output.shape}")
  if kind in ("binary", "boundary"):
    with np.errstate(over="ignore"):  # exp of a very negative logit: inf, level 0 as it should
      levels = 255.0 / (1.0 + np.exp(-output[..., 0]))
    return _resize(levels, size, cv2.INTER_LINEAR).astype(np.uint8)
  if kind == "regression":
    return _resize(output[..., 0], size, cv2.INTER_LINEAR).astype(np.float32)
  if kind == "normals":
    # The survey's F.normalize: n / max(|n|, 1e-12).
    unit = output / np.maximum(np.linalg.norm(output, axis=-1, keepdims=True), 1e-12)
    return _resize((unit + 1.0) * 255.0 / 2.0, size, cv2.INTER_LINEAR).astype(np.uint8)
  raise ValueError(f"task {task!r} has kind {kind!r}, which has no prediction file format")


def write(directory: str | os.PathLike, task: str, image_id: str,
          array: np.ndarray) -> pathlib.Path:
  """Writes `encode`'s array to `prediction_path` (replacing an existing file); returns the path."""
  import scipy.io  # pylint: disable=g-import-not-at-top

  path = prediction_path(directory, task, image_id)
  array = np.asarray(array)
  if path.suffix == ".png" and array.dtype != np.uint8:
    # PIL would write another PNG kind (16 or 32 bits) that the survey does not read.
    raise ValueError(f"{task} predictions are 8-bit PNGs; got a {array.dtype} array for {path}")
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".mat":
    scipy.io.savemat(path, {DEPTH_VARIABLE: array})
  else:
    Image.fromarray(array).save(path)  # uint8: [H, W] "L", [H, W, 3] "RGB"
  return path


def read(directory: str | os.PathLike, task: str, image_id: str,
         size: Sequence[int]) -> np.ndarray:
  """Reads the prediction file of one image, checked against the image's size (H, W).

  Returns what `encode` wrote: uint8 [H, W] (segmentation, binary, boundary), float32 [H, W]
  (depth) or uint8 [H, W, 3] (normals). Raises FileNotFoundError or ValueError naming the file.
  """
  import scipy.io  # pylint: disable=g-import-not-at-top

  path = prediction_path(directory, task, image_id)
  if not path.is_file():
    raise FileNotFoundError(f"{task} prediction of image {image_id!r} not found: {path}")
  kind = task_registry.get_task(task).kind
  if path.suffix == ".mat":
    variables = scipy.io.loadmat(path)
    if DEPTH_VARIABLE not in variables:
      raise ValueError(f"{path} has no variable {DEPTH_VARIABLE!r} (it has "
                       f"{sorted(k for k in variables if not k.startswith('__'))})")
    array = np.asarray(variables[DEPTH_VARIABLE], np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
  else:
    # 8-bit grey (or palette: the indices, as VOC-style label PNGs store class ids) or RGB.
    modes = ("RGB",) if kind == "normals" else ("L", "P")
    with Image.open(path) as image:
      if image.mode not in modes:
        raise ValueError(f"{path} is a {image.mode} PNG; {task} predictions are {modes[0]} "
                         "(8 bits per channel)")
      array = np.asarray(image)
  expected = (*(int(s) for s in size), *((3,) if kind == "normals" else ()))
  if array.shape != expected:
    raise ValueError(f"{task} prediction {path} has shape {array.shape}, but image "
                     f"{image_id!r} is {expected[0]}x{expected[1]}: expected {expected}")
  return array


def metric_input(task: str, array: np.ndarray) -> np.ndarray:
  """A file's array -> the decoded prediction the metrics take (`metrics`, decoded=True): class
  ids int32 [H, W]; probability (value / 255) or depth float32 [H, W, 1]; normals float32
  [H, W, 3] in [-1, 1] (the metric normalises them)."""
  kind = task_registry.get_task(task).kind
  if kind == "segmentation":
    return array.astype(np.int32)
  if kind in ("binary", "boundary"):
    return (array.astype(np.float32) / 255.0)[..., None]
  if kind == "regression":
    return array.astype(np.float32)[..., None]
  if kind == "normals":
    return array.astype(np.float32) * (2.0 / 255.0) - 1.0
  raise ValueError(f"task {task!r} has kind {kind!r}, which has no prediction file format")


def _empty_canvas(task: str, shape: Sequence[int]) -> np.ndarray:
  """Zeros shaped as `metric_input`'s output for a [B, H, W] label canvas (padding is ignored by
  the labels there)."""
  kind = task_registry.get_task(task).kind
  if kind == "segmentation":
    return np.zeros(shape, np.int32)
  return np.zeros((*shape, 3 if kind == "normals" else 1), np.float32)


def _scores_something(task: str, label: np.ndarray) -> bool:
  """Whether a label map [H, W] (normals [H, W, 3]) has a pixel the metrics score."""
  kind = task_registry.get_task(task).kind
  if kind == "regression":
    return bool(np.any((label > 0) & (label != task_registry.IGNORE_LABEL)))
  if kind == "normals":
    return bool(np.any(label != 0))
  return bool(np.any(label != task_registry.IGNORE_LABEL))


def _check_class_ids(task: str, dataset: str, array: np.ndarray, directory: str | os.PathLike,
                     image_id: str) -> None:
  """A class id the task does not have (a file from another dataset's model) is an error: the
  metrics would drop its pixels from the confusion matrix."""
  if task_registry.get_task(task).kind != "segmentation":
    return
  classes = task_registry.num_outputs(task, dataset)
  if array.size and int(array.max()) >= classes:
    raise ValueError(f"{prediction_path(directory, task, image_id)} holds class id "
                     f"{int(array.max())}, but {task} on {dataset} has classes 0..{classes - 1}")


def _image_ids(batch: Mapping[str, np.ndarray]) -> Iterable[tuple[int, str]]:
  """(row, image id) of the real examples of an eval batch (padding rows left out)."""
  for i in np.flatnonzero(np.asarray(batch["example_mask"])):
    image_id = batch["image_id"][i]
    yield int(i), image_id.decode() if isinstance(image_id, bytes) else str(image_id)


def save_split(eval_batches: Iterable[Mapping[str, np.ndarray]],
               predict: Callable[[np.ndarray], Mapping[str, np.ndarray]],
               directory: str | os.PathLike, tasks: Sequence[str],
               total: int | None = None, desc: str = "predictions") -> int:
  """Writes the file of every task for every real example of the eval batches.

  Each process writes its own share (its eval batches); with several processes it returns once
  every process has written its files, so that what follows (scoring) sees the whole split.

  Args:
    eval_batches: batches of the eval pipeline (image, original_size, example_mask, image_id).
    predict: images [B, h, w, 3] -> {task: final outputs [B, h, w, C_task]} (host arrays).
    directory: the files go to <directory>/<task>/; existing files of the same ids are replaced.
    tasks: which of the outputs to write.
    total: number of batches, for the progress bar.

  Returns:
    The number of images written (each with one file per task).
  """
  # Not at the top: boundary_eval's scoring workers import this module and need no console.
  from iterfuse_jax import console  # pylint: disable=g-import-not-at-top

  count = 0
  with console.progress(total=total, desc=desc, unit="batch", leave=False) as bar:
    for batch in eval_batches:
      outputs = predict(batch["image"])
      for i, image_id in _image_ids(batch):
        size = batch["original_size"][i]
        for task in tasks:
          write(directory, task, image_id, encode(task, outputs[task][i], size))
        count += 1
      bar.update(1)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"prediction_files: {desc} written")
  return count


def score_split(config, directory: str | os.PathLike) -> dict[str, float]:
  """The evaluation's metrics of the files in <directory>/<task>/ against the eval split of
  `config.dataset` (its first max_eval_examples images), plus Delta_m against
  `config.stl_references` ("delta_m", over "delta_m_tasks" tasks).

  Every image of the split needs its file for every task of the config, except where the
  task's label is all "ignore" (the survey writes none there); edge odsF comes from
  `boundary_eval` over <directory>/edge. Runs in one process.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  from iterfuse_jax import boundary_eval, metrics  # pylint: disable=g-import-not-at-top

  tasks = tuple(config.dataset.tasks)
  online = tuple(t for t in tasks if t != boundary_eval.TASK)
  results: dict[str, float] = {}
  if online:
    metrics_cls = metrics.make_eval_metrics(online, config.dataset.name)

    def update(predictions, labels, example_mask):
      return metrics_cls.single_from_model_output(
          predictions=predictions, labels=labels, example_mask=example_mask, decoded=True)

    update = jax.jit(update)  # one compile per canvas shape, not per batch
    merged = None
    without_file: dict[str, int] = {}
    for batch in pipeline.create_eval_dataset(config.dataset, int(config.batch_size)):
      predictions = {}
      for task in online:
        canvas = _empty_canvas(task, np.shape(batch[task])[:3])
        for i, image_id in _image_ids(batch):
          h, w = (int(s) for s in batch["original_size"][i])
          try:
            array = read(directory, task, image_id, (h, w))
          except FileNotFoundError:
            # The survey writes no file where the task's label is all "ignore" (a picture
            # without a person has no human parts); such an image scores nothing either way.
            if _scores_something(task, np.asarray(batch[task][i, :h, :w])):
              raise
            without_file[task] = without_file.get(task, 0) + 1
            continue
          _check_class_ids(task, config.dataset.name, array, directory, image_id)
          canvas[i, :h, :w] = metric_input(task, array)
        predictions[task] = canvas
      labels = {task: batch[task] for task in online}
      step = update(predictions, labels, batch["example_mask"])
      merged = step if merged is None else merged.merge(step)
    if merged is None:
      raise ValueError("the evaluation split yielded no batch")
    for task, count in without_file.items():
      logging.info("%s: %d images without a file, all of whose labels are 'ignore'", task, count)
    results.update({name: float(value) for name, value in merged.compute().items()})
  if boundary_eval.TASK in tasks:
    results.update(boundary_eval.evaluate_saved(
        config, pathlib.Path(directory) / boundary_eval.TASK))
  value, used = metrics.available_delta_m(results, dict(config.get("stl_references") or {}),
                                          tasks)
  results["delta_m"] = value
  results["delta_m_tasks"] = float(len(used))
  return results


def score_run(workdir: str | os.PathLike, score: Callable[[Any], Mapping[str, float]]) -> int:
  """The scoring commands' shared part: reads WORKDIR's config.json, runs `score(config)` and
  prints its results as JSON, alone on stdout (preparing the dataset prints, to stderr here).

  Returns the exit status: 0, or 1 after an error line for a missing config.json or a missing
  or bad prediction file.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  from iterfuse_jax.inference import CONFIG_FILE  # pylint: disable=g-import-not-at-top

  config_path = pathlib.Path(workdir) / CONFIG_FILE
  if not config_path.is_file():
    print(f"error: {config_path} not found (the config.json a training run writes)",
          file=sys.stderr)
    return 1
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  try:
    with contextlib.redirect_stdout(sys.stderr):
      results = score(config)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(results, indent=2, sort_keys=True))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m iterfuse_jax.prediction_files",
      description="Scores prediction files in the survey's formats (DIR/<task>/<image id>.png, "
                  ".mat for depth) against the eval split of the run in WORKDIR (its "
                  "config.json), with the evaluation's metrics; prints them as JSON.")
  parser.add_argument("workdir")
  parser.add_argument("--dir", default=None,
                      help="the prediction folder (default: WORKDIR/predictions, where --mode "
                           "eval --save_predictions writes)")
  args = parser.parse_args(argv)
  directory = pathlib.Path(args.dir or pathlib.Path(args.workdir) / WORKDIR_SUBDIR)
  return score_run(args.workdir, lambda config: score_split(config, directory))


if __name__ == "__main__":
  sys.exit(main())
