"""The PyTorch port of the IterFuse network, its losses and its training recipe (NCHW).

One port serves both the train-step benchmark (`benchmarks/train_step.py`, eager PyTorch against
iterfuse_jax) and the whole-network parity test (`tests/test_torch_parity.py`), so that what is
timed is what is proven equal. BatchNorm momentum 0.01 / eps 1e-5 like the reference code (flax
momentum 0.99). Importing this module imports torch and timm: JAX-only code never imports it.
"""

from __future__ import annotations

import math
import types

import timm
import torch
import torch.nn.functional as F
from timm.models import hrnet as timm_hrnet
from torch import nn

from iterfuse_jax.tasks import IGNORE_LABEL


def bn(channels):
  return nn.BatchNorm2d(channels, momentum=0.01, eps=1e-5)


def resize(x, size):
  if tuple(x.shape[-2:]) == tuple(size):
    return x
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Module):
  """layers.ConvBNReLU: conv (no bias) + BN + ReLU."""

  def __init__(self, cin, cout, k=1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    self.bn = bn(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
  """layers.BasicBlock: two 3x3 conv + BN, 1x1 projection when the channels change."""

  def __init__(self, cin, cout):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn(cout)
    self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), bn(cout)
    self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), bn(cout))
                 if cin != cout else None)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (self.proj(x) if self.proj is not None else x))


class InitialTaskModule(nn.Module):
  """heads.InitialTaskModule: residual blocks -> task features, 1x1 conv -> prediction."""

  def __init__(self, cin, channels, num_outputs, num_blocks):
    super().__init__()
    self.blocks = nn.Sequential(*[BasicBlock(cin if i == 0 else channels, channels)
                                  for i in range(num_blocks)])
    self.predict = nn.Conv2d(channels, num_outputs, 1)

  def forward(self, x):
    x = self.blocks(x)
    return x, self.predict(x)


class TaskHead(nn.Module):
  """heads.TaskHead: 1x1 conv (bias) + BN + ReLU + 1x1 conv."""

  def __init__(self, channels, num_outputs):
    super().__init__()
    self.conv, self.bn = nn.Conv2d(channels, channels, 1), bn(channels)
    self.predict = nn.Conv2d(channels, num_outputs, 1)

  def forward(self, x):
    return self.predict(F.relu(self.bn(self.conv(x))))


class SpatialSelfAttention(nn.Module):
  """self = F_s(f) * sigmoid(F_m(f)), 3x3 convs without bias (paper eq. 1)."""

  def __init__(self, channels):
    super().__init__()
    self.features = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    self.mask = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

  def forward(self, x):
    return self.features(x) * torch.sigmoid(self.mask(x))


def ifb_update(attended, v, alpha, variant):
  if variant == "A":
    return attended
  if variant == "B":
    return alpha * attended + v
  return alpha * attended + (1.0 - alpha) * v


class CrossTaskInteractionBlock(nn.Module):
  """cross_task.CrossTaskInteractionBlock: self(f_s) + up(IFB(V, softmax(Q K^T / sqrt(d))))."""

  def __init__(self, channels, scale, variant, n_iter, alpha_init, impl):
    super().__init__()
    if impl not in ("materialized", "sdpa"):
      raise ValueError(f"unknown PyTorch IFB implementation {impl!r}")
    self.scale, self.variant, self.n_iter, self.impl = scale, variant, n_iter, impl
    self.self_attention = SpatialSelfAttention(channels)
    self.query = ConvBNReLU(channels, channels)
    self.key = ConvBNReLU(channels, channels)
    self.value = ConvBNReLU(channels, channels)
    self.alpha = (nn.Parameter(torch.tensor(float(alpha_init))) if variant != "A" else None)

  def _down(self, x):
    if self.scale == 1:
      return x
    # ceil_mode + count_include_pad=False = flax avg_pool(padding="SAME", count_include_pad=False)
    return F.avg_pool2d(x, self.scale, self.scale, ceil_mode=True, count_include_pad=False)

  def forward(self, f_s, f_t):
    self_features = self.self_attention(f_s)
    target, source = self._down(f_t), self._down(f_s)
    b, c, h, w = source.shape
    v = self.value(source).flatten(2).transpose(1, 2)  # [B, M, C]
    if self.n_iter > 0:  # n_iter 0 leaves V as it is; Q and K are then dead code (as in XLA)
      q = self.query(target).flatten(2).transpose(1, 2)
      k = self.key(source).flatten(2).transpose(1, 2)
      scale = 1.0 / math.sqrt(q.shape[-1])
      alpha = self.alpha
      if self.impl == "materialized":
        co = torch.softmax(torch.bmm(q, k.transpose(1, 2)).float() * scale, dim=-1)
        for _ in range(self.n_iter):
          v = ifb_update(torch.bmm(co.to(v.dtype), v), v, alpha, self.variant)
      else:
        # Fused kernels want head sizes that are multiples of 8: zero channels change nothing.
        pad = -c % 8
        qp, kp = (F.pad(t, (0, pad))[:, None] for t in (q, k))
        for _ in range(self.n_iter):
          attended = F.scaled_dot_product_attention(qp, kp, F.pad(v, (0, pad))[:, None],
                                                    scale=scale)[:, 0, :, :c]
          v = ifb_update(attended, v, alpha, self.variant)
    fused = v.transpose(1, 2).reshape(b, c, h, w)
    return self_features + resize(fused.to(self_features.dtype), f_t.shape[-2:])


