"""Train-step throughput, compile time and peak memory: iterfuse_jax vs a PyTorch eager port.

JAX side: the IterFuse network built by `build_model` from `configs/default.py` (with this
script's overrides), trained by the real `iterfuse_jax.train.train_step`, jitted on a 1-device
mesh with the train state donated, exactly as `train_and_evaluate` jits it. PyTorch side: the same
network written below in eager PyTorch on timm's HRNet of the same variant (`hrnet_w18_small_v2`
by default, `--backbone`; features_only, the four raw branches; its fuse layers resize bilinearly
to the exact branch size like our default `fuse_upsample="bilinear"` instead of timm's nearest
x2^k), per-task initial modules and heads,
the TPIM of CIBs (spatial self-attention + pixel-wise global attention + the IFB loop of the same
variant and n_iter), the same losses and weights on intermediate and final predictions, and Adam
with L2 weight decay added to the gradient (`torch.optim.Adam(weight_decay=...)`, as our
optimiser does). Both build their network, loss weights and optimiser settings from the same
`configs/default.py` config (`benchmark_config`); the PyTorch side refuses settings its port does
not implement. Both run on the same random images and labels of the dataset's format.

IFB implementations: JAX "materialized" (Co built once per forward, [B, M, M]) and "streamed"
(blockwise online softmax, Co never built). Their PyTorch counterparts are "materialized" (the
same bmm loop) and "sdpa" (`F.scaled_dot_product_attention` in every iteration, which never builds
Co either: flash / memory-efficient kernels; channels zero-padded to a multiple of 8 so that the
GPU kernels accept C = 270). The JAX/PyTorch ratio of a JAX row is its images/s over the images/s
of the PyTorch row of the matching kind.

Rows also differ by float32 precision (--precision: each side's default, both TF32, or both full
float32; the row's "matmul_precision" says what was in force), PyTorch mode (--torch-mode eager,
compile: `torch.compile` of forward + losses), the CIB scale (--scale 1: the full-resolution IFB)
and PyTorch device (--torch-device; "auto" is CUDA when there is one); --deterministic compiles
the JAX step with `config.deterministic` (`iterfuse_jax.determinism`), --ifb-products float32
keeps the materialized IFB's products in float32 under bfloat16 (`model.tpim.ifb_products`; by
default they take the model's dtype, as the PyTorch port's do under autocast).
`benchmarks/gpu_check.py` drives this module's rows on a GPU machine with time limits (`_measure_in_subprocess`).

Figures per row: compile time (JAX: lower + compile, and lower_s, the tracing and lowering in
Python, apart; init_s, the parameters' initialisation, compile included; PyTorch eager: 0;
torch.compile: first step less the median step), first step, a JAX row's state_sha256 (a digest
of the parameters and BatchNorm statistics after its steps: two runs of one row agree iff they
computed the same bits), images/s (batch / median step time over --steps timed steps after
--warmup untimed ones, each step waited for with block_until_ready / cuda.synchronize), and peak
memory:
  * GPU: JAX `device.memory_stats()["peak_bytes_in_use"]`, PyTorch
    `torch.cuda.max_memory_allocated()` (both: parameters, optimiser state, batch, activations).
  * CPU: JAX's compile-time plan `memory_analysis()` temp + argument + output - aliased (donated)
    bytes; PyTorch has no such figure, so its "peak" is the process's max RSS.
  * every row also gives the process's max RSS (`resource.getrusage`), a rough figure that
    includes the framework's own libraries; it is per row only when rows run isolated (default:
    one fresh subprocess per row, importing only its framework).

--no-isolate runs every row in this process: the max RSS and the JAX GPU peak are then cumulative
over the rows so far, JAX does not preallocate GPU memory, and torch is imported before JAX
compiles anything (importing triton, which timm pulls in through torchvision, after an XLA
compilation crashes the process). --json FILE writes the rows (all figures in bytes and seconds,
"jax_over_torch" on JAX rows, "error" on failed rows); the exit status is 1 if a row failed.

  python -m benchmarks.train_step                                   # paper's NYUD shape
  python -m benchmarks.train_step --height 240 --width 320 --batch 2
  python -m benchmarks.train_step --dataset pascal --n-iter 4 --no-torch
  python -m benchmarks.train_step --height 64 --width 64 --batch 2 --task-channels 8 --n-iter 2
      --steps 1 --warmup 0 --no-isolate                             # smoke run (one line)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from configs import default as default_config
from iterfuse_jax import tasks as task_registry
from iterfuse_jax.tasks import IGNORE_LABEL

MiB = 2 ** 20
# Paper, Table 1: the network input of each dataset (height, width).
DEFAULT_SIZES = {"nyud": (480, 640), "pascal": (512, 512)}
# Training split sizes (REFERENCE.md); only used for the per-epoch learning-rate schedule.
TRAIN_EXAMPLES = {"nyud": 795, "pascal": 4998}
JAX_IMPLS = ("materialized", "streamed")
# PyTorch counterpart of each JAX IFB implementation.
TORCH_IMPL_FOR = {"materialized": "materialized", "streamed": "sdpa"}
# Float32 matmul / convolution precision of a row. "default": each framework's own (JAX on a GPU:
# TF32-like for float32 dots and convolutions; PyTorch: IEEE float32 matmuls, TF32 cuDNN
# convolutions); "tf32": both sides TF32; "fp32": both sides full float32.
PRECISIONS = ("default", "tf32", "fp32")
JAX_PRECISION = {"tf32": "tensorfloat32", "fp32": "float32"}
TORCH_MODES = ("eager", "compile")
# iterfuse_jax.models.hrnet.HRNET_VARIANTS (not imported: a row's process imports only its own
# framework) -> the name printed in the title. w18_tiny is for the smoke tests and dry runs.
BACKBONE_NAMES = {"w18_small_v2": "HRNet-W18-small-v2", "w18": "HRNet-W18",
                  "w18_tiny": "HRNet-W18-tiny (unpublished)"}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One benchmark row: which framework runs which network at which shape."""

  framework: str  # "jax" or "torch"
  impl: str  # JAX: materialized | streamed; PyTorch: materialized | sdpa
  dataset: str
  height: int
  width: int
  batch: int
  n_iter: int
  variant: str
  task_channels: int
  dtype: str
  steps: int
  warmup: int
  seed: int = 0
  precision: str = "default"  # see PRECISIONS
  torch_mode: str = "eager"  # PyTorch: eager | compile (torch.compile of forward + losses)
  scale: int = 2  # model.tpim.scale, the CIB's pooling factor (1: full-resolution IFB)
  torch_device: str = "auto"  # PyTorch: auto (CUDA when there is one) | cpu | cuda
  profile_dir: str = ""  # JAX: trace PROFILE_STEPS more steps into this folder and summarise them
  deterministic: bool = False  # JAX: config.deterministic (XLA's deterministic GPU kernels)
  ifb_products: str = "model"  # JAX: model.tpim.ifb_products ("model" | "float32")
  ifb_gradient: str = "stacked"  # JAX: model.tpim.ifb_gradient ("stacked" | "autodiff")
  backbone: str = "w18_small_v2"  # model.backbone, both sides (see BACKBONE_NAMES)


