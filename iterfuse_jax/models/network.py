"""The multi-task dense prediction network: backbone -> initial modules -> distillation -> heads.

IterFuse is this network with the TPIM as distillation module; the paper's baselines swap that
module (PAD-Net, ...) or drop the initial modules and distillation (MTL).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.heads import InitialTaskModule, TaskHead
from iterfuse_jax.models.layers import Dtype, fuse_hrnet_branches, resize_bilinear
from iterfuse_jax.precision import accumulation_dtype

Outputs = dict[str, dict[str, jax.Array]]


def check_images(images: jax.Array) -> None:
  """Raises a ValueError unless `images` is an NHWC batch of RGB images."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"images must be [B, H, W, 3] (NHWC RGB), got shape {tuple(images.shape)}")


class MultiTaskDenseNet(nn.Module):
  """Shared backbone, optional initial task modules and distillation, per-task final heads.

  Attributes:
    tasks: task names, in a fixed order.
    num_outputs: output channels per task.
    backbone: a module mapping [B, H, W, 3] to a list of feature maps, the first at stride 4
      (HRNet's four branches); they are upsampled to stride 4 and concatenated.
    distillation: a module mapping {task: [B, h, w, C]} to {task: [B, h, w, C]} (the TPIM for
      IterFuse), or None for no cross-task exchange. Needs `use_initial`. One whose class has
      `uses_shared_features = True` (ATRC's) is also given the shared features and returns
      (features, {level: {task: [B, h, w, K]}}): more supervised outputs, resized to the input
      like the others.
    use_initial: whether per-task initial modules produce task features and intermediate
      (deeply supervised) predictions; False feeds the shared features straight to the heads (MTL).
    task_channels: C of the task features made by the initial modules.
    initial_blocks: residual blocks per initial module.
    dtype: computation dtype of the heads (parameters stay float32); outputs are float32 (float64 for float64).

  Call: images [B, H, W, 3] -> {"initial": {task: [B, H, W, C_task]} (when use_initial),
  the distillation's extra levels (ATRC's "aux"), "final": {task: [B, H, W, C_task]}}, logits
  at the input resolution.
  """

  tasks: Sequence[str]
  num_outputs: Mapping[str, int]
  backbone: nn.Module
  distillation: nn.Module | None = None
  use_initial: bool = True
  task_channels: int = 270
  initial_blocks: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> Outputs:
    check_images(images)
    if self.distillation is not None and not self.use_initial:
      raise ValueError("a distillation module needs the initial task modules (use_initial=True)")
    size = images.shape[1:3]
    shared = fuse_hrnet_branches(self.backbone(images.astype(self.dtype), train=train))

    def to_output(logits):
      return resize_bilinear(logits, size).astype(accumulation_dtype(self.dtype))

    outputs: Outputs = {}
    if self.use_initial:
      features, initial = {}, {}
      for task in self.tasks:
        module = InitialTaskModule(self.task_channels, self.num_outputs[task],
                                   num_blocks=self.initial_blocks, dtype=self.dtype,
                                   name=f"initial_{task}")
        features[task], prediction = module(shared, train)
        initial[task] = to_output(prediction)
      outputs["initial"] = initial
    else:
      features = {task: shared for task in self.tasks}

    if getattr(self.distillation, "uses_shared_features", False):
      features, extra = self.distillation(features, shared, train=train)
      for level, logits in extra.items():
        outputs[level] = {task: to_output(x) for task, x in logits.items()}
    elif self.distillation is not None:
      features = self.distillation(features, train=train)

    outputs["final"] = {
        task: to_output(TaskHead(features[task].shape[-1], self.num_outputs[task],
                                 dtype=self.dtype, name=f"head_{task}")(features[task], train))
        for task in self.tasks
    }
    return outputs
