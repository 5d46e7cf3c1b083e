"""PASCAL-Context, the survey code's full task set (semseg, human_parts, sal, normals, edge).

ATRC: the TPIM replaced by ATRC's task-relational contexts, the task set ATRC searched its
genotypes on (label contexts over normals are refused: see iterfuse_jax.tasks.aux_num_classes).
Otherwise as configs/pascal_atrc.py; see configs/full_tasks.py.
"""

from configs import pascal_atrc
from configs.full_tasks import with_full_tasks


def get_config():
  return with_full_tasks(pascal_atrc.get_config())