def benchmark_config(setting: Setting):
  """`configs/default.py` for the setting's dataset with this script's overrides.

  Both frameworks build their network, losses and optimiser from it (importing it loads
  ml_collections only, neither JAX nor PyTorch).
  """
  config = default_config.get_config(setting.dataset)
  config.batch_size = setting.batch
  config.num_devices = 1
  config.dataset.train_size = (setting.height, setting.width)
  config.model.task_channels = setting.task_channels
  config.model.backbone = setting.backbone
  config.model.dtype = setting.dtype
  config.model.tpim.n_iter = setting.n_iter
  config.model.tpim.variant = setting.variant
  config.model.tpim.scale = setting.scale
  config.deterministic = setting.deterministic
  if setting.framework == "jax":
    config.model.tpim.ifb_impl = setting.impl
    config.model.tpim.ifb_products = setting.ifb_products
    config.model.tpim.ifb_gradient = setting.ifb_gradient
  return config


# ----------------------------------------------------------------------------- inputs


def random_batch(dataset: str, tasks: Sequence[str], batch: int, height: int, width: int,
                 seed: int) -> dict[str, np.ndarray]:
  """Random images and labels in the training pipeline's format (NHWC, [B, H, W] labels).

  image float32 [B, H, W, 3] (normalised-like); semseg / human_parts int32 class ids with ~10 %
  ignored (255); depth float32 metres with ~10 % invalid (0); sal int32 {0, 1} with ~5 % ignored.
  """
  rng = np.random.default_rng(seed)
  shape = (batch, height, width)
  out = {"image": rng.standard_normal((*shape, 3), dtype=np.float32)}
  for task in tasks:
    if task in ("semseg", "human_parts"):
      labels = rng.integers(0, task_registry.num_outputs(task, dataset), shape, dtype=np.int32)
      out[task] = np.where(rng.random(shape) < 0.1, IGNORE_LABEL, labels).astype(np.int32)
    elif task == "depth":
      depth = rng.uniform(0.5, 10.0, shape).astype(np.float32)
      out[task] = np.where(rng.random(shape) < 0.1, 0.0, depth).astype(np.float32)
    else:  # sal
      labels = (rng.random(shape) < 0.3).astype(np.int32)
      out[task] = np.where(rng.random(shape) < 0.05, IGNORE_LABEL, labels).astype(np.int32)
  return out


