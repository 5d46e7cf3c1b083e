"""NYUD-v2, the survey code's full task set (semseg, depth, normals, edge).

ATRC: the TPIM replaced by ATRC's task-relational contexts, the task set ATRC searched its
genotypes on (label contexts over normals are refused: see iterfuse_jax.tasks.aux_num_classes).
Otherwise as configs/nyud_atrc.py; see configs/full_tasks.py.
"""

from configs import nyud_atrc
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(nyud_atrc.get_config())
