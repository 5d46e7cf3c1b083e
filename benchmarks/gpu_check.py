"""One GPU visit: environment, the GPU-relevant tests on the GPU, and the JAX vs PyTorch table.

Run by `benchmarks/gpu_check.sh OUTDIR` (which first installs the wheels carried in `.whl/`):

  python -m benchmarks.gpu_check OUTDIR                   # the whole visit, about 9 minutes
  python -m benchmarks.gpu_check OUTDIR --tiny            # CPU dry run at tiny shapes
  python -m benchmarks.gpu_check OUTDIR --phases bench --groups pascal,fullres   # a second visit

Phases, in this order, all inside one time budget (--budget-s) so that the command ends well
inside the device tool's 10-minute limit; a phase or row that fails or runs out of time is
recorded as such and the others go on:

  env       GPU, driver, Python, jax / torch versions and devices; the float32 precision each
            framework applies by default (flags, and the error of a float32 matmul and
            convolution against float64: TF32 shows as ~1e-3); the packages the carried wheels
            need; a large matmul's TFLOP/s in bf16, TF32 and float32 (the achievable peak).
  tests     pytest with ITERFUSE_TEST_PLATFORM=gpu on the GPU-relevant tests (precision, IFB and
            streamed IFB with the cuDNN path, losses, metrics, OOM message, a train step, bf16),
            in several processes (pytest-xdist; without autotuning, as the tests check results),
            one line per test in tests.log, counts in the summary.
  bench     benchmarks.train_step rows, one subprocess each, most important first (PLAN), one at
            a time on an otherwise idle machine. The JAX rows share a persistent compilation
            cache, and with it XLA's per-kernel autotuning results (--precompile N compiles
            them ahead, N at a time, while the tests run; the H200's first visit showed that
            compiles then slow each other down, hence 0 by default). Model
            FLOPs per step (3x the forward FLOPs of `iterfuse_jax.compare.model_cost`, counted on
            the CPU meanwhile) over the step time, as a fraction of the GPU's dense peak for the
            row's arithmetic; the projected wall time of the paper's full runs; the issue's
            targets, printed (not asserted). The first JAX row is also profiled (top operations).
            The "determinism" group runs one row twice in fresh processes: with XLA's defaults,
            each compiling and autotuning for itself; with XLA's defaults, the second loading the
            first's executables from a cache of their own (launch.py's resumption); with
            config.deterministic, each compiling for itself: whether reruns and resumed runs
            end with the same bits, and the speed config.deterministic costs.
  pipeline  benchmarks.input_pipeline images/s at the paper's sizes with the machine's cores.
  train     the README's first command as a user runs it, `launch.py --config configs/demo.py`
            (synthetic data, tfds + grain, training, checkpoints, evaluations, TensorBoard
            without TensorFlow), when the budget has time left for it (TRAIN_MIN_S): exit code,
            wall time, console lines, the final metrics against the CPU demo's.

OUTDIR receives at most seven flat files (the device tool returns 8 files, 2 folders deep):
summary.txt (what is printed last), results.json (everything), tests.log, rows.log (each row's
stderr), pipeline.log, train.log, and the caller's console.log.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from benchmarks import train_step
from benchmarks.train_step import Setting

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The environment variables of JAX's persistent compilation cache (prefixes).
CACHE_VARIABLES = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE")
SHARED_CACHE, NO_CACHE = "shared", "none"
PHASES = ("env", "tests", "bench", "pipeline", "train")
GROUPS = ("nyud", "fullres", "pascal", "fp32", "determinism")
# Dense (no sparsity) peak TFLOP/s of the data sheets, per arithmetic: NVIDIA H100 SXM5 and H200
# (same SMs and clocks; the H200 has more and faster memory), H100 PCIe.
DATASHEET_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
}
# The paper's full runs: 100 epochs of the training split, whole batches of 8 (REFERENCE.md).
FULL_RUN_EPOCHS = 100
# The GPU-relevant tests, most important first (pytest hands them to its processes in this
# order); the files of the three longest on a CPU (215, 80 and 59 s of the 834 s these take on 2
# cores) come early so that they do not finish last.
GPU_TESTS = (
    "tests/test_precision.py",
    "tests/test_train.py::test_bfloat16_trains_like_float32",
    "tests/models/test_network.py",
    "tests/test_out_of_memory.py",
    "tests/models/test_iterative_fusion.py",
    "tests/models/test_streamed_fusion_gpu.py",
    "tests/models/test_streamed_fusion.py",
    "tests/test_losses.py",
    "tests/test_metrics.py",
    "tests/test_train.py::test_adam_adds_l2_decay_to_the_gradient",
    "tests/models/test_hrnet.py",
    "tests/test_determinism.py",
)
TINY_TESTS = ("tests/test_losses.py",)
# XLA_FLAGS of the GPU tests: no autotuning of convolutions and GEMMs (XLA's default choices).
TESTS_XLA_FLAGS = "--xla_gpu_autotune_level=0"
# Libraries the GPU image lacks and that travel as wheels; their versions are printed.
WATCHED_DISTRIBUTIONS = (
    "jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
    "torch", "torchvision", "timm", "triton", "ml-collections", "clu", "grain", "array-record",
    "tensorflow-datasets", "tensorflow", "protobuf", "etils", "absl-py", "pyyaml", "wrapt",
    "dm-tree", "immutabledict", "promise", "simple-parsing", "tensorflow-metadata", "termcolor",
    "toml", "portpicker", "googleapis-common-protos", "docstring-parser")


@dataclasses.dataclass(frozen=True)
class Row:
  """One planned benchmark row: its group, a label, the setting and its time limits (s)."""

  group: str
  label: str
  setting: Setting
  cap_s: float  # the row's process is killed after this long
  min_s: float  # not started with less time left than this
  # The persistent compilation cache the row's process uses: SHARED_CACHE (the one the JAX rows
  # are precompiled into), NO_CACHE (it compiles and autotunes for itself), or any other name: a
  # cache of the visit's rows of that name, empty at the first (a killed run and its resumption).
  cache: str = SHARED_CACHE
  # XLA_FLAGS of the row's process, added to the visit's own (a row with flags of its own is not
  # precompiled: JAX's cache key includes them).
  xla_flags: str = ""
  # A JAX row that also compiles the parameters' initialisation (no earlier row of the command
  # compiled it into the row's cache) gets these instead of cap_s / min_s (0: the same).
  cold_cap_s: float = 0.0
  cold_min_s: float = 0.0


def _shape(dataset: str, tiny: bool) -> dict:
  if tiny:
    # The unpublished w18_tiny backbone: the dry run checks the visit's machinery, and compiles
    # its rows in about half the time.
    return dict(dataset=dataset, height=32, width=32, batch=2, task_channels=8,
                n_iter=2, steps=1, warmup=0, backbone="w18_tiny")
  height, width = train_step.DEFAULT_SIZES[dataset]
  # Paper: NYUD IFB C with n_iter 18; PASCAL-Context with n_iter 4 (the paper's best there).
  return dict(dataset=dataset, height=height, width=width, batch=8, task_channels=270,
              n_iter=18 if dataset == "nyud" else 4, steps=10, warmup=2)


def plan(tiny: bool, profile_dir: str, torch_device: str = "auto") -> list[Row]:
  """The rows of a visit, most important first. bfloat16 rows run the f32 rest in TF32."""
  rows = []

  def add(group, label, cap_s, min_s, cache=SHARED_CACHE, xla_flags="", **kwargs):
    cold = (cold_cap, cold_min) if kwargs["framework"] == "jax" else (0.0, 0.0)
    rows.append(Row(group, label, Setting(variant="C", torch_device=torch_device, **kwargs),
                    cap_s, min_s, cache, xla_flags, *cold))

  jax_cap, eager_cap, compile_cap = (240, 120, 300) if tiny else (150, 120, 270)
  # A JAX row that compiles the initialisation too (`run_rows` knows which): on the second
  # visit's H200 the first row compiled it for 69 s and the train step for 88 s, and its 150 s
  # cap killed it; the next row with the same model loaded the initialisation from the cache
  # (12 s).
  cold_cap, cold_min = (240, 30) if tiny else (240, 190)
  # torch.compile's NYUD row took 176 s on the H200 (compiling, then 12 steps): one started with
  # less time left is only killed.
  compile_min = 120 if tiny else 190
  # A JAX row compiles first: 85 s (bf16) and 97 s (f32) for the NYUD step on the first visit's
  # H200. One started with less time left was killed before its first step, and the seconds
  # went to nothing a shorter row (PyTorch eager, 30 s) could have measured.
  jax_min = 30 if tiny else 100
  nyud, pascal = _shape("nyud", tiny), _shape("pascal", tiny)
  # NYUD at the paper's shape: each side at its best and in float32 (both TF32), first.
  add("nyud", "JAX bf16", jax_cap, jax_min, framework="jax", impl="materialized",
      dtype="bfloat16", precision="tf32", profile_dir=profile_dir, **nyud)
  add("nyud", "PT eager bf16", eager_cap, 30, framework="torch", impl="materialized",
      dtype="bfloat16", precision="tf32", **nyud)
  add("nyud", "PT compile bf16", compile_cap, compile_min, framework="torch",
      impl="materialized", dtype="bfloat16", precision="tf32", torch_mode="compile", **nyud)
  # Where the JAX compile's time goes (85 s for this step on the H200's first visit; 57 s on a
  # 2-core CPU, 11 of them tracing and lowering): the same step compiled by a process of its own
  # without autotuning (cuDNN's and XLA's heuristic choice of kernels), its compile time and its
  # step time against the row above.
  add("nyud", "JAX bf16 autotune 0", jax_cap, jax_min, cache=NO_CACHE,
      xla_flags="--xla_gpu_autotune_level=0", framework="jax", impl="materialized",
      dtype="bfloat16", precision="tf32", **nyud)
  add("nyud", "JAX f32 TF32", jax_cap, jax_min, framework="jax", impl="materialized",
      dtype="float32", precision="tf32", **nyud)
  add("nyud", "PT eager f32 TF32", eager_cap, 30, framework="torch", impl="materialized",
      dtype="float32", precision="tf32", **nyud)
  # Before/after of the stacked IFB backward (model.tpim.ifb_gradient, "stacked" by default):
  # the same bf16 step with JAX's derivative of the loop. Measured on the second visit: 155.4
  # against 125.1 ms per step (the first visit's profile: its two backward loops took 58 of 141
  # ms), so it comes after the rows not yet measured.
  add("nyud", "JAX bf16 IFB autodiff", jax_cap, jax_min, framework="jax", impl="materialized",
      dtype="bfloat16", precision="tf32", ifb_gradient="autodiff", **nyud)
  # Before/after of bfloat16 IFB products (model.tpim.ifb_products, "model" by default): the
  # same bf16 step with Co and V entering the products in float32 (TF32).
  add("nyud", "JAX bf16 IFB f32", jax_cap, jax_min, framework="jax", impl="materialized",
      dtype="bfloat16", precision="tf32", ifb_products="float32", **nyud)
  add("nyud", "JAX bf16 streamed", jax_cap, jax_min, framework="jax", impl="streamed",
      dtype="bfloat16", precision="tf32", **nyud)
  add("nyud", "PT compile f32 TF32", compile_cap, compile_min, framework="torch",
      impl="materialized", dtype="float32", precision="tf32", torch_mode="compile", **nyud)
  add("nyud", "JAX f32 TF32 streamed", jax_cap, jax_min, framework="jax", impl="streamed",
      dtype="float32", precision="tf32", **nyud)
  add("nyud", "PT eager bf16 sdpa", eager_cap, 30, framework="torch", impl="sdpa",
      dtype="bfloat16", precision="tf32", **nyud)
  # The full-resolution IFB (sc = 1, M = 19200 on NYUD): streamed runs, materialized must fail
  # with the message naming the streamed option.
  full = {**nyud, "steps": 1 if tiny else 3, "warmup": 0 if tiny else 1}
  add("fullres", "JAX bf16 streamed sc=1", jax_cap, jax_min, framework="jax", impl="streamed",
      dtype="bfloat16", precision="tf32", scale=1, **full)
  add("fullres", "JAX bf16 materialized sc=1", jax_cap, jax_min, framework="jax",
      impl="materialized", dtype="bfloat16", precision="tf32", scale=1, **full)
  # PASCAL-Context at the paper's shape (three tasks, six CIBs).
  add("pascal", "JAX bf16", jax_cap, jax_min, framework="jax", impl="materialized",
      dtype="bfloat16", precision="tf32", **pascal)
  add("pascal", "PT eager bf16", eager_cap, 30, framework="torch", impl="materialized",
      dtype="bfloat16", precision="tf32", **pascal)
  add("pascal", "JAX f32 TF32", jax_cap, jax_min, framework="jax", impl="materialized",
      dtype="float32", precision="tf32", **pascal)
  add("pascal", "PT eager f32 TF32", eager_cap, 30, framework="torch", impl="materialized",
      dtype="float32", precision="tf32", **pascal)
  add("pascal", "PT compile bf16", compile_cap, compile_min, framework="torch",
      impl="materialized", dtype="bfloat16", precision="tf32", torch_mode="compile", **pascal)
  # Full float32 on both sides (no TF32): like with like for users who need it.
  add("fp32", "JAX f32 IEEE", jax_cap, jax_min, framework="jax", impl="materialized",
      dtype="float32", precision="fp32", **nyud)
  add("fp32", "PT eager f32 IEEE", eager_cap, 30, framework="torch", impl="materialized",
      dtype="float32", precision="fp32", **nyud)
  # Reruns at the NYUD shape: the same row twice, equal state digests = bit-for-bit reruns.
  # With XLA's defaults, each process compiling and autotuning for itself (no compilation cache:
  # a rerun elsewhere, or a resumed run without launch.py's cache); with XLA's defaults, the
  # second process loading the first's executables from a cache of their own (a run resumed by
  # launch.py, which keeps its compilation cache in the workdir); with config.deterministic,
  # each compiling for itself, and the speed that costs.
  rerun = {**nyud, "steps": 1 if tiny else 5, "warmup": 0 if tiny else 1}
  for label, deterministic, cache in (("JAX bf16", False, NO_CACHE),
                                      ("JAX bf16 cache", False, "rerun"),
                                      ("JAX bf16 deterministic", True, NO_CACHE)):
    for run in (1, 2):
      add("determinism", f"{label} run {run}", jax_cap, max(60, jax_min), cache=cache,
          framework="jax", impl="materialized", dtype="bfloat16", precision="tf32",
          deterministic=deterministic, **rerun)
  return rows


# ----------------------------------------------------------------------------- helpers


class Clock:
  """The visit's time budget."""

  def __init__(self, budget_s: float):
    self.start = time.perf_counter()
    self.budget_s = budget_s

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()


