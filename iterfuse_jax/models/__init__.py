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

from iterfuse_jax.models.hrnet import HRNet
from iterfuse_jax.models.build import MODEL_BUILDERS, build_model

# Notebook conveniences that read files live in iterfuse_jax.inference (models know nothing about
# files); they are importable from here too, loaded on first use.
_INFERENCE_NAMES = ("Predictor", "load_predictor", "read_image")


def __getattr__(name):
  if name in _INFERENCE_NAMES:
    from iterfuse_jax import inference  # pylint: disable=g-import-not-at-top
    return getattr(inference, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
