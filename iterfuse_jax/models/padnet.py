"""PAD-Net's multi-modal distillation (Xu et al., CVPR 2018), as in the MTL survey code.

Every task t receives, on top of its own features, a spatially attended message from each other
task a: `out_t = f_t + sum_{a != t} SA_{t,a}(f_a)` with `SA(f) = F_s(f) * sigmoid(F_m(f))` (3x3
convs without bias or BN, the same block as the self-attention branch of IterFuse's CIB).

It plugs into `MultiTaskDenseNet.distillation` in place of the TPIM, so that PAD-Net shares the
backbone, initial task modules and final heads of IterFuse and differs only in the distillation,
which is how the paper builds its baselines (Sec. 4.1). MTI-Net reuses it at every scale.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iterfuse_jax.models.cross_task import SpatialSelfAttention
from iterfuse_jax.models.layers import Dtype


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
