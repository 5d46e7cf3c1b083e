"""`build_model(config)`: every network of the project from an ml_collections config.

The config needs `dataset.name`, `dataset.tasks` and a `model` block:

  model.name            "iterfuse" | "mtl" | "stl" | "padnet" | "mtinet" | "densemtl" | "atrc"
                        (see MODEL_BUILDERS)
  model.backbone        HRNet variant: "w18_small_v2" (the survey code's "HRNet18"), "w18", or
                        "w18_tiny" (no ImageNet weights; configs/demo.py:tiny and the tests)
  model.fuse_upsample   "bilinear" (segmentation codebases) or "nearest" (timm / classification)
  model.task_channels   C of the task features entering the distillation module
  model.initial_blocks  residual blocks per initial task module
  model.dtype           "float32" or "bfloat16" (activations; parameters stay float32)
  model.tpim            use_ifb, variant, n_iter, alpha_init, scale, qk_channels (0 = C // 2),
                        ifb_impl, ifb_products, ifb_gradient
  model.init            "pytorch" | "flax": initialisation outside the backbone (applied by
                        train.create_train_state, see models/initialization.py)
  model.densemtl.scale  optional (default 2): down-scaling of DenseMTL's correlation attention
  model.mtinet          optional: se_reduction (default 16), the FPM's squeeze-excitation
                        reduction; all_scale_outputs (default True, as the survey code), also
                        output the coarser scales' intermediate predictions (levels
                        "initial_scale1".."initial_scale3"), which the loss supervises too
  model.atrc            genotype: one context for every task pair ("none", "global", "local",
                        "tlabel", "slabel"), the path of an ATRC `atrc_genotype.json` (its
                        search result: {"data": {target: {source: code}}}), or that mapping as
                        JSON text; context_channels (0 = C // 2); kernel_size (local, 9);
                        dropout_rate (channel dropout after each fusion in training, 0.05)
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from iterfuse_jax import tasks as task_registry
from iterfuse_jax.models import atrc
from iterfuse_jax.models.cross_task import TaskPairInteractionModule
from iterfuse_jax.models.densemtl import DenseMTLDistillation
from iterfuse_jax.models.hrnet import HRNet
from iterfuse_jax.models.mtinet import MTINet
from iterfuse_jax.models.network import MultiTaskDenseNet
from iterfuse_jax.models.padnet import PADNet
from iterfuse_jax.models.stl import STLNet

# float64 only under `jax.enable_x64`, for checking the arithmetic against a float64 reference.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def compute_dtype(name: str):
  """Maps a config dtype name to a jnp dtype; raises for anything else."""
  if name not in DTYPES:
    raise ValueError(f"unknown model.dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def make_backbone(model_config: ml_collections.ConfigDict, dtype) -> nn.Module:
  return HRNet(variant=model_config.backbone, fuse_upsample=model_config.fuse_upsample,
               dtype=dtype)


def tpim_from_config(tasks: tuple[str, ...], model_config: ml_collections.ConfigDict,
                     dtype) -> TaskPairInteractionModule:
  """The TPIM with the CIB settings of `model_config.tpim`; a bad setting raises here."""
  options = model_config.tpim
  tpim = TaskPairInteractionModule(
      tasks=tasks, channels=model_config.task_channels, qk_channels=options.qk_channels or None,
      scale=options.scale, use_ifb=options.use_ifb, variant=options.variant,
      n_iter=options.n_iter, alpha_init=options.alpha_init, ifb_impl=options.ifb_impl,
      # A run's config.json from before the option: its IFB products were float32.
      ifb_products=options.get("ifb_products", "float32"),
      ifb_gradient=options.get("ifb_gradient", "stacked"), dtype=dtype)
  tpim.check_options()
  return tpim


def _iterfuse(config: ml_collections.ConfigDict, tasks, num_outputs, dtype) -> nn.Module:
  m = config.model
  return MultiTaskDenseNet(
      tasks=tasks, num_outputs=num_outputs, backbone=make_backbone(m, dtype),
      distillation=tpim_from_config(tasks, m, dtype), use_initial=True,
      task_channels=m.task_channels, initial_blocks=m.initial_blocks, dtype=dtype)


def _mtl(config: ml_collections.ConfigDict, tasks, num_outputs, dtype) -> nn.Module:
  return MultiTaskDenseNet(
      tasks=tasks, num_outputs=num_outputs, backbone=make_backbone(config.model, dtype),
      distillation=None, use_initial=False, dtype=dtype)


def _stl(config: ml_collections.ConfigDict, tasks, num_outputs, dtype) -> nn.Module:
  # One backbone + head per task; make_backbone is called per task so nothing is shared.
  return STLNet(networks={
      task: MultiTaskDenseNet(tasks=(task,), num_outputs={task: num_outputs[task]},
                              backbone=make_backbone(config.model, dtype), distillation=None,
                              use_initial=False, dtype=dtype)
      for task in tasks})


def _with_distillation(config, tasks, num_outputs, dtype, distillation) -> nn.Module:
  m = config.model
  return MultiTaskDenseNet(
      tasks=tasks, num_outputs=num_outputs, backbone=make_backbone(m, dtype),
      distillation=distillation, use_initial=True, task_channels=m.task_channels,
      initial_blocks=m.initial_blocks, dtype=dtype)


def _padnet(config: ml_collections.ConfigDict, tasks, num_outputs, dtype) -> nn.Module:
  # The survey's PAD-Net: its own fuse layer, Bottleneck modules and heads (see padnet.py).
  return PADNet(tasks=tasks, num_outputs=num_outputs, backbone=make_backbone(config.model, dtype),
                channels=config.model.task_channels, dtype=dtype)


def _densemtl(config: ml_collections.ConfigDict, tasks, num_outputs, dtype) -> nn.Module:
  options = config.model.get("densemtl") or {}
  distillation = DenseMTLDistillation(tasks=tasks, channels=config.model.task_channels,
                                      scale=int(options.get("scale", 2)), dtype=dtype)
  return _with_distillation(config, tasks, num_outputs, dtype, distillation)


def _mtinet(config: ml_collections.ConfigDict, tasks, num_outputs, dtype) -> nn.Module:
  m = config.model
  options = m.get("mtinet") or {}
  return MTINet(tasks=tasks, num_outputs=num_outputs, backbone=make_backbone(m, dtype),
                initial_blocks=m.initial_blocks,
                se_reduction=int(options.get("se_reduction", 16)),
                all_scale_outputs=bool(options.get("all_scale_outputs", True)), dtype=dtype)


def load_atrc_genotype(value: str, tasks: tuple[str, ...]) -> dict[str, dict[str, str]]:
  """model.atrc.genotype -> {target: {source: context}} (see the module docstring).

  Raises a ValueError naming the file or the text and what was wrong with it.
  """
  value = str(value).strip()
  if value in atrc.CONTEXTS:
    return atrc.normalize_genotype(value, tasks)
  where = "model.atrc.genotype"
  if value.startswith("{"):
    text = value
  else:
    path = pathlib.Path(value).expanduser()
    if not path.is_file():
      raise ValueError(f"{where} = {value!r}: neither a context {list(atrc.CONTEXTS)}, nor JSON "
                       "text, nor an existing file (an ATRC atrc_genotype.json)")
    where = f"ATRC genotype file {path}"
    text = path.read_text()
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e})") from None
  if isinstance(data, dict) and "data" in data:  # ATRC's file: {"data": ..., "step": ...}
    data = data["data"]
  try:
    return atrc.normalize_genotype(data, tasks)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _atrc(config: ml_collections.ConfigDict, tasks, num_outputs, dtype) -> nn.Module:
  m = config.model
  options = m.get("atrc") or {}
  genotype = load_atrc_genotype(options.get("genotype", "global"), tasks)
  aux_classes = {t: task_registry.aux_num_classes(t, config.dataset.name)
                 for t in atrc.aux_tasks(genotype, tasks)}
  dropout_rate = options.get("dropout_rate", atrc.DROPOUT_RATE)
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not (
      0.0 <= dropout_rate < 1.0):
    raise ValueError(f"model.atrc.dropout_rate = {dropout_rate!r}: expected a number in [0, 1)")
  distillation = atrc.ATRCModule(
      tasks=tasks, channels=m.task_channels, genotype=genotype, aux_classes=aux_classes,
      context_channels=int(options.get("context_channels", 0)),
      kernel_size=int(options.get("kernel_size", atrc.LOCAL_KERNEL)),
      dropout_rate=float(dropout_rate), dtype=dtype)
  return _with_distillation(config, tasks, num_outputs, dtype, distillation)


ModelBuilder = Callable[[ml_collections.ConfigDict, tuple, dict, object], nn.Module]

# model.name -> builder(config, tasks, num_outputs, dtype).
MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "iterfuse": _iterfuse,
    "mtl": _mtl,
    "stl": _stl,
    "padnet": _padnet,
    "densemtl": _densemtl,
    "mtinet": _mtinet,
    "atrc": _atrc,
}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the network that `config` describes (see the module docstring for the keys)."""
  dataset = config.dataset.name
  tasks = task_registry.validate_tasks(config.dataset.tasks, dataset)
  num_outputs = {t: task_registry.num_outputs(t, dataset) for t in tasks}
  name = config.model.name
  if name not in MODEL_BUILDERS:
    raise ValueError(f"unknown model.name {name!r}; expected one of {sorted(MODEL_BUILDERS)}")
  return MODEL_BUILDERS[name](config, tasks, num_outputs, compute_dtype(config.model.dtype))
