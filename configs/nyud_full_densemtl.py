"""NYUD-v2, the survey code's full task set (semseg, depth, normals, edge).

DenseMTL: the TPIM replaced by DenseMTL's cross-task attention.
Otherwise as configs/nyud_densemtl.py; see configs/full_tasks.py.
"""

from configs import nyud_densemtl
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(nyud_densemtl.get_config())
