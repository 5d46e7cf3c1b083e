"""PAD-Net (Table 2a) on NYUD-v2 (semseg + depth).

IterFuse's network with the TPIM replaced by PAD-Net's distillation, out_t = f_t + sum_{a != t}
SA_{a->t}(f_a), as the paper builds its baselines (Sec. 4.1): same backbone, initial modules
(model.task_channels) and heads as IterFuse.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.name = "padnet"
  config.lock()
  return config
