"""MTL baseline of Table 2a on NYUD-v2 (semseg + depth).

Shared HRNet18 and one head per task; no initial modules, no distillation. Adam, lr 1e-4, 100
epochs (default.py).
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.name = "mtl"
  config.lock()
  return config
