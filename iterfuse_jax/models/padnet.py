"""PAD-Net (Xu et al., CVPR 2018) as the MTL survey code builds it on HRNet18.

  backbone -> fuse (upsample the 4 branches, concat to 270 channels, 1x1 conv with bias + BN + ReLU)
           -> per task an initial module: 2 Bottlenecks to `channels` (256) -> task features, and a
              1x1 conv (with bias) -> the intermediate prediction (deeply supervised)
           -> multi-modal distillation: out_t = f_t + sum_{a != t} SA_{a->t}(f_a)
           -> per task a head: 2 Bottlenecks + 1x1 conv (with bias) -> logits, resized to the input

`SA(f) = F_s(f) * sigmoid(F_m(f))` (3x3 convs without bias or BN) is the same block as the
self-attention branch of IterFuse's CIB; MTI-Net reuses the distillation at every scale.

The paper describes its baselines as "replace TPIM with the distillation module" (Sec. 4.1); the
survey code, whose numbers the paper's PAD-Net row follows, gives PAD-Net its own fuse layer,
Bottleneck initial modules and Bottleneck heads. This module follows the survey code.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.cross_task import SpatialSelfAttention
from iterfuse_jax.models.layers import (BOTTLENECK_EXPANSION, Bottleneck, Dtype, batch_norm,
                                        fuse_hrnet_branches, resize_bilinear)
from iterfuse_jax.models.network import Outputs, check_images
from iterfuse_jax.precision import accumulation_dtype

PADNET_CHANNELS = 256  # the survey's intermediate_channels


def check_task_features(features: Mapping[str, jax.Array], tasks: Sequence[str], channels: int,
                        module: str) -> None:
  """Raises a ValueError unless `features` has one [B, h, w, channels] map per task, same shape."""
  missing = [t for t in tasks if t not in features]
  if missing:
    raise ValueError(f"{module} got features for {sorted(features)}, missing tasks {missing}")
  shapes = {t: tuple(features[t].shape) for t in tasks}
  first = shapes[tasks[0]]
  if len(first) != 4 or first[-1] != channels or any(s != first for s in shapes.values()):
    raise ValueError(f"{module} expects one [B, h, w, {channels}] map per task, all the same "
                     f"shape; got {shapes}")


class PADNetDistillation(nn.Module):
  """PAD-Net distillation: out_t = f_t + sum_{a != t} SA_{a->t}(f_a).

  Attributes:
    tasks: task names, in a fixed order.
    channels: C of the task features (input and output).
    dtype: computation dtype.

  Call: {task: [B, h, w, C]} -> {task: [B, h, w, C]}. The blocks are named `sa_<a>_to_<t>`;
  with a single task the module is the identity and has no parameters.
  """

  tasks: Sequence[str]
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool = False
               ) -> dict[str, jax.Array]:
    del train  # no BatchNorm in the SA blocks
    tasks = tuple(self.tasks)
    check_task_features(features, tasks, self.channels, "PADNetDistillation")
    out = {}
    for target in tasks:
      total = features[target]
      for source in tasks:
        if source == target:
          continue
        block = SpatialSelfAttention(self.channels, dtype=self.dtype,
                                     name=f"sa_{source}_to_{target}")
        total = total + block(features[source])
      out[target] = total
    return out


class HRNetFuse(nn.Module):
  """The survey's `HighResolutionFuse`: HRNet branches -> one map at stride 4.

  Upsamples branches 2-4 bilinearly to branch 1's size, concatenates (270 channels for HRNet18)
  and applies a 1x1 conv with bias + BN + ReLU keeping the channel count.
  [B, H/4, W/4, 18], ... -> [B, H/4, W/4, 270].
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, branches: Sequence[jax.Array], train: bool) -> jax.Array:
    x = fuse_hrnet_branches(branches)
    x = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="conv")(x)
    return nn.relu(batch_norm(train, self.dtype, name="bn")(x))


class BottleneckStack(nn.Module):
  """Two Bottlenecks to `channels` (planes = channels / 4), then optionally a 1x1 conv with bias.

  [B, h, w, Cin] -> features [B, h, w, channels] and, when `num_outputs`, the conv's
  [B, h, w, num_outputs].
  """

  channels: int
  num_outputs: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    if self.channels % BOTTLENECK_EXPANSION:
      raise ValueError(f"PAD-Net channels must be a multiple of {BOTTLENECK_EXPANSION}, got "
                       f"{self.channels}")
    planes = self.channels // BOTTLENECK_EXPANSION
    for i in range(2):
      x = Bottleneck(planes, dtype=self.dtype, name=f"block{i}")(x, train)
    out = None
    if self.num_outputs:
      out = nn.Conv(self.num_outputs, (1, 1), dtype=self.dtype, name="predict")(x)
    return x, out


class PADNet(nn.Module):
  """PAD-Net on an HRNet backbone (see the module docstring).

  Attributes:
    tasks: task names, in a fixed order.
    num_outputs: output channels per task.
    backbone: a module mapping [B, H, W, 3] to HRNet's 4 branches, the first at stride 4.
    channels: width of the task features (the survey's 256; a multiple of 4).
    dtype: computation dtype (parameters stay float32); outputs are float32 (float64 for float64).

  Call: images [B, H, W, 3] -> {"initial": {task: [B, H, W, C_task]}, "final": {...}}, logits at
  the input resolution. Modules: `backbone`, `fuse`, `initial_<t>`, `distillation`, `head_<t>`.
  """

  tasks: Sequence[str]
  num_outputs: Mapping[str, int]
  backbone: nn.Module
  channels: int = PADNET_CHANNELS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> Outputs:
    check_images(images)
    tasks = tuple(self.tasks)
    size = images.shape[1:3]

    def to_output(logits):
      return resize_bilinear(logits, size).astype(accumulation_dtype(self.dtype))

    shared = HRNetFuse(dtype=self.dtype, name="fuse")(
        self.backbone(images.astype(self.dtype), train=train), train)
    features, initial = {}, {}
    for t in tasks:
      features[t], prediction = BottleneckStack(
          self.channels, self.num_outputs[t], dtype=self.dtype, name=f"initial_{t}")(shared, train)
      initial[t] = to_output(prediction)
    distilled = PADNetDistillation(tasks, self.channels, dtype=self.dtype,
                                   name="distillation")(features, train)
    final = {}
    for t in tasks:
      _, logits = BottleneckStack(self.channels, self.num_outputs[t], dtype=self.dtype,
                                  name=f"head_{t}")(distilled[t], train)
      final[t] = to_output(logits)
    return {"initial": initial, "final": final}
