"""MTI-Net (Table 2b) on PASCAL-Context (semseg, human parts, saliency).

Initial predictions on the 4 HRNet scales, feature propagation, per-scale PAD-Net distillation and
heads aggregating the scales. The task features of each scale have that scale's HRNet channels
(18/36/72/144), so model.task_channels is unused. As in the survey code, the intermediate
predictions of all 4 scales are supervised (deep supervision), and the FPM's softmax groups the
concatenated channels as the survey code's reshape does (see models/mtinet.py).
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.name = "mtinet"
  config.model.mtinet = {"se_reduction": 16, "all_scale_outputs": True}
  config.lock()
  return config
