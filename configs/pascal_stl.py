"""Single-task baselines, the STL row of Table 2b, on PASCAL-Context (semseg, parts, saliency).

One independent HRNet18 + head per task, all trained in one run (model.name "stl"). Paper Table 1:
SGD with momentum 0.9, lr 1e-2, 60 epochs, poly schedule. The loss weights are all 1: each network
sees only its own task's loss, as a single-task model would (with SGD a loss weight would scale
that network's learning rate).

`python -m iterfuse_jax.compare` measures Delta_m against this run's metrics.
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.name = "stl"
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 1e-2
  config.optimizer.momentum = 0.9
  config.num_epochs = 60
  config.loss_weights = {task: 1.0 for task in config.loss_weights}
  config.lock()
  return config