def run_limited(cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None,
                log_path: pathlib.Path | None = None) -> tuple[int | None, str]:
  """Runs `cmd` in its own process group; kills the group after timeout_s (returns None, output).

  stdout and stderr together go to log_path (appended) and are returned.
  """
  with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as out:
    code = _wait_or_kill(subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True), timeout_s)
    out.seek(0)
    text = out.read()
  if log_path is not None:
    with open(log_path, "a", encoding="utf-8") as f:
      f.write(text)
  return code, text


def _wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> int | None:
  """proc's exit code; after timeout_s its process group (started with start_new_session) is
  killed and None is returned."""
  try:
    return proc.wait(timeout=max(1.0, timeout_s))
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return None


def child_env(base: dict[str, str] | None = None, **updates: str) -> dict[str, str]:
  env = dict(os.environ if base is None else base)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  env.update(updates)
  return env


def with_xla_flags(env: dict[str, str], flags: str) -> dict[str, str]:
  """A copy of `env` with `flags` after the XLA_FLAGS it already has."""
  return dict(env, XLA_FLAGS=" ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f))


def python_json(code: str, timeout_s: float, env: dict[str, str]) -> dict:
  """Runs `code` (which prints one JSON line last) in a fresh interpreter; {"error"} on failure."""
  rc, out = run_limited([sys.executable, "-c", code], timeout_s, env)
  lines = [l for l in out.strip().splitlines() if l.startswith("{")]
  if rc != 0 or not lines:
    tail = out.strip().splitlines()[-1:] or [""]
    return {"error": "timed out" if rc is None else f"exit {rc}: {tail[0][:300]}"}
  return json.loads(lines[-1])


# ----------------------------------------------------------------------------- env


ENV_PROBE = r'''
import importlib.metadata as md, json, os, platform, sys
out = {"python": sys.version.split()[0], "platform": platform.platform(),
       "cpu_count": os.cpu_count(), "versions": {}}
for name in NAMES:
  try:
    out["versions"][name] = md.version(name)
  except md.PackageNotFoundError:
    out["versions"][name] = None
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((1024, 1024)).astype(np.float32)
b = rng.standard_normal((1024, 1024)).astype(np.float32)
ref = a.astype(np.float64) @ b.astype(np.float64)
x = rng.standard_normal((8, 64, 64, 64)).astype(np.float32)
w = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
def rel(got, want):
  return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))
def kind(err):
  return "TF32-like" if err > 1e-4 else "IEEE float32"
# A 3x3 "SAME" convolution in float64: the sum of the nine shifted 1x1 products.
xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
conv_ref = sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + 64, j:j + 64], w[i, j].astype(np.float64))
               for i in range(3) for j in range(3))
try:
  import jax, jax.numpy as jnp
  from jax import lax
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  conv = jax.jit(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  j = {"version": jax.__version__, "backend": jax.default_backend(),
       "devices": [str(d) for d in jax.devices()], "device_kind": dev.device_kind,
       "bytes_limit": stats.get("bytes_limit"),
       "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
       "f32_matmul_rel_error": rel(jax.jit(jnp.dot)(a, b), ref),
       "f32_conv_rel_error": rel(conv(x, w), conv_ref)}
  j["f32_matmul"], j["f32_conv"] = kind(j["f32_matmul_rel_error"]), kind(j["f32_conv_rel_error"])
  out["jax"] = j
except Exception as e:
  out["jax"] = {"error": f"{type(e).__name__}: {e}"[:300]}
try:
  import torch
  t = {"version": torch.__version__, "cuda": torch.cuda.is_available(),
       "num_threads": torch.get_num_threads()}
  if torch.cuda.is_available():
    import warnings
    warnings.simplefilter("ignore")
    t["device"] = torch.cuda.get_device_name()
    t["cuda_version"] = torch.version.cuda
    t["cudnn_version"] = torch.backends.cudnn.version()
    t["matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    t["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    t["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    t["f32_matmul_rel_error"] = rel((ta @ tb).cpu().numpy(), ref)
    t["f32_matmul"] = kind(t["f32_matmul_rel_error"])
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().cuda()
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().cuda()
    got = torch.nn.functional.conv2d(tx, tw, padding=1).permute(0, 2, 3, 1).cpu().numpy()
    t["f32_conv_rel_error"] = rel(got, conv_ref)
    t["f32_conv"] = kind(t["f32_conv_rel_error"])
    if MATMUL_PEAK:
      peaks = {}
      n = 8192
      for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                                ("fp32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        p = torch.randn(n, n, device="cuda", dtype=dtype)
        q = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
          p @ q
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 10 if name != "fp32" else 3
        start.record()
        for _ in range(reps):
          p @ q
        end.record()
        torch.cuda.synchronize()
        peaks[name] = 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
        del p, q
      torch.backends.cuda.matmul.allow_tf32 = False
      t["measured_matmul_tflops"] = peaks
  out["torch"] = t
except Exception as e:
  out["torch"] = {"error": f"{type(e).__name__}: {e}"[:300]}
print(json.dumps(out))
'''


def env_phase(timeout_s: float, measure_peak: bool) -> dict:
  code = ENV_PROBE.replace("NAMES", repr(WATCHED_DISTRIBUTIONS)).replace(
      "MATMUL_PEAK", repr(measure_peak))
  # The JAX probe must not take most of the GPU's memory: the torch probe runs after it.
  info = python_json(code, timeout_s, child_env(XLA_PYTHON_CLIENT_PREALLOCATE="false"))
  try:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
    smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=False)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
  except (OSError, subprocess.TimeoutExpired) as e:
    info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
  return info


