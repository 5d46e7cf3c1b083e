"""IterFuse without IFB (Table 3b, "w/o IFB") on PASCAL-Context (semseg, human parts, saliency).

Each CIB's global attention is one plain Co V.
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.tpim.use_ifb = False
  config.model.tpim.n_iter = 4
  config.lock()
  return config
