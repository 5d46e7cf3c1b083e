"""Memory and time of one CIB forward+backward: materialized IFB (stacked or autodiff backward)
vs streamed IFB.

One Cross-task Interaction Block (train mode) at the paper's NYUD shape: task features of C = 270
channels, average-pooled by sc = 2 to an M-position grid, n_iter = 18, IFB C, batch 1. The step is
the gradient of a scalar loss with respect to the block's parameters and both input feature maps.
For each implementation and grid it prints

  * XLA's compile-time memory analysis: temp (scratch) bytes, argument and output bytes, and their
    sum (the step's peak device memory as XLA plans it);
  * a measured peak over the first run of the compiled step: on a GPU the allocator's
    peak_bytes_in_use (arguments included), on the CPU the peak resident set size during the run
    minus the resident set size just before it (a sampling thread; counts the pages the run
    touched, so it can be below XLA's plan, and includes the runtime's one-off allocations);
  * compile time and the median time of the step over --repeats runs after the first.

Each setting runs in a fresh subprocess (so one setting's peak is not another's), unless
--no-isolate. Full run (grids 64x64 -> M = 4096 and 60x80 -> M = 4800, the NYUD 480x640 input):

  python -m benchmarks.ifb_memory
  python -m benchmarks.ifb_memory --grids 8x8 --channels 16 --n-iter 2 --repeats 1 --no-isolate
  python -m benchmarks.ifb_memory --part ifb      # the IFB alone, from Q, K, V
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

# "materialized-autodiff": the materialized IFB with JAX's derivative of its loop
# (model.tpim.ifb_gradient="autodiff"), the before of the stacked backward.
IMPLEMENTATIONS = ("materialized", "materialized-autodiff", "streamed")
PARTS = ("cib", "ifb")
MiB = 2 ** 20


def _parse_grid(text: str) -> tuple[int, int]:
  try:
    h, w = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"grid must look like 60x80, got {text!r}") from None
  if h < 1 or w < 1:
    raise argparse.ArgumentTypeError(f"grid sides must be positive, got {text!r}")
  return h, w


def _rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
  """Samples the resident set size in a thread while the block runs (XLA releases the GIL)."""

  def __init__(self, interval_s: float = 0.002):
    self._interval_s = interval_s
    self._stop = threading.Event()
    self.peak = 0
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self._interval_s)

  def __enter__(self):
    self.peak = _rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())


def _build_step(part: str, impl: str, grid: tuple[int, int], channels: int, n_iter: int,
                scale: int, batch: int):
  """Returns (jitted step, its arguments). The step returns the loss and all gradients."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from iterfuse_jax.models import cross_task
  from iterfuse_jax.models.iterative_fusion import iterative_fusion
  from iterfuse_jax.models.streamed_fusion import streamed_iterative_fusion
  # pylint: enable=g-import-not-at-top

  h, w = grid
  keys = jax.random.split(jax.random.key(0), 4)
  gradient = "autodiff" if impl == "materialized-autodiff" else "stacked"
  if part == "ifb":
    m = h * w
    q, k, v = (jax.random.normal(key, (batch, m, channels), jnp.float32) for key in keys[:3])
    alpha = jnp.float32(0.3)

    def loss(q, k, v, alpha):
      if impl == "streamed":
        out = streamed_iterative_fusion(q, k, v, alpha, n_iter, "C")
      else:
        out = iterative_fusion(cross_task.affinity_matrix(q, k), v, alpha, n_iter, "C",
                               gradient=gradient)
      return jnp.sum(out * jnp.cos(out))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), (q, k, v, alpha)

  block = cross_task.CrossTaskInteractionBlock(channels=channels, scale=scale, variant="C",
                                               n_iter=n_iter, ifb_gradient=gradient,
                                               ifb_impl=impl.split("-")[0])
  shape = (batch, h * scale, w * scale, channels)
  f_s = jax.random.normal(keys[0], shape, jnp.float32)
  f_t = jax.random.normal(keys[1], shape, jnp.float32)
  variables = jax.jit(lambda a, b: block.init(keys[2], a, b, train=False))(f_s, f_t)

  def loss(params, batch_stats, f_s, f_t):
    out, _ = block.apply({"params": params, "batch_stats": batch_stats}, f_s, f_t, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out * jnp.cos(out))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3)))
  return step, (variables["params"], variables["batch_stats"], f_s, f_t)


