"""Reproducible runs on a GPU: the XLA options that a run's jitted functions are compiled with.

On a CPU, XLA's kernels are deterministic: the tests check that a killed and resumed run ends bit
for bit where an uninterrupted one ends. A GPU run loses that by default, for two reasons:

* autotuning: every process times candidate cuDNN / cuBLAS / Triton kernels for each convolution
  and matmul and keeps the fastest. Timing noise can make a resumed process pick another kernel
  than the first process did, and another kernel sums in another order;
* atomics: some kernels (scatter-adds, some convolution backward algorithms) accumulate in an
  order that changes from call to call.

`config.deterministic = True` compiles every jitted function of the run with XLA's
`xla_gpu_deterministic_ops`. Kernels are then chosen by heuristics instead of timings, so every
process chooses the same ones, and scatter, convolutions and attention use deterministic
implementations. It costs speed: `benchmarks/gpu_check.py --groups determinism` measures how much,
and whether reruns agree without it. On a CPU the option changes nothing.

XLA cannot compile select-and-scatter (the gradient of `max_pool`) deterministically, so no
model here uses it in a training step (`models.layers.max_pool_first`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

# XLA debug options (flag names without "--"), passed to `jax.jit(compiler_options=...)`.
DETERMINISTIC_GPU_OPTIONS = {"xla_gpu_deterministic_ops": True}


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """`jax.jit`'s compiler_options for a run's config: the deterministic options, or None.

  Configs written before the option existed (a workdir's config.json) have no
  `deterministic` key; they ran with XLA's defaults.
  """
  deterministic = config.get("deterministic", False)
  if not isinstance(deterministic, bool):
    raise ValueError(f"config.deterministic must be True or False, got {deterministic!r}")
  return dict(DETERMINISTIC_GPU_OPTIONS) if deterministic else None