def _max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# A row's progress on stderr: a process killed at its cap says which stage it had reached (the
# GPU's first NYUD bf16 row was killed at 150 s, inside compiling: 69 s initialisation and 88 s
# train step, which the rows log could not tell apart from a hang).
PROGRESS = "progress:"


# The first stage; every later one means the initialisation is compiled (and in the persistent
# compilation cache, where the row has one).
INIT_STAGE = "initialising the parameters"


def progress(text: str) -> None:
  print(f"{PROGRESS} {text}", file=sys.stderr, flush=True)


def last_progress(stderr: str) -> str:
  """The last progress line a row's process wrote ("" if none)."""
  lines = [l for l in stderr.splitlines() if l.startswith(PROGRESS)]
  return lines[-1][len(PROGRESS):].strip() if lines else ""


def _summary(setting: Setting, step_times: list[float], **figures: Any) -> dict:
  step_s = statistics.median(step_times)
  return {**dataclasses.asdict(setting), "step_s": step_s,
          "images_per_s": setting.batch / step_s, "max_rss_bytes": _max_rss_bytes(), **figures}


# ----------------------------------------------------------------------------- JAX


PROFILE_STEPS = 3


def jax_precision_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  value = jax.config.jax_default_matmul_precision
  return f"jax_default_matmul_precision={value}" if value else "JAX default"


