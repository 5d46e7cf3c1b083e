"""What a training run shows on the console, and where everything else goes.

By default a run prints a few lines (what is trained and where, one line per evaluation, the
metrics table, where the results are) and two progress bars (training, evaluation); the INFO logs
of the libraries (orbax, tensorflow-datasets, absl, JAX, TensorFlow) go to `<workdir>/log.txt`
(`configure_logging`), and the console shows only this project's warnings and errors
(`quiet_console`). launch.py's `-v` / `--verbosity` shows everything on the console as well.
Only process 0 of a multi-host run prints; every process logs to its own file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterator, TextIO

import jax
from absl import logging as absl_logging
from etils import epath

LOG_FILE = "log.txt"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code whose warnings a quiet console shows; the libraries' show from ERROR up.
_OWN_CODE = tuple(os.path.join(_REPO, name) for name in ("iterfuse_jax", "data_pipelines",
                                                          "launch.py"))
# Library output that bypasses logging (tensorflow-datasets prints and draws progress bars while
# it prepares a dataset) goes here while the console is quiet; None: to the console.
_library_stream: TextIO | None = None


def log_file(workdir: str | epath.Path, process_index: int) -> epath.Path:
  """The log file of one process: log.txt for process 0, log.process<i>.txt for the others."""
  name = LOG_FILE if process_index == 0 else f"log.process{process_index}.txt"
  return epath.Path(workdir) / name


def quiet_console(verbose: bool) -> None:
  """Before anything is logged: the console shows this project's warnings and every library's
  errors (everything with `verbose`), and TensorFlow's C++ start-up messages are silenced
  (call it before TensorFlow is imported).

  TensorFlow only writes TensorBoard files here, so its oneDNN kernels (whose start-up notice
  ignores TF_CPP_MIN_LOG_LEVEL) are of no use.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
  if verbose:
    return
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  handler = absl_logging.get_absl_handler()  # absl's handler writes to stderr: the console
  handler.setLevel(logging.WARNING)
  handler.addFilter(_quiet_console)


def configure_logging(workdir: str | epath.Path, verbose: bool,
                      process_index: int = 0) -> epath.Path:
  """Sends every INFO log of this process to its log file (see `quiet_console` for the console);
  returns the file.

  Raises:
    OSError: the log file cannot be written.
  """
  global _library_stream
  path = log_file(workdir, process_index)
  stream = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
  handler = logging.StreamHandler(stream)
  handler.setFormatter(absl_logging.PythonFormatter())
  handler.setLevel(logging.INFO)
  root = logging.getLogger()
  root.addHandler(handler)
  absl_logging.set_verbosity(absl_logging.INFO)  # the root logger's level
  logging.captureWarnings(True)
  if not verbose:
    _library_stream = stream
  return path


def _quiet_console(record: logging.LogRecord) -> bool:
  """Warnings of this project (and Python warnings) and every library's errors."""
  return (record.levelno >= logging.ERROR or record.name == "py.warnings"
          or record.pathname.startswith(_OWN_CODE))


@contextlib.contextmanager
def library_output() -> Iterator[None]:
  """Within it, what libraries print to stdout / stderr goes to the log file (quiet console)."""
  if _library_stream is None:
    yield
    return
  with contextlib.redirect_stdout(_library_stream), contextlib.redirect_stderr(_library_stream):
    yield
  _library_stream.flush()


def is_main_process() -> bool:
  return jax.process_index() == 0


def line(text: str = "") -> None:
  """Prints a line on process 0 (above any progress bar)."""
  if not is_main_process():
    return
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  tqdm.write(text, file=sys.stdout)
  sys.stdout.flush()


def progress(total: int, initial: int = 0, desc: str = "", unit: str = "step",
             leave: bool = True):
  """A progress bar (tqdm, on stderr) of process 0; a no-op on the other processes.

  Where stderr is not a terminal (a log file, a pipe), a bar that is `leave`-d becomes a line
  every 30 s and one at the end, and the others show nothing.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  if is_main_process() and not sys.stderr.isatty():
    return _ProgressLines(total, initial, desc, enabled=leave)
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
              dynamic_ncols=True, disable=not is_main_process(), file=sys.stderr)


class _ProgressLines:
  """tqdm's interface (update, set_postfix, close, context manager) as occasional plain lines."""

  def __init__(self, total: int, initial: int, desc: str, enabled: bool, every_s: float = 30.0):
    self.total, self.n, self.desc = total, initial, desc
    self.enabled, self.every_s = enabled, every_s
    self._postfix = ""
    self._start = self._last = time.monotonic()
    self._first: tuple[float, int] | None = None  # after the first update (compilation)

  def set_postfix(self, values: dict[str, str], refresh: bool = False) -> None:
    del refresh
    self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.monotonic()
    if self._first is None:
      self._first = (now, self.n)
    if (self.total is not None and self.n >= self.total) or now - self._last >= self.every_s:
      self._last = now
      self._print(now)

  def _print(self, now: float) -> None:
    if not self.enabled:
      return
    elapsed = now - self._start
    # The rate since the first update leaves out the compilation of the first step.
    since, done = now - self._first[0], self.n - self._first[1]
    eta = since / done * (self.total - self.n) if done and self.total else float("nan")
    text = (f"{self.desc} {self.n}/{self.total or '?'} "
            f"[{_clock(elapsed)} elapsed, ETA {_clock(eta)}]")
    print(text + (f" {self._postfix}" if self._postfix else ""), file=sys.stderr, flush=True)

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _clock(seconds: float) -> str:
  if seconds != seconds:  # nan
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes >= 60:
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
  return f"{minutes}:{secs:02d}"
