"""A process of a multi-process `launch.py` run that fails stops the others with its message
(iterfuse_jax/process_failure.py)."""

import pathlib
import time

import pytest

from tests import multiprocess
from tests.test_train import REPO_ROOT, TINY, tiny_flags


def _tiny_data(tmp_path: pathlib.Path) -> pathlib.Path:
  """The tiny config's synthetic NYUD folder (as `launch.py` would write it)."""
  from data_pipelines import synthetic
  syn = TINY.synthetic_data
  data_dir = tmp_path / "NYUD_MT"
  synthetic.write_nyud(str(data_dir), num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed,
                       height=syn.height, width=syn.width)
  return data_dir


@pytest.mark.slow
def test_a_data_error_in_process_0_stops_process_1_at_once_with_its_message(tmp_path):
  """Process 0 prepares the dataset while process 1 waits at a barrier. Before, with an
  unreadable image, process 1 waited there until gloo's 30 s timeout and ended with a traceback
  of 'Gloo context initialization failed: DEADLINE_EXCEEDED' that did not say why (measured
  here: 34 s); a collective without such a timeout (NCCL) waits until JAX's coordination
  service gives up on the process that ended."""
  data_dir = _tiny_data(tmp_path)
  broken = data_dir / "images" / "000003.jpg"
  broken.write_bytes(b"not a JPEG")
  start = time.monotonic()
  processes = multiprocess.start(
      multiprocess.launch_commands([tiny_flags(str(data_dir), tmp_path / "run")] * 2))
  outputs = multiprocess.finish(processes, timeout=600)
  seconds = time.monotonic() - start
  errs = [err for _, err in outputs]
  print(f"both ended after {seconds:.0f} s", *errs, sep="\n")
  assert [p.returncode for p in processes] == [1, 1], errs
  reason = f"cannot decode image {broken}"
  assert f"error: {reason}" in errs[0]
  assert f"error: process 0 of 2 failed: {reason}" in errs[1]
  assert "(process 1 stops too)" in errs[1]
  for err in errs:
    assert "SIGABRT" not in err and "Terminating process" not in err and "Traceback" not in err
  assert seconds < 240  # 4 s here: both end right after the error


@pytest.mark.slow
def test_processes_that_do_not_share_the_workdir_stop_before_training(tmp_path):
  """`--workdir=run` from two current directories (as on hosts whose /tmp is their own): each
  process would have read and written its own checkpoints; now process 1 says so and both stop."""
  data_dir = _tiny_data(tmp_path)
  flags = [flag.replace("configs/", f"{REPO_ROOT}/configs/", 1)
           for flag in tiny_flags(str(data_dir), "run")]
  homes = [tmp_path / "host0", tmp_path / "host1"]
  for home in homes:
    home.mkdir()
  processes = multiprocess.start(multiprocess.launch_commands([flags] * 2), cwd=homes)
  outputs = multiprocess.finish(processes, timeout=600)
  errs = [err for _, err in outputs]
  print(*errs, sep="\n")
  assert [p.returncode for p in processes] == [1, 1], errs
  reason = (f"does not see in its workdir {homes[1] / 'run'} the file .process0 that process 0 "
            f"wrote at ")
  assert reason in errs[1] and f"{homes[0] / 'run' / '.process0'}: give every process the same " \
                               "workdir" in errs[1]
  assert "error: process 1 of 2 failed: process 1 (on " in errs[0] and reason in errs[0]
  assert not (homes[0] / "run" / "checkpoints").exists()


_ENTER_AND_LEAVE = """
import sys, time
import jax
jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
from iterfuse_jax import process_failure
with process_failure.FailureWatch() as watch:
  time.sleep(0.5 + jax.process_index())  # process 1 leaves later
print("thread alive after the block:", watch._thread.is_alive(), flush=True)
"""


@pytest.mark.slow
def test_the_watch_ends_its_thread_when_the_run_ends_normally():
  """A thread left in the coordination client's blocking read when the interpreter exited
  aborted the process ("terminate called after throwing an instance of ''", 1 exit in 3)."""
  for _ in range(2):
    processes = multiprocess.start(multiprocess.script_commands(_ENTER_AND_LEAVE, 2))
    outputs = multiprocess.finish(processes, timeout=120)
    for p, (out, err) in zip(processes, outputs):
      assert p.returncode == 0 and "terminate called" not in err, err[-3000:]
      assert out == "thread alive after the block: False\n", out


_FAIL_AFTER_OTHERS_ENDED = """
import sys, time
import jax
failing, ended = int(sys.argv[4]), [int(p) for p in sys.argv[5].split(",")]
jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
from iterfuse_jax import coordination, process_failure
me = jax.process_index()
with process_failure.FailureWatch() as watch:
  if me == failing:
    # The processes in `ended` have ended normally: they said so and wait in JAX's shutdown
    # barrier; the others are still at work.
    for p in ended:
      coordination.client().blocking_key_value_get(process_failure._NOTICE_KEY + str(p), 60_000)
    watch.fail("error: the final report cannot be written")
  elif me not in ended:
    time.sleep(60)  # still at work when the other fails
print(f"process {me} ended normally", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("num_processes, failing, ended", [(2, 0, [1]), (2, 1, [0]), (3, 0, [2])])
def test_a_failure_after_processes_ended_normally_ends_every_process_through_their_barrier(
    num_processes, failing, ended):
  """Process 0 writes the final reports after the last collective, so it can fail after others
  ended normally (here: all of them, also process 0, which hosts the coordination service,
  with process 1 failing; or one of two while the other is still at work, and is told).
  Before, process 0 waited 20 s for them to say they leave, which they never do, and its exit
  then aborted them in JAX's shutdown barrier (exit 134, "Terminating process because the JAX
  distributed service detected fatal errors" and a C++ stack); with process 1 failing, process
  0 waited in the barrier for it and aborted the same way after 100 s."""
  start = time.monotonic()
  processes = multiprocess.start(multiprocess.script_commands(
      _FAIL_AFTER_OTHERS_ENDED, num_processes, str(failing), ",".join(map(str, ended))))
  outputs = multiprocess.finish(processes, timeout=120)
  print(f"all ended after {time.monotonic() - start:.0f} s")  # 1-2 s here; 26-102 s before
  errs = [err for _, err in outputs]
  assert [p.returncode for p in processes] == [0 if i in ended else 1
                                               for i in range(num_processes)], errs
  reason = "the final report cannot be written"
  assert errs[failing].strip() == f"error: {reason}", errs[failing]
  for i in range(num_processes):
    if i == failing:
      continue
    assert "Terminating process" not in errs[i], errs[i]
    if i in ended:
      assert outputs[i][0] == f"process {i} ended normally\n"
      assert "error: " not in errs[i], errs[i]
    else:
      assert f"error: process {failing} of {num_processes} failed: {reason}" in errs[i], errs[i]
