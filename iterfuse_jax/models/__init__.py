"""Flax modules of iterfuse_jax: HRNet backbone, task heads, CIB/TPIM, IFB and the networks.

Typical use in a notebook::

  from iterfuse_jax import models
  model = models.build_model(config)
  variables = model.init(jax.random.key(0), images, train=False)
  outputs = model.apply(variables, images)   # {"initial": {...}, "final": {task: logits}}
"""

from iterfuse_jax.models.iterative_fusion import IFB_VARIANTS, iterative_fusion
from iterfuse_jax.models.cross_task import (CrossTaskInteractionBlock, SpatialSelfAttention,
                                            TaskPairInteractionModule, affinity_matrix)
from iterfuse_jax.models.heads import InitialTaskModule, TaskHead
from iterfuse_jax.models.network import MultiTaskDenseNet

try:
  # hrnet.py is the backbone; build_model needs it.
  from iterfuse_jax.models.hrnet import HRNet
  from iterfuse_jax.models.build import MODEL_BUILDERS, build_model
except ImportError:  # pragma: no cover - only while the backbone module is being written
  pass
