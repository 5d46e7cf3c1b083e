"""Maps PyTorch HRNet state dicts (ImageNet checkpoints) onto the Flax `HRNet` variables.

The PyTorch names are those of the HRNet classification code, which timm
(`hrnet_w18_small_v2`, `hrnet_w18`), HRNet-Image-Classification and openmmlab share:

  conv1.weight, bn1.{weight,bias,running_mean,running_var}, conv2, bn2
  layer1.<k>.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}
  transition<t>.<i>.{0,1}            transition<t>.<i>.<j>.{0,1}    (new branch i)
  stage<s>.<m>.branches.<b>.<k>.{conv1,bn1,conv2,bn2}
  stage<s>.<m>.fuse_layers.<i>.<j>.{0,1}    stage<s>.<m>.fuse_layers.<i>.<j>.<k>.{0,1}
  incre_modules, downsamp_modules, final_layer, classifier   (ImageNet head)

Every Flax leaf is translated to the PyTorch key it comes from (`flax_to_torch_key`), so the
conversion is strict in both directions: a tensor nobody reads or a leaf nobody fills is an error.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from iterfuse_jax.models.hrnet import PUBLISHED_VARIANTS, HRNet, HRNetClassifier, hrnet_spec

# Wrapper prefixes some training codebases add (DataParallel, mmcv/mmpretrain models).
WRAPPER_PREFIXES = ("module.", "backbone.")
# Tensors of the ImageNet classification head; a dense-prediction backbone drops them.
CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
# Heads of other codebases' classifiers (mmpretrain neck/head, a plain `fc`): dropped as well.
FOREIGN_HEAD_PREFIXES = ("neck.", "head.", "fc.")
IGNORED_SUFFIXES = ("num_batches_tracked",)

# Flax module-name segment -> PyTorch module path; first full match wins.
_SEGMENT_RULES: tuple[tuple[str, str], ...] = (
    (r"backbone", ""),
    (r"layer1_block(\d+)", r"layer1.\1"),
    (r"transition(\d+)", r"transition\1"),
    (r"stage(\d+)", r"stage\1"),
    (r"module(\d+)", r"\1"),
    (r"branch(\d+)_block(\d+)", r"branches.\1.\2"),
    (r"branch(\d+)_down(\d+)", r"\1.\2"),
    (r"branch(\d+)", r"\1"),
    (r"fuse(\d+)_(\d+)_down(\d+)", r"fuse_layers.\1.\2.\3"),
    (r"fuse(\d+)_(\d+)", r"fuse_layers.\1.\2"),
    (r"incre(\d+)", r"incre_modules.\1.0"),
    (r"downsamp(\d+)", r"downsamp_modules.\1"),
    (r"conv", "0"),
    (r"bn", "1"),
    (r"downsample_conv", "downsample.0"),
    (r"downsample_bn", "downsample.1"),
    (r"(conv[123]|bn[123]|final_layer|classifier)", r"\1"),
)
# (collection, Flax leaf) -> PyTorch tensor name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
COLLECTIONS = ("params", "batch_stats")

Variables = dict[str, Any]


def flax_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The PyTorch state-dict key of the Flax leaf `variables[collection][path]`.

  E.g. ("params", ("stage3", "module1", "fuse2_0_down1", "bn", "scale")) ->
  "stage3.1.fuse_layers.2.0.1.1.weight".
  """
  parts = []
  for segment in path[:-1]:
    for pattern, replacement in _SEGMENT_RULES:
      match = re.fullmatch(pattern, segment)
      if match:
        translated = match.expand(replacement)
        if translated:
          parts.append(translated)
        break
    else:
      raise ValueError(f"no PyTorch name for Flax module {segment!r} in {'/'.join(path)}")
  leaf = _LEAF_NAMES.get((collection, path[-1]))
  if leaf is None:
    raise ValueError(f"no PyTorch name for Flax leaf {collection}/{'/'.join(path)}")
  return ".".join(parts + [leaf])


def _from_torch(value: np.ndarray, collection: str, leaf: str, ndim: int) -> np.ndarray:
  """PyTorch layout -> Flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  value = np.asarray(value, dtype=np.float32)
  if collection == "params" and leaf == "kernel" and value.ndim == ndim:
    if ndim == 4:
      return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if ndim == 2:
      return np.ascontiguousarray(value.T)
  return value


def _torch_shape(flax_shape: tuple[int, ...], collection: str, leaf: str) -> tuple[int, ...]:
  if collection == "params" and leaf == "kernel":
    if len(flax_shape) == 4:
      h, w, i, o = flax_shape
      return (o, i, h, w)
    if len(flax_shape) == 2:
      return tuple(reversed(flax_shape))
  return tuple(flax_shape)


@functools.lru_cache(maxsize=8)
def _traced_shapes(variant: str, include_classifier: bool) -> Variables:
  # Tracing the model takes about a second; the result depends only on the arguments.
  model = (HRNetClassifier(variant) if include_classifier else HRNet(variant))
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  return {c: shapes[c] for c in COLLECTIONS}


def abstract_variables(variant: str, include_classifier: bool = False) -> Variables:
  """Shapes ({"params", "batch_stats"} of jax.ShapeDtypeStruct) of HRNet / HRNetClassifier."""
  hrnet_spec(variant)
  # A fresh tree each time, so that callers may edit it.
  return jax.tree.map(lambda x: x, _traced_shapes(variant, bool(include_classifier)))


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Strips `module.` / `backbone.` prefixes and drops `num_batches_tracked` counters.

  Values become numpy arrays. Raises a ValueError when a key is not a string or two keys
  collide after stripping.
  """
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise ValueError(f"state-dict keys must be strings, got {key!r}")
    name = key
    stripped = True
    while stripped:
      stripped = False
      for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
          name, stripped = name[len(prefix):], True
    if name.rsplit(".", 1)[-1] in IGNORED_SUFFIXES:
      continue
    if name in out:
      raise ValueError(f"state-dict key {key!r} collides with another key after stripping "
                       f"the prefixes {WRAPPER_PREFIXES} (both are {name!r})")
    out[name] = np.asarray(value)
  return out


