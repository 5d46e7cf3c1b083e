"""HRNet backbones (HRNet-W18-Small-v2 and HRNet-W18) in Flax linen, NHWC.

The layer structure follows the original HRNet classification code, so that every backbone tensor
of the published ImageNet checkpoints (HRNet-Image-Classification, openmmlab, timm) has exactly one
home; `iterfuse_jax.models.hrnet_weights` maps the PyTorch names onto this module tree:

  conv1, bn1, conv2, bn2                      stem, two 3x3 stride-2 convs (stride 4 in all)
  layer1/block{k}                             stage 1 Bottlenecks (64 -> 256 channels)
  transition{t}/branch{i}[_down{j}]           channel change / new lower-resolution branch
  stage{s}/module{m}/branch{b}_block{k}       BasicBlocks of one branch of one module
  stage{s}/module{m}/fuse{i}_{j}[_down{k}]    fuse path from branch j into branch i

Only the backbone lives in `HRNet`; `HRNetClassifier` adds the ImageNet head (incre modules,
downsampling modules, final layer, classifier) for checking converted weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.layers import (BACKBONE_BN_MOMENTUM, BOTTLENECK_EXPANSION,
                                        BasicBlock, Bottleneck, batch_norm,
                                        resize_bilinear)

Dtype = Any

FUSE_UPSAMPLE_MODES = ("bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One multi-resolution stage: `num_modules` HR modules of BasicBlocks."""
  num_modules: int
  num_blocks: tuple[int, ...]
  channels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class HRNetSpec:
  """Depths and widths of an HRNet variant (stage 1 is Bottlenecks of `layer1_planes`)."""
  layer1_blocks: int
  stages: tuple[StageSpec, StageSpec, StageSpec]
  stem_width: int = 64
  layer1_planes: int = 64

  @property
  def out_channels(self) -> tuple[int, ...]:
    return self.stages[-1].channels


HRNET_VARIANTS: dict[str, HRNetSpec] = {
    # "HRNet18" of the MTL survey code and ATRC.
    "w18_small_v2": HRNetSpec(
        layer1_blocks=2,
        stages=(StageSpec(1, (2, 2), (18, 36)),
                StageSpec(3, (2, 2, 2), (18, 36, 72)),
                StageSpec(2, (2, 2, 2, 2), (18, 36, 72, 144)))),
    "w18": HRNetSpec(
        layer1_blocks=4,
        stages=(StageSpec(1, (4, 4), (18, 36)),
                StageSpec(4, (4, 4, 4), (18, 36, 72)),
                StageSpec(3, (4, 4, 4, 4), (18, 36, 72, 144)))),
    # Not a published network: W18's widths with one module of one block per branch and stage (a
    # quarter of W18-Small-v2's blocks). It compiles in a fraction of the time, for runs that
    # exercise the machinery rather than the accuracy: configs/demo.py:tiny and the tests.
    "w18_tiny": HRNetSpec(
        layer1_blocks=1,
        stages=(StageSpec(1, (1, 1), (18, 36)),
                StageSpec(1, (1, 1, 1), (18, 36, 72)),
                StageSpec(1, (1, 1, 1, 1), (18, 36, 72, 144)))),
}
# The variants with published ImageNet checkpoints (timm / the HRNet authors' releases).
PUBLISHED_VARIANTS = ("w18_small_v2", "w18")

# Channels of the ImageNet head's incre modules (Bottleneck planes; x4 after expansion).
CLASSIFIER_HEAD_PLANES = (32, 64, 128, 256)
CLASSIFIER_FEATURES = 2048


def hrnet_spec(variant: str) -> HRNetSpec:
  """The spec of an HRNet variant; raises a ValueError naming the allowed ones."""
  if variant not in HRNET_VARIANTS:
    raise ValueError(f"unknown HRNet variant {variant!r}; expected one of {sorted(HRNET_VARIANTS)}")
  return HRNET_VARIANTS[variant]


