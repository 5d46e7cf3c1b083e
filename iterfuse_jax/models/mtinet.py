"""MTI-Net (Vandenhende et al., ECCV 2020): multi-scale task interaction, as in the MTL survey code.

On each of the backbone's four scales (HRNet: strides 4/8/16/32 with 18/36/72/144 channels),
from coarse to fine:
  1. initial task modules (2 residual blocks + 1x1 conv) turn the scale's backbone features,
     concatenated with the (bilinearly upsampled) propagated task features of the coarser scale,
     into task features with the scale's channel count and an intermediate prediction;
  2. a feature propagation module (FPM) mixes those task features into a shared representation and
     hands a per-task refinement of it to the next finer scale.
Then PAD-Net distillation runs at every scale, and each task's head upsamples its four distilled
maps to stride 4, concatenates them and decodes (HRNet's head, `TaskHead`).

FPM for task features f_1..f_N (C channels each), X = concat(f_1..f_N) (NC channels):
  G = g(X), g = BasicBlock(NC -> NC/4), BasicBlock(NC/4), conv1x1 -> NC
  A = softmax of G over groups of N consecutive channels: channel k of X and G belongs to group
      k // N, position k % N in it, as the survey code's `view(B, C, N, H, W)` + softmax(dim=2)
      groups them. (The MTI-Net paper describes a softmax across the N tasks per channel; the
      survey code's reshape, which produced the published numbers, is used here.)
  S = BasicBlock(NC -> C)(A * X)                                   (dimensionality reduction)
  out_t = SE_t(S) + f_t                                            (per-task squeeze-excitation)
Every scale's intermediate predictions are deeply supervised by default (`all_scale_outputs`), as
the survey code's MTI-Net loss does.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.heads import InitialTaskModule, TaskHead
from iterfuse_jax.models.layers import BasicBlock, Dtype, fuse_hrnet_branches, resize_bilinear
from iterfuse_jax.models.network import Outputs, check_images
from iterfuse_jax.models.padnet import PADNetDistillation
from iterfuse_jax.precision import accumulation_dtype

NUM_SCALES = 4


class SqueezeExcitation(nn.Module):
  """x * sigmoid(W2 relu(W1 mean_hw(x))), W1: C -> max(C // reduction, 1). [B, H, W, C] -> same."""

  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    squeezed = jnp.mean(x, axis=(1, 2))
    squeezed = nn.relu(nn.Dense(max(c // self.reduction, 1), dtype=self.dtype,
                                name="reduce")(squeezed))
    scale = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name="expand")(squeezed))
    return x * scale[:, None, None, :]


