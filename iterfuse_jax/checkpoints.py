"""Orbax checkpoints of a training run: the latest K for resuming, and the best by Delta_m.

Layout under the workdir:
  checkpoints/<step>/{state, data_iter}   periodic and final saves (train state + grain iterator)
  best/<step>/state                        the single best evaluation so far (highest Delta_m)
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any


def _abstract(tree: PyTree) -> PyTree:
  """Shape/dtype/sharding description of `tree`, the restore target orbax needs."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
  """The two checkpoint managers of a run (see the module docstring)."""

  def __init__(self, workdir: str | epath.Path, keep: int):
    workdir = epath.Path(workdir)
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.latest = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data_iter"))
    self.best = ocp.CheckpointManager(
        workdir / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda metrics: metrics["delta_m"],
            best_mode="max"),
        item_names=("state",))

  def save(self, step: int, state: PyTree, data_iter: Any) -> None:
    """Saves the train state and the input iterator position at `step` (waits until written)."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.latest.save(step, args=ocp.args.Composite(**args), force=True)
    self.latest.wait_until_finished()

  def save_best(self, step: int, state: PyTree, delta_m: float) -> None:
    """Keeps `state` if its Delta_m beats the best so far."""
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   metrics={"delta_m": float(delta_m)}, force=True)
    self.best.wait_until_finished()

  def restore_latest(self, state: PyTree, data_iter: Any) -> tuple[PyTree, int] | None:
    """Restores the newest checkpoint into the structure of `state` (and `data_iter` in place).

    Returns (state, step), or None when the run has no checkpoint yet.
    """
    step = self.latest.latest_step()
    if step is None:
      return None
    args = {"state": ocp.args.StandardRestore(_abstract(state))}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.latest.restore(step, args=ocp.args.Composite(**args))
    logging.info("Restored checkpoint of step %d from %s", step, self.latest.directory)
    return restored["state"], step

  def restore_state(self, state: PyTree, which: str = "latest") -> tuple[PyTree, int]:
    """Restores only the train state, from the "latest" or the "best" checkpoint."""
    if which not in ("latest", "best"):
      raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    manager = self.latest if which == "latest" else self.best
    step = manager.latest_step() if which == "latest" else manager.best_step()
    if step is None:
      raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(state))))
    return restored["state"], step

  def close(self) -> None:
    self.latest.close()
    self.best.close()