def check_fuse_upsample(mode: str) -> str:
  if mode not in FUSE_UPSAMPLE_MODES:
    raise ValueError(
        f"unknown HRNet fuse_upsample {mode!r}; expected one of {list(FUSE_UPSAMPLE_MODES)}")
  return mode


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest resize of [B, h, w, C] to [B, size[0], size[1], C] with PyTorch's 'nearest' rule.

  Output pixel o reads input pixel floor(o * in / out) (PyTorch's legacy nearest, which
  `nn.Upsample(scale_factor=2**k, mode="nearest")` in timm uses); integer factors are a repeat.
  """
  h, w = int(size[0]), int(size[1])
  for axis, out in ((1, h), (2, w)):
    n = x.shape[axis]
    if n == out:
      continue
    if out % n == 0:
      x = jnp.repeat(x, out // n, axis=axis)
    else:
      index = (jnp.arange(out) * n) // out
      x = jnp.take(x, index, axis=axis)
  return x


class ConvBN(nn.Module):
  """Conv + BatchNorm (+ ReLU). [B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), features].

  Padding is k // 2 on every side, as in PyTorch, so stride-2 convs give ceil(H / 2).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  relu: bool = True
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), strides=self.strides, padding=k // 2,
                use_bias=self.use_bias, dtype=self.dtype, name="conv")(x)
    x = batch_norm(train, self.dtype, name="bn", momentum=BACKBONE_BN_MOMENTUM)(x)
    return nn.relu(x) if self.relu else x


class Transition(nn.Module):
  """Between stages: adapts existing branches' channels and creates the new lower branches.

  A branch whose channels already match passes through; a new branch i is made from the last
  existing branch by stride-2 3x3 convs (`branch{i}_down{j}`), as in the reference code.
  """

  in_channels: tuple[int, ...]
  out_channels: tuple[int, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool) -> list[jax.Array]:
    num_in = len(self.in_channels)
    outs = []
    for i, channels in enumerate(self.out_channels):
      if i < num_in:
        x = xs[i]
        if self.in_channels[i] != channels:
          x = ConvBN(channels, 3, dtype=self.dtype, name=f"branch{i}")(x, train)
      else:
        x = xs[-1]
        num_down = i + 1 - num_in
        for j in range(num_down):
          features = channels if j == num_down - 1 else self.in_channels[-1]
          x = ConvBN(features, 3, strides=2, dtype=self.dtype, name=f"branch{i}_down{j}")(x, train)
      outs.append(x)
    return outs


class HighResolutionModule(nn.Module):
  """Parallel branches of BasicBlocks, then every output branch sums all inputs.

  Branch j enters output i through: a 1x1 conv + BN and an upsampling (j > i); identity (j == i);
  a chain of i - j stride-2 3x3 conv + BN (ReLU between, not after the last) (j < i). Each sum
  ends with a ReLU. Upsampling goes to the exact size of branch i, so any input size works.
  """

  num_blocks: tuple[int, ...]
  channels: tuple[int, ...]
  fuse_upsample: str = "bilinear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool) -> list[jax.Array]:
    n = len(self.channels)
    if len(xs) != n:
      raise ValueError(f"HighResolutionModule expects {n} branches, got {len(xs)}")
    branches = []
    for b in range(n):
      x = xs[b]
      for k in range(self.num_blocks[b]):
        x = BasicBlock(self.channels[b], bn_momentum=BACKBONE_BN_MOMENTUM, dtype=self.dtype,
                       name=f"branch{b}_block{k}")(x, train)
      branches.append(x)
    if n == 1:
      return branches

    resize = resize_bilinear if self.fuse_upsample == "bilinear" else resize_nearest
    outs = []
    for i in range(n):
      total = None
      for j in range(n):
        x = branches[j]
        if j > i:
          x = ConvBN(self.channels[i], 1, relu=False, dtype=self.dtype, name=f"fuse{i}_{j}")(
              x, train)
          x = resize(x, branches[i].shape[1:3])
        elif j < i:
          for k in range(i - j):
            last = k == i - j - 1
            x = ConvBN(self.channels[i] if last else self.channels[j], 3, strides=2,
                       relu=not last, dtype=self.dtype, name=f"fuse{i}_{j}_down{k}")(x, train)
        total = x if total is None else total + x
      outs.append(nn.relu(total))
    return outs


class HRStage(nn.Module):
  """`spec.num_modules` HighResolutionModules in sequence (named module0, module1, ...)."""

  spec: StageSpec
  fuse_upsample: str = "bilinear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool) -> list[jax.Array]:
    for m in range(self.spec.num_modules):
      xs = HighResolutionModule(self.spec.num_blocks, self.spec.channels, self.fuse_upsample,
                                dtype=self.dtype, name=f"module{m}")(xs, train)
    return list(xs)


