"""Helpers for the HRNet parity tests: random timm HRNets and their branch outputs.

Not a test module; torch and timm are test-only dependencies (requirements-dev.txt).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

# Our variant name -> timm model name.
TIMM_NAMES = {"w18_small_v2": "hrnet_w18_small_v2", "w18": "hrnet_w18"}


def random_timm_hrnet(variant: str, seed: int = 0):
  """A timm HRNet (eval mode) with random weights and random BatchNorm statistics/affines.

  Fresh BN layers are the identity in eval mode, which would hide a mix-up of mean/var/scale;
  randomising all four makes every tensor matter.
  """
  torch.manual_seed(seed)
  model = timm.create_model(TIMM_NAMES[variant], pretrained=False).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
      elif isinstance(module, torch.nn.Linear):
        module.bias.uniform_(-0.1, 0.1)
  return model


def numpy_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _nchw(images: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def timm_branches(model, images: np.ndarray, train: bool = False) -> list[np.ndarray]:
  """The 4 branch outputs of timm's last stage (before the classification head), NHWC."""
  model.train(train)
  try:
    with torch.no_grad():
      x = model.act1(model.bn1(model.conv1(_nchw(images))))
      x = model.act2(model.bn2(model.conv2(x)))
      return [y.numpy().transpose(0, 2, 3, 1) for y in model.stages(x)]
  finally:
    model.eval()


def timm_logits(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(_nchw(images)).numpy()


def relative_error(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _exact_size_bilinear_forward(self, x):
  """HighResolutionModule.forward as in the segmentation codebases: lower branches are
  upsampled bilinearly (align_corners=False) to the exact size of the target branch."""
  functional = torch.nn.functional
  for i, branch in enumerate(self.branches):
    x[i] = branch(x[i])
  outs = []
  for i, fuse_outer in enumerate(self.fuse_layers):
    total = None
    for j, fuse in enumerate(fuse_outer):
      if j > i:
        y = fuse[1](fuse[0](x[j]))  # conv, BN; fuse[2] is timm's nearest Upsample, skipped
        y = functional.interpolate(y, size=x[i].shape[-2:], mode="bilinear", align_corners=False)
      else:
        y = fuse(x[j])
      total = y if total is None else total + y
    outs.append(self.fuse_act(total))
  return outs


def use_exact_size_bilinear_fuse(model) -> None:
  """Switches every fuse layer of a timm HRNet to exact-size bilinear upsampling, in place."""
  import types  # pylint: disable=g-import-not-at-top
  from timm.models.hrnet import HighResolutionModule  # pylint: disable=g-import-not-at-top
  for module in model.modules():
    if isinstance(module, HighResolutionModule) and module.num_branches > 1:
      module.forward = types.MethodType(_exact_size_bilinear_forward, module)
