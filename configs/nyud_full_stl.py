"""NYUD-v2, the survey code's full task set (semseg, depth, normals, edge).

Single-task baselines: one HRNet18 + head per task, all 4 in one run (the Delta_m reference).
Otherwise as configs/nyud_stl.py; see configs/full_tasks.py.
"""

from configs import nyud_stl
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(nyud_stl.get_config())
