"""Small building blocks shared by heads and distillation modules (NHWC)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch BatchNorm momentum 0.01 (the HRNet codebases) is flax momentum 0.99.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with the reference momentum/eps; `train` switches to batch statistics."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=dtype, name=name)


class ConvBNReLU(nn.Module):
  """Conv (no bias) + BatchNorm + ReLU. [B, H, W, Cin] -> [B, H/s, W/s, features]."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), strides=self.strides, padding=k // 2, use_bias=False,
                dtype=self.dtype, name="conv")(x)
    return nn.relu(batch_norm(train, self.dtype, name="bn")(x))


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 conv + BN), with a 1x1 projection when channels change.

  [B, H, W, Cin] -> [B, H, W, features].
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    residual = x
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="conv2")(y)
    y = batch_norm(train, self.dtype, name="bn2")(y)
    if x.shape[-1] != self.features:
      residual = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                         name="proj_conv")(x)
      residual = batch_norm(train, self.dtype, name="proj_bn")(residual)
    return nn.relu(y + residual)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of [B, H, W, C] to [B, size[0], size[1], C] (half-pixel centres).

  Matches PyTorch `F.interpolate(mode="bilinear", align_corners=False)` for upsampling, which is
  how every head and fuse step of the reference codebases resizes.
  """
  h, w = int(size[0]), int(size[1])
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear", antialias=False)


def fuse_hrnet_branches(branches: Sequence[jax.Array]) -> jax.Array:
  """Upsamples every HRNet branch to the first one's size and concatenates them.

  [B, H/4, W/4, 18], [B, H/8, W/8, 36], ... -> [B, H/4, W/4, sum(C)] (270 for HRNet-W18).
  """
  size = branches[0].shape[1:3]
  return jnp.concatenate([resize_bilinear(b, size) for b in branches], axis=-1)
