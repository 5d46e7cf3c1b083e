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

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real sample frames in ../shared/data; tests using it skip where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real sample data not found at {SHARED_DATA}")
  return SHARED_DATA
