"""A clear error when the materialized IFB's affinity matrices exhaust the device's memory.

The materialized IFB builds Co = softmax(Q K^T / sqrt(d)), [B, M, M] float32, in every CIB, and the
backward pass keeps it and builds its gradient: at the paper's full-resolution setting (sc = 1,
M = 19200 on NYUD's 480x640) that is 1.4 GiB per task pair and image. XLA then fails with a bare
"RESOURCE_EXHAUSTED: Out of memory ..." that says nothing of the cause. `with_hint` wraps a jitted
step so that such a failure of a materialized-IFB model is raised as `IFBOutOfMemoryError`, whose
message gives the size of Co and names the option that avoids it, `model.tpim.ifb_impl=streamed`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections

STREAMED_OPTION = "model.tpim.ifb_impl=streamed"
# HRNet's highest-resolution branch, where the task features live: stride 4.
FEATURE_STRIDE = 4


class IFBOutOfMemoryError(MemoryError):
  """The device ran out of memory in a model with the materialized IFB."""


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def uses_materialized_ifb(config: ml_collections.ConfigDict) -> bool:
  tpim = config.model.get("tpim")
  return (config.model.get("name") == "iterfuse" and tpim is not None
          and bool(tpim.get("use_ifb", True)) and tpim.get("ifb_impl") == "materialized")


def affinity_positions(config: ml_collections.ConfigDict) -> int:
  """M, the positions of one IFB: the stride-4 feature grid pooled by model.tpim.scale."""
  h, w = (int(s) for s in config.dataset.train_size)
  scale = int(config.model.tpim.scale)
  return (math.ceil(math.ceil(h / FEATURE_STRIDE) / scale)
          * math.ceil(math.ceil(w / FEATURE_STRIDE) / scale))


def explain(error: BaseException, config: ml_collections.ConfigDict,
            batch_size: int | None = None) -> IFBOutOfMemoryError | None:
  """The error to raise instead of `error`: None unless it is an OOM of a materialized IFB."""
  if not is_out_of_memory(error) or not uses_materialized_ifb(config):
    return None
  batch = int(batch_size or config.batch_size)
  tasks = len(config.dataset.tasks)
  pairs = tasks * (tasks - 1)
  m = affinity_positions(config)
  co_gib = batch * pairs * m * m * 4 / 2**30
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return IFBOutOfMemoryError(
      f"out of device memory ({first_line[:200]}) with the materialized IFB: it builds "
      f"Co = softmax(QK^T), [B, M, M] float32, in each of the {pairs} task pairs, here "
      f"M = {m} positions, {co_gib:.1f} GiB for a batch of {batch}, kept again with its gradient "
      f"by the backward pass. Set {STREAMED_OPTION} (launch.py "
      f"--config.{STREAMED_OPTION}), which never builds Co, or lower batch_size or raise "
      "model.tpim.scale.")


@contextlib.contextmanager
def hint(config: ml_collections.ConfigDict, batch_size: int | None = None) -> Iterator[None]:
  """Inside it, an out-of-memory error of the materialized IFB is raised as IFBOutOfMemoryError
  (from the original); any other error passes unchanged."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    explained = explain(e, config, batch_size)
    if explained is None:
      raise
    raise explained from e


def with_hint(step: Callable[..., Any], config: ml_collections.ConfigDict,
              batch_size: int | None = None) -> Callable[..., Any]:
  """`step` (a jitted function, or a compiled one) raising IFBOutOfMemoryError for an IFB OOM.

  The first call waits for its outputs: on a CPU (and for some allocations on a GPU) XLA reports
  an out-of-memory error only when the result is read, and it must surface here to be explained.
  """
  first = [True]

  @functools.wraps(step)
  def wrapped(*args, **kwargs):
    with hint(config, batch_size):
      out = step(*args, **kwargs)
      if first[0]:
        jax.block_until_ready(out)
        first[0] = False
      return out

  return wrapped
