"""Stopping a training run cleanly on SIGTERM or Ctrl-C: the step in flight (and an evaluation
under way) finishes, a checkpoint of that step is saved, and `train_and_evaluate` ends with
`TrainingStopped`; the same command resumes from that step.

Schedulers ask a job to end with SIGTERM and kill it a grace period later (SLURM at the time limit,
on preemption or `scancel`, 30 s by default; Kubernetes on eviction). Without this, the work since
the last periodic checkpoint (up to an epoch) was lost, Ctrl-C printed a traceback, and a run of
several JAX processes ignored SIGTERM altogether: JAX's preemption service catches it in every
process of a `jax.distributed` job, and the run went on until it was killed.

One process: handlers of SIGTERM and SIGINT note the signal, and the loop asks after every step.
Several processes: they must stop after the same step, which JAX's preemption service agrees on
(orbax's `reached_preemption`, asked after every step in every process; after the first step of
a run they also check together for a notice that came before it); SIGTERM is the service's own
notice, and Ctrl-C is handed to it as a SIGTERM of the process. A second signal acts at once
(Ctrl-C: KeyboardInterrupt; SIGTERM of one process: its default action, termination).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from iterfuse_jax import coordination

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
  """The run stopped on a signal after `step`, whose checkpoint is saved in `checkpoint_dir`."""

  def __init__(self, step: int, signal_number: int, checkpoint_dir: str | epath.Path,
               received: bool = True):
    """`received`: this process's own handler got the signal (else JAX's preemption service
    got it, in this or another process of the run)."""
    self.step = step
    self.signal_number = signal_number
    self.checkpoint_dir = epath.Path(checkpoint_dir)
    name = signal.Signals(signal_number).name
    cause = name if received else f"{name} to a process of the run"
    super().__init__(f"stopped after step {step} on {cause}; its checkpoint is "
                     f"{self.checkpoint_dir / str(step)}, and the same command resumes from it")


class StopSignals:
  """While it is entered (in the main thread), SIGTERM and SIGINT ask the run to stop.

  `should_stop(step, reached_preemption)` after every step says whether to save and stop there.
  With `coordinated` (several processes and JAX's preemption service on) the answer is the
  service's agreement, the same step in every process.
  """

  def __init__(self, coordinated: bool | None = None):
    if coordinated is None:
      coordinated = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
    self.coordinated = coordinated
    self.received: int | None = None  # the first signal of this process
    self._previous: dict[int, Callable | int | None] = {}
    self._asked = False  # whether `should_stop` was called in this run

  def install(self) -> None:
    """Installs the handlers (in the main thread; elsewhere signals keep their handlers)."""
    if threading.current_thread() is not threading.main_thread():
      return  # Python runs signal handlers in the main thread only
    for signum in STOP_SIGNALS:
      if signum == signal.SIGTERM and self.coordinated:
        continue  # JAX's preemption service handles it (and must see it)
      self._previous[signum] = signal.signal(signum, self._handle)

  def uninstall(self) -> None:
    """Puts the handlers from before `install` back."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> StopSignals:
    self.install()
    return self

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.received is not None:  # asked twice: the signal's default action, now
      self.uninstall()
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.received = signum
    again = "Ctrl-C again" if signum == signal.SIGINT else "the signal again"
    _notice(f"{signal.Signals(signum).name}: the run stops after this step with a checkpoint of "
            f"it ({again} stops at once)")
    if self.coordinated:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, which tells the others

  def should_stop(self, step: int, reached_preemption: Callable[[int], bool]) -> bool:
    """Whether to save `step` and stop; call it after every step, in every process."""
    if self.coordinated:
      agreed = reached_preemption(step)
      if not self._asked:
        self._asked = True
        # The service agrees on the step after the highest one its processes have reported; a
        # notice before the first report (start-up, restore, compilation) makes that step 1,
        # which a resumed run never reaches: it trained on until killed. So after the first
        # report, every process says whether a notice came, and all stop if one did.
        return agreed or _any_process(_preemption_notice_received())
      return agreed
    return self.received is not None

  def stopped(self, step: int, checkpoint_dir: str | epath.Path) -> TrainingStopped:
    """The exception that ends the run after `step`: this process's Ctrl-C or SIGTERM, else
    SIGTERM (the preemption service's notice, from this or another process)."""
    if self.received is None:
      return TrainingStopped(step, signal.SIGTERM, checkpoint_dir, received=False)
    return TrainingStopped(step, self.received, checkpoint_dir)


# The coordination service's key of a preemption notice (XLA's preemption_sync_manager.cc).
PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def _preemption_notice_received() -> bool:
  """Whether JAX's preemption service has a notice (a SIGTERM to any process of the run)."""
  return coordination.has_key(PREEMPTION_NOTICE_KEY)


def _any_process(flag: bool) -> bool:
  """`flag` or-ed over the processes (a collective: every process must call it)."""
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _notice(text: str) -> None:
  """A line on stderr and in the log, written from a signal handler: the main thread may be in the
  middle of a write to stderr (a progress bar), which then refuses a reentrant one."""
  try:
    sys.stderr.write(f"\n{text}\n")
    sys.stderr.flush()
  except (RuntimeError, OSError, ValueError):
    pass
  try:
    logging.getLogger(__name__).info("%s", text)
  except RuntimeError:
    pass
