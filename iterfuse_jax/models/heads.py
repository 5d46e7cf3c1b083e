"""Per-task modules: initial prediction modules (deep supervision) and final prediction heads."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.layers import BasicBlock, Dtype, batch_norm


class InitialTaskModule(nn.Module):
  """Task features and an intermediate prediction from the shared backbone features.

  The task features are what enters the distillation module (TPIM for IterFuse); the intermediate
  prediction is supervised with the task's loss (deep supervision).

  [B, h, w, C_shared] -> (features [B, h, w, channels], prediction [B, h, w, num_outputs]).
  """

  channels: int
  num_outputs: int
  num_blocks: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    for i in range(self.num_blocks):
      x = BasicBlock(self.channels, dtype=self.dtype, name=f"block{i}")(x, train)
    prediction = nn.Conv(self.num_outputs, (1, 1), dtype=self.dtype, name="predict")(x)
    return x, prediction


class TaskHead(nn.Module):
  """Final prediction head in the style of HRNet's `HighResolutionHead`.

  1x1 conv (with bias) + BN + ReLU + 1x1 conv: [B, h, w, C] -> [B, h, w, num_outputs]. The caller
  resizes the logits to the input size.
  """

  channels: int
  num_outputs: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, name="bn")(x))
    return nn.Conv(self.num_outputs, (1, 1), dtype=self.dtype, name="predict")(x)
