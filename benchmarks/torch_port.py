"""The PyTorch port of the IterFuse network, its losses and its training recipe (NCHW).

One port serves both the train-step benchmark (`benchmarks/train_step.py`, eager PyTorch against
iterfuse_jax) and the whole-network parity test (`tests/test_torch_parity.py`), so that what is
timed is what is proven equal. As in the survey code, BatchNorm momentum is 0.01 in the HRNet
backbone and PyTorch's default 0.1 everywhere else, eps 1e-5; the layers outside the backbone keep
PyTorch's default initialisation. The backbone is timm's HRNet of `config.model.backbone`
(`hrnet_w18_small_v2` for the paper's configs: the published ImageNet weights' layout) with the
segmentation codebases' exact-size bilinear fuse. Importing this module imports torch and timm:
JAX-only code never imports it.
"""

from __future__ import annotations

import math
import types

import timm
import torch
import torch.nn.functional as F
from timm.models import hrnet as timm_hrnet
from torch import nn

from iterfuse_jax import tasks as task_registry
from iterfuse_jax.models.hrnet import HRNET_VARIANTS, PUBLISHED_VARIANTS, hrnet_spec
from iterfuse_jax.tasks import IGNORE_LABEL


BACKBONE_BN_MOMENTUM = 0.01  # the survey's HRNet (BN_MOMENTUM); timm's default is 0.1
HEAD_BN_MOMENTUM = 0.1  # PyTorch's default: the survey's heads, initial modules and blocks


def bn(channels, momentum=HEAD_BN_MOMENTUM):
  return nn.BatchNorm2d(channels, momentum=momentum, eps=1e-5)


