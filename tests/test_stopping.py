"""SIGTERM and Ctrl-C stop training after a step with its checkpoint (iterfuse_jax/stopping.py):
the handlers with real signals to this process, then `launch.py` as users run it, stopped by a
scheduler's SIGTERM, a terminal's Ctrl-C (to the whole process group, data workers included) and
a SIGTERM to one process of a two-process run. Each time the same command then finishes the run
of the uninterrupted reference; the two processes stop after the same step."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Callable

import pytest

from iterfuse_jax import checkpoints, stopping
from tests import multiprocess
from tests.test_train import (REPO_ROOT, STEPS, assert_same_run, data_dir,  # noqa: F401
                              finished_run, tiny_flags)


@pytest.fixture
def main_thread():
  if threading.current_thread() is not threading.main_thread():
    pytest.fail("signal handlers need the main thread: run the tests in it")


def _deliver(signum):
  """Sends `signum` to this process; Python runs the handler before the next bytecode."""
  os.kill(os.getpid(), signum)
  for _ in range(1000):  # let the interpreter reach a check point
    pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_and_the_handlers_are_put_back(signum, main_thread, capfd):
  before = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
  stop = stopping.StopSignals(coordinated=False)
  asked = []
  with stop:
    assert not stop.should_stop(1, asked.append)
    _deliver(signum)
    assert stop.should_stop(2, asked.append)
    error = stop.stopped(2, "/run/checkpoints")
  assert asked == []  # one process: no preemption service to ask
  assert {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS} == before
  assert error.signal_number == signum and error.step == 2
  assert str(error) == (f"stopped after step 2 on {signal.Signals(signum).name}; its checkpoint "
                        "is /run/checkpoints/2, and the same command resumes from it")
  assert "the run stops after this step" in capfd.readouterr().err


def test_a_second_ctrl_c_interrupts_at_once(main_thread):
  before = signal.getsignal(signal.SIGINT)
  stop = stopping.StopSignals(coordinated=False)
  with pytest.raises(KeyboardInterrupt):
    with stop:
      _deliver(signal.SIGINT)
      assert stop.received == signal.SIGINT
      _deliver(signal.SIGINT)
      pytest.fail("the second Ctrl-C did not interrupt")
  assert signal.getsignal(signal.SIGINT) is before


def test_a_second_sigterm_terminates_at_once():
  script = textwrap.dedent("""
      import os, signal, time
      from iterfuse_jax import stopping
      with stopping.StopSignals(coordinated=False):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print("asked", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still running", flush=True)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
  assert result.returncode == -signal.SIGTERM, result.stderr
  assert result.stdout == "asked\n"


def test_several_processes_leave_sigterm_to_the_preemption_service(main_thread):
  """Coordinated: SIGTERM keeps JAX's handler, Ctrl-C becomes a SIGTERM of the process (here
  caught by a stand-in for the service), and the service's agreement decides."""
  caught = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
  try:
    stop = stopping.StopSignals(coordinated=True)
    agreed = {5}
    with stop:
      assert signal.getsignal(signal.SIGTERM) is not stop._handle
      _deliver(signal.SIGINT)
      assert caught == [signal.SIGTERM]
      assert [stop.should_stop(s, agreed.__contains__) for s in (4, 5)] == [False, True]
    assert str(stop.stopped(5, "/c")).startswith("stopped after step 5 on SIGINT;")
    other = stopping.StopSignals(coordinated=True)
    assert str(other.stopped(5, "/c")).startswith(
        "stopped after step 5 on SIGTERM to a process of the run;")
  finally:
    signal.signal(signal.SIGTERM, previous)


def _wait_for_training(process: subprocess.Popen) -> list[str]:
  """Reads the process's stdout up to the "Training ..." line (the handlers are in place)."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith("Training "):
      return lines
  raise AssertionError(f"no 'Training' line: {''.join(lines)} {process.stderr.read()}")


def _stopped_step(err: str) -> int:
  lines = [line for line in err.splitlines() if line.startswith("Training stopped after step ")]
  assert len(lines) == 1, err
  return int(lines[0].split()[4])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c with data workers"])
def test_launch_stopped_by_a_signal_saves_its_step_and_the_same_command_finishes_the_run(
    how, finished_run, data_dir, tmp_path):  # noqa: F811
  config, reference, *_ = finished_run
  flags = tiny_flags(data_dir, tmp_path)
  signum, group = signal.SIGTERM, False
  if how.startswith("ctrl-c"):
    # A terminal's Ctrl-C reaches every process of the job: the data workers too.
    signum, group = signal.SIGINT, True
    flags.append("--config.dataset.num_workers=2")
  command = [sys.executable, str(REPO_ROOT / "launch.py"), *flags]
  process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    _wait_for_training(process)
    if group:
      os.killpg(process.pid, signum)
    else:
      process.send_signal(signum)
    _, err = process.communicate(timeout=600)
  finally:
    process.kill()
  print(err)
  assert process.returncode == 128 + signum, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  step = _stopped_step(err)
  assert 1 <= step < STEPS
  name = signal.Signals(signum).name
  assert f"on {name}; its checkpoint is {tmp_path}/checkpoints/{step}," in err
  assert checkpoints.committed_steps(tmp_path / "checkpoints")[-1] == step

  again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr
  assert f"resuming from step {step}" in again.stdout
  assert_same_run(tmp_path, reference, config)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_then_they_resume(
    finished_run, tmp_path):  # noqa: F811
  """SIGTERM to process 1 while training, then again while the resumed run starts; then the
  run finishes. Before, JAX's preemption service caught the SIGTERM and nobody asked it: both
  processes trained on until killed; and once asked, a notice during the start-up of a resumed
  run was still lost (the service settled on step 1). The resume aborted both processes
  (SIGABRT) at times under load: the best save had met the latest save's commit at an orbax
  barrier of the same key (see tests/test_checkpoints.py)."""
  config, reference, *_ = finished_run
  workdir = tmp_path / "two_processes"

  def start() -> list[subprocess.Popen]:
    flags = ["--config=configs/demo.py:tiny", f"--workdir={workdir}"]
    return multiprocess.start(multiprocess.launch_commands([flags] * 2))

  def sigterm_to_process_1_once(ready: Callable[[list[subprocess.Popen]], object]):
    def meanwhile(processes: list[subprocess.Popen]) -> None:
      ready(processes)
      processes[1].send_signal(signal.SIGTERM)
    return meanwhile

  def stopped_step(processes, outputs) -> int:
    errs = [err for _, err in outputs]
    print(*errs, sep="\n")
    assert [p.returncode for p in processes] == [143, 143], [err[-5000:] for err in errs]
    steps = [_stopped_step(err) for err in errs]
    assert steps[0] == steps[1], steps
    assert all("on SIGTERM to a process of the run;" in err for err in errs)
    assert checkpoints.committed_steps(workdir / "checkpoints")[-1] == steps[0]
    return steps[0]

  processes = start()
  step = stopped_step(processes, multiprocess.finish(
      processes, 900, sigterm_to_process_1_once(lambda ps: _wait_for_training(ps[0]))))
  assert 1 <= step < STEPS - 1

  def restored(processes):  # both are past jax.distributed's start, not yet past a step
    log, text = workdir / "log.txt", f"Restored checkpoint of step {step} from"
    while not (log.exists() and text in log.read_text()):
      assert processes[0].poll() is None, processes[0].communicate()
      time.sleep(0.05)

  processes = start()
  outputs = multiprocess.finish(processes, 900, sigterm_to_process_1_once(restored))
  assert f"resuming from step {step}" in outputs[0][0]
  assert stopped_step(processes, outputs) == step + 1

  processes = start()
  outputs = multiprocess.finish(processes, 900)
  assert [p.returncode for p in processes] == [0, 0], [err[-5000:] for _, err in outputs]
  assert f"resuming from step {step + 1}" in outputs[0][0]
  assert_same_run(workdir, reference, config, metric_rtol=1e-6)
