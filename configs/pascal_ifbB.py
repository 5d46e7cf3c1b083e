"""IterFuse with IFB B (Table 3b) on PASCAL-Context (semseg, human parts, saliency).

V <- alpha Co V + V, n_iter 4, alpha initialised to 0.3.
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.tpim.variant = "B"
  config.model.tpim.n_iter = 4
  config.lock()
  return config
