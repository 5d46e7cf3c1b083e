"""Test-wide setup: JAX on the CPU with two virtual devices (for the data-parallel tests).

The suite runs on the CPU whatever the shell's JAX_PLATFORMS says. ITERFUSE_TEST_PLATFORM=gpu runs
it on the CUDA GPU instead (benchmarks/gpu_check.sh does): no virtual CPU devices (tests that need
two devices skip), float32 matmuls and convolutions at full precision (the tests compare with
float32/float64 references, which TF32 would miss), no preallocation of the GPU's memory, and the
benchmark smoke tests time CUDA PyTorch.
"""
import os
import pathlib

TEST_PLATFORM = os.environ.get("ITERFUSE_TEST_PLATFORM", "cpu")
if TEST_PLATFORM == "cpu":
  os.environ["JAX_PLATFORMS"] = "cpu"
elif TEST_PLATFORM == "gpu":
  os.environ["JAX_PLATFORMS"] = "cuda"
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
else:
  raise ValueError(f"ITERFUSE_TEST_PLATFORM must be 'cpu' or 'gpu', got {TEST_PLATFORM!r}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

if TEST_PLATFORM == "cpu":
  # Must happen before any backend is initialised.
  jax.config.update("jax_num_cpu_devices", 2)


def pytest_addoption(parser):
  parser.addoption("--report-failures-at-once", action="store_true",
                   help="print each failure's report as soon as the test fails (for runs that a "
                   "time limit may kill before pytest's summary, such as a GPU visit)")


class _FailuresAtOnce:
  """Writes a failed test's report to the terminal when it happens, not only in the summary."""

  def __init__(self, config):
    self.config = config

  def pytest_runtest_logreport(self, report):
    terminal = self.config.pluginmanager.get_plugin("terminalreporter")
    if report.failed and terminal is not None:
      terminal.write_line(f"\n---- {report.nodeid} failed ({report.when}):")
      terminal.write_line(report.longreprtext[-6000:])
      terminal.write_line("----")


def pytest_configure(config):
  if config.getoption("--report-failures-at-once"):
    config.pluginmanager.register(_FailuresAtOnce(config), "failures-at-once")


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
  names a cache to keep across sessions. Under pytest-xdist (`-n 2`, README.md's command) the
  workers share one cache in the run's common temporary folder: each would otherwise compile the
  same tiny-network steps again."""
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not path:
    if os.environ.get("PYTEST_XDIST_WORKER"):
      # The workers' base folders are siblings (popen-gw0, popen-gw1) in this run's own folder.
      path = str(tmp_path_factory.getbasetemp().parent / "jax_cache")
      os.makedirs(path, exist_ok=True)
    else:
      path = str(tmp_path_factory.mktemp("jax_cache"))
  env = pytest.MonkeyPatch()
  env.setenv("JAX_COMPILATION_CACHE_DIR", path)
  env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setenv("JAX_NUM_CPU_DEVICES", "2")  # subprocesses get the devices the tests have
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield path
  env.undo()
