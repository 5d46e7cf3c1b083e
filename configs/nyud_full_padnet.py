"""NYUD-v2, the survey code's full task set (semseg, depth, normals, edge).

PAD-Net: the TPIM replaced by PAD-Net's distillation.
Otherwise as configs/nyud_padnet.py; see configs/full_tasks.py.
"""

from configs import nyud_padnet
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(nyud_padnet.get_config())
