"""IterFuse with IFB B (Table 3a) on NYUD-v2 (semseg + depth).

V <- alpha Co V + V, n_iter 18, alpha initialised to 0.3.
"""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.model.tpim.variant = "B"
  config.lock()
  return config
