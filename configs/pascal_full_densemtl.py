"""PASCAL-Context, the survey code's full task set (semseg, human parts, saliency, normals, edge).

DenseMTL: the TPIM replaced by DenseMTL's cross-task attention.
Otherwise as configs/pascal_densemtl.py; see configs/full_tasks.py.
"""

from configs import pascal_densemtl
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(pascal_densemtl.get_config())
