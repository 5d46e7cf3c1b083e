"""Test-wide setup: JAX on the CPU with two virtual devices (for the data-parallel tests)."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Must happen before any backend is initialised.
jax.config.update("jax_num_cpu_devices", 2)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real sample frames in ../shared/data; tests using it skip where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real sample data not found at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the whole session, subprocesses (launch.py, notebook
  kernels) included: the tiny network's steps compile once. JAX_COMPILATION_CACHE_DIR, if set,
  names a cache to keep across sessions."""
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
  env = pytest.MonkeyPatch()
  env.setenv("JAX_COMPILATION_CACHE_DIR", path)
  env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setenv("JAX_NUM_CPU_DEVICES", "2")  # subprocesses get the devices the tests have
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield path
  env.undo()
