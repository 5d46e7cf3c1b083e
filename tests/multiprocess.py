"""Several JAX processes on localhost, as the multi-process tests start them (`jax.distributed`
with one CPU device each, gloo collectives)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
from typing import Callable, Sequence

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_commands(flags_per_process: Sequence[Sequence[str]]) -> list[list[str]]:
  """`python launch.py FLAGS` of each process, joined into one run on a free localhost port
  (process i gets `flags_per_process[i]`)."""
  port = free_port()
  return [[sys.executable, str(REPO_ROOT / "launch.py"), *flags,
           f"--coordinator_address=localhost:{port}", f"--num_processes={len(flags_per_process)}",
           f"--process_id={i}"] for i, flags in enumerate(flags_per_process)]


def script_commands(script: str, num_processes: int, *args: str) -> list[list[str]]:
  """`python -c SCRIPT` of each process, joined into one run on a free localhost port: its
  sys.argv[1:4] are jax.distributed.initialize's coordinator address, process count and
  process id, then `args`."""
  coordinator = f"localhost:{free_port()}"
  return [[sys.executable, "-c", script, coordinator, str(num_processes), str(i), *args]
          for i in range(num_processes)]


def start(commands: Sequence[Sequence[str]], cwd: os.PathLike | Sequence[os.PathLike] = REPO_ROOT,
          env: dict[str, str] | None = None) -> list[subprocess.Popen]:
  """Starts one process per command (text stdout and stderr piped); `cwd` is one folder or one
  per command; `env` adds to this process's environment, with one CPU device per process."""
  cwds = [cwd] * len(commands) if isinstance(cwd, (str, os.PathLike)) else list(cwd)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", **(env or {}))
  return [subprocess.Popen(list(command), cwd=folder, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for command, folder in zip(commands, cwds)]


def finish(processes: list[subprocess.Popen], timeout: float,
           meanwhile: Callable[[list[subprocess.Popen]], object] | None = None
           ) -> list[tuple[str, str]]:
  """Runs `meanwhile(processes)`, then waits for every process and returns its (stdout,
  stderr); a process still running after `timeout` seconds fails the test with the stderr of
  each. None is left running."""
  try:
    if meanwhile is not None:
      meanwhile(processes)
    return [p.communicate(timeout=timeout) for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    errs = [p.communicate()[1] for p in processes]
    pytest.fail(f"a process was still running after {timeout} s (waiting at a barrier?):\n"
                + "\n".join(err[-3000:] for err in errs))
  finally:
    for p in processes:
      p.kill()
