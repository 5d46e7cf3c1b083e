"""A small IterFuse on synthetic NYUD_MT data that trains and evaluates on a CPU in a few minutes.

`python launch.py --config configs/demo.py --workdir /tmp/iterfuse_demo` writes the synthetic
dataset into the workdir if it is absent, trains, evaluates, and leaves TensorBoard logs,
checkpoints, prediction images and a metrics table there.

`--config configs/demo.py:tiny` is the same run shrunk to its machinery (48x64 images, 8 channels,
two IFB iterations, 12 steps, and the unpublished HRNet "w18_tiny": W18's widths with one block
per branch and stage, a quarter of W18-Small-v2's blocks; on a 2-core CPU under 2 minutes, most of
it compiling, and under 1 minute again with the workdir's compilation cache): what the tests and
the notebook's quick mode train, and a smoke test of an installation.
"""

from configs import default


def get_config(variant: str = ""):
  """The demo config; `variant` "tiny" gives the minute-long version."""
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/demo.py: unknown variant {variant!r}; expected '' or 'tiny'")
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
  config.eval_last_epochs = 3
  config.checkpoint_every_steps = 40
  config.log_every_steps = 10
  if variant == "tiny":
    size = (48, 64)
    config.dataset.train_size = config.dataset.eval_size = config.dataset.eval_label_size = size
    config.synthetic_data.update(num_train=8, num_val=4, height=size[0], width=size[1])
    config.model.backbone = "w18_tiny"  # compiles in about half the time of w18_small_v2
    config.model.task_channels = 8
    config.model.tpim.n_iter = 2
    config.batch_size = 4
    config.num_epochs = 6  # 2 steps per epoch: 12 steps
    config.eval_every_steps = 0
    config.eval_last_epochs = 3  # steps 8, 10, 12
    config.checkpoint_every_steps = 3  # mid-epoch checkpoints
    config.log_every_steps = 2
    config.num_eval_images = 2
  config.lock()
  return config
