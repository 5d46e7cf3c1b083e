"""A run's TensorBoard summaries and periodic hooks, with or without TensorFlow installed.

clu's metric writers and periodic actions import TensorFlow as soon as `clu.metric_writers` is
imported. Where TensorFlow is installed and imports (this project's pinned stack) the training
loop uses them. A CUDA machine often has jax without TensorFlow (the lent GPU machines' image has
none), or one that does not import next to jax's CUDA libraries: there the same summaries are
written as TensorBoard event files with the `tensorboard` package alone
(`EventFileMetricWriter`), and the profile hook is `jax.profiler`'s trace (`ProfileSteps`).
TensorBoard reads both alike.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from PIL import Image


def clu_writers_usable() -> bool:
  """Whether clu's writers and periodic actions import: TensorFlow is installed and imports.

  A TensorFlow that is installed but does not import (its CUDA or protobuf versions clashing
  with jax's are common on GPU machines) is named in a warning and treated as absent.
  """
  if importlib.util.find_spec("tensorflow") is None:
    return False
  try:
    importlib.import_module("clu.metric_writers")
    importlib.import_module("clu.periodic_actions")
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("TensorFlow is installed but clu's writers do not import (%s: %s); "
                    "TensorBoard files are written with the tensorboard package instead",
                    type(error).__name__, error)
    return False
  return True


class EventFileMetricWriter:
  """The MetricWriter calls of the training loop, without TensorFlow.

  Writes what clu's `create_default_writer` writes: every scalar is logged (as clu's LoggingWriter
  does) and, with a `logdir`, scalars (scalars plugin, float32 tensors), images
  (images plugin: width, height and one PNG per image, as `tf.summary.image`) and hyperparameters
  (hparams plugin) go to an `events.out.tfevents.*` file there. `logdir=None` only logs (the
  other processes of a multi-host run). Event files are written by tensorboard's own
  EventFileWriter, in its background thread.
  """

  def __init__(self, logdir: str | None) -> None:
    # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import event_file_writer
    # pylint: enable=g-import-not-at-top
    self._events = None if logdir is None else event_file_writer.EventFileWriter(str(logdir))

  def _emit(self, step: int, values: list) -> None:
    # pylint: disable-next=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    if self._events is not None and values:
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """scalars: name -> number (Python, numpy or a 0-d jax array)."""
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.scalar import metadata
    from tensorboard.util import tensor_util
    # pylint: enable=g-import-not-at-top
    numbers = {}
    for key, value in scalars.items():
      array = np.asarray(value)
      if array.size != 1:
        raise ValueError(f"scalar summary {key!r} at step {step} has shape {array.shape}; "
                         "expected one number")
      numbers[key] = float(array.reshape(()))
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(numbers.items())))
    self._emit(step, [
        summary_pb2.Summary.Value(tag=key, metadata=metadata.create_summary_metadata(key, ""),
                                  tensor=tensor_util.make_tensor_proto(np.float32(value)))
        for key, value in numbers.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> uint8 [N, H, W, 3] (or [H, W, 3], or 1 / 4 channels)."""
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.image import metadata
    from tensorboard.util import tensor_util
    # pylint: enable=g-import-not-at-top
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})
    values = []
    for key, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim == 3:
        batch = batch[None]
      if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4) or batch.dtype != np.uint8:
        raise ValueError(f"image summary {key!r} at step {step} is {batch.dtype} of shape "
                         f"{batch.shape}; expected uint8 [N, H, W, 1|3|4]")
      encoded = [_png(image) for image in batch]
      h, w = batch.shape[1:3]
      tensor = tensor_util.make_tensor_proto([str(w).encode(), str(h).encode(), *encoded])
      values.append(summary_pb2.Summary.Value(
          tag=key, metadata=metadata.create_summary_metadata(key, ""), tensor=tensor))
    self._emit(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """hparams: flat name -> bool, int, float or str."""
    # pylint: disable-next=g-import-not-at-top
    from tensorboard.plugins.hparams import summary_v2
    self._emit(0, list(summary_v2.hparams_pb(dict(hparams)).value))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def _png(image: np.ndarray) -> bytes:
  """uint8 [H, W, C] -> PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def create_writer(workdir: str, *, just_logging: bool, use_tensorflow: bool | None = None):
  """The run's metric writer: clu's default writer where TensorFlow is installed, else
  `EventFileMetricWriter`. just_logging: log only, write no event file (processes other than
  0). use_tensorflow: None decides by `clu_writers_usable()`."""
  if use_tensorflow is None:
    use_tensorflow = clu_writers_usable()
  if use_tensorflow:
    metric_writers = importlib.import_module("clu.metric_writers")
    return metric_writers.create_default_writer(workdir, just_logging=just_logging)
  logging.info("No usable TensorFlow: TensorBoard summaries are written with the tensorboard "
               "package (%s)", "logging only" if just_logging else workdir)
  return EventFileMetricWriter(None if just_logging else workdir)


class ProfileSteps:
  """Traces `count` steps from step `first` with `jax.profiler` into `logdir` (where
  TensorBoard's profile plugin and `benchmarks/profile_summary.py` read it), as clu's Profile
  action does. Called after each step with its number; `close()` ends a trace the run cut short.
  """

  def __init__(self, logdir: str, first: int, count: int) -> None:
    self._logdir, self._first, self._last = str(logdir), first, first + count
    self._tracing = False

  def __call__(self, step: int) -> None:
    # Called after a step: starting after step first - 1 and stopping after step last - 1
    # traces steps first .. last - 1.
    if step == self._first - 1 and not self._tracing:
      jax.profiler.start_trace(self._logdir)
      self._tracing = True
    elif step >= self._last - 1 and self._tracing:
      self.close()

  def close(self) -> None:
    if self._tracing:
      jax.effects_barrier()
      jax.profiler.stop_trace()
      self._tracing = False
      logging.info("Profile of steps %d-%d written to %s", self._first, self._last - 1,
                   self._logdir)


def create_hooks(workdir: str, writer, *, total_steps: int, log_every_steps: int,
                 profile_steps: int, start_step: int,
                 use_tensorflow: bool | None = None) -> list[Callable[[int], None]]:
  """Per-step hooks of the main process: clu's ReportProgress (steps/s and uptime scalars, a
  progress log line) and Profile where TensorFlow is installed; without it, only the profile
  (the console's progress bar and the `images_per_second` scalar already report speed)."""
  if use_tensorflow is None:
    use_tensorflow = clu_writers_usable()
  hooks: list[Callable[[int], None]] = []
  if use_tensorflow:
    periodic_actions = importlib.import_module("clu.periodic_actions")
    hooks.append(periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                                 every_steps=log_every_steps))
    if profile_steps > 0:
      hooks.append(periodic_actions.Profile(num_profile_steps=profile_steps, logdir=workdir,
                                            first_profile=start_step + 2))
  elif profile_steps > 0:
    hooks.append(ProfileSteps(workdir, first=start_step + 2, count=profile_steps))
  return hooks
