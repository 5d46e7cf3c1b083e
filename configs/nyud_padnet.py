"""PAD-Net (Table 2a) on NYUD-v2 (semseg + depth).

The survey code's PAD-Net on HRNet18 (models/padnet.py): the HRNet fuse layer (1x1 conv + BN +
ReLU on the 270 concatenated channels), per task an initial module of 2 Bottlenecks to 256 channels
with a deeply supervised prediction, PAD-Net's distillation, and heads of 2 Bottlenecks + 1x1 conv.
The paper frames its baselines as "TPIM replaced by the distillation module"; where that and the
survey code differ we follow the survey code, which produced the published PAD-Net numbers.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.name = "padnet"
  config.model.task_channels = 256  # the survey's intermediate_channels
  config.lock()
  return config