def measure_jax(setting: Setting, compile_only: bool = False) -> dict:
  """Builds the model from the default config, jits train.train_step and times it.

  compile_only: stop after the compilation (which fills the persistent compilation cache when
  JAX_COMPILATION_CACHE_DIR is set) and return the compile time.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from iterfuse_jax import out_of_memory, train
  from iterfuse_jax.models import build_model
  # pylint: enable=g-import-not-at-top

  if setting.precision != "default":
    jax.config.update("jax_default_matmul_precision", JAX_PRECISION[setting.precision])
  config = benchmark_config(setting)
  tasks = tuple(config.dataset.tasks)

  mesh = train.create_mesh(1)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = build_model(config)
  schedule = train.create_learning_rate_schedule(
      config, train.steps_per_epoch(TRAIN_EXAMPLES[setting.dataset], setting.batch))
  tx = train.create_optimizer(config, schedule)
  start = time.perf_counter()
  progress(f"{INIT_STAGE} (compiling the initialisation)")
  state = train.create_train_state(config, model, tx, jax.random.key(setting.seed),
                                   (1, setting.height, setting.width, 3), mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start  # the initialisation's own compile, and running it
  progress(f"initialised in {init_s:.1f} s; tracing and lowering the train step")
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  host_batch = random_batch(setting.dataset, tasks, setting.batch, setting.height,
                            setting.width, setting.seed)
  batch = {k: jax.device_put(v, data_sharding) for k, v in host_batch.items()}

  # The jit of train.train_and_evaluate: shardings, and the state donated.
  jitted = train.jit_train_step(config, schedule, state, mesh)
  start = time.perf_counter()
  with out_of_memory.hint(config):
    lowered = jitted.lower(state, batch)
    # Tracing and lowering run in Python; the rest is XLA's (on a GPU: fusion, autotuning of
    # convolutions and GEMMs, kernel compilation).
    lower_s = time.perf_counter() - start
    progress(f"lowered in {lower_s:.1f} s; compiling the train step")
    compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  progress(f"compiled the train step in {compile_s:.1f} s (lowering included)")
  device = jax.devices()[0]
  phases = {"compile_s": compile_s, "lower_s": lower_s, "init_s": init_s}
  if compile_only:
    return {**dataclasses.asdict(setting), **phases,
            "device": f"{device.platform}: {device.device_kind}"}
  analysis = compiled.memory_analysis()
  xla_bytes = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
               + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  # As in the train loop: an out-of-memory error of the materialized IFB names the streamed one.
  run = out_of_memory.with_hint(compiled, config)

  def step(state):
    start = time.perf_counter()
    state, metrics = run(state, batch)
    jax.block_until_ready((state, metrics))
    return state, metrics, time.perf_counter() - start

  state, metrics, first_s = step(state)
  progress(f"first step in {first_s:.2f} s; {setting.warmup} warm-up and {setting.steps} "
           "timed steps")
  for _ in range(setting.warmup):
    state, metrics, _ = step(state)
  times = []
  for _ in range(setting.steps):
    state, metrics, seconds = step(state)
    times.append(seconds)
  loss = float(metrics["loss/total"])
  # Two runs of the same row (same seed, batch and step count) computed the same function bit
  # for bit iff these agree: a rerun's and a resumed run's reproducibility on this device.
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves((state.params, state.batch_stats)):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())

  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak, peak_kind = stats["peak_bytes_in_use"], f"{device.platform} peak_bytes_in_use"
  else:
    peak, peak_kind = xla_bytes, "XLA plan temp+arg+out-alias"
  figures = {}
  if setting.profile_dir:
    # After the timing, and never fatal: a profiler that cannot start (no CUPTI, say) costs the
    # row its profile, not its figures.
    from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top
    progress(f"timed (median {statistics.median(times or [first_s]):.3f} s); profiling "
             f"{PROFILE_STEPS} steps")
    try:
      with jax.profiler.trace(setting.profile_dir):
        for _ in range(PROFILE_STEPS):
          state, metrics, _ = step(state)
      figures["profile"] = profile_summary.summarize(setting.profile_dir, steps=PROFILE_STEPS)
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-exception-caught
      figures["profile_error"] = f"{type(e).__name__}: {e}"[:500]
  return _summary(setting, times or [first_s], **phases, first_step_s=first_s,
                  peak_bytes=peak, peak_kind=peak_kind, xla_plan_bytes=xla_bytes, loss=loss,
                  num_params=num_params, device=f"{device.platform}: {device.device_kind}",
                  matmul_precision=jax_precision_name(), state_sha256=digest.hexdigest(),
                  **figures)


# ----------------------------------------------------------------------------- PyTorch port


def torch_port():
  """The PyTorch port (`benchmarks.torch_port`), imported lazily: JAX rows never load torch."""
  from benchmarks import torch_port as port  # pylint: disable=g-import-not-at-top
  return port


def torch_device(torch, requested: str):
  """The device a PyTorch row runs on: "auto" is CUDA when there is one."""
  if requested not in ("auto", "cpu", "cuda"):
    raise ValueError(f"unknown torch_device {requested!r}; expected auto, cpu or cuda")
  if requested == "auto":
    requested = "cuda" if torch.cuda.is_available() else "cpu"
  if requested == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("torch_device 'cuda' asked for, but PyTorch sees no CUDA device")
  return torch.device(requested)


def set_torch_precision(torch, precision: str) -> str:
  """Applies a row's float32 precision to PyTorch's CUDA backends; returns what is in force."""
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the allow_tf32 flags are deprecated in favour of ...
    if precision in ("tf32", "fp32"):
      torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
      torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return (f"torch matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} "
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")


def measure_torch(setting: Setting) -> dict:
  """Times the PyTorch port's train step (forward, losses, backward, Adam), eager or compiled.

  torch_mode "compile": `torch.compile` of the forward pass with its losses (the backward is
  compiled with it by AOTAutograd; Adam stays eager, as most users run it). Its compilation
  happens in the first step, so compile_s is the first step's time less the median step.
  """
  if setting.torch_mode not in TORCH_MODES:
    raise ValueError(f"unknown torch_mode {setting.torch_mode!r}; expected one of {TORCH_MODES}")
  port = torch_port()
  torch = port.torch
  config = benchmark_config(setting)
  torch.manual_seed(setting.seed)
  device = torch_device(torch, setting.torch_device)
  precision = "cpu (no TF32)"
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    precision = set_torch_precision(torch, setting.precision)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  tasks = tuple(config.dataset.tasks)
  model = port.iterfuse_from_config(config, impl=setting.impl).to(device)
  num_params = sum(p.numel() for p in model.parameters())
  # The first epoch's learning rate of the poly schedule is the base rate.
  optimizer = torch.optim.Adam(model.parameters(), lr=config.optimizer.learning_rate,
                               weight_decay=config.optimizer.weight_decay)
  host = random_batch(setting.dataset, tasks, setting.batch, setting.height, setting.width,
                      setting.seed)
  batch = {k: torch.from_numpy(v).to(device) for k, v in host.items()}
  images = batch.pop("image").permute(0, 3, 1, 2).contiguous()
  weights = {t: float(config.loss_weights[t]) for t in tasks}
  use_bf16 = setting.dtype == "bfloat16"

  def forward_loss(images, batch):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
      outputs = model(images)
    return port.multitask_loss(outputs, batch, tasks, weights)

  if setting.torch_mode == "compile":
    forward_loss = torch.compile(forward_loss)

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  def step():
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(images, batch)
    loss.backward()
    optimizer.step()
    sync()
    return float(loss.detach()), time.perf_counter() - start

  try:
    loss, first_s = step()
  except torch.OutOfMemoryError as e:
    raise MemoryError(f"CUDA out of memory in the PyTorch port: {str(e).splitlines()[0]}") from e
  for _ in range(setting.warmup):
    step()
  times = []
  for _ in range(setting.steps):
    loss, seconds = step()
    times.append(seconds)
  compile_s = 0.0
  if setting.torch_mode == "compile":
    compile_s = max(0.0, first_s - statistics.median(times or [first_s]))
  if device.type == "cuda":
    peak, peak_kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    name = torch.cuda.get_device_name()
    del model, optimizer, batch, images
    torch.cuda.empty_cache()  # give the memory back for the rows after this one (--no-isolate)
  else:
    peak, peak_kind = _max_rss_bytes(), "process max RSS"
    name = f"{torch.get_num_threads()} threads"
  return _summary(setting, times or [first_s], compile_s=compile_s, first_step_s=first_s,
                  peak_bytes=peak, peak_kind=peak_kind, xla_plan_bytes=None,
                  loss=loss, num_params=num_params, device=f"{device.type}: {name}",
                  matmul_precision=precision, torch_version=torch.__version__)


# ----------------------------------------------------------------------------- driver


def measure(setting: Setting, compile_only: bool = False) -> dict:
  if setting.framework == "jax":
    return measure_jax(setting, compile_only=compile_only)
  if setting.framework == "torch":
    if compile_only:
      raise ValueError("compile_only is for JAX rows")
    return measure_torch(setting)
  raise ValueError(f"unknown framework {setting.framework!r}; expected 'jax' or 'torch'")


def _measure_in_subprocess(setting: Setting, timeout_s: float | None = None,
                           log_path: str = "", compile_only: bool = False,
                           env: dict[str, str] | None = None) -> dict:
  """One row in a fresh interpreter, so that its max RSS and device peak are its own.

  timeout_s: the row's process group (torch.compile's workers too) is killed after this long and
  the row becomes an error row. log_path: the row's stderr is appended to this file.
  """
  env = dict(os.environ if env is None else env)
  repo_root = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "benchmarks.train_step", "--_child",
         json.dumps(dataclasses.asdict(setting))]
  if compile_only:
    cmd.append("--_compile_only")
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, cwd=repo_root, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout_s)
    timed_out = False
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    timed_out = True
  wall_s = time.perf_counter() - start
  if log_path:
    with open(log_path, "a", encoding="utf-8") as f:
      f.write(f"===== {json.dumps(dataclasses.asdict(setting))} "
              f"({'compile only, ' if compile_only else ''}{wall_s:.1f} s, exit {proc.returncode})"
              f"\n{stderr}\n")
  base = {**dataclasses.asdict(setting), "wall_s": wall_s}
  if timed_out:
    reached = last_progress(stderr)
    return {**base, "error": f"timed out after {timeout_s:.0f} s (killed)"
            + (f"; last progress: {reached}" if reached else ""), "timed_out": True}
  if proc.returncode != 0:
    return {**base, "error": _last_error_line(stderr, proc.returncode)}
  try:
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": wall_s}
  except (IndexError, json.JSONDecodeError):
    return {**base, "error": "the row's process printed no JSON result"}


def _measure_here(setting: Setting) -> dict:
  """One row in this process (--no-isolate); a failure becomes an error row, as isolated."""
  try:
    return measure(setting)
  except Exception as e:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    return {**dataclasses.asdict(setting), "error": f"{type(e).__name__}: {e}"[:200]}


def _last_error_line(stderr: str, returncode: int) -> str:
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  if returncode in (-9, 137):  # SIGKILL: the kernel's OOM killer
    return "killed (out of memory?)"
  # Long enough for the out-of-memory hint, which names the option at its end.
  return lines[-1][:1000] if lines else f"exit status {returncode}"


HEADER = (f"{'framework':9s} {'ifb':12s} {'compile s':>9s} {'1st step s':>10s} {'step s':>8s} "
          f"{'images/s':>9s} {'peak MiB':>9s} {'max RSS MiB':>11s} {'JAX/PT':>7s} {'loss':>8s}")


def row_name(row: dict) -> str:
  if row["framework"] == "jax":
    return "JAX"
  return "PT.compile" if row.get("torch_mode") == "compile" else "PyTorch"


def format_row(row: dict, ratio: float | None) -> str:
  name = row_name(row)
  if "error" in row:
    return f"{name:9s} {row['impl']:12s} failed: {row['error']}"
  ratio_text = f"{ratio:7.2f}" if ratio is not None else f"{'-':>7s}"
  return (f"{name:9s} {row['impl']:12s} {row['compile_s']:9.2f} {row['first_step_s']:10.2f} "
          f"{row['step_s']:8.3f} {row['images_per_s']:9.2f} {row['peak_bytes'] / MiB:9.1f} "
          f"{row['max_rss_bytes'] / MiB:11.1f} {ratio_text} {row['loss']:8.3f}")


def _parse_list(kind, allowed=None):
  def parse(text: str):
    values = [kind(x) for x in text.split(",") if x]
    if not values:
      raise argparse.ArgumentTypeError("expected a comma-separated list")
    if allowed is not None:
      bad = [v for v in values if v not in allowed]
      if bad:
        raise argparse.ArgumentTypeError(f"unknown values {bad}; expected some of {list(allowed)}")
    return values
  return parse


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step",
                                   description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--dataset", choices=sorted(DEFAULT_SIZES), default="nyud")
  parser.add_argument("--height", type=int, default=0, help="0: the paper's size (480 / 512)")
  parser.add_argument("--width", type=int, default=0, help="0: the paper's size (640 / 512)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--n-iter", type=_parse_list(int), default=[0, 4, 18],
                      help="comma-separated IFB iteration counts")
  parser.add_argument("--ifb-impl", type=_parse_list(str, JAX_IMPLS), default=list(JAX_IMPLS),
                      help="comma-separated JAX IFB implementations")
  parser.add_argument("--variant", choices=("A", "B", "C"), default="C")
  parser.add_argument("--backbone", choices=tuple(BACKBONE_NAMES), default="w18_small_v2",
                      help="model.backbone (w18_tiny: unpublished, for quick checks)")
  parser.add_argument("--task-channels", type=int, default=270)
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--jax", action=argparse.BooleanOptionalAction, default=True,
                      help="time iterfuse_jax's train step")
  parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the PyTorch eager port")
  parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                      help="each row in a fresh subprocess (own max RSS and device peak)")
  parser.add_argument("--json", default="", help="also write the rows to this file")
  parser.add_argument("--precision", choices=PRECISIONS, default="default",
                      help="float32 matmul/conv precision of both sides (see PRECISIONS)")
  parser.add_argument("--torch-mode", type=_parse_list(str, TORCH_MODES), default=["eager"],
                      help="comma-separated PyTorch modes: eager, compile (torch.compile)")
  parser.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto")
  parser.add_argument("--scale", type=int, default=2, help="model.tpim.scale (1: full resolution)")
  parser.add_argument("--deterministic", action="store_true",
                      help="JAX rows: config.deterministic (XLA's deterministic GPU kernels)")
  parser.add_argument("--ifb-products", choices=("model", "float32"), default="model",
                      help="JAX rows: model.tpim.ifb_products, the materialized IFB's product "
                      "operands (PyTorch autocast: the model's dtype)")
  parser.add_argument("--ifb-gradient", choices=("stacked", "autodiff"), default="stacked",
                      help="JAX rows: model.tpim.ifb_gradient, the materialized IFB's backward "
                      "(stacked: dCo as one product; autodiff: JAX's derivative of the loop)")
  parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_compile_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  child = args._child  # pylint: disable=protected-access
  if child:
    compile_only = args._compile_only  # pylint: disable=protected-access
    row = measure(Setting(**json.loads(child)), compile_only=compile_only)
    print(json.dumps(row))
    return 0

  default_h, default_w = DEFAULT_SIZES[args.dataset]
  height, width = args.height or default_h, args.width or default_w
  if (min(height, width, args.batch, args.task_channels, args.steps + 1, args.scale) < 1
      or args.warmup < 0):
    parser.error("height, width, batch and task channels must be positive, steps and warmup "
                 "non-negative")
  if any(n < 0 for n in args.n_iter):
    parser.error(f"--n-iter values must be non-negative, got {args.n_iter}")
  if not (args.jax or args.torch):
    parser.error("--no-jax and --no-torch leave nothing to time")
  if args.isolate:
    run = _measure_in_subprocess
  else:
    run = _measure_here
    if args.torch:
      # Both frameworks in one process: JAX must not preallocate most of a GPU's memory, and
      # torch (with timm, torchvision, triton) must be imported before JAX compiles anything:
      # importing triton after an XLA compilation crashes the process (LLVM symbol clash).
      os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      torch_port()

  print(f"train step: IterFuse ({BACKBONE_NAMES[args.backbone]}, IFB {args.variant}) on "
        f"{args.dataset}, "
        f"{height}x{width}, batch {args.batch}, task channels {args.task_channels}, "
        f"{args.dtype}; median of {args.steps} steps after {args.warmup} warm-up", flush=True)
  rows = []
  for n_iter in args.n_iter:
    common = dict(dataset=args.dataset, height=height, width=width, batch=args.batch,
                  n_iter=n_iter, variant=args.variant, task_channels=args.task_channels,
                  dtype=args.dtype, steps=args.steps, warmup=args.warmup,
                  precision=args.precision, scale=args.scale, torch_device=args.torch_device,
                  backbone=args.backbone)
    block = []
    if args.jax:
      for impl in args.ifb_impl:
        block.append(run(Setting(framework="jax", impl=impl, deterministic=args.deterministic,
                                 ifb_products=(args.ifb_products if impl == "materialized"
                                               else "model"),
                                 ifb_gradient=args.ifb_gradient, **common)))
    if args.torch:
      for mode in args.torch_mode:
        for impl in args.ifb_impl:
          block.append(run(Setting(framework="torch", impl=TORCH_IMPL_FOR[impl], torch_mode=mode,
                                   **common)))
    # JAX/PT: against the eager PyTorch row of the matching IFB.
    torch_speed = {r["impl"]: r["images_per_s"] for r in block
                   if r["framework"] == "torch" and r["torch_mode"] == "eager" and "error" not in r}
    print(f"\nn_iter = {n_iter}")
    print(HEADER)
    for row in block:
      ratio = None
      if row["framework"] == "jax" and "error" not in row:
        reference = torch_speed.get(TORCH_IMPL_FOR[row["impl"]])
        if reference:
          ratio = row["images_per_s"] / reference
          row["jax_over_torch"] = ratio
      print(format_row(row, ratio), flush=True)
    rows.extend(block)

  done = [r for r in rows if "error" not in r]
  print()
  for framework in ("jax", "torch"):
    sample = next((r for r in done if r["framework"] == framework), None)
    if sample is not None:
      print(f"{'JAX' if framework == 'jax' else 'PyTorch'}: {sample['device']}; "
            f"{sample['num_params']:,} parameters; peak MiB = {sample['peak_kind']}")
  print("compile s: JAX lower + compile (PyTorch eager: 0); JAX/PT: JAX images/s over the "
        "PyTorch row of the matching IFB (materialized ~ materialized, streamed ~ sdpa); "
        "max RSS: the process's, " + ("one process per row" if args.isolate else
                                      "cumulative over this process (rows not isolated)"),
        flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0 if len(done) == len(rows) else 1


if __name__ == "__main__":
  sys.exit(main())
