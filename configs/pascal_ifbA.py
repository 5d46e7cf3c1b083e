"""IterFuse with IFB A (Table 3b) on PASCAL-Context (semseg, human parts, saliency).

V <- Co V, n_iter 4.
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.tpim.variant = "A"
  config.model.tpim.n_iter = 4
  config.lock()
  return config
