"""A run's persistent compilation cache (`iterfuse_jax.compilation_cache`, launch.py's
--compilation_cache_dir): where it is, what it counts, and the same command again loading the
compiled steps of the first and training exactly the same."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from iterfuse_jax import compilation_cache, evaluations

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"Compilation cache (\S+): (\d+) of (\d+) compilations loaded "
                     r"\((-?[\d.]+) s of compiling saved\), (\d+) written")


def test_the_flag_wins_then_the_environment_then_the_workdir():
  env = {compilation_cache.ENV_VARIABLE: "/shared/cache"}
  assert compilation_cache.cache_dir("/w", None, {}) == "/w/compilation_cache"
  assert compilation_cache.cache_dir("/w", None, env) == "/shared/cache"
  assert compilation_cache.cache_dir("/w", "/mine", env) == "/mine"
  assert compilation_cache.cache_dir("/w", "", env) is None  # off, whatever the environment
  assert compilation_cache.cache_dir("/w", None,
                                     {compilation_cache.ENV_VARIABLE: ""}) == "/w/compilation_cache"


def test_cache_use_counts_what_was_written_and_what_was_loaded():
  # conftest's session cache is on, with no minimum compile time: every compilation is written.
  assert jax.config.jax_compilation_cache_dir
  marker = float(time.time_ns() % 100_003)  # a program no earlier session has cached
  x = jnp.arange(3.0)

  def program(v):
    return jnp.sin(v) * marker

  with compilation_cache.CacheUse() as first:
    jax.jit(program)(x).block_until_ready()
  assert first.requests >= 1 and first.loaded == 0 and first.written == first.requests, first
  jax.clear_caches()  # what a new process starts with: nothing compiled in memory
  with compilation_cache.CacheUse() as second:
    jax.jit(program)(x).block_until_ready()
  assert second.loaded == second.requests == first.requests and second.written == 0, second
  assert f"{second.loaded} of {second.requests} compilations loaded" in second.summary("/c")
  assert compilation_cache.CacheUse().summary(None) == "Compilation cache: off"

  jax.jit(lambda v: v * (marker + 1))(x).block_until_ready()  # after the block: not counted
  assert second.requests == first.requests


@pytest.mark.parametrize("enabled", [True, False])
def test_enable_decides_whether_a_new_process_writes_the_cache(tmp_path, enabled):
  """In a fresh process (JAX decides once per process) whose environment names another cache."""
  from_environment, chosen = tmp_path / "environment", tmp_path / "chosen"
  code = ("import sys, jax, jax.numpy as jnp\n"
          "from iterfuse_jax import compilation_cache\n"
          "compilation_cache.enable(sys.argv[1] or None)\n"
          "jax.jit(lambda v: jnp.cos(v) * 3)(jnp.arange(4.0)).block_until_ready()\n")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(from_environment),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  subprocess.run([sys.executable, "-c", code, str(chosen) if enabled else ""], cwd=REPO_ROOT,
                 env=env, check=True, timeout=120)
  assert not from_environment.exists() or not any(from_environment.iterdir())
  written = list(chosen.iterdir()) if chosen.exists() else []
  assert bool(written) == enabled, written


def _launch(*args, cache_env: bool = False) -> subprocess.CompletedProcess:
  """launch.py as a user runs it; without the test session's shared cache unless `cache_env`."""
  env = dict(os.environ)
  if not cache_env:
    env.pop(compilation_cache.ENV_VARIABLE, None)
  return subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=900)


def _cache_summary(workdir: pathlib.Path) -> tuple[str, int, int, float, int]:
  """The last compilation cache line of the workdir's log: (path, loaded, requests, seconds
  saved, written)."""
  lines = [m for m in SUMMARY.finditer((workdir / "log.txt").read_text())]
  assert lines, f"no compilation cache line in {workdir / 'log.txt'}"
  path, loaded, requests, saved, written = lines[-1].groups()
  return path, int(loaded), int(requests), float(saved), int(written)


@pytest.mark.slow
def test_the_same_command_again_loads_the_compiled_steps_and_trains_the_same(tmp_path):
  """The tiny demo from a cold cache in its workdir, then the same run in a second workdir told
  to use the first one's cache: every compilation is loaded, nothing is compiled or written, and
  the evaluations are the same to the last bit."""
  tiny = ["--config=configs/demo.py:tiny"]
  first, second = tmp_path / "first", tmp_path / "second"
  start = time.monotonic()
  result = _launch(*tiny, f"--workdir={first}")
  cold = time.monotonic() - start
  assert result.returncode == 0, result.stderr
  cache = first / compilation_cache.FOLDER
  path, loaded, requests, _, written = _cache_summary(first)
  assert (path, loaded) == (str(cache), 0) and written > 0, _cache_summary(first)
  # conftest's minimum compile time (0 s) reaches launch.py: every compilation is written.
  assert written == requests
  entries = {p.name.split("-")[0] for p in cache.iterdir()}
  assert {"jit_train_step", "jit_eval_step", "jit_predict_step"} <= entries, entries

  start = time.monotonic()
  result = _launch(*tiny, f"--workdir={second}", f"--compilation_cache_dir={cache}")
  warm = time.monotonic() - start
  assert result.returncode == 0, result.stderr
  print(f"tiny demo: {cold:.0f} s with a cold cache, {warm:.0f} s loading it")
  path, loaded, requests_again, saved, written = _cache_summary(second)
  assert (path, loaded, requests_again, written) == (str(cache), requests, requests, 0)
  assert saved > 0
  assert not (second / compilation_cache.FOLDER).exists()
  for name in (evaluations.EVALUATIONS_FILE, evaluations.LAST_FILE, evaluations.BEST_FILE):
    assert (json.loads((second / name).read_text()) == json.loads((first / name).read_text())), name


def test_an_empty_flag_turns_the_cache_off(tmp_path):
  """--compilation_cache_dir= overrides JAX_COMPILATION_CACHE_DIR; the log says the cache is off
  (an eval without a checkpoint: launch.py stops before compiling anything)."""
  result = _launch("--config=configs/demo.py:tiny", f"--workdir={tmp_path}", "--mode=eval",
                   "--compilation_cache_dir=", cache_env=True)
  assert result.returncode != 0 and "no latest checkpoint" in result.stderr, result.stderr
  assert "Compilation cache: off" in (tmp_path / "log.txt").read_text()
  assert not (tmp_path / compilation_cache.FOLDER).exists()
