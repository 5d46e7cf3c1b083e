"""PyTorch's default initialisation of convolution and linear layers, applied to a parameter tree.

The survey code's heads, initial modules and distillation blocks are `nn.Conv2d` / `nn.Linear`
layers left at PyTorch's defaults: kernel ~ U(-b, b) (kaiming-uniform with a = sqrt(5)) and bias ~
U(-b, b), both with b = 1 / sqrt(fan_in); BatchNorm scale 1 and bias 0. Flax's defaults differ
(lecun-normal kernels, zero biases). `pytorch_default_init` redraws every conv / dense layer of a
parameter tree outside the backbone with PyTorch's rule, so training starts from the distribution
the reference numbers started from. The backbone is left alone: it is either loaded from ImageNet
weights or, when trained from scratch, keeps its own initialisation. So are ATRC's context blocks,
which draw xavier-uniform kernels in ATRC's code as here (`OWN_INIT_PREFIXES`).

A layer is a mapping that holds a "kernel" ([kh, kw, C_in, C_out] convolution or [C_in, C_out]
dense) and optionally a "bias"; BatchNorm layers ("scale", "bias") and scalars such as the IFB's
alpha are not layers in this sense and keep their values.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from iterfuse_jax.models.atrc import CONTEXT_BLOCK_PREFIX

PyTree = Any
INIT_SCHEMES = ("flax", "pytorch")


def fan_in(kernel_shape: Sequence[int]) -> int:
  """Inputs feeding one output unit: kh * kw * C_in for a conv kernel, C_in for a dense one."""
  if len(kernel_shape) < 2:
    raise ValueError(f"a kernel has at least 2 dimensions, got shape {tuple(kernel_shape)}")
  return math.prod(kernel_shape[:-1])


def pytorch_uniform_bound(kernel_shape: Sequence[int]) -> float:
  """b = 1 / sqrt(fan_in): the half-width of PyTorch's default kernel and bias distributions."""
  return 1.0 / math.sqrt(fan_in(kernel_shape))


def _path_key(rng: jax.Array, path: tuple[str, ...]) -> jax.Array:
  # A stable per-layer key: the same tree and rng always give the same weights.
  return jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))


# Sub-trees whose modules draw their own initialisation, as their reference code does: ATRC's
# context blocks (models/atrc.py, xavier-uniform).
OWN_INIT_PREFIXES = (CONTEXT_BLOCK_PREFIX,)


def pytorch_default_init(params: Mapping[str, Any], rng: jax.Array,
                         exclude: Sequence[str] = ("backbone",),
                         exclude_prefixes: Sequence[str] = OWN_INIT_PREFIXES) -> dict[str, Any]:
  """Returns `params` with every conv / dense layer outside `exclude` redrawn PyTorch's way.

  Args:
    params: a flax "params" tree.
    rng: key the new weights are drawn from (each layer folds in a hash of its path).
    exclude: names of sub-trees left as they are, wherever they sit (default: every "backbone",
      also the per-task backbones of the STL network).
    exclude_prefixes: sub-trees whose name starts with one of these are left as they are too.

  Returns:
    A new tree of the same structure, shapes and dtypes.
  """

  def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for name, value in node.items():
      if isinstance(value, Mapping):
        kept = name in exclude or name.startswith(tuple(exclude_prefixes))
        out[name] = dict(value) if kept else visit(value, path + (name,))
      else:
        out[name] = value
    kernel = node.get("kernel")
    if kernel is not None and not isinstance(kernel, Mapping) and jnp.ndim(kernel) in (2, 4):
      bound = pytorch_uniform_bound(jnp.shape(kernel))
      kernel_key, bias_key = jax.random.split(_path_key(rng, path))
      out["kernel"] = jax.random.uniform(kernel_key, jnp.shape(kernel), jnp.float32, -bound,
                                         bound).astype(jnp.result_type(kernel))
      bias = node.get("bias")
      if bias is not None and not isinstance(bias, Mapping):
        out["bias"] = jax.random.uniform(bias_key, jnp.shape(bias), jnp.float32, -bound,
                                         bound).astype(jnp.result_type(bias))
    return out

  return visit(params, ())


def initialize_params(params: Mapping[str, Any], rng: jax.Array, scheme: str) -> PyTree:
  """Applies the config's `model.init` scheme: "flax" (as initialised) or "pytorch"."""
  if scheme not in INIT_SCHEMES:
    raise ValueError(f"unknown model.init {scheme!r}; expected one of {list(INIT_SCHEMES)}")
  if scheme == "flax":
    return params
  return pytorch_default_init(params, rng)