class HRNet(nn.Module):
  """HRNet backbone returning its four branches.

  Attributes:
    variant: "w18_small_v2" (HRNet-W18-Small-v2, the survey code's "HRNet18"), "w18", or
      "w18_tiny" (unpublished, for quick runs and tests).
    fuse_upsample: how fuse layers upsample lower branches: "bilinear" to the exact size (the
      segmentation codebases) or "nearest" (HRNet classification code / timm; needed for parity
      with ImageNet-trained weights).
    dtype: computation dtype; parameters and batch statistics stay float32.

  Call: images [B, H, W, 3] -> [[B, H/4, W/4, 18], [B, H/8, W/8, 36], [B, H/16, W/16, 72],
  [B, H/32, W/32, 144]] in `dtype` (each stride-2 step rounds up, so any H, W >= 1 works).
  `train` uses batch statistics and updates `batch_stats` (apply with mutable=["batch_stats"]).
  """

  variant: str = "w18_small_v2"
  fuse_upsample: str = "bilinear"
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    # Fail where the model is built, not at the first call.
    hrnet_spec(self.variant)
    check_fuse_upsample(self.fuse_upsample)
    super().__post_init__()

  @property
  def spec(self) -> HRNetSpec:
    return hrnet_spec(self.variant)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"HRNet expects images [B, H, W, 3], got shape {tuple(images.shape)}")
    spec = self.spec
    x = images.astype(self.dtype)
    for i, width in ((1, spec.stem_width), (2, 64)):
      x = nn.Conv(width, (3, 3), strides=2, padding=1, use_bias=False, dtype=self.dtype,
                  name=f"conv{i}")(x)
      x = nn.relu(batch_norm(train, self.dtype, name=f"bn{i}",
                              momentum=BACKBONE_BN_MOMENTUM)(x))

    for k in range(spec.layer1_blocks):
      x = Bottleneck(spec.layer1_planes, bn_momentum=BACKBONE_BN_MOMENTUM, dtype=self.dtype,
                     name=f"layer1_block{k}")(x, train)

    xs = [x]
    channels = (spec.layer1_planes * BOTTLENECK_EXPANSION,)
    for s, stage in enumerate(spec.stages, start=2):
      xs = Transition(channels, stage.channels, dtype=self.dtype, name=f"transition{s - 1}")(
          xs, train)
      xs = HRStage(stage, self.fuse_upsample, dtype=self.dtype, name=f"stage{s}")(xs, train)
      channels = stage.channels
    return [x.astype(self.dtype) for x in xs]


class HRNetClassifier(nn.Module):
  """HRNet with the ImageNet classification head, for checking converted weights.

  Each branch goes through a Bottleneck (`incre{i}`, to 128/256/512/1024 channels); from the
  highest resolution down, the running sum is downsampled (`downsamp{i}`: 3x3 stride-2 conv with
  bias + BN + ReLU) and added to the next branch; then `final_layer` (1x1 conv to 2048 with bias +
  BN + ReLU), global average pooling and the linear `classifier`.

  Call: images [B, H, W, 3] (ImageNet-normalised) -> logits [B, num_classes] float32.
  """

  variant: str = "w18_small_v2"
  fuse_upsample: str = "nearest"
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    branches = HRNet(self.variant, self.fuse_upsample, dtype=self.dtype, name="backbone")(
        images, train=train)
    y = None
    for i, x in enumerate(branches):
      x = Bottleneck(CLASSIFIER_HEAD_PLANES[i], bn_momentum=BACKBONE_BN_MOMENTUM,
                     dtype=self.dtype, name=f"incre{i}")(x, train)
      if y is not None:
        y = ConvBN(CLASSIFIER_HEAD_PLANES[i] * BOTTLENECK_EXPANSION, 3, strides=2, use_bias=True,
                   dtype=self.dtype, name=f"downsamp{i - 1}")(y, train)
        x = x + y
      y = x
    y = ConvBN(CLASSIFIER_FEATURES, 1, use_bias=True, dtype=self.dtype, name="final_layer")(
        y, train)
    pooled = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(pooled)
