"""IterFuse without IFB (Table 3a, "w/o IFB") on NYUD-v2 (semseg + depth).

Each CIB's global attention is one plain Co V.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.tpim.use_ifb = False
  config.lock()
  return config