class FeaturePropagation(nn.Module):
  """MTI-Net's feature propagation module (see the module docstring).

  Attributes:
    tasks: task names, in a fixed order.
    se_reduction: channel reduction of the per-task squeeze-excitation.
    dtype: computation dtype.

  Call: {task: [B, h, w, C]} -> {task: [B, h, w, C]}.
  """

  tasks: Sequence[str]
  se_reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool) -> dict[str, jax.Array]:
    tasks = tuple(self.tasks)
    n = len(tasks)
    c = features[tasks[0]].shape[-1]
    concat = jnp.concatenate([features[t] for t in tasks], axis=-1)  # [B, h, w, N * C]
    hidden = max(n * c // 4, 1)
    g = BasicBlock(hidden, dtype=self.dtype, name="nonlinear_block0")(concat, train)
    g = BasicBlock(hidden, dtype=self.dtype, name="nonlinear_block1")(g, train)
    g = nn.Conv(n * c, (1, 1), dtype=self.dtype, name="nonlinear_out")(g)
    grouped = (*concat.shape[:-1], c, n)  # channel k -> (k // N, k % N), see the module docstring
    attention = jax.nn.softmax(g.reshape(grouped).astype(jnp.float32), axis=-1)
    shared = (attention.astype(concat.dtype) * concat.reshape(grouped)).reshape(concat.shape)
    shared = BasicBlock(c, dtype=self.dtype, name="reduce")(shared, train)
    return {t: SqueezeExcitation(self.se_reduction, dtype=self.dtype, name=f"se_{t}")(shared)
               + features[t] for t in tasks}


class MTINet(nn.Module):
  """MTI-Net: per-scale initial predictions, FPM, per-scale PAD-Net distillation, multi-scale heads.

  Attributes:
    tasks: task names, in a fixed order.
    num_outputs: output channels per task.
    backbone: a module mapping [B, H, W, 3] to 4 feature maps, finest (stride 4) first; the task
      features of each scale get that scale's channel count.
    initial_blocks: residual blocks per initial task module.
    se_reduction: channel reduction of the FPM's squeeze-excitation.
    all_scale_outputs: also return the intermediate predictions of the three coarser scales, as
      levels "initial_scale1".."initial_scale3" (strides 8, 16, 32; upsampled to the input size),
      which `losses.multitask_loss` supervises like "initial", as the survey code does.
    dtype: computation dtype (parameters stay float32); outputs are float32 (float64 for float64).

  Call: images [B, H, W, 3] -> {"initial": {task: [B, H, W, C_task]} (the finest scale's
  intermediate predictions), "initial_scale1".."initial_scale3" (with `all_scale_outputs`),
  "final": {task: [B, H, W, C_task]}}.
  """

  tasks: Sequence[str]
  num_outputs: Mapping[str, int]
  backbone: nn.Module
  initial_blocks: int = 2
  se_reduction: int = 16
  all_scale_outputs: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> Outputs:
    check_images(images)
    tasks = tuple(self.tasks)
    size = images.shape[1:3]
    branches = list(self.backbone(images.astype(self.dtype), train=train))
    if len(branches) != NUM_SCALES:
      raise ValueError(f"MTINet needs a backbone with {NUM_SCALES} branches (HRNet), got "
                       f"{len(branches)}")

    def to_output(logits):
      return resize_bilinear(logits, size).astype(accumulation_dtype(self.dtype))

    task_features: list[dict[str, jax.Array]] = [{} for _ in branches]
    predictions: list[dict[str, jax.Array]] = [{} for _ in branches]
    propagated = None
    for scale in reversed(range(NUM_SCALES)):
      x = branches[scale]
      for t in tasks:
        inputs = x
        if propagated is not None:
          inputs = jnp.concatenate(
              [x, resize_bilinear(propagated[t], x.shape[1:3]).astype(x.dtype)], axis=-1)
        module = InitialTaskModule(x.shape[-1], self.num_outputs[t],
                                   num_blocks=self.initial_blocks, dtype=self.dtype,
                                   name=f"scale{scale}_initial_{t}")
        task_features[scale][t], predictions[scale][t] = module(inputs, train)
      if scale > 0:
        propagated = FeaturePropagation(tasks, self.se_reduction, dtype=self.dtype,
                                        name=f"fpm_scale{scale}")(task_features[scale], train)

    distilled = [
        PADNetDistillation(tasks, branches[scale].shape[-1], dtype=self.dtype,
                           name=f"distillation_scale{scale}")(task_features[scale], train)
        for scale in range(NUM_SCALES)
    ]
    outputs: Outputs = {"initial": {t: to_output(predictions[0][t]) for t in tasks}}
    if self.all_scale_outputs:
      for scale in range(1, NUM_SCALES):
        outputs[f"initial_scale{scale}"] = {t: to_output(predictions[scale][t]) for t in tasks}
    final = {}
    for t in tasks:
      fused = fuse_hrnet_branches([distilled[scale][t] for scale in range(NUM_SCALES)])
      final[t] = to_output(TaskHead(fused.shape[-1], self.num_outputs[t], dtype=self.dtype,
                                    name=f"head_{t}")(fused, train))
    outputs["final"] = final
    return outputs
