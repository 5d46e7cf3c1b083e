"""Single-task baselines, the STL row of Table 2a, on NYUD-v2 (semseg + depth): the survey's recipe.

One independent HRNet18 + head per task, all trained in one run (model.name "stl"). The paper's
Table 1 lists SGD at "10e-4" for NYUD-v2 STL while saying its training follows the survey code,
whose NYUD-v2 HRNet18 single-task configs (configs/nyud/hrnet18/{semseg,depth}.yml) use Adam, lr
1e-4, weight decay 1e-4, 100 epochs, poly schedule: the recipe that produced the published STL
numbers, so the default here. `nyud_stl_paper.py` is the paper-literal SGD variant. The loss
weights are all 1: each network sees only its own task's loss, as a single-task model would.

`python -m iterfuse_jax.compare` measures Delta_m against this run's metrics.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.name = "stl"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 1e-4
  config.loss_weights = {task: 1.0 for task in config.loss_weights}
  config.lock()
  return config
