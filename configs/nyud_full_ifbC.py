"""NYUD-v2, the survey code's full task set (semseg, depth, normals, edge).

IterFuse with IFB C; the TPIM has 4 x 4 task pairs, 12 cross-task interaction blocks.
Otherwise as configs/nyud_ifbC.py; see configs/full_tasks.py.
"""

from configs import nyud_ifbC
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(nyud_ifbC.get_config())
