"""PASCAL-Context, the survey code's full task set (semseg, human parts, saliency, normals, edge).

IterFuse with IFB C; the TPIM has 5 x 5 task pairs, 20 cross-task interaction blocks.
Otherwise as configs/pascal_ifbC.py; see configs/full_tasks.py.
"""

from configs import pascal_ifbC
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(pascal_ifbC.get_config())
