"""DenseMTL (Table 2b) on PASCAL-Context (semseg, human parts, saliency).

IterFuse's network with the TPIM replaced by DenseMTL's cross-task attention: correlation-guided
attention (per-channel mixing initialised to 0) and self-attention per task pair, fused with the
target's features; downscale 2 on the stride-4 task features.
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.name = "densemtl"
  config.model.densemtl = {"scale": 2}
  config.lock()
  return config
