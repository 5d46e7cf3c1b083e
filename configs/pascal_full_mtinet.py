"""PASCAL-Context, the survey code's full task set (semseg, human parts, saliency, normals, edge).

MTI-Net: multi-scale initial predictions, FPM, per-scale distillation.
Otherwise as configs/pascal_mtinet.py; see configs/full_tasks.py.
"""

from configs import pascal_mtinet
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(pascal_mtinet.get_config())
