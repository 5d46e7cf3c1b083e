"""MTI-Net (Table 2b) on PASCAL-Context (semseg, human parts, saliency).

Initial predictions on the 4 HRNet scales, feature propagation, per-scale PAD-Net distillation and
heads aggregating the scales. The task features of each scale have that scale's HRNet channels
(18/36/72/144), so model.task_channels is unused; the finest scale's intermediate predictions are
supervised (deep supervision).
"""

from configs import default


def get_config():
  config = default.get_config("pascal")
  config.model.name = "mtinet"
  # all_scale_outputs: the survey code also supervises the 3 coarser scales' predictions; that
  # needs a loss accepting the extra output levels "initial_scale1".."initial_scale3".
  config.model.mtinet = {"se_reduction": 16, "all_scale_outputs": False}
  config.lock()
  return config
