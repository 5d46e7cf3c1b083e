"""Trains and evaluates a model from a config file.

  python launch.py --config configs/nyud_ifbC.py --workdir /tmp/nyud_ifbC \
      --config.dataset.data_dir=/data/NYUD_MT
  python launch.py --config configs/demo.py --workdir /tmp/iterfuse_demo
  python launch.py --config configs/nyud_ifbC.py --workdir /tmp/nyud_ifbC --mode eval

Any config field can be overridden with `--config.<key>=<value>`; unknown keys are errors.
A killed run started again with the same command resumes from its last checkpoint; on a finished
workdir the command prints the final metrics. SIGTERM (a scheduler's time limit or preemption) or
Ctrl-C stops training after the current step with a checkpoint of it (exit status 143 or 130);
a second one stops at once. Library logs go to <workdir>/log.txt (`-v 0` shows
them on the console too). Compiled steps are kept in <workdir>/compilation_cache, so the command
run again loads them instead of compiling (--compilation_cache_dir moves or turns it off).

Multi-host (or one process per GPU): start the same command in every process, with
  --distributed                     on a cluster JAX recognises (SLURM, Open MPI, Kubernetes, TPU),
                                    which then tells each process its rank;
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=I]
                                    anywhere else (JAX_COORDINATOR_ADDRESS and
                                    JAX_LOCAL_DEVICE_IDS are read when the flags are absent).
The workdir (and data folder) must be on a filesystem every process sees.
"""

import difflib
import errno
import gc
import os
import signal
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train with periodic evaluation (resumes if possible); "
                          "eval: evaluate a checkpoint of the workdir.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"],
                                "Which checkpoint --mode=eval evaluates.")
_SAVE_PREDICTIONS = flags.DEFINE_bool(
    "save_predictions", False,
    "--mode=eval: also write every task's prediction of every eval image to "
    "<workdir>/predictions/<task>/ in the MTL survey code's file formats (PNG, .mat for depth); "
    "python -m iterfuse_jax.prediction_files <workdir> scores them.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-process run: jax.distributed.initialize() takes what the flags below leave unset "
    "from the cluster's environment (SLURM, Open MPI, Kubernetes, Cloud TPU).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT where process 0 serves the coordination (implies --distributed; default "
    "$JAX_COORDINATOR_ADDRESS, else the cluster's).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (implies --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's rank in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None,
    "Local accelerator ids this process uses, e.g. 0 (default $JAX_LOCAL_DEVICE_IDS, else all).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Persistent XLA compilation cache: the same command again (a resumed run, --mode eval) loads "
    "its compiled steps, on a GPU with their autotuned kernels, instead of compiling them again. "
    "Default $JAX_COMPILATION_CACHE_DIR, else <workdir>/compilation_cache; '' turns it off.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# Errors of the filesystem that the user must act on (space, permissions, a path that is a file).
_FILESYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.ENOTDIR, errno.EISDIR)


def _filesystem_error(error: BaseException) -> OSError | None:
  """The OSError of `_FILESYSTEM_ERRNOS` behind `error` (itself, its cause or context), if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _FILESYSTEM_ERRNOS:
      return error
    error = error.__cause__ or error.__context__
  return None


def _config_error_text(error: BaseException) -> str:
  """The message of a config parsing error, without the quoting of a wrapped KeyError."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections wraps a KeyError in an AttributeError
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  return " ".join(str(text).split())


