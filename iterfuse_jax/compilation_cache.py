"""The persistent XLA compilation cache of a run: a resumed or repeated run loads its compiled
steps instead of compiling them again.

On a GPU the step of the paper's shapes takes long to compile and autotune (cuDNN and cuBLAS
kernels chosen by timing). With the cache in the workdir, the same command after a SIGKILL loads
the first process's executables: it starts training sooner, and it runs the very kernels the
killed process ran, so a resumed run does not differ from the uninterrupted one by a different
autotuning choice (see `iterfuse_jax.determinism` for what remains).

The cache is JAX's own (`jax_compilation_cache_dir`); this module decides where it is and counts
its use, for the run's log.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
from etils import epath

FOLDER = "compilation_cache"  # in the workdir, unless told otherwise
ENV_VARIABLE = "JAX_COMPILATION_CACHE_DIR"

# jax.monitoring events of the persistent cache (the same names in jax 0.10 and 0.11).
_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_HITS = "/jax/compilation_cache/cache_hits"
_WRITES = "/jax/compilation_cache/cache_misses"  # recorded when an entry is written
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def cache_dir(workdir: str | os.PathLike, requested: str | None,
              environ: Mapping[str, str] = os.environ) -> str | None:
  """Where a run's compilation cache is.

  Args:
    workdir: the run's workdir.
    requested: what the user asked for: a folder, "" for no cache, or None for the default.
    environ: the environment; its JAX_COMPILATION_CACHE_DIR is the default when set (a cache
      shared by several runs).

  Returns:
    The folder, or None for no cache.
  """
  if requested is None:
    requested = environ.get(ENV_VARIABLE) or str(epath.Path(workdir) / FOLDER)
  return requested or None


def enable(path: str | None) -> None:
  """Makes this process's compilations use the cache in `path` (None: no persistent cache).

  Call it before the first compilation: JAX decides once per process whether the cache is used.
  """
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)


@dataclasses.dataclass
class CacheUse:
  """Counts the persistent cache's use while active (a context manager).

  Attributes:
    requests: compilations that consulted the cache.
    loaded: of them, executables loaded from the cache.
    written: executables compiled and written to the cache (JAX writes only those that took
      longer to compile than `jax_persistent_cache_min_compile_time_secs`, and only from
      process 0).
    seconds_saved: the compile time the loaded executables had cost, less the time to load them.
  """
  requests: int = 0
  loaded: int = 0
  written: int = 0
  seconds_saved: float = 0.0

  def _on_event(self, event: str, **_) -> None:
    if event == _REQUESTS:
      self.requests += 1
    elif event == _HITS:
      self.loaded += 1
    elif event == _WRITES:
      self.written += 1

  def _on_duration(self, event: str, seconds: float, **_) -> None:
    if event == _SAVED:
      self.seconds_saved += seconds

  def __enter__(self) -> CacheUse:
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_listener(self._on_event)
    jax.monitoring.unregister_event_duration_listener(self._on_duration)

  def summary(self, path: str | None) -> str:
    """One line for the log: where the cache is and what it did."""
    if path is None:
      return "Compilation cache: off"
    return (f"Compilation cache {path}: {self.loaded} of {self.requests} compilations loaded "
            f"({self.seconds_saved:.1f} s of compiling saved), {self.written} written")
