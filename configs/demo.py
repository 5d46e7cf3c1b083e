"""A small IterFuse on synthetic NYUD_MT data that trains and evaluates on a CPU in a few minutes.

`python launch.py --config configs/demo.py --workdir /tmp/iterfuse_demo` writes the synthetic
dataset into the workdir if it is absent, trains, evaluates, and leaves TensorBoard logs,
checkpoints, prediction images and a metrics table there.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.dataset.data_dir = ""  # "" here: <workdir>/data/NYUD_MT_synthetic
  config.dataset.train_size = (96, 128)
  config.dataset.eval_size = (96, 128)
  config.dataset.eval_label_size = (96, 128)
  config.synthetic_data.enabled = True
  config.synthetic_data.num_train = 64
  config.synthetic_data.num_val = 16

  config.model.task_channels = 32
  config.model.initial_blocks = 1
  config.model.tpim.n_iter = 18

  config.batch_size = 8
  config.num_epochs = 30
  config.optimizer.learning_rate = 2e-3
  config.eval_every_steps = 80
  config.checkpoint_every_steps = 40
  config.log_every_steps = 10
  config.lock()
  return config
