"""Single-task learning (STL) baseline: one independent network per task, trained in one run.

Each task gets its own backbone and head (`MultiTaskDenseNet(tasks=(t,), use_initial=False)`),
and nothing is shared, so summing the per-task losses trains N separate single-task models (with
the loss weights set to 1, as `configs/*_stl.py` do, the gradients are exactly the single-task
ones). This gives the paper's STL row, the reference of Delta_m, from one config.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax

from iterfuse_jax.models.network import Outputs, check_images


class STLNet(nn.Module):
  """N independent single-task networks behind one call.

  Attributes:
    networks: task -> a network predicting only that task (call: images -> {"final": {task: ..}}
      and optionally "initial"). Each owns its parameters under `networks_<task>`.

  Call: images [B, H, W, 3] -> {level: {task: [B, H, W, C_task]}}, merging the levels that every
  per-task network returns.
  """

  networks: Mapping[str, nn.Module]

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> Outputs:
    check_images(images)
    if not self.networks:
      raise ValueError("STLNet needs at least one task network")
    outputs: Outputs = {}
    for task, network in self.networks.items():
      out = network(images, train=train)
      if set(out.get("final", {})) != {task}:
        raise ValueError(f"the STL network of task {task!r} must predict exactly that task, got "
                         f"{sorted(out.get('final', {}))}")
      for level, predictions in out.items():
        outputs.setdefault(level, {})[task] = predictions[task]
    return outputs