def measure(part: str, impl: str, grid: tuple[int, int], channels: int, n_iter: int, scale: int,
            batch: int, repeats: int) -> dict:
  """Compiles and runs one setting in this process; returns its figures (bytes and seconds)."""
  import jax  # pylint: disable=g-import-not-at-top

  step, args = _build_step(part, impl, grid, channels, n_iter, scale, batch)
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  device = jax.devices()[0]

  # The peak is taken over the first run: later runs may reuse buffers the runtime kept.
  jax.block_until_ready(args)
  rss_before = _rss_bytes()
  with _PeakRss() as rss:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - start
  stats = device.memory_stats() or {}
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)

  xla_total = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
               + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  if "peak_bytes_in_use" in stats:
    measured, measured_kind = stats["peak_bytes_in_use"], f"{device.platform} peak_bytes_in_use"
  else:
    measured, measured_kind = rss.peak - rss_before, "peak RSS during the step - RSS before"
  return {
      "part": part, "impl": impl, "grid": list(grid), "m": grid[0] * grid[1],
      "channels": channels, "n_iter": n_iter, "batch": batch, "device": str(device),
      "temp_bytes": analysis.temp_size_in_bytes,
      "argument_bytes": analysis.argument_size_in_bytes,
      "output_bytes": analysis.output_size_in_bytes,
      "xla_total_bytes": xla_total,
      "measured_bytes": measured, "measured_kind": measured_kind,
      "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "compile_s": compile_s, "first_step_s": first_s,
      "step_s": statistics.median(times) if times else first_s,
  }


def _measure_in_subprocess(settings: dict) -> dict:
  env = dict(os.environ)
  repo_root = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "benchmarks.ifb_memory", "--_child", json.dumps(settings)]
  done = subprocess.run(cmd, env=env, cwd=repo_root, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(
        f"setting {settings} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _format_row(r: dict) -> str:
  return (f"{r['part']:4s} {r['impl']:21s} {r['grid'][0]:>3d}x{r['grid'][1]:<3d} {r['m']:>6d} "
          f"{r['temp_bytes'] / MiB:>10.1f} {r['argument_bytes'] / MiB:>9.1f} "
          f"{r['output_bytes'] / MiB:>9.1f} {r['xla_total_bytes'] / MiB:>10.1f} "
          f"{r['measured_bytes'] / MiB:>12.1f} {r['compile_s']:>9.1f} {r['step_s']:>9.3f}")


HEADER = (f"{'part':4s} {'impl':21s} {'grid':7s} {'M':>6s} {'temp MiB':>10s} {'args MiB':>9s} "
          f"{'out MiB':>9s} {'XLA total':>10s} {'measured MiB':>12s} {'compile s':>9s} "
          f"{'step s':>9s}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ifb_memory",
                                   description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--grids", type=_parse_grid, nargs="+", default=[(64, 64), (60, 80)],
                      help="pooled grids HxW (M = H*W positions); inputs are sc times larger")
  parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
  parser.add_argument("--part", choices=PARTS, default="cib",
                      help="cib: the whole block; ifb: the IFB alone from Q, K, V")
  parser.add_argument("--channels", type=int, default=270, help="C (and d)")
  parser.add_argument("--n-iter", type=int, default=18)
  parser.add_argument("--scale", type=int, default=2, help="sc, the CIB's pooling factor")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=1,
                      help="timed steps after the first (0: time the first)")
  parser.add_argument("--no-isolate", action="store_true",
                      help="run every setting in this process (faster; peaks less separable)")
  parser.add_argument("--json", default="", help="also write the rows to this file")
  parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args._child:  # pylint: disable=protected-access
    settings = json.loads(args._child)  # pylint: disable=protected-access
    settings["grid"] = tuple(settings["grid"])
    print(json.dumps(measure(**settings)))
    return 0

  print(f"one {args.part.upper()} forward+backward: C={args.channels}, n_iter={args.n_iter}, "
        f"IFB C, batch {args.batch}, sc={args.scale}")
  print(HEADER, flush=True)
  rows = []
  for grid in args.grids:
    for impl in args.impls:
      settings = dict(part=args.part, impl=impl, grid=grid, channels=args.channels,
                      n_iter=args.n_iter, scale=args.scale, batch=args.batch,
                      repeats=args.repeats)
      row = measure(**settings) if args.no_isolate else _measure_in_subprocess(settings)
      rows.append(row)
      print(_format_row(row), flush=True)
  print(f"device: {rows[0]['device']}; measured = {rows[0]['measured_kind']}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
