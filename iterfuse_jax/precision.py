"""The one rule for where computations widen: reductions, softmax and losses run in at least float32.

With bfloat16 activations (`model.dtype="bfloat16"`) they run in float32; with float64 activations
(`model.dtype="float64"` under `jax.enable_x64`, used to check the network's arithmetic against a
float64 PyTorch reference) they stay in float64 instead of being narrowed to float32.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def accumulation_dtype(dtype: Any) -> Any:
  """float32 for bfloat16 / float16 / float32 inputs, float64 for float64 ones."""
  return jnp.promote_types(dtype, jnp.float32)
