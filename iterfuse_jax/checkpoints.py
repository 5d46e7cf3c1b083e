"""Orbax checkpoints of a training run: the latest K for resuming, and the best by Delta_m.

Layout under the workdir:
  checkpoints/<step>/{state, data_iter}   periodic and final saves (train state + grain iterator)
  best/<step>/state                        the best evaluation so far (highest Delta_m)

A run killed at any moment resumes from what is there:
  - orbax writes a save into `<step>.orbax-checkpoint-tmp` and renames it when it is complete, so
    an interrupted save leaves only that folder; it is reported (warning) and deleted;
  - a complete checkpoint that cannot be read back is reported (warning naming it and the error),
    moved to `unreadable_checkpoints/`, and the one before it is used. When none can be read, the
    run stops with an error listing them (a run is never silently restarted from scratch).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any
INCOMPLETE_MARK = ".orbax-checkpoint-tmp"
UNREADABLE_DIR = "unreadable_checkpoints"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be restored; the message names each and why."""


def _abstract(tree: PyTree) -> PyTree:
  """Shape/dtype/sharding description of `tree`, the restore target orbax needs."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def committed_steps(directory: str | epath.Path) -> list[int]:
  """The steps of the complete checkpoints in `directory` (folders named by their step)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def remove_incomplete(directory: epath.Path) -> list[epath.Path]:
  """Deletes the folders of interrupted saves in `directory` (process 0); returns them."""
  if not directory.is_dir():
    return []
  incomplete = sorted(p for p in directory.iterdir() if INCOMPLETE_MARK in p.name)
  if jax.process_index() == 0:
    for path in incomplete:
      logging.warning("Skipping the incomplete checkpoint %s (its save was interrupted); "
                      "deleting it.", path)
      path.rmtree(missing_ok=True)
  return incomplete


