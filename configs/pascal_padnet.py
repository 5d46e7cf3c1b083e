"""PAD-Net (Table 2b) on PASCAL-Context (semseg, human parts, saliency).

IterFuse's network with the TPIM replaced by PAD-Net's distillation, out_t = f_t + sum_{a != t}
SA_{a->t}(f_a), as the paper builds its baselines (Sec. 4.1): same backbone, initial modules
(model.task_channels) and heads as IterFuse.
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.name = "padnet"
  config.lock()
  return config
