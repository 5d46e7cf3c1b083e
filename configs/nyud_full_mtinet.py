"""NYUD-v2, the survey code's full task set (semseg, depth, normals, edge).

MTI-Net: multi-scale initial predictions, FPM, per-scale distillation.
Otherwise as configs/nyud_mtinet.py; see configs/full_tasks.py.
"""

from configs import nyud_mtinet
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(nyud_mtinet.get_config())