_CONFIG_FILE_ERROR = "Error whilst parsing config file:"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the config file's own errors (a misspelt key, a config file or row
  that does not exist, a value of the wrong type) as one line instead of a traceback."""
  try:
    argv = FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if _CONFIG_FILE_ERROR in text:
      # get_config raised (a row that does not exist): ml_collections put the traceback into the
      # message; its last line is the exception.
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      exception = lines[-1].split(": ", 1)
      sys.exit(f"error: --config: {exception[-1]}")
    # Any other flag error (a missing --workdir): absl's own report, which parses the same
    # command line again, prints it and exits.
    app.parse_flags_with_usage(argv)
    raise  # not reached: the same arguments fail the same way
  except (AttributeError, KeyError, ValueError, TypeError, OSError, ImportError) as e:
    sys.exit(f"error: --config: {_config_error_text(e)}")
  try:
    FLAGS.config.get("model")  # ml_collections defers a file it cannot load to the first use
  except OSError as e:
    path = config_flags.get_config_filename(FLAGS["config"])
    if not os.path.isfile(path):
      sys.exit(f"error: --config: no config file {path} (from {os.getcwd()})"
               + _config_file_suggestion(path))
    sys.exit(f"error: --config: {_config_error_text(e.__cause__ or e)}")
  return argv


def _config_file_suggestion(path: str) -> str:
  """'; did you mean ...?' naming the nearest config files in the folder of a missing `path`
  (a case slip such as nyud_ifbc.py for nyud_ifbC.py, which case-insensitive file systems hide
  until the code moves to Linux), or nothing."""
  folder = os.path.dirname(path) or "."
  try:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py")
  except OSError:
    return ""
  wanted = os.path.basename(path)
  by_case = {n.lower(): n for n in names}
  if wanted.lower() in by_case:
    close = [by_case[wanted.lower()]]
  else:  # best first, equally close ones in alphabetical order
    close = sorted(difflib.get_close_matches(wanted, names, n=3, cutoff=0.75),
                   key=lambda n: (-difflib.SequenceMatcher(None, wanted, n).ratio(), n))
  if not close:
    return ""
  return "; did you mean " + " or ".join(os.path.join(os.path.dirname(path), n)
                                         for n in close) + "?"


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      local_device_ids=([int(i) for i in _LOCAL_DEVICE_IDS.value]
                        if _LOCAL_DEVICE_IDS.value else None))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SAVE_PREDICTIONS.value and _MODE.value != "eval":
    # Not ignored: a user who asks for the files must not find none after a long training run.
    sys.exit("error: --save_predictions writes the predictions of a saved checkpoint: use it "
             "with --mode=eval (after training, with --checkpoint=latest or best)")
  verbose = FLAGS["verbosity"].present
  from iterfuse_jax import console  # pylint: disable=g-import-not-at-top

  console.quiet_console(verbose)  # before TensorFlow is imported
  if _DISTRIBUTED.value or any(
      flag.value is not None for flag in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    _initialize_distributed()
  from iterfuse_jax import process_failure  # pylint: disable=g-import-not-at-top

  with process_failure.FailureWatch() as watch:
    try:
      _run(watch, verbose)
    except Exception:  # pylint: disable=broad-exception-caught
      # An unexpected error: its traceback, and the other processes stop with its last line.
      if watch.active:
        watch.fail(traceback.format_exc().rstrip())
      raise


def _run(watch, verbose: bool) -> None:
  """Trains or evaluates; errors the user acts on end the process with one line (`_fail`)."""
  import jax  # pylint: disable=g-import-not-at-top

  def _fail(text: str, status: int | None = None) -> None:
    """Ends this process with `text` on stderr (and `status`, else 1); in a run of several
    processes the others stop at once with it instead of waiting for this one."""
    if watch.active:
      watch.fail(text, 1 if status is None else status)
    if status is not None:
      print(text, file=sys.stderr)
      sys.exit(status)
    sys.exit(text)

  workdir = _WORKDIR.value
  from iterfuse_jax import console  # pylint: disable=g-import-not-at-top
  try:
    os.makedirs(workdir, exist_ok=True)
    log_path = console.configure_logging(workdir, verbose, jax.process_index())
  except OSError as e:
    _fail(f"error: cannot write to the workdir {workdir}: {e.strerror or e}")
  logging.info("Command line: %s", " ".join(sys.argv))
  logging.info("JAX process %d/%d, local devices: %s; logging to %s", jax.process_index(),
               jax.process_count(), jax.local_devices(), log_path)

  # pylint: disable=g-import-not-at-top
  from iterfuse_jax import checkpoints, compilation_cache, stopping, train
  # pylint: enable=g-import-not-at-top

  cache = compilation_cache.cache_dir(workdir, _COMPILATION_CACHE.value)
  compilation_cache.enable(cache)  # before the first compilation
  try:
    with compilation_cache.CacheUse() as cache_use:
      try:
        if _MODE.value == "train":
          train.train_and_evaluate(FLAGS.config, workdir)
        else:
          train.evaluate_checkpoint(FLAGS.config, workdir, which=_CHECKPOINT.value,
                                    save_predictions=_SAVE_PREDICTIONS.value)
      finally:
        logging.info("%s", cache_use.summary(cache))
        # The data workers' batches live in shared memory, freed when their arrays are; grain
        # leaves some in reference cycles, which the interpreter does not collect at exit, and
        # Python's resource tracker then warned of "leaked shared_memory objects" at the end of
        # every run with dataset.num_workers > 0.
        gc.collect()
  except stopping.TrainingStopped as e:
    # SIGTERM (a scheduler's time limit or preemption) or Ctrl-C, after a step with its
    # checkpoint: 128 + the signal, the shells' and schedulers' status of a job ended by it.
    logging.info("Stopped: %s", e)
    print(f"Training {e}.", file=sys.stderr)
    sys.exit(128 + e.signal_number)
  except KeyboardInterrupt:
    # Ctrl-C outside the training loop (preparing data, evaluating) or twice: what is saved
    # stays, and nothing half-written is used (interrupted saves and preparations are redone).
    logging.info("Interrupted:", exc_info=True)
    _fail("Interrupted; the same command starts again from what is saved.",
          128 + signal.SIGINT)
  except (FileNotFoundError, train.NonFiniteLossError, train.WorkdirError,
          checkpoints.CheckpointError) as e:
    # What the user must act on (missing data or checkpoint, a diverged run, damaged
    # checkpoints): the message, not a traceback through the library.
    logging.info("Stopped:", exc_info=True)  # the traceback, in the log file
    _fail(f"error: {e}")
  except ValueError as e:
    # Mostly a config value the model, the data or the mesh refuses (they name the key); the
    # traceback stays in the log file for anything else.
    logging.info("Stopped:", exc_info=True)
    _fail(f"error: {e} (traceback in {os.path.join(workdir, 'log.txt')})")
  except Exception as e:  # pylint: disable=broad-exception-caught
    cause = _filesystem_error(e)
    if cause is None:
      raise
    logging.info("Stopped:", exc_info=True)  # the traceback, in the log file
    where = f": {cause.filename}" if cause.filename else f" (in the workdir {workdir})"
    _fail(f"error: {cause.strerror or cause}{where}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
