"""NYUD-v2, the survey code's full task set (semseg, depth, normals, edge).

MTL baseline: shared HRNet18, one head per task.
Otherwise as configs/nyud_mtl.py; see configs/full_tasks.py.
"""

from configs import nyud_mtl
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(nyud_mtl.get_config())
