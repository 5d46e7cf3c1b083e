"""IterFuse with IFB C on NYUD-v2 (semseg + depth), paper Tables 2a and 3a: n_iter 18, alpha 0.3."""

from configs import default


def get_config():
  config = default.get_config("nyud")
  config.lock()
  return config