def gpu_model(env: dict) -> str | None:
  """'H100 SXM', 'H100 PCIe' or 'H200' from the device name, else None."""
  name = " ".join(str(x) for x in (env.get("torch", {}).get("device"),
                                    env.get("jax", {}).get("device_kind"), env.get("nvidia_smi")))
  if "H200" in name:
    return "H200"
  if "H100" in name:
    return "H100 PCIe" if "PCIe" in name else "H100 SXM"
  return None


def format_env(env: dict) -> str:
  j, t = env.get("jax", {}), env.get("torch", {})
  lines = [f"GPU: {env.get('nvidia_smi')}",
           f"Python {env.get('python')} on {env.get('platform')}, {env.get('cpu_count')} CPUs",
           f"JAX {j.get('version')} ({j.get('backend')}: {j.get('device_kind')}); "
           f"jax_default_matmul_precision={j.get('jax_default_matmul_precision')}; default f32 "
           f"matmul {j.get('f32_matmul')} (rel. error {j.get('f32_matmul_rel_error', 0):.1e}), "
           f"conv {j.get('f32_conv')} ({j.get('f32_conv_rel_error', 0):.1e})"
           + (f"; ERROR {j['error']}" if "error" in j else ""),
           f"PyTorch {t.get('version')} (CUDA {t.get('cuda_version')}, cuDNN "
           f"{t.get('cudnn_version')}): defaults matmul.allow_tf32={t.get('matmul.allow_tf32')} "
           f"cudnn.allow_tf32={t.get('cudnn.allow_tf32')}; default f32 matmul "
           f"{t.get('f32_matmul')}, conv {t.get('f32_conv')}"
           + (f"; ERROR {t['error']}" if "error" in t else "")]
  peaks = t.get("measured_matmul_tflops")
  if peaks:
    lines.append("measured 8192^3 matmul TFLOP/s: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
  versions = env.get("versions", {})
  lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
  lines.append("absent: " + ", ".join(k for k, v in versions.items() if not v))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- tests


def tests_phase(targets: Sequence[str], timeout_s: float, log: pathlib.Path,
                platform: str, workers: int = 1) -> dict:
  """pytest on `targets`; with workers > 1 (and pytest-xdist installed) in that many processes,
  each its own JAX client on the GPU (the tests' conftest turns preallocation off)."""
  if workers > 1 and importlib.util.find_spec("xdist") is None:
    workers = 1
  cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE",
         "--color=no", "--report-failures-at-once", *targets]
  if workers > 1:
    cmd[3:3] = ["-n", str(workers)]
  env = child_env(ITERFUSE_TEST_PLATFORM=platform)
  if platform == "gpu":
    # The tests check results, not speed: without autotuning each of their many small compiles
    # is shorter (on the H200's first visit 5 of 160 tests ran in 150 s).
    env = with_xla_flags(env, TESTS_XLA_FLAGS)
  start = time.perf_counter()
  rc, out = run_limited(cmd, timeout_s, env, log)
  # pytest -v: "tests/x.py::test_y[a b] PASSED   [ 10%]", one line per test as it finishes;
  # with xdist: "[gw1] [ 10%] PASSED tests/x.py::test_y[a b]".
  outcome = "(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
  finished = re.findall(rf"^tests/\S.*?::.*? {outcome}\b", out, re.MULTILINE)
  finished += re.findall(rf"^\[gw\d+\] \[\s*\d+%\] {outcome} tests/", out, re.MULTILINE)
  outcomes = {o.lower(): finished.count(o)
              for o in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
  summary_lines = [l for l in out.splitlines() if re.match(r"^=+ .*(passed|failed|error).* =+$", l)]
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
  # --report-failures-at-once: each failure's report as it happened, kept when pytest is killed.
  reports = {m.group(1): m.group(2) for m in re.finditer(
      r"^---- (\S+) failed \(\w+\):\n(.*?)\n----$", out, re.MULTILINE | re.DOTALL)}
  failed += [name for name in reports if name not in failed]
  return {"targets": list(targets), "platform": platform, "workers": workers, "exit": rc,
          "timed_out": rc is None, "seconds": time.perf_counter() - start, **outcomes,
          "summary": summary_lines[-1].strip("= ") if summary_lines else None,
          "failed_tests": failed, "failure_reports": reports}


def format_tests(t: dict) -> str:
  if "skipped_phase" in t:
    return f"tests: not run ({t['skipped_phase']})"
  processes = f", {t['workers']} processes" if t.get("workers", 1) > 1 else ""
  head = (f"tests (ITERFUSE_TEST_PLATFORM={t['platform']}{processes}, {t['seconds']:.0f} s): "
          f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
          f"{t['skipped']} skipped")
  if t["timed_out"]:
    head += " -- TIMED OUT, killed; the counts are the tests finished by then"
  elif t["summary"]:
    head += f" [pytest: {t['summary']}]"
  lines = [head]
  for name in t["failed_tests"]:
    report = t.get("failure_reports", {}).get(name, "")
    errors = [l for l in report.splitlines() if l.startswith("E ")]
    lines.append(f"  failed: {name}" + (f"\n    {errors[0][:300]}" if errors else ""))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- FLOPs


FLOPS_PROBE = r'''
import json, os
os.environ["JAX_PLATFORMS"] = "cpu"
from benchmarks import train_step
from benchmarks.train_step import Setting
from iterfuse_jax import compare
out = {}
for key, setting in SETTINGS:
  try:
    params, gflops = compare.model_cost(train_step.benchmark_config(Setting(**setting)))
    out[key] = {"params": params, "forward_gflops_per_image": gflops}
  except Exception as e:
    out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
print(json.dumps(out))
'''


def flops_key(s: Setting) -> str:
  return f"{s.dataset}/{s.height}x{s.width}/C{s.task_channels}/n{s.n_iter}/sc{s.scale}"


def start_flops_count(rows: Sequence[Row], timeout_s: float, pool) -> concurrent.futures.Future:
  """Counts forward FLOPs per distinct model on the CPU (XLA cost analysis; nothing compiled)."""
  settings = {}
  for row in rows:
    settings.setdefault(flops_key(row.setting), dataclasses.asdict(row.setting))
  code = FLOPS_PROBE.replace("SETTINGS", repr(sorted(settings.items())))
  env = child_env(JAX_PLATFORMS="cpu")
  return pool.submit(python_json, code, timeout_s, env)


# ----------------------------------------------------------------------------- bench


def precompile(rows: Sequence[Row], env: dict[str, str], deadline_s: float, workers: int,
               log: pathlib.Path) -> dict[str, dict]:
  """Compiles the JAX rows in parallel into the persistent cache; {label: result or error}."""
  jax_rows = [r for r in rows if r.setting.framework == "jax" and r.cache == SHARED_CACHE
              and not r.xla_flags]
  results = {}
  if not jax_rows or workers < 1:
    return results
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {}
    for row in jax_rows:
      futures[pool.submit(_precompile_one, row, env, start, deadline_s, log)] = row
    for future in concurrent.futures.as_completed(futures):
      results[_key(futures[future])] = future.result()
  return results


def _precompile_one(row: Row, env, start: float, deadline_s: float, log) -> dict:
  left = deadline_s - (time.perf_counter() - start)
  if left < 10:
    return {"error": "not precompiled: precompile deadline"}
  return train_step._measure_in_subprocess(  # pylint: disable=protected-access
      row.setting, timeout_s=min(row.cap_s, left), log_path=str(log), compile_only=True,
      env=env)


def _key(row: Row) -> str:
  return f"{row.group}: {row.label}"


def _row_line(result: dict) -> str:
  """A finished row in one progress line (the console keeps it if the command is killed)."""
  if "error" in result or "skipped" in result:
    return result.get("error") or result["skipped"]
  parts = [f"{result['images_per_s']:.2f} images/s"]
  if result.get("step_s"):
    parts.append(f"{result['step_s'] * 1e3:.1f} ms/step")
  if result.get("peak_bytes"):
    parts.append(f"peak {result['peak_bytes'] / 2 ** 30:.1f} GiB")
  if result.get("compile_s"):
    parts.append(f"compile {result['compile_s']:.0f} s"
                 + (f" (lowering {result['lower_s']:.0f} s)" if "lower_s" in result else ""))
  if result.get("init_s") is not None:
    parts.append(f"init {result['init_s']:.0f} s")
  if result.get("first_step_s") is not None:
    parts.append(f"first step {result['first_step_s']:.1f} s")
  return ", ".join(parts)


def init_cache_key(row: Row) -> tuple | None:
  """What decides whether a JAX row finds the parameters' initialisation compiled in its cache.

  The initialisation's module holds only the initialisers (JAX drops the unused forward pass when
  it lowers it), so rows of one model share it whatever their dtype, IFB or image size; the cache
  key also covers XLA's flags and compile options (config.deterministic) and the matmul
  precision. None: a row without a cache, which always compiles it.
  """
  if row.cache == NO_CACHE or row.setting.framework != "jax":
    return None
  s = row.setting
  return (row.cache, row.xla_flags, s.dataset, s.backbone, s.task_channels, s.variant,
          s.deterministic, s.precision)


def _initialisation_compiled(result: dict) -> bool:
  """Whether a row's process got past compiling the initialisation (also one killed later)."""
  error = result.get("error", "")
  return "init_s" in result or ("last progress: " in error
                                and f"last progress: {train_step.INIT_STAGE}" not in error)


def run_rows(rows: Sequence[Row], clock: Clock, env: dict[str, str], log: pathlib.Path,
             reserve_s: float, allow_torch_compile: bool,
             on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
  """Runs the rows one at a time; `env` holds the shared persistent compilation cache's settings,
  which rows of another cache run without. `on_row(results so far)` follows every row (the
  visit saves them: a command killed at its limit keeps the rows it finished)."""
  uncached_env = {k: v for k, v in env.items() if not k.startswith(CACHE_VARIABLES)}
  own_caches = {}  # name: folder
  initialised = set()  # init_cache_key of the rows whose initialisation is in their cache
  results = []
  for row in rows:
    left = clock.left() - reserve_s
    key = init_cache_key(row)
    if row.cold_cap_s and key not in initialised:
      row = dataclasses.replace(row, cap_s=max(row.cap_s, row.cold_cap_s),
                                min_s=max(row.min_s, row.cold_min_s))
    base = {"group": row.group, "label": row.label, "cache": row.cache,
            **dataclasses.asdict(row.setting)}
    if row.cache == SHARED_CACHE:
      row_env = env
    elif row.cache == NO_CACHE:
      row_env = uncached_env
    else:
      if row.cache not in own_caches:
        own_caches[row.cache] = tempfile.mkdtemp(prefix=f"iterfuse_jax_cache_{row.cache}_")
      row_env = dict(uncached_env, JAX_COMPILATION_CACHE_DIR=own_caches[row.cache],
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if row.xla_flags:
      base["xla_flags"] = row.xla_flags
      row_env = with_xla_flags(row_env, row.xla_flags)
    if row.setting.torch_mode == "compile" and not allow_torch_compile:
      results.append({**base, "skipped": "torch.compile rows are not run on a CPU dry run"})
    elif left < row.min_s:
      results.append({**base, "skipped": f"out of time budget ({left:.0f} s left)"})
    else:
      print(f"[{clock.elapsed():5.0f} s] {_key(row)} ...", flush=True)
      result = train_step._measure_in_subprocess(  # pylint: disable=protected-access
          row.setting, timeout_s=min(row.cap_s, left), log_path=str(log),
          env=row_env)
      if result.get("timed_out") and left < row.cap_s:
        # Killed by the budget's end, not by its own cap: a row to run again (--from-row),
        # not a failure of the visit.
        result = {k: v for k, v in result.items() if k != "error"}
        result["skipped"] = (f"out of time budget (killed after {left:.0f} s, before its "
                             f"{row.cap_s:.0f} s cap)")
      if key is not None and _initialisation_compiled(result):
        initialised.add(key)
      results.append({**result, **base})
      print(f"[{clock.elapsed():5.0f} s]   {_row_line(result)}", flush=True)
    if on_row is not None:
      on_row(results)
  return results


def rerun_verdict(results: list[dict]) -> str:
  """Whether two fresh processes of one row ended with the same bits, per setting; the speed
  config.deterministic costs."""
  lines = ["reruns (determinism group: the same row in two fresh processes):"]
  speed = {}
  settings = (("XLA defaults, each process compiling and autotuning for itself", False, NO_CACHE),
              ("XLA defaults, the second process loading the first's executables (a run "
               "resumed by launch.py)", False, "rerun"),
              ("config.deterministic, each process compiling for itself", True, NO_CACHE))
  for name, deterministic, cache in settings:
    runs = [r for r in results if r.get("group") == "determinism"
            and r.get("deterministic") == deterministic and r.get("cache") == cache]
    done = [r for r in runs if "state_sha256" in r]
    if len(done) < 2:
      why = "; ".join(r.get("error") or r.get("skipped", "") for r in runs if r not in done)
      lines.append(f"  {name}: not measured ({len(done)} of 2 runs{': ' + why if why else ''})")
      continue
    steps = 1 + done[0]["warmup"] + done[0]["steps"]
    same = len({r["state_sha256"] for r in done}) == 1
    losses = ", ".join(f"{r['loss']:.6g}" for r in done)
    lines.append(f"  {name}: parameters and BatchNorm statistics after {steps} steps "
                 + ("bit-identical in both runs" if same else "DIFFER between the runs")
                 + f" (losses {losses})")
    if cache == NO_CACHE:
      speed[deterministic] = max(r["images_per_s"] for r in done)
    else:
      if all("compile_s" in r for r in done):
        lines.append(f"    the step's lower+compile: {done[0]['compile_s']:.1f} s in the first "
                     f"run, {done[1]['compile_s']:.1f} s in the second (loading it)")
  if len(speed) == 2:
    lines.append(f"  config.deterministic runs at {speed[True] / speed[False]:.2f}x the defaults' "
                 f"images/s ({speed[True]:.2f} vs {speed[False]:.2f})")
  return "\n".join(lines)


def derive(results: list[dict], flops: dict, peaks: dict | None, precompiled: dict) -> None:
  """Adds model TFLOP/s, the fraction of the peak and the projected full-run time to each row."""
  for r in results:
    pre = precompiled.get(f"{r['group']}: {r['label']}")
    if pre and "compile_s" in pre:
      r["precompile_s"] = pre["compile_s"]
    if "step_s" not in r:
      continue
    setting = Setting(**{f.name: r[f.name] for f in dataclasses.fields(Setting)})
    cost = flops.get(flops_key(setting), {})
    gflops = cost.get("forward_gflops_per_image")
    if gflops:
      # Training = forward + backward ~ 3x the forward's FLOPs (the usual MFU convention).
      r["model_tflop_per_step"] = 3 * gflops * setting.batch / 1e3
      r["model_tflops"] = r["model_tflop_per_step"] / r["step_s"]
      arithmetic = "bf16" if setting.dtype == "bfloat16" else (
          "fp32" if setting.precision == "fp32" else "tf32")
      r["peak_arithmetic"] = arithmetic
      if peaks:
        r["fraction_of_peak"] = r["model_tflops"] / peaks[arithmetic]
    steps = train_step.TRAIN_EXAMPLES[setting.dataset] // setting.batch
    r["full_run_steps"] = FULL_RUN_EPOCHS * steps
    r["projected_full_run_min"] = FULL_RUN_EPOCHS * steps * r["step_s"] / 60


def targets(results: list[dict], tiny: bool) -> list[str]:
  """The issue's targets at the NYUD paper shape, each side at its best (printed, not asserted)."""
  def best(framework, mode=None):
    rows = [r for r in results if r["group"] == "nyud" and r.get("framework") == framework
            and "images_per_s" in r and (mode is None or r.get("torch_mode") == mode)]
    return max(rows, key=lambda r: r["images_per_s"], default=None)

  jax_best, eager, compiled = best("jax"), best("torch", "eager"), best("torch", "compile")
  scope = ("tiny dry-run shapes, not the paper's" if tiny
           else "NYUD 480x640, batch 8, IFB C n_iter 18")
  out = [f"targets ({scope}; each side's fastest row):"]

  def ratio_line(name, want, other):
    if jax_best is None or other is None:
      out.append(f"  JAX >= {want:g}x {name}: not measured")
      return
    ratio = jax_best["images_per_s"] / other["images_per_s"]
    out.append(f"  JAX >= {want:g}x {name}: {ratio:.2f}x ({jax_best['label']} "
               f"{jax_best['images_per_s']:.1f} vs {other['label']} {other['images_per_s']:.1f} "
               f"images/s) -> {'met' if ratio >= want else 'MISSED'}")

  ratio_line("PyTorch eager", 2.0, eager)
  ratio_line("torch.compile", 1.0, compiled)
  if jax_best is None:
    out.append("  paper's NYUD run (79,500 images) <= 15 min: not measured")
  else:
    minutes = jax_best["projected_full_run_min"]
    out.append(f"  paper's NYUD run ({jax_best['full_run_steps']} steps of 8) <= 15 min: "
               f"{minutes:.1f} min projected from {jax_best['label']} "
               f"({jax_best['step_s'] * 1e3:.0f} ms/step; compile and evaluation not included) "
               f"-> {'met' if minutes <= 15 else 'MISSED'}")
  return out


def compile_verdict(results: list[dict]) -> str:
  """Where the NYUD bf16 step's compile time goes (tracing and lowering in Python, then XLA), and
  what autotuning costs and buys: the step compiled with XLA's defaults against the same step
  compiled without autotuning (and the initialisation's compile, which both rows do
  themselves)."""
  rows = {r["label"]: r for r in results if r.get("group") == "nyud" and "step_s" in r}
  lines = ["compile of the NYUD bf16 train step:"]
  xla_s, step_s, init_s = {}, {}, {}
  for name, label in (("XLA defaults", "JAX bf16"), ("without autotuning", "JAX bf16 autotune 0")):
    r = rows.get(label)
    if r is None or "lower_s" not in r:
      lines.append(f"  {name}: not measured")
      continue
    # A precompiled row loaded its executable; its own lowering still ran in full.
    total = r.get("precompile_s", r["compile_s"])
    xla_s[name], step_s[name], init_s[name] = total - r["lower_s"], r["step_s"], r["init_s"]
    lines.append(f"  {name} ({label}): {total:.1f} s = {r['lower_s']:.1f} s tracing and lowering "
                 f"+ {xla_s[name]:.1f} s in XLA"
                 + (" (compiled ahead, during the tests)" if "precompile_s" in r else "")
                 + f"; step {r['step_s'] * 1e3:.1f} ms; initialisation {r['init_s']:.1f} s")
  if len(xla_s) == 2:
    name = "without autotuning"
    lines.append(f"  {name}: XLA's part {xla_s[name] / max(xla_s['XLA defaults'], 1e-9):.2f}x, "
                 f"the initialisation {init_s[name] / max(init_s['XLA defaults'], 1e-9):.2f}x, "
                 f"the step {step_s[name] / step_s['XLA defaults']:.3f}x the defaults'")
  return "\n".join(lines)


def full_resolution_verdict(results: list[dict]) -> str:
  """What the sc = 1 rows showed: streamed must run, materialized must fail naming streamed."""
  by_impl = {r["impl"]: r for r in results if r["group"] == "fullres"}
  lines = ["full-resolution IFB (sc = 1):"]
  streamed = by_impl.get("streamed")
  if streamed is None or "skipped" in streamed:
    lines.append("  streamed: not run")
  elif "error" in streamed:
    lines.append(f"  streamed: FAILED ({streamed['error']}) -- it must run")
  else:
    lines.append(f"  streamed: ran at batch {streamed['batch']}, "
                 f"{streamed['images_per_s']:.2f} images/s, peak "
                 f"{streamed['peak_bytes'] / 2**30:.1f} GiB -> as required")
  materialized = by_impl.get("materialized")
  if materialized is None or "skipped" in materialized:
    lines.append("  materialized: not run")
  elif "error" not in materialized:
    lines.append(f"  materialized: ran (peak {materialized['peak_bytes'] / 2**30:.1f} GiB): it "
                 "fits this device's memory at this shape")
  elif "model.tpim.ifb_impl=streamed" in materialized["error"]:
    lines.append(f"  materialized: failed with the hint, as required: {materialized['error']}")
  else:
    lines.append(f"  materialized: failed WITHOUT the hint: {materialized['error']}")
  return "\n".join(lines)


def format_table(results: list[dict]) -> str:
  header = (f"{'row':42s} {'prec':15s} {'img/s':>7s} {'ms/step':>8s} {'compile s':>9s} "
            f"{'peak GiB':>8s} {'TFLOP/s':>7s} {'%peak':>6s} {'full run min':>12s}")
  lines = [header]
  for r in results:
    name = f"{r['group']}: {r['label']}"
    if "skipped" in r:
      lines.append(f"{name:42s} skipped: {r['skipped']}")
      continue
    if "error" in r:
      lines.append(f"{name:42s} FAILED: {r['error']}")
      continue
    compile_s = r.get("precompile_s", r["compile_s"]) if r["framework"] == "jax" else r["compile_s"]
    tflops = f"{r['model_tflops']:7.3g}" if "model_tflops" in r else f"{'-':>7s}"
    frac = (f"{100 * r['fraction_of_peak']:5.1f}%" if "fraction_of_peak" in r else f"{'-':>6s}")
    prec = {"default": "default", "tf32": "TF32", "fp32": "IEEE f32"}[r["precision"]]
    if r["dtype"] == "bfloat16":
      prec = f"bf16 (+{prec})"
    lines.append(f"{name:42s} {prec:15s} {r['images_per_s']:7.2f} {r['step_s'] * 1e3:8.1f} "
                 f"{compile_s:9.1f} {r['peak_bytes'] / 2**30:8.2f} {tflops} {frac} "
                 f"{r['projected_full_run_min']:12.1f}")
  lines.append(
      "img/s: batch / median step; compile s: JAX lower+compile in the row's process (rows "
      "after the first reuse the visit's XLA autotuning results of the kernels they share; "
      "with --precompile, compiled ahead during the tests, an upper bound), torch.compile: "
      "first step less a step, eager: 0; peak: JAX "
      "peak_bytes_in_use / torch max_memory_allocated (CPU: XLA plan / max RSS); TFLOP/s: model "
      "FLOPs (3x forward, iterfuse_jax.compare) per second; %peak: of the data sheet's dense "
      "bf16 / TF32 / f32 peak for the row's arithmetic; full run: 100 epochs of the training "
      "split in whole batches at the median step (no compile, no evaluation).")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- pipeline


def pipeline_phase(tiny: bool, timeout_s: float, log: pathlib.Path) -> list[dict]:
  """Images/s of the training pipeline at the paper's sizes: read threads in the training process
  (dataset.read_threads; 0 workers, no processes to start) first, then worker processes, each
  setting its own run so that one that runs out of time (the H200's first visit: 14 workers)
  keeps the others' figures."""
  # The cores dataset.read_threads=-1 shares out (the process's CPU affinity), so that the
  # larger thread count timed here is the one a default run uses.
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  cores = pipeline.available_cores()
  common = ["--steps", "20", "--warmup", "3", "--num-train", "32"]
  if tiny:
    settings = [("nyud", 48, 64, ["0"], ["1", "2"], ["--steps", "2", "--warmup", "1",
                                                     "--num-train", "4", "--batch-size", "2"])]
  else:
    threads = ["2", str(max(2, min(8, cores)))]
    workers = str(max(1, min(8, cores - 2)))
    sizes = [(dataset, *train_step.DEFAULT_SIZES[dataset]) for dataset in ("nyud", "pascal")]
    settings = [(dataset, h, w, ["0"], threads, common) for dataset, h, w in sizes]
    settings += [(dataset, h, w, [workers], ["2"], common) for dataset, h, w in sizes]
  rows = {}  # dataset: row
  start = time.perf_counter()
  for dataset, h, w, workers, threads, extra in settings:
    row = rows.setdefault(dataset, {"dataset": dataset, "height": h, "width": w, "cores": cores,
                                    "rates": []})
    left = timeout_s - (time.perf_counter() - start)
    if left < 15:
      row.setdefault("errors", []).append(f"workers {workers[0]}: out of time budget")
      continue
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--dataset", dataset,
           "--height", str(h), "--width", str(w), "--workers", *workers,
           "--read-threads", *threads, *extra]
    rc, out = run_limited(cmd, left, child_env(JAX_PLATFORMS="cpu"), log)
    row["rates"] += [
        {"read_threads": int(m[0]), "workers": int(m[1]), "images_per_s": float(m[2])}
        for m in re.findall(r"read_threads=(\d+), workers=(\d+): ([\d.]+) images/s", out)]
    if rc != 0:
      tail = [l for l in out.strip().splitlines() if l.strip()][-1:] or [""]
      row.setdefault("errors", []).append(
          f"workers {workers[0]}: " + ("timed out" if rc is None else tail[0][:300]))
  results = list(rows.values())
  for row in results:
    if "errors" in row:
      row["error"] = "; ".join(row.pop("errors"))
  return results


def format_pipeline(rows: list[dict], bench: list[dict]) -> str:
  lines = []
  for p in rows:
    if "skipped_phase" in p:
      return f"input pipeline: not run ({p['skipped_phase']})"
    need = [r["images_per_s"] for r in bench if r.get("dataset") == p["dataset"]
            and r.get("framework") == "jax" and "images_per_s" in r and r.get("group") != "fullres"]
    text = ", ".join(f"{r['images_per_s']:.1f} images/s with {r['workers']} workers, "
                     f"{r['read_threads']} threads" for r in p.get("rates", []))
    line = (f"input pipeline {p['dataset']} {p.get('height')}x{p.get('width')} "
            f"({p.get('cores')} cores): {text or '-'}")
    if need and p.get("rates"):
      best = max(r["images_per_s"] for r in p["rates"])
      line += (f"; fastest JAX step needs {max(need):.1f} -> "
               f"{'keeps ahead' if best >= max(need) else 'FALLS BEHIND'}")
    if "error" in p:
      line += f"; ERROR {p['error']}"
    lines.append(line)
  return "\n".join(lines)


# ----------------------------------------------------------------------------- train

# The demo's figures on the CPU (README.md), for a first look at the GPU run's: the two differ in
# arithmetic (cuDNN / TF32), so they agree roughly, not bit for bit.
CPU_DEMO = {"semseg/miou": 17.4, "depth/rmse": 0.47}
# A new run's start as its log.txt has it (iterfuse_jax/train.py's lines): the initialisation
# and, at the same time on another thread, the train step's compile.
STARTUP_LOG_LINES = {"init_s": r"Initialised the train state in ([0-9.]+) s",
                     "step_compile_s": r"Compiled the train step in ([0-9.]+) s"}
TRAIN_MIN_S = 150.0  # the full demo's run is not started with less time left
TRAIN_TINY_MIN_S = 120.0  # the tiny demo's run took 104 s on the 2-core CPU, 63 s too few


def train_phase(tiny: bool, timeout_s: float, log: pathlib.Path) -> dict:
  """`python launch.py --config configs/demo.py[:tiny] --workdir TMP` as a user runs it."""
  config = "configs/demo.py:tiny" if tiny else "configs/demo.py"
  workdir = tempfile.mkdtemp(prefix="iterfuse_demo_")
  cmd = [sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}"]
  start = time.perf_counter()
  # stdout apart from stderr: its lines are the console a user reads (the bars go to stderr).
  with (tempfile.TemporaryFile(mode="w+", encoding="utf-8") as stdout,
        tempfile.TemporaryFile(mode="w+", encoding="utf-8") as err):
    code = _wait_or_kill(subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=stdout,
                                          stderr=err, text=True, start_new_session=True),
                         timeout_s)
    stdout.seek(0)
    err.seek(0)
    out, err_text = stdout.read(), err.read()
  wall_s = time.perf_counter() - start
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"$ {' '.join(cmd)}\n--- stdout\n{out}--- stderr\n{err_text}")
  result = {"command": " ".join(cmd), "exit": code, "wall_s": wall_s,
            "stdout_lines": len(out.splitlines()),
            "evaluations": sum(l.startswith("eval @ step") for l in out.splitlines())}
  metrics_file = pathlib.Path(workdir, "metrics.json")
  if metrics_file.exists():
    result["metrics"] = json.loads(metrics_file.read_text())
  result["tensorboard_files"] = len(list(pathlib.Path(workdir).glob("events.out.tfevents.*")))
  result.update(startup_seconds(pathlib.Path(workdir, "log.txt")))
  if code != 0:
    tail = [l for l in err_text.strip().splitlines() if l.strip()][-1:] or [""]
    result["error"] = "timed out" if code is None else f"exit {code}: {tail[0][:300]}"
  return result