def is_classifier_key(key: str) -> bool:
  """Whether `key` (prefixes stripped) belongs to an ImageNet classification head."""
  return key.startswith(CLASSIFIER_PREFIXES + FOREIGN_HEAD_PREFIXES)


def guess_variant(state_dict: Mapping[str, Any]) -> str | None:
  """The HRNet variant whose depths match the keys of `state_dict` (prefixes stripped), if any."""
  keys = list(state_dict)

  def count(pattern):
    return len({m.group(1) for m in map(re.compile(pattern).match, keys) if m})

  layer1 = count(r"layer1\.(\d+)\.")
  stage3 = count(r"stage3\.(\d+)\.")
  stage4 = count(r"stage4\.(\d+)\.")
  blocks = count(r"stage2\.0\.branches\.0\.(\d+)\.")
  for variant in PUBLISHED_VARIANTS:
    spec = hrnet_spec(variant)
    if (layer1, blocks, stage3, stage4) == (spec.layer1_blocks, spec.stages[0].num_blocks[0],
                                            spec.stages[1].num_modules,
                                            spec.stages[2].num_modules):
      if "stage2.0.branches.0.0.conv1.weight" in state_dict and (
          np.shape(state_dict["stage2.0.branches.0.0.conv1.weight"])[0]
          == spec.stages[0].channels[0]):
        return variant
  return None


def _format_problems(title: str, items: list[str], limit: int = 60) -> str:
  shown = "\n  ".join(items[:limit])
  more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"{title} ({len(items)}):\n  {shown}{more}"


def torch_state_dict_to_flax(state_dict: Mapping[str, np.ndarray], variant: str,
                             include_classifier: bool = False) -> Variables:
  """Converts a PyTorch HRNet state dict into Flax variables.

  Args:
    state_dict: tensor name -> array (numpy, or anything np.asarray accepts), PyTorch layout.
      `module.` / `backbone.` prefixes are stripped and `num_batches_tracked` ignored.
    variant: "w18_small_v2" or "w18".
    include_classifier: build the variables of `HRNetClassifier` (backbone under "backbone"
      plus the ImageNet head); otherwise those of `HRNet`, and classification-head tensors
      (incre_modules, downsamp_modules, final_layer, classifier; mmpretrain neck/head) are dropped.

  Returns:
    {"params": ..., "batch_stats": ...}: nested dicts of float32 numpy arrays.

  Raises:
    ValueError: listing every tensor that has no home, every Flax leaf left without a tensor and
      every shape mismatch (tensor name, expected vs got), or saying that the dict does not look
      like an HRNet (of this variant).
  """
  tensors = normalize_state_dict(state_dict)
  abstract = abstract_variables(variant, include_classifier)

  if "conv1.weight" not in tensors or not any(k.startswith("layer1.") for k in tensors):
    sample = ", ".join(list(tensors)[:8]) or "<empty>"
    raise ValueError(
        f"this does not look like an HRNet state dict: no 'conv1.weight' / 'layer1.*' tensors "
        f"(first keys: {sample})")

  used: set[str] = set()
  missing, mismatched = [], []
  out: Variables = {}
  for collection in COLLECTIONS:
    flat = traverse_util.flatten_dict(abstract[collection])
    converted = {}
    for path, leaf_shape in flat.items():
      key = flax_to_torch_key(collection, path)
      expected = _torch_shape(tuple(leaf_shape.shape), collection, path[-1])
      if key not in tensors:
        missing.append(f"{key} (expected shape {expected}, for {collection}/{'/'.join(path)})")
        continue
      used.add(key)
      value = tensors[key]
      if tuple(value.shape) != expected:
        mismatched.append(f"{key}: expected {expected}, got {tuple(value.shape)}")
        continue
      converted[path] = _from_torch(value, collection, path[-1], len(expected))
    out[collection] = traverse_util.unflatten_dict(converted)

  unexpected = sorted(k for k in tensors
                      if k not in used and (include_classifier or not is_classifier_key(k)))
  if missing or mismatched or unexpected:
    parts = [f"cannot convert this state dict to HRNet variant {variant!r}"
             f"{' with classifier' if include_classifier else ''}"]
    guess = guess_variant(tensors)
    if guess is not None and guess != variant:
      parts.append(f"its layout is that of variant {guess!r}, not {variant!r}")
    if unexpected:
      parts.append(_format_problems("tensors with no place in the model", unexpected))
    if missing:
      parts.append(_format_problems("model variables with no tensor", sorted(missing)))
    if mismatched:
      parts.append(_format_problems("shape mismatches", sorted(mismatched)))
    raise ValueError("\n".join(parts))
  return out
