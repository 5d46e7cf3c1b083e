"""PASCAL-Context, the survey code's full task set (semseg, human parts, saliency, normals, edge).

MTL baseline: shared HRNet18, one head per task.
Otherwise as configs/pascal_mtl.py; see configs/full_tasks.py.
"""

from configs import pascal_mtl
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(pascal_mtl.get_config())