def widen(x):
  """x in at least float32 (float64 stays float64), like iterfuse_jax.precision."""
  return x.to(torch.promote_types(x.dtype, torch.float32))


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

  def __init__(self, channels, scale, variant, n_iter, alpha_init, impl, qk_channels=None):
    super().__init__()
    if impl not in ("materialized", "sdpa"):
      raise ValueError(f"unknown PyTorch IFB implementation {impl!r}")
    self.scale, self.variant, self.n_iter, self.impl = scale, variant, n_iter, impl
    d = qk_channels or max(channels // 2, 1)
    self.self_attention = SpatialSelfAttention(channels)
    self.query = ConvBNReLU(channels, d)
    self.key = ConvBNReLU(channels, d)
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
        co = torch.softmax(widen(torch.bmm(q, k.transpose(1, 2))) * scale, dim=-1)
        for _ in range(self.n_iter):
          v = ifb_update(torch.bmm(co.to(v.dtype), v), v, alpha, self.variant)
      else:
        # Fused kernels want one head size for Q, K and V, a multiple of 8: zero channels
        # change neither Q K^T nor the attended values of the first C channels.
        width = -(-max(c, q.shape[-1]) // 8) * 8
        qp, kp = (F.pad(t, (0, width - t.shape[-1]))[:, None] for t in (q, k))
        for _ in range(self.n_iter):
          attended = F.scaled_dot_product_attention(qp, kp, F.pad(v, (0, width - c))[:, None],
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


def timm_arch_config(variant: str) -> dict:
  """timm's HRNet architecture dict (its `cfg_cls` entries) for one of our HRNet variants.

  For the published variants it equals timm's own entry (tested); for `w18_tiny`, which timm does
  not have, it is how timm builds the same network.
  """
  spec = hrnet_spec(variant)
  config = {"stem_width": spec.stem_width,
            "stage1": {"num_modules": 1, "num_branches": 1, "block_type": "BOTTLENECK",
                       "num_blocks": (spec.layer1_blocks,), "num_channels": (spec.layer1_planes,),
                       "fuse_method": "SUM"}}
  for i, stage in enumerate(spec.stages, start=2):
    config[f"stage{i}"] = {"num_modules": stage.num_modules, "num_branches": len(stage.channels),
                           "block_type": "BASIC", "num_blocks": tuple(stage.num_blocks),
                           "num_channels": tuple(stage.channels), "fuse_method": "SUM"}
  return config


def hrnet_backbone(variant: str = "w18_small_v2"):
  """timm's HRNet (`hrnet_<variant>` where timm has it), four raw branches (18/36/72/144 ch),
  bilinear exact-size fuse, BatchNorm momentum 0.01."""
  features = {"feature_location": "", "out_indices": (1, 2, 3, 4)}
  if variant in PUBLISHED_VARIANTS:
    net = timm.create_model(f"hrnet_{variant}", pretrained=False, features_only=True, **features)
  else:
    net = timm_hrnet.HighResolutionNetFeatures(timm_arch_config(variant), **features)
  for module in net.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.momentum = BACKBONE_BN_MOMENTUM
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
               n_iter, alpha_init, impl, qk_channels=None, backbone="w18_small_v2"):
    super().__init__()
    self.tasks = tuple(tasks)
    self.backbone = hrnet_backbone(backbone)
    shared = sum(self.backbone.feature_info.channels())
    self.initial = nn.ModuleDict({
        t: InitialTaskModule(shared, task_channels, num_outputs[t], initial_blocks)
        for t in self.tasks})
    self.cibs = nn.ModuleDict({
        f"{s}_to_{t}": CrossTaskInteractionBlock(task_channels, scale, variant, n_iter,
                                                 alpha_init, impl, qk_channels)
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
      outputs["initial"][t] = widen(resize(prediction, size))
    for t in self.tasks:
      total = features[t]
      for s in self.tasks:
        if s != t:
          total = total + self.cibs[f"{s}_to_{t}"](features[s], features[t])
      outputs["final"][t] = widen(resize(self.heads[t](total), size))
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
  num_valid = valid.sum().clamp(min=1).to(x.dtype)
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


def check_config_covered(config) -> None:
  """Raises unless the port implements what `config` asks of the JAX model and its training."""
  m, tpim, opt = config.model, config.model.tpim, config.optimizer
  implemented = {"model.name": (m.name, "iterfuse"),
                 "model.fuse_upsample": (m.fuse_upsample, "bilinear"),
                 "model.tpim.use_ifb": (tpim.use_ifb, True),
                 # co.to(v.dtype): the products in the model's dtype (bf16 under autocast).
                 "model.tpim.ifb_products": (tpim.get("ifb_products", "model"), "model"),
                 "optimizer.name": (opt.name, "adam")}
  differ = {k: got for k, (got, want) in implemented.items() if got != want}
  if m.backbone not in HRNET_VARIANTS:
    differ["model.backbone"] = m.backbone
  if differ:
    raise ValueError(f"the PyTorch port does not implement {differ}")


def iterfuse_from_config(config, impl: str = "materialized") -> IterFuseNet:
  """The port of `build_model(config)` for an IterFuse config (train mode, on the CPU)."""
  check_config_covered(config)
  tasks = tuple(config.dataset.tasks)
  tpim = config.model.tpim
  return IterFuseNet(
      tasks, {t: task_registry.num_outputs(t, config.dataset.name) for t in tasks},
      task_channels=config.model.task_channels, initial_blocks=config.model.initial_blocks,
      scale=tpim.scale, variant=tpim.variant, n_iter=tpim.n_iter, alpha_init=tpim.alpha_init,
      impl=impl, qk_channels=tpim.qk_channels or None, backbone=config.model.backbone).train()


# ----------------------------------------------------------------------------- weight mapping

# Flax leaf name -> PyTorch tensor name, per collection.
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("params", "scale"): "weight", ("params", "alpha"): "alpha",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_BLOCK_LAYERS = {"proj_conv": "proj.0", "proj_bn": "proj.1"}


def port_key(collection: str, path: tuple[str, ...]) -> str:
  """The port's state-dict key of the leaf `variables[collection][path]` of the JAX IterFuse.

  E.g. ("params", ("initial_semseg", "block0", "proj_conv", "kernel")) ->
  "initial.semseg.blocks.0.proj.0.weight"; backbone leaves follow HRNet's published names.
  """
  from iterfuse_jax.models import hrnet_weights  # pylint: disable=g-import-not-at-top

  top, rest = path[0], path[1:]
  if top == "backbone":
    return "backbone." + hrnet_weights.flax_to_torch_key(collection, rest)
  leaf = _LEAF_NAMES.get((collection, path[-1]))
  if leaf is None:
    raise ValueError(f"no port name for {collection}/{'/'.join(path)}")
  if top.startswith("initial_"):
    module = ["initial", top[len("initial_"):]]
    for segment in rest[:-1]:
      if segment.startswith("block"):
        module += ["blocks", segment[len("block"):]]
      else:
        module.append(_BLOCK_LAYERS.get(segment, segment))
  elif top == "distillation":
    cib, *inner = rest[:-1]
    if not cib.startswith("cib_"):
      raise ValueError(f"no port name for {collection}/{'/'.join(path)}")
    module = ["cibs", cib[len("cib_"):], *inner]
  elif top.startswith("head_"):
    module = ["heads", top[len("head_"):], *rest[:-1]]
  else:
    raise ValueError(f"no port name for {collection}/{'/'.join(path)}")
  return ".".join(module + [leaf])


def to_flax_layout(value, collection: str, leaf: str):
  """A PyTorch tensor as the Flax leaf: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  value = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
  value = value.astype(np.promote_types(value.dtype, np.float32))  # float64 stays float64
  if collection == "params" and leaf == "kernel":
    if value.ndim == 4:
      return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:
      return np.ascontiguousarray(value.T)
  return value


def flax_tree(tensors, abstract, collections=("params", "batch_stats")):
  """Named port tensors (a state dict, or {name: grad}) as the JAX model's variable trees.

  `abstract` is the JAX model's variables (shapes suffice, e.g. from `jax.eval_shape`). Returns
  {collection: nested dict of numpy arrays} for `collections`; raises listing every leaf without
  a tensor, every shape mismatch and every tensor left over.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  used, problems, out = set(), [], {}
  for collection in collections:
    flat = {}
    for path, leaf in traverse_util.flatten_dict(abstract[collection]).items():
      key = port_key(collection, path)
      if key not in tensors:
        problems.append(f"{key}: no tensor for {collection}/{'/'.join(path)}")
        continue
      used.add(key)
      value = to_flax_layout(tensors[key], collection, path[-1])
      if value.shape != tuple(leaf.shape):
        problems.append(f"{key}: shape {value.shape}, the JAX leaf is {tuple(leaf.shape)}")
      flat[path] = value
    out[collection] = traverse_util.unflatten_dict(flat)
  if "batch_stats" in collections:
    left = sorted(k for k in tensors if k not in used and not k.endswith("num_batches_tracked"))
    problems += [f"{k}: no JAX leaf" for k in left]
  if problems:
    raise ValueError("the port's tensors do not map onto the JAX model:\n  " + "\n  ".join(problems))
  return out
