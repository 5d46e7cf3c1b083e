"""The model, train step, losses, metrics, FLOP counter and benchmarks import without TensorFlow.

The GPU machines' image has no tensorflow, tensorflow-datasets, grain or array-record (and
TensorFlow does not fit the wheels it can be given). A fresh interpreter runs on a copy of this
environment's site-packages without those distributions (`benchmarks.gpu_image.site_farm`: they
are absent, module and metadata, not merely blocked), imports what the GPU run uses and trains one
step of the benchmark's network on random data.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import gpu_image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ABSENT = gpu_image.TENSORFLOW_DISTRIBUTIONS + gpu_image.DATA_PIPELINE_DISTRIBUTIONS

PROGRAM = r"""
import importlib.util, json, sys
absent = {name: importlib.util.find_spec(name) is None
          for name in ("tensorflow", "tensorflow_datasets", "grain", "array_record")}
import iterfuse_jax.models, iterfuse_jax.losses, iterfuse_jax.metrics, iterfuse_jax.train
import iterfuse_jax.inference
from iterfuse_jax import compare
from benchmarks import gpu_check, profile_summary, train_step
setting = train_step.Setting(framework="jax", impl="materialized", dataset="nyud", height=32,
                             width=32, batch=2, n_iter=1, variant="C", task_channels=4,
                             dtype="float32", steps=1, warmup=0, backbone="w18_tiny")
row = train_step.measure_jax(setting)
params, gflops = compare.model_cost(train_step.benchmark_config(setting))
loaded = sorted({m.split(".")[0] for m in sys.modules}
                & {"tensorflow", "tensorflow_datasets", "grain", "array_record"})
print(json.dumps({"absent": absent, "loaded": loaded, "loss": row["loss"],
                  "params": params, "gflops": gflops, "num_params": row["num_params"]}))
"""


@pytest.mark.slow
def test_train_step_and_flop_count_run_without_tensorflow_grain_or_tfds(tmp_path):
  farm = gpu_image.site_farm(tmp_path / "site", gpu_image.hide_predicate(ABSENT),
                             keep_unowned=True)
  env = gpu_image.farm_env(farm, [str(REPO_ROOT)])
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # the compile is what costs here, not the step
  done = subprocess.run([sys.executable, "-S", "-c", PROGRAM], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert all(result["absent"].values()), result["absent"]
  assert result["loaded"] == []
  assert result["loss"] > 0 and result["params"] == result["num_params"] and result["gflops"] > 0


def test_the_farm_hides_a_distribution_and_keeps_the_others(tmp_path):
  farm = gpu_image.site_farm(tmp_path / "site", gpu_image.hide_predicate(["grain"]),
                             keep_unowned=True)
  code = ("import importlib.util as u, importlib.metadata as md; "
          "print(u.find_spec('grain') is None, u.find_spec('numpy') is not None); "
          "md.version('grain')")
  done = subprocess.run([sys.executable, "-S", "-c", code], env=gpu_image.farm_env(farm),
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.stdout.split() == ["True", "True"], done.stderr
  assert "PackageNotFoundError" in done.stderr  # no metadata either
