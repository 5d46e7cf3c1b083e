"""IterFuse with IFB A (Table 3a) on NYUD-v2 (semseg + depth).

V <- Co V, n_iter 18.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.tpim.variant = "A"
  config.lock()
  return config
