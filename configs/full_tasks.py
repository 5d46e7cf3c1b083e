"""The survey code's full task sets for any row: `with_full_tasks(<row config>)`.

NYUD-v2: semseg, depth, normals, edge. PASCAL-Context: semseg, human_parts, sal, normals, edge
(iterfuse_jax.tasks.FULL_TASKS). Loss weights are default.py's (the survey's: normals 10, edge 50)
or, for STL, all 1. The paper has no single-task result for normals and edge, so Delta_m during
training averages over the tasks it has references for (metrics.available_delta_m); the full
Delta_m comes from `python -m iterfuse_jax.compare` with the matching *_full_stl run.
"""

import ml_collections

from iterfuse_jax.tasks import FULL_TASKS


def with_full_tasks(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The row `config` on its dataset's full task set (locked, like every experiment config)."""
  config.unlock()
  config.dataset.tasks = FULL_TASKS[config.dataset.name]
  config.lock()
  return config
