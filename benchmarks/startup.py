"""A new run's start: initialisation and train step compiled one after the other, or at once.

`train.train_and_evaluate` compiles a new run's train step on a thread of its own while it compiles
and runs the parameter initialisation (`train.initialise_while_compiling`). This script times both
ways, each in a fresh process without a compilation cache (nothing compiled is reused), the modes
alternating, `--repeats` times:

  sequential: `create_train_state`, then the step's compile (what the loop did before);
  overlapped: `initialise_while_compiling`.

Each process then runs one step with the compiled function on a random batch. Printed per run: the
initialisation (compile and run), the step's compile, the time until both were done, and the first
step; then the medians and their ratio.

  python -m benchmarks.startup                               # configs/demo.py (96x128)
  python -m benchmarks.startup --config configs/nyud_ifbC.py   # the paper's NYUD model, 480x640
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks import experiment_config

MODES = ("sequential", "overlapped")


def measure(config, mode: str) -> dict:
  """One start in this process: {"init_s", "step_compile_s", "ready_s", "first_step_s"}."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from benchmarks.train_step import random_batch
  from iterfuse_jax import train
  from iterfuse_jax.models import build_model
  # pylint: enable=g-import-not-at-top

  tasks = tuple(config.dataset.tasks)
  height, width = config.dataset.train_size
  mesh = train.create_mesh(1)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = build_model(config)
  schedule = train.create_learning_rate_schedule(config, 100)
  tx = train.create_optimizer(config, schedule)
  input_shape = (1, height, width, 3)
  abstract = train.abstract_train_state(config, model, tx, input_shape, mesh)
  jitted = train.jit_train_step(config, schedule, abstract, mesh)
  host_batch = random_batch(config.dataset.name, tasks, config.batch_size, height, width, 0)
  batch = {k: jax.device_put(v, data_sharding) for k, v in host_batch.items()}
  rng = jax.random.key(config.seed)

  start = time.perf_counter()
  if mode == "sequential":
    state = jax.block_until_ready(
        train.create_train_state(config, model, tx, rng, input_shape, mesh))
    init_s = time.perf_counter() - start
    compiled = jitted.lower(state, batch).compile()
    step_s = time.perf_counter() - start - init_s
  else:
    # Each part's own duration, from inside initialise_while_compiling (it returns when both
    # are done).
    ended = {}
    real_compile, real_create = train.compile_in_background, train.create_train_state

    def timed_compile(*args, **kwargs):
      future = real_compile(*args, **kwargs)
      future.add_done_callback(lambda _: ended.setdefault("step", time.perf_counter()))
      return future

    def timed_create(*args, **kwargs):
      state = jax.block_until_ready(real_create(*args, **kwargs))
      ended["init"] = time.perf_counter()
      return state

    train.compile_in_background, train.create_train_state = timed_compile, timed_create
    try:
      state, compiled = train.initialise_while_compiling(
          config, model, tx, rng, input_shape, mesh, jitted, abstract, batch)
    finally:
      train.compile_in_background, train.create_train_state = real_compile, real_create
    init_s, step_s = ended["init"] - start, ended["step"] - start
  ready_s = time.perf_counter() - start
  step_start = time.perf_counter()
  jax.block_until_ready(compiled(state, batch))
  return {"init_s": init_s, "step_compile_s": step_s, "ready_s": ready_s,
          "first_step_s": time.perf_counter() - step_start}


def _run_one(config_path: str, overrides: Sequence[str], mode: str) -> dict:
  """measure() in a fresh process without a compilation cache."""
  cmd = [sys.executable, "-m", "benchmarks.startup", "--config", config_path, "--child", mode]
  for item in overrides:
    cmd += ["--set", item]
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=experiment_config.REPO_ROOT,
                          env=env, check=False)
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    raise RuntimeError(f"the {mode} process failed (status {result.returncode}):\n"
                       f"{result.stderr[-3000:]}")
  return json.loads(lines[-1])


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  experiment_config.add_arguments(parser, default="configs/demo.py")
  parser.add_argument("--repeats", type=int, default=2, help="runs of each mode")
  parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(measure(experiment_config.load(args.config, args.set), args.child)))
    return 0
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  results = {mode: [] for mode in MODES}
  print(f"{args.config}: a fresh process per run, no compilation cache")
  print(f"{'mode':<11} {'init s':>7} {'step compile s':>15} {'both ready s':>13} "
        f"{'first step s':>13}")
  for _ in range(args.repeats):
    for mode in MODES:
      r = _run_one(args.config, args.set, mode)
      results[mode].append(r)
      print(f"{mode:<11} {r['init_s']:>7.1f} {r['step_compile_s']:>15.1f} {r['ready_s']:>13.1f} "
            f"{r['first_step_s']:>13.2f}", flush=True)
  sequential = statistics.median(r["ready_s"] for r in results["sequential"])
  overlapped = statistics.median(r["ready_s"] for r in results["overlapped"])
  print(f"median until the first step can run: sequential {sequential:.1f} s, overlapped "
        f"{overlapped:.1f} s ({sequential / overlapped:.2f}x, {sequential - overlapped:.1f} s "
        "saved)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
