"""In a run of several JAX processes, the first process to fail stops the others with its message.

Without this, a process that failed (bad data while process 0 prepares it, a full disk, a file one
host cannot read) printed its error and waited in JAX's shutdown barrier, while the others waited
at their next collective until a timeout ended them with an error that did not say why (on CPU
gloo's 30 s and "Gloo context initialization failed"; a collective without a timeout, such as
NCCL's, waits until JAX's coordination service gives up on the ended process). Now the failing
process puts its message in the coordination service's key-value store, under a key of every
other process; a thread in each of them waits for its key, prints `error: process K of N failed:
<its message>` and ends its process (exit status 1); the failing process ends too, without the
shutdown barrier, which the others no longer reach. Process 0 ends last: it hosts the
coordination service, and a process still connected to it when it goes aborts ("Terminating
process because the JAX distributed service detected fatal errors", SIGABRT), so the others
say they are leaving and process 0 waits for that. A failure after one or more processes ended
normally (process 0 writing the final reports, after the last collective) ends every other
process through JAX's shutdown barrier instead: the processes that ended wait there, and
aborted when the others went without it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import jax

from iterfuse_jax import coordination

# A process's thread waits for its own key: another process that fails writes its message
# there ("<process>\n<message>"), and the process itself writes _ENDED to end the thread when it
# ends normally (a thread still inside the client's blocking read when the interpreter exits
# aborted the process: "terminate called after throwing an instance of ''", 1 exit in 3), or
# _FAILING when it fails itself. Other failing processes read the difference: one that ended
# normally waits for them in JAX's shutdown barrier, one that fails leaves without it.
_NOTICE_KEY = "iterfuse_jax/failure_notice/"
_ENDED = ""
_FAILING = "failing"
_LEAVING_KEY = "iterfuse_jax/failure_leaving/"
_WAIT_MS = 3_600_000  # one blocking read of the key; the thread reads again after each
_LEAVING_TIMEOUT_S = 20.0  # how long process 0 waits for the others to say they are leaving
# From a process's word that it leaves to its exit: the reply to its last request to the service
# (a process whose reply was still on the way when process 0 went aborted: 2 runs in 8).
_EXIT_GRACE_S = 2.0
_JOIN_TIMEOUT_S = 10.0
_KEYS_TIMEOUT_S = 10.0  # how long a failing or told process waits for every notice key


class FailureWatch:
  """Entered in every process of a multi-process run (a no-op in one process)."""

  def __init__(self):
    self._client = coordination.client()
    self._thread: threading.Thread | None = None
    # Held while the thread relays another process's failure, and by `fail` while it marks
    # this process as failing: a process ends with one error, its own or the first relayed.
    self._lock = threading.Lock()
    self._failing = False

  @property
  def active(self) -> bool:
    """Whether this is a run of several processes (else `fail` only ends this one)."""
    return self._client is not None

  def __enter__(self) -> FailureWatch:
    if self._client is not None:
      self._thread = threading.Thread(target=self._watch, name="process-failure-watch",
                                      daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    """Ends the thread (before JAX's shutdown at exit)."""
    if self._thread is None:
      return
    try:
      self._client.key_value_set(_NOTICE_KEY + str(jax.process_index()), _ENDED)
    except jax.errors.JaxRuntimeError:
      pass  # a failure notice is there already: the thread is acting on it
    self._thread.join(_JOIN_TIMEOUT_S)

  def _watch(self) -> None:
    key = _NOTICE_KEY + str(jax.process_index())
    while True:
      try:
        value = self._client.blocking_key_value_get(key, _WAIT_MS)
      except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" in str(e):
          continue
        return  # the client is gone (JAX reports why)
      if value == _ENDED:
        return  # this process is exiting
      with self._lock:
        if self._failing:
          # _FAILING, or the processes found the same error at once (a check they run
          # together): `fail` prints this process's own error and ends it with its own status.
          return
        process, _, message = value.partition("\n")
        text = (f"error: process {process} of {jax.process_count()} failed: {message}\n"
                f"(process {jax.process_index()} stops too)")
        logging.info("%s", text)
        # The process's own stderr: the main thread may have redirected sys.stderr (library
        # output goes to the log file while the dataset is prepared).
        _flush_and_print(text, sys.__stderr__ or sys.stderr)
        self._exit(1)

  def fail(self, text: str, status: int = 1) -> None:
    """Prints `text` (this process's error: `error: ` and a message of one or more lines, or a
    traceback), tells the other processes it failed with the message (of a traceback, its last
    line), and ends this process with `status`."""
    with self._lock:  # the thread may be relaying another process's failure: then it ends us
      self._failing = True
    _flush_and_print(text)
    text = text.strip()
    message = (text.removeprefix("error: ") if text.startswith("error: ")
               else text.splitlines()[-1])
    if self._client is not None:
      me = jax.process_index()
      # This process's own key first: its thread ends (or holds a notice it leaves alone).
      for process in [me] + [p for p in range(jax.process_count()) if p != me]:
        try:
          self._client.key_value_set(_NOTICE_KEY + str(process),
                                     _FAILING if process == me else f"{me}\n{message}")
        except jax.errors.JaxRuntimeError:
          pass  # it ended, or fails itself, or was told by another failing process
    self._exit(status)

  def _exit(self, status: int) -> None:
    """Ends this process: through JAX's shutdown barrier where another process ended normally
    and waits there; else without it (it would wait for processes that have left), process 0
    after the others."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if self._client is not None and self._ended_normally():
      if self._thread is not None and self._thread is not threading.current_thread():
        self._thread.join(_JOIN_TIMEOUT_S)  # it ends on this process's _FAILING
      try:
        jax.distributed.shutdown()  # every process that did not end normally calls it too
      except Exception:  # pylint: disable=broad-exception-caught
        pass  # this process's error is printed already; JAX prints the barrier's
    elif self._client is not None and jax.process_index() > 0:
      try:
        self._client.key_value_set(_LEAVING_KEY + str(jax.process_index()), "1")
      except jax.errors.JaxRuntimeError:
        pass
    elif self._client is not None:
      deadline = time.monotonic() + _LEAVING_TIMEOUT_S
      for process in range(1, jax.process_count()):
        try:
          self._client.blocking_key_value_get(
              _LEAVING_KEY + str(process), int(max(deadline - time.monotonic(), 0.001) * 1000))
        except jax.errors.JaxRuntimeError:
          pass  # one that does not say it leaves (killed): waited enough
      time.sleep(_EXIT_GRACE_S)
    os._exit(status)  # pylint: disable=protected-access

  def _ended_normally(self) -> bool:
    """Whether another process ended normally before the failure. Every process that fails or
    is told reads the same answer: each notice key is written once (by its process, ending or
    failing, or by the first failing process to tell it), and every key is written by then or
    soon after (by each failing process, which writes them all)."""
    deadline = time.monotonic() + _KEYS_TIMEOUT_S
    for process in range(jax.process_count()):
      if process == jax.process_index():
        continue
      try:
        value = self._client.blocking_key_value_get(
            _NOTICE_KEY + str(process), int(max(deadline - time.monotonic(), 0.001) * 1000))
      except jax.errors.JaxRuntimeError:
        continue  # not written in time: a failing process died before it told this one
      if value == _ENDED:
        return True
    return False


def _flush_and_print(text: str, stream=None) -> None:
  sys.stdout.flush()
  print(text, file=stream or sys.stderr, flush=True)
