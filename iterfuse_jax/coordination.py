"""The coordination service of a `jax.distributed` run: its client, and texts gathered from every
process through its key-value store.

JAX has no public accessor for the client of the coordination service (the key-value store and
barriers that `jax.distributed.initialize` starts), which the run needs beyond collectives: a
process's failure message for the others (`process_failure`), a preemption notice that came
before the first step (`stopping`), each process's view of the workdir (`train`). This module is
the one place that reaches into `jax._src.distributed` for it, so that a JAX release that moves it
is a one-line change here and a clear error everywhere else.
"""

from __future__ import annotations

import jax

_KEY_PREFIX = "iterfuse_jax/"


def client():
  """The coordination service's client of this process, or None in a run of one process.

  Raises:
    RuntimeError: this JAX version keeps the client elsewhere (names the version).
  """
  if jax.process_count() == 1:
    return None
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    found = distributed.global_state.client
  except (ImportError, AttributeError) as e:
    raise RuntimeError(
        f"jax {jax.__version__} does not keep the coordination service's client at "
        "jax._src.distributed.global_state.client, where iterfuse_jax.coordination looks for it: "
        f"{e}") from e
  if found is None:
    raise RuntimeError("a run of several JAX processes without a coordination service client: "
                       "call jax.distributed.initialize first")
  return found


def gather_texts(name: str, text: str, timeout_s: float = 600.0) -> list[str]:
  """Every process's `text` for `name`, in process order (a collective: every process calls it).

  In one process: `[text]`. A name can be gathered again (a second `train_and_evaluate` or
  `evaluate_checkpoint` in the same session): the n-th gathering of a name in one process pairs
  with the n-th in the others.

  Raises:
    jax.errors.JaxRuntimeError: a process did not give its text within `timeout_s`.
  """
  store = client()
  if store is None:
    return [text]
  me = jax.process_index()
  # The store keeps every key for the run's lifetime and refuses to set one twice. Which round
  # this is, this process reads from its own keys, which no other process writes: the first
  # round it has no key for. Processes gather in the same order, so their rounds agree.
  round_ = 0
  while has_key(f"{_KEY_PREFIX}{name}/{round_}/{me}"):
    round_ += 1
  prefix = f"{_KEY_PREFIX}{name}/{round_}/"
  store.key_value_set(prefix + str(me), text)
  return [text if p == me else store.blocking_key_value_get(prefix + str(p), int(timeout_s * 1000))
          for p in range(jax.process_count())]


def has_key(key: str) -> bool:
  """Whether the coordination service's store holds `key` (False in a run of one process)."""
  store = client()
  if store is None:
    return False
  try:
    store.key_value_try_get(key)
  except jax.errors.JaxRuntimeError as e:
    if "NOT_FOUND" in str(e):
      return False
    raise
  return True
