"""IterFuse with IFB C on PASCAL-Context (semseg, human parts, saliency), paper Table 2b: n_iter 4."""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.tpim.n_iter = 4
  config.lock()
  return config
