"""Small building blocks shared by the backbone, heads and distillation modules (NHWC).

BatchNorm follows PyTorch's semantics, because every reference number this project is compared with
was produced by PyTorch code: batch statistics in training (biased variance for normalising), running
statistics updated with the *unbiased* batch variance, `momentum` in flax's convention
(running = momentum * running + (1 - momentum) * batch, i.e. 1 - PyTorch's momentum). The momenta
are per module, as in the survey code: its HRNet backbone uses PyTorch momentum 0.01
(`BACKBONE_BN_MOMENTUM` = 0.99 here), its heads, initial modules and blocks PyTorch's default 0.1
(`HEAD_BN_MOMENTUM` = 0.9 here).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.precision import accumulation_dtype
Dtype = Any

# flax convention: running = momentum * running + (1 - momentum) * batch statistic.
BACKBONE_BN_MOMENTUM = 0.99  # PyTorch momentum 0.01 (HRNet's BN_MOMENTUM in the reference code)
HEAD_BN_MOMENTUM = 0.9  # PyTorch's default momentum 0.1 (the survey's heads and blocks)
BN_EPSILON = 1e-5
BOTTLENECK_EXPANSION = 4


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running-variance update.

  Variables: params "scale" (init 1, or `scale_init`) and "bias" (init 0), batch_stats "mean"
  (init 0) and "var" (init 1), all float32, [C] (the names of flax's nn.BatchNorm, so checkpoints and the ImageNet
  converter see the same tree).

  Attributes:
    use_running_average: normalise with the running statistics (evaluation) instead of the
      batch's (training, which also updates the running statistics unless initialising).
    momentum: flax convention (see the module docstring).
    epsilon: added to the variance.
    dtype: dtype of the output; statistics and normalisation are computed in at least float32.
    scale_init: initialiser of "scale" (zeros for a branch that must start switched off, as
      ATRC's output projection).

  Call: [..., C] -> [..., C]. Under `jax.jit` with the batch sharded over devices, the means are
  global-batch means (XLA inserts the cross-device reductions).
  """

  use_running_average: bool = False
  momentum: float = HEAD_BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    xf = x.astype(accumulation_dtype(x.dtype))
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=axes)
      # Two passes (not E[x^2] - E[x]^2): the same statistics as PyTorch's, to float rounding.
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if not self.is_initializing():
        count = math.prod(x.shape[:-1])
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = m * running_mean.value + (1.0 - m) * mean
        running_var.value = m * running_var.value + (1.0 - m) * unbiased
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


def batch_norm(train: bool, dtype: Dtype, name: str | None = None,
               momentum: float = HEAD_BN_MOMENTUM) -> BatchNorm:
  """A `BatchNorm` that uses batch statistics when `train`, running statistics otherwise."""
  return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=BN_EPSILON,
                   dtype=dtype, name=name)


class ConvBNReLU(nn.Module):
  """Conv (no bias) + BatchNorm + ReLU. [B, H, W, Cin] -> [B, H/s, W/s, features]."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  bn_momentum: float = HEAD_BN_MOMENTUM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), strides=self.strides, padding=k // 2, use_bias=False,
                dtype=self.dtype, name="conv")(x)
    return nn.relu(batch_norm(train, self.dtype, name="bn", momentum=self.bn_momentum)(x))


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 conv + BN), with a 1x1 projection when channels change.

  [B, H, W, Cin] -> [B, H, W, features].
  """

  features: int
  bn_momentum: float = HEAD_BN_MOMENTUM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    def bn(name):
      return batch_norm(train, self.dtype, name=name, momentum=self.bn_momentum)

    residual = x
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="conv2")(y)
    y = bn("bn2")(y)
    if x.shape[-1] != self.features:
      residual = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                         name="proj_conv")(x)
      residual = bn("proj_bn")(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """ResNet bottleneck (1x1, 3x3 with the stride, 1x1 to 4x planes), projection when needed.

  [B, H, W, Cin] -> [B, H/s, W/s, 4 * planes]. HRNet's stage 1 and the survey's PAD-Net modules.
  """

  planes: int
  strides: int = 1
  bn_momentum: float = HEAD_BN_MOMENTUM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_features = self.planes * BOTTLENECK_EXPANSION

    def conv(features, k, strides, name):
      return nn.Conv(features, (k, k), strides=strides, padding=k // 2, use_bias=False,
                     dtype=self.dtype, name=name)

    def bn(name):
      return batch_norm(train, self.dtype, name=name, momentum=self.bn_momentum)

    y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, "conv1")(x)))
    y = nn.relu(bn("bn2")(conv(self.planes, 3, self.strides, "conv2")(y)))
    y = bn("bn3")(conv(out_features, 1, 1, "conv3")(y))
    residual = x
    if self.strides != 1 or x.shape[-1] != out_features:
      residual = bn("downsample_bn")(conv(out_features, 1, self.strides, "downsample_conv")(x))
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


def max_pool_first(x: jax.Array, window: int) -> jax.Array:
  """Max pooling over non-overlapping window x window tiles ("VALID": a remainder is dropped).

  [B, H, W, C] -> [B, H // window, W // window, C]. The same values as
  `flax.linen.max_pool(x, (window, window), strides=(window, window), padding="VALID")` and the
  same gradient: all of a tile's gradient goes to its first maximum in row-major order, also when
  several elements tie (the many zeros after a ReLU), as in XLA's select-and-scatter and
  PyTorch's `max_pool2d`. Its gradient has no select-and-scatter, which XLA cannot compile with
  deterministic GPU kernels (`iterfuse_jax.determinism`); it is a one-hot select instead.
  """
  b, h, w, c = x.shape
  ho, wo = h // window, w // window
  if ho == 0 or wo == 0:
    raise ValueError(f"max_pool_first: a {window}x{window} window does not fit the input's "
                     f"{h}x{w} grid")
  tiles = x[:, :ho * window, :wo * window].reshape(b, ho, window, wo, window, c)
  tiles = tiles.transpose(0, 1, 3, 5, 2, 4).reshape(b, ho, wo, c, window * window)
  # argmax returns the first maximum; the index carries no gradient.
  first = jax.lax.stop_gradient(jnp.argmax(tiles, axis=-1))
  chosen = jnp.arange(window * window) == first[..., None]
  return jnp.sum(jnp.where(chosen, tiles, jnp.zeros((), x.dtype)), axis=-1)


def fuse_hrnet_branches(branches: Sequence[jax.Array]) -> jax.Array:
  """Upsamples every HRNet branch to the first one's size and concatenates them.

  [B, H/4, W/4, 18], [B, H/8, W/8, 36], ... -> [B, H/4, W/4, sum(C)] (270 for HRNet-W18).
  """
  size = branches[0].shape[1:3]
  return jnp.concatenate([resize_bilinear(b, size) for b in branches], axis=-1)