def _exact_size_fuse_forward(module, x):
  """timm HighResolutionModule.forward with j > i paths resized to branch i's exact size."""
  if module.num_branches == 1:
    return [module.branches[0](x[0])]
  x = [branch(xi) for branch, xi in zip(module.branches, x)]
  outs = []
  for i, fuse_outer in enumerate(module.fuse_layers):
    y = None
    for j, f in enumerate(fuse_outer):
      z = f(x[j])
      if j > i:
        z = resize(z, x[i].shape[-2:])
      y = z if y is None else y + z
    outs.append(module.fuse_act(y))
  return outs


def hrnet_backbone():
  """timm hrnet_w18_small_v2, four raw branches (18/36/72/144 ch), bilinear exact-size fuse."""
  net = timm.create_model("hrnet_w18_small_v2", pretrained=False, features_only=True,
                          feature_location="", out_indices=(1, 2, 3, 4))
  for module in net.modules():
    if isinstance(module, timm_hrnet.HighResolutionModule) and module.num_branches > 1:
      for i, fuse_outer in enumerate(module.fuse_layers):
        for j in range(i + 1, len(fuse_outer)):
          fuse_outer[j][2] = nn.Identity()  # was nn.Upsample(scale_factor=2 ** (j - i))
      module.forward = types.MethodType(_exact_size_fuse_forward, module)
  return net


class IterFuseNet(nn.Module):
  """Backbone -> upsample + concat (270 ch) -> initial modules -> TPIM -> heads -> input size.

  Call: images [B, 3, H, W] -> {"initial": {task: [B, C_task, H, W]}, "final": {...}}.
  """

  def __init__(self, tasks, num_outputs, task_channels, initial_blocks, scale, variant,
               n_iter, alpha_init, impl):
    super().__init__()
    self.tasks = tuple(tasks)
    self.backbone = hrnet_backbone()
    shared = sum(self.backbone.feature_info.channels())
    self.initial = nn.ModuleDict({
        t: InitialTaskModule(shared, task_channels, num_outputs[t], initial_blocks)
        for t in self.tasks})
    self.cibs = nn.ModuleDict({
        f"{s}_to_{t}": CrossTaskInteractionBlock(task_channels, scale, variant, n_iter,
                                                 alpha_init, impl)
        for t in self.tasks for s in self.tasks if s != t})
    self.heads = nn.ModuleDict({t: TaskHead(task_channels, num_outputs[t])
                                for t in self.tasks})

  def forward(self, images):
    size = images.shape[-2:]
    branches = self.backbone(images)
    shared = torch.cat([resize(b, branches[0].shape[-2:]) for b in branches], dim=1)
    features, outputs = {}, {"initial": {}, "final": {}}
    for t in self.tasks:
      features[t], prediction = self.initial[t](shared)
      outputs["initial"][t] = resize(prediction, size).float()
    for t in self.tasks:
      total = features[t]
      for s in self.tasks:
        if s != t:
          total = total + self.cibs[f"{s}_to_{t}"](features[s], features[t])
      outputs["final"][t] = resize(self.heads[t](total), size).float()
    return outputs


def cross_entropy(logits, labels):
  return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_LABEL)


def l1(prediction, labels):
  valid = (labels > 0) & (labels != IGNORE_LABEL)
  error = torch.where(valid, (prediction[:, 0] - labels).abs(), 0.0)
  return error.sum() / valid.sum().clamp(min=1)


def balanced_bce(logits, labels):
  x = logits[:, 0]
  valid = labels != IGNORE_LABEL
  positive = valid & (labels >= 0.5)
  negative = valid & ~positive
  num_valid = valid.sum().clamp(min=1).float()
  w = negative.sum() / num_valid
  loss_pos = torch.where(positive, F.softplus(-x), 0.0).sum()
  loss_neg = torch.where(negative, F.softplus(x), 0.0).sum()
  return (w * loss_pos + (1 - w) * loss_neg) / num_valid


task_losses = {"semseg": cross_entropy, "human_parts": cross_entropy, "depth": l1,
               "sal": balanced_bce}


def multitask_loss(outputs, batch, tasks, weights):
  """losses.multitask_loss: weighted sum over the "initial" and "final" predictions."""
  total = 0.0
  for level in ("initial", "final"):
    for t in tasks:
      total = total + weights[t] * task_losses[t](outputs[level][t], batch[t])
  return total
