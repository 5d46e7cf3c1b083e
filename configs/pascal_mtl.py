"""MTL baseline of Table 2b on PASCAL-Context (semseg, human parts, saliency).

Shared HRNet18 and one head per task; no initial modules, no distillation. Adam, lr 1e-4, 100
epochs (default.py).
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.name = "mtl"
  config.lock()
  return config