class RunCheckpoints:
  """The two checkpoint managers of a run (see the module docstring)."""

  def __init__(self, workdir: str | epath.Path, keep: int, read_only: bool = False):
    """`read_only`: restore only, and leave incomplete or unreadable checkpoints where they are
    (for evaluating the workdir of a run that may be training)."""
    self.workdir = epath.Path(workdir)
    self.read_only = read_only
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    if not read_only:
      for folder in ("checkpoints", "best"):
        remove_incomplete(self.workdir / folder)
      _sync("checkpoints: incomplete saves removed")
    # Each manager's background commit ends at barriers whose keys would be the same in both
    # managers: with several processes, a best save started while the latest save's commit was
    # at such a barrier failed in one process ("Barrier ... is already ongoing") and left the
    # others waiting until JAX's coordination service aborted the run. Prefixes keep them apart.
    self.latest = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="checkpoints")),
        item_names=("state", "data_iter"))
    self.best = ocp.CheckpointManager(
        self.workdir / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda metrics: metrics["delta_m"],
            best_mode="max",
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best")),
        item_names=("state",))

  def save(self, step: int, state: PyTree, data_iter: Any) -> None:
    """Saves the train state and the input iterator position at `step`, in the background.

    Returns once the arrays are copied to host memory and the iterator position is taken, so
    the caller may go on training (and donate `state`'s buffers). The files are written and
    committed meanwhile; the next save and `close` wait for them. Writing a checkpoint
    of the paper's NYUD model (140 MiB, 1812 arrays) takes 2.7 s on a 2-core CPU, of which the
    caller waits 0.4 s.
    """
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.latest.save(step, args=ocp.args.Composite(**args), force=True)

  def reached_preemption(self, step: int) -> bool:
    """Whether the processes of a multi-process run agree to save `step` and stop (JAX's
    preemption service, after a SIGTERM to any of them; see `iterfuse_jax.stopping`). Every
    process must ask after every step."""
    return self.latest.reached_preemption(step)

  def save_best(self, step: int, state: PyTree, delta_m: float) -> None:
    """Keeps `state` as the best one (the caller decides it beats the best so far).

    A step already there (saved before the run was killed, not yet recorded) is kept as it is.
    """
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   metrics={"delta_m": float(delta_m)}, force=True)
    self.best.wait_until_finished()

  def restore_latest(self, state: PyTree, data_iter: Any) -> tuple[PyTree, int] | None:
    """Restores the newest readable checkpoint into the structure of `state` (and `data_iter`
    in place). Returns (state, step), or None when the run has no checkpoint yet.

    Raises:
      CheckpointError: there are checkpoints but none can be read.
    """
    items = {"state": lambda: ocp.args.StandardRestore(_abstract(state))}
    if data_iter is not None:
      items["data_iter"] = lambda: grain.checkpoint.CheckpointRestore(data_iter)
    return self._restore_newest(self.latest, items)

  def restore_state(self, state: PyTree, which: str = "latest") -> tuple[PyTree, int]:
    """Restores only the train state, from the "latest" (newest readable) or the "best"
    checkpoint."""
    if which not in ("latest", "best"):
      raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    manager = self.latest if which == "latest" else self.best
    items = {"state": lambda: ocp.args.StandardRestore(_abstract(state))}
    if which == "latest":
      restored = self._restore_newest(manager, items)
    else:
      step = manager.best_step()
      restored = None if step is None else self._restore_newest(manager, items, [step])
    if restored is None:
      raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
    return restored

  def _restore_newest(self, manager: ocp.CheckpointManager, items: dict[str, Any],
                      steps: Sequence[int] | None = None) -> tuple[PyTree, int] | None:
    steps = sorted(manager.all_steps() if steps is None else steps, reverse=True)
    failures = []
    for step in steps:
      try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{name: make() for name, make in items.items()}))
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Whatever a damaged checkpoint raises (orbax, tensorstore, json): try the previous one.
        path = epath.Path(manager.directory) / str(step)
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        failures.append(f"{path}: {reason}")
        logging.warning("Skipping the checkpoint %s: it cannot be read (%s)", path, reason)
        continue
      self._agree(step, manager.directory)
      if failures and not self.read_only:
        self._set_aside(manager, [s for s in steps if s > step])
      logging.info("Restored checkpoint of step %d from %s", step, manager.directory)
      return restored["state"], step
    if failures:
      raise CheckpointError(
          f"none of the checkpoints in {manager.directory} can be restored (a changed config? "
          "damaged files?):\n  " + "\n  ".join(failures))
    return None

  def _agree(self, step: int, directory: epath.Path) -> None:
    """Every process must resume from the same step (they read the same files)."""
    if jax.process_count() == 1:
      return
    steps = np.asarray(multihost_utils.process_allgather(np.int64(step)))
    if not (steps == step).all():
      raise CheckpointError(f"the processes restored different steps {steps.tolist()} from "
                            f"{directory}; is the workdir on a filesystem all hosts share?")

  def _set_aside(self, manager: ocp.CheckpointManager, steps: Sequence[int]) -> None:
    """Moves unreadable checkpoints to <workdir>/unreadable_checkpoints/, so that their steps can
    be saved again and the files stay for inspection."""
    _sync("checkpoints: set aside, before")
    if jax.process_index() == 0:
      target_dir = self.workdir / UNREADABLE_DIR
      target_dir.mkdir(parents=True, exist_ok=True)
      for step in steps:
        source = epath.Path(manager.directory) / str(step)
        target = target_dir / f"{epath.Path(manager.directory).name}_{step}"
        n = 1
        while target.exists():
          n += 1
          target = target_dir / f"{epath.Path(manager.directory).name}_{step}.{n}"
        source.rename(target)
        logging.warning("Moved the unreadable checkpoint %s to %s", source, target)
    _sync("checkpoints: set aside, after")
    manager.reload()

  def close(self) -> None:
    """Waits for a save still being written, then closes the managers."""
    self.latest.close()
    self.best.close()