def startup_seconds(log_file: pathlib.Path) -> dict[str, float]:
  """{"init_s", "step_compile_s"} of a new run's log.txt (what it has of them)."""
  text = log_file.read_text(encoding="utf-8", errors="replace") if log_file.exists() else ""
  found = {}
  for key, pattern in STARTUP_LOG_LINES.items():
    match = re.search(pattern, text)
    if match:
      found[key] = float(match.group(1))
  return found


def format_train(t: dict, tiny: bool) -> str:
  if "skipped_phase" in t:
    return f"training run: not run ({t['skipped_phase']})"
  line = (f"training run `{t['command'].split(' ', 1)[1]}`: exit {t['exit']} in "
          f"{t['wall_s']:.0f} s, {t['stdout_lines']} console lines, {t['evaluations']} "
          f"evaluations, {t['tensorboard_files']} TensorBoard file(s)")
  metrics = t.get("metrics", {})
  if metrics:
    line += "; " + ", ".join(f"{k} {metrics[k]:.3g}" for k in CPU_DEMO if k in metrics)
    if not tiny:
      line += " (CPU demo: " + ", ".join(f"{k} {v:g}" for k, v in CPU_DEMO.items()) + ")"
  if "init_s" in t and "step_compile_s" in t:
    line += (f"; started with the initialisation ({t['init_s']:.1f} s) and the train step's "
             f"compile ({t['step_compile_s']:.1f} s) at once")
  if "error" in t:
    line += f"; ERROR {t['error']}"
  return line


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                   description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("outdir")
  parser.add_argument("--tiny", action="store_true",
                      help="dry run: tiny shapes, CPU tests, no torch.compile rows on a CPU")
  parser.add_argument("--budget-s", type=float, default=530.0,
                      help="the whole run's time budget (the device tool allows 600 s)")
  parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated: {PHASES}")
  parser.add_argument("--groups", default=",".join(GROUPS),
                      help=f"benchmark row groups, comma-separated: {GROUPS}")
  parser.add_argument("--rows", default="", help="only these rows: comma-separated labels "
                      "('JAX bf16') or group-qualified labels ('pascal: JAX bf16')")
  parser.add_argument("--from-row", default="", help="start the plan at this row ('nyud: PT "
                      "compile bf16'): a second command goes on where the first stopped")
  parser.add_argument("--tests-s", type=float, default=200.0, help="limit of the tests phase")
  parser.add_argument("--tests-workers", type=int, default=-1,
                      help="pytest processes of the tests phase (pytest-xdist); -1: half the "
                      "cores, at most 8, on a GPU (their many small compilations run side by "
                      "side; nothing else runs then but the FLOP count), 2 on a dry run")
  parser.add_argument("--precompile", type=int, default=0,
                      help="JAX rows compiled ahead at a time, during the tests (0: each row "
                      "compiles itself, alone on the machine, so that its compile time is its "
                      "own and autotuning times kernels on an idle GPU). On the H200 one "
                      "compile of the NYUD step took 85 s alone; four at once all ran past 150 s")
  parser.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto")
  args = parser.parse_args(argv)

  phases = [p for p in args.phases.split(",") if p]
  groups = [g for g in args.groups.split(",") if g]
  bad = [p for p in phases if p not in PHASES] + [g for g in groups if g not in GROUPS]
  if bad:
    parser.error(f"unknown phases/groups {bad}; expected phases {PHASES}, groups {GROUPS}")
  outdir = pathlib.Path(args.outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  clock = Clock(args.budget_s)
  results: dict = {"argv": list(argv or sys.argv[1:]), "tiny": args.tiny}
  summary: list[str] = []

  def save():
    (outdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (outdir / "summary.txt").write_text("\n".join(summary) + "\n")

  def say(text: str):
    summary.append(text)
    print(text, flush=True)
    save()

  say(f"gpu_check {' '.join(results['argv'])}: budget {args.budget_s:.0f} s")
  if "env" in phases:
    env = env_phase(min(90.0, clock.left()), measure_peak=not args.tiny)
    results["env"] = env
    say(format_env(env))
  env = results.get("env", {})
  model = gpu_model(env)
  measured = env.get("torch", {}).get("measured_matmul_tflops")
  peaks = DATASHEET_TFLOPS.get(model) if model else None
  results["peak_tflops"] = {"gpu": model, "datasheet_dense": peaks, "measured_matmul": measured}
  if peaks:
    say(f"peak (data sheet, {model}, dense): " + ", ".join(f"{k} {v:g}" for k, v in peaks.items())
        + " TFLOP/s")

  profile_dir = tempfile.mkdtemp(prefix="iterfuse_profile_")
  rows = [r for r in plan(args.tiny, profile_dir, args.torch_device) if r.group in groups]
  if args.rows:
    wanted = {w.strip() for w in args.rows.split(",") if w.strip()}
    rows = [r for r in rows if r.label in wanted or _key(r) in wanted]
    if not rows:
      parser.error(f"--rows {args.rows!r} names no planned row")
  if args.from_row:
    keys = [_key(r) for r in rows]
    if args.from_row not in keys:
      parser.error(f"--from-row {args.from_row!r} is not a planned row of the groups asked for; "
                   f"expected one of {keys}")
    rows = rows[keys.index(args.from_row):]
  if "bench" not in phases:
    rows = []
  cache_dir = tempfile.mkdtemp(prefix="iterfuse_jax_cache_")
  row_env = child_env(JAX_COMPILATION_CACHE_DIR=cache_dir,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  compile_env = dict(row_env, XLA_PYTHON_CLIENT_PREALLOCATE="false")

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    # Bounded: leaving this block waits for it.
    flops_future = (start_flops_count(rows, min(240.0, max(30.0, clock.left() - 60)), pool)
                    if rows else None)
    # The tests and the ahead-of-time compilations share the first minutes.
    tests_deadline = min(args.tests_s, max(0.0, clock.left() - 200))
    precompile_future = None
    if rows and args.precompile > 0:
      precompile_future = pool.submit(precompile, rows, compile_env, tests_deadline + 30,
                                      args.precompile, outdir / "rows.log")
    if "tests" in phases:
      targets_ = TINY_TESTS if args.tiny else GPU_TESTS
      workers = args.tests_workers
      if workers < 0:
        workers = 2 if args.tiny else max(1, min(8, (os.cpu_count() or 1) // 2))
      tests = tests_phase(targets_, tests_deadline, outdir / "tests.log",
                          "cpu" if args.tiny else "gpu", workers)
    else:
      tests = {"skipped_phase": "not asked for (--phases)"}
    results["tests"] = tests
    say(format_tests(tests))
    precompiled = precompile_future.result() if precompile_future else {}
    results["precompile"] = precompiled
    if precompiled:
      say("precompiled JAX rows: " + ", ".join(
          f"{k} {v['compile_s']:.0f} s" if "compile_s" in v else f"{k} ({v.get('error')})"
          for k, v in precompiled.items()))

    reserve = 60.0 if "pipeline" in phases else 5.0
    if args.tiny and "train" in phases:
      # A dry run is there to run every phase on the image's versions (the rehearsal), and the
      # rows had grown to leave the training run out (58 s left of 60); on the GPU the rows
      # come first and the training run takes what is left.
      reserve += TRAIN_TINY_MIN_S
    if flops_future is not None:  # its CPU work must not overlap the timed rows
      concurrent.futures.wait([flops_future], timeout=min(30.0, max(0.0, clock.left() - 100)))

    def keep_rows(partial: list[dict]) -> None:
      results["bench"] = partial
      save()

    bench = run_rows(rows, clock, row_env, outdir / "rows.log", reserve,
                     allow_torch_compile=not args.tiny, on_row=keep_rows)
    flops = {}
    if flops_future is not None:
      try:
        flops = flops_future.result(timeout=max(1.0, clock.left() - reserve))
      except concurrent.futures.TimeoutError:
        flops = {"error": "the FLOP count did not finish in time"}
    results["model_flops"] = flops
    derive(bench, flops, peaks, precompiled)
    results["bench"] = bench
    if rows:
      say(format_table(bench))
      for line in targets(bench, args.tiny):
        say(line)
      say(full_resolution_verdict(bench))
      say(compile_verdict(bench))
      if any(r.group == "determinism" for r in rows):
        say(rerun_verdict(bench))
      for r in bench:
        if "profile_error" in r:
          say(f"profile of {_key(Row(r['group'], r['label'], None, 0, 0))} failed: "
              f"{r['profile_error']}")
      profiled = next((r for r in bench if "profile" in r), None)
      if profiled:
        from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top
        say(f"profile of {profiled['group']}: {profiled['label']}:\n"
            + profile_summary.format_summary(profiled["profile"]))

  if "pipeline" in phases:
    left = clock.left()
    pipeline = (pipeline_phase(args.tiny, left, outdir / "pipeline.log") if left > 15
                else [{"skipped_phase": "out of time budget"}])
    results["pipeline"] = pipeline
    say(format_pipeline(pipeline, results.get("bench", [])))
  if "train" in phases:
    left = clock.left()
    need = TRAIN_TINY_MIN_S if args.tiny else TRAIN_MIN_S
    train = (train_phase(args.tiny, left, outdir / "train.log") if left >= need
             else {"skipped_phase": f"out of time budget ({left:.0f} s left, {need:.0f} s needed)"})
    results["train"] = train
    say(format_train(train, args.tiny))
  say(f"gpu_check done in {clock.elapsed():.0f} s; files in {outdir}")
  failed = [r for r in results.get("bench", []) if "error" in r
            and not (r.get("impl") == "materialized" and r.get("scale") == 1)]
  failed += ["train"] if "error" in results.get("train", {}) else []
  return 1 if failed or results.get("tests", {}).get("failed") else 0


if __name__ == "__main__":
  sys.exit(main())
