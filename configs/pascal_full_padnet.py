"""PASCAL-Context, the survey code's full task set (semseg, human parts, saliency, normals, edge).

PAD-Net: the TPIM replaced by PAD-Net's distillation.
Otherwise as configs/pascal_padnet.py; see configs/full_tasks.py.
"""

from configs import pascal_padnet
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(pascal_padnet.get_config())
