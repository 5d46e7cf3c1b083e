"""In a run of several JAX processes, the first process to fail stops the others with its message.

Without this, a process that failed (bad data while process 0 prepares it, a full disk, a file one
host cannot read) printed its error and waited in JAX's shutdown barrier, while the others waited
at their next collective until a timeout ended them with an error that did not say why (on CPU
gloo's 30 s and "Gloo context initialization failed"; a collective without a timeout, such as
NCCL's, waits until JAX's coordination service gives up on the ended process). Now the failing
process puts its message in the coordination service's key-value store, under a key of every
other process; a thread in each of them waits for its key, prints `error: process K of N failed:
<its message>` and ends its process at once (exit status 1). The failing process waits
(seconds) until the others have read it, then ends without the shutdown barrier, which the
others no longer reach.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import jax
from jax._src import distributed as jax_distributed  # the client of the coordination service

# A process's thread waits for its own key: another process that fails writes its message
# there, and the process itself writes an empty value to end the thread when it exits normally
# (a thread still inside the client's blocking read when the interpreter exits aborted the
# process: "terminate called after throwing an instance of ''", 1 exit in 3).
_NOTICE_KEY = "iterfuse_jax/failure_notice/"
_SEEN_KEY = "iterfuse_jax/failure_seen/"
_WAIT_MS = 3_600_000  # one blocking read of the key; the thread reads again after each
_SEEN_TIMEOUT_MS = 20_000  # how long a failing process waits for the others to read its message
_JOIN_TIMEOUT_S = 10.0


class FailureWatch:
  """Entered in every process of a multi-process run (a no-op in one process)."""

  def __init__(self):
    self._client = jax_distributed.global_state.client if jax.process_count() > 1 else None
    self._thread: threading.Thread | None = None

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
      self._client.key_value_set(_NOTICE_KEY + str(jax.process_index()), "")
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
      if not value:
        return  # this process is exiting
      process, _, message = value.partition("\n")
      text = (f"error: process {process} of {jax.process_count()} failed: {message}\n"
              f"(process {jax.process_index()} stops too)")
      logging.info("%s", text)
      # The process's own stderr: the main thread may have redirected sys.stderr (library
      # output goes to the log file while the dataset is prepared).
      _flush_and_print(text, sys.__stderr__ or sys.stderr)
      try:
        self._client.key_value_set(_SEEN_KEY + str(jax.process_index()), "1")
      except jax.errors.JaxRuntimeError:
        pass
      os._exit(1)  # pylint: disable=protected-access

  def fail(self, text: str, status: int = 1) -> None:
    """Prints `text` (this process's error: a line, or a traceback), tells the other processes
    it failed with its last line, waits until they have read it, and ends this process with
    `status`."""
    _flush_and_print(text)
    message = text.strip().splitlines()[-1].removeprefix("error: ")
    if self._client is not None:
      me = jax.process_index()
      # This process's own thread first: it must not act on another process's notice now.
      told = []
      for process in [me] + [p for p in range(jax.process_count()) if p != me]:
        try:
          self._client.key_value_set(_NOTICE_KEY + str(process), "" if process == me else
                                     f"{me}\n{message}")
          told.append(process)
        except jax.errors.JaxRuntimeError:
          pass  # it failed or exited already (or was told by another failing process)
      for process in told:
        if process != me:
          try:
            self._client.blocking_key_value_get(_SEEN_KEY + str(process), _SEEN_TIMEOUT_MS)
          except jax.errors.JaxRuntimeError:
            break  # gone already, or not reading: nothing more to wait for
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: JAX's shutdown barrier at exit would wait for processes that have ended.
    os._exit(status)  # pylint: disable=protected-access


def _flush_and_print(text: str, stream=None) -> None:
  sys.stdout.flush()
  print(text, file=stream or sys.stderr, flush=True)
