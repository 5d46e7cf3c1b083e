"""PASCAL-Context, the survey code's full task set (semseg, human parts, saliency, normals, edge).

Single-task baselines: one HRNet18 + head per task, all 5 in one run (the Delta_m reference).
Otherwise as configs/pascal_stl.py; see configs/full_tasks.py.
"""

from configs import pascal_stl
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(pascal_stl.get_config())
